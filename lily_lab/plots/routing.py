"""Router views: how much each expert is used, where, for which label, and over training.

Inputs are the frames of ``Routing.usage()``, ``specialization``, ``expert_layer_profile``,
``expert_load`` (the dispatch of mixture-of-experts layers) and ``timeline_metrics``; every text from the data is escaped (see ``_common.escape``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..core.errors import InputError
from ._common import bank_label, escape, figure, first, fmt, layers, message_figure, modules, pick, require, site_label
from .theme import NEUTRAL, SEVERITY_COLORS, expert_color, usage_colorscale

#: Axis titles for the router metrics (docs/metrics.md), in words a user reads without the paper.
METRIC_TITLES = {
    "load_entropy": "load entropy (1 balanced, 0 one expert)",
    "token_entropy": "token entropy (mean per-token, 0 decisive)",
    "routing_mi": "routing MI (0: router ignores its input)",
    "effective_experts": "effective experts exp H(u)",
    "max_usage": "max usage (share of the busiest expert)",
    "cv2": "cv² of usage (0 balanced)",
    "switch_balance": "switch balance (1 balanced, E collapsed)",
    "z_loss": "router z-loss",
}


def _fair_line(fig: go.Figure, E: int) -> None:
    fig.add_hline(y=1 / E, line=dict(dash="dash", color=NEUTRAL, width=1),
                  annotation_text=f"fair share 1/E = {1 / E:.3f}", annotation_position="top left",
                  annotation_font_color=NEUTRAL)


def plot_usage_heatmap(usage: pd.DataFrame, *, highlight: list[str] | None = None,
                       title: str | None = None) -> go.Figure:
    """Sites × experts heatmap of ``Routing.usage()``: rows ordered by module then position in the
    group, a line between modules; white is the fair share ``1/E``, red an expert used more.
    ``highlight``: site names or group keys (a finding's ``sites``) whose rows are outlined."""
    fn = "plot_usage_heatmap"
    require(usage, ["site", "module", "index", "expert", "usage"], fn, "Routing.usage()")
    if usage.empty:
        return message_figure(title or "Expert usage", "no routed sites in this recording")
    df = usage.assign(layer=layers(usage))
    order = ["module"] + (["group"] if "group" in df.columns else []) + ["index"]
    sites = df.drop_duplicates("site").sort_values(order, kind="stable")
    experts = sorted(df["expert"].unique().tolist())
    z = df.groupby(["site", "expert"])["usage"].mean().unstack().reindex(index=sites["site"], columns=experts)
    n = df.groupby("site")["n_tokens"].first() if "n_tokens" in df.columns else None
    E = len(experts)
    y = [escape(s) for s in sites["site"]]
    labels = [site_label(m, l) for m, l in zip(sites["module"], sites["layer"])]
    hover = [[f"site: {y[i]}<br>{labels[i]}<br>expert {e}<br>usage {fmt(z.iat[i, j])} (fair share {1 / E:.3f})"
              + (f"<br>tokens {int(n[site]):,}" if n is not None else "")
              for j, e in enumerate(experts)] for i, site in enumerate(sites["site"])]
    fig = figure(escape(title) if title else f"Expert usage per site ({len(y)} sites × {E} experts)",
                 height=max(260, 120 + 24 * len(y)))
    fig.add_heatmap(z=z.to_numpy(), x=experts, y=y, zmin=0, zmax=1, colorscale=usage_colorscale(E),
                    hovertext=hover, hoverinfo="text", xgap=1, ygap=1,
                    colorbar=dict(title=dict(text="usage<br>(white: 1/E)")))
    fig.update_xaxes(title_text="expert", tickmode="array", tickvals=experts, side="bottom")
    fig.update_yaxes(title_text="site (module · layer)", tickmode="array", tickvals=y, ticktext=labels,
                     autorange="reversed", type="category")
    marked = set(highlight or ())
    for i, (site, group) in enumerate(zip(sites["site"], sites["group"] if "group" in sites else sites["site"])):
        if site in marked or group in marked:
            fig.add_shape(type="rect", xref="paper", x0=0, x1=1, yref="y", y0=i - 0.5, y1=i + 0.5,
                          line=dict(color=SEVERITY_COLORS["critical"], width=3))
    modules = sites["module"].tolist()
    for i in range(1, len(modules)):  # a rule between modules: categories sit at 0, 1, …
        if modules[i] != modules[i - 1]:
            fig.add_shape(type="line", xref="paper", x0=0, x1=1, yref="y", y0=i - 0.5, y1=i - 0.5,
                          line=dict(color="#222", width=2))
    return fig


def plot_expert_load(load: pd.DataFrame, *, highlight: list[str] | None = None,
                     title: str | None = None) -> go.Figure:
    """The dispatch of mixture-of-experts layers (``expert_load(routing)``): a layer × expert
    heatmap of each expert's share of the tokens the layer actually sent (``share``, adding up to
    1 per layer; white is the fair share ``1/E``, red an expert sent more, blue less) and, beside
    it, each layer's auxiliary load-balancing loss (``E · Σ_e (tokens_e / N) · usage_e``, ``top_k``
    when balanced: dashed) with its fewest and most tokens per expert. One row per router; a layer
    whose router collapsed shows as one red cell, however healthy the average over layers.
    ``highlight``: site names (a finding's ``sites``) whose rows are outlined."""
    fn = "plot_expert_load"
    require(load, ["site", "expert", "tokens", "share"], fn, "lily_lab.expert_load(routing)")
    if load.empty:
        return message_figure(title or "Tokens sent to each expert", "no top-k router in this recording")
    df = load.assign(layer=layers(load), module=modules(load))
    order = [c for c in ("module", "index") if c in df.columns]
    sites = df.drop_duplicates("site")
    sites = sites.sort_values(order, kind="stable") if order else sites
    experts = sorted(df["expert"].unique().tolist())
    E = len(experts)
    share = df.groupby(["site", "expert"])["share"].sum().unstack().reindex(index=sites["site"], columns=experts)
    tokens = df.groupby(["site", "expert"])["tokens"].sum().unstack().reindex(index=sites["site"], columns=experts)
    y = [escape(s) for s in sites["site"]]
    ticks = [site_label(m, l) for m, l in zip(sites["module"], sites["layer"])]
    n = sites.set_index("site")["n_tokens"] if "n_tokens" in sites.columns else None
    k = sites.set_index("site")["top_k"] if "top_k" in sites.columns else None
    usage = (df.groupby(["site", "expert"])["usage"].sum().unstack().reindex(index=sites["site"], columns=experts)
             if "usage" in df.columns else None)
    hover = []
    for i, site in enumerate(sites["site"]):
        row = []
        for j, e in enumerate(experts):
            c = tokens.iat[i, j]
            text = (f"{ticks[i]} ({y[i]})<br>expert {e}: {fmt(share.iat[i, j])} of the layer's dispatch "
                    f"(fair share 1/E = {1 / E:.3f})")
            if n is not None and n[site]:
                text += f"<br>sent {int(c):,} of {int(n[site]):,} tokens ({c / n[site]:.0%})"
            if k is not None:
                text += f", top-{int(k[site])}"
            if usage is not None:
                text += f"<br>mean router probability {fmt(usage.iat[i, j])}"
            row.append(text)
        hover.append(row)
    both = n is not None and k is not None and usage is not None
    head = (f"Tokens sent to each expert, per layer ({len(y)} router{'s' * (len(y) != 1)} × {E} experts"
            + (f", top-{int(k.iloc[0])}" if k is not None and k.nunique() == 1 else "") + ")")
    if title is None and both:
        head += ("<br><sup>red: an expert sent every token · bars: each layer's aux loss (dashed: balanced), "
                 "labelled with the fewest–most tokens an expert was sent</sup>")
    fig = figure(escape(title) if title else head, height=max(320, 160 + 26 * len(y)),
                 xaxis=dict(title=dict(text="expert"), tickmode="array", tickvals=experts,
                            domain=[0, 0.62] if both else [0, 1]),
                 yaxis=dict(title=dict(text="layer (router)"), tickmode="array", tickvals=y, ticktext=ticks,
                            autorange="reversed", type="category"))
    # Red at 1/top_k, the most an expert can be sent (every token); white at the fair share 1/E.
    zmax = 1 / int(k.min()) if k is not None and k.min() >= 1 else 1.0
    zmax = max(zmax, float(np.nanmax(share.to_numpy())))
    fig.add_heatmap(z=share.to_numpy(), x=experts, y=y, zmin=0, zmax=zmax, colorscale=_dispatch_colorscale(E, zmax),
                    hovertext=hover, hoverinfo="text", xgap=1, ygap=1, name="share",
                    colorbar=dict(title=dict(text="share sent (white: 1/E)", side="right"),
                                  x=0.64 if both else 1.02, len=1, thickness=14))
    if both:
        N = n.reindex(sites["site"]).to_numpy(dtype=float)
        frac = tokens.to_numpy(dtype=float) / np.where(N > 0, N, np.nan)[:, None]
        aux = E * np.nansum(frac * usage.to_numpy(dtype=float), axis=1)
        lo, hi = tokens.min(axis=1).to_numpy(), tokens.max(axis=1).to_numpy()
        fig.add_bar(x=aux.tolist(), y=y, orientation="h", xaxis="x2", yaxis="y", name="aux loss",
                    marker=dict(color=NEUTRAL), text=[f"{int(a):,}–{int(b):,}" for a, b in zip(lo, hi)],
                    textposition="auto", showlegend=False,
                    hovertext=[f"{ticks[i]}<br>aux loss {fmt(aux[i])} (balanced: {int(k[site])})<br>tokens per expert: "
                               f"fewest {int(lo[i]):,}, most {int(hi[i]):,}" for i, site in enumerate(sites["site"])],
                    hoverinfo="text")
        fig.update_layout(xaxis2=dict(domain=[0.78, 1], anchor="y", rangemode="tozero",
                                      title=dict(text="aux loss")))
        if k.nunique() == 1:
            fig.add_vline(x=float(k.iloc[0]), xref="x2", line=dict(dash="dash", color=SEVERITY_COLORS["ok"], width=1))
    marked = set(highlight or ())
    for i, site in enumerate(sites["site"]):
        if site in marked:
            fig.add_shape(type="rect", xref="x domain", x0=0, x1=1, yref="y", y0=i - 0.5, y1=i + 0.5,
                          line=dict(color=SEVERITY_COLORS["critical"], width=3))
    return fig


def _dispatch_colorscale(E: int, zmax: float) -> list[list]:
    """Blue below the fair share ``1/E``, white at it, red above, on ``[0, zmax]``."""
    mid = (1 / max(E, 1)) / zmax
    if mid >= 0.99:
        return [[0.0, "#2166ac"], [1.0, "#f7f7f7"]]
    return [[0.0, "#2166ac"], [mid / 2, "#92c5de"], [mid, "#f7f7f7"], [(1 + mid) / 2, "#f4a582"], [1.0, "#b2182b"]]


def plot_usage_bars(usage: pd.DataFrame, site: str, *, title: str | None = None) -> go.Figure:
    """One site's expert usage as bars, with the fair share ``1/E`` dashed."""
    fn = "plot_usage_bars"
    require(usage, ["site", "expert", "usage"], fn, "Routing.usage()")
    part = pick(usage, "site", site, fn).sort_values("expert")
    part = part.assign(layer=layers(part))
    label = site_label(modules(part).iloc[0], part["layer"].iloc[0])
    experts = part["expert"].tolist()
    tokens = f"<br>tokens {int(part['n_tokens'].iloc[0]):,}" if "n_tokens" in part.columns else ""
    # Traces and axes go in at construction: add_bar and update_*axes afterwards took twice as long.
    fig = figure(escape(title) if title else f"Expert usage at {label}",
                 xaxis=dict(title=dict(text="expert"), tickmode="array", tickvals=experts),
                 yaxis=dict(title=dict(text="usage (mean router probability)"), rangemode="tozero"))
    fig.add_traces([dict(
        type="bar", x=experts, y=part["usage"].tolist(), name="usage",
        marker=dict(color=[expert_color(e) for e in experts]),
        hovertext=[f"site: {escape(site)}<br>{label}<br>expert {e}<br>usage {fmt(u)}{tokens}"
                   for e, u in zip(experts, part["usage"])], hoverinfo="text")])
    _fair_line(fig, len(experts))
    return fig


def plot_label_usage(spec: pd.DataFrame, site: str | None = None, *, title: str | None = None) -> go.Figure:
    """Usage of each expert for each label at one site (default: the frame's first): grouped bars
    label × expert. The title gives the site's normalised MI and JS divergence between labels."""
    fn = "plot_label_usage"
    require(spec, ["site", "value", "expert", "usage"], fn, "lily_lab.specialization(routing, by='label')")
    if spec.empty:
        raise InputError(f"{fn}: the frame is empty; record with labels (recorder.annotate(labels=…))")
    site = first(spec, "site", site)
    part = pick(spec, "site", site, fn)
    part = part.assign(layer=layers(part))
    label = site_label(modules(part).iloc[0], part["layer"].iloc[0])
    values = list(dict.fromkeys(part["value"].tolist()))
    x = [escape(v) for v in values]
    experts = sorted(part["expert"].unique().tolist())
    scores = []
    for col, name in (("normalized_mi", "normalised MI"), ("js_divergence", "JS")):
        if col in part.columns:
            scores.append(f"{name} {fmt(part[col].iloc[0])}")
    head = f"Expert usage by label at {label}" + (f" — {', '.join(scores)}" if scores else "")
    traces = []
    for e in experts:
        sub = part[part["expert"] == e].drop_duplicates("value").set_index("value").reindex(values)
        counts = sub["n_tokens"].tolist() if "n_tokens" in sub.columns else [None] * len(values)
        traces.append(dict(
            type="bar", x=x, y=sub["usage"].tolist(), name=f"expert {e}", marker=dict(color=expert_color(e)),
            hovertext=[f"site: {escape(site)}<br>{label}<br>label {xv}<br>expert {e}: usage {fmt(u)}"
                       + (f"<br>tokens {int(c):,}" if c is not None and c == c else "")
                       for xv, u, c in zip(x, sub["usage"], counts)], hoverinfo="text"))
    fig = figure(escape(title) if title else head, barmode="group", legend=dict(title=dict(text="expert")),
                 xaxis=dict(title=dict(text="label"), type="category"),
                 yaxis=dict(title=dict(text="usage (mean router probability)"), rangemode="tozero"))
    fig.add_traces(traces)
    _fair_line(fig, len(experts))
    return fig


def plot_expert_profile(profile: pd.DataFrame, group: str | None = None, *, value: str = "usage",
                        title: str | None = None) -> go.Figure:
    """Lily's cross-layer view: each expert of one bank (default: the first group), its usage at
    every layer of the group. The legend gives each expert's layer entropy (1: serves all layers
    alike, 0: serves one layer). ``value="share"`` plots each expert's share across layers instead."""
    fn = "plot_expert_profile"
    require(profile, ["group", "expert", "site", "index", value], fn, "lily_lab.expert_layer_profile(routing)")
    if profile.empty:
        return message_figure(title or "Experts across layers", "no routed group with recorded tokens")
    group = first(profile, "group", group)
    part = pick(profile, "group", group, fn)
    part = part.assign(layer=layers(part))
    by_layer = part.drop_duplicates("site")["layer"]
    x_col, x_title = ("layer", "layer") if by_layer.is_unique and by_layer.notna().all() else ("index", "position in group")
    fig = figure(escape(title) if title else f"{bank_label(group)}: each expert across its group's layers")
    for e in sorted(part["expert"].unique().tolist()):
        sub = part[part["expert"] == e].sort_values("index")
        H = sub["layer_entropy"].iloc[0] if "layer_entropy" in sub.columns else np.nan
        module = modules(sub).iloc[0]
        hover = [f"site: {escape(row['site'])}<br>{site_label(module, row['layer'])}<br>expert {e}: "
                 + ", ".join(f"{escape(c)} {fmt(row[c])}" for c in dict.fromkeys(("usage", "share", value)) if c in row)
                 + f"<br>layer entropy of expert {e}: {fmt(H)}" for _, row in sub.iterrows()]
        fig.add_scatter(x=sub[x_col].tolist(), y=sub[value].tolist(), mode="lines+markers",
                        name=f"expert {e} · layer entropy {fmt(H, 2)}", line=dict(color=expert_color(e), width=2),
                        marker=dict(size=8), hovertext=hover, hoverinfo="text")
    fig.update_xaxes(title_text=x_title, tickmode="array", tickvals=sorted(part[x_col].unique().tolist()))
    fig.update_yaxes(title_text="usage (mean router probability)" if value == "usage"
                     else "share of the expert's usage over the group's layers" if value == "share" else escape(value),
                     rangemode="tozero")
    return fig


def plot_metric_timeline(timeline: pd.DataFrame, metric: str = "routing_mi", sites: list[str] | str | None = None,
                         *, step: int | None = None, title: str | None = None) -> go.Figure:
    """One router metric over training steps, one line per site (``sites``: a subset by name);
    ``step`` marks one step with a dashed vertical line (a player's current step)."""
    fn = "plot_metric_timeline"
    require(timeline, ["step", "site", "metric", "value"], fn, "lily_lab.timeline_metrics(timeline)")
    what = METRIC_TITLES.get(metric, escape(metric))
    if timeline.empty:
        return message_figure(title or f"{metric} over training", "no steps recorded in this timeline yet")
    part = pick(timeline, "metric", metric, fn)
    if sites is not None:
        sites = [sites] if isinstance(sites, str) else list(sites)
        unknown = [s for s in sites if s not in set(part["site"])]
        if unknown:
            raise InputError(f"{fn}: sites {unknown} are not in the timeline; it has {list(dict.fromkeys(part['site']))}")
        part = part[part["site"].isin(sites)]
    part = part.assign(layer=layers(part), module=modules(part))
    order = [c for c in ("module", "index") if c in part.columns]
    names = part.drop_duplicates("site").sort_values(order, kind="stable") if order else part.drop_duplicates("site")
    fig = figure(escape(title) if title else f"{what} over training")
    for i, row in enumerate(names.itertuples(index=False)):
        sub = part[part["site"] == row.site].sort_values("step")
        label = site_label(row.module, row.layer)
        fig.add_scatter(x=sub["step"].tolist(), y=sub["value"].tolist(), mode="lines+markers", name=label,
                        hovertext=[f"site: {escape(row.site)}<br>{label}<br>step {s}<br>{escape(metric)} {fmt(v)}"
                                   for s, v in zip(sub["step"], sub["value"])], hoverinfo="text")
    if step is not None:
        fig.add_vline(x=step, line=dict(color=NEUTRAL, dash="dash", width=1))
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text=what)
    return fig


_MODE_COLORS = {"batch": "#4d4d4d", "sequence": "#8c6bb1", "token": "#41ab5d"}


def plot_mixture_modes(modes: pd.DataFrame, site: str, *, title: str | None = None) -> go.Figure:
    """The mixtures each routing mode would apply at one site (``mixture_modes(routing)``): per
    expert, one box per mode of the weights over calls (batch), sequences (sequence) or tokens
    (token). A narrow batch box next to a wide token box: batch routing averages the router's
    per-token choices away."""
    fn = "plot_mixture_modes"
    require(modes, ["site", "mode", "expert", "weight"], fn, "lily_lab.analysis.mixture_modes(routing)")
    part = pick(modes, "site", site, fn)
    part = part.assign(layer=layers(part))
    module = modules(part).iloc[0]
    where = site_label(module, part["layer"].iloc[0])
    traces = []
    for mode in dict.fromkeys(part["mode"]):
        sub = part[part["mode"] == mode]
        n = sub["item"].nunique() if "item" in sub.columns else len(sub)
        traces.append(dict(
            type="box", x=[f"expert {e}" for e in sub["expert"]], y=sub["weight"].tolist(),
            name=f"{escape(mode)} ({n})", marker=dict(color=_MODE_COLORS.get(mode, NEUTRAL)), boxpoints=False,
            hovertext=[f"site: {escape(site)}<br>{escape(mode)} routing<br>expert {e}: weight {fmt(w)}"
                       for e, w in zip(sub["expert"], sub["weight"])], hoverinfo="y+text"))
    fig = figure(escape(title) if title else f"Mixture applied by each routing mode at {where}", boxmode="group",
                 legend=dict(title=dict(text="routing mode (mixtures)")), xaxis=dict(title=dict(text="expert")),
                 yaxis=dict(title=dict(text="mixture weight π_e"), range=[0, 1.02]))
    fig.add_traces(traces)
    return fig


__all__ = ["plot_usage_heatmap", "plot_expert_load", "plot_usage_bars", "plot_label_usage", "plot_expert_profile", "plot_metric_timeline",
           "plot_mixture_modes", "METRIC_TITLES"]
