"""Adapter views that need no recording: ΔW spectra, rank by layer, expert similarity, diagnosis.

Inputs are the frames of ``delta_spectra``, ``rank_summary``, ``expert_similarity`` and
``Diagnosis.to_frame()``; and, from a training ``Timeline``'s copies of the banks,
``timeline_expert_trajectories`` (``plot_expert_trajectories``: the experts over training).
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
from .theme import NEUTRAL, SEVERITY_COLORS, TEMPLATE, expert_color, severity_color

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
    undefined = int(np.isnan(off).sum())  # pairs with an all-zero expert: no cosine
    fig.layout.title.subtitle.text = (
        f"mean over the {len(off)} pairs of experts: {fmt(mean, 2)}" if not undefined else
        f"mean over {len(off) - undefined} of {len(off)} pairs: {fmt(mean, 2)}; {undefined} undefined (an all-zero expert)")
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


TRAJECTORIES = "lily_lab.timeline_expert_trajectories(timelines)"


def _spread_title(axis: str, attrs: dict, k: int) -> str:
    """``PC1 (24 % of the spread)`` from a trajectories frame's ``attrs["explained"]``."""
    try:
        share = float(attrs["explained"][k])
    except (KeyError, IndexError, TypeError, ValueError):
        return axis
    if not np.isfinite(share):
        return f"{axis} (no spread)"
    return f"{axis} ({_percent(share)} % of the spread)"


def _percent(share: float) -> str:
    """A share as a whole percentage that never rounds to 0 or 100 when it is neither."""
    pct = 100 * share
    return "<1" if 0 < pct < 0.5 else ">99" if 99.5 <= pct < 100 else f"{pct:.0f}"


def _expert_name(e) -> str:
    return f"expert {escape(e)}"


def _expert_colors(experts: list) -> dict:
    """Expert ``e`` in ``expert_color(e)``; experts that are no index take colours in order."""
    out = {}
    for i, e in enumerate(experts):
        try:
            out[e] = expert_color(int(e)) if float(e) == int(e) else expert_color(i)
        except (TypeError, ValueError, InputError):
            out[e] = expert_color(i)
    return out


def _runs_and_experts(traj: pd.DataFrame) -> tuple[list, list]:
    """A trajectories frame's runs (in frame order) and experts (by index, else by name): the
    panels and the lines of ``plot_expert_trajectories``."""
    runs = list(dict.fromkeys(traj["run"]))
    experts = list(dict.fromkeys(traj["expert"]))
    indices = all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in experts)
    return runs, sorted(experts, key=int) if indices else sorted(experts, key=str)


def trajectory_now(traj: pd.DataFrame, step: int, runs: list | None = None, experts: list | None = None) -> list[dict]:
    """The "now" markers of ``plot_expert_trajectories``: per run, a trace's ``x``, ``y``,
    ``hovertext``, ``marker.color`` and ``name`` at ``step`` (each run at its latest observed
    step ≤ ``step``; none for a run observed only later). The player moves them in place."""
    if runs is None or experts is None:
        runs, experts = _runs_and_experts(traj)
    colors = _expert_colors(experts)
    out = []
    for run in runs:
        part = traj[(traj["run"] == run) & (traj["step"] <= step)]
        xs, ys, hover, cs = [], [], [], []
        if not part.empty:
            at = part["step"].max()
            part = part[part["step"] == at]
            for e in experts:
                row = part[part["expert"] == e]
                if row.empty:
                    continue
                x, y = float(row["PC1"].iloc[0]), float(row["PC2"].iloc[0])
                xs.append(x)
                ys.append(y)
                cs.append(colors[e])
                hover.append(f"run: {escape(run)}<br>{_expert_name(e)}<br>now: step {escape(at)}"
                             + ("" if at == step else f" (the run's last before step {escape(step)})")
                             + f"<br>PC1 {fmt(x)}<br>PC2 {fmt(y)}")
        out.append(dict(x=xs, y=ys, hovertext=hover, marker=dict(color=cs), name=f"now: step {escape(step)}"))
    return out


def plot_expert_trajectories(traj: pd.DataFrame, *, step: int | None = None, title: str | None = None) -> go.Figure:
    """Each expert's path over training, on the top two principal components of all the experts
    of all runs and steps (the frame of ``lily_lab.timeline_expert_trajectories``).

    One panel per run (all on the same scale, with equal units on both axes, so distances on
    the plane read true), one line per expert in its colour, through its steps in order from a
    hollow marker at the first step. ``step`` (a player's "now") puts a larger marker on every
    expert of every run at that step (a run observed on another schedule: at its latest step
    before it).

    How to read it: distinct experts trace separate paths; **collapse** is the experts' lines
    running together into one (the experts became copies of one another). The axes say how much
    of the spread each component keeps (``attrs["explained"]``): a projection can hide distance,
    so experts that overlap here may still differ in the directions left out — the smaller that
    share, the less an overlap proves.
    """
    fn = "plot_expert_trajectories"
    require(traj, ["run", "step", "expert", "PC1", "PC2"], fn, TRAJECTORIES)
    if step is not None and (isinstance(step, bool) or not hasattr(step, "__index__")):
        raise InputError(f"{fn}: step must be an integer (a training step in the frame) or None, got {step!r}")
    attrs = traj.attrs or {}
    group = attrs.get("group")
    head = f"{bank_label(group)}: the experts over training" if group is not None else "The experts over training"
    if traj.empty:
        return message_figure(title or "The experts over training", "no observed steps in this frame")
    runs, experts = _runs_and_experts(traj)
    colors = _expert_colors(experts)
    n = len(runs)
    ncols = 1 if n == 1 else 2 if n in (2, 4) else 3
    nrows = -(-n // ncols)
    # The same range on every panel (and equal units: scaleanchor), so panels compare at a glance.
    values = traj[["PC1", "PC2"]].to_numpy(dtype=float)
    lo, hi = np.nanmin(values), np.nanmax(values)
    span = hi - lo if np.isfinite(hi - lo) and hi > lo else 2.0
    mid = (hi + lo) / 2 if np.isfinite(hi + lo) else 0.0
    half = span / 2 * 1.12
    rng = [mid - half, mid + half]
    x_title, y_title = _spread_title("PC1", attrs, 0), _spread_title("PC2", attrs, 1)
    top_px, row_px, gap_px, legend_px = 104 if n > 1 else 84, 360, 70, 64
    plot_px = nrows * row_px + (nrows - 1) * gap_px
    height = top_px + plot_px + legend_px + 56
    hgap = 0.1
    width = (1 - hgap * (ncols - 1)) / ncols
    layout: dict = dict(height=height, margin=dict(t=top_px, b=legend_px + 56),
                        legend=dict(orientation="h", x=0, y=-(56 + 8) / plot_px, yanchor="top",
                                    title=dict(text="colour: expert")))
    annotations = []
    for i, run in enumerate(runs):
        r, c = divmod(i, ncols)
        x0 = c * (width + hgap)
        y1 = 1 - r * (row_px + gap_px) / plot_px
        y0 = y1 - row_px / plot_px
        sx = str(i + 1) if i else ""
        layout[f"xaxis{sx}"] = dict(domain=[x0, x0 + width], anchor=f"y{sx}", range=list(rng), title=dict(text=x_title),
                                    zeroline=False)
        layout[f"yaxis{sx}"] = dict(domain=[max(y0, 0.0), min(y1, 1.0)], anchor=f"x{sx}", range=list(rng),
                                    scaleanchor=f"x{sx}", scaleratio=1, title=dict(text=y_title), zeroline=False)
        if n > 1:
            annotations.append(dict(text=escape(run), x=x0 + width / 2, y=min(y1, 1.0), xref="paper", yref="paper",
                                    xanchor="center", yanchor="bottom", yshift=6, showarrow=False,
                                    font=dict(size=14)))
    layout["annotations"] = annotations
    fig = figure(escape(title) if title else head, **layout)
    shares = [s for s in (attrs.get("explained") or [])[:2] if isinstance(s, (int, float)) and np.isfinite(s)]
    kept = f" ({_percent(sum(shares))} % of the spread)" if len(shares) == 2 else ""
    fig.layout.title.subtitle.text = f"each expert's path on PC1–PC2{kept} · lines that run together: collapsed experts"
    traces = []
    for i, run in enumerate(runs):
        sx = str(i + 1) if i else ""
        part = traj[traj["run"] == run]
        for e in experts:
            sub = part[part["expert"] == e].sort_values("step", kind="stable")
            symbols = ["circle-open"] + ["circle"] * (len(sub) - 1)
            traces.append(dict(
                type="scatter", x=sub["PC1"].tolist(), y=sub["PC2"].tolist(), mode="lines+markers",
                name=_expert_name(e), legendgroup=f"expert {e}", showlegend=i == 0, xaxis=f"x{sx}", yaxis=f"y{sx}",
                line=dict(color=colors[e], width=2), marker=dict(size=7, symbol=symbols, color=colors[e]),
                hovertext=[f"run: {escape(run)}<br>{_expert_name(e)}<br>step {escape(s)}<br>PC1 {fmt(a)}<br>PC2 {fmt(b)}"
                           for s, a, b in zip(sub["step"], sub["PC1"], sub["PC2"])], hoverinfo="text"))
    if step is not None:
        for i, now in enumerate(trajectory_now(traj, step, runs, experts)):
            sx = str(i + 1) if i else ""
            traces.append(dict(
                type="scatter", mode="markers", legendgroup="now", showlegend=i == 0, xaxis=f"x{sx}", yaxis=f"y{sx}",
                hoverinfo="text", **{**now, "marker": dict(size=15, line=dict(color="#222", width=2), **now["marker"])}))
    fig.add_traces(traces)
    return fig


__all__ = ["plot_spectra", "plot_rank_by_layer", "plot_expert_similarity", "plot_diagnosis", "plot_expert_trajectories",
           "RANK_TITLES", "SIMILARITY_TITLES"]
