"""Helpers every plot function shares: column checks, HTML escaping, layer numbers, site labels.

``plots`` knows DataFrame columns only (docs/architecture.md): nothing here imports the rest of lily_lab.
"""

from __future__ import annotations

import html
import re
from typing import Any, Iterable

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..core.errors import InputError, LilyLabTypeError
from ..core.names import layer_of
from .theme import TEMPLATE


def escape(value: Any) -> str:
    """``value`` as text that plotly shows literally. Plotly renders ``text``, ``hovertext``,
    titles and tick labels as a subset of HTML, so a token ``<b>`` would turn bold and a tag could
    reach the page: every string from the data goes through here before it enters a figure.

    ``&``, ``<`` and ``>`` become ``&amp;``, ``&lt;`` and ``&gt;``, ``'`` becomes ``&#x27;`` and
    ``"`` the numeric ``&#34;``. Plotly.js decodes numeric entities and only a few named ones
    (``amp lt gt nbsp times plusmn deg mu``: its ``convertEntities``), into text nodes, so
    ``&quot;`` (what ``html.escape`` writes) showed as ``&quot;``. Browsers decode them all, so the
    same text is also safe in real HTML, inside quoted attributes too (``title="…"`` in findings)."""
    return html.escape("" if value is None else str(value), quote=True).replace("&quot;", "&#34;")


def require(frame: Any, columns: Iterable[str], fn: str, made_by: str = "") -> None:
    """Raise :class:`~lily_lab.InputError` (a ``ValueError``) naming ``fn`` and the ``columns`` that
    ``frame`` lacks; :class:`~lily_lab.LilyLabTypeError` (a ``TypeError``) when it is no DataFrame."""
    if not isinstance(frame, pd.DataFrame):
        raise LilyLabTypeError(f"{fn} takes a pandas DataFrame{f' ({made_by})' if made_by else ''}, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        hint = f" — pass the frame from {made_by}" if made_by else ""
        raise InputError(f"{fn} needs columns {missing} that the frame lacks; it has {list(frame.columns)}{hint}")


def pick(frame: pd.DataFrame, column: str, value: Any, fn: str) -> pd.DataFrame:
    """The rows whose ``column`` equals ``value``; an :class:`~lily_lab.InputError` (a ``ValueError``)
    naming the argument ``column`` and listing the choices if none."""
    part = frame[frame[column] == value]
    if part.empty:
        choices = list(dict.fromkeys(frame[column].tolist()))
        shown = ", ".join(map(repr, choices[:8])) + (" …" if len(choices) > 8 else "")
        raise InputError(f"{fn}: no rows with {column}={value!r}; the frame has {column} in: {shown or 'nothing'}")
    return part


def first(frame: pd.DataFrame, column: str, value: Any = None) -> Any:
    """``value`` when given, else the first value of ``column`` in frame order."""
    return frame[column].iloc[0] if value is None else value




def layers(frame: pd.DataFrame) -> pd.Series:
    """The ``layer`` column, or layers read from ``site`` names (falling back to ``index``)."""
    if "layer" in frame.columns:
        return frame["layer"]
    index = frame["index"] if "index" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
    return pd.Series([layer_of(s, i) for s, i in zip(frame["site"], index)], index=frame.index, dtype=object)


def modules(frame: pd.DataFrame) -> pd.Series:
    """The ``module`` column, or the target read from ``group`` (``query:32x32``) or ``site``."""
    if "module" in frame.columns:
        return frame["module"]
    if "group" in frame.columns:
        return frame["group"].map(lambda g: str(g).split(":", 1)[0])
    return frame["site"].map(lambda s: str(s).rsplit(".", 1)[-1])


def site_label(module: Any, layer: Any) -> str:
    """A site in the user's terms, escaped: ``query · layer 3``.

    The one display name of a site in every figure, widget and table of lily_lab; the full
    module path (``bert.encoder.layer.3.attention.self.query``) goes in hover text and tooltips."""
    where = f"layer {layer}" if layer is not None and not (isinstance(layer, float) and np.isnan(layer)) else "site"
    return f"{escape(module)} · {where}" if module is not None else where


_GROUP = re.compile(r"^(?P<target>.*):(?P<d_out>\d+)x(?P<d_in>\d+)$")


def bank_label(group: Any) -> str:
    """A group (and its bank of B experts) in the user's terms, escaped: the group key
    ``query:384x384`` (target, then ``d_out x d_in``) reads ``query bank (384×384)``.

    A group's sites share one bank, so a bank and a group carry the same name everywhere."""
    m = _GROUP.match(str(group))
    if m is None:
        return f"{escape(group)} bank"
    return f"{escape(m['target'])} bank ({m['d_out']}×{m['d_in']})"


def prob_columns(frame: pd.DataFrame) -> list[str]:
    """The ``p0 … p{E-1}`` columns of a token table, in expert order."""
    cols = [c for c in frame.columns if isinstance(c, str) and re.fullmatch(r"p\d+", c)]
    return sorted(cols, key=lambda c: int(c[1:]))


def figure(title: str, **layout) -> go.Figure:
    """An empty figure in the lily_lab template (``title`` must already be escaped)."""
    # The template goes in with the layout: a bare go.Figure() first loads plotly's default
    # template, only to replace it (1.5 ms of every figure).
    return go.Figure(layout=dict(template=TEMPLATE, title=dict(text=title), **layout))


def message_figure(title: str, message: str, color: str = "#555") -> go.Figure:
    """A figure that says something instead of plotting (e.g. "no findings"); both texts escaped here."""
    fig = figure(escape(title), height=220)
    fig.add_annotation(text=escape(message), x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=16, color=color))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def fmt(x: Any, digits: int = 3) -> str:
    """A number for hover text: ``0.123``; NaN and None as ``n/a``."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return escape(x)
    return "n/a" if np.isnan(v) else f"{v:.{digits}g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.{digits}f}"
