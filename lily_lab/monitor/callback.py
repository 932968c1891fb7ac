"""``RoutingCallback``: a transformers ``TrainerCallback`` around a ``RoutingMonitor``.

The router metrics go into the logs the Trainer already writes, so every ``report_to`` backend
(TensorBoard, W&B, MLflow, …) gets them with no code of the user's. A Trainer hands each log to
its callbacks in order and puts the user's after the reporting ones, so the callback moves itself
in front of the reporting integrations when the Trainer is built and again when training begins
(docs/monitoring.md, "Where the metrics enter the logs").
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..core.errors import InputError
from ..observe import Timeline
from .monitor import RoutingMonitor, check_options, timeline_for

#: The file the callback keeps its timeline in, in the run's output_dir.
TIMELINE_FILE = "lily_timeline.npz"


def _make_callback():
    from transformers import TrainerCallback

    class RoutingCallback(TrainerCallback):
        """Router metrics in the Trainer's logs, an early warning, and a timeline saved with the run.

        ::

            trainer = Trainer(model, args, train_dataset=ds, callbacks=[lily_lab.RoutingCallback()])

        With no probe it records the training batches themselves (the forwards the Trainer runs
        anyway, under ``no_grad`` hooks; evaluation forwards left out), summed exactly from one
        logging step to the next; with ``probe=batch`` it runs that batch instead (``traffic=True``
        as well: metrics from the traffic, timeline from the probe). The metrics join the logs at
        each logging step (``lily/<module>/<metric>/min|median|max``, ``lily/<site>/<metric>``,
        ``lily/<bank>/expert_cosine``, ``lily/findings/<kind>``: docs/monitoring.md); ``per``
        chooses the keys as :class:`RoutingMonitor` does.

        ``every``: observe at every logging step (None, the default) or every ``every`` optimizer
        steps; only observations made at a logging step reach the logs, so pick a multiple of
        ``logging_steps``. A probe is also observed before training starts (step 0) and at the end.

        A finding of ``diagnose`` (inactive adapter, redundant experts, dominant or dead expert,
        input-blind router) that holds ``warn_after`` observations in a row is warned about once
        through the Trainer's logger and logged as ``lily/warning/<kind>`` (text); ``stop_on``
        (``"critical"`` or ``"warning"``) stops the run there (``control.should_training_stop``).

        ``callback.timeline`` holds the observations and, with ``save_timeline`` (default), is
        saved as ``<output_dir>/lily_timeline.npz`` at each checkpoint and at the end of training
        (``Timeline.load`` it on another machine for ``TimelinePlayer``).

        With several processes every rank takes part in each observation (traffic is gathered to
        rank 0; a probe runs on every rank); only the main process logs, keeps the timeline and
        saves it, and the decision to stop reaches every rank.
        """

        def __init__(self, probe: Any = None, every: int | None = None, timeline: Timeline | None = None,
                     track_experts: bool = True, *, traffic: bool | None = None, per: str = "auto",
                     warn_after: int = 3, stop_on: str | None = None, thresholds=None, save_timeline: bool = True):
            if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
                raise InputError(f"RoutingCallback: every must be None (every logging step) or an integer ≥ 1, "
                                 f"got {every!r}")
            traffic, _ = check_options("RoutingCallback", probe=probe, traffic=traffic, per=per,
                                       warn_after=warn_after, stop_on=stop_on, thresholds=thresholds,
                                       timeline=timeline)
            self.every = every
            self.timeline = timeline_for(timeline, probe, track_experts=track_experts)
            self.save_timeline = bool(save_timeline)
            # Made when training begins (it needs the model); closed (hooks removed) when it ends.
            self.monitor: RoutingMonitor | None = None
            self._options = dict(traffic=traffic, per=per, warn_after=warn_after, stop_on=stop_on,
                                 thresholds=thresholds)
            self._observed: set[int] = set()  # steps observed (on every rank)
            self._logged: set[int] = set()  # steps whose metrics went into a log

        # -------------------------------------------------------------- events
        def on_init_end(self, args, state, control, **kwargs):
            _move_before_reporters(self)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            _move_before_reporters(self)
            if model is None:
                return
            m = self.monitor
            if m is None or m.model is not model or m.closed:
                if m is not None:
                    m.close()
                self.monitor = RoutingMonitor(model, timeline=self.timeline, **self._options)
            if self.timeline.probe is not None and state.global_step not in self._observed | set(self.timeline.steps):
                self._observe(state, control, probe_only=True)

        def on_step_end(self, args, state, control, **kwargs):
            due = control.should_log if self.every is None else state.global_step % self.every == 0
            if self.monitor is not None and due and state.global_step not in self._observed:
                self._observe(state, control)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            m = self.monitor
            if m is None or logs is None or m.last_step != state.global_step or state.global_step in self._logged:
                return
            self._logged.add(state.global_step)
            if state.is_world_process_zero:
                metrics = m.log_dict()
                logs.update(metrics)
                # The Trainer copied this log into its history (trainer_state.json) before handing
                # it to the callbacks: the metrics go there too.
                history = state.log_history
                if history and history[-1].get("step") == state.global_step:
                    history[-1].update(metrics)

        def on_save(self, args, state, control, **kwargs):
            self._save(args, state)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if self.monitor is not None:
                if self.timeline.probe is not None and state.global_step not in self._observed:
                    self._observe(state, control, probe_only=True)
                self.monitor.close()  # its hooks removed; its warnings and timeline stay
            self._save(args, state)

        # -------------------------------------------------------------- helpers
        def _observe(self, state, control, probe_only: bool = False) -> None:
            """Every rank observes at the same steps (they decide from the same step numbers)."""
            self._observed.add(state.global_step)
            m = self.monitor
            if probe_only:  # before training (or after it): no traffic to take, the probe alone
                m.observe_probe(state.global_step)
                return
            m.observe(state.global_step)
            if m.should_stop:
                control.should_training_stop = True

        def _save(self, args, state) -> None:
            if self.save_timeline and state.is_world_process_zero and len(self.timeline) and args.output_dir:
                os.makedirs(args.output_dir, exist_ok=True)
                self.timeline.save(os.path.join(args.output_dir, TIMELINE_FILE))

        @property
        def warnings(self) -> list:
            """The early warnings given so far (``EarlyWarning``), in order."""
            return [] if self.monitor is None else list(self.monitor.warnings)

    return RoutingCallback


def _move_before_reporters(callback) -> None:
    """Put ``callback`` in front of the Trainer's reporting integrations (TensorBoard, W&B, MLflow…),
    so the metrics it adds to a log are in it when they write it.

    Callbacks receive no handle on the Trainer, so the handler is found as the caller: this runs
    inside ``CallbackHandler.call_event``, whose ``self`` is the handler. Nothing moves when it is
    not found (another trainer) or the order is already right."""
    from transformers.trainer_callback import CallbackHandler

    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return
        handler = frame.f_locals.get("self")
        if isinstance(handler, CallbackHandler):
            break
        frame = frame.f_back
    else:
        return
    callbacks = handler.callbacks
    if callback not in callbacks:
        return
    reporters = [i for i, cb in enumerate(callbacks) if type(cb).__module__.startswith("transformers.integrations")]
    here = callbacks.index(callback)
    if reporters and reporters[0] < here:
        callbacks.pop(here)
        callbacks.insert(reporters[0], callback)


_callback_class = None


def routing_callback_class():
    """The ``RoutingCallback`` class, made on first use (it subclasses transformers' TrainerCallback)."""
    global _callback_class
    if _callback_class is None:
        _callback_class = _make_callback()
    return _callback_class
