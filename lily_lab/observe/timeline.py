"""Routing over training: a ``Timeline`` of recordings on a fixed probe batch.

``observe`` keeps, per observed step, a small ``Routing`` (exact sums, a few sampled tokens)
and, optionally, a copy of every ``B`` bank. Turning them into metrics is ``analysis``'s job:
``lily_lab.timeline_metrics(timeline)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import adapter_sites
from .record import _to, device_of, evaluating, record_routing
from .routing import Routing, RoutingError


class Timeline:
    """Router recordings (and ``B`` banks) of one model at chosen training steps.

    ``probe`` is the batch every observation runs: a dict of model inputs (a ``labels`` entry is
    used as annotation, not passed to the model) or a tensor. Observations run in eval mode
    without gradients and put the model's mode back afterwards.

    Attributes, one entry per observation, in the order observed:

    - ``steps``: the training step of each observation (``int``).
    - ``routings``: the :class:`~lily_lab.Routing` recorded at each step.
    - ``banks``: with ``track_experts=True`` (the default), a copy of every bank at each step —
      a dict ``{group: np.ndarray of shape (E, r, d_out)}`` (float32, on the CPU; ``banks[i]
      [group][e]`` is expert ``B_e`` of that group at ``steps[i]``). Empty with
      ``track_experts=False``. ``lily_lab.timeline_expert_similarity`` and
      ``lily_lab.timeline_expert_trajectories`` read it.
    """

    def __init__(self, probe: Any = None, *, track_experts: bool = True, max_tokens: int = 2048):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise RoutingError(f"Timeline: max_tokens must be an integer ≥ 0, got {max_tokens!r}")
        _check_probe(probe, "Timeline")
        self.probe = probe
        self.track_experts = track_experts
        self.max_tokens = max_tokens
        self.steps: list[int] = []
        self.routings: list[Routing] = []
        self.banks: list[dict[str, np.ndarray]] = []  # per step: group → (E, r, d_out)

    def __len__(self) -> int:
        return len(self.steps)

    def observe(self, model: nn.Module, step: int, probe: Any = None) -> Routing:
        """Run the probe through ``model`` under a recorder and keep the result for ``step``."""
        from ..core.layer import require_module

        require_module(model, "Timeline.observe")
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise RoutingError(f"Timeline.observe: step must be an integer (the training step), got {step!r}")
        probe = self.probe if probe is None else probe
        if probe is None:
            raise RoutingError("Timeline.observe needs a probe batch: Timeline(probe=batch) or observe(model, step, probe)")
        _check_probe(probe, "Timeline.observe")
        device = device_of(model)
        labels = None
        with evaluating(model):
            # gather=False: every rank runs the same probe, so rank 0's recording is the whole story.
            with record_routing(model, max_tokens=self.max_tokens, gather=False) as rec, torch.no_grad():
                if isinstance(probe, Mapping):  # a dict, or a tokenizer's BatchEncoding
                    inputs = {k: v for k, v in probe.items() if k != "labels"}
                    labels = probe.get("labels")
                    model(**{k: _to(v, device) for k, v in inputs.items()})
                else:
                    model(probe.to(device))
                if labels is not None:
                    rec.annotate(labels=labels)
        routing = rec.routing
        self.steps.append(int(step))
        self.routings.append(routing)
        if self.track_experts:
            banks = {}
            for s in adapter_sites(model):
                if s.group not in banks:
                    B = s.B.detach()
                    if hasattr(B, "full_tensor"):  # an FSDP2 shard: gathered by every rank together
                        B = B.full_tensor()
                    banks[s.group] = B.float().cpu().numpy().copy()
            self.banks.append(banks)
        return routing


def _check_probe(probe: Any, fn: str) -> None:
    """A probe is a dict of model inputs or a tensor (or None: given later)."""
    if probe is not None and not isinstance(probe, (Mapping, torch.Tensor)):
        from ..core.errors import LilyLabTypeError

        raise LilyLabTypeError(f"{fn}: probe must be a dict of model inputs (tokenizer(texts, return_tensors='pt')) "
                               f"or a tensor of input ids, got {type(probe).__name__}")


def _make_callback():
    from transformers import TrainerCallback

    class RoutingCallback(TrainerCallback):
        """A transformers ``TrainerCallback`` that observes routing every ``every`` steps.

        ``callback.timeline`` holds the observations (step 0 before training starts, then every
        ``every`` optimizer steps, and the last step)::

            cb = RoutingCallback(probe=batch, every=20)
            Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
            lily_lab.timeline_metrics(cb.timeline)

        With several processes (torchrun, accelerate launch) every rank runs each observation —
        the same probe through the same weights, and a sharded (FSDP) model's forward needs every
        rank — but only the main process (``state.is_world_process_zero``) keeps it: the
        timeline stays empty on the other ranks.
        """

        def __init__(self, probe: Any = None, every: int = 50, timeline: Timeline | None = None,
                     track_experts: bool = True):
            if not isinstance(every, int) or every < 1:
                raise RoutingError(f"every must be an integer ≥ 1, got {every!r}")
            self.every = every
            self._observed: set[int] = set()  # steps observed, on every rank (the timeline: rank 0 only)
            self.timeline = timeline if timeline is not None else Timeline(probe, track_experts=track_experts)
            if probe is not None:
                self.timeline.probe = probe

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and state.global_step not in self._observed | set(self.timeline.steps):
                self._observe(model, state)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and state.global_step % self.every == 0:
                self._observe(model, state)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is not None and state.global_step not in self._observed | set(self.timeline.steps):
                self._observe(model, state)

        def _observe(self, model, state):
            # Every rank decides from the same step numbers, so all of them run the probe together.
            self._observed.add(state.global_step)
            if state.is_world_process_zero:
                self.timeline.observe(model, state.global_step)
            else:
                t = self.timeline
                Timeline(t.probe, track_experts=t.track_experts, max_tokens=t.max_tokens).observe(model, state.global_step)

    return RoutingCallback


_callback_class = None


def __getattr__(name: str):
    global _callback_class
    if name == "RoutingCallback":
        if _callback_class is None:
            _callback_class = _make_callback()
        return _callback_class
    raise AttributeError(name)
