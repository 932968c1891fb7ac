"""Mixture-of-experts routers of transformers' LLMs through record_routing (docs/beyond_lily.md).

For each covered architecture (tests/_tiny_moe.py), a tiny random model: the recorded router
logits are those the model itself returns with ``output_router_logits=True``, the dispatch counts
those recomputed from the logits by the architecture's own rule, and the per-layer auxiliary loss
the model's own ``load_balancing_loss_func`` given that layer alone — padding excluded by the
attention mask throughout.
"""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest
import torch

import lily_lab as ll
from lily_lab import Routing
from lily_lab.core.routers import is_topk_router, router_sites

from _tiny_moe import ARCHITECTURES, batch, model, steer

ROUTERS = {"mixtral": 2, "qwen2_moe": 1, "olmoe": 2, "deepseek_v3": 2, "gpt_oss": 2}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def recorded(arch):
    """The model, its batch, its own outputs (router logits) and the recording of one forward."""
    m = model(arch)
    ids, mask = batch()
    with ll.record_routing(m, max_tokens=10_000) as rec, torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return m, ids, mask, out, rec.routing


def _own_logits(m, out) -> dict:
    """Router name → the logits the model returned for that layer (one per MoE layer, in order)."""
    return {s.name: lg for s, lg in zip(router_sites(m), out.router_logits, strict=True)}


def _chosen(arch: str, router, logits: torch.Tensor) -> torch.Tensor:
    """The experts each token is sent to, recomputed from the logits by the architecture's rule
    (written out here, not taken from the model)."""
    k = router.top_k
    if arch != "deepseek_v3":  # softmax routers and GPT-OSS: the top k of the logits
        return logits.topk(k, dim=-1).indices
    # DeepSeek-V3: sigmoid scores plus the correction bias, within the topk_group best groups
    # (a group scored by its two best experts).
    choice = logits.sigmoid() + router.e_score_correction_bias
    N, E, G = choice.shape[0], router.num_experts, router.num_group
    groups = choice.view(N, G, E // G)
    best = groups.topk(2, dim=-1).values.sum(-1).topk(router.topk_group, dim=-1).indices
    keep = torch.zeros(N, G, dtype=torch.bool).scatter_(1, best, True)
    choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    return choice.topk(k, dim=-1).indices


def test_the_routers_are_found_by_structure(arch):
    m = model(arch)
    sites = router_sites(m)
    assert len(sites) == ROUTERS[arch]
    routers = [mod for mod in m.modules() if is_topk_router(mod)]
    assert [s.layer for s in sites] == routers
    assert {s.scoring for s in sites} == {"sigmoid" if arch == "deepseek_v3" else "softmax"}
    assert all(s.num_experts == s.layer.weight.shape[0] and s.top_k == 2 for s in sites)
    # The MoE blocks and the experts carry top_k or num_experts too, but are not routers.
    assert not any(is_topk_router(mod) for mod in m.modules() if mod not in routers)


def test_recorded_logits_are_the_models_own(recorded, arch):
    m, ids, mask, out, routing = recorded
    real = mask.reshape(-1).bool()
    # The model returns one tensor per MoE layer (Qwen2-MoE's dense layer has none), in layer order.
    assert len(out.router_logits) == len(routing.sites) == ROUTERS[arch]
    own = _own_logits(m, out)
    for name in routing.sites:
        expected = own[name].float()[real]
        got = torch.from_numpy(routing.logits(name))
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-6
        rec = routing.record(name)
        assert rec.n_tokens == int(mask.sum()) and rec.top_k == 2 and rec.routing == "top-k" and rec.kind == "moe"


def test_dispatch_counts_are_recomputed_from_the_logits(recorded, arch):
    m, ids, mask, out, routing = recorded
    real = mask.reshape(-1).bool()
    own = _own_logits(m, out)
    load = ll.expert_load(routing)
    for s in router_sites(m):
        logits = own[s.name].float()[real]
        expected = np.bincount(_chosen(arch, s.layer, logits).reshape(-1).numpy(), minlength=s.num_experts)
        rec = routing.record(s.name)
        np.testing.assert_array_equal(rec.dispatch_counts, expected)
        rows = load[load.site == s.name].sort_values("expert")
        np.testing.assert_array_equal(rows.tokens.to_numpy(), expected)
        assert rows.share.sum() == pytest.approx(1.0)
        metrics = ll.router_metrics(routing).set_index("site").loc[s.name]
        assert metrics.tokens_min == expected.min() and metrics.tokens_max == expected.max()
        assert metrics.tokens_std == pytest.approx(expected.std())
        # The applied weights are the model's: zero off the chosen experts; GPT-OSS's softmax
        # over the chosen adds up to 1 per token, DeepSeek-V3's are scaled.
        mix = routing.mixtures(s.name)
        assert ((mix > 0).sum(axis=1) == 2).all()
        total = {"mixtral": 1.0, "gpt_oss": 1.0, "olmoe": None, "qwen2_moe": None, "deepseek_v3": 2.5}[arch]
        if total is not None:
            np.testing.assert_allclose(mix.sum(axis=1), total, rtol=1e-5)


def test_aux_loss_per_layer_is_the_models_own_function(recorded, arch):
    m, ids, mask, out, routing = recorded
    own = _own_logits(m, out)
    metrics = ll.router_metrics(routing).set_index("site")
    for s in router_sites(m):
        logits = own[s.name]
        got = metrics.loc[s.name, "aux_loss"]
        if arch == "deepseek_v3":
            # No load_balancing_loss_func (DeepSeek-V3 balances with its bias): the formula by
            # hand, on the experts it really chose.
            real = mask.reshape(-1).bool()
            lg = logits.float()[real]
            p = lg.sigmoid() / lg.sigmoid().sum(-1, keepdim=True)
            c = np.bincount(_chosen(arch, s.layer, lg).reshape(-1).numpy(), minlength=s.num_experts)
            expected = s.num_experts * float((torch.from_numpy(c / real.sum().item()) * p.mean(0).double()).sum())
        else:
            fn = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}").load_balancing_loss_func
            expected = float(fn((logits,), s.num_experts, s.top_k, mask))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # Averaged over layers, as the models' own loss concatenates them, imbalances can cancel; the
    # per-layer values are what the recording gives.
    assert metrics.aux_loss.notna().all()


def test_padding_changes_nothing_but_the_count(arch):
    """The padded rows of a batch are left out: the real tokens' sums equal those of the same
    sequences run alone, without padding."""
    m = model(arch)
    ids, mask = batch(b=2, t=6)
    with ll.record_routing(m) as padded, torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    with ll.record_routing(m) as alone, torch.no_grad():
        m(input_ids=ids[:1])
        m(input_ids=ids[1:, : int(mask[1].sum())])
    for name in padded.routing.sites:
        a, b = padded.routing.record(name), alone.routing.record(name)
        assert a.n_tokens == b.n_tokens == int(mask.sum())
        np.testing.assert_array_equal(a.dispatch_counts, b.dispatch_counts)
        np.testing.assert_allclose(a.sum_probs, b.sum_probs, atol=1e-5)


def test_generate_records_prefill_and_decode(arch):
    m = model(arch)
    ids, _ = batch(b=2, t=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as generation wants
    new = 4
    with ll.record_routing(m) as rec, torch.no_grad():
        m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=0)
    routing = rec.routing
    assert routing.phases == ["prefill", "decode"]
    name = routing.sites[0]
    assert routing.phase("prefill").record(name).n_tokens == int(mask.sum())
    assert routing.phase("decode").record(name).n_tokens == 2 * (new - 1)
    for nm in routing.sites:
        rec_ = routing.record(nm)
        parts = [routing.phase(p).record(nm).dispatch_counts for p in ("prefill", "decode")]
        np.testing.assert_array_equal(parts[0] + parts[1], rec_.dispatch_counts)
        assert rec_.dispatch_counts.sum() == rec_.top_k * rec_.n_tokens


def test_save_load_and_merge_keep_the_dispatch(recorded, tmp_path):
    routing = recorded[-1]
    loaded = Routing.load(routing.save(tmp_path / "moe.npz"))
    assert ll.router_metrics(loaded).equals(ll.router_metrics(routing))
    assert ll.expert_load(loaded).equals(ll.expert_load(routing))
    merged = Routing.merge([routing, loaded])
    for name in routing.sites:
        np.testing.assert_array_equal(merged.record(name).dispatch_counts, 2 * routing.record(name).dispatch_counts)
        assert merged.record(name).top_k == routing.record(name).top_k
    # One layer's aux loss of the doubled data is the same: a ratio of sums.
    np.testing.assert_allclose(ll.router_metrics(merged).aux_loss, ll.router_metrics(routing).aux_loss)


def test_memory_stays_flat_over_a_thousand_calls():
    """1,000 calls: memory after the first 100 does not grow with the calls (sums and a bounded
    sample only)."""
    m = model("mixtral")
    ids, mask = batch(b=2, t=6)
    with ll.record_routing(m, max_tokens=256, token_sums=False) as rec, torch.no_grad():
        tracemalloc.start()
        try:
            for i in range(1000):
                m(input_ids=ids, attention_mask=mask)
                if i == 99:
                    rec.routing  # noqa: B018 - sum what is queued
                    early = tracemalloc.get_traced_memory()[0]
            rec.routing  # noqa: B018
            late = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert rec.routing.record(rec.routing.sites[0]).n_tokens == 1000 * int(mask.sum())
    assert late - early < 256 << 10, f"memory grew by {(late - early) / 1024:.0f} KiB over 900 calls"


def test_a_router_that_returns_something_else_is_named():
    m = model("mixtral")
    router = m.model.layers[0].mlp.gate
    original = router.forward
    router.forward = lambda h: original(h)[0]  # logits only
    with pytest.raises(ll.InputError, match=r"model\.layers\.0\.mlp\.gate.*not \(logits, weights, indices\)"):
        with ll.record_routing(m), torch.no_grad():
            m(input_ids=batch()[0])


def test_a_model_without_routers_is_refused_with_what_it_has():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2))
    with pytest.raises(ll.RoutingError, match="no mixture-of-experts router"):
        with ll.record_routing(m):
            pass


def test_routing_monitor_logs_a_moe_models_routers_per_layer_and_across_layers():
    """RoutingMonitor on training traffic: the per-site dispatch metrics are a recording's of the
    same forwards, the per-module ones their min / median / max across layers, and a layer made
    to collapse raises the early warning (the finding names it)."""
    m = model("mixtral")
    m.train()
    data = [batch(seed=s) for s in range(3)]
    monitor = ll.RoutingMonitor(m, per="both", warn_after=1)
    with ll.record_routing(m, training_only=True) as rec:
        for ids, mask in data:
            m(input_ids=ids, attention_mask=mask)
    logs = monitor.observe(3)
    want = ll.router_metrics(rec.routing)
    for row in want.itertuples():
        for metric in ("aux_loss", "tokens_min", "tokens_max", "tokens_std", "load_entropy"):
            assert logs[f"lily/{row.site}/{metric}"] == pytest.approx(getattr(row, metric), rel=1e-9)
    for metric in ("aux_loss", "tokens_max"):
        assert logs[f"lily/mlp.gate/{metric}/max"] == pytest.approx(want[metric].max(), rel=1e-9)
        assert logs[f"lily/mlp.gate/{metric}/median"] == pytest.approx(want[metric].median(), rel=1e-9)
    assert not any(k.endswith("expert_cosine") for k in logs)  # no bank of low-rank experts here
    assert not monitor.warnings
    # Layer 1's router sends every token of batch() to expert 3: the early warning names that layer alone.
    m.eval()  # steering runs the batch once: not training traffic
    steer(m, layer=1, expert=3)
    m.train()
    with torch.no_grad():
        m(input_ids=data[0][0], attention_mask=data[0][1])
    monitor.observe(6)
    dominant = [w for w in monitor.warnings if w.kind == "dominant_expert"]
    assert dominant and dominant[0].sites == ["model.layers.1.mlp.gate"]
    monitor.close()


def test_routing_callback_logs_a_moe_models_routers_into_the_trainer(tmp_path):
    """RoutingCallback on a tiny Mixtral fine-tuned by transformers' Trainer: each logging step's
    history holds every layer's dispatch metrics and the module's min / median / max, and the
    timeline is saved in the run's folder."""
    import transformers

    m = model("mixtral")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 64, (6,), generator=g)), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": ids} for _ in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=2,
                                          use_cpu=True, disable_tqdm=True)
    cb = ll.RoutingCallback(per="both")
    trainer = transformers.Trainer(model=m, args=args, train_dataset=rows, callbacks=[cb])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        for s in router_sites(m):
            assert h[f"lily/{s.name}/tokens_max"] <= 2 * 4 * 6  # at most every token of the two steps' batches
            assert h[f"lily/{s.name}/aux_loss"] >= 0
        assert h["lily/mlp.gate/aux_loss/min"] <= h["lily/mlp.gate/aux_loss/median"] <= h["lily/mlp.gate/aux_loss/max"]
    assert ll.Timeline.load(tmp_path / "lily_timeline.npz").steps == [2, 4]
