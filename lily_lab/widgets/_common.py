"""Pieces every widget uses: a FigureWidget that takes a new figure in one batch update, a
message box for empty data, and escaping of data text rendered as HTML."""

from __future__ import annotations

import html
from typing import Callable

import ipywidgets as W
import plotly.graph_objects as go


def escape(text) -> str:
    """Data text (tokens, labels, site names) made safe to put in HTML."""
    return html.escape(str(text), quote=True)


class FigurePane:
    """A plotly ``FigureWidget`` shown in a box, swapped to a new figure in one ``batch_update``.

    When the new figure has the same traces (kinds and count) only their data and the layout
    change; otherwise the traces are replaced. Either way the front end gets one update.
    """

    def __init__(self, height: int = 420, *, hidden: bool = False):
        self.height = height
        self._templated = False
        # The figures it receives were validated when the plot function built them: the widget
        # skips plotly's second validation of every property (most of an update's time).
        self.figure = go.FigureWidget(layout={"height": height}, _validate=False)
        self.message = W.HTML()
        # An empty axis is noise: a hidden pane shows its figure once there is something in it.
        self.box = W.VBox([self.message] if hidden else [self.message, self.figure])

    def show(self, fig: go.Figure) -> None:
        # Read the new figure's properties without copying its template: the pane's figure got
        # the template once, at the first show, and keeps it.
        data = [t.to_plotly_json() for t in fig.data]
        layout = {k: v for k, v in fig.layout._props.items() if k != "template"}
        same = len(data) == len(self.figure.data) and all(
            d.get("type") == t.type for d, t in zip(data, self.figure.data))
        with self.figure.batch_update():
            if same:
                for trace, d in zip(self.figure.data, data):
                    trace.update(d, overwrite=True)
                    for key in set(trace._props) - set(d) - {"type", "uid"}:
                        trace[key] = None  # a property the new trace does not set
            else:
                self.figure.data = ()
                self.figure.add_traces(data)
            if not self._templated:
                self.figure.layout.template = fig.layout.template
                self._templated = True
            current = self.figure.layout
            # Properties the new layout does not set are cleared ([] for arrays such as shapes).
            stale = {k: [] if isinstance(current[k], tuple) else None
                     for k in set(current._props) - set(layout) - {"template", "height"}}
            current.update({**layout, **stale}, overwrite=True)
            self.figure.layout.height = self.height
        if self.figure not in self.box.children:
            self.box.children = (self.message, self.figure)
        self.message.value = ""

    def say(self, text: str, level: str = "info") -> None:
        """Show a message above the figure (escaped), e.g. why there is nothing to draw."""
        colour = {"info": "#555", "warning": "#b9770e", "error": "#c0392b"}[level]
        self.message.value = f"<div style='color:{colour};padding:4px 0'>{escape(text)}</div>"


def guarded(pane: FigurePane, draw: Callable[[], go.Figure]) -> None:
    """Draw into ``pane``; a failure becomes a visible message inside the widget, not a traceback."""
    try:
        pane.show(draw())
    except Exception as err:  # noqa: BLE001 — shown to the user in the widget
        pane.say(f"{type(err).__name__}: {err}", "error")


def empty_notice(what: str) -> W.HTML:
    return W.HTML(f"<div style='color:#b9770e;padding:8px'>{escape(what)}</div>")
