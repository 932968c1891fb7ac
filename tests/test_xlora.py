"""PEFT X-LoRA read like Lily: its classifier's scalings recorded as router distributions, its LoRA
experts as a bank (issue #18).

A tiny random Llama with three random LoRA experts on q_proj and v_proj of its two layers (so
X-LoRA's n_layers = 4), built offline. The recorded scalings are X-LoRA's own
(``get_scalings_log()``), per layer, on the real tokens of a padded batch; the sites' ``ΔW(π)`` is
what the LoRA layer itself adds at the scalings ``π``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lily_lab as ll
from lily_lab.analysis.spectra import dense_delta
from lily_lab.core.xlora import find_xlora, xlora_routing

peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
E, N_LAYERS = 3, 4  # experts; X-LoRA layers (2 decoder layers × q_proj, v_proj)


def _llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(**CFG)
    cfg.use_cache = False  # X-LoRA refuses a model with use_cache=True
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three LoRA adapters with random, different A and B, saved under names X-LoRA loads."""
    root = tmp_path_factory.mktemp("xlora_adapters")
    paths = {}
    for i in range(E):
        pm = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False, lora_dropout=0.0))
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        pm.save_pretrained(root / str(i))
        paths[str(i)] = str(root / str(i))
    return paths


def _xlora(paths: dict, **options):
    """An X-LoRA model over ``paths`` (``{"0": dir, …}``), its classifier random."""
    torch.manual_seed(7)
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=CFG["hidden_size"], adapters=paths, xlora_depth=1,
                           **options)
    m = peft.get_peft_model(_llama(), cfg).eval()
    with torch.no_grad():
        for p in m.base_model.internal_xlora_classifier.parameters():
            p.normal_(0, 0.3)
    return m


@pytest.fixture(scope="module")
def models(adapters):
    """Built once: the models the tests share, by their options."""
    cache = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in cache:
            cache[key] = _xlora(adapters, **options)
        return cache[key]
    return get


def _batch(b: int = 3, t: int = 6):
    ids = torch.randint(3, 64, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding
    mask[2, 2:] = 0
    return ids, mask


def _layer_numbers(model) -> dict:
    return {s.name: s.layer_number for s in find_xlora(model).sites}


def _record(model, ids, mask, labels=None):
    """The recording of one forward, and X-LoRA's own log of it."""
    model.enable_scalings_logging()
    model.clear_scalings_log()
    try:
        with ll.record_routing(model) as rec, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            if labels is not None:
                rec.annotate(labels=labels)
        return rec.routing, model.get_scalings_log()
    finally:
        model.disable_scalings_logging()
        model.clear_scalings_log()


@pytest.mark.parametrize("layerwise", [False, True])
def test_recorded_scalings_are_the_scalings_log(models, layerwise):
    m = models(layerwise_scalings=layerwise, softmax_temperature=0.7)
    ids, mask = _batch()
    routing, log = _record(m, ids, mask)
    assert len(log) == 1 and tuple(log[0].shape) == (3, 6, N_LAYERS, E)
    real = mask.reshape(-1).bool()
    numbers = _layer_numbers(m)
    assert sorted(numbers.values()) == list(range(N_LAYERS)) and set(routing.sites) == set(numbers)
    for name, j in numbers.items():
        expected = log[0][:, :, j].reshape(-1, E)[real].float()
        got = torch.from_numpy(routing.probs(name))
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-6
        # The raw logits, before the temperature, as a Lily router's.
        logits = torch.from_numpy(routing.logits(name))
        assert (torch.softmax(logits / 0.7, dim=-1) - expected).abs().max() <= 1e-6
        # No top-k: the applied weights are the scalings.
        assert np.abs(routing.mixtures(name) - expected.numpy()).max() <= 1e-6
        rec = routing.record(name)
        assert (rec.kind, rec.routing, rec.num_B, rec.n_calls) == ("xlora", "token", E, 1)
        # Once per forward, real tokens only: the scaling pass is not recorded.
        assert rec.n_tokens == int(mask.sum())
        np.testing.assert_allclose(rec.sum_probs, expected.double().sum(0).numpy(), atol=1e-5)
    if not layerwise:  # one distribution for every layer
        first = routing.probs(routing.sites[0])
        assert all(np.array_equal(routing.probs(name), first) for name in routing.sites)
    else:
        assert not np.allclose(routing.probs(routing.sites[0]), routing.probs(routing.sites[-1]))


def test_top_k_and_no_softmax(models):
    ids, mask = _batch()
    real = mask.reshape(-1).bool()
    m = models(layerwise_scalings=True, top_k_lora=2)
    routing, log = _record(m, ids, mask)
    for s in find_xlora(m).sites:
        expected = log[0][:, :, s.layer_number].reshape(-1, E)[real]
        assert np.abs(routing.probs(s.name) - expected.numpy()).max() <= 1e-6
        applied = s.xlora_layer.get_maybe_topk_scalings(log[0]).reshape(-1, E)[real]
        mix = routing.mixtures(s.name)
        assert np.abs(mix - applied.numpy()).max() <= 1e-6
        assert ((mix > 0).sum(axis=1) == 2).all()  # the layer's top 2, not renormalised
    # Without the softmax X-LoRA's scalings are raw logits: probs is their softmax, the mixture the
    # logits the layer applies.
    m = models(layerwise_scalings=True, enable_softmax=False)
    routing, log = _record(m, ids, mask)
    for s in find_xlora(m).sites:
        raw = log[0][:, :, s.layer_number].reshape(-1, E)[real]
        assert np.abs(routing.probs(s.name) - torch.softmax(raw, -1).numpy()).max() <= 1e-6
        assert np.abs(routing.logits(s.name) - raw.numpy()).max() <= 1e-6
        assert np.abs(routing.mixtures(s.name) - raw.numpy()).max() <= 1e-6


def test_sites_are_banks_of_the_lora_experts(models):
    m = models(layerwise_scalings=True)
    sites = ll.adapter_sites(m)
    numbers = _layer_numbers(m)
    assert [s.name for s in sites] == sorted(numbers, key=numbers.get)
    assert {s.kind for s in sites} == {"xlora"} and all(s.num_B == E for s in sites)
    assert len({s.group for s in sites}) == len(sites)  # each layer has its own experts
    assert sites[0].module == "self_attn.q_proj" and sites[0].group == "self_attn.q_proj@0:32x32"
    # The adapter: the LoRA experts and the classifier (the router X-LoRA trains).
    lora = sum(p.numel() for n, p in m.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    classifier = sum(p.numel() for p in m.base_model.internal_xlora_classifier.parameters())
    assert lora == N_LAYERS * E * 4 * (32 + 32 + 32 + 16) // 2 and classifier > 0
    assert ll.count_parameters(m)["adapter"] == lora + classifier
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, CFG["hidden_size"], generator=g)
    for s in sites:
        lora = s.layer
        # ΔW(π) from the site equals Σ_e π_e s_e B_e A_e of the LoRA experts …
        pi = torch.softmax(torch.randn(E, generator=g), -1)
        by_hand = sum(pi[e].double() * lora.scaling[a] * lora.lora_B[a].weight.double() @ lora.lora_A[a].weight.double()
                      for e, a in enumerate(lora.active_adapters))
        delta = dense_delta(s, pi.numpy())
        assert (delta - by_hand).abs().max() <= 1e-10
        # … and what the X-LoRA layer itself adds to its base layer at the scalings π.
        S = pi.expand(2, 5, N_LAYERS, E).contiguous()
        with torch.no_grad():
            added = lora(x, scalings=S) - lora.base_layer(x)
        assert (added.double() - x.double() @ delta.T).abs().max() <= 1e-5
    # Every expert's own update, as the spectra see it: one expert at a time.
    spectra = ll.delta_spectra(m, mixture=1)
    s = sites[0]
    expected = torch.linalg.svdvals(dense_delta(s, np.eye(E)[1]))[: 4 * E]
    got = spectra[spectra.site == s.name].sort_values("k").sigma.to_numpy()
    np.testing.assert_allclose(got[:4], expected[:4].numpy(), rtol=1e-8)
    assert spectra.r.iloc[0] == 4 * E and np.all(got[4:] < 1e-8 * got[0])  # one expert: rank 4


def test_expert_similarity_compares_the_updates(models, adapters):
    random = ll.expert_similarity(models(layerwise_scalings=True))
    assert len(random) == N_LAYERS * 3  # 3 pairs per bank
    assert (random.functional_cosine.abs() < 0.5).all()
    np.testing.assert_allclose(random.cosine, random.functional_cosine)
    # Experts 0 and 1 the same adapter: their updates are the same at every layer.
    same = _xlora({"0": adapters["0"], "1": adapters["0"], "2": adapters["2"]}, layerwise_scalings=True)
    sim = ll.expert_similarity(same)
    pair = sim[(sim.expert_i == 0) & (sim.expert_j == 1)]
    others = sim[sim.expert_j == 2]
    assert len(pair) == N_LAYERS
    np.testing.assert_allclose(pair.functional_cosine, 1.0, atol=1e-10)
    np.testing.assert_allclose(pair.cosine, 1.0, atol=1e-10)
    np.testing.assert_allclose(pair.subspace_overlap, 1.0, atol=1e-8)
    assert (others.functional_cosine.abs() < 0.5).all()
    summary = ll.bank_summary(same)
    assert len(summary) == N_LAYERS and (summary.num_B == E).all()
    assert (summary.max_cosine > 1 - 1e-9).all() and (summary.distinct_experts < 2.5).all()
    assert (ll.bank_summary(models(layerwise_scalings=True)).distinct_experts > 2.5).all()


def test_metrics_specialization_spectra_and_diagnose_run(models):
    m = models(layerwise_scalings=True)
    ids, mask = _batch()
    routing, _ = _record(m, ids, mask, labels=["a", "b", "a"])
    metrics = ll.router_metrics(routing)
    assert len(metrics) == N_LAYERS and set(metrics.kind) == {"xlora"} and metrics.load_entropy.notna().all()
    spec = ll.specialization(routing, by="label")
    assert set(spec.site) == set(routing.sites)
    spectra = ll.delta_spectra(m, routing)
    assert set(spectra.mixture) == {"routed mean"} and (spectra.sigma >= 0).all()
    s = ll.adapter_sites(m)[2]
    pi = routing.mean_mixture(s.name)
    expected = torch.linalg.svdvals(dense_delta(s, pi)).numpy()[:12]
    np.testing.assert_allclose(spectra[spectra.site == s.name].sort_values("k").sigma, expected, rtol=1e-8, atol=1e-12)
    d = ll.diagnose(m, routing)
    assert isinstance(d, ll.Diagnosis) and "redundant_experts" in d.checked and "dominant_expert" in d.checked
    assert not [f for f in d.findings if f.kind in ("redundant_experts", "inactive_adapter", "nonfinite_weights")]
    summary = ll.adapter_summary(m)
    assert summary.count("(xlora)") == summary.count("routed by the X-LoRA classifier") == N_LAYERS


def test_under_generate_each_step_is_a_full_forward(models):
    """No KV cache in X-LoRA: each step reruns the whole text, and is recorded as such."""
    m = models(layerwise_scalings=True)
    ids = _batch()[0][:2, :5]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    new = 3
    m.enable_scalings_logging()
    m.clear_scalings_log()
    try:
        with ll.record_routing(m) as rec, torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        log = m.get_scalings_log()
    finally:
        m.disable_scalings_logging()
        m.clear_scalings_log()
    routing = rec.routing
    assert out.shape[1] == 5 + new and [tuple(s.shape[:2]) for s in log] == [(2, 5), (2, 6), (2, 7)]
    assert routing.n_calls == new and routing.phases == [None]
    # Each step's real tokens (the prompt's, then the generated ones so far), in order.
    real = [torch.cat([mask, torch.ones(2, k, dtype=mask.dtype)], 1).reshape(-1).bool() for k in range(new)]
    for name, j in _layer_numbers(m).items():
        expected = torch.cat([s[:, :, j].reshape(-1, E)[r] for s, r in zip(log, real)]).float()
        assert (torch.from_numpy(routing.probs(name)) - expected).abs().max() <= 1e-6
        assert routing.record(name).n_tokens == sum(int(r.sum()) for r in real)


def test_training_only_and_the_hooks_are_removed(models):
    m = models(layerwise_scalings=True)
    ids, mask = _batch()
    clf = m.base_model.internal_xlora_classifier
    before = (len(clf._forward_hooks), len(clf.layers[-1]._forward_hooks))
    with ll.record_routing(m, training_only=True) as rec, torch.no_grad():
        m(input_ids=ids, attention_mask=mask)  # eval mode: not recorded
    assert all(rec.routing.record(n).n_tokens == 0 for n in rec.routing.sites)
    assert (len(clf._forward_hooks), len(clf.layers[-1]._forward_hooks)) == before


def test_routing_round_trips_through_a_file(models, tmp_path):
    m = models(layerwise_scalings=True, top_k_lora=2)
    routing, _ = _record(m, *_batch())
    loaded = ll.Routing.load(routing.save(tmp_path / "xlora.npz"))
    assert ll.router_metrics(loaded).equals(ll.router_metrics(routing))
    name = routing.sites[0]
    np.testing.assert_array_equal(loaded.mixtures(name), routing.mixtures(name))
    assert loaded.record(name).kind == "xlora"


class _Classifier(torch.nn.Module):
    """An X-LoRA classifier by its attributes, in a model without X-LoRA layers."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 6))
        self.log_scalings, self.n_layers, self.n_classes = [], 2, 3

    def make_dummy_scalings(self, *args, **kwargs):
        return torch.zeros(1, 1, 2, 3)


def test_x_lora_parts_that_do_not_fit_are_refused(models):
    broken = torch.nn.Sequential(torch.nn.Linear(4, 4), _Classifier())
    for call in (lambda: ll.adapter_sites(broken), lambda: ll.record_routing(broken).__enter__()):
        with pytest.raises(ll.InputError, match=r"X-LoRA classifier '1' has no X-LoRA layers"):
            call()
    m = models(layerwise_scalings=True)
    xl = find_xlora(m)
    with pytest.raises(ll.InputError, match=r"scalings \(2, 5, 3\).*\(batch, positions, 4, 3\)"):
        xlora_routing(xl, torch.zeros(2, 5, 3))
    owner = xl.sites[1].xlora_layer
    owner.layer_number = 0  # two layers reading the same scalings
    try:
        with pytest.raises(ll.InputError, match=r"n_layers = 4.*layer numbers \[0, 0, 2, 3\]"):
            ll.adapter_sites(m)
    finally:
        owner.layer_number = 1
    assert len(ll.adapter_sites(m)) == N_LAYERS


def test_causal_consistency_names_x_lora_not_lora(models):
    """causal_consistency measures Lily's routing modes; on X-LoRA it says which adapter it found."""
    ids, _ = _batch()
    with pytest.raises(ll.TargetError, match="X-LoRA") as err:
        ll.causal_consistency(models(), ids)
    assert "PEFT LoRA adapter" not in str(err.value)
