"""Widgets built from small recordings, driven programmatically (the browser test drives them in
JupyterLab)."""

from __future__ import annotations

import re

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
    em.group.value = em.group.options[1][1]
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
    i = kinds.index("redundant_experts")
    card, show = w.cards[i].children
    assert card.value == ll.plots.finding_html(w.diagnosis.findings[i])  # the report's card, one definition
    assert "Experts that are near copies of each other" in card.value and "(1 bank)" in card.value
    html_widgets = [c for c in w.children if hasattr(c, "value") and isinstance(c.value, str)]
    assert sum(c.value.count("<style>") for c in html_widgets + [c.children[0] for c in w.cards]) == 1
    assert ll.plots.FINDING_CSS in w.children[0].value
    show.click()  # the card's button selects its finding
    assert w.finding.value == i
    assert "redundant_experts" in w.detail.value and w.selected_sites == [site.group]
    assert "cosine of each pair of its B experts" in w.caption.value  # a bank finding: its bank's similarity


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


# ----------------------------------------------------------------------------- what reaches the browser
class FrontEnd:
    """The figure as plotly.js holds it: starts from the kernel's state and applies only the
    messages the FigureWidget sends (dotted property paths; ``None`` deletes). A widget whose
    updates do not reach the front end (e.g. one built with ``_validate=False``, which dropped
    every layout change after the first draw) leaves this mirror behind the kernel's figure."""

    def __init__(self, pane):
        fig = self.fig = pane.figure
        self.source = None  # the figure the plot function built, that the pane was asked to show
        show = pane.show

        def spy(figure, **kw):
            self.source = figure
            return show(figure, **kw)

        pane.show = spy
        self.layout = _plain(fig.layout._props)
        self.data = [_plain(t._props) for t in fig.data]
        names = [n for n in fig.trait_names() if n.startswith("_py2js_")]
        fig.observe(self._apply, names=names)

    @staticmethod
    def _set(tree, path, value):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]  # "shapes.0.y0": item 0 of an array
        for k in keys[:-1]:
            tree = tree[k] if isinstance(k, int) else tree.setdefault(k, {})
        if value is None:
            tree.pop(keys[-1], None)
        else:
            tree[keys[-1]] = _plain(value)

    def _apply(self, change):
        msg, name = change["new"], change["name"]
        if msg is None:
            return
        if name == "_py2js_addTraces":
            self.data += [_plain(t) for t in msg["trace_data"]]
        elif name == "_py2js_deleteTraces":
            self.data = [t for i, t in enumerate(self.data) if i not in set(msg["delete_inds"])]
        elif name in ("_py2js_update", "_py2js_relayout", "_py2js_restyle"):
            layout = msg.get("layout_data", msg.get("relayout_data", {}))
            style = msg.get("style_data", msg.get("restyle_data", {}))
            traces = msg.get("style_traces", msg.get("restyle_traces")) or range(len(self.data))
            for path, value in layout.items():
                self._set(self.layout, path, value)
            for path, values in style.items():
                for i, t in enumerate(traces):
                    self._set(self.data[t], path, values[i % len(values)] if isinstance(values, list) else values)
        elif name in ("_py2js_removeLayoutProps", "_py2js_removeTraceProps"):
            raise AssertionError(f"unexpected {name}: {msg}")

    def check(self, what=""):
        want_layout = {k: v for k, v in _plain(self.fig.layout._props).items() if k != "template"}
        got_layout = {k: v for k, v in _plain(self.layout).items() if k != "template"}
        assert got_layout == want_layout, f"{what}: the front end's layout differs from the kernel's"
        assert _plain(self.data) == [_plain(t._props) for t in self.fig.data], f"{what}: traces differ"
        if self.source is not None:  # and the kernel's figure is the one the plot function built
            own = {"template", "height", "width", "autosize"}
            # [] = no shapes; autorange=True and type "-" are plotly's defaults, which the pane states
            # for every axis the figure does not range or type (plotly.js would keep the previous ones)
            shown = {k: ({a: b for a, b in v.items() if (a, b) not in (("autorange", True), ("type", "-"))} or None)
                     if re.fullmatch(r"[xy]axis\d*", k) and isinstance(v, dict) else v
                     for k, v in want_layout.items() if k not in own and v != []}
            shown = {k: v for k, v in shown.items() if v is not None}
            built = {k: v for k, v in _plain(self.source.layout._props).items() if k not in own and v != []}
            assert shown == built, f"{what}: the widget's layout is not the plot function's"
            strip = lambda t: {k: v for k, v in _plain(t._props).items() if k != "uid"}  # noqa: E731
            assert [strip(t) for t in self.fig.data] == [strip(t) for t in self.source.data], f"{what}: traces"


def _plain(value):
    """JSON-comparable: numpy arrays and tuples as lists, NaN as a string."""
    if isinstance(value, dict):  # an unset property and an emptied object ({}) mean the same
        plain = {k: _plain(v) for k, v in value.items() if v is not None}
        return {k: v for k, v in plain.items() if v != {}}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return "NaN"
    return value.item() if isinstance(value, np.generic) else value


def _cycle(control, front, what):
    """Every value of ``control`` in turn, checking the front end after each change."""
    values = [v for _, v in control.options] if isinstance(control.options[0], tuple) else list(control.options)
    for v in values + values[:1]:
        control.value = v
        front.check(f"{what}={v!r}")


def test_every_layout_change_reaches_the_front_end(setup):
    model, routing = setup
    w = widgets.RouterExplorer(routing)
    front = FrontEnd(w.pane)
    _cycle(w.view, front, "view")
    for view in ("usage", "tokens", "labels"):
        w.view.value = view
        _cycle(w.layer, front, f"{view} layer")
        _cycle(w.label, front, f"{view} label")
    assert w.pane.figure.layout.xaxis.type == "category" or w.view.value != "labels"
    w.view.value = "labels"
    assert front.layout["xaxis"]["type"] == "category" and "label" in front.layout["title"]["text"].lower()

    sx = widgets.SpectrumExplorer(model, routing)
    front = FrontEnd(sx.pane)
    for log in (False, True, False):
        sx.log_scale.value = log
        front.check(f"log={log}")
        assert front.layout["yaxis"].get("type", "linear") == ("log" if log else "linear")
    _cycle(sx.site, front, "spectra site")
    _cycle(sx.mixture, front, "spectra mixture")

    em = widgets.ExpertMap(model, routing)
    fronts = FrontEnd(em.matrix), FrontEnd(em.layers)
    for measure in ("functional_cosine", "subspace_overlap", "cosine"):
        em.measure.value = measure
        fronts[0].check(measure)
    em.group.value = em.group.options[1][1]
    for f in fronts:
        f.check("bank")

    b = widgets.BudgetCalculator(d_in=64, d_out=64, layers=4, r=8, stride_A=2, num_B=4)
    fronts = FrontEnd(b.diagram), FrontEnd(b.budget)
    for r in (2, 16, 8):
        b.r.value = r
        for f in fronts:
            f.check(f"r={r}")


def test_controls_show_text_apply_or_are_disabled(setup):
    model, routing = setup
    w = widgets.RouterExplorer(routing)
    assert w.label.label == "all labels" and w.label.value is widgets._common.ALL  # not a blank box
    assert all(isinstance(t, str) and t for t in w.view.tooltips) and len(w.view.tooltips) == len(w.view.options)
    assert w.view.style.button_width == "auto"  # labels are never cut to a fixed button width
    w.view.value = "profile"
    assert w.layer.disabled and w.label.disabled and not w.module.disabled
    w.view.value = "modes"
    assert w.label.disabled and not w.layer.disabled
    w.view.value = "usage"
    assert not w.label.disabled
    # The summary follows the label filter: the "neg" tokens' own count, not the whole site's.
    everything = w.summary.value
    w.label.value = "neg"
    spec = ll.specialization(routing, by="label")
    n_neg = int(spec[(spec.site == w.site) & (spec.value == "neg")].n_tokens.iloc[0])
    assert f"{n_neg:,} tokens" in w.summary.value and w.summary.value != everything
    assert "query · layer 0" in w.summary.value  # one naming scheme: module · layer
    sx = widgets.SpectrumExplorer(model, routing)
    assert sx.site.label == "all sites" and sx.site.options[1][0] == "query · layer 0"
    assert sx.compare.disabled  # no baseline given: nothing to compare against
    em = widgets.ExpertMap(model, routing)
    assert em.group.label == "query bank (32×32)"


def test_sentence_view_steps_through_recorded_sequences(setup):
    model, routing = setup
    w = widgets.RouterExplorer(routing, predictions=["neg"] * 12)
    w.view.value = "sentence"
    assert not w.sequence.disabled and w.module.disabled and w.layer.disabled
    fig = w.pane.figure
    sites = len(routing.sites)
    assert len(fig.data) > 0 and w.pane.message.value == ""
    assert "predicted neg" in w.sequence.label and "label pos" in w.sequence.label
    first = w.sequence.value
    w.next.click()
    assert w.sequence.value != first
    assert f"across {sites} routed sites" in w.summary.value
    w.label.value = "neg"  # only the neg sequences to step through
    assert all("label neg" in text for text, _ in w.sequence.options)
