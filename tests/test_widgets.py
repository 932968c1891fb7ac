"""Widgets built from small recordings, driven programmatically (the browser test drives them in
JupyterLab)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lily_lab as ll

transformers = pytest.importorskip("transformers")
widgets = pytest.importorskip("lily_lab.widgets")

XSS_LABEL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)).eval()
    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="token", init_weights=False))
    g = torch.Generator().manual_seed(0)
    with ll.record_routing(model) as rec:
        for _ in range(3):
            ids = torch.randint(0, 100, (4, 8), generator=g)
            model(input_ids=ids, attention_mask=torch.ones(4, 8, dtype=torch.long))
            rec.annotate(labels=["pos", XSS_LABEL, "pos", "neg"])
    return model, rec.routing


def trace_data(fig):
    return [(t.type, tuple(np.ravel(t.y)) if t.y is not None else None, tuple(np.ravel(t.x)) if t.x is not None else None,
             str(t.z) if getattr(t, "z", None) is not None else None) for t in fig.data]


def test_router_explorer_controls_change_the_right_traces(setup):
    model, routing = setup
    w = widgets.RouterExplorer(routing)
    assert w.module.options == ("query", "value") and w.layer.options == (0, 1, 2)
    fig = w.pane.figure
    first = trace_data(fig)
    usage = routing.usage()
    site0 = w.site
    want = usage[usage.site == site0].sort_values("expert").usage.to_numpy()
    assert np.allclose(sorted(np.ravel(fig.data[0].y if fig.data[0].orientation != "h" else fig.data[0].x)), sorted(want))
    w.layer.value = 2
    assert w.site.endswith("layer.2.attention.self.query") and trace_data(fig) != first
    for view in ("tokens", "labels", "modes", "profile", "usage"):
        w.view.value = view
        assert len(fig.data) > 0 and w.pane.message.value == "", view
    w.label.value = "neg"
    assert trace_data(fig) != first
    assert XSS_LABEL not in w.summary.value


def test_router_explorer_on_an_empty_recording_shows_a_message(setup):
    model, _ = setup
    with ll.record_routing(model) as rec:
        pass
    w = widgets.RouterExplorer(rec.routing)
    assert "no routed tokens" in w.children[0].value


def test_live_routing_of_a_typed_sentence(setup):
    model, routing = setup

    class Tok:
        def __call__(self, texts, return_tensors="pt"):
            ids = torch.tensor([[hash(w) % 100 for w in texts[0].split()]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def convert_ids_to_tokens(self, ids):
            return [f"<b>{i}</b>" for i in ids]

    w = widgets.RouterExplorer(routing, model, Tok())
    w.text.value = "a lovely day"
    w.route_text()
    assert len(w.live.figure.data) > 0 and w.live.message.value == ""


def test_expert_map_and_spectrum_explorer(setup, monkeypatch):
    from lily_lab import plots

    model, routing = setup
    em = widgets.ExpertMap(model, routing)
    before, profile = trace_data(em.matrix.figure), trace_data(em.layers.figure)
    drawn = []
    real_profile = plots.plot_expert_profile
    monkeypatch.setattr(plots, "plot_expert_profile", lambda *a, **k: drawn.append(1) or real_profile(*a, **k))
    em.measure.value = "functional_cosine"
    assert trace_data(em.matrix.figure) != before
    assert not drawn  # the layer profile does not depend on the measure: not rebuilt
    em.group.value = em.group.options[1]
    assert drawn and trace_data(em.layers.figure) != profile  # another bank: its own profile
    sx = widgets.SpectrumExplorer(model, routing)
    assert {"uniform", "routed mean", "expert 0", "label=pos"} <= set(sx.mixture.options)
    n_all = len(sx.pane.figure.data)
    sx.site.value = sx.site.options[1][1]
    assert len(sx.pane.figure.data) < n_all
    y_log = sx.pane.figure.layout.yaxis.type
    sx.log_scale.value = not sx.log_scale.value
    assert sx.pane.figure.layout.yaxis.type != y_log
    before = trace_data(sx.pane.figure)
    sx.mixture.value = "expert 1"
    assert trace_data(sx.pane.figure) != before


def test_collapse_dashboard_links_findings_to_sites(setup):
    model, routing = setup
    site = ll.adapter_sites(model)[0]
    with torch.no_grad():
        saved = site.B.clone()
        site.B.copy_(site.B[0].expand_as(site.B))  # identical experts → redundant_experts
    try:
        w = widgets.CollapseDashboard(model, routing)
    finally:
        with torch.no_grad():
            site.B.copy_(saved)
    kinds = [f.kind for f in w.diagnosis.findings]
    assert "redundant_experts" in kinds
    w.finding.value = kinds.index("redundant_experts")
    assert "redundant_experts" in w.detail.value and w.selected_sites == [site.group]


def test_timeline_player_and_budget_calculator(setup):
    model, routing = setup
    tl = ll.Timeline(probe={"input_ids": torch.randint(0, 100, (2, 6))})
    for step in (0, 5, 10):
        tl.observe(model, step)
    w = widgets.TimelinePlayer(tl)
    heat = trace_data(w.heat.figure)
    with torch.no_grad():
        ll.adapter_sites(model)[0].router.mul_(1.0)  # the cached frames do not depend on the model
    w.step.value = 0
    assert w.step.value == 0 and len(w.heat.figure.data) == len(heat)
    assert w.curves.figure.layout.shapes[0].x0 == 0  # the step marker moved…
    assert "step 0" in w.heat.figure.layout.title.text  # …and the heatmap shows that step
    w.metric.value = "load_entropy"
    assert "load entropy" in w.curves.figure.layout.yaxis.title.text
    empty = widgets.TimelinePlayer(ll.Timeline())
    assert "no observations" in empty.children[0].value

    b = widgets.BudgetCalculator(d_in=64, d_out=64, layers=4, r=8, stride_A=2, num_B=4)
    lily = ll.core.lily_parameter_formula(4, 64, 64, 8, 2, 4)
    assert f"{lily:,}" in b.counts.value and f"rank {lily // (4 * 128)}" in b.counts.value
    b.num_B.value = 2
    assert f"{ll.core.lily_parameter_formula(4, 64, 64, 8, 2, 2):,}" in b.counts.value


def test_lily_dashboard_composes_tabs(setup):
    model, routing = setup
    d = widgets.LilyDashboard(model, routing)
    titles = [d.get_title(i) for i in range(len(d.children))]
    assert titles == ["Routers", "Experts", "Spectra", "Diagnosis", "Budget"]
