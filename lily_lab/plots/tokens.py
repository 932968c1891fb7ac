"""Token views: router distributions per token, the tokens each expert prefers, and a sequence's
text tinted by the expert each token chose.

Inputs are ``Routing.token_table(tokenizer)`` (site, sequence, position, token_id, token, label,
``p0 … p{E-1}``, top_expert) and ``top_tokens``. Token and label text is escaped everywhere.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._common import escape, figure, fmt, layers, modules, pick, prob_columns, require, site_label
from .theme import TEMPLATE, expert_color

TOKEN_TABLE = "Routing.token_table(tokenizer)"


def _require_probs(frame: pd.DataFrame, fn: str) -> list[str]:
    cols = prob_columns(frame)
    if not cols:
        raise ValueError(f"{fn} needs columns ['p0', …, 'p{{E-1}}'] (one router probability per expert) that the "
                         f"frame lacks; it has {list(frame.columns)} — pass the frame from {TOKEN_TABLE}")
    return cols


def _token_text(frame: pd.DataFrame) -> list[str]:
    """Each row's token as raw text: the ``token`` column, else ``#<token_id>``, else ``?``."""
    tok = frame["token"] if "token" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    ids = frame["token_id"] if "token_id" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    return [str(t) if t is not None and t == t else (f"#{int(i)}" if i is not None and i == i and i >= 0 else "?")
            for t, i in zip(tok, ids)]


def _where(part: pd.DataFrame) -> str:
    part = part.assign(layer=layers(part))
    return site_label(modules(part).iloc[0], part["layer"].iloc[0])


def plot_token_probs(tokens: pd.DataFrame, site: str, *, kind: str = "box", title: str | None = None) -> go.Figure:
    """The distribution over sampled tokens of each expert's router probability at one site: one
    box (``kind="box"``) or violin (``kind="violin"``) per expert; hover on a point names its token."""
    fn = "plot_token_probs"
    require(tokens, ["site"], fn, TOKEN_TABLE)
    _require_probs(tokens, fn)
    if kind not in ("box", "violin"):
        raise ValueError(f"{fn}: kind must be 'box' or 'violin', got {kind!r}")
    part = pick(tokens, "site", site, fn)
    cols = [c for c in prob_columns(part) if part[c].notna().any()]  # a concatenated table pads small banks
    where = _where(part)
    text = [escape(t) for t in _token_text(part)]
    extra = [f"<br>label {escape(l)}" if l is not None and l == l else "" for l in
             (part["label"] if "label" in part.columns else [None] * len(part))]
    pos = part["position"].tolist() if "position" in part.columns else [""] * len(part)
    traces = []
    for c in cols:
        e = int(c[1:])
        hover = [f"token {t} · position {p}{x}<br>{where}<br>expert {e}: p = {fmt(v)}"
                 for t, p, x, v in zip(text, pos, extra, part[c])]
        common = dict(y=part[c].tolist(), name=f"expert {e}", marker=dict(color=expert_color(e)), hovertext=hover,
                      hoverinfo="y+text")
        if kind == "box":
            traces.append(dict(type="box", boxpoints="outliers", boxmean=True, **common))
        else:
            traces.append(dict(type="violin", points="outliers", box=dict(visible=True),
                               meanline=dict(visible=True), **common))
    # Traces and axes at construction: one validation pass instead of one per add and update.
    fig = figure(escape(title) if title else f"Router probability per token at {where} ({len(part):,} sampled tokens)",
                 showlegend=False, xaxis=dict(title=dict(text="expert")),
                 yaxis=dict(title=dict(text="router probability p(expert | token)"), range=[0, 1.02]))
    fig.add_traces(traces)
    return fig


def plot_top_tokens(top: pd.DataFrame, site: str, *, k: int | None = None, columns: int = 4,
                    title: str | None = None) -> go.Figure:
    """One small bar panel per expert: the tokens that give it the highest mean probability at
    ``site`` (from ``lily_lab.top_tokens``), best at the top; ``k`` keeps only the first ``k``."""
    fn = "plot_top_tokens"
    require(top, ["site", "expert", "rank", "usage"], fn, "lily_lab.top_tokens(routing, tokenizer=…)")
    if "token" not in top.columns and "token_id" not in top.columns:
        raise ValueError(f"{fn} needs a 'token' or 'token_id' column; the frame has {list(top.columns)}")
    part = pick(top, "site", site, fn)
    where = _where(part)
    experts = sorted(part["expert"].unique().tolist())
    ncols = max(1, min(len(experts), int(columns)))
    nrows = math.ceil(len(experts) / ncols)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=[f"expert {e}" for e in experts],
                        horizontal_spacing=0.12, vertical_spacing=0.12 if nrows > 1 else 0.1)
    for i, e in enumerate(experts):
        row, col = i // ncols + 1, i % ncols + 1
        sub = part[part["expert"] == e].sort_values("rank")
        if k is not None:
            sub = sub.head(int(k))
        text = [escape(t) for t in _token_text(sub)]
        counts = sub["n_tokens"].tolist() if "n_tokens" in sub.columns else [None] * len(sub)
        fig.add_bar(x=sub["usage"].tolist(), y=sub["rank"].tolist(), orientation="h", name=f"expert {e}",
                    marker_color=expert_color(e), showlegend=False, hoverinfo="text",
                    hovertext=[f"token {t}<br>{where}<br>expert {e}: mean p = {fmt(u)}"
                               + (f"<br>seen {int(c):,} times" if c is not None else "")
                               for t, u, c in zip(text, sub["usage"], counts)], row=row, col=col)
        fig.update_yaxes(tickmode="array", tickvals=sub["rank"].tolist(), ticktext=text, autorange="reversed",
                         row=row, col=col)
        fig.update_xaxes(title_text="mean probability", range=[0, 1], row=row, col=col)
    fig.update_layout(template=TEMPLATE, height=max(280, 60 + 260 * nrows),
                      title=dict(text=escape(title) if title else f"Top tokens per expert at {where}"))
    return fig


def plot_token_text(tokens: pd.DataFrame, site: str, sequence: int, *, width: int = 60,
                    title: str | None = None) -> go.Figure:
    """The sampled tokens of one sequence in order, each tinted by its top expert (stronger colour:
    a more decisive router); hover shows the token's whole distribution. ``width``: characters per
    line. One bar trace per expert, so the legend maps colours to experts."""
    fn = "plot_token_text"
    require(tokens, ["site", "sequence", "position", "top_expert"], fn, TOKEN_TABLE)
    _require_probs(tokens, fn)
    part = pick(tokens, "site", site, fn)
    part = pick(part, "sequence", sequence, fn).sort_values("position")
    cols = [c for c in prob_columns(part) if part[c].notna().any()]
    E = len(cols)
    probs = part[cols].to_numpy(dtype=float)  # (n, E)
    where = _where(part)
    raw = _token_text(part)
    # Lay the tokens out like text: x in characters, one y per line.
    starts, lines, x, line = [], [], 0, 0
    for tok in raw:
        w = max(len(tok), 1)
        if x > 0 and x + w > width:
            x, line = 0, line + 1
        starts.append(x)
        lines.append(line)
        x += w + 1
    positions = part["position"].to_numpy()
    gaps = len(positions) and (positions.max() - positions.min() + 1) > len(positions)
    label = part["label"].iloc[0] if "label" in part.columns and len(part) else None
    head = f"Sequence {escape(sequence)} at {where}"
    head += f" — label {escape(label)}" if label is not None and label == label else ""
    head += " (some tokens were not sampled)" if gaps else ""
    fig = figure(escape(title) if title else head, barmode="overlay", height=140 + 36 * (max(lines, default=0) + 1),
                 bargap=0.15, uniformtext=dict(minsize=10, mode="show"))
    top = part["top_expert"].to_numpy()
    for e in range(E):
        idx = np.flatnonzero(top == e)
        strength = (probs[idx, e] - 1 / E) / (1 - 1 / E) if E > 1 else np.ones(len(idx))
        hover = []
        for i in idx:
            dist = "<br>".join(f"{'▶ ' if j == e else '  '}expert {j}: {fmt(probs[i, j])}" for j in range(E))
            hover.append(f"token {escape(raw[i])} · position {positions[i]}<br>{where}<br>{dist}")
        opacity = (0.3 + 0.7 * np.clip(strength, 0, 1)).tolist()  # a more decisive router, a stronger tint
        fig.add_bar(x=[max(len(raw[i]), 1) for i in idx], base=[starts[i] - 0.5 for i in idx], y=[lines[i] for i in idx],
                    orientation="h", name=f"expert {e}", marker=dict(color=expert_color(e), opacity=opacity, line_width=0),
                    text=[escape(raw[i]) for i in idx], textposition="inside", insidetextanchor="middle",
                    constraintext="none", textfont=dict(family="Menlo, Consolas, monospace", size=13, color="#111"),
                    hovertext=hover, hoverinfo="text", width=0.8)
    fig.update_xaxes(visible=False, range=[-1, width + 1])
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(legend=dict(orientation="h", y=-0.05, title_text="top expert"))
    return fig


__all__ = ["plot_token_probs", "plot_top_tokens", "plot_token_text"]
