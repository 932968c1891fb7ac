"""``TimelinePlayer``: a step slider over a training ``Timeline``."""

from __future__ import annotations

import ipywidgets as W

from .. import plots
from ..analysis import timeline_metrics
from ..analysis.routing import METRIC_COLUMNS
from ..observe import Timeline
from ._common import FigurePane, caption, dropdown, empty_notice, guarded, row


class TimelinePlayer(W.VBox):
    """Metric curves over training for every site, and the router usage at the chosen step."""

    def __init__(self, timeline: Timeline, *, height: int = 380):
        if not isinstance(timeline, Timeline):
            from ..core.errors import LilyLabTypeError

            raise LilyLabTypeError(f"TimelinePlayer: timeline must be a lily_lab.Timeline (Timeline(probe), or "
                                   f"RoutingCallback(...).timeline), got {type(timeline).__name__}")
        super().__init__()
        self.timeline = timeline
        self.metrics = timeline_metrics(timeline) if len(timeline) else None
        if self.metrics is None or self.metrics.empty:
            self.children = [empty_notice("TimelinePlayer: this timeline has no observations yet — call "
                                          "timeline.observe(model, step) or train with RoutingCallback.")]
            return
        self.usages = [r.usage() for r in timeline.routings]  # cached: the slider only picks one
        steps = list(timeline.steps)
        self.step = W.SelectionSlider(options=steps, value=steps[-1], description="step",
                                      continuous_update=False, layout={"width": "60%"})
        self.play = W.Play(min=0, max=len(steps) - 1, interval=600)
        self.index = W.IntSlider(min=0, max=len(steps) - 1, layout={"display": "none"})
        W.jslink((self.play, "value"), (self.index, "value"))
        self.index.observe(lambda c: setattr(self.step, "value", steps[c["new"]]), "value")
        self.metric = dropdown([(m.replace("_", " "), m) for m in METRIC_COLUMNS], value="routing_mi",
                               description="metric", tooltip="The router metric drawn over training, one line per site")
        self.curves, self.heat = FigurePane(height), FigurePane(height)
        self.children = [row(self.play, self.step, self.metric), self.curves.box, self.heat.box, self.index, caption(
            "<b>Top:</b> the metric at every observed step, one line per site; the dashed line is the step shown "
            "below. <b>Below:</b> each expert's usage at each site at that step (white: the fair share 1/E).")]
        self.metric.observe(lambda _: self.redraw_curves(), "value")
        self.step.observe(lambda _: self.redraw_step(), "value")
        self.redraw_curves()
        self.redraw_step()

    def redraw_curves(self) -> None:
        guarded(self.curves, lambda: plots.plot_metric_timeline(self.metrics, metric=self.metric.value,
                                                                step=self.step.value))

    def redraw_step(self) -> None:
        step = self.step.value
        i = self.timeline.steps.index(step)
        guarded(self.heat, lambda: plots.plot_usage_heatmap(self.usages[i], title=f"router usage at step {step}"))
        # The curves stay; only the step marker (the dashed vertical line) moves.
        shapes = self.curves.figure.layout.shapes
        if shapes:
            with self.curves.figure.batch_update():
                shapes[0].x0 = shapes[0].x1 = step
        else:
            self.redraw_curves()
