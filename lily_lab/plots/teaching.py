"""Teaching views: how Lily shares its parts across layers, and what that costs against LoRA.

Inputs are ``sharing_layout(model)`` / ``sharing_layout_from_config(config, layers, d_in, d_out)``
(one row per site: group, site, index, layer, a_index, num_B) and ``parameter_budget(...)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._common import bank_label, escape, figure, fmt, layers, message_figure, pick, require
from .theme import ACCENT, NEUTRAL, expert_color

_TIERS = ("sites (layers)", "shared A projectors", "bank of B experts")


def plot_sharing_diagram(layout: pd.DataFrame, *, group: str | None = None, title: str | None = None) -> go.Figure:
    """Sites → ``A`` → ``B`` bank, one band per group (or only ``group``): each site is joined to
    the ``A`` it shares with its neighbours, and each ``A`` to every expert of the bank, which the
    site's router mixes. Five traces per group: two edge sets, sites, ``A``s, experts."""
    fn = "plot_sharing_diagram"
    require(layout, ["group", "site", "index", "a_index", "num_B"], fn,
            "lily_lab.sharing_layout(model) or sharing_layout_from_config(config, layers, d_in, d_out)")
    if layout.empty:
        return message_figure(title or "How Lily shares its parts", "no adapter sites in this layout")
    df = layout.assign(layer=layers(layout))
    groups = [group] if group is not None else list(dict.fromkeys(df["group"]))
    if group is not None:
        pick(df, "group", group, fn)
    fig = figure(escape(title) if title else "How Lily shares its parts: sites → A → bank of B experts",
                 height=140 + 250 * len(groups))
    tickvals, ticktext, traces, notes = [], [], [], []
    for g_i, g in enumerate(groups):
        sub = df[df["group"] == g].sort_values("index")
        y0 = -4.0 * g_i  # tiers: sites y0+2, A y0+1, B y0
        L, E = len(sub), int(sub["num_B"].iloc[0])
        r = sub["r"].iloc[0] if "r" in sub.columns else "r"
        d_in = sub["d_in"].iloc[0] if "d_in" in sub.columns else "d_in"
        d_out = sub["d_out"].iloc[0] if "d_out" in sub.columns else "d_out"
        xs = np.arange(L, dtype=float)
        a_ids = list(dict.fromkeys(sub["a_index"]))
        a_x = {a: float(xs[(sub["a_index"] == a).to_numpy()].mean()) for a in a_ids}
        b_x = np.linspace(0, L - 1, E) if E > 1 else np.array([(L - 1) / 2])
        show = g_i == 0  # one legend entry per role
        site_a = ([], [])
        for x, a in zip(xs, sub["a_index"]):
            site_a[0].extend([x, a_x[a], None])
            site_a[1].extend([y0 + 2, y0 + 1, None])
        a_b = ([], [])
        for a in a_ids:
            for bx in b_x:
                a_b[0].extend([a_x[a], bx, None])
                a_b[1].extend([y0 + 1, y0, None])
        traces.append(dict(type="scatter", x=site_a[0], y=site_a[1], mode="lines", line=dict(color=NEUTRAL, width=1.5),
                           name="site uses A", legendgroup="edges-a", showlegend=show, hoverinfo="skip"))
        traces.append(dict(type="scatter", x=a_b[0], y=a_b[1], mode="lines", line=dict(color="#c7c7c7", width=1),
                           name="router mixes the bank", legendgroup="edges-b", showlegend=show, hoverinfo="skip"))
        gname = escape(g)
        by_a = {a: ", ".join(f"layer {l}" for l in sub.loc[sub["a_index"] == a, "layer"]) for a in a_ids}
        traces.append(dict(
            type="scatter", x=xs.tolist(), y=[y0 + 2] * L, mode="markers+text", name="site (one router each)",
            legendgroup="sites",
            showlegend=show, marker=dict(size=16, color="white", line=dict(color=NEUTRAL, width=2)),
            text=[f"L{l}" for l in sub["layer"]], textposition="top center", hoverinfo="text",
            hovertext=[f"site: {escape(s)}<br>layer {l} · position {i} in group {gname}<br>uses A{a} "
                       f"(shared with {escape(by_a[a])})<br>its router ({E} × {r}) mixes the {E} expert(s) of the bank"
                       for s, l, i, a in zip(sub["site"], sub["layer"], sub["index"], sub["a_index"])]))
        traces.append(dict(
            type="scatter", x=[a_x[a] for a in a_ids], y=[y0 + 1] * len(a_ids), mode="markers+text", name="shared A",
            legendgroup="A", showlegend=show, marker=dict(size=22, symbol="square", color=ACCENT),
            text=[f"A{a}" for a in a_ids], textposition="middle right", hoverinfo="text",
            hovertext=[f"A{a} ({r} × {d_in}) of group {gname}<br>shared by: {escape(by_a[a])}" for a in a_ids]))
        traces.append(dict(
            type="scatter", x=b_x.tolist(), y=[y0] * E, mode="markers+text", name="B expert", legendgroup="B", showlegend=show,
            marker=dict(size=22, symbol="diamond", color=[expert_color(e) for e in range(E)]),
            text=[f"B{e}" for e in range(E)], textposition="bottom center", hoverinfo="text",
            hovertext=[f"expert B{e} ({r} × {d_out}) of bank {gname}<br>shared by all {L} sites of the group"
                       for e in range(E)]))
        notes.append(dict(x=-0.5, y=y0 + 2.75, xref="x", yref="y", xanchor="left", showarrow=False,
                          text=f"<b>{bank_label(g)}</b>: {L} site{'s' * (L != 1)}, {len(a_ids)} A, {E} expert{'s' * (E != 1)}"))
        tickvals += [y0 + 2, y0 + 1, y0]
        ticktext += list(_TIERS)
    # Everything in one go: five add_scatter calls and three axis updates took twice as long.
    fig.add_traces(traces)
    fig.update_layout(
        annotations=notes, legend=dict(orientation="h", y=-0.02, yanchor="top"),
        xaxis=dict(visible=False, range=[-1, max(df.groupby("group").size().max(), 2)]),
        yaxis=dict(tickmode="array", tickvals=tickvals, ticktext=ticktext, showgrid=False, zeroline=False,
                   title=dict(text="part of the adapter"),
                   range=[-4.0 * (len(groups) - 1) - 0.8, 3.1]))
    return fig


def plot_parameter_budget(budget: pd.DataFrame, *, log: bool = False, title: str | None = None) -> go.Figure:
    """Lily against LoRA over ``r``: left, trainable parameters of Lily and of LoRA at the same
    rank; right, the rank one site's update can reach — Lily's bound ``r`` and the rank of the
    LoRA with Lily's budget."""
    fn = "plot_parameter_budget"
    require(budget, ["r", "lily_params", "lora_params_same_r", "lora_equivalent_rank"], fn,
            "lily_lab.parameter_budget(d_in, d_out, layers, r_values, stride_A, num_B)")
    if budget.empty:
        return message_figure(title or "Parameter budget", "no ranks in this frame")
    df = budget.sort_values("r")
    r = df["r"].tolist()
    bound = df["lily_rank_bound"].tolist() if "lily_rank_bound" in df.columns else r
    head = "Lily vs LoRA"
    if {"layers", "d_in", "d_out", "stride_A", "num_B"} <= set(df.columns):
        row = {c: int(df[c].iloc[0]) for c in ("layers", "d_in", "d_out", "stride_A", "num_B", "groups") if c in df}
        head += (f": {row['layers']} site{'s' * (row['layers'] != 1)} of {row['d_out']}×{row['d_in']}, stride_A={row['stride_A']}, "
                 f"num_B={row['num_B']}" + (f", {row['groups']} groups" if row.get("groups", 1) > 1 else ""))
    # Two panels side by side, laid out by hand: make_subplots took 15 ms, most of a slider move
    # in BudgetCalculator.
    r_title = dict(text="r (Lily's rank)")
    # The legend below the panels: on the right it took a third of a half-screen pane from them.
    fig = figure(escape(title) if title else escape(head), height=460,
                 legend=dict(orientation="h", x=0, y=-0.2, yanchor="top"), margin=dict(b=120),
                 xaxis=dict(domain=[0, 0.44], anchor="y", title=r_title),
                 yaxis=dict(anchor="x", title=dict(text="trainable parameters"), type="log" if log else "linear"),
                 xaxis2=dict(domain=[0.56, 1], anchor="y2", title=r_title),
                 yaxis2=dict(anchor="x2", title=dict(text="rank"), rangemode="tozero"),
                 annotations=[dict(text=text, x=x, y=1.0, xref="paper", yref="paper", xanchor="center",
                                   yanchor="bottom", showarrow=False, font=dict(size=16))
                              for text, x in (("Trainable parameters", 0.22),
                                              ("Rank one site's update can reach", 0.78))])
    hover = [f"r = {ri}<br>Lily: {int(a):,} parameters<br>LoRA of rank {ri}: {int(b):,}<br>Lily / LoRA: {fmt(a / b)}"
             f"<br>LoRA with Lily's budget: rank {int(c)}"
             for ri, a, b, c in zip(r, df["lily_params"], df["lora_params_same_r"], df["lora_equivalent_rank"])]
    style = dict(mode="lines+markers", hovertext=hover, hoverinfo="text", type="scatter")
    lora_line = dict(color=expert_color(1), dash="dash")
    fig.add_traces([
        dict(x=r, y=df["lily_params"].tolist(), name="Lily", line=dict(color=ACCENT), **style),
        dict(x=r, y=df["lora_params_same_r"].tolist(), name="LoRA, same r", line=lora_line, **style),
        dict(x=r, y=bound, name="Lily: rank ≤ r per site", line=dict(color=ACCENT), xaxis="x2", yaxis="y2", **style),
        dict(x=r, y=df["lora_equivalent_rank"].tolist(), name="LoRA with Lily's budget: its rank", line=lora_line,
             xaxis="x2", yaxis="y2", **style),
    ])
    return fig


__all__ = ["plot_sharing_diagram", "plot_parameter_budget"]
