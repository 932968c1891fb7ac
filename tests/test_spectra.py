"""ΔW spectra against a dense SVD, rank metrics on hand-made spectra, expert geometry, merging,
intruder dimensions and the router aux losses."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import lily_lab as ll
from lily_lab.analysis import spectrum_ranks
from lily_lab.analysis.spectra import dense_delta

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def stack(d_in, d_out, layers=3):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(d_in, d_out) for _ in range(layers)])


# (d_in, d_out, r, E, stride) — d_out ≠ d_in, r > min(d), E = 1
SHAPES = [(6, 9, 3, 2, 1), (9, 6, 4, 3, 2), (5, 4, 7, 2, 1), (8, 8, 8, 1, 3), (12, 3, 2, 4, 2)]


@pytest.mark.parametrize("d_in,d_out,r,E,stride", SHAPES)
@pytest.mark.parametrize("which", ["uniform", "expert", "dict"])
def test_spectra_equal_dense_svd(d_in, d_out, r, E, stride, which):
    model = nn.Sequential(*[nn.Linear(d_in, d_in) for _ in range(2)], nn.Linear(d_in, d_out))
    torch.manual_seed(1)
    ll.add_lily(model, ll.LilyConfig(["2", "0", "1"], r=r, num_B=E, stride_A=stride, scaling=0.7, init_weights=False))
    sites = ll.adapter_sites(model)
    rng = np.random.default_rng(0)
    if which == "uniform":
        mixture, pis = None, {s.name: np.full(s.num_B, 1 / s.num_B) for s in sites}
    elif which == "expert":
        mixture, pis = E - 1, {s.name: np.eye(s.num_B)[E - 1] for s in sites}
    else:
        pis = {s.name: rng.dirichlet(np.ones(s.num_B)) for s in sites}
        mixture = pis
    spectra = ll.delta_spectra(model, mixture)
    for s in sites:
        want = np.linalg.svd(dense_delta(s, pis[s.name]).numpy(), compute_uv=False)
        got = spectra[spectra.site == s.name].sort_values("k").sigma.to_numpy()
        assert len(got) == min(r, s.d_in, s.d_out)
        np.testing.assert_allclose(got, want[: len(got)], rtol=1e-5, atol=1e-12 * want[0])
        assert np.all(want[len(got):] <= 1e-10 * want[0])  # the rest of the dense spectrum is zero


def test_spectra_of_peft_lora_sites_equal_dense_svd():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=24))
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "dense"], r=4, lora_alpha=8,
                                                     init_lora_weights=False))
    spectra = ll.delta_spectra(lora)
    for s in ll.adapter_sites(lora):
        layer = s.layer
        dense = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]).detach()
        want = np.linalg.svd(dense.double().numpy(), compute_uv=False)[:4]
        got = spectra[spectra.site == s.name].sigma.to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert set(spectra.mixture) == {"single expert"}


def test_spectra_from_an_adapter_directory_alone(tmp_path):
    model = ll.add_lily(stack(8, 8, 4), ll.LilyConfig(["0", "1", "2", "3"], r=3, num_B=2, init_weights=False))
    ll.save_adapter(model, tmp_path / "lily")
    key = ["site", "k"]
    live = ll.delta_spectra(model).sort_values(key).reset_index(drop=True)
    offline = ll.delta_spectra(tmp_path / "lily").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(live, offline)


def test_spectra_with_routing_mixtures():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 5)

        def forward(self, x, attention_mask=None):
            return self.proj(x)

    model = ll.add_lily(M(), ll.LilyConfig(["proj"], r=2, num_B=3, routing="token", init_weights=False))
    with ll.record_routing(model) as rec:
        model(torch.randn(2, 6, 4))
        rec.annotate(labels=["a", "b"])
    site = ll.adapter_sites(model)[0]
    mean = ll.delta_spectra(model, rec.routing)
    want = np.linalg.svd(dense_delta(site, rec.routing.mean_mixture(site.name)).numpy(), compute_uv=False)[:2]
    np.testing.assert_allclose(mean.sigma, want, rtol=1e-5)
    by_label = ll.delta_spectra(model, rec.routing, by="label")
    assert set(by_label.mixture) == {"label=a", "label=b"}
    by_token = ll.delta_spectra(model, rec.routing, by="token", max_samples=5)
    assert by_token.mixture.nunique() == 5
    with pytest.raises(ValueError, match="no expert"):
        ll.delta_spectra(model, 7)


def test_rank_metrics_on_hand_made_spectra():
    flat = spectrum_ranks(np.array([2.0, 2.0, 2.0, 2.0]))
    assert flat["effective_rank"] == pytest.approx(4) and flat["stable_rank"] == pytest.approx(4)
    assert flat["numerical_rank"] == 4 and flat["energy_top1"] == pytest.approx(0.25)
    one = spectrum_ranks(np.array([3.0, 0.0, 0.0]))
    assert one["effective_rank"] == pytest.approx(1) and one["stable_rank"] == pytest.approx(1)
    assert one["numerical_rank"] == 1 and one["energy_top1"] == pytest.approx(1)
    mixed = spectrum_ranks(np.array([3.0, 1.0, 1e-9]))
    p = np.array([3, 1, 1e-9]) / (4 + 1e-9)
    assert mixed["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert mixed["stable_rank"] == pytest.approx(10 / 9) and mixed["numerical_rank"] == 2
    frame = pd.DataFrame({"site": ["a"] * 3 + ["b"] * 2, "k": [0, 1, 2, 0, 1], "sigma": [3, 1, 1e-9, 2, 2]})
    summary = ll.rank_summary(frame).set_index("site")
    assert summary.loc["a", "numerical_rank"] == 2 and summary.loc["b", "effective_rank"] == pytest.approx(2)


def test_lora_equivalent_rank():
    model = ll.add_lily(stack(10, 10, 4), ll.LilyConfig(r"\d", r=4, stride_A=2, num_B=2))  # one group
    params = 2 * 4 * 10 + 2 * 4 * 10 + 4 * 4 * 2  # 2 As + bank + 4 routers = 192
    assert ll.count_parameters(model)["adapter"] == params
    assert ll.lora_equivalent_rank(model) == params // (4 * 20)


# ----------------------------------------------------------------------------- experts


def bank_model(B):
    E, r, d = B.shape
    torch.manual_seed(0)
    model = ll.add_lily(stack(d, d, 2), ll.LilyConfig(r"\d", r=r, num_B=E))  # one bank
    with torch.no_grad():
        ll.adapter_sites(model)[0].B.copy_(B)
    return model


def test_expert_similarity_by_hand():
    B = torch.zeros(3, 2, 4)
    B[0, 0, 0] = 1.0  # e0: output direction 0
    B[1, 0, 0] = 2.0  # e1: a scaled copy of e0
    B[2, 1, 1] = 1.0  # e2: orthogonal
    sim = ll.expert_similarity(bank_model(B)).set_index(["expert_i", "expert_j"])
    assert sim.loc[(0, 1), "cosine"] == pytest.approx(1) and sim.loc[(0, 2), "cosine"] == pytest.approx(0)
    assert sim.loc[(0, 1), "subspace_overlap"] == pytest.approx(1) and sim.loc[(0, 2), "subspace_overlap"] == pytest.approx(0)
    assert sim.loc[(0, 1), "functional_cosine"] == pytest.approx(1)
    summary = ll.bank_summary(bank_model(B)).iloc[0]
    assert 1.0 < summary.distinct_experts < 3.0
    ortho = torch.zeros(3, 2, 4)
    for e in range(3):
        ortho[e, 0, e] = 1.0
    assert ll.bank_summary(bank_model(ortho)).iloc[0].distinct_experts == pytest.approx(3)


def test_an_all_zero_expert_has_no_cosine():
    """A zero vector has no direction: every pair with an all-zero expert is NaN, in all three
    measures, and the bank's summary averages over the pairs that are defined."""
    B = torch.zeros(3, 2, 4)
    B[0, 0, 0], B[1, 0, 0] = 1.0, 2.0  # e0 and e1 parallel; e2 all zero
    model = bank_model(B)
    sim = ll.expert_similarity(model).set_index(["expert_i", "expert_j"])
    assert sim.loc[(0, 1), "cosine"] == pytest.approx(1)
    for pair in [(0, 2), (1, 2)]:
        assert sim.loc[pair, ["cosine", "subspace_overlap", "functional_cosine"]].isna().all(), pair
    summary = ll.bank_summary(model).iloc[0]
    assert summary.mean_cosine == pytest.approx(1) and summary.max_cosine == pytest.approx(1)
    assert summary.distinct_experts == pytest.approx(1)  # the two experts with a direction are one
    fresh = ll.bank_summary(bank_model(torch.zeros(3, 2, 4))).iloc[0]  # init_weights=True, before a step
    assert np.isnan(fresh.mean_cosine) and np.isnan(fresh.max_cosine) and np.isnan(fresh.distinct_experts)


def test_timeline_similarity_is_undefined_until_the_experts_move():
    torch.manual_seed(0)
    model = ll.add_lily(stack(6, 6, 2), ll.LilyConfig(r"\d", r=2, num_B=3))  # B = 0
    timeline = ll.Timeline(probe=torch.randn(4, 6))
    timeline.observe(model, 0)
    with torch.no_grad():
        ll.adapter_sites(model)[0].B.normal_()
    timeline.observe(model, 1)
    sim = ll.timeline_expert_similarity(timeline).set_index("step")
    assert sim.loc[0, ["mean_cosine", "min_cosine", "max_cosine"]].isna().all() and sim.loc[0, "mean_norm"] == 0
    assert sim.loc[1, ["mean_cosine", "min_cosine", "max_cosine"]].notna().all()


# ----------------------------------------------------------------------------- merging


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_merge_at_the_mixture_a_batch_call_used_equals_the_routed_output(arch):
    torch.manual_seed(0)
    if arch == "bert":
        base = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=64)).eval()
        targets = ["query", "value"]
    else:
        base = transformers.GPT2Model(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4,
                                                              n_positions=16, bos_token_id=0, eos_token_id=0)).eval()
        targets = ["c_attn", "c_proj"]
    model = ll.add_lily(base, ll.LilyConfig(targets, r=4, num_B=3, init_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 100, (3, 7))
    with ll.record_routing(model) as rec:
        routed = model(input_ids=ids).last_hidden_state
    used = {s: rec.routing.mixtures(s)[0] for s in rec.routing.sites}
    merged = ll.merge_at(model, used)
    assert not any(isinstance(m, ll.LilyLayer) for m in merged.modules())
    assert (merged(input_ids=ids).last_hidden_state - routed).abs().max() <= 1e-5
    assert ll.merge_error(model, merged, [{"input_ids": ids}]) <= 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # source untouched
    other = ll.merge_at(model, 0)  # one expert everywhere: not what the routed call did
    assert ll.merge_error(model, other, [{"input_ids": ids}]) > 1e-4


# ----------------------------------------------------------------------------- intruders


def test_intruder_dimensions_by_hand():
    d = 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.linspace(1.0, 0.5, d)))  # singular vectors: the axes
    ll.add_lily(model, ll.LilyConfig(["0"], r=1, num_B=1, scaling=1.0))
    site = ll.adapter_sites(model)[0]
    spread = torch.ones(1, d) / math.sqrt(d)  # cos 0.25 with every axis
    none = ll.intruder_dimensions(model, k=4, epsilon=[0.3, 0.2], progress=False)
    assert (none.n_intruders == 0).all()
    with torch.no_grad():
        site.A.copy_(spread)
        site.B[0].copy_(spread * 5)  # ΔW = 5 · u uᵀ with u spread over every axis
    out = ll.intruder_dimensions(model, k=4, epsilon=[0.3, 0.2], progress=False).set_index("epsilon")
    assert out.loc[0.3, "n_intruders"] == 1 and out.loc[0.2, "n_intruders"] == 0
    assert out.loc[0.3, "min_max_cosine"] == pytest.approx(0.25, abs=0.05)
    assert 0.5 < out.loc[0.3, "intruder_energy"] < 1


# ----------------------------------------------------------------------------- aux losses


def test_aux_losses_by_hand_and_gradients_reach_the_routers():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)

        def forward(self, x, attention_mask=None):
            return self.proj(x)

    torch.manual_seed(0)
    cfg = dict(r=2, num_B=2, routing="token")
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    for field in ("balance_loss_weight", "router_z_loss_weight", "router_entropy_weight"):
        model = ll.add_lily(M(), ll.LilyConfig(["proj"], **cfg, **{field: 2.0}))
        site = ll.adapter_sites(model)[0]
        with torch.no_grad():
            site.A.copy_(torch.eye(2))
            site.router.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        logits = x[0] @ torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T
        p = torch.softmax(logits, -1)
        want = {"balance_loss_weight": 2 * 2 * ((torch.bincount(p.argmax(-1), minlength=2) / 3) * p.mean(0)).sum(),
                "router_z_loss_weight": 2 * torch.logsumexp(logits, -1).square().mean(),
                "router_entropy_weight": 2 * (-(p * p.log()).sum(-1)).mean() / math.log(2)}[field]
        model.train()
        model(x)
        loss = ll.lily_aux_loss(model)
        assert loss.item() == pytest.approx(want.item(), rel=1e-6)
        loss.backward()
        assert site.router.grad is not None and site.router.grad.abs().sum() > 0
        assert ll.lily_aux_loss(model).item() == 0  # gathered losses are reset
        model.eval()
        model(x)
        assert ll.lily_aux_loss(model).item() == 0  # nothing in eval mode
    off = ll.add_lily(M(), ll.LilyConfig(["proj"], **cfg))
    off.train()
    off(x)
    assert ll.lily_aux_loss(off).item() == 0 and all(m.aux_loss is None for m in off.modules() if isinstance(m, ll.LilyLayer))
