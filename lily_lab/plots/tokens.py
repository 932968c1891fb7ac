"""Token views: router distributions per token, the tokens each expert prefers, and a sequence's
text tinted by the expert each token chose.

Inputs are ``Routing.token_table(tokenizer)`` (site, sequence, position, token_id, token, label,
``p0 … p{E-1}``, top_expert) and ``top_tokens``. Token and label text is escaped everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..core.errors import InputError, check_positive_int
from ._common import escape, figure, fmt, layers, modules, pick, prob_columns, require, site_label
from .theme import TEMPLATE, expert_color

TOKEN_TABLE = "Routing.token_table(tokenizer)"


def _require_probs(frame: pd.DataFrame, fn: str) -> list[str]:
    cols = prob_columns(frame)
    if not cols:
        raise InputError(f"{fn} needs columns ['p0', …, 'p{{E-1}}'] (one router probability per expert) that the "
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
        raise InputError(f"{fn}: kind must be 'box' or 'violin', got {kind!r}")
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
        common = dict(y=part[c].tolist(), x0=e, name=f"expert {e}", marker=dict(color=expert_color(e)), hovertext=hover,
                      hoverinfo="y+text")
        if kind == "box":
            traces.append(dict(type="box", boxpoints="outliers", boxmean=True, **common))
        else:
            traces.append(dict(type="violin", points="outliers", box=dict(visible=True),
                               meanline=dict(visible=True), **common))
    # Traces and axes at construction: one validation pass instead of one per add and update.
    fig = figure(escape(title) if title else f"Router probability per token at {where} ({len(part):,} sampled tokens)",
                 showlegend=False,  # one box per expert at x = its index: ticks at the experts only (no "0.5")
                 xaxis=dict(title=dict(text="expert"), tickmode="array", tickvals=[int(c[1:]) for c in cols]),
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
        raise InputError(f"{fn} needs a 'token' or 'token_id' column; the frame has {list(top.columns)}")
    columns = check_positive_int(columns, "columns", where=fn)
    k = check_positive_int(k, "k", where=fn, none_ok=True)
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
    line. One bar trace per expert, so the legend maps colours to experts.

    The colours are the router's per-token distribution ``p_t``. Under batch or sequence routing the
    layer does not apply ``p_t`` (every token of the call or sequence gets one mean mixture): the
    view then shows which expert the router would prefer for each token, not where it sent it."""
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
    head = f"Each token's top expert at {where} · sequence {escape(sequence)}"
    head += f" — label {escape(label)}" if label is not None and label == label else ""
    head += " (some tokens were not sampled)" if gaps else ""
    n_lines = max(lines, default=0) + 1
    # A fixed pixel budget per line of text and fixed margins: a one-line typed sentence gets a
    # readable 40 px row, never the strip left over by automatic margins.
    fig = figure(escape(title) if title else head, barmode="overlay", height=max(230, 150 + 40 * n_lines),
                 margin=dict(l=20, r=20, t=70, b=80), bargap=0.15, uniformtext=dict(minsize=10, mode="show"))
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
    fig.update_yaxes(visible=False, range=[n_lines - 0.5, -0.5], fixedrange=True)
    fig.update_layout(legend=dict(orientation="h", x=0, y=0, yanchor="top",
                                  title_text="top expert (paler: less decisive router)"))
    return fig


#: Pixels per site row and between row blocks of ``plot_token_routes``.
ROUTE_ROW_PX, ROUTE_GAP_PX = 28, 72


def _tint(color: str, amount: float) -> str:
    """``color`` (``#rrggbb``) mixed with white: ``amount`` 1 is the colour, 0 is white."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    mix = [round(255 + (c - 255) * amount) for c in (r, g, b)]
    return f"rgb({mix[0]},{mix[1]},{mix[2]})"


#: Width the automatic ``wrap`` of ``plot_token_routes`` plans for: the plot area of a figure in a
#: 1280 px window (the report's column), and the width of one tick-label character.
ROUTE_PLOT_WIDTH_PX, ROUTE_CHAR_PX, ROUTE_TICK_CHARS = 1050, 6.5, 8


def _tick(token: str, limit: int = ROUTE_TICK_CHARS) -> str:
    """A token as an x tick label: escaped, long ones cut (the hover has them whole)."""
    return escape(token if len(token) <= limit else token[: limit - 1] + "…")


def _ordered_sites(tokens: pd.DataFrame) -> pd.DataFrame:
    """One row per site (site, module, layer), ordered by module, then group, then layer."""
    sites = tokens.drop_duplicates("site")
    sites = pd.DataFrame({"site": sites["site"].tolist(), "module": modules(sites).tolist(),
                          "group": (sites["group"] if "group" in sites.columns else sites["site"]).tolist(),
                          "layer": layers(sites).tolist(),
                          "index": (sites["index"].tolist() if "index" in sites.columns else list(range(len(sites))))})
    key = sites.assign(_layer=[l if isinstance(l, (int, np.integer)) else -1 for l in sites["layer"]],
                       _module=sites["module"].map(str), _group=sites["group"].map(str))
    return sites.loc[key.sort_values(["_module", "_group", "_layer", "index"], kind="stable").index].reset_index(drop=True)


def _bank_runs(n_exp: np.ndarray, E: int) -> list[tuple[int, int, int]]:
    """The site rows as runs ``(first, stop, E)`` of consecutive rows whose banks have the same
    number of experts (``n_exp``: experts per cell); a row with no sampled token joins the run
    before it."""
    runs: list[list[int]] = []
    for i, row in enumerate(n_exp):
        k = int(row.max(initial=0)) or (runs[-1][2] if runs else E)
        if runs and runs[-1][2] == k:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1, k])
    return [tuple(r) for r in runs]


def _route_hover(expert: int, n_experts: int) -> str:
    """The hover of an ``expert``'s cells in ``plot_token_routes``: the token (its column), the site
    (its row), the decisiveness (the cell's ``z``) and the distribution (its ``customdata``) with
    this expert marked."""
    dist = "<br>".join(f"{'▶' if k == expert else '&nbsp;&nbsp;'} expert {k}: %{{customdata[{k}]:.3f}}"
                       for k in range(n_experts))
    return f"token %{{x}}<br>%{{y}}<br>top expert {expert} · decisiveness %{{z:.2f}}<br>{dist}<extra></extra>"


def prediction_for(predictions: Any, sequence: int) -> Any:
    """The prediction of recorded ``sequence`` in ``predictions``: a list (or array) indexed by the
    recording's sequence number, or a mapping ``{sequence: prediction}``; ``None`` when absent."""
    if predictions is None:
        return None
    if isinstance(predictions, Mapping):
        return predictions.get(sequence)
    if not hasattr(predictions, "__len__") or not hasattr(predictions, "__getitem__") or isinstance(predictions, str):
        from ..core.errors import LilyLabTypeError

        raise LilyLabTypeError(f"predictions must be a list (or array) by sequence number, a mapping "
                               f"{{sequence: prediction}} or None, got {type(predictions).__name__}")
    return predictions[sequence] if 0 <= sequence < len(predictions) else None


def plot_token_routes(tokens: pd.DataFrame, sequence: int, *, sites: list[str] | str | None = None,
                      title: str | None = None, prediction=None, wrap: int | None = None) -> go.Figure:
    """One recorded sequence through every routed site at once: a row per site ("module · layer",
    ordered by module then layer, a rule between modules), a column per sampled token in position
    order, each cell in the colour of the token's top expert there; a paler cell is a less decisive
    router ((p_max − 1/E) / (1 − 1/E), 0 uniform, 1 all on one expert), a blank one a token not
    sampled at that site. Hover gives the token, the site and the whole distribution.

    ``tokens``: the frame of ``Routing.token_table(tokenizer)``; ``sites``: a subset by name (default
    every site in the frame); ``prediction``: the model's output for the sequence, shown in the
    title beside its label; ``wrap``: tokens per row block — a longer sequence continues in a block
    below, so the tick labels stay horizontal and apart (default: as many as fit
    ``ROUTE_PLOT_WIDTH_PX`` at the sequence's longest tick label, 8 to 40). One heatmap per expert
    (legend group; per expert and run of sites with the same bank size when banks differ) and a
    legend entry per expert. A sequence recorded around ``generate`` (a ``phase`` column holding
    both ``"prefill"`` and ``"decode"``) gets a dotted rule and a "prompt | generated" note where
    its generated tokens begin; the hover names each token's phase.

    The figure stays small at LLM scale (a 60-site × 94-token sequence is ~0.4 MB of JSON): a
    heatmap places its cells by category index (``x0``/``y0``, no per-cell coordinates), its
    ``z`` is a float32 array (base64 in the JSON), and its hover is one ``hovertemplate``: the
    token, position and phase come from the column's x category, the site's name and path from
    the row's y category, the decisiveness from ``z`` and the distribution from ``customdata``
    (each cell's probabilities rounded to 3 decimals; ``0`` in the cells of other experts)."""
    fn = "plot_token_routes"
    require(tokens, ["site", "sequence", "position", "top_expert"], fn, TOKEN_TABLE)
    _require_probs(tokens, fn)
    if wrap is not None and (isinstance(wrap, bool) or not isinstance(wrap, (int, np.integer)) or wrap < 1):
        raise InputError(f"{fn}: wrap (tokens per row block) must be ≥ 1, got {wrap!r}")
    order = _ordered_sites(tokens)
    if sites is not None:
        wanted = [sites] if isinstance(sites, str) else list(sites)
        unknown = [s for s in wanted if s not in set(order["site"])]
        if unknown:
            have = order["site"].tolist()
            shown = ", ".join(map(repr, have[:8])) + (" …" if len(have) > 8 else "")
            raise InputError(f"{fn}: sites {unknown} are not in the token table; it has sites: {shown}")
        order = order[order["site"].isin(wanted)].reset_index(drop=True)
    seq = pick(tokens, "sequence", sequence, fn)
    part = seq[seq["site"].isin(set(order["site"]))]
    if part.empty:
        raise InputError(f"{fn}: sequence {sequence!r} has no sampled token at the sites {order['site'].tolist()}; "
                         f"it has tokens at: {list(dict.fromkeys(seq['site']))}")
    part = part.drop_duplicates(["site", "position"], keep="last")
    cols = [c for c in prob_columns(part) if part[c].notna().any()]
    E = len(cols)
    positions = sorted(part["position"].unique().tolist())
    S, n = len(order), len(positions)
    row_of = {s: i for i, s in enumerate(order["site"])}
    col_of = {p: j for j, p in enumerate(positions)}
    rows = part["site"].map(row_of).to_numpy()
    cells = part["position"].map(col_of).to_numpy()
    P = np.full((S, n, E), np.nan)
    P[rows, cells] = part[cols].to_numpy(dtype=float)
    top = np.full((S, n), -1)
    top[rows, cells] = part["top_expert"].to_numpy(dtype=int)
    raw = dict(zip(part["position"], _token_text(part)))  # one token per position (the same at every site)
    text = [raw[p] for p in positions]
    # A cached generation's phase per position ("prefill": the prompt, "decode": generated).
    phase_of = dict(zip(part["position"], part["phase"])) if "phase" in part.columns else {}
    phases = [phase_of.get(p) if isinstance(phase_of.get(p), str) else None for p in positions]
    first_generated = next((j for j, ph in enumerate(phases) if ph == "decode"), None)
    split = first_generated if first_generated and "prefill" in phases[:first_generated] else None
    n_exp = np.isfinite(P).sum(axis=2)  # each site's E (banks of different sizes pad with NaN)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_top = np.take_along_axis(P, np.clip(top, 0, None)[..., None], axis=2)[..., 0]
        decisive = np.where(n_exp > 1, (p_top - 1 / n_exp) / (1 - 1 / np.maximum(n_exp, 2)), 1.0)
    decisive = np.clip(np.where(top >= 0, decisive, np.nan), 0, 1)
    labels = [site_label(m, l) for m, l in zip(order["module"], order["layer"])]
    # The hover is one template per trace: what differs by site or by token lives in the axis
    # categories (a site's row is "label<br>site: path", a token's column "token · position ·
    # phase"; the traces place their cells by category index, x0/y0), the numbers per cell in
    # customdata and z, so each string is embedded once per row block, not once per cell.
    y = [f"{lab}<br>site: {escape(s)}" for lab, s in zip(labels, order["site"])]
    where_in = [{"prefill": " · prompt", "decode": " · generated"}.get(ph, "") for ph in phases]
    x_keys = [f"<b>{escape(t)}</b> · position {p}{w}" for t, p, w in zip(text, positions, where_in)]
    runs = _bank_runs(n_exp, E)
    label = next((l for l in seq.get("label", pd.Series(dtype=object)) if l is not None and l == l), None)
    every = len(order) == tokens["site"].nunique()
    # Label and prediction cut to a few words (a title does not wrap; the hover has the rest).
    head = f"Sequence {escape(sequence)}" + (f" — label {_tick(str(label), 28)}" if label is not None else "")
    head += f" · predicted {_tick(str(prediction), 28)}" if prediction is not None else ""
    sub = f"each token's top expert at {'all ' if every else ''}{S} site{'s' if S != 1 else ''}"
    if not every:
        sub += f" of {tokens['site'].nunique()}"
    missing = bool((top < 0).any())
    # Layout by hand: S rows of ROUTE_ROW_PX per block, blocks of at most `wrap` tokens.
    if wrap is None:
        chars = max((min(len(t), ROUTE_TICK_CHARS) for t in text), default=1)
        wrap = int(np.clip(ROUTE_PLOT_WIDTH_PX // (ROUTE_CHAR_PX * max(chars, 3) + 12), 8, 40))
    n_blocks = max(1, math.ceil(n / int(wrap)))
    per = math.ceil(n / n_blocks)
    top_px, bottom_px = 96, 104
    plot_px = n_blocks * S * ROUTE_ROW_PX + (n_blocks - 1) * ROUTE_GAP_PX
    height = top_px + bottom_px + plot_px
    layout: dict = dict(height=height, margin=dict(t=top_px, b=bottom_px, l=60, r=20),
                        legend=dict(orientation="h", x=0, y=-58 / plot_px, yanchor="top", itemclick="toggle",
                                    title=dict(text="top expert" + (" · paler: less decisive router" if E > 1 else "")
                                               + (" · blank: token not sampled at that site" if missing else ""))))
    fig = figure(escape(title) if title else head, **layout)
    fig.layout.title.subtitle.text = sub
    traces, shapes = [], []
    boundaries = [i for i in range(1, S) if order["module"][i] != order["module"][i - 1]]
    for b in range(n_blocks):
        j0, j1 = b * per, min(n, (b + 1) * per)
        suffix = "" if b == 0 else str(b + 1)
        y1 = 1 - b * (S * ROUTE_ROW_PX + ROUTE_GAP_PX) / plot_px
        y0 = y1 - S * ROUTE_ROW_PX / plot_px
        xs = x_keys[j0:j1]  # the block's columns
        fig.layout[f"xaxis{suffix}"] = dict(type="category", anchor=f"y{suffix}", domain=[0, 1], tickangle=0,
                                            categoryorder="array", categoryarray=xs, tickmode="array",
                                            tickvals=list(range(j1 - j0)),
                                            ticktext=[_tick(t) for t in text[j0:j1]], showgrid=False,
                                            tickfont=dict(size=12),
                                            range=[-0.5, per - 0.5], fixedrange=True, side="bottom",
                                            title=dict(text="tokens, in order" if n_blocks == 1 else
                                                       f"tokens {j0 + 1}–{j1} of {n}, in order"))
        fig.layout[f"yaxis{suffix}"] = dict(type="category", anchor=f"x{suffix}", domain=[max(y0, 0), min(y1, 1)],
                                            categoryorder="array", categoryarray=y, tickmode="array",
                                            tickvals=list(range(S)),
                                            ticktext=labels, autorange="reversed", showgrid=False, fixedrange=True,
                                            title=dict(text="site (module · layer)"))
        for r0, r1, E_run in runs:  # rows of one bank size: a template with that many experts
            for e in range(E_run):
                own = top[r0:r1, j0:j1] == e
                z = np.where(own, decisive[r0:r1, j0:j1], np.nan).astype(np.float32)  # typed array, not decimals
                probs = np.round(P[r0:r1, j0:j1, :E_run], 3)
                # The whole distribution for this expert's cells only, 0 in the others (never hovered).
                custom = [[probs[i, j].tolist() if own[i, j] else 0 for j in range(j1 - j0)] for i in range(r1 - r0)]
                color = expert_color(e)
                # x0/y0: the cells sit at category indices (the columns of the block, the run's rows).
                traces.append(dict(type="heatmap", x0=0, dx=1, y0=r0, dy=1, z=z, zmin=0, zmax=1, showscale=False,
                                   colorscale=[[0, _tint(color, 0.3)], [1, color]], xgap=1, ygap=1,
                                   hoverongaps=False, customdata=custom, hovertemplate=_route_hover(e, E_run),
                                   name=f"expert {e}", legendgroup=f"expert {e}", xaxis=f"x{suffix}",
                                   yaxis=f"y{suffix}"))
        if split is not None and j0 < split < j1:  # where the prompt ends and generation begins
            shapes.append(dict(type="line", xref=f"x{suffix}", x0=split - j0 - 0.5, x1=split - j0 - 0.5,
                               yref=f"y{suffix} domain", y0=0, y1=1.04, line=dict(color="#d62728", width=2, dash="dot")))
            fig.add_annotation(x=split - j0 - 0.5, xref=f"x{suffix}", y=1.04, yref=f"y{suffix} domain",
                               yanchor="bottom", text="prompt | generated", showarrow=False,
                               font=dict(size=11, color="#d62728"))
        for i in boundaries:  # a rule between modules: categories sit at 0, 1, …
            shapes.append(dict(type="line", xref=f"x{suffix} domain", x0=0, x1=1, yref=f"y{suffix}", y0=i - 0.5,
                               y1=i - 0.5, line=dict(color="#222", width=2)))
    for e in range(E):  # the legend: one square per expert (a heatmap has no legend symbol)
        traces.append(dict(type="scatter", x=[None], y=[None], mode="markers", name=f"expert {e}",
                           legendgroup=f"expert {e}", showlegend=True, hoverinfo="skip",
                           marker=dict(color=expert_color(e), symbol="square", size=12)))
    fig.add_traces(traces)
    fig.update_layout(shapes=shapes)
    return fig


__all__ = ["plot_token_probs", "plot_top_tokens", "plot_token_text", "plot_token_routes", "prediction_for"]
