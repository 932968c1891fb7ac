"""The views and the diagnosis of mixture-of-experts LLMs (no adapter, only top-k routers).

A tiny random Mixtral of 4 layers (tests/_tiny_moe.py's config with more layers): healthy, it
gives no dominant or dead finding; with one layer's router made to send every token to one
expert (its weight row set along a direction every one of the batch's router inputs has a
positive component on), the diagnosis names exactly that layer — which the average over layers
hides. ``specialization``, ``top_tokens`` and ``router_metrics`` read its recording; the
dashboard, the report and ``plot_expert_load`` open it, and leave out what needs a low-rank update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

import lily_lab as ll
from lily_lab import plots, widgets

from _tiny_moe import batch, config, steer

LAYERS = 4


def mixtral(layers: int = LAYERS, *, fresh: bool = False):
    """A tiny random Mixtral; routers with N(0, 0.5) weights as tests/_tiny_moe.py's (``fresh``:
    transformers' own initialisation, std ``initializer_range``)."""
    cfg = config("mixtral")
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(cfg).eval()
    if not fresh:
        with torch.no_grad():
            for s in ll.router_sites(m):
                s.layer.weight.normal_(0, 0.5)
    return m


def record(m, ids, mask, labels=None):
    with ll.record_routing(m, max_tokens=10_000) as rec, torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
        if labels is not None:
            rec.annotate(labels=labels)
    return rec.routing


def kinds(d):
    return [f.kind for f in d.findings]


@pytest.fixture(scope="module")
def healthy():
    m = mixtral()
    ids, mask = batch(b=8, t=16)
    return m, ids, mask, record(m, ids, mask, labels=["pos", "neg"] * 4)


def test_a_healthy_mixtral_has_no_dominant_or_dead_expert(healthy):
    m, ids, mask, routing = healthy
    assert ll.adapter_sites(m) == [] and len(ll.router_sites(m)) == LAYERS
    d = ll.diagnose(m, routing)
    assert d.ok, str(d)
    assert d.checked == ["dominant_expert", "dead_expert", "input_blind_router"]
    assert any("bank checks" in n and "no low-rank adapter" in n for n in d.notes)
    assert not any("dead_expert not checked" in n for n in d.notes)  # 100 tokens: a fair share of 50 each


def test_one_collapsed_layer_is_named_and_the_others_are_not():
    m = mixtral()
    steer(m, 2, expert=2)
    ids, mask = batch()
    routing = record(m, ids, mask)
    d = ll.diagnose(m, routing)
    dom = [f for f in d.findings if f.kind == "dominant_expert"]
    assert len(dom) == 1 and dom[0].severity == "critical"
    assert dom[0].sites == ["model.layers.2.mlp.gate"]
    assert "layer 2 of 4: expert 2 takes 100% of the tokens" in dom[0].summary
    assert not any(f"layer {i}" in dom[0].summary for i in (0, 1, 3))
    assert dom[0].evidence["tokens_share"] == {"model.layers.2.mlp.gate": 1.0}
    assert dom[0].evidence["dispatch_share"] == {"model.layers.2.mlp.gate": 0.5}  # top-2: half the dispatch
    assert "output_router_logits=True" in dom[0].remedy and "router_aux_loss_coef" in dom[0].remedy
    assert "e_score_correction_bias" in dom[0].remedy and "z-loss" in dom[0].remedy
    # Averaged over the layers, expert 2 gets an unremarkable part of the tokens: the per-layer view finds it.
    load = ll.expert_load(routing)
    averaged = load.groupby("expert").tokens.sum() / load.drop_duplicates("site").n_tokens.sum()
    assert averaged.max() < 0.9
    # 18 tokens: a fair share of 9 per expert, too few to call one dead (a note says so).
    assert "dead_expert" not in kinds(d)
    assert any("dead_expert not checked at layers 0, 1, 2, 3" in n for n in d.notes)


def test_two_collapsed_layers_are_named_together():
    m = mixtral()
    steer(m, 1, expert=2)
    steer(m, 3, expert=2)  # after layer 1: its inputs are those of the steered model
    ids, mask = batch()
    d = ll.diagnose(m, record(m, ids, mask))
    (dom,) = [f for f in d.findings if f.kind == "dominant_expert"]
    assert dom.sites == ["model.layers.1.mlp.gate", "model.layers.3.mlp.gate"]
    assert dom.summary.startswith("layers 1, 3 of 4: expert 2 takes 100% of the tokens")


def test_a_dead_expert_is_named_by_layer():
    m = mixtral()
    steer(m, 0, expert=1, sign=-1.0)
    ids, mask = batch()
    routing = record(m, ids, mask)
    assert routing.record("model.layers.0.mlp.gate").dispatch_counts[1] == 0
    d = ll.diagnose(m, routing, {"dead_min_tokens": 5})
    (dead,) = [f for f in d.findings if f.kind == "dead_expert"]
    assert dead.sites == ["model.layers.0.mlp.gate"]
    assert dead.summary.startswith("layer 0 of 4: expert 1 (0 of a fair 9 tokens)")
    assert dead.evidence["dead_experts"] == {"model.layers.0.mlp.gate": [1]}
    assert "router_aux_loss_coef" in dead.remedy


def test_a_freshly_initialised_mixtral_is_input_blind():
    """transformers' own initialisation (std 0.02): the routing_mi the remedy quotes."""
    m = mixtral(2, fresh=True)
    ids, mask = batch(b=8, t=16)
    metrics = ll.router_metrics(record(m, ids, mask))
    assert metrics.routing_mi.max() < 0.006 and metrics.routing_mi.min() > 0.002
    d = ll.diagnose(m, record(m, ids, mask))
    (blind,) = [f for f in d.findings if f.kind == "input_blind_router"]
    assert blind.summary.startswith("layers 0, 1 of 2: routing barely depends on the token")
    assert "0.004" in blind.remedy and "initialised" in blind.remedy


def test_without_a_recording_nothing_is_claimed(healthy):
    d = ll.diagnose(healthy[0])
    assert d.ok and d.headline.startswith("nothing checked") and d.checked == []
    assert "checked: nothing" in str(d)


def test_a_model_with_neither_adapter_nor_router_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2))
    for call in (lambda: ll.diagnose(m), lambda: widgets.LilyDashboard(m), lambda: ll.report(m, None, "x.html")):
        with pytest.raises(ll.InputError, match="no adapter sites and no router"):
            call()


def test_metrics_specialization_and_top_tokens_read_the_recording(healthy):
    m, ids, mask, routing = healthy
    metrics = ll.router_metrics(routing)
    assert len(metrics) == LAYERS and set(metrics.kind) == {"moe"} and set(metrics.routing) == {"top-k"}
    assert set(metrics.top_k) == {2} and metrics.layer.tolist() == list(range(LAYERS))
    assert (metrics.n_tokens == int(mask.sum())).all()
    by_label = ll.specialization(routing, by="label")
    assert set(by_label.value) == {"pos", "neg"} and set(by_label.site) == set(routing.sites)
    counts = by_label.drop_duplicates(["site", "value"]).groupby("value").n_tokens.first()
    real = mask.bool()
    assert counts["pos"] == int(real[0::2].sum()) and counts["neg"] == int(real[1::2].sum())
    by_token = ll.specialization(routing, by="token")
    assert set(by_token.value) == set(ids[real].tolist())
    top = ll.top_tokens(routing, k=3, min_count=2)
    assert set(top.site) == set(routing.sites) and set(top.expert) == {0, 1, 2, 3}
    assert set(top.token_id) <= set(ids[real].tolist()) and top["rank"].max() == 2


def test_plot_expert_load_is_layers_by_experts_with_the_aux_loss(healthy):
    routing = healthy[-1]
    load = ll.expert_load(routing)
    fig = plots.plot_expert_load(load, highlight=["model.layers.2.mlp.gate"])
    heat, bars = fig.data
    assert heat.type == "heatmap" and bars.type == "bar"
    np.testing.assert_allclose(np.asarray(heat.z).sum(axis=1), 1.0)
    assert list(heat.y) == routing.sites and list(fig.layout.yaxis.ticktext) == [
        f"mlp.gate · layer {i}" for i in range(LAYERS)]
    metrics = ll.router_metrics(routing)
    np.testing.assert_allclose(bars.x, metrics.aux_loss, rtol=1e-9)  # the frame's own aux loss, recomputed
    assert list(bars.text) == [f"{int(a)}–{int(b)}" for a, b in zip(metrics.tokens_min, metrics.tokens_max)]
    assert fig.layout.xaxis.title.text == "expert" and fig.layout.yaxis.title.text == "layer (router)"
    assert fig.layout.xaxis2.title.text == "aux loss" and "(dashed: balanced)" in fig.layout.title.text
    assert "4 routers × 4 experts, top-2" in fig.layout.title.text
    outlined = [s for s in fig.layout.shapes if s.type == "rect"]
    assert len(outlined) == 1 and (outlined[0].y0, outlined[0].y1) == (1.5, 2.5)
    empty = plots.plot_expert_load(load.iloc[:0])
    assert "no top-k router" in empty.layout.annotations[0].text


def test_the_dashboard_opens_a_moe_model(healthy):
    m, ids, mask, routing = healthy
    for cls in (widgets.LilyDashboard, widgets.RoutingDashboard):
        d = cls(m, routing)
        assert isinstance(d, widgets.RoutingDashboard) and not d.low_rank
        assert [d.get_title(i) for i in range(len(d.children))] == ["Routers", "Diagnosis"]
    assert "No low-rank update in this model" in d.children[0].children[0].value
    views = [v for _, v in d.router.view.options]
    assert views == ["usage", "tokens", "labels", "sentence", "dispatch"] and d.router.view.value == "dispatch"
    for view in views:
        d.router.view.value = view
        assert d.router.pane.message.value == "", (view, d.router.pane.message.value)
        assert d.router.pane.figure.layout.title.text
    d.router.view.value = "usage"
    assert "top-2 of 4 experts" in d.router.summary.value and "aux loss" in d.router.summary.value
    assert d.collapse.diagnosis.ok
    assert d.collapse.heat.figure.layout.title.text.startswith("Tokens sent to each expert")
    assert "no low-rank update" in widgets.SpectrumExplorer(m).children[0].value


def test_the_diagnosis_tab_outlines_the_collapsed_layer():
    m = mixtral()
    steer(m, 2, expert=2)
    ids, mask = batch()
    c = widgets.CollapseDashboard(m, record(m, ids, mask))
    (i,) = [i for i, f in enumerate(c.diagnosis.findings) if f.kind == "dominant_expert"]
    c.finding.value = i
    fig = c.heat.figure
    assert fig.layout.title.text.startswith("Tokens sent to each expert")
    (rect,) = [s for s in fig.layout.shapes if s.type == "rect"]
    assert (rect.y0, rect.y1) == (1.5, 2.5)
    assert "layer 2 of 4" in c.cards[i].children[0].value


def test_the_report_of_a_moe_model(healthy, tmp_path):
    m, ids, mask, routing = healthy
    text = ll.report(m, routing, tmp_path / "moe.html").read_text()
    assert "No low-rank update in this model" in text and "Tokens sent to each expert" in text
    assert "4 top-k router(s), top-2 of 4 experts (mlp.gate)" in text
    for left_out in ("Spectra of ΔW", 'id="experts"', 'id="adapter"', "each expert across the group"):
        assert left_out not in text
    assert "aux loss" in text and "fewest tokens" in text and "Routing by label" in text
    assert "No collapse found" in text
    bare = ll.report(m, None, tmp_path / "bare.html").read_text()
    assert "Router sections left out" in bare and "nothing checked" in bare
    steer(m2 := mixtral(), 2, expert=2)
    collapsed = ll.report(m2, record(m2, *batch()), tmp_path / "collapsed.html").read_text()
    assert "layer 2 of 4: expert 2 takes 100% of the tokens" in collapsed
