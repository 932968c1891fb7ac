"""``RoutingMonitor``: router metrics while training, for whatever logger the run already has.

At each observation the monitor takes a recording — the training batches themselves since the
last observation (``traffic=True``: hooks on the forward passes the loop runs anyway, no second
forward), or a fixed probe batch run under ``no_grad`` — turns it into a flat ``{key: number}``
dict (docs/monitoring.md lists the keys) and runs ``diagnose``'s bank and router checks with
``diagnose``'s thresholds. A finding that holds for ``warn_after`` consecutive observations is
warned about once, through the ``transformers.trainer`` logger, and written into the next log;
``stop_on`` asks the training loop to stop.

Under ``torch.distributed`` every rank must call :meth:`RoutingMonitor.observe` at the same
steps (it is a collective): training traffic is gathered onto rank 0, which alone computes the
metrics and findings; the decision to stop is sent to every rank, so all of them stop together.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..analysis import bank_summary, diagnose, router_metrics
from ..analysis.diagnose import Thresholds, as_thresholds
from ..core import adapter_sites, router_sites
from ..core.errors import InputError, LilyLabTypeError
from ..core.layer import require_module
from ..observe import Routing, Timeline, bank_snapshot, record_routing
from ..observe.distributed import distributed_rank_world

logger = logging.getLogger("transformers.trainer")  # the Trainer's own logger: its warnings show where the Trainer's do

PREFIX = "lily"
#: The router metrics summarised per module across layers (docs/metrics.md).
SUMMARY_METRICS = ("load_entropy", "routing_mi", "max_usage", "z_loss")
#: Logged too for top-k routers (mixture-of-experts layers): the load each layer really sent
#: (docs/metrics.md, "Top-k routers"); Lily sites have none.
TOPK_METRICS = ("aux_loss", "tokens_min", "tokens_max", "tokens_std")
#: The statistics across a module's layers.
STATS = ("min", "median", "max")
#: The findings watched for an early warning: diagnose's bank and router checks.
WATCHED = ("inactive_adapter", "redundant_experts", "dominant_expert", "dead_expert", "input_blind_router")
PER = ("auto", "module", "site", "both")
#: per="auto" logs per site up to this many routed sites, per module above.
AUTO_SITES = 12
#: Token rows kept per site in a training-traffic recording (its sums are exact whatever this is).
TRAFFIC_TOKENS = 256


@dataclass
class EarlyWarning:
    """A finding that held for ``observations`` consecutive observations, ending at ``step``."""

    kind: str
    severity: str
    step: int
    observations: int
    sites: list[str]
    summary: str
    remedy: str

    def __str__(self) -> str:
        where = ", ".join(self.sites[:4]) + (f" (+{len(self.sites) - 4} more)" if len(self.sites) > 4 else "")
        return (f"lily_lab: {self.kind} ({self.severity}) for {self.observations} observations in a row, at step "
                f"{self.step}: {self.summary}. Where: {where}. Try: {self.remedy}")


class RoutingMonitor:
    """Router metrics and an early warning for a training loop of your own.

    ::

        monitor = lily_lab.RoutingMonitor(model)          # records the training batches
        for step, batch in enumerate(loader, 1):
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
            if step % 50 == 0:
                logs = monitor.observe(step)               # {"lily/q_proj/load_entropy/min": …, …}
                writer.log(logs, step)                     # any logger: W&B, TensorBoard, MLflow, print
                if monitor.should_stop:
                    break
        monitor.close()

    ``probe``: a batch (dict of model inputs, a ``labels`` entry used as annotation, or a tensor
    of ids) observed at each step instead of, or beside, the training traffic. ``traffic``: record
    the training batches (default: when no probe is given); only forwards made in training mode
    count, so an evaluation loop in between is left out. The metrics come from the traffic when it
    is recorded, else from the probe.

    ``per``: ``"module"`` (min / median / max across layers for each target module), ``"site"``
    (every site's metrics), ``"both"``, or ``"auto"`` (sites up to 12 routed sites, modules
    above). ``warn_after``: consecutive observations a finding must hold before the warning (once
    per kind). ``stop_on``: ``None``, ``"critical"`` or ``"warning"`` — the least severity of a
    warning that sets :attr:`should_stop`. ``thresholds``: ``diagnose``'s (a ``Thresholds`` or a
    dict of its fields).

    ``timeline`` keeps every observation (the probe's, or the traffic's), for
    ``TimelinePlayer`` / ``timeline_metrics`` and ``Timeline.save``; ``history`` every observation's
    dict with its ``"step"`` (``pandas.DataFrame(monitor.history)`` is a table over training).
    """

    def __init__(self, model: nn.Module, *, probe: Any = None, traffic: bool | None = None, per: str = "auto",
                 warn_after: int = 3, stop_on: str | None = None, thresholds: Thresholds | dict | None = None,
                 track_experts: bool = True, max_tokens: int = 2048, timeline: Timeline | None = None):
        require_module(model, "RoutingMonitor")
        traffic, self._thresholds = check_options("RoutingMonitor", probe=probe, traffic=traffic, per=per,
                                                  warn_after=warn_after, stop_on=stop_on, thresholds=thresholds,
                                                  timeline=timeline)
        routed = [s for s in adapter_sites(model) if s.router is not None and s.num_B >= 2] + router_sites(model)
        if not routed:
            raise InputError("RoutingMonitor: this model has no routed sites (Lily with num_B ≥ 2, or the top-k "
                             "routers of a mixture-of-experts model)")
        self.model = model
        self.traffic = traffic
        self.per = ("site" if len(routed) <= AUTO_SITES else "module") if per == "auto" else per
        self.warn_after = warn_after
        self.stop_on = stop_on
        self.timeline = timeline_for(timeline, probe, track_experts=track_experts, max_tokens=max_tokens)
        self.warnings: list[EarlyWarning] = []  # every warning given, in order
        self.history: list[dict[str, Any]] = []  # every observation's dict, with its "step" (rank 0)
        self.should_stop = False
        self.last_step: int | None = None
        self._last: dict[str, Any] = {}
        self._streaks: dict[str, int] = {}
        self._warned: set[str] = set()
        self._recording: contextlib.ExitStack | None = None
        self._recorder = None
        self._closed = False
        if traffic:
            self._start_traffic()

    # ------------------------------------------------------------------ public
    def observe(self, step: int) -> dict[str, Any]:
        """Observe now, as training step ``step``: the metrics (and any new warning) as a flat dict,
        also kept for :meth:`log_dict`. Every rank of a distributed run must call it (see the
        module docstring); ranks other than 0 get ``{}``."""
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise LilyLabTypeError(f"RoutingMonitor.observe: step must be an integer (the training step), got {step!r}")
        if self._closed:
            raise InputError("RoutingMonitor.observe: the monitor is closed (its hooks are removed); make a new one")
        step = int(step)
        rank, _ = distributed_rank_world()
        if self.traffic:
            routing = self._take_traffic().gather()  # a collective: rank 0 gets every rank's batches
            if self.timeline.probe is not None:  # the metrics from the traffic, the timeline from the probe
                self.observe_probe(step)
            elif rank == 0:
                self.timeline.add(step, routing, banks=self._banks() if self.timeline.track_experts else None)
        else:
            routing = self.observe_probe(step)
        logs: dict[str, Any] = {}
        if rank == 0:
            logs = self.metrics(routing)
            logs.update(self._warn(step, routing))
        self._sync_stop()
        self.last_step, self._last = step, logs
        if logs:
            self.history.append({"step": step, **logs})
        return dict(logs)

    def observe_probe(self, step: int) -> Routing:
        """Run the probe through the model at ``step`` (every rank: a sharded model's forward needs
        them all); rank 0 keeps it in :attr:`timeline`, the other ranks keep nothing."""
        t = self.timeline
        if distributed_rank_world()[0] == 0:
            return t.observe(self.model, step)
        return Timeline(t.probe, track_experts=t.track_experts, max_tokens=t.max_tokens).observe(self.model, step)

    def log_dict(self) -> dict[str, Any]:
        """The last observation's metrics (a copy): ``{key: float}``, plus ``lily/warning/<kind>``
        texts at the observation that gave a warning."""
        return dict(self._last)

    def metrics(self, routing: Routing) -> dict[str, float]:
        """``routing``'s router metrics and the model's banks as the flat dict :meth:`observe` logs."""
        m = router_metrics(routing)
        out: dict[str, float] = {}
        if self.per in ("module", "both"):
            for module, rows in m.groupby("module", sort=False):
                for metric in SUMMARY_METRICS + TOPK_METRICS:
                    values = rows[metric].dropna().to_numpy()
                    if len(values):
                        out[f"{PREFIX}/{module}/{metric}/min"] = float(values.min())
                        out[f"{PREFIX}/{module}/{metric}/median"] = float(np.median(values))
                        out[f"{PREFIX}/{module}/{metric}/max"] = float(values.max())
        if self.per in ("site", "both"):
            for row in m.itertuples():
                for metric in SUMMARY_METRICS + TOPK_METRICS:
                    value = getattr(row, metric)
                    if np.isfinite(value):
                        out[f"{PREFIX}/{site_key(row.site)}/{metric}"] = float(value)
        banks = bank_summary(self.model)
        for group, label in bank_labels(banks.group).items():
            cosine = banks.loc[banks.group == group, "mean_cosine"].iloc[0]
            if np.isfinite(cosine):  # an all-zero bank (a fresh init_weights=True one) has no cosine
                out[f"{PREFIX}/{label}/expert_cosine"] = float(cosine)
        return out

    def close(self) -> None:
        """Remove the training-traffic hooks (idempotent)."""
        self._stop_traffic()
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the hooks are gone; the timeline and warnings stay)."""
        return self._closed

    def __enter__(self) -> "RoutingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        source = "training traffic" if self.traffic else "a probe batch"
        return (f"RoutingMonitor({source}, per={self.per!r}, {len(self.timeline)} observations, "
                f"{len(self.warnings)} warnings)")

    # ------------------------------------------------------------------ traffic
    def _start_traffic(self) -> None:
        stack = contextlib.ExitStack()
        self._recorder = stack.enter_context(
            record_routing(self.model, max_tokens=TRAFFIC_TOKENS, gather=False, training_only=True,
                           token_sums=False))
        self._recording = stack

    def _stop_traffic(self) -> None:
        if self._recording is not None:
            self._recording.close()
            self._recording = self._recorder = None

    def _take_traffic(self) -> Routing:
        """What the training batches routed since the last observation; a new recording starts."""
        recorder = self._recorder
        self._stop_traffic()
        routing = recorder.routing
        self._start_traffic()
        return routing

    def _banks(self) -> dict[str, np.ndarray]:
        return bank_snapshot(self.model)

    # ------------------------------------------------------------------ early warning
    def _warn(self, step: int, routing: Routing) -> dict[str, Any]:
        """Count the watched findings; warn once per kind held ``warn_after`` observations in a row."""
        if any(routing.record(s).n_tokens for s in routing.sites):
            found = {f.kind: f for f in diagnose(self.model, routing, self._thresholds, checks=WATCHED).findings}
        else:  # nothing ran through the model since the last observation: nothing to judge
            found = {f.kind: f for f in diagnose(self.model, None, self._thresholds, checks=WATCHED).findings}
        logs: dict[str, Any] = {}
        for kind in WATCHED:
            finding = found.get(kind)
            logs[f"{PREFIX}/findings/{kind}"] = float(len(finding.sites)) if finding else 0.0
            self._streaks[kind] = self._streaks.get(kind, 0) + 1 if finding else 0
            if finding and self._streaks[kind] >= self.warn_after and kind not in self._warned:
                self._warned.add(kind)
                warning = EarlyWarning(kind, finding.severity, step, self._streaks[kind], list(finding.sites),
                                       finding.summary, finding.remedy)
                self.warnings.append(warning)
                logger.warning(str(warning))
                logs[f"{PREFIX}/warning/{kind}"] = f"{finding.severity}: {finding.summary} (step {step})"
                if self.stop_on == "warning" or (self.stop_on == "critical" and finding.severity == "critical"):
                    self.should_stop = True
        return logs

    def _sync_stop(self) -> None:
        """Rank 0 decides; every rank learns it (a rank that stopped alone would hang the others)."""
        rank, world = distributed_rank_world()
        if world == 1 or self.stop_on is None:
            return
        import torch.distributed as dist

        flag = [self.should_stop]
        dist.broadcast_object_list(flag, src=0)
        self.should_stop = bool(flag[0])


def check_options(fn: str, *, probe, traffic, per, warn_after, stop_on, thresholds, timeline) -> tuple:
    """The options of a monitor (``RoutingMonitor`` and ``RoutingCallback`` take the same),
    checked before any training runs: ``(traffic, Thresholds)``."""
    if timeline is not None and not isinstance(timeline, Timeline):
        raise LilyLabTypeError(f"{fn}: timeline must be a lily_lab.Timeline or None, got {type(timeline).__name__}")
    has_probe = probe is not None or (timeline is not None and timeline.probe is not None)
    if traffic is None:
        traffic = not has_probe
    if not isinstance(traffic, bool):
        raise LilyLabTypeError(f"{fn}: traffic must be True, False or None, got {traffic!r}")
    if not traffic and not has_probe:
        raise InputError(f"{fn} needs something to observe: a probe batch (probe=…) or the training batches "
                         f"(traffic=True)")
    if per not in PER:
        raise InputError(f"{fn}: per must be one of {list(PER)}, got {per!r}")
    if isinstance(warn_after, bool) or not isinstance(warn_after, int) or warn_after < 1:
        raise InputError(f"{fn}: warn_after must be an integer ≥ 1 (observations in a row), got {warn_after!r}")
    if stop_on not in (None, "critical", "warning"):
        raise InputError(f"{fn}: stop_on must be None, 'critical' or 'warning', got {stop_on!r}")
    return traffic, as_thresholds(thresholds)


#: The wrapper a PEFT model puts before every module name, left out of the keys: a site has the same
#: key under lily_lab's Lily and under PEFT's (``lily/model.layers.0.self_attn.q_proj/...``).
PEFT_PREFIX = "base_model.model."


def site_key(site: str) -> str:
    """The name a site is logged under: its module path, without PEFT's wrapper prefix."""
    return site.removeprefix(PEFT_PREFIX)


def timeline_for(timeline: Timeline | None, probe, *, track_experts: bool = True, max_tokens: int = 2048) -> Timeline:
    """The timeline a monitor keeps: ``timeline`` (given ``probe`` when one is passed), or a new one."""
    if timeline is None:
        return Timeline(probe, track_experts=track_experts, max_tokens=max_tokens)
    if probe is not None:
        timeline.probe = probe
    return timeline


def bank_labels(groups) -> dict[str, str]:
    """Group key (``q_proj:576x576``) → the name its bank is logged under: the target module
    (``q_proj``), or ``q_proj_576x576`` where one module name has banks of several shapes.
    No ``:`` (MLflow refuses it in metric names)."""
    groups = list(dict.fromkeys(groups))
    modules = [g.rpartition(":")[0] or g for g in groups]
    out = {}
    for g, mod in zip(groups, modules):
        out[g] = mod if modules.count(mod) == 1 else g.replace(":", "_")
    return out
