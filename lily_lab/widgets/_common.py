"""Pieces every widget uses: a FigureWidget pane that takes a new figure by sending only what
changed, a grid of panes that stacks on narrow screens, captions, controls whose labels fit, a
message box for empty data."""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import anywidget
import ipywidgets as W
import numpy as np
import traitlets
import plotly.graph_objects as go

from ..plots import TEMPLATE, escape  # noqa: F401 — escape: the one escaping of data text, for widgets too


class _All:
    """The "every value" choice of a filter dropdown.

    A dropdown whose value is ``None`` selects nothing and shows a blank box in the browser, so
    "all" is this sentinel instead."""

    def __repr__(self) -> str:
        return "ALL"


ALL = _All()

# The pane owns these layout properties; every lily_lab figure has the lily_lab template.
_KEEP = {"template", "height", "autosize", "width"}
_AXIS = re.compile(r"[xy]axis\d*")


def _flatten(props: dict, prefix: tuple = (), out: dict | None = None) -> dict:
    """``{("xaxis", "title", "text"): "expert", …}``: every leaf of a plotly property tree. Lists
    (data arrays, shapes, annotations) are leaves: they are sent whole or not at all."""
    out = {} if out is None else out
    for key, value in props.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            _flatten(value, path, out)
        else:
            out[path] = value
    return out


def _nest(leaves: dict) -> dict:
    """The inverse of ``_flatten`` for the leaves that changed."""
    tree: dict = {}
    for path, value in leaves.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            a, b = np.asarray(a), np.asarray(b)
            return a.shape == b.shape and a.dtype.kind == b.dtype.kind and bool(np.array_equal(
                a, b, equal_nan=a.dtype.kind == "f"))
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):
        return False


def _changes(current: dict, new: dict, keep: Iterable[str] = ()) -> tuple[dict, dict]:
    """What turns ``current`` into ``new``: ``(tree, arrays)``. ``tree`` holds the leaves that
    differ or are new and ``None`` for leaves ``new`` no longer sets (except ``keep``), for
    ``update``; ``arrays`` holds, by path, the arrays of objects (shapes, annotations) that
    changed, to be assigned whole — ``update`` merges such arrays item by item, so a removed
    annotation or a property the new shape lacks would stay."""
    old, leaves = _flatten(current), _flatten(new)
    diff = {p: v for p, v in leaves.items() if p not in old or not _same(old[p], v)}
    # Paths the new tree still sets: an old leaf on one of them (an emptied object) is not removed.
    held = {q[:i] for q in leaves for i in range(1, len(q) + 1)}
    for p, v in old.items():
        if p not in held and p[0] not in keep and not any(p[:i] in leaves for i in range(1, len(p))):
            diff[p] = [] if _objects(v) else None
    arrays = {p: v for p, v in diff.items() if _objects(v) or _objects(old.get(p))}
    return _nest({p: v for p, v in diff.items() if p not in arrays}), arrays


def _objects(value: Any) -> bool:
    """An array of plotly objects (``[{"type": "line", …}, …]``), possibly empty."""
    return isinstance(value, (list, tuple)) and (not value or isinstance(value[0], dict))


def _apply(obj, tree: dict, arrays: dict) -> None:
    if tree:
        obj.update(tree)
    for path, value in arrays.items():
        obj[path] = value


class _FitWidth(anywidget.AnyWidget):
    """Reports the width of the box it sits in, so the figure beside it can fill that box.

    plotly's ``FigureWidget`` sizes itself once, when first drawn (700 px when it is drawn in a
    tab not shown yet), and never follows its container in JupyterLab. This invisible widget
    watches the box — a tab being shown, a grid stacking its panes, the side panel opening — and
    sends its width to the kernel, which sets the figure's width: one message per change of size."""

    width = traitlets.Int(0).tag(sync=True)
    _esm = traitlets.Unicode("""
    export default {
      render({ model, el }) {
        // Zero height, full width: the element is as wide as the box it stretches across. It is
        // watched itself, since render runs before the element is attached to the page.
        el.style.cssText = "height:0;min-height:0;margin:0;padding:0;overflow:hidden;align-self:stretch";
        if (typeof ResizeObserver === "undefined") return;
        let frame = 0;
        const observer = new ResizeObserver(() => {
          cancelAnimationFrame(frame);
          frame = requestAnimationFrame(() => {
            const width = Math.floor(el.getBoundingClientRect().width);
            if (width > 0 && width !== model.get("width")) {
              model.set("width", width);
              model.save_changes();
            }
          });
        });
        observer.observe(el);
        return () => { cancelAnimationFrame(frame); observer.disconnect(); };
      }
    };
    """).tag(sync=True)


class FigurePane:
    """A plotly ``FigureWidget`` in a box that fills its container's width, swapped to each new
    figure in one ``batch_update`` that carries only the properties that changed.

    Every property goes through plotly's validation: the front end applies a layout change only
    when the widget validated it (a widget built with ``_validate=False`` drew the first layout
    and silently dropped every later title, axis type and shape).
    """

    def __init__(self, height: int = 420, *, hidden: bool = False):
        self.height = height
        # lily_lab's template from the start: a bare FigureWidget would first load plotly's default.
        self.figure = go.FigureWidget(layout={"height": height, "autosize": True, "template": TEMPLATE})
        self.message = W.HTML()
        # An empty axis is noise: a hidden pane shows its figure once there is something in it.
        self._fit = _FitWidth()
        self._fit.observe(self._fit_width, "width")
        self.box = W.VBox([self._fit, self.message] if hidden else [self._fit, self.message, self.figure],
                          layout=W.Layout(width="100%", min_width="0"))

    def _fit_width(self, change) -> None:
        if change["new"] > 0 and self.figure.layout.width != change["new"]:
            self.figure.layout.width = change["new"]

    def show(self, fig: go.Figure, *, height: int | None = None) -> None:
        """Draw ``fig`` (its own ``height`` when it sets one and ``height`` is not given)."""
        data = [t.to_plotly_json() for t in fig.data]
        layout = {k: v for k, v in fig.layout._props.items() if k not in _KEEP}
        # plotly.js writes the range and the type it chose back into the page's layout: an axis
        # the new figure does not range is told to autorange, and one it does not type to choose
        # its type afresh ("-"), or it would keep the previous figure's (bars of 0.3 on a -1…4
        # axis; boxes named "expert 0" on the previous figure's linear axis).
        for name in [k for k in set(layout) | set(self.figure.layout._props) if _AXIS.fullmatch(k)]:
            axis = layout.get(name) or {}
            if isinstance(axis, dict):
                fresh = {} if "range" in axis or "autorange" in axis else {"autorange": True}
                fresh.update({} if "type" in axis else {"type": "-"})
                if fresh:
                    layout[name] = {**axis, **fresh}
        height = height or fig.layout.height or self.height
        same = len(data) == len(self.figure.data) and all(
            d.get("type") == t.type for d, t in zip(data, self.figure.data))
        with self.figure.batch_update():
            if same:
                for trace, d in zip(self.figure.data, data):
                    _apply(trace, *_changes(trace._props, d, keep=("type", "uid")))
            else:
                self.figure.data = ()
                self.figure.add_traces(data)
            _apply(self.figure.layout, *_changes(self.figure.layout._props, layout, keep=_KEEP))
            if self.figure.layout.height != height:
                self.figure.layout.height = height
        if self.figure not in self.box.children:
            self.box.children = (self._fit, self.message, self.figure)
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


def grid(*boxes: W.Widget, min_width: int = 560) -> W.GridBox:
    """Panes side by side while each gets ``min_width`` pixels, stacked on a narrower screen
    (a 1280×720 projector, JupyterLab with its side panel open)."""
    return W.GridBox(list(boxes), layout=W.Layout(
        width="100%", grid_gap="12px",
        grid_template_columns=f"repeat(auto-fit, minmax(min(100%, {min_width}px), 1fr))"))


def caption(markup: str) -> W.HTML:
    """How to read the figure above; ``markup`` is lily_lab's own text (data text escaped by the caller)."""
    return W.HTML(f"<div style='color:#444;font-size:13px;line-height:1.45;max-width:900px;"
                  f"padding:2px 4px 10px'>{markup}</div>")


def toggles(options: dict[str, tuple[str, str]], value: str, description: str = "") -> W.ToggleButtons:
    """ToggleButtons from ``{value: (label, tooltip)}`` whose labels are never cut: each button is as
    wide as its label, and the row wraps when the screen is narrow."""
    return W.ToggleButtons(options=[(label, key) for key, (label, _) in options.items()], value=value,
                           tooltips=[tip for _, tip in options.values()], description=description,
                           style={"button_width": "auto"}, layout=W.Layout(flex_flow="row wrap", width="auto"))


def dropdown(options, *, description: str, tooltip: str, width: str = "auto", **kw) -> W.Dropdown:
    """A dropdown with a tooltip, its description never cut."""
    return W.Dropdown(options=options, description=description, tooltip=tooltip,
                      style={"description_width": "initial"}, layout=W.Layout(width=width), **kw)


def row(*children: W.Widget) -> W.HBox:
    """Controls in one line that wraps on a narrow screen."""
    return W.HBox(list(children), layout=W.Layout(flex_flow="row wrap", align_items="center", width="100%",
                                                  grid_gap="4px 16px"))


def check_inputs(widget: str, model: Any = None, routing: Any = None, *, need_model: bool = True) -> None:
    """Refuse, naming ``widget`` and the argument, a ``model`` that is no ``torch.nn.Module`` or a
    ``routing`` that is neither ``None`` nor a :class:`~lily_lab.Routing` — before anything is built."""
    from ..analysis.routing import require_routing
    from ..core.layer import require_module

    if need_model or model is not None:
        require_module(model, widget)
    if routing is not None:
        require_routing(routing, widget)


def empty_notice(what: str) -> W.HTML:
    return W.HTML(f"<div style='color:#b9770e;padding:8px'>{escape(what)}</div>")
