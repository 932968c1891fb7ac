"""lily_lab.plots: every view's traces, axis titles and data against the frame it was given;
missing columns named; text from the data escaped; the sharing layout and parameter budget
against the model they describe (``count_parameters``, ``lily_parameter_formula``, PEFT)."""

from __future__ import annotations

import math
import typing
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import lily_lab as ll
from lily_lab import plots
from lily_lab.analysis import mixture_modes
from lily_lab.analysis.diagnose import Diagnosis, Finding
from lily_lab.core import lily_parameter_formula

from _figures import strings

EVIL_LABEL = "<script>alert(1)</script>"
EVIL_TOKEN = "<img src=x onerror=alert(1)>"
LABELS = ["pos", "neg", "pos", EVIL_LABEL]
CONFIG = dict(target_modules=["query", "value"], r=4, num_B=3, stride_A=2, init_weights=False)


class Tokenizer:
    """Every id divisible by 7 is a hostile token."""

    def convert_ids_to_tokens(self, ids):
        return [EVIL_TOKEN if i % 7 == 0 else f"tok{i}" for i in ids]


@pytest.fixture(scope="module")
def lab(tiny_bert):
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(**CONFIG, routing="token"))
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 2] = 7  # every sequence holds the hostile token
    with torch.no_grad(), ll.record_routing(model) as rec:
        for _ in range(3):
            model(input_ids=ids)
            rec.annotate(labels=LABELS, input_ids=ids)
    routing = rec.routing
    timeline = ll.Timeline(probe={"input_ids": ids})
    with torch.no_grad():
        for step in range(3):
            timeline.observe(model, step)
            for s in ll.adapter_sites(model):
                s.router.mul_(1.5)  # sharper routers, so metrics move between steps
    spectra = ll.delta_spectra(model)
    f = dict(usage=routing.usage(), tokens=routing.token_table(Tokenizer()), spec=ll.specialization(routing),
             profile=ll.expert_layer_profile(routing), top=ll.top_tokens(routing, k=5, tokenizer=Tokenizer()),
             timeline=ll.timeline_metrics(timeline), spectra=spectra, ranks=ll.rank_summary(spectra),
             similarity=ll.expert_similarity(model), findings=_findings(), layout=ll.sharing_layout(model),
             budget=ll.parameter_budget(32, 32, 4, range(1, 9), 2, 3), modes=mixture_modes(routing),
             load=_moe_load())
    return SimpleNamespace(model=model, routing=routing, site=routing.sites[0], f=f, E=3, n_sites=8)


def _moe_load() -> pd.DataFrame:
    """``expert_load`` of a tiny random Mixtral (2 layers, top-2 of 4 experts): the dispatch view's frame."""
    import _tiny_moe

    m = _tiny_moe.model("mixtral")
    ids, mask = _tiny_moe.batch()
    with torch.no_grad(), ll.record_routing(m) as rec:
        m(input_ids=ids, attention_mask=mask)
    return ll.expert_load(rec.routing)


def _findings() -> pd.DataFrame:
    """A diagnosis with one finding of each severity, the critical one listed second."""
    return Diagnosis(findings=[
        Finding("dead_expert", "warning", ["a", "b"], {"usage": 0.01}, "add a balance loss", "2 sites " + EVIL_LABEL),
        Finding("redundant_experts", "critical", ["query:32x32"], {}, "use token routing", "1 bank"),
    ]).to_frame()


def assert_escaped(fig: go.Figure, raw: str) -> None:
    """``raw`` is in the figure, escaped, and no raw tag from the data is."""
    texts = list(strings(fig.to_plotly_json()))
    assert not [t for t in texts if "<script" in t or "<img" in t]
    assert any(raw.replace("<", "&lt;").replace(">", "&gt;") in t for t in texts), f"{raw!r} is not in the figure"


# name, args from the lab, kwargs, expected trace count, trace type, x title, y title (None: not checked)
CASES = [
    ("plot_usage_heatmap", lambda L: (L.f["usage"],), {}, 1, go.Heatmap, "expert", "site (module · layer)"),
    ("plot_usage_bars", lambda L: (L.f["usage"], L.site), {}, 1, go.Bar, "expert", "usage (mean router probability)"),
    # the dispatch of a mixture-of-experts model: the share heatmap and the aux-loss bars beside it
    ("plot_expert_load", lambda L: (L.f["load"],), {}, 2, (go.Heatmap, go.Bar), "expert", "layer (router)"),
    ("plot_token_probs", lambda L: (L.f["tokens"], L.site), {}, 3, go.Box, "expert", "router probability p(expert | token)"),
    ("plot_token_probs", lambda L: (L.f["tokens"], L.site), {"kind": "violin"}, 3, go.Violin, "expert", None),
    ("plot_label_usage", lambda L: (L.f["spec"],), {}, 3, go.Bar, "label", "usage (mean router probability)"),
    ("plot_expert_profile", lambda L: (L.f["profile"],), {}, 3, go.Scatter, "layer", "usage (mean router probability)"),
    ("plot_top_tokens", lambda L: (L.f["top"], L.site), {}, 3, go.Bar, "mean probability", None),
    ("plot_token_text", lambda L: (L.f["tokens"], L.site, 3), {}, 3, go.Bar, None, None),
    # 3 heatmaps (one per expert) and 3 legend entries; x: the tokens, y: the sites (tick labels, no titles)
    ("plot_token_routes", lambda L: (L.f["tokens"], 3), {}, 6, (go.Heatmap, go.Scatter), None, None),
    ("plot_metric_timeline", lambda L: (L.f["timeline"],), {}, 8, go.Scatter, "training step",
     "routing MI (0: router ignores its input)"),
    ("plot_mixture_modes", lambda L: (L.f["modes"], L.site), {}, 3, go.Box, "expert", "mixture weight π_e"),
    ("plot_spectra", lambda L: (L.f["spectra"],), {}, 8, go.Scatter, "k (1 = largest singular value)", "σ_k of ΔW"),
    # 8 site lines in 2 bank panels, and a legend line per layer (4)
    ("plot_spectra", lambda L: (L.f["spectra"],), {"facet": "group"}, 12, go.Scatter, "k (1 = largest σ)", "σ_k"),
    ("plot_rank_by_layer", lambda L: (L.f["ranks"],), {}, 3, go.Scatter, "layer", "effective rank exp H(σ/Σσ)"),
    ("plot_expert_similarity", lambda L: (L.f["similarity"],), {}, 1, go.Heatmap, "expert", "expert"),
    ("plot_diagnosis", lambda L: (L.f["findings"],), {}, 2, go.Bar, "sites or banks affected", "finding"),
    ("plot_sharing_diagram", lambda L: (L.f["layout"],), {}, 10, go.Scatter, None, None),
    ("plot_parameter_budget", lambda L: (L.f["budget"],), {}, 4, go.Scatter, "r (Lily's rank)", "trainable parameters"),
]


@pytest.mark.parametrize("name, args, kwargs, n, kind, xtitle, ytitle", CASES, ids=[f"{c[0]}{c[2] or ''}" for c in CASES])
def test_every_view_returns_a_themed_figure_without_displaying(lab, monkeypatch, name, args, kwargs, n, kind, xtitle, ytitle):
    shown = []
    monkeypatch.setattr(go.Figure, "show", lambda *a, **k: shown.append(a))
    monkeypatch.setattr(pio, "show", lambda *a, **k: shown.append(a))
    fn = getattr(plots, name)
    assert typing.get_type_hints(fn)["return"] is go.Figure
    fig = fn(*args(lab), **kwargs)
    assert isinstance(fig, go.Figure) and not shown
    assert len(fig.data) == n and all(isinstance(t, kind) for t in fig.data)
    assert fig.layout.template.layout.colorway == tuple(plots.EXPERT_COLORS[:10])
    assert fig.layout.title.text
    if xtitle is not None:
        assert fig.layout.xaxis.title.text == xtitle
    if ytitle is not None:
        assert fig.layout.yaxis.title.text == ytitle


def test_the_exports_and_the_template():
    names = {c[0] for c in CASES}
    assert names <= set(plots.__all__)
    assert "lily_lab" in pio.templates and pio.templates.default != "lily_lab"  # registered, never imposed
    assert plots.expert_color(1) == plots.EXPERT_COLORS[1] != plots.expert_color(0)
    assert plots.escape("<b>&") == "&lt;b&gt;&amp;"


# name, frame key, required columns, extra args
MISSING = [
    ("plot_usage_heatmap", "usage", ["site", "module", "index", "expert", "usage"], lambda L: ()),
    ("plot_usage_bars", "usage", ["site", "expert", "usage"], lambda L: (L.site,)),
    ("plot_expert_load", "load", ["site", "expert", "tokens", "share"], lambda L: ()),
    ("plot_token_probs", "tokens", ["site", "p0"], lambda L: (L.site,)),
    ("plot_label_usage", "spec", ["site", "value", "expert", "usage"], lambda L: ()),
    ("plot_expert_profile", "profile", ["group", "expert", "site", "index", "usage"], lambda L: ()),
    ("plot_top_tokens", "top", ["site", "expert", "rank", "usage"], lambda L: (L.site,)),
    ("plot_token_text", "tokens", ["site", "sequence", "position", "top_expert", "p0"], lambda L: (L.site, 0)),
    ("plot_token_routes", "tokens", ["site", "sequence", "position", "top_expert", "p0"], lambda L: (0,)),
    ("plot_metric_timeline", "timeline", ["step", "site", "metric", "value"], lambda L: ()),
    ("plot_mixture_modes", "modes", ["site", "mode", "expert", "weight"], lambda L: (L.site,)),
    ("plot_spectra", "spectra", ["site", "k", "sigma"], lambda L: ()),
    ("plot_rank_by_layer", "ranks", ["site", "module", "index", "effective_rank"], lambda L: ()),
    ("plot_expert_similarity", "similarity", ["group", "expert_i", "expert_j", "cosine"], lambda L: ()),
    ("plot_diagnosis", "findings", ["kind", "severity", "summary"], lambda L: ()),
    ("plot_sharing_diagram", "layout", ["group", "site", "index", "a_index", "num_B"], lambda L: ()),
    ("plot_parameter_budget", "budget", ["r", "lily_params", "lora_params_same_r", "lora_equivalent_rank"], lambda L: ()),
]


@pytest.mark.parametrize("name, key, required, extra", MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_column_is_named(lab, name, key, required, extra):
    fn = getattr(plots, name)
    for col in required:
        drop = [c for c in lab.f[key].columns if c == col or (col == "p0" and c[:1] == "p" and c[1:].isdigit())]
        with pytest.raises(ValueError) as err:
            fn(lab.f[key].drop(columns=drop), *extra(lab))
        assert name in str(err.value) and f"'{col}'" in str(err.value), str(err.value)
    with pytest.raises(TypeError, match=name):
        fn(lab.f[key].to_dict("records"), *extra(lab))


def test_usage_heatmap_is_sites_by_experts_ordered_by_module_then_index(lab):
    usage = lab.f["usage"]
    fig = plots.plot_usage_heatmap(usage.sample(frac=1, random_state=0), highlight=["value:32x32"])
    hm = fig.data[0]
    z = np.asarray(hm.z)
    assert z.shape == (lab.n_sites, lab.E)
    want = usage.sort_values(["module", "index"])["site"].drop_duplicates().tolist()
    assert list(hm.y) == want
    assert list(fig.layout.yaxis.ticktext) == [f"{m} · layer {i}" for m in ("query", "value") for i in range(4)]
    for i, site in enumerate(want):
        for e in range(lab.E):
            assert z[i, e] == usage[(usage.site == site) & (usage.expert == e)].usage.item()
            assert f"site: {site}" in hm.hovertext[i][e] and f"layer {i % 4}" in hm.hovertext[i][e]
            assert f"expert {e}" in hm.hovertext[i][e]
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    assert sorted(s.y0 + 0.5 for s in rects) == [4, 5, 6, 7]  # the value group's rows, outlined
    assert [s.y0 for s in fig.layout.shapes if s.type == "line"] == [3.5]  # the rule between modules


def test_usage_bars_show_one_site(lab):
    usage, site = lab.f["usage"], lab.routing.sites[3]
    fig = plots.plot_usage_bars(usage, site)
    assert list(fig.data[0].y) == usage[usage.site == site].sort_values("expert").usage.tolist()
    assert list(fig.data[0].marker.color) == [plots.expert_color(e) for e in range(3)]
    assert "value · layer 1" in fig.layout.title.text and site in fig.data[0].hovertext[0]
    assert fig.layout.shapes[0].y0 == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="encoder.layer.0.attention.self.query"):
        plots.plot_usage_bars(usage, "nope")


def test_token_probs_are_each_experts_column(lab):
    tokens = lab.f["tokens"]
    part = tokens[tokens.site == lab.site]
    for kind in ("box", "violin"):
        fig = plots.plot_token_probs(tokens, lab.site, kind=kind)
        for e, trace in enumerate(fig.data):
            assert trace.name == f"expert {e}" and list(trace.y) == part[f"p{e}"].tolist()
        assert_escaped(fig, EVIL_TOKEN)
    with pytest.raises(ValueError, match="kind"):
        plots.plot_token_probs(tokens, lab.site, kind="pie")


def test_label_usage_groups_labels_by_expert(lab):
    spec = lab.f["spec"]
    site = lab.routing.sites[5]
    fig = plots.plot_label_usage(spec, site)
    assert list(fig.data[0].x) == ["pos", "neg", "&lt;script&gt;alert(1)&lt;/script&gt;"]
    for e, trace in enumerate(fig.data):
        part = spec[(spec.site == site) & (spec.expert == e)].set_index("value")
        assert list(trace.y) == [part.usage[v] for v in ["pos", "neg", EVIL_LABEL]]
    assert fig.layout.barmode == "group" and fig.layout.xaxis.type == "category"
    assert "value · layer 2" in fig.layout.title.text
    assert plots.plot_label_usage(spec).layout.title.text.startswith("Expert usage by label at query · layer 0")
    assert_escaped(fig, EVIL_LABEL)


def test_expert_profile_follows_each_expert_across_layers(lab):
    profile = lab.f["profile"]
    fig = plots.plot_expert_profile(profile, "value:32x32")
    for e, trace in enumerate(fig.data):
        part = profile[(profile.group == "value:32x32") & (profile.expert == e)].sort_values("index")
        assert list(trace.x) == [0, 1, 2, 3] and list(trace.y) == part.usage.tolist()
        assert f"layer entropy {part.layer_entropy.iloc[0]:.2f}" in trace.name
        assert "value · layer 0" in trace.hovertext[0] and f"expert {e}" in trace.hovertext[0]
    share = plots.plot_expert_profile(profile, value="share")
    assert share.data[0].y[0] == profile[profile.group == "query:32x32"].share.iloc[0]


def test_top_tokens_one_panel_per_expert(lab):
    top = lab.f["top"]
    fig = plots.plot_top_tokens(top, lab.site, k=3)
    for e, trace in enumerate(fig.data):
        part = top[(top.site == lab.site) & (top.expert == e)].sort_values("rank").head(3)
        assert list(trace.x) == part.usage.tolist() and trace.orientation == "h"
    ticks = [t for ax in ("yaxis", "yaxis2", "yaxis3") for t in fig.layout[ax].ticktext]
    assert "tok" in ticks[0] and len(ticks) == 9
    assert [a.text for a in fig.layout.annotations] == ["expert 0", "expert 1", "expert 2"]
    assert_escaped(plots.plot_top_tokens(top, lab.site), EVIL_TOKEN)


def test_token_text_tints_each_token_by_its_top_expert(lab):
    tokens = lab.f["tokens"]
    seq = tokens[(tokens.site == lab.site) & (tokens.sequence == 3)].sort_values("position")
    fig = plots.plot_token_text(tokens, lab.site, 3, width=20)
    placed = []  # (line, start, text, expert)
    for e, trace in enumerate(fig.data):
        assert trace.name == f"expert {e}" and trace.marker.color == plots.expert_color(e)
        placed += [(y, b, t, e) for y, b, t in zip(trace.y, trace.base, trace.text)]
        assert all("expert 0:" in h and "expert 2:" in h for h in trace.hovertext)
    placed.sort()
    want = [t.replace("<", "&lt;").replace(">", "&gt;") for t in seq.token]
    assert [p[2] for p in placed] == want  # every token once, in reading order
    assert [p[3] for p in placed] == seq.top_expert.tolist()
    assert max(p[0] for p in placed) >= 1  # width=20 wrapped the line
    assert "label &lt;script&gt;" in fig.layout.title.text
    assert_escaped(fig, EVIL_TOKEN)


def test_token_text_is_readable_for_a_short_typed_sentence(lab):
    tokens = lab.f["tokens"]
    one = tokens[(tokens.site == lab.site) & (tokens.sequence == 0) & (tokens.position < 3)]
    fig = plots.plot_token_text(one, lab.site, 0)
    assert max(t for trace in fig.data for t in trace.y) == 0  # one line of text
    plot_px = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    assert fig.layout.height >= 230 and plot_px >= 40  # a readable row, not a strip
    assert list(fig.layout.yaxis.range) == [0.5, -0.5]  # the line fills the plot, top to bottom
    title = fig.layout.title.text
    assert "top expert" in title and "query · layer 0" in title and "sequence 0" in title and "label pos" in title


# ------------------------------------------------------------------ plot_token_routes
HOSTILE = "<b>x</b>"


def route_table() -> pd.DataFrame:
    """A hand-built token table: sequence 5 (label "<i>pos</i>") of 4 tokens at 4 sites of two banks
    (query: E = 3, value: E = 2, so p2 is NaN there), frame rows shuffled; position 2 was not
    sampled at query · layer 1; sequence 6 is another sequence."""
    sites = [  # name, module, group, index, E
        ("enc.layer.1.attn.value", "value", "value:8x8", 1, 2), ("enc.layer.0.attn.query", "query", "query:8x8", 0, 3),
        ("enc.layer.0.attn.value", "value", "value:8x8", 0, 2), ("enc.layer.1.attn.query", "query", "query:8x8", 1, 3)]
    words = ["the", HOSTILE, "cat", "sat"]
    rng = np.random.default_rng(3)
    rows = []
    for seq in (5, 6):
        for name, module, group, index, E in sites:
            for pos, word in enumerate(words):
                if seq == 5 and name == "enc.layer.1.attn.query" and pos == 2:
                    continue
                p = rng.dirichlet(np.ones(E))
                row = dict(site=name, module=module, group=group, index=index, call=0, sequence=seq, position=pos,
                           token_id=10 + pos, label="<i>pos</i>" if seq == 5 else "neg", token=word,
                           p0=p[0], p1=p[1], p2=p[2] if E == 3 else np.nan, top_expert=int(p.argmax()))
                rows.append(row)
    return pd.DataFrame(rows).sample(frac=1, random_state=0).reset_index(drop=True)


SITE_ORDER = ["enc.layer.0.attn.query", "enc.layer.1.attn.query", "enc.layer.0.attn.value", "enc.layer.1.attn.value"]


def route_cells(trace: go.Heatmap) -> tuple[int, np.ndarray]:
    """A token-routes heatmap's first row (its y0: rows sit at category indices) and its z."""
    assert trace.x is None and trace.y is None and trace.x0 == 0 and trace.dx == 1 and trace.dy == 1
    return int(trace.y0), np.array(trace.z, dtype=float)


def route_hover(fig: go.Figure, trace: go.Heatmap, a: int, b: int) -> str:
    """What plotly.js shows on hovering cell (row ``a``, column ``b``) of ``trace``: its template
    with %{x} / %{y} the axis categories at the cell, %{z} and %{customdata[k]} its numbers."""
    suffix = trace.xaxis[1:]
    xs, ys = fig.layout[f"xaxis{suffix}"].categoryarray, fig.layout[f"yaxis{suffix}"].categoryarray
    r0, z = route_cells(trace)
    custom = trace.customdata[a][b]
    text = trace.hovertemplate.replace("%{x}", xs[b]).replace("%{y}", ys[r0 + a])
    text = text.replace("%{z:.2f}", f"{z[a, b]:.2f}")
    for k, v in enumerate(custom):
        text = text.replace(f"%{{customdata[{k}]:.3f}}", f"{v:.3f}")
    assert "%{" not in text and text.endswith("<extra></extra>")
    return text[: -len("<extra></extra>")]


def test_token_routes_rows_are_sites_columns_are_tokens_cells_the_top_expert():
    table = route_table()
    fig = plots.plot_token_routes(table, 5, prediction="<u>neg</u>")
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    legend = [t for t in fig.data if isinstance(t, go.Scatter)]
    # one legend entry per expert (max E = 3); a heatmap per expert and bank size: query's 3, value's 2
    assert len(legend) == 3 and [t.name for t in heat] == [f"expert {e}" for e in (0, 1, 2, 0, 1)]
    # rows: the sites, by module then layer, labelled "module · layer"; a rule between the modules
    assert fig.layout.yaxis.type == "category" and list(fig.layout.yaxis.tickvals) == [0, 1, 2, 3]
    assert list(fig.layout.yaxis.categoryarray) == [f"{m} · layer {i % 2}<br>site: {s}" for i, (m, s) in
                                                    enumerate(zip(["query"] * 2 + ["value"] * 2, SITE_ORDER))]
    assert list(fig.layout.yaxis.ticktext) == ["query · layer 0", "query · layer 1", "value · layer 0", "value · layer 1"]
    assert [(s.y0, s.y1) for s in fig.layout.shapes] == [(1.5, 1.5)]
    # columns: the tokens in position order, as horizontal tick labels (escaped)
    assert fig.layout.xaxis.type == "category" and fig.layout.xaxis.tickangle == 0
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    assert list(fig.layout.xaxis.ticktext) == ["the", "&lt;b&gt;x&lt;/b&gt;", "cat", "sat"]
    assert fig.layout.xaxis.categoryarray[1] == "<b>&lt;b&gt;x&lt;/b&gt;</b> · position 1"
    seq = table[table.sequence == 5].set_index(["site", "position"])
    words = ["the", "&lt;b&gt;x&lt;/b&gt;", "cat", "sat"]
    hovered = 0
    for trace in heat:
        e = int(trace.name.split()[-1])
        assert trace.showscale is False and trace.hoverongaps is False
        assert trace.colorscale[-1][1] == plots.expert_color(e)  # full colour: a decisive router
        assert legend[e].name == trace.name and legend[e].marker.color == plots.expert_color(e)
        assert legend[e].legendgroup == trace.legendgroup
        r0, z = route_cells(trace)
        n_experts = trace.hovertemplate.count(": %{customdata[")
        assert (r0, z.shape) == ((0, (2, 4)) if n_experts == 3 else (2, (2, 4)))  # query's rows, value's rows
        for a in range(z.shape[0]):
            site = SITE_ORDER[r0 + a]
            E = 3 if "query" in site else 2
            for j in range(4):
                if (site, j) not in seq.index:
                    assert np.isnan(z[a, j])  # not sampled: blank in every trace
                    continue
                row = seq.loc[(site, j)]
                if row.top_expert != e:
                    assert np.isnan(z[a, j]) and trace.customdata[a][j] == 0  # another expert's colour
                    continue
                p_max = row[f"p{e}"]
                decisive = (p_max - 1 / E) / (1 - 1 / E)
                assert z[a, j] == pytest.approx(decisive)  # tint: decisiveness
                assert list(trace.customdata[a][j]) == [round(row[f"p{k}"], 3) for k in range(E)]
                # the hover: token, position, site label and path, the whole distribution, the top expert marked
                dist = "<br>".join(f"{'▶' if k == e else '&nbsp;&nbsp;'} expert {k}: {row[f'p{k}']:.3f}" for k in range(E))
                label = f"{'query' if E == 3 else 'value'} · layer {site.split('.')[2]}"
                assert route_hover(fig, trace, a, j) == (
                    f"token <b>{words[j]}</b> · position {j}<br>{label}<br>site: {site}"
                    f"<br>top expert {e} · decisiveness {decisive:.2f}<br>{dist}")
                hovered += 1
    assert hovered == 15  # every sampled cell is one expert's
    title = fig.layout.title.text
    assert title.startswith("Sequence 5 — label &lt;i&gt;pos&lt;/i&gt; · predicted &lt;u&gt;neg&lt;/u&gt;")
    assert "all 4 sites" in fig.layout.title.subtitle.text and "blank" in fig.layout.legend.title.text
    assert fig.layout.xaxis.title.text == "tokens, in order" and fig.layout.yaxis.title.text == "site (module · layer)"
    texts = list(strings(fig.to_plotly_json()))
    assert not [t for t in texts if HOSTILE in t or "<i>" in t or "<u>" in t]  # every text from the data escaped
    assert_escaped(fig, HOSTILE)


def test_token_routes_height_grows_with_the_sites_and_long_sequences_wrap():
    table = route_table()
    four = plots.plot_token_routes(table, 6)
    two = plots.plot_token_routes(table, 6, sites=SITE_ORDER[2:])
    assert four.layout.height - two.layout.height == 2 * plots.tokens.ROUTE_ROW_PX  # px per site row
    assert four.layout.width is None and "at 2 sites of 4" in two.layout.title.subtitle.text
    assert list(two.layout.yaxis.ticktext) == ["value · layer 0", "value · layer 1"]
    assert "blank" not in four.layout.legend.title.text  # every token sampled everywhere
    blocks = plots.plot_token_routes(table, 6, wrap=2)  # two row blocks of two tokens
    assert list(blocks.layout.xaxis.ticktext) == ["the", "&lt;b&gt;x&lt;/b&gt;"]
    assert list(blocks.layout.xaxis2.ticktext) == ["cat", "sat"] and blocks.layout.yaxis2.anchor == "x2"
    assert len(blocks.data) == 2 * (3 + 2) + 3 and blocks.layout.height > four.layout.height
    assert blocks.layout.yaxis.domain[0] > blocks.layout.yaxis2.domain[1]  # the second block below the first
    # 120 tokens: wrapped into blocks of at most 40, every tick label horizontal
    long = pd.concat([table[(table.sequence == 6) & (table.position == 0)].assign(position=p, token=f"w{p}")
                      for p in range(120)], ignore_index=True)
    fig = plots.plot_token_routes(long, 6)
    names = sorted((k for k in fig.layout if k.startswith("xaxis")), key=lambda k: int(k[5:] or 1))
    axes = [fig.layout[k] for k in names]
    assert len(axes) >= 3 and all(len(ax.ticktext) <= 40 and ax.tickangle == 0 for ax in axes)
    assert [t for ax in axes for t in ax.ticktext] == [f"w{p}" for p in range(120)]


def llm_route_table(n_layers: int = 30, n_tokens: int = 94, E: int = 4) -> pd.DataFrame:
    """One sequence of a SmolLM2-sized recording: q_proj and v_proj in every layer (60 sites), every
    token sampled everywhere, byte-level BPE tokens as ``token_table`` shows them."""
    rng = np.random.default_rng(0)
    words = [" the", " movie", " was", "⏎", " really", " good", "!", " I", "⇥", " loved", " it", "."]
    S = 2 * n_layers
    probs = rng.dirichlet(np.ones(E) * 0.7, size=(S, n_tokens))
    frame = pd.DataFrame({
        "site": [f"model.layers.{i % n_layers}.self_attn.{'qv'[i // n_layers]}_proj" for i in range(S) for _ in range(n_tokens)],
        "module": [f"{'qv'[i // n_layers]}_proj" for i in range(S) for _ in range(n_tokens)],
        "group": [f"{'qv'[i // n_layers]}_proj:32x32" for i in range(S) for _ in range(n_tokens)],
        "index": np.repeat(np.arange(S), n_tokens), "call": 0, "sequence": 0,
        "position": np.tile(np.arange(n_tokens), S), "token_id": np.tile(np.arange(n_tokens) % len(words), S),
        "token": [words[j % len(words)] for _ in range(S) for j in range(n_tokens)], "label": "pos"})
    for k in range(E):
        frame[f"p{k}"] = probs[..., k].ravel()
    frame["top_expert"] = probs.argmax(axis=-1).ravel()
    return frame


def test_token_routes_of_a_60_site_llm_sequence_stay_small():
    """The hover is one template per trace over numbers per cell (customdata) and the axes'
    categories, not a string per cell: a 60-site × 94-token sequence was 8.5 MB of JSON, now 0.4 MB."""
    table = llm_route_table()
    fig = plots.plot_token_routes(table, 0)
    heat = [t for t in fig.data if isinstance(t, go.Heatmap)]
    size = len(pio.to_json(fig))
    assert size < 500_000, f"{size:,} bytes"
    assert all(t.hovertext is None and t.text is None for t in heat)
    assert all(isinstance(t.z, np.ndarray) and t.z.dtype == np.float32 for t in heat)  # base64 in the JSON
    assert '"bdata"' in pio.to_json(fig) and len(fig.layout.yaxis.categoryarray) == 60
    # every sampled cell hovers the same values as the table: 60 × 94, each in one expert's trace
    site_of = {i: s for i, s in enumerate(_sites_in_order(table))}
    seen = 0
    rows = table.set_index(["site", "position"])
    for trace in heat:
        e, suffix = int(trace.name.split()[-1]), trace.xaxis[1:]
        xs = fig.layout[f"xaxis{suffix}"].categoryarray
        r0, z = route_cells(trace)
        for a, b in zip(*np.nonzero(np.isfinite(z))):
            position = int(xs[b].rsplit("position ", 1)[1])
            row = rows.loc[(site_of[r0 + a], position)]
            assert row.top_expert == e
            text = route_hover(fig, trace, a, b)
            assert f"<b>{row.token}</b> · position {position}<br>" in text and f"site: {site_of[r0 + a]}" in text
            assert all(f"expert {k}: {row[f'p{k}']:.3f}" in text for k in range(4)) and f"▶ expert {e}:" in text
            seen += 1
    assert seen == 60 * 94


def _sites_in_order(table: pd.DataFrame) -> list[str]:
    order = table.drop_duplicates("site")
    return sorted(order["site"], key=lambda s: (s.rsplit(".", 1)[1], int(s.split(".")[2])))


def test_token_routes_name_what_is_wrong(lab):
    table = route_table()
    with pytest.raises(ValueError, match=r"plot_token_routes: no rows with sequence=99; .*5, 6"):
        plots.plot_token_routes(table, 99)
    with pytest.raises(ValueError, match=r"sites \['nope'\] are not in the token table; .*enc.layer.0.attn.query"):
        plots.plot_token_routes(table, 5, sites=["nope"])
    with pytest.raises(ValueError, match="wrap"):
        plots.plot_token_routes(table, 5, wrap=0)
    # the recorded table works too: every site of the model, the hostile token escaped
    fig = plots.plot_token_routes(lab.f["tokens"], 3)
    assert len(fig.layout.yaxis.ticktext) == lab.n_sites and "label &lt;script&gt;" in fig.layout.title.text
    assert_escaped(fig, EVIL_TOKEN)


def test_spectra_small_multiples_one_panel_per_bank(lab, tiny_bert):
    peft = pytest.importorskip("peft")
    spectra = pd.concat([lab.f["spectra"], ll.delta_spectra(lab.model, lab.routing)], ignore_index=True)
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query", "value"], r=4,
                                                            init_lora_weights=False))
    fig = plots.plot_spectra(spectra, facet="group", baseline=ll.delta_spectra(lora))
    assert [a.text for a in fig.layout.annotations] == ["query bank (32×32)", "value bank (32×32)"]
    lines = [t for t in fig.data if t.x[0] is not None]
    keys = [t for t in fig.data if t.x[0] is None]
    assert len(lines) == 8 * 2 + 8 and not any(t.showlegend for t in lines)
    for t in lines:  # each line in its bank's panel, colour the layer, grouped by layer
        layer = int(t.legendgroup.split()[-1])
        assert t.xaxis == ("x" if t.name.startswith("query") else "x2") and t.name.startswith(("query", "value"))
        assert f"layer {layer}" in t.name
    first = spectra[(spectra.site == lab.site) & (spectra.mixture == "uniform")]
    assert list(lines[0].y) == first.sigma.tolist()
    assert [t.name for t in keys] == [f"layer {i}" for i in range(4)] + ["line: uniform", "line: routed mean",
                                                                          "line: baseline"]
    assert {t.line.color for t in lines if t.legendgroup == "layer 2"} == {keys[2].line.color}
    assert len([t for t in lines if t.line.dash == "dash"]) == 8  # the baseline, in the panel of its site
    by_module = plots.plot_spectra(spectra, facet="module")
    assert [a.text for a in by_module.layout.annotations] == ["query sites", "value sites"]
    assert len(plots.plot_spectra(spectra).layout.annotations) == 0  # no facet: one plot, as before
    with pytest.raises(ValueError, match="facet"):
        plots.plot_spectra(spectra, facet="layer")

def test_metric_timeline_one_line_per_site(lab):
    tl = lab.f["timeline"]
    fig = plots.plot_metric_timeline(tl, "max_usage", sites=lab.routing.sites[:2], step=1)
    assert len(fig.data) == 2 and fig.layout.yaxis.title.text.startswith("max usage")
    part = tl[(tl.metric == "max_usage") & (tl.site == lab.routing.sites[0])]
    assert list(fig.data[0].x) == [0, 1, 2] and list(fig.data[0].y) == part.value.tolist()
    assert fig.layout.shapes[0].x0 == 1
    with pytest.raises(ValueError, match="routing_mi"):
        plots.plot_metric_timeline(tl, "nope")
    assert len(plots.plot_metric_timeline(tl.iloc[:0]).data) == 0  # nothing recorded yet: a message


def test_spectra_overlay_mixtures_and_a_dashed_lora_baseline(lab, tiny_bert):
    peft = pytest.importorskip("peft")
    spectra = pd.concat([lab.f["spectra"], ll.delta_spectra(lab.model, lab.routing)], ignore_index=True)
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query", "value"], r=4,
                                                            init_lora_weights=False))
    base = ll.delta_spectra(lora)
    fig = plots.plot_spectra(spectra, log=True, baseline=base)
    assert len(fig.data) == 8 * 2 + 8 and fig.layout.yaxis.type == "log"
    first = spectra[(spectra.site == lab.site) & (spectra.mixture == "uniform")]
    assert list(fig.data[0].x) == (first.k + 1).tolist() and list(fig.data[0].y) == first.sigma.tolist()
    dashed = [t for t in fig.data if t.line.dash == "dash"]
    assert len(dashed) == 8 and all("baseline" in t.name for t in dashed)
    assert dashed[0].line.color == fig.data[0].line.color  # the baseline of a site wears its colour
    assert dashed[0].y[0] == base[base.site == "base_model.model." + lab.site].sigma.max()
    one = plots.plot_spectra(spectra, sites=[lab.site], baseline=base)
    assert len(one.data) == 3 and one.layout.yaxis.type == "linear"


def test_spectra_line_styles_stay_distinct_for_many_mixtures(lab):
    # One site under uniform, each single expert and several more mixtures: 12 mixtures, 12 styles.
    frames = [ll.delta_spectra(lab.model, mixture=m).assign(mixture=f"mixture {i}")
              for i, m in enumerate([None, 0, 1, 2] * 3)]
    spectra = pd.concat(frames, ignore_index=True)
    fig = plots.plot_spectra(spectra, sites=lab.site)
    styles = [t.line.dash for t in fig.data]
    assert len(styles) == 12 and len(set(styles)) == 12 and "dash" not in styles  # "dash" marks baselines


def test_rank_by_layer_with_its_bound(lab):
    ranks = lab.f["ranks"]
    fig = plots.plot_rank_by_layer(ranks)
    q = ranks[ranks.module == "query"].sort_values("layer")
    assert fig.data[0].name == "query" and list(fig.data[0].y) == q.effective_rank.tolist()
    assert fig.data[2].line.dash == "dash" and set(fig.data[2].y) == {4}
    wider = pd.concat([ranks[ranks.module == "query"], ranks[ranks.module == "value"].assign(r=8)])
    assert len(plots.plot_rank_by_layer(wider).data) == 4  # one bound per module when r differs
    assert len(plots.plot_rank_by_layer(ranks, "energy_top1").data) == 2  # a share has no rank bound


def test_expert_similarity_is_symmetric_with_a_unit_diagonal(lab, tiny_bert):
    sim = lab.f["similarity"]
    for value in ("cosine", "subspace_overlap"):
        z = np.asarray(plots.plot_expert_similarity(sim, "value:32x32", value).data[0].z)
        part = sim[sim.group == "value:32x32"]
        assert z.shape == (3, 3) and np.allclose(z, z.T) and np.allclose(np.diag(z), 1)
        for i, j, v in zip(part.expert_i, part.expert_j, part[value]):
            assert z[i, j] == v
    empty = plots.plot_expert_similarity(sim.iloc[:0])
    assert len(empty.data) == 0 and "no bank" in empty.layout.annotations[0].text


def test_diagnosis_colours_severities_and_says_when_all_is_well(lab, tiny_bert):
    fig = plots.plot_diagnosis(lab.f["findings"])
    assert [t.name for t in fig.data] == ["critical", "warning"]
    assert fig.data[0].marker.color == plots.SEVERITY_COLORS["critical"] and list(fig.data[0].x) == [1]
    assert list(fig.data[1].x) == [2] and "add a balance loss" in fig.data[1].hovertext[0]
    assert_escaped(fig, EVIL_LABEL)
    fresh = ll.add_lily(tiny_bert(), ll.LilyConfig(["query"], r=2))  # B = 0: inactive_adapter
    assert [t.name for t in plots.plot_diagnosis(ll.diagnose(fresh).to_frame()).data] == ["warning"]
    ok = plots.plot_diagnosis(ll.Diagnosis().to_frame())
    assert len(ok.data) == 0 and "No findings" in ok.layout.annotations[0].text


def test_mixture_modes_one_box_per_mode(lab):
    fig = plots.plot_mixture_modes(lab.f["modes"], lab.site)
    assert [t.name.split(" ")[0] for t in fig.data] == ["batch", "sequence", "token"]
    assert fig.data[0].name == "batch (3)" and len(fig.data[2].y) == 3 * len(lab.routing.probs(lab.site))


# ------------------------------------------------------------------ sharing layout and budget
def test_sharing_layout_from_a_config_matches_the_model(lab, tiny_bert):
    peft = pytest.importorskip("peft")
    cols = ["group", "module", "index", "layer", "a_index", "num_B", "r", "d_in", "d_out"]
    layout = lab.f["layout"].sort_values(["group", "index"]).reset_index(drop=True)
    from_config = ll.sharing_layout_from_config(ll.LilyConfig(**CONFIG), layers=4, d_in=32, d_out=32)
    pd.testing.assert_frame_equal(layout[cols], from_config[cols])
    assert from_config.site.tolist()[:2] == ["layer 0", "layer 1"]
    theirs = ll.sharing_layout(peft.get_peft_model(tiny_bert(), peft.LilyConfig(**CONFIG)))
    assert (theirs.kind == "peft-lily").all() and theirs.site.str.startswith("base_model.model.").all()
    pd.testing.assert_frame_equal(theirs.sort_values(["group", "index"]).reset_index(drop=True)[cols], layout[cols])


def test_sharing_diagram_joins_sites_to_their_A_and_every_A_to_the_bank(lab):
    fig = plots.plot_sharing_diagram(ll.sharing_layout_from_config(ll.LilyConfig(["q"], r=8, stride_A=3, num_B=4), 8, 64, 64))
    site_a, a_b, sites, As, Bs = fig.data
    assert list(sites.text) == [f"L{i}" for i in range(8)] and list(As.text) == ["A0", "A1", "A2"]
    assert list(Bs.marker.color) == [plots.expert_color(e) for e in range(4)]
    segments = [(site_a.x[k], site_a.x[k + 1]) for k in range(0, len(site_a.x), 3)]
    a_x = dict(zip(As.text, As.x))
    assert segments == [(i, a_x[f"A{i // 3}"]) for i in range(8)]
    assert len(a_b.x) == 3 * 3 * 4  # every A to every expert, a None after each segment
    assert "shared by: layer 0, layer 1, layer 2" in As.hovertext[0]
    assert list(fig.layout.yaxis.ticktext) == ["sites (layers)", "shared A projectors", "bank of B experts"]
    one = plots.plot_sharing_diagram(lab.f["layout"], group="value:32x32")
    assert len(one.data) == 5 and "value bank (32×32)" in one.layout.annotations[0].text
    assert "encoder.layer.0.attention.self.value" in one.data[2].hovertext[0]


@pytest.mark.parametrize("stride_A, num_B", [(1, 2), (2, 3), (3, 4), (4, 1)])
def test_parameter_budget_matches_the_formula_and_the_models(stride_A, num_B, tiny_bert):
    peft = pytest.importorskip("peft")
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, stride_A=stride_A, num_B=num_B))
    row = ll.parameter_budget(32, 32, 4, [4], stride_A, num_B, groups=2).iloc[0]
    assert row.lily_params == 2 * lily_parameter_formula(4, 32, 32, 4, stride_A, num_B) == ll.count_parameters(model)["adapter"]
    assert row.lora_equivalent_rank == ll.lora_equivalent_rank(model)
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query", "value"], r=4))
    assert row.lora_params_same_r == ll.count_parameters(lora)["adapter"]
    assert row.lily_rank_bound == 4 and row.n_A == math.ceil(4 / stride_A)


def test_parameter_budget_by_hand_and_its_plot():
    b = ll.parameter_budget(d_in=384, d_out=384, layers=12, r_values=[8, 16], stride_A=4, num_B=4)
    lily = 3 * 8 * 384 + 4 * 8 * 384 + 12 * 8 * 4  # ⌈12/4⌉ A's, 4 experts, 12 routers at r = 8
    assert b.lily_params.tolist()[0] == lily and b.lora_params_same_r.tolist() == [12 * 8 * 768, 12 * 16 * 768]
    assert b.lora_equivalent_rank.tolist()[0] == lily // (12 * 768)
    fig = plots.plot_parameter_budget(b, log=True)
    assert list(fig.data[0].y) == b.lily_params.tolist() and list(fig.data[3].y) == b.lora_equivalent_rank.tolist()
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis2.title.text == "r (Lily's rank)"
    assert "12 sites of 384×384" in fig.layout.title.text


@pytest.mark.parametrize("kw, field", [(dict(d_in=0), "d_in"), (dict(stride_A=0), "stride_A"), (dict(layers=2.5), "layers"),
                                       (dict(r_values=[]), "r_values"), (dict(num_B=True), "num_B")])
def test_parameter_budget_names_a_bad_input(kw, field):
    args = dict(d_in=8, d_out=8, layers=4, r_values=[2], stride_A=1, num_B=2) | kw
    with pytest.raises(ValueError, match=field):
        ll.parameter_budget(**args)


# --- findings as HTML: one definition for the report and the Diagnosis widget -------------------------------

@pytest.mark.parametrize("key, scope, shown", [
    ("encoder.layer.3.attention.self.query", "site", "query · layer 3"),  # a lily_lab site
    ("base_model.model.model.layers.3.self_attn.q_proj", "site", "q_proj · layer 3"),  # a PEFT site
    ("query:384x384", "site", "query bank (384×384)"),  # a group key reads as its bank, whatever the scope
    ("query:384x384", "bank", "query bank (384×384)"),
    ("value", "bank", "value bank"),
    ("lm_head", "site", "lm_head · site"),  # no layer in the path
    ("layers.1." + EVIL_TOKEN, "site", "&lt;img src=x onerror=alert(1)&gt; · layer 1"),
    (EVIL_LABEL + ":8x4", "bank", "&lt;script&gt;alert(1)&lt;/script&gt; bank (8×4)"),
])
def test_place_label_names_sites_and_banks_escaped(key, scope, shown):
    assert plots.place_label(key, scope) == shown


@pytest.mark.parametrize("n, scope, shown", [(1, "site", "1 site"), (2, "site", "2 sites"), (0, "site", "0 sites"),
                                             (1, "bank", "1 bank"), (2, "bank", "2 banks")])
def test_count_label(n, scope, shown):
    assert plots.count_label(n, scope) == shown


def _rows(table: str, tag: str = "td|th") -> list[list[str]]:
    import re
    return [re.findall(rf"<(?:{tag})[^>]*>(.*?)</(?:{tag})>", r) for r in re.findall(r"<tr>(.*?)</tr>", table)]


@pytest.mark.parametrize("evidence, sites, scope, tables", [
    # per place: a row per place (the finding's sites first), a column per measure; then key → value rows
    ({"routing_mi": {"enc.layer.1.value": 0.00123456, "enc.layer.0.query": 0.5},
      "max_usage": {"enc.layer.0.query": 0.9}, "routing": ["batch", "token"], "n": 12345},
     ["enc.layer.0.query", "enc.layer.1.value"], "site",
     [[["site", "routing MI", "max usage"], ["query · layer 0", "0.5000", "0.9000"],
       ["value · layer 1", "0.0012", "–"]],
      [["routing", "batch, token"], ["n", "12,345"]]]),
    ({"mean_cosine": {"query:32x32": 1.0}, "dead_experts": {"query:32x32": [0, 2]}, "usage": [0.0012345, 0.5]},
     ["query:32x32"], "bank",
     [[["bank", "mean cosine", "dead experts"], ["query bank (32×32)", "1.0000", "0, 2"]],
      [["usage", "0.001, 0.500"]]]),
    ({"note": EVIL_LABEL, EVIL_TOKEN: {EVIL_TOKEN: EVIL_LABEL}}, [], "site",
     [[["site", "&lt;img src=x onerror=alert(1)&gt;"],
       ["&lt;img src=x onerror=alert(1)&gt; · site", "&lt;script&gt;alert(1)&lt;/script&gt;"]],
      [["note", "&lt;script&gt;alert(1)&lt;/script&gt;"]]]),
])
def test_evidence_html_is_a_table_per_place_then_key_value_rows(evidence, sites, scope, tables):
    import re
    out = plots.evidence_html(evidence, sites, scope)
    assert "<script" not in out and "<img" not in out and "{" not in out
    found = re.findall(r"<table class='evidence'>(.*?)</table>", out)
    assert [_rows(t) for t in found] == tables
    for place in {p for v in evidence.values() if isinstance(v, dict) for p in v}:  # the full key as a tooltip
        assert f'title="{plots.escape(place)}"' in out
    assert "no evidence" in plots.evidence_html({}, [], "site")


def test_finding_html_is_a_card_with_title_badge_where_evidence_and_remedy():
    f = Finding("redundant_experts", "critical", ["query:32x32", "value:32x32"],
                {"mean_cosine": {"query:32x32": 0.99, "value:32x32": 0.95}, "routing": "batch"},
                "Switch to routing='token'", "2 bank(s) whose experts are near copies")
    card = plots.finding_html(f)
    assert card.startswith("<div class='lily-finding critical'>")
    assert "<span class='severity critical'>critical</span>" in card
    assert "<b>Experts that are near copies of each other</b> <code>redundant_experts</code>" in card
    assert "2 bank(s) whose experts are near copies" in card
    assert ('<b>where</b> (2 banks): <span title="query:32x32">query bank (32×32)</span>, '
            '<span title="value:32x32">value bank (32×32)</span>') in card
    assert "<table class='evidence'>" in card and "<td class='num'>0.9900</td>" in card
    assert "<b>try:</b> Switch to routing=&#x27;token&#x27;" in card
    # every selector of the cards' CSS is scoped under .lily-finding
    import re
    selectors = [s.strip() for rule in re.findall(r"([^{}]+)\{", plots.FINDING_CSS) for s in rule.split(",")]
    assert selectors and all(s.startswith(".lily-finding") for s in selectors)


def test_finding_html_escapes_hostile_text_and_names_unknown_kinds():
    evil = SimpleNamespace(kind="odd_kind", severity="warning x' onclick='alert(1)", summary=EVIL_LABEL,
                           sites=[f"layers.{i}.{EVIL_TOKEN}" for i in range(14)], evidence={"why": EVIL_TOKEN},
                           remedy=EVIL_LABEL, scope="site")
    card = plots.finding_html(evil)
    assert "<script" not in card and "<img" not in card and "onclick='" not in card
    assert card.startswith("<div class='lily-finding'>")  # a severity that is not one word adds no class
    assert "<b>odd kind</b> <code>odd_kind</code>" in card and "(14 sites)" in card and "(+2 more)" in card
    assert card.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # summary and remedy, as text


def test_evidence_html_of_many_places_shows_twelve_and_counts_the_rest():
    sites = [f"model.layers.{i}.q_proj" for i in range(20)]
    html_ = plots.evidence_html({"max_usage": {s: 0.95 for s in sites}}, sites, "site")
    assert html_.count("<tr><td title=") == 12 and "… and 8 more sites" in html_
    assert "q_proj · layer 11" in html_ and "q_proj · layer 12" not in html_


def test_expert_load_is_layers_by_experts_each_row_the_whole_dispatch(lab):
    load = lab.f["load"]
    fig = plots.plot_expert_load(load)
    heat, bars = fig.data
    assert list(heat.y) == list(dict.fromkeys(load.site))
    np.testing.assert_allclose(np.asarray(heat.z).sum(axis=1), 1.0)  # a layer's shares add up to 1
    assert heat.zmin == 0 and heat.zmax == pytest.approx(0.5)  # red: an expert sent every token (1 / top_k)
    assert bars.orientation == "h" and bars.xaxis == "x2" and len(bars.x) == 2
    assert [s.x0 for s in fig.layout.shapes if s.type == "line"] == [2.0]  # balanced aux loss: top_k
    hover = heat.hovertext[0][0]
    assert "mlp.gate · layer 0" in hover and "of the layer's dispatch" in hover and "tokens (" in hover
    # Without the optional columns: the heatmap alone.
    bare = plots.plot_expert_load(load[["site", "expert", "tokens", "share"]])
    assert len(bare.data) == 1 and bare.layout.xaxis.domain == (0, 1)
    evil = load.assign(site=load.site.str.replace("model.", "<b>model</b>.", regex=False))
    assert_escaped(plots.plot_expert_load(evil), "<b>model</b>")
