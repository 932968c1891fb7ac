"""``record_routing``: hooks that watch the routers during forward passes, removed on exit.

lily_lab layers report their routing through ``LilyLayer.register_routing_observer`` (nothing is
recomputed); PEFT ``lily`` layers are watched with a forward hook that recomputes ``h``, the logits
and ``p`` from the layer's input — the PEFT model is not modified. PEFT X-LoRA is watched at its
classifier (a forward hook, and one on its last module for the raw logits): each of its outputs
gives every X-LoRA layer's routing at once (:func:`lily_lab.core.xlora.xlora_routing`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import adapter_sites
from ..core.errors import LilyLabTypeError
from ..core.inject import kv_cache_of, past_length_of
from ..core.layer import LilyLayer, RoutingEvent, in_backward, require_module
from ..core.routers import RouterSite, router_output, router_sites
from ..core.xlora import XLoraSite, find_xlora, xlora_routing
from .routing import _NO_LABEL, LabelSums, Reservoir, Routing, RoutingError, SiteRecord, TokenSums, check_labels

DEFAULT_MAX_TOKENS = 100_000
# Per site and phase: token-id rows waiting to be summed are compacted (summed per distinct id) once
# they exceed this, or twice the distinct ids of the last compaction: memory stays bounded by the
# ids seen, not the tokens, over a long generation.
_COMPACT_ROWS = 1 << 10
_SUM_BYTES = 64 << 20  # float64 routing summed at once when calls are summed (several sites per slice)
_QUEUE_TOKENS = 4096  # tokens per site of consecutive steps of a generation summed together


# ---------------------------------------------------------------------- the recorder's state
@dataclass(slots=True)
class Report:
    """One site's routing in one call, as its layer reported it (detached, still on the device)."""

    site: str
    logits: torch.Tensor  # (*lead, E)
    probs: torch.Tensor  # (*lead, E)
    mixture: torch.Tensor  # the π applied: (E,) batch, (b, E) sequence, (*lead, E) token/causal/top-k
    chosen: torch.Tensor | None = None  # (*lead, k) the experts a top-k router sent each token to


@dataclass(slots=True)
class SequenceSums:
    """Exact sums per sequence of an open generation, at one site and phase, kept until its labels
    are known (given before or after the tokens are summed) and then added up per label."""

    count: np.ndarray  # (b,)  tokens
    probs: np.ndarray  # (b, E)  Σ_t p_t
    argmax: np.ndarray  # (b, E)  tokens whose top expert is e
    entropy: np.ndarray  # (b,)  Σ_t H(p_t), nats

    @classmethod
    def zeros(cls, b: int, E: int) -> "SequenceSums":
        return cls(np.zeros(b, dtype=np.int64), np.zeros((b, E)), np.zeros((b, E), dtype=np.int64), np.zeros(b))


@dataclass(eq=False, slots=True)
class Generation:
    """A run of top-level calls continuing one KV cache (a plain forward is a generation of one)."""

    seq_offset: int  # its first sequence's number in the recording
    b: int | None = None  # sequences (None until a routed layer or the inputs say)
    length: int = 0  # positions so far, cache included
    codes: np.ndarray | None = None  # label code per sequence, once annotated
    sums: dict[tuple[str, int], SequenceSums] = field(default_factory=dict)  # (site, phase) → per sequence
    calls: int = 0
    summed: bool = False  # some of its tokens were summed (and sampled) already


@dataclass(slots=True)
class CallIndex:
    """Where each token of a call's input (shaped ``lead``) is: its sequence and its position in
    the input, row-major; ``real`` the rows that are not padding (None: all)."""

    sequence: np.ndarray
    position: np.ndarray
    real: np.ndarray | None


@dataclass(eq=False, slots=True)
class Call:
    """One top-level forward call and what its sites reported, until summed."""

    id: int
    gen: Generation
    phase: int  # PHASES code: -1 no cache, 0 prefill, 1 decode
    past: int  # positions already in the KV cache
    mask: torch.Tensor | None  # (b, positions) attention mask, as given
    shape: tuple[int, ...] | None  # (b, t) of the input, when known
    input_ids: torch.Tensor | np.ndarray | None  # (b, t); a host array once summed
    n_sequences: int | None
    queued: bool = False
    index: dict[tuple, CallIndex] = field(default_factory=dict)  # per input shape, shared by its sites
    reports: list[Report] = field(default_factory=list)


@dataclass(slots=True)
class TokenRows:
    """Which call, sequence, position and token id each row of a summed block is; ``has_id`` the
    rows whose call had input ids (None: all)."""

    call: np.ndarray  # index into the block's calls
    sequence: np.ndarray  # in the call's batch
    position: np.ndarray  # in the sequence's padded text, cache included
    token_id: np.ndarray  # -1 where unknown
    has_id: np.ndarray | None

    def take(self, keep: np.ndarray | None) -> "TokenRows":
        if keep is None:
            return self
        has_id = self.has_id[keep] if self.has_id is not None else None
        return TokenRows(self.call[keep], self.sequence[keep], self.position[keep], self.token_id[keep], has_id)


@dataclass(slots=True)
class IdRows:
    """Routing of token ids waiting to be summed into a site's ``token_sums``: one row per
    occurrence (``counts`` None), or per distinct id once compacted (``counts`` its occurrences)."""

    ids: np.ndarray
    probs: np.ndarray  # (rows, E): p, or Σp per distinct id
    counts: np.ndarray | None = None


class Recorder:
    """Created by :func:`record_routing`. ``routing`` is the recording so far.

    **Cached generation.** A top-level call given a KV cache that already holds positions
    (``generate``'s decode steps) with the batch size of the open generation continues its
    sequences: the same sequence numbers, positions going on from the cache's length, no new
    sequences counted. Any other call starts a generation of its own (a plain forward is a
    generation of one call). Each token has a phase (``lily_lab.observe.PHASES``): ``"prefill"`` for a call
    given an empty KV cache (the prompt), ``"decode"`` for a call continuing one, ``None`` for a
    call given no cache. ``position`` is the token's column in its sequence's padded text: the
    prompt's padded columns, left padding included, then one per decode step.

    **PEFT X-LoRA.** Each X-LoRA layer is a site (kind ``"xlora"``, token routing) recorded from
    the classifier, which runs once per forward: ``probs`` are the layer's scalings as X-LoRA logs
    them (``get_scalings_log()``), ``logits`` the classifier's raw logits, the mixture the weights
    the layer applies (after ``top_k_lora`` / ``enable_softmax_topk`` and ``global_scaling_weight``;
    see :func:`lily_lab.core.xlora.xlora_routing`). X-LoRA's scaling pass (the base model run once
    without the adapters to feed the classifier) routes nothing and is not recorded. X-LoRA has no
    KV cache (its ``generate`` forces ``use_cache=False``): every generation step is a full
    forward over the whole text so far, so each step is recorded as a call of its own, with no
    phase, its sequences counted anew and the prompt's and earlier steps' tokens routed (and
    counted) again at every step; padding is left out by the attention mask as for any call.
    """

    def __init__(self, model: nn.Module, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
                 training_only: bool = False, token_sums: bool = True):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise RoutingError(f"max_tokens must be an integer ≥ 0, got {max_tokens!r}")
        for name, flag in (("training_only", training_only), ("token_sums", token_sums)):
            if not isinstance(flag, bool):
                raise LilyLabTypeError(f"{name} must be True or False, got {flag!r}")
        self._keep_token_sums = token_sums
        require_module(model, "record_routing")
        sites = adapter_sites(model)
        self._xlora = find_xlora(model)  # adapter_sites checked it already
        routed = [s for s in sites if s.router is not None] + router_sites(model) + \
            (self._xlora.sites if self._xlora is not None else [])
        if not routed:
            kinds = {}
            for s in sites:
                kinds[s.kind] = kinds.get(s.kind, 0) + 1
            names = {"peft-lora": "PEFT LoRA", "lily": "lily_lab Lily", "peft-lily": "PEFT Lily"}
            found = ", ".join(f"{n} {names.get(k, k)} site{'s' * (n != 1)}" for k, n in kinds.items()) \
                or "no adapter sites at all"
            raise RoutingError(f"nothing to record: this model has no routed sites ({found}, no router; "
                               "no mixture-of-experts router either: docs/beyond_lily.md says which are read)")
        self.model = model
        self._sites = routed
        records = {}
        for k, s in enumerate(routed):
            E = s.num_B
            if isinstance(s, RouterSite):
                routing, top_k = "top-k", s.top_k
            elif isinstance(s, XLoraSite):
                routing, top_k = s.routing, 0
            else:
                routing, top_k = (s.layer.routing if isinstance(s.layer, LilyLayer) else "batch"), 0
            rec = SiteRecord(s.name, s.module, s.group, s.index, s.kind, routing, E, top_k=top_k)
            # One seed for every site's token sample: each site is offered the same tokens call
            # by call, so every site keeps the same tokens and a sampled sentence can be shown
            # across all sites at once (the token views of the dashboard and the report).
            rec.tokens = Reservoir(max_tokens, {
                "probs": ((E,), np.float32), "logits": ((E,), np.float32), "call": ((), np.int64),
                "sequence": ((), np.int64), "position": ((), np.int64), "token_id": ((), np.int64),
                "label": ((), np.int64), "phase": ((), np.int8)}, seed=seed)
            rec.mixtures = Reservoir(max_tokens, {
                "mixture": ((E,), np.float32), "call": ((), np.int64), "sequence": ((), np.int64),
                "phase": ((), np.int8)}, seed=seed + 2 * k + 1)
            records[s.name] = rec
        self._routing = Routing(records, max_tokens=max_tokens)
        self._handles: list[Any] = []
        self._depth = 0
        # training_only: calls made with the watched model in eval mode (a Trainer's evaluation
        # loop) are not recorded; _skipping is set for the whole of such a call.
        self._training_only = training_only
        self._skipping = False
        self._call: Call | None = None  # the last top-level call
        # Finished calls not summed yet: consecutive steps of one generation of one phase and
        # shape, summed together (a decode step is a tiny call; its sums cost as much as a big one's).
        self._queue: list[Call] = []
        self._queue_tokens = 0
        self._gen: Generation | None = None  # the open generation: its sequences and per-sequence sums
        # Per (site, phase code), token ids waiting to be summed into token_sums, which happens
        # when the routing is read (one pass over the distinct ids, not one per call): one IdRows
        # per call, or one of distinct ids once compacted; and how many rows wait.
        self._token_rows: dict[tuple[str, int], list[IdRows]] = {}
        self._token_row_count: dict[tuple[str, int], int] = {}
        self._compacted: dict[tuple[str, int], int] = {}  # distinct ids at the last compaction
        self._touched: dict[str, set] = {}  # per site, token ids whose totals are to be re-added
        # The watched top-level modules: the model and, for a PEFT model, the model it wraps
        # (PEFT's generate calls that one directly). Nested calls are one call (see _depth).
        self._hooked = [model]
        get_base = getattr(model, "get_base_model", None)
        if callable(get_base):
            try:
                base = get_base()
            except Exception:  # noqa: BLE001 - a wrapper that cannot give its base: watch the model only
                base = None
            if isinstance(base, nn.Module) and base is not model:
                self._hooked.append(base)
        self._arg_pos: dict[int, tuple[int | None, int | None]] = {}
        for m in self._hooked:
            mask_pos = ids_pos = None
            try:
                params = list(inspect.signature(m.forward).parameters)
                mask_pos = params.index("attention_mask") if "attention_mask" in params else None
                ids_pos = params.index("input_ids") if "input_ids" in params else None
            except (TypeError, ValueError):
                pass
            self._arg_pos[id(m)] = (mask_pos, ids_pos)

    # ------------------------------------------------------------------ public
    @property
    def routing(self) -> Routing:
        """The recording, every call so far folded in (its sums are complete when read here)."""
        self._flush()
        return self._routing

    def annotate(self, labels=None, input_ids=None) -> None:
        """Tag the sequences of the last forward call with ``labels`` (one per sequence) and/or
        their ``input_ids`` (``batch × positions``, when the model was not called with them).

        After ``generate`` (a cached generation: see :class:`Recorder`), ``labels`` tag every token
        of the generation, prompt and generated alike, also when the recording was read in between;
        a generation is labelled once. ``input_ids`` tag one plain forward call only, before the
        recording is read: ``generate`` passes its ``input_ids`` itself, so a generation of several
        calls refuses them."""
        gen, call = self._gen, self._call
        if gen is None or call is None:
            raise RoutingError("annotate tags the last forward call, but no call was recorded")
        n = gen.b
        if n is None:
            raise RoutingError("annotate tags the last forward call, but no routed layer ran in it")
        ids = None
        if input_ids is not None:
            if gen.calls > 1:
                raise RoutingError(
                    f"annotate(input_ids=…) tags one forward call, but the last call continued a cached "
                    f"generation of {gen.calls} calls: call the model with input_ids (generate does)")
            if call.queued:
                raise RoutingError("annotate(input_ids=…) must come before the recording is read: the last "
                                   "call's tokens were already summed")
            ids = torch.as_tensor(input_ids).detach()
            shape = call.shape
            if ids.dim() != 2 or (shape is not None and tuple(ids.shape) != shape) or ids.shape[0] != n:
                raise RoutingError(
                    f"annotate got input_ids of shape {tuple(ids.shape)}, but the last call had "
                    f"{n} sequences{f' of shape {shape}' if shape else ''}"
                )
        if labels is not None:
            labels = _as_list(labels)
            if len(labels) != n:
                raise RoutingError(f"annotate got {len(labels)} labels, but the last call had {n} sequences")
            check_labels(labels)  # before anything is recorded: a refused call can be repeated
            if gen.codes is not None:
                raise RoutingError("the sequences of the last call (or generation) are already labelled")
        if ids is not None:
            call.input_ids = ids
        if labels is not None:
            r = self._routing
            for v in labels:
                if v not in r.labels:
                    r.labels.append(v)
            codes = gen.codes = np.array([r.labels.index(v) for v in labels], dtype=np.int64)
            if gen.summed:  # tokens already sampled: relabel them by their sequence
                lo = gen.seq_offset
                for name in r.sites:
                    cols = r.record(name).tokens.columns
                    seq = cols["sequence"]
                    hit = np.flatnonzero((seq >= lo) & (seq < lo + n))
                    cols["label"][hit] = codes[seq[hit] - lo]
            self._fold_labels()

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        for m in self._hooked:
            self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        if self._xlora is not None:
            self._xlora_logits = None
            logits_module = self._xlora.logits_module
            if logits_module is not None:
                self._handles.append(logits_module.register_forward_hook(self._xlora_logits_hook))
            self._handles.append(self._xlora.classifier.register_forward_hook(self._xlora_hook))
        for s in self._sites:
            if isinstance(s, XLoraSite):
                continue  # recorded from the classifier
            if isinstance(s, RouterSite):
                self._handles.append(s.layer.register_forward_hook(self._router_hook(s)))
            elif isinstance(s.layer, LilyLayer):
                self._handles.append(s.layer.register_routing_observer(self._lily_observer(s.name)))
            else:
                self._handles.append(s.layer.register_forward_hook(self._peft_hook(s)))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module, args, kwargs):
        self._depth += 1
        if self._depth > 1:
            return
        self._skipping = self._training_only and not module.training
        if self._skipping:  # not recorded; annotate() after it refuses rather than tag an older call
            self._enqueue()
            self._call = None
            return
        mask_pos, ids_pos = self._arg_pos.get(id(module), (None, None))
        mask = kwargs.get("attention_mask")
        if mask is None and mask_pos is not None and len(args) > mask_pos:
            mask = args[mask_pos]
        ids = kwargs.get("input_ids")
        if ids is None and ids_pos is not None and len(args) > ids_pos:
            ids = args[ids_pos]
        embeds = kwargs.get("inputs_embeds")
        cache = kv_cache_of(kwargs)
        past = past_length_of({"cache": cache}) if cache is not None else 0
        phase = -1 if cache is None else 1 if past > 0 else 0
        mask = mask.detach() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ids = ids.detach() if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        if ids is not None:
            shape = tuple(ids.shape)
        elif isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
            shape = tuple(embeds.shape[:2])
        elif mask is not None:  # a decode step's mask covers the cache and the input
            shape = (mask.shape[0], mask.shape[1] - past) if 0 < past < mask.shape[1] else tuple(mask.shape)
        else:
            shape = None
        b = shape[0] if shape else None
        gen = self._gen
        continues = past > 0 and gen is not None and b is not None and gen.b == b and past <= gen.length
        self._enqueue()
        last = self._queue[-1] if self._queue else None
        if not (continues and last is not None and last.gen is gen and last.phase == phase
                and last.shape == shape and self._queue_tokens < _QUEUE_TOKENS):
            self._sum_queue()
        r = self._routing
        if not continues:
            self._close_generation()
            gen = self._gen = Generation(seq_offset=r.n_sequences)
            if b is not None:
                self._start_sequences(gen, b)
        gen.calls += 1
        if shape is not None and len(shape) == 2:
            gen.length = past + shape[1]
        self._call = Call(id=r.n_calls, gen=gen, phase=phase, past=past, mask=mask, shape=shape, input_ids=ids,
                          n_sequences=b)
        r.n_calls += 1

    def _start_sequences(self, gen: Generation, b: int) -> None:
        gen.b = b
        self._routing.n_sequences += b

    def _post(self, module, args, kwargs, output):
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._skipping = False

    def _lily_observer(self, name: str):
        def observe(event: RoutingEvent) -> None:
            call = self._call
            if self._skipping:
                return
            if call is None or self._depth == 0 or call.n_sequences is None:
                self._record(name, event.logits, event.probs, event.mixture)
            else:  # the common case, as cheap as can be: a decode step reports 60 sites or so
                call.reports.append(Report(name, event.logits, event.probs, event.mixture))  # detached already
        return observe

    def _peft_hook(self, site):
        E = site.num_B

        def hook(module, args, output):
            if in_backward():  # gradient checkpointing recomputing the forward: already recorded
                return
            with torch.no_grad():
                x = args[0]
                h = F.linear(x.to(site.A.dtype), site.A)
                logits = F.linear(h, site.router)
                probs = torch.softmax(logits, dim=-1)
                mixture = probs.reshape(-1, E).mean(dim=0)  # PEFT's rule: every token of the call
            self._record(site.name, logits, probs, mixture)
        return hook

    def _router_hook(self, site: RouterSite):
        def hook(module, args, output):
            if in_backward() or self._skipping:
                return
            logits, probs, mixture, chosen = router_output(site, output)
            # A router sees the layer's tokens flattened (N = batch × positions): given back the
            # call's (batch, positions) shape, its tokens are placed like any other site's.
            call = self._call
            shape = call.shape if call is not None and self._depth > 0 else None
            if shape is not None and len(shape) == 2 and shape[0] * shape[1] == probs.shape[0]:
                lead = tuple(shape)
                logits, probs, mixture, chosen = (t.reshape(*lead, t.shape[-1]) for t in (logits, probs, mixture, chosen))
            self._record(site.name, logits, probs, mixture, chosen)
        return hook

    def _xlora_logits_hook(self, module, args, output):
        self._xlora_logits = output if isinstance(output, torch.Tensor) else None

    def _xlora_hook(self, module, args, output):
        """One X-LoRA classifier call: every X-LoRA site's routing, from the scalings it returned."""
        logits, self._xlora_logits = self._xlora_logits, None
        if in_backward() or self._skipping:
            return
        for name, (lg, probs, mixture) in xlora_routing(self._xlora, output, logits).items():
            self._record(name, lg, probs, mixture)

    # ------------------------------------------------------------------ recording
    def _record(self, name: str, logits: torch.Tensor, probs: torch.Tensor, mixture: torch.Tensor,
                chosen: torch.Tensor | None = None) -> None:
        if self._skipping or (self._depth == 0 and self._training_only and not self.model.training):
            return
        call = self._call
        if call is None or self._depth == 0:  # a layer called outside the watched model's forward
            self._pre(self.model, (), {})
            self._depth -= 1
            call = self._call
        if call.n_sequences is None:
            lead = tuple(probs.shape[:-1])
            call.n_sequences = lead[0] if lead else 1
            call.shape = lead if len(lead) == 2 else None
            gen = call.gen
            if gen.b is None:
                self._start_sequences(gen, call.n_sequences)
            if len(lead) == 2:
                gen.length = call.past + lead[1]
        # Kept as they are until the call is summed; then the sites are summed together.
        call.reports.append(Report(name, logits.detach(), probs.detach(), mixture.detach(),
                                   None if chosen is None else chosen.detach()))

    def _enqueue(self) -> None:
        """Put the last call, finished, in the queue of calls to sum."""
        call = self._call
        if call is None or call.queued:
            return
        call.queued = True
        self._queue.append(call)
        if call.reports:
            p = call.reports[0].probs
            self._queue_tokens += p.numel() // max(p.shape[-1], 1) if p.dim() else 1

    def _sum_queue(self) -> None:
        """Sum the queued calls: each run of calls whose sites reported alike, together."""
        calls, self._queue, self._queue_tokens = self._queue, [], 0
        run, run_sig = [], None
        for call in calls:
            sig = tuple((e.site, e.probs.shape, e.probs.dtype, e.mixture.shape, e.chosen is None) for e in call.reports)
            if run and sig != run_sig:
                self._sum_calls(run)
                run = []
            run.append(call)
            run_sig = sig
        if run:
            self._sum_calls(run)

    def _sum_calls(self, calls: list[Call]) -> None:
        """Sum and sample what every site routed in ``calls`` (consecutive calls of one generation
        and phase whose sites reported the same shapes): the sites of one input shape together, in a
        few array operations, rather than the same dozens of small ones per site and call."""
        per_call = [c.reports for c in calls]
        for c in calls:
            c.reports = []
            c.gen.summed = True
        groups: dict[tuple, list[int]] = {}
        for i, e in enumerate(per_call[0]):
            key = (tuple(e.probs.shape), e.probs.dtype, e.probs.device, tuple(e.mixture.shape),
                   None if e.chosen is None else e.chosen.shape[-1])
            groups.setdefault(key, []).append(i)
        for (shape, _, _, _, _), idx in groups.items():
            # As many sites at once as fit in _SUM_BYTES of float64: a huge call is summed in
            # slices rather than holding a copy of every site's routing at once.
            per_site = 2 * shape[-1] * max(math.prod(shape[:-1]), 1) * 8 * len(calls)
            step = max(1, _SUM_BYTES // per_site)
            for start in range(0, len(idx), step):
                sites = [[reports[i] for reports in per_call] for i in idx[start : start + step]]
                self._sum_block(calls, sites, shape)

    def _sum_block(self, calls: list[Call], sites: list[list[Report]], shape: tuple) -> None:
        """Sum the routing of some sites of one input shape in ``calls`` into their records;
        ``sites[j][k]`` is what site j reported in call k."""
        E, lead = shape[-1], shape[:-1]
        K, S = len(calls), len(sites)
        if len(lead) >= 2:
            b, t = lead[0], math.prod(lead[1:])
        elif len(lead) == 1:
            b, t = lead[0], 1
        else:
            b, t = 1, 1
        n = b * t

        def stacked(what: str) -> torch.Tensor:  # (sites, calls × tokens, E), call-major within a site
            return torch.stack([getattr(r, what) for site in sites for r in site]).reshape(S, K * n, E)

        # One copy to the host: (sites, tokens, 2E), columns [p | logits], float64 as every sum is;
        # for top-k routers a third block of E columns, the times each token was sent to each expert.
        parts = [stacked("probs").float(), stacked("logits").float()]
        if sites[0][0].chosen is not None:
            chosen = torch.stack([r.chosen for site in sites for r in site]).reshape(S, K * n, -1)
            sent = torch.zeros(S, K * n, E, device=chosen.device).scatter_add_(
                2, chosen, torch.ones(chosen.shape, device=chosen.device))
            parts.append(sent)
        X = torch.cat(parts, dim=2).cpu().numpy().astype(np.float64)
        # Which call, sequence, position and token id each row is; which rows are real tokens.
        indices, positions, token_ids = [], [], []
        for call in calls:
            ix = self._token_index(call, lead, b, t)
            ids = call.input_ids
            if ids is not None and not isinstance(ids, np.ndarray):
                ids = call.input_ids = ids.cpu().numpy().astype(np.int64)
            indices.append(ix)
            positions.append(ix.position + call.past)
            token_ids.append(ids[ix.sequence, ix.position] if ids is not None and ids.shape == (b, t) else None)
        has_id = None if all(tok is not None for tok in token_ids) else \
            np.repeat([tok is not None for tok in token_ids], n)
        rows = TokenRows(call=np.repeat(np.arange(K), n), sequence=np.tile(indices[0].sequence, K),
                         position=np.concatenate(positions), has_id=has_id,
                         token_id=np.concatenate([np.full(n, -1) if tok is None else tok for tok in token_ids]))
        real = None if all(ix.real is None for ix in indices) else np.concatenate(
            [k * n + (np.arange(n) if ix.real is None else ix.real) for k, ix in enumerate(indices)])
        if np.isfinite(X).all():
            self._sum_sites(calls, sites, X, rows, keep=real, b=b, E=E)
            return
        is_real = np.zeros(K * n, dtype=bool)
        is_real[slice(None) if real is None else real] = True
        for j, site in enumerate(sites):  # rare: each site drops its own non-finite tokens
            finite = np.isfinite(X[j]).all(axis=1)
            rec = self._routing.record(site[0].site)
            rec.phase_record(calls[0].phase).nonfinite += int((is_real & ~finite).sum())
            self._sum_sites(calls, [site], X[j : j + 1], rows, keep=np.flatnonzero(is_real & finite), b=b, E=E)

    def _sum_sites(self, calls: list[Call], sites: list[list[Report]], X: np.ndarray, rows: TokenRows, *,
                   keep: np.ndarray | None, b: int, E: int) -> None:
        """Fold ``X`` (sites × rows × 2E: p | logits, and a third block of E for top-k routers:
        the times each token was sent to each expert) of ``sites`` (``sites[j][k]``: site j in call
        k) into their records, keeping the rows ``keep`` (None: all); ``b`` sequences per call."""
        if keep is not None:
            X = X[:, keep]
        rows = rows.take(keep)
        kcol, seq_c, pos_c, tok_c, has_id = rows.call, rows.sequence, rows.position, rows.token_id, rows.has_id
        K = len(calls)
        P, LG = X[..., :E], X[..., E:2 * E]  # (sites, tokens, E)
        dispatch = X[..., 2 * E:].sum(axis=1).round().astype(np.int64) if X.shape[-1] > 2 * E else None
        S, m = P.shape[:2]
        # Entropy and logsumexp through torch's vectorised float64 log/exp (views of the same
        # arrays): 3-5× numpy's time at these sizes, equal to it within an ulp.
        H = torch.special.entr(torch.from_numpy(P)).sum(dim=-1).numpy()  # (sites, tokens), nats
        top = P.argmax(axis=2) if m else np.zeros((S, 0), dtype=np.int64)
        p_sum, H_sum = P.sum(axis=1), H.sum(axis=1)
        argmax_counts = np.bincount((top + E * np.arange(S)[:, None]).reshape(-1), minlength=S * E).reshape(S, E)
        if m:
            lse = torch.logsumexp(torch.from_numpy(LG), dim=-1).numpy()  # (sites, tokens)
            z_sum = (lse ** 2).sum(axis=1)
        gen, phase = calls[0].gen, calls[0].phase
        B, lo = gen.b, gen.seq_offset
        call_ids = np.array([c.id for c in calls])
        call_col, seq_col = call_ids[kcol], lo + seq_c
        phase_col = np.full(m, phase, dtype=np.int8)
        labelled = B == b  # rows of another batch size than the generation's (rare) take no label
        label_col = gen.codes[seq_c] if gen.codes is not None and labelled else np.full(m, _NO_LABEL)
        # Per sequence of the generation, every site at once (for its labels, given now or later):
        # token count, Σp, argmax counts, ΣH.
        B = B if labelled else 1
        onehot = np.zeros((B, m))
        seq_l = seq_c if labelled else np.zeros(m, dtype=np.int64)
        onehot[seq_l, np.arange(m)] = 1.0
        seq_count = np.bincount(seq_l, minlength=B)
        seq_p = np.matmul(onehot, P)  # (sites, B, E)
        seq_top = np.matmul(onehot, np.eye(E)[top]).round().astype(np.int64)
        seq_H = np.matmul(H, onehot.T)  # (sites, B)
        mix_all = None  # every site's applied mixtures, copied once when a site needs them
        for j, site in enumerate(sites):
            name, mixture = site[0].site, site[0].mixture
            rec = self._routing.record(name)
            ph = rec.phases.get(phase) or rec.phase_record(phase)
            p = P[j]
            ph.n_tokens += m
            ph.sum_probs += p_sum[j]
            ph.sum_token_entropy += float(H_sum[j])
            ph.argmax_counts += argmax_counts[j]
            if dispatch is not None:
                ph.dispatch_counts += dispatch[j]
            if m:
                ph.sum_z += float(z_sum[j])
            ph.n_calls += K
            # The mixture applied to each kept token, and sampled mixture rows. Token routing's
            # mixture is p itself, already on the host; causal routing's (per token, running means)
            # and the per-sequence and per-call mixtures are copied.
            dims = mixture.dim()
            if rec.routing == "token" and rec.kind != "xlora":  # X-LoRA's applied weights are not p
                mix_tok = p
                mixed = {"mixture": p.astype(np.float32), "call": call_col, "sequence": seq_col, "phase": phase_col}
            else:
                if mix_all is None:
                    mix_all = torch.stack([r.mixture for s in sites for r in s]).float().cpu().numpy()
                    mix_all = mix_all.reshape(len(sites), K, -1, E).astype(np.float64)
                mix = mix_all[j]  # (calls, rows per call, E)
                if dims > 2 or (dims == 2 and mixture.shape[0] != b):  # per token, not p: causal routing
                    mix_tok = mix.reshape(-1, E)
                    mix_tok = mix_tok if keep is None else mix_tok[keep]
                    mixed = {"mixture": mix_tok.astype(np.float32), "call": call_col, "sequence": seq_col,
                            "phase": phase_col}
                elif dims == 2:  # sequence routing: one row per sequence and call
                    mix_tok = mix[kcol, seq_c]
                    mixed = {"mixture": mix.reshape(-1, E).astype(np.float32), "call": np.repeat(call_ids, b),
                            "sequence": lo + np.tile(np.arange(b), K), "phase": np.full(K * b, phase, dtype=np.int8)}
                else:  # batch routing: one mixture per call
                    mix_tok = mix[kcol, 0]
                    mixed = {"mixture": mix[:, 0].astype(np.float32), "call": call_ids,
                            "sequence": np.full(K, -1), "phase": np.full(K, phase, dtype=np.int8)}
            if np.isfinite(mix_tok).all():
                ph.sum_mixture += mix_tok.sum(axis=0)
            rec.mixtures.add(mixed)
            ph.mixtures.seen += len(mixed["call"])
            rec.tokens.add({
                "probs": p.astype(np.float32), "logits": LG[j].astype(np.float32), "call": call_col,
                "sequence": seq_col, "position": pos_c, "token_id": tok_c, "label": label_col, "phase": phase_col})
            ph.tokens.seen += m
            if labelled:
                acc = gen.sums.get((name, phase))
                if acc is None:
                    acc = gen.sums[(name, phase)] = SequenceSums.zeros(B, E)
                acc.count += seq_count
                acc.probs += seq_p[j]
                acc.argmax += seq_top[j]
                acc.entropy += seq_H[j]
            with_id = slice(None) if has_id is None else has_id
            tok = tok_c[with_id] if self._keep_token_sums else tok_c[:0]
            if len(tok):
                key = (name, phase)
                p_tok = p[with_id]  # a copy: a view would keep the call's whole [p | logits] block alive
                p_tok = p_tok.copy() if p_tok.base is not None else p_tok
                self._token_rows.setdefault(key, []).append(IdRows(tok, p_tok))
                self._token_row_count[key] = self._token_row_count.get(key, 0) + len(tok)
                if self._token_row_count[key] > max(_COMPACT_ROWS, 2 * self._compacted.get(key, 0)):
                    self._compact_token_rows(key)

    @staticmethod
    def _token_index(call: Call, lead: tuple, b: int, t: int) -> CallIndex:
        """Where each token of an input shaped ``lead`` is; computed once per call and shape,
        shared by the call's sites."""
        cached = call.index.get(lead)
        if cached is None:
            rows = None
            mask, past = call.mask, call.past
            if mask is not None and len(lead) == 2 and mask.shape[0] == b:
                if mask.shape[1] == t:
                    cols = mask
                elif past and mask.shape[1] == past + t:  # a decode step's mask: cache and input
                    cols = mask[:, past:]
                else:
                    cols = None
                if cols is not None:
                    real = cols.cpu().numpy().reshape(-1) != 0
                    rows = None if real.all() else np.flatnonzero(real)
            cached = call.index[lead] = CallIndex(np.repeat(np.arange(b), t), np.tile(np.arange(t), b), rows)
        return cached

    def _fold_labels(self) -> None:
        """Add the open generation's per-sequence sums to the label sums, once it is labelled."""
        gen = self._gen
        if gen is None or gen.codes is None or not gen.sums:
            return
        r = self._routing
        codes, L = gen.codes, len(r.labels)
        for (name, phase), seq in gen.sums.items():
            rec = r.record(name).phase_record(phase)
            E = rec.num_B
            c_sum = np.bincount(codes, weights=seq.count, minlength=L)
            lp, lt = np.zeros((L, E)), np.zeros((L, E), dtype=np.int64)
            lh = np.bincount(codes, weights=seq.entropy, minlength=L)
            np.add.at(lp, codes, seq.probs)
            np.add.at(lt, codes, seq.argmax)
            for c in np.flatnonzero(c_sum).tolist():
                rec.label_sums.setdefault(c, LabelSums.zeros(E)).add(
                    LabelSums(int(round(c_sum[c])), lp[c], lt[c], float(lh[c])))
        gen.sums = {}

    def _close_generation(self) -> None:
        """The open generation is over: its labels (if any) folded in, its per-sequence sums dropped."""
        self._fold_labels()
        self._gen = None

    def _flush(self) -> None:
        """Sum every call so far into the recording: per-phase sums, labels of a labelled
        generation, token ids, and the totals (the phases added up)."""
        self._enqueue()
        self._sum_queue()
        self._fold_labels()
        self._fold_token_sums()
        r = self._routing
        for name in r.sites:
            r.record(name).sum_phases(token_ids=self._touched.pop(name, ()))

    def _compact_token_rows(self, key: tuple[str, int]) -> None:
        """Sum a site's waiting rows per id, in stream order, into one ``(distinct ids, Σp, counts)``."""
        parts = self._token_rows.pop(key, [])
        self._token_row_count.pop(key, None)
        if not parts:
            return
        E = self._routing.record(key[0]).num_B
        tok = np.concatenate([pt.ids for pt in parts])
        p = np.concatenate([pt.probs for pt in parts]).reshape(-1, E)
        weight = np.concatenate([np.ones(len(pt.ids), dtype=np.int64) if pt.counts is None else pt.counts
                                 for pt in parts])
        uniq, inv = np.unique(tok, return_inverse=True)
        sums = np.stack([np.bincount(inv, weights=p[:, e], minlength=len(uniq)) for e in range(E)], axis=1)
        counts = np.bincount(inv, weights=weight, minlength=len(uniq)).astype(np.int64)
        self._token_rows[key] = [IdRows(uniq, sums, counts)]
        self._token_row_count[key] = self._compacted[key] = len(uniq)

    def _fold_token_sums(self) -> None:
        """Add the waiting token rows into each site's per-phase ``token_sums`` (token id → TokenSums)."""
        for key in list(self._token_rows):
            self._compact_token_rows(key)
            (compacted,) = self._token_rows.pop(key)
            uniq, sums, counts = compacted.ids, compacted.probs, compacted.counts
            self._token_row_count.pop(key, None)
            self._compacted.pop(key, None)
            name, phase = key
            token_sums = self._routing.record(name).phase_record(phase).token_sums
            ids = uniq.tolist()
            self._touched.setdefault(name, set()).update(ids)
            for u, c, row in zip(ids, counts.tolist(), sums):
                acc = token_sums.get(u)
                if acc is None:
                    token_sums[u] = TokenSums(c, row)
                else:
                    acc.count += c
                    acc.probs = acc.probs + row


@contextlib.contextmanager
def record_routing(model: nn.Module, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
                   gather: bool | None = None, training_only: bool = False,
                   token_sums: bool = True) -> Iterator[Recorder]:
    """Record what every router of ``model`` does during the forward calls inside the block.

    ``max_tokens`` bounds the per-site sample of tokens kept for token-level views; the metrics'
    sums are exact whatever it is. Hooks are removed when the block exits, also on error::

        with record_routing(model) as rec:
            model(**batch)
            rec.annotate(labels=batch_labels)
        routing = rec.routing

    Around ``model.generate`` the prompt and the generated tokens are kept apart (see
    :class:`Recorder`): ``rec.routing.phase("prefill")`` and ``.phase("decode")`` are recordings of
    each, with exact sums; ``rec.annotate(labels=…)`` after ``generate`` labels the whole generation.

    Under ``torch.distributed`` each rank records its own calls; when the block exits without
    error, ``gather`` (``None``: whenever a process group of several processes is initialised)
    merges every rank's recording into rank 0's ``rec.routing`` (``Routing.gather``); the other
    ranks keep their own. Every rank must then leave the block: pass ``gather=False`` to record
    on one rank only.

    ``training_only=True`` records only the calls made while ``model`` is in training mode: a
    block open over a whole ``Trainer`` run keeps the training batches and leaves out the
    evaluation loop's forwards (``RoutingMonitor`` records training traffic this way).
    ``token_sums=False`` keeps no per-token-id sums (``top_tokens`` and ``Routing.token_table``'s
    per-id totals then have nothing to show); memory no longer grows with the ids seen.
    """
    from .distributed import should_gather

    gather = should_gather(gather)
    recorder = Recorder(model, max_tokens=max_tokens, seed=seed, training_only=training_only, token_sums=token_sums)
    recorder._attach()
    try:
        yield recorder
    finally:
        recorder._detach()
        recorder._depth = 0
        recorder._flush()
    if gather:  # not reached when the block raised: a failing rank does not enter the collective
        recorder._routing = recorder._routing.gather()


def record_dataset(model: nn.Module, loader, *, max_tokens: int = DEFAULT_MAX_TOKENS, label_key: str = "labels",
                   progress: bool = True, desc: str = "recording routing", seed: int = 0) -> Routing:
    """Run every batch of ``loader`` through ``model`` (no gradients) while recording routing.

    A batch is a dict of model inputs (``label_key`` is taken out and used as labels), an
    ``(inputs, labels)`` pair, or a tensor. Tensors are moved to the model's device. The model
    runs in eval mode (no dropout noise in the routers' inputs) and every module is put back in
    the mode it was in afterwards, also when a batch fails.
    """
    from tqdm.auto import tqdm

    require_module(model, "record_dataset")
    if isinstance(loader, (str, bytes, dict)) or not hasattr(loader, "__iter__"):
        raise LilyLabTypeError(f"record_dataset: loader must be an iterable of batches (a DataLoader, or a list of "
                               f"dicts of model inputs), got {type(loader).__name__}")
    device = device_of(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    with evaluating(model), record_routing(model, max_tokens=max_tokens, seed=seed) as rec, torch.no_grad():
        for batch in tqdm(loader, total=total, desc=desc, disable=not progress, unit="batch"):
            labels = None
            if isinstance(batch, dict):
                batch = dict(batch)
                labels = batch.pop(label_key, None)
                model(**{k: _to(v, device) for k, v in batch.items()})
            elif isinstance(batch, (tuple, list)) and len(batch) == 2:
                inputs, labels = batch
                if isinstance(inputs, dict):
                    model(**{k: _to(v, device) for k, v in inputs.items()})
                else:
                    model(_to(inputs, device))
            else:
                model(_to(batch, device))
            if labels is not None:
                rec.annotate(labels=labels)
    return rec.routing


def _to(v, device):
    return v.to(device) if isinstance(v, torch.Tensor) else v


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; afterwards, also on error, every module back in the
    mode it was in (a model whose parts were in different modes stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _as_list(labels) -> list:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().reshape(-1).tolist()
    elif isinstance(labels, np.ndarray):
        labels = labels.reshape(-1).tolist()
    return [v.item() if hasattr(v, "item") else v for v in labels]
