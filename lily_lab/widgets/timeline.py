"""``TimelinePlayer``: a step slider over a training ``Timeline`` (or several, one per run)."""

from __future__ import annotations

from collections.abc import Mapping

import ipywidgets as W

from .. import plots
from ..analysis import timeline_expert_trajectories, timeline_metrics
from ..analysis.routing import METRIC_COLUMNS
from ..observe import Timeline
from ..plots import bank_label
from ..plots.experts import trajectory_now
from ..plots.routing import METRIC_TITLES
from ._common import FigurePane, caption, dropdown, empty_notice, escape, guarded, row


def _check(timeline) -> dict:
    """``{run: Timeline}`` from one ``Timeline`` (run ``"timeline"``) or a dict of them."""
    from ..core.errors import InputError, LilyLabTypeError

    if isinstance(timeline, Timeline):
        return {"timeline": timeline}
    if not isinstance(timeline, Mapping):
        raise LilyLabTypeError(f"TimelinePlayer: timeline must be a lily_lab.Timeline (Timeline(probe), or "
                               f"RoutingCallback(...).timeline) or a dict {{run name: Timeline}}, got "
                               f"{type(timeline).__name__}")
    if not timeline:
        raise InputError("TimelinePlayer: timeline is an empty dict; give at least one {run name: Timeline}")
    for run, t in timeline.items():
        if not isinstance(t, Timeline):
            raise LilyLabTypeError(f"TimelinePlayer: timeline[{run!r}] must be a lily_lab.Timeline, got "
                                   f"{type(t).__name__}")
    return dict(timeline)


def _has_banks(t: Timeline) -> bool:
    return len(t) > 0 and any(t.banks) and len(t.banks) == len(t.steps)


class TimelinePlayer(W.VBox):
    """Metric curves over training for every site, the router usage at the chosen step, and —
    when the timeline kept its banks (``track_experts=True``, the default) — each expert's path
    over training with the chosen step marked.

    ``timeline`` is one :class:`~lily_lab.Timeline`, or a dict ``{run name: Timeline}`` of
    several training runs: the router views then show the run chosen in the ``run`` dropdown,
    and the experts view one panel per run (``plots.plot_expert_trajectories``; on one shared
    principal-component plane, so the runs compare). The step slider runs over every run's
    observed steps; a run observed on another schedule shows its latest step at or before it.
    """

    def __init__(self, timeline: Timeline | Mapping[str, Timeline], *, height: int = 380):
        runs = _check(timeline)
        super().__init__()
        self.multi = not isinstance(timeline, Timeline)
        self.timelines = runs
        observed = {run: t for run, t in runs.items() if len(t)}
        first = next(iter(observed), next(iter(runs)))
        self.timeline = runs[first]  # the run the router views show
        self._metrics: dict = {}
        self._usages: dict = {}
        self.metrics = self._metrics_of(first) if observed else None
        if self.metrics is None or (self.metrics.empty and not self.multi):
            self.children = [empty_notice("TimelinePlayer: this timeline has no observations yet — call "
                                          "timeline.observe(model, step) or train with RoutingCallback.")]
            return
        self.usages = self._usages_of(first)  # cached: the slider only picks one
        steps = sorted({int(s) for t in observed.values() for s in t.steps})
        self.step = W.SelectionSlider(options=steps, value=steps[-1], description="step",
                                      continuous_update=False, layout={"width": "60%"})
        self.play = W.Play(min=0, max=len(steps) - 1, interval=600)
        self.index = W.IntSlider(min=0, max=len(steps) - 1, layout={"display": "none"})
        W.jslink((self.play, "value"), (self.index, "value"))
        self.index.observe(lambda c: setattr(self.step, "value", steps[c["new"]]), "value")
        self.metric = dropdown([(m.replace("_", " "), m) for m in METRIC_COLUMNS], value="routing_mi",
                               description="metric", tooltip="The router metric drawn over training, one line per site")
        controls = [self.play, self.step, self.metric]
        if self.multi:
            self.run = dropdown([(str(r), r) for r in observed], value=first, description="run",
                                tooltip="The training run the router views show")
            controls.append(self.run)
        self.curves, self.heat = FigurePane(height), FigurePane(height)
        children = [row(*controls), self.curves.box, self.heat.box, self.index, caption(
            "<b>Top:</b> the metric at every observed step, one line per site; the dashed line is the step shown "
            "below. <b>Below:</b> each expert's usage at each site at that step (white: the fair share 1/E).")]
        children += self._experts_view(observed)
        self.children = children
        self.metric.observe(lambda _: self.redraw_curves(), "value")
        self.step.observe(lambda _: self.redraw_step(), "value")
        if self.multi:
            self.run.observe(lambda _: self._show_run(), "value")
        if self.bank is not None:
            self.bank.observe(lambda _: self.redraw_experts(), "value")
            self.redraw_experts()
        self.redraw_curves()
        self.redraw_step()

    # ---------------------------------------------------------------------------- router views

    def _metrics_of(self, run):
        if run not in self._metrics:
            t = self.timelines[run]
            self._metrics[run] = timeline_metrics(t) if len(t) else None
        return self._metrics[run]

    def _usages_of(self, run):
        if run not in self._usages:
            self._usages[run] = [r.usage() for r in self.timelines[run].routings]
        return self._usages[run]

    def _show_run(self) -> None:
        run = self.run.value
        self.timeline = self.timelines[run]
        self.metrics, self.usages = self._metrics_of(run), self._usages_of(run)
        self.redraw_curves()
        self.redraw_step()

    def _suffix(self) -> str:
        return f" · {self.run.value}" if self.multi else ""

    def redraw_curves(self) -> None:
        metric = self.metric.value
        title = f"{METRIC_TITLES.get(metric, metric)} over training{self._suffix()}" if self.multi else None
        guarded(self.curves, lambda: plots.plot_metric_timeline(self.metrics, metric=metric, step=self.step.value,
                                                                title=title))

    def redraw_step(self) -> None:
        step = self.step.value
        steps = self.timeline.steps
        # This run's latest observation at or before the step (its first when it starts later).
        i = max([j for j, s in enumerate(steps) if s <= step], key=lambda j: steps[j], default=0)
        guarded(self.heat, lambda: plots.plot_usage_heatmap(
            self.usages[i], title=f"router usage at step {steps[i]}{self._suffix()}"))
        # The curves stay; only the step marker (the dashed vertical line) moves.
        shapes = self.curves.figure.layout.shapes
        if shapes:
            with self.curves.figure.batch_update():
                shapes[0].x0 = shapes[0].x1 = step
        else:
            self.redraw_curves()
        self.move_experts_marker()

    # ---------------------------------------------------------------------------- experts view

    def _experts_view(self, observed: dict) -> list:
        """The experts' trajectories of a chosen bank, when the timelines kept their banks."""
        self.bank, self._traj = None, {}
        self.banked = {run: t for run, t in observed.items() if _has_banks(t)}
        if not self.banked:
            self.experts_note = caption("<b>Experts:</b> not shown — this timeline kept no copies of the banks. "
                                        "Observe with <code>Timeline(probe, track_experts=True)</code> (the default) "
                                        "to follow each expert over training.")
            return [self.experts_note]
        banks = [next(b for b in t.banks if b) for t in self.banked.values()]
        groups = [g for g in banks[0] if all(g in b for b in banks[1:])] or list(banks[0])
        self.bank = dropdown([(bank_label(g), g) for g in groups], value=groups[0], description="bank",
                             tooltip="The bank whose experts are followed over training")
        self.trajectories = FigurePane(560)
        left_out = [run for run in observed if run not in self.banked]
        where = " of every run" if self.multi and len(self.banked) > 1 else ""
        note = (f" Left out (no banks kept): {escape(', '.join(map(str, left_out)))}." if left_out else "")
        self.experts_note = caption(
            f"<b>Experts:</b> each expert of the bank over training, on the top two principal components of all "
            f"its experts at all steps{where} (hollow marker: the first step; large marker: the step above). "
            "Distinct experts trace separate paths; <b>collapsed</b> experts' lines run together. The axes say how "
            "much of the spread the plane keeps: experts that overlap on it may still differ in the directions "
            f"left out.{note}")
        return [row(self.bank), self.trajectories.box, self.experts_note]

    def _trajectories_of(self, group: str):
        if group not in self._traj:
            runs = self.banked if self.multi else next(iter(self.banked.values()))
            try:
                self._traj[group] = timeline_expert_trajectories(runs, group=group)
            except Exception as err:  # noqa: BLE001 — kept: a diverged bank is refused once, shown in the pane
                self._traj[group] = err
        if isinstance(self._traj[group], Exception):
            raise self._traj[group]
        return self._traj[group]

    def redraw_experts(self) -> None:
        if self.bank is None:
            return
        guarded(self.trajectories, lambda: plots.plot_expert_trajectories(
            self._trajectories_of(self.bank.value), step=self.step.value))

    def move_experts_marker(self) -> None:
        """Move the "now" markers of the experts view to the slider's step, in place."""
        if self.bank is None:
            return
        traj = self._traj.get(self.bank.value)
        if isinstance(traj, Exception):  # refused (a diverged bank): the pane says why
            return
        fig = self.trajectories.figure
        now = [t for t in fig.data if t.legendgroup == "now"]
        if traj is None or not now:
            self.redraw_experts()
            return
        points = trajectory_now(traj, self.step.value)
        if len(points) != len(now):
            self.redraw_experts()
            return
        with fig.batch_update():
            for trace, p in zip(now, points):
                trace.x, trace.y, trace.hovertext, trace.name = p["x"], p["y"], p["hovertext"], p["name"]
                trace.marker.color = p["marker"]["color"]
