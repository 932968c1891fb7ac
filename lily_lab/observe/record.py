"""``record_routing``: hooks that watch the routers during forward passes, removed on exit.

lily_lab layers report their routing through ``LilyLayer.register_routing_observer`` (nothing is
recomputed); PEFT ``lily`` layers are watched with a forward hook that recomputes ``h``, the logits
and ``p`` from the layer's input — the PEFT model is not modified.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core import adapter_sites
from ..core.layer import LilyLayer, RoutingEvent, in_backward
from .routing import _NO_LABEL, Reservoir, Routing, RoutingError, SiteRecord

DEFAULT_MAX_TOKENS = 100_000
_COMPACT_ROWS = 1 << 16  # per site: token-id rows waiting to be summed before they are compacted
_SUM_BYTES = 64 << 20  # float64 routing summed at once when a call is flushed (several sites per slice)


class Recorder:
    """Created by :func:`record_routing`. ``routing`` is the recording so far."""

    def __init__(self, model: nn.Module, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise RoutingError(f"max_tokens must be an integer ≥ 0, got {max_tokens!r}")
        sites = adapter_sites(model)
        routed = [s for s in sites if s.router is not None]
        if not routed:
            kinds = {}
            for s in sites:
                kinds[s.kind] = kinds.get(s.kind, 0) + 1
            names = {"peft-lora": "PEFT LoRA", "lily": "lily_lab Lily", "peft-lily": "PEFT Lily"}
            found = ", ".join(f"{n} {names.get(k, k)} site{'s' * (n != 1)}" for k, n in kinds.items()) \
                or "no adapter sites at all"
            raise RoutingError(f"nothing to record: this model has no routed sites ({found}, no router)")
        self.model = model
        self._sites = routed
        records = {}
        for k, s in enumerate(routed):
            E = s.num_B
            routing = s.layer.routing if isinstance(s.layer, LilyLayer) else "batch"
            rec = SiteRecord(s.name, s.module, s.group, s.index, s.kind, routing, E)
            # One seed for every site's token sample: each site is offered the same tokens call
            # by call, so every site keeps the same tokens and a sampled sentence can be shown
            # across all sites at once (the token views of the dashboard and the report).
            rec.tokens = Reservoir(max_tokens, {
                "probs": ((E,), np.float32), "logits": ((E,), np.float32), "call": ((), np.int64),
                "sequence": ((), np.int64), "position": ((), np.int64), "token_id": ((), np.int64),
                "label": ((), np.int64)}, seed=seed)
            rec.mixtures = Reservoir(max_tokens, {
                "mixture": ((E,), np.float32), "call": ((), np.int64), "sequence": ((), np.int64)},
                seed=seed + 2 * k + 1)
            records[s.name] = rec
        self._routing = Routing(records, max_tokens=max_tokens)
        self._handles: list[Any] = []
        self._depth = 0
        self._call: dict | None = None  # the current or last top-level call, until flushed
        # Per site, token ids waiting to be summed into token_sums, which happens when the routing
        # is read (one pass over the distinct ids, not one per call): a list of (ids, p rows) per
        # call, or (distinct ids, Σp, counts) once compacted; and how many rows wait.
        self._token_rows: dict[str, list[tuple[np.ndarray, ...]]] = {}
        self._token_row_count: dict[str, int] = {}
        self._mask_pos = self._ids_pos = None
        try:
            params = list(inspect.signature(model.forward).parameters)
            self._mask_pos = params.index("attention_mask") if "attention_mask" in params else None
            self._ids_pos = params.index("input_ids") if "input_ids" in params else None
        except (TypeError, ValueError):
            pass

    # ------------------------------------------------------------------ public
    @property
    def routing(self) -> Routing:
        """The recording, every call so far folded in (its sums are complete when read here)."""
        self._flush()
        return self._routing

    def annotate(self, labels=None, input_ids=None) -> None:
        """Tag the sequences of the last forward call with ``labels`` (one per sequence) and/or
        their ``input_ids`` (``batch × positions``, when the model was not called with them)."""
        call = self._call
        if call is None or call["flushed"]:
            raise RoutingError("annotate tags the last forward call, but no call was recorded since the last annotate/flush")
        n = call["n_sequences"]
        if labels is not None:
            labels = _as_list(labels)
            if len(labels) != n:
                raise RoutingError(f"annotate got {len(labels)} labels, but the last call had {n} sequences")
            call["labels"] = labels
        if input_ids is not None:
            ids = torch.as_tensor(input_ids).detach().cpu()
            shape = call["shape"]
            if ids.dim() != 2 or (shape is not None and tuple(ids.shape) != shape) or ids.shape[0] != n:
                raise RoutingError(
                    f"annotate got input_ids of shape {tuple(ids.shape)}, but the last call had "
                    f"{n} sequences{f' of shape {shape}' if shape else ''}"
                )
            call["input_ids"] = ids.numpy().astype(np.int64)

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._post, with_kwargs=True, always_call=True))
        for s in self._sites:
            if isinstance(s.layer, LilyLayer):
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
        self._flush(fold=False)
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_pos is not None and len(args) > self._mask_pos:
            mask = args[self._mask_pos]
        ids = kwargs.get("input_ids")
        if ids is None and self._ids_pos is not None and len(args) > self._ids_pos:
            ids = args[self._ids_pos]
        mask = mask.detach().cpu() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        ids = ids.detach().cpu() if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        shape = tuple(mask.shape) if mask is not None else tuple(ids.shape) if ids is not None else None
        r = self._routing
        self._call = {
            "id": r.n_calls, "seq_offset": r.n_sequences, "mask": mask, "shape": shape,
            "input_ids": ids.numpy().astype(np.int64) if ids is not None else None,
            "n_sequences": shape[0] if shape else None, "labels": None, "flushed": False, "pending": {},
            "index": {},  # token index arrays per input shape, shared by the call's sites
            "raw": [],  # (site, logits, probs, mixture) as each layer reported them, until flushed
        }
        r.n_calls += 1

    def _post(self, module, args, kwargs, output):
        self._depth = max(self._depth - 1, 0)

    def _lily_observer(self, name: str):
        def observe(event: RoutingEvent) -> None:
            self._record(name, event.logits, event.probs, event.mixture)
        return observe

    def _peft_hook(self, site):
        layer, E = site.layer, site.num_B

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

    # ------------------------------------------------------------------ recording
    def _record(self, name: str, logits: torch.Tensor, probs: torch.Tensor, mixture: torch.Tensor) -> None:
        call = self._call
        if call is None or self._depth == 0:  # a layer called outside the watched model's forward
            self._pre(self.model, (), {})
            self._depth -= 1
            call = self._call
        lead = tuple(probs.shape[:-1])
        if call["n_sequences"] is None:
            call["n_sequences"] = lead[0] if lead else 1
            call["shape"] = lead if len(lead) == 2 else None
        # Kept as they are until the call is flushed; then the sites are summed together.
        call["raw"].append((name, logits.detach(), probs.detach(), mixture.detach()))

    def _sum_call(self, call: dict) -> None:
        """Sum and sample what every site routed in ``call``: the sites of one input shape together,
        in a few array operations, rather than the same dozens of small ones per site."""
        groups: dict[tuple, list] = {}
        for entry in call["raw"]:
            groups.setdefault((tuple(entry[2].shape), entry[2].dtype, entry[2].device), []).append(entry)
        call["raw"] = []
        for (shape, _, _), same_shape in groups.items():
            # As many sites at once as fit in _SUM_BYTES of float64: a huge call is summed in
            # slices rather than holding a copy of every site's routing at once.
            per_site = 2 * shape[-1] * max(math.prod(shape[:-1]), 1) * 8
            step = max(1, _SUM_BYTES // per_site)
            for start in range(0, len(same_shape), step):
                self._sum_entries(call, shape, same_shape[start : start + step])

    def _sum_entries(self, call: dict, shape: tuple, entries: list) -> None:
        """Sum the routing of ``entries`` (sites of one input shape) into their records."""
        E, lead = shape[-1], shape[:-1]
        # One copy to the host: (sites, tokens, 2E), columns [p | logits], float64 as every sum is.
        X = torch.cat([torch.stack([e[2].reshape(-1, E) for e in entries]),
                       torch.stack([e[1].reshape(-1, E) for e in entries])], dim=2)
        X = X.float().cpu().numpy().astype(np.float64)
        # Which sequence and position each token is: (batch, positions) inputs, else one per row.
        if len(lead) >= 2:
            b, t = lead[0], math.prod(lead[1:])
        elif len(lead) == 1:
            b, t = lead[0], 1
        else:
            b, t = 1, 1
        seq_local, position, rows = self._token_index(call, lead, b, t)  # rows: real tokens, None = all
        if np.isfinite(X).all():
            self._sum_sites(call, entries, X, rows, seq_local, position, b, t)
            return
        real = np.zeros(b * t, dtype=bool)
        real[slice(None) if rows is None else rows] = True
        for i, entry in enumerate(entries):  # rare: each site drops its own non-finite tokens
            finite = np.isfinite(X[i]).all(axis=1)
            self._routing.record(entry[0]).nonfinite += int((real & ~finite).sum())
            keep = np.flatnonzero(real & finite)
            self._sum_sites(call, [entry], X[i : i + 1], keep, seq_local, position, b, t)

    def _sum_sites(self, call, entries, X, keep, seq_local, position, b: int, t: int) -> None:
        """Fold ``X`` (sites × tokens × 2E: p | logits) of ``entries`` into their records,
        keeping the tokens ``keep`` (None: all)."""
        E = X.shape[-1] // 2
        if keep is not None:
            X, seq_k, pos_k = X[:, keep], seq_local[keep], position[keep]
        else:
            seq_k, pos_k = seq_local, position
        P, LG = X[..., :E], X[..., E:]  # (sites, tokens, E)
        S, n = P.shape[:2]
        # Entropy and logsumexp through torch's vectorised float64 log/exp (views of the same
        # arrays): 3-5× numpy's time at these sizes, equal to it within an ulp.
        H = torch.special.entr(torch.from_numpy(P)).sum(dim=-1).numpy()  # (sites, tokens), nats
        top = P.argmax(axis=2) if n else np.zeros((S, 0), dtype=np.int64)
        p_sum, H_sum = P.sum(axis=1), H.sum(axis=1)
        argmax_counts = np.bincount((top + E * np.arange(S)[:, None]).reshape(-1), minlength=S * E).reshape(S, E)
        if n:
            lse = torch.logsumexp(torch.from_numpy(LG), dim=-1).numpy()  # (sites, tokens)
            z_sum = (lse ** 2).sum(axis=1)
        ids = call["input_ids"]
        token_id = ids[seq_k, pos_k] if ids is not None and ids.shape == (b, t) else np.full(n, -1)
        call_col, seq_col = np.full(n, call["id"]), call["seq_offset"] + seq_k
        for i, (name, _, _, mixture) in enumerate(entries):
            rec = self._routing.record(name)
            p = P[i]
            rec.n_tokens += n
            rec.sum_probs += p_sum[i]
            rec.sum_token_entropy += float(H_sum[i])
            rec.argmax_counts += argmax_counts[i]
            if n:
                rec.sum_z += float(z_sum[i])
            rec.n_calls += 1
            # The mixture applied to each kept token, and sampled mixture rows. Token routing's
            # mixture is p itself, already on the host; causal routing's (per token, running means)
            # and the per-sequence and per-call mixtures are copied.
            dims = mixture.dim()
            if rec.routing == "token":
                mix_tok = p
                rows = {"mixture": p.astype(np.float32), "call": call_col, "sequence": seq_col}
            elif dims > 2 or (dims == 2 and mixture.shape[0] != b):  # per token, not p: causal routing
                mix_tok = mixture.reshape(-1, E).float().cpu().numpy().astype(np.float64)
                mix_tok = mix_tok if keep is None else mix_tok[keep]
                rows = {"mixture": mix_tok.astype(np.float32), "call": call_col, "sequence": seq_col}
            else:
                mix = mixture.float().cpu().numpy().astype(np.float64)
                if dims == 2:  # sequence routing: one row per sequence
                    mix_tok = mix[seq_k]
                    rows = {"mixture": mix.astype(np.float32), "call": np.full(b, call["id"]),
                            "sequence": call["seq_offset"] + np.arange(b)}
                else:  # batch routing: one mixture for the whole call
                    mix_tok = np.broadcast_to(mix, (n, E))
                    rows = {"mixture": mix[None].astype(np.float32), "call": np.array([call["id"]]),
                            "sequence": np.array([-1])}
            if np.isfinite(mix_tok).all():
                rec.sum_mixture += mix_tok.sum(axis=0)
            rec.mixtures.add(rows)
            slots = rec.tokens.add({
                "probs": p.astype(np.float32), "logits": LG[i].astype(np.float32), "call": call_col,
                "sequence": seq_col, "position": pos_k, "token_id": token_id, "label": np.full(n, _NO_LABEL)})
            call["pending"].setdefault(name, []).append(
                {"p": p, "H": H[i], "top": top[i], "seq": seq_k, "pos": pos_k, "slots": slots, "b": b, "t": t})

    @staticmethod
    def _token_index(call: dict, lead: tuple, b: int, t: int):
        """``(sequence, position, real rows or None for all)`` of each token of an input shaped
        ``lead``; computed once per call and shape, shared by the call's sites."""
        cached = call["index"].get(lead)
        if cached is None:
            rows = None
            mask = call["mask"]
            if mask is not None and len(lead) == 2 and tuple(mask.shape) == lead:
                real = mask.numpy().reshape(-1) != 0
                rows = None if real.all() else np.flatnonzero(real)
            cached = call["index"][lead] = (np.repeat(np.arange(b), t), np.tile(np.arange(t), b), rows)
        return cached

    def _flush(self, fold: bool = True) -> None:
        """Fold the last call's labels and token ids into the sums; then it can't be annotated.
        Token ids are summed per id only when ``fold`` (the routing is being read)."""
        call = self._call
        if call is None or call["flushed"]:
            if fold:
                self._fold_token_sums()
            return
        call["flushed"] = True
        self._sum_call(call)
        r = self._routing
        r.n_sequences += call["n_sequences"] or 0
        codes = None
        if call["labels"] is not None:
            codes = []
            for v in call["labels"]:
                if v not in r.labels:
                    r.labels.append(v)
                codes.append(r.labels.index(v))
            codes = np.array(codes, dtype=np.int64)
        ids = call["input_ids"]
        for name, pend in ((n, pd) for n, pds in call["pending"].items() for pd in pds):
            rec = r.record(name)
            E = rec.num_B
            kept = pend["slots"] >= 0
            if codes is not None:
                tok_codes = codes[pend["seq"]]
                rec.tokens.columns["label"][pend["slots"][kept]] = tok_codes[kept]
                # Per label code: token count, Σp, argmax counts, ΣH (bincounts, in token order).
                L = len(r.labels)
                count = np.bincount(tok_codes, minlength=L)
                p_sum = np.stack([np.bincount(tok_codes, weights=pend["p"][:, e], minlength=L) for e in range(E)], 1)
                top = np.bincount(tok_codes * E + pend["top"], minlength=L * E).reshape(L, E)
                H_sum = np.bincount(tok_codes, weights=pend["H"], minlength=L)
                for c in np.flatnonzero(count).tolist():
                    acc = rec.label_sums.setdefault(c, [0, np.zeros(E), np.zeros(E, dtype=np.int64), 0.0])
                    acc[0] += int(count[c])
                    acc[1] = acc[1] + p_sum[c]
                    acc[2] = acc[2] + top[c]
                    acc[3] += float(H_sum[c])
            if ids is not None and ids.shape == (pend["b"], pend["t"]):
                tok = ids[pend["seq"], pend["pos"]]
                rec.tokens.columns["token_id"][pend["slots"][kept]] = tok[kept]
                self._token_rows.setdefault(name, []).append((tok, pend["p"]))
                self._token_row_count[name] = self._token_row_count.get(name, 0) + len(tok)
                if self._token_row_count[name] > _COMPACT_ROWS:
                    self._compact_token_rows(name)
        call["pending"] = {}
        if fold:
            self._fold_token_sums()

    def _compact_token_rows(self, name: str) -> None:
        """Sum a site's waiting rows per id, in stream order, into one ``(distinct ids, Σp, counts)``."""
        parts = self._token_rows.pop(name, [])
        self._token_row_count.pop(name, None)
        if not parts:
            return
        E = self._routing.record(name).num_B
        tok = np.concatenate([pt[0] for pt in parts])
        p = np.concatenate([pt[1] for pt in parts]).reshape(-1, E)
        weight = np.concatenate([np.ones(len(pt[0]), dtype=np.int64) if len(pt) == 2 else pt[2] for pt in parts])
        uniq, inv = np.unique(tok, return_inverse=True)
        sums = np.stack([np.bincount(inv, weights=p[:, e], minlength=len(uniq)) for e in range(E)], axis=1)
        counts = np.bincount(inv, weights=weight, minlength=len(uniq)).astype(np.int64)
        self._token_rows[name] = [(uniq, sums, counts)]
        self._token_row_count[name] = len(uniq)

    def _fold_token_sums(self) -> None:
        """Add the waiting token rows into each site's ``token_sums`` (token id → [count, Σp])."""
        for name in list(self._token_rows):
            self._compact_token_rows(name)
            (uniq, sums, counts), = self._token_rows.pop(name)
            self._token_row_count.pop(name, None)
            rec = self._routing.record(name)
            token_sums = rec.token_sums
            if not token_sums:
                rec.token_sums.update(zip(uniq.tolist(), ([c, row] for c, row in zip(counts.tolist(), sums))))
                continue
            for u, c, row in zip(uniq.tolist(), counts.tolist(), sums):
                acc = token_sums.get(u)
                if acc is None:
                    token_sums[u] = [c, row]
                else:
                    acc[0] += c
                    acc[1] = acc[1] + row


@contextlib.contextmanager
def record_routing(model: nn.Module, max_tokens: int = DEFAULT_MAX_TOKENS, seed: int = 0,
                   gather: bool | None = None) -> Iterator[Recorder]:
    """Record what every router of ``model`` does during the forward calls inside the block.

    ``max_tokens`` bounds the per-site sample of tokens kept for token-level views; the metrics'
    sums are exact whatever it is. Hooks are removed when the block exits, also on error::

        with record_routing(model) as rec:
            model(**batch)
            rec.annotate(labels=batch_labels)
        routing = rec.routing

    Under ``torch.distributed`` each rank records its own calls; when the block exits without
    error, ``gather`` (``None``: whenever a process group of several processes is initialised)
    merges every rank's recording into rank 0's ``rec.routing`` (``Routing.gather``); the other
    ranks keep their own. Every rank must then leave the block: pass ``gather=False`` to record
    on one rank only.
    """
    from .distributed import should_gather

    gather = should_gather(gather)
    recorder = Recorder(model, max_tokens=max_tokens, seed=seed)
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
