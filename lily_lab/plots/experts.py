"""Adapter views that need no recording: ΔW spectra, rank by layer, expert similarity, diagnosis.

Inputs are the frames of ``delta_spectra``, ``rank_summary``, ``expert_similarity`` and
``Diagnosis.to_frame()``.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from ..core.errors import InputError
from ._common import (bank_label, escape, figure, first, fmt, layers, message_figure, modules, pick, require,
                      site_label)
from .findings import count_label
from .theme import NEUTRAL, SEVERITY_COLORS, TEMPLATE, severity_color

_DASHES = ["solid", "dot", "dashdot", "longdashdot", "longdash"]  # "dash" is kept for baselines and bounds


def _dash(i: int) -> str:
    """The line style of the ``i``-th mixture: plotly's named styles first, then patterns
    (dash length × number of dots after it) that differ from each other and from those, so any
    number of mixtures stays distinguishable."""
    if i < len(_DASHES):
        return _DASHES[i]
    j = i - len(_DASHES)
    return f"{3 + 2 * (j % 6)}px,3px" + ",1px,3px" * (j // 6 + 1)
_SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon"]
_MODULE_COLORS = qualitative.Dark2

RANK_TITLES = {
    "effective_rank": "effective rank exp H(σ/Σσ)",
    "stable_rank": "stable rank Σσ² / σ_max²",
    "numerical_rank": "numerical rank (σ > 1e-6·σ_max)",
    "energy_top1": "share of Σσ² in the largest σ",
    "energy_top4": "share of Σσ² in the 4 largest σ",
    "energy_top16": "share of Σσ² in the 16 largest σ",
}
SIMILARITY_TITLES = {"cosine": "cosine of the B experts",
                     "subspace_overlap": "overlap of output spaces",
                     "functional_cosine": "cosine of updates ΔW_e"}


def _key(site: str) -> str:
    """A site's name without PEFT's prefix, so a Lily site and its LoRA baseline line up."""
    return str(site).removeprefix("base_model.model.")


FACETS = ("group", "module")


def plot_spectra(spectra: pd.DataFrame, *, log: bool = False, sites: list[str] | str | None = None,
                 baseline: pd.DataFrame | None = None, title: str | None = None, facet: str | None = None,
                 columns: int = 2) -> go.Figure:
    """Singular values of each site's ΔW against their index, one line per site × mixture.

    Colour is the layer (dark: first, yellow: last), marker the module, line style the mixture;
    ``baseline`` (another ``delta_spectra`` frame, e.g. of a PEFT LoRA model) is drawn dashed in the
    colour of the matching site. ``log`` puts σ on a log scale; ``sites`` keeps a subset by name.

    ``facet="group"`` (one panel per bank, titled by its bank name) or ``facet="module"`` (one per
    module) draws small multiples, ``columns`` panels a row, instead of every line in one plot: a
    panel's lines are its layers; the legend has one entry per layer (a click toggles that layer in
    every panel) and one key per mixture's line style."""
    fn = "plot_spectra"
    made_by = "lily_lab.delta_spectra(model, …)"
    require(spectra, ["site", "k", "sigma"], fn, made_by)
    if baseline is not None:
        require(baseline, ["site", "k", "sigma"], fn + " (baseline)", made_by)
    if facet is not None and facet not in FACETS:
        raise InputError(f"{fn}: facet must be None, 'group' (one panel per bank) or 'module'; got {facet!r}")
    if facet == "group" and not spectra.empty and "group" not in spectra.columns:
        raise InputError(f"{fn}: facet='group' needs a 'group' column; the frame has {list(spectra.columns)}")
    if spectra.empty:
        return message_figure(title or "Spectra of ΔW", "no adapter sites in this frame")
    frames = {"": spectra, "baseline": baseline if baseline is not None else spectra.iloc[:0]}
    if sites is not None:
        wanted = {_key(s) for s in ([sites] if isinstance(sites, str) else sites)}
        unknown = wanted - {_key(s) for s in spectra["site"]}
        if unknown:
            have = list(dict.fromkeys(spectra["site"]))
            raise InputError(f"{fn}: sites {sorted(unknown)} are not in the spectra; it has {have}")
        frames = {k: f[f["site"].map(_key).isin(wanted)] for k, f in frames.items()}
    main = frames[""].assign(layer=layers(frames[""]))
    order = main.drop_duplicates("site")
    layer_values = sorted({l for l in order["layer"] if l is not None})
    palette = sample_colorscale("Viridis", [i / max(len(layer_values) - 1, 1) * 0.9 for i in range(len(layer_values))])
    colors = {_key(s): palette[layer_values.index(l)] if l in layer_values else NEUTRAL
              for s, l in zip(order["site"], order["layer"])}
    module_list = list(dict.fromkeys(modules(order)))
    mixtures = list(dict.fromkeys(main["mixture"])) if "mixture" in main.columns else [None]
    head = "Singular values of ΔW per site" + (" (dashed: baseline)" if baseline is not None else "")
    if facet is not None:
        return _spectra_facets(main, frames["baseline"], facet, int(columns), log, title, colors, layer_values,
                               palette, mixtures, baseline is not None)
    fig = figure(escape(title) if title else head)
    for role, site, mixture, part in _lines(main, frames["baseline"], log):
        module = modules(part).iloc[0]
        where = site_label(module, part["layer"].iloc[0])
        what = escape(part["kind"].iloc[0] if "kind" in part.columns else "baseline") + " (baseline)" if role \
            else escape(mixture) if mixture is not None else ""
        name = f"{where} · {what}" if what else where
        fig.add_scatter(
            x=(part["k"] + 1).tolist(), y=part["sigma"].tolist(), mode="lines+markers", name=name,
            legendgroup=_key(site),
            line=dict(color=colors.get(_key(site), NEUTRAL), width=1.5, dash="dash" if role else
                      _dash(mixtures.index(mixture)) if mixture in mixtures else "solid"),
            marker=dict(size=5, symbol=_SYMBOLS[module_list.index(module) % len(_SYMBOLS)]),
            hovertext=[f"site: {escape(site)}<br>{where}<br>{what}<br>k = {k + 1}: σ = {fmt(s, 4)}"
                       for k, s in zip(part["k"], part["sigma"])], hoverinfo="text")
    fig.update_xaxes(title_text="k (1 = largest singular value)", tick0=1, dtick=1 if main["k"].max() < 20 else None)
    fig.update_yaxes(title_text="σ_k of ΔW" + (" (log scale)" if log else ""), type="log" if log else "linear")
    return fig


def _lines(main: pd.DataFrame, base: pd.DataFrame, log: bool):
    """``(role, site, mixture, rows)`` for each line of a spectra figure: every site × mixture of
    ``main`` (role ``""``), then of ``base`` (role ``"baseline"``), rows in order of k, with layers."""
    for role, frame in (("", main), ("baseline", base)):
        if frame.empty:
            continue
        frame = frame.assign(layer=layers(frame))
        keys = [c for c in ("site", "mixture") if c in frame.columns]
        for key, part in frame.groupby(keys, sort=False):
            site, mixture = (key if isinstance(key, tuple) else (key,)) + ((None,) if len(keys) == 1 else ())
            part = part.sort_values("k")
            yield role, site, mixture, part[part["sigma"] > 0] if log else part  # log scale: σ = 0 has no place


def _spectra_facets(main: pd.DataFrame, base: pd.DataFrame, facet: str, columns: int, log: bool,
                    title: str | None, colors: dict, layer_values: list, palette: list, mixtures: list,
                    has_baseline: bool) -> go.Figure:
    """``plot_spectra``'s small multiples: a panel per ``facet`` value (bank or module)."""
    def panel_of(frame: pd.DataFrame) -> pd.Series:
        return frame["group"] if facet == "group" else modules(frame)

    main = main.assign(_panel=panel_of(main).tolist())
    panels = list(dict.fromkeys(main["_panel"]))
    by_key = dict(zip(main["site"].map(_key), main["_panel"]))
    if not base.empty:  # a baseline site joins the panel of the site it matches
        own = panel_of(base).tolist() if facet == "module" or "group" in base.columns else [None] * len(base)
        base = base.assign(_panel=[by_key.get(_key(s), p) for s, p in zip(base["site"], own)])
        base = base[base["_panel"].isin(panels)]
    ncols = max(1, min(columns, len(panels)))
    nrows = -(-len(panels) // ncols)
    names = [bank_label(p) if facet == "group" else f"{escape(p)} sites" for p in panels]
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=names, horizontal_spacing=0.08,
                        vertical_spacing=min(0.12, 0.5 / max(nrows - 1, 1)) if nrows > 1 else 0.1)
    head = f"Singular values of ΔW: one panel per {'bank' if facet == 'group' else 'module'}, a line per layer"
    head += " (dashed: baseline)" if has_baseline else ""
    traces = []
    for role, site, mixture, part in _lines(main, base, log):
        i = panels.index(part["_panel"].iloc[0])
        layer = part["layer"].iloc[0]
        where = site_label(modules(part).iloc[0], layer)
        what = (escape(part["kind"].iloc[0] if "kind" in part.columns else "baseline") + " (baseline)" if role
                else escape(mixture) if mixture is not None else "")
        traces.append(dict(
            type="scatter", x=(part["k"] + 1).tolist(), y=part["sigma"].tolist(), mode="lines+markers",
            name=f"{where} · {what}" if what else where, legendgroup=f"layer {layer}", showlegend=False,
            line=dict(color=colors.get(_key(site), NEUTRAL), width=1.5, dash="dash" if role else
                      _dash(mixtures.index(mixture)) if mixture in mixtures else "solid"),
            marker=dict(size=4), xaxis=f"x{i + 1 if i else ''}", yaxis=f"y{i + 1 if i else ''}",
            hovertext=[f"site: {escape(site)}<br>{where}<br>{what}<br>k = {k + 1}: σ = {fmt(s, 4)}"
                       for k, s in zip(part["k"], part["sigma"])], hoverinfo="text"))
    # The legend: a line per layer in its colour (toggles the layer everywhere), a key per line style.
    for layer, color in zip(layer_values, palette):
        traces.append(dict(type="scatter", x=[None], y=[None], mode="lines", name=f"layer {escape(layer)}",
                           legendgroup=f"layer {layer}", line=dict(color=color, width=3), hoverinfo="skip"))
    styles = [(escape(m), _dash(i)) for i, m in enumerate(mixtures) if m is not None and len(mixtures) > 1]
    styles += [("baseline", "dash")] if has_baseline and not base.empty else []
    for name, dash in styles:
        traces.append(dict(type="scatter", x=[None], y=[None], mode="lines", name=f"line: {name}",
                           legendgroup=f"style {name}", line=dict(color=NEUTRAL, width=2, dash=dash),
                           hoverinfo="skip"))
    fig.add_traces(traces)
    fig.update_layout(template=TEMPLATE, height=140 + 300 * nrows, title=dict(text=escape(title) if title else head),
                      margin=dict(t=100),
                      legend=dict(title=dict(text="colour: layer · line: mixture"), tracegroupgap=2))
    fig.update_xaxes(title_text="k (1 = largest σ)", tick0=1, dtick=1 if main["k"].max() < 20 else None)
    fig.update_yaxes(title_text="σ_k" + (" (log)" if log else ""), type="log" if log else "linear")
    return fig


def plot_rank_by_layer(ranks: pd.DataFrame, metric: str = "effective_rank", *, title: str | None = None) -> go.Figure:
    """A rank metric of ΔW against the layer, one line per module (× mixture), with the bound
    ``r`` (rank of the factors) dashed: a layer far under it uses few of its directions."""
    fn = "plot_rank_by_layer"
    require(ranks, ["site", "module", "index", metric], fn, "lily_lab.rank_summary(spectra)")
    what = RANK_TITLES.get(metric, escape(metric))
    if ranks.empty:
        return message_figure(title or "Rank by layer", "no sites in this frame")
    df = ranks.assign(layer=layers(ranks))
    x_col = "layer" if df["layer"].notna().all() else "index"
    module_names = list(dict.fromkeys(df["module"]))
    mixtures = list(dict.fromkeys(df["mixture"])) if "mixture" in df.columns else [None]
    fig = figure(escape(title) if title else f"{what} of ΔW by layer")
    for m_i, module in enumerate(module_names):
        for x_i, mixture in enumerate(mixtures):
            sub = df[(df["module"] == module) & ((df["mixture"] == mixture) if mixture is not None else True)]
            if sub.empty:
                continue
            sub = sub.sort_values(x_col)
            name = escape(module) + (f" · {escape(mixture)}" if len(mixtures) > 1 else "")
            fig.add_scatter(x=sub[x_col].tolist(), y=sub[metric].tolist(), mode="lines+markers", name=name,
                            line=dict(color=_MODULE_COLORS[m_i % len(_MODULE_COLORS)], dash=_dash(x_i)),
                            hovertext=[f"site: {escape(s)}<br>{site_label(module, l)}"
                                       + (f"<br>mixture {escape(mixture)}" if mixture is not None else "")
                                       + f"<br>{escape(metric)} {fmt(v)}" + (f" (bound r = {r})" if "r" in sub else "")
                                       for s, l, v, r in zip(sub["site"], sub["layer"], sub[metric],
                                                             sub["r"] if "r" in sub else sub[metric])],
                            hoverinfo="text")
    if "r" in df.columns and metric.endswith("_rank"):
        bounds = df.groupby("module", sort=False)
        if df["r"].nunique() == 1:
            xs = sorted(df[x_col].unique().tolist())
            fig.add_scatter(x=xs, y=[df["r"].iloc[0]] * len(xs), mode="lines", name=f"bound r = {df['r'].iloc[0]}",
                            line=dict(color=NEUTRAL, dash="dash"), hoverinfo="name")
        else:
            for m_i, (module, sub) in enumerate(bounds):
                sub = sub.drop_duplicates(x_col).sort_values(x_col)
                fig.add_scatter(x=sub[x_col].tolist(), y=sub["r"].tolist(), mode="lines", name=f"bound r ({escape(module)})",
                                line=dict(color=_MODULE_COLORS[module_names.index(module) % len(_MODULE_COLORS)], dash="dash"),
                                hoverinfo="name+y")
    fig.update_xaxes(title_text="layer" if x_col == "layer" else "position in group", tickmode="array",
                     tickvals=sorted(df[x_col].unique().tolist()))
    fig.update_yaxes(title_text=what, rangemode="tozero")
    return fig


def plot_expert_similarity(similarity: pd.DataFrame, group: str | None = None, value: str = "cosine",
                           *, title: str | None = None) -> go.Figure:
    """The ``E × E`` similarity of one bank's experts (default: the first group), symmetric with 1 on
    the diagonal. Red: alike (redundant experts), blue: opposite, white: unrelated."""
    fn = "plot_expert_similarity"
    require(similarity, ["group", "expert_i", "expert_j", value], fn, "lily_lab.expert_similarity(model)")
    what = SIMILARITY_TITLES.get(value, escape(value))
    if similarity.empty:
        return message_figure(title or "Expert similarity", "no bank with two or more experts (a LoRA site has one)")
    group = first(similarity, "group", group)
    part = pick(similarity, "group", group, fn)
    E = int(max(part["expert_i"].max(), part["expert_j"].max())) + 1
    M = np.full((E, E), np.nan)
    np.fill_diagonal(M, 1.0)
    for i, j, v in zip(part["expert_i"], part["expert_j"], part[value]):
        M[int(i), int(j)] = M[int(j), int(i)] = float(v)
    off = M[np.triu_indices(E, k=1)]
    mean = float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")
    experts = list(range(E))
    hover = [[f"{bank_label(group)}<br>expert {i} · expert {j}<br>{escape(value)} {fmt(M[i, j])}" for j in experts]
             for i in experts]
    # The bank and the measure in the title, the mean in the subtitle: one line that fits half a screen.
    fig = figure(escape(title) if title else f"{bank_label(group)}: {what}", height=max(320, 160 + 40 * E))
    fig.layout.title.subtitle.text = f"mean over the {len(off)} pairs of experts: {fmt(mean, 2)}"
    fig.layout.margin.t = 84
    fig.add_heatmap(z=M, x=experts, y=experts, zmin=-1 if value != "subspace_overlap" else 0, zmax=1,
                    colorscale="RdBu_r" if value != "subspace_overlap" else "Reds", texttemplate="%{z:.2f}",
                    hovertext=hover, hoverinfo="text", xgap=2, ygap=2, colorbar=dict(title=dict(text=escape(value))))
    fig.update_xaxes(title_text="expert", tickmode="array", tickvals=experts, constrain="domain")
    fig.update_yaxes(title_text="expert", tickmode="array", tickvals=experts, autorange="reversed",
                     scaleanchor="x", constrain="domain")
    return fig


def _wrap(text: str, width: int = 80) -> str:
    """Escaped text, wrapped for a hover box (escape after wrapping so no entity is cut)."""
    return "<br>".join(escape(line) for line in textwrap.wrap(str(text), width)) or ""


def plot_diagnosis(findings: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """The findings of ``diagnose(...).to_frame()``: one bar per finding, its length the number of
    sites affected, its colour the severity; hover gives what, where and what to try. An empty
    frame gives a figure that says no collapse was found."""
    fn = "plot_diagnosis"
    require(findings, ["kind", "severity", "summary"], fn, "Diagnosis.to_frame()")
    if "sites" not in findings.columns and "n_sites" not in findings.columns:
        raise InputError(f"{fn} needs a 'sites' or 'n_sites' column; the frame has {list(findings.columns)}")
    if findings.empty:
        return message_figure(title or "Diagnosis", "No findings: no collapse found", color=SEVERITY_COLORS["ok"])
    df = findings.reset_index(drop=True)
    n = df["n_sites"] if "n_sites" in df.columns else df["sites"].map(len)
    scope = df["scope"] if "scope" in df.columns else pd.Series(["site"] * len(df), index=df.index)
    rank = {"critical": 0, "warning": 1}
    severities = sorted(dict.fromkeys(df["severity"]), key=lambda s: (rank.get(s, 2), str(s)))
    ticks = [f"{escape(k)}" for k in df["kind"]]
    head = f"Diagnosis: {len(df)} finding{'' if len(df) == 1 else 's'}"
    fig = figure(escape(title) if title else head, height=max(240, 140 + 48 * len(df)))
    for sev in severities:
        idx = df.index[df["severity"] == sev].tolist()
        hover = []
        for i in idx:
            row = df.loc[i]
            sites = list(row["sites"]) if "sites" in df.columns and isinstance(row["sites"], (list, tuple)) else []
            where = ", ".join(map(str, sites[:6])) + (f" (+{len(sites) - 6} more)" if len(sites) > 6 else "")
            hover.append(f"<b>{escape(row['kind'])}</b> ({escape(sev)})<br>{_wrap(row['summary'])}"
                         + (f"<br>where: {_wrap(where)}" if where else "")
                         + (f"<br>try: {_wrap(row['remedy'])}" if "remedy" in df.columns else ""))
        fig.add_bar(x=[int(n[i]) for i in idx], y=idx, orientation="h", name=escape(sev),
                    marker_color=severity_color(sev), text=[count_label(int(n[i]), scope[i]) for i in idx], textposition="auto",
                    hovertext=hover, hoverinfo="text")
    fig.update_xaxes(title_text="sites or banks affected", rangemode="tozero", dtick=1 if n.max() <= 12 else None)
    fig.update_yaxes(title_text="finding", tickmode="array", tickvals=list(df.index), ticktext=ticks, autorange="reversed")
    fig.update_layout(legend_title_text="severity")
    return fig


__all__ = ["plot_spectra", "plot_rank_by_layer", "plot_expert_similarity", "plot_diagnosis", "RANK_TITLES",
           "SIMILARITY_TITLES"]
