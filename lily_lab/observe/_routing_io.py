"""Reading a ``Routing`` saved by ``Routing.save`` — every field checked, no pickle."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .routing import _PHASE_NAMES, FORMAT, FORMAT_VERSION, Reservoir, RoutingError, SiteRecord

_TOKEN_COLS = ("probs", "logits", "call", "sequence", "position", "token_id", "label")
_MIX_COLS = ("mixture", "call", "sequence")
_PHASE_COL = "phase"  # format 2 on: both samples carry each row's phase code


def load_routing(cls, path: Path):
    if not path.is_file():
        raise RoutingError(f"no routing file at {str(path)!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as err:
        raise RoutingError(f"{path.name} is not a lily_lab routing file (.npz): {err}") from None
    try:
        header = json.loads(bytes(arrays.pop("__header__")).decode())
    except (KeyError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise RoutingError(f"{path.name} has no readable lily_lab routing header: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise RoutingError(f"{path.name} is not a lily_lab routing file (format {FORMAT!r} expected)")
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise RoutingError(f"{path.name} has routing format_version {version!r}; this lily_lab reads 1..{FORMAT_VERSION}")
    try:
        records = {}
        for k, meta in enumerate(header["sites"]):
            p = f"s{k}."
            E = int(meta["num_B"])
            rec = SiteRecord(str(meta["name"]), str(meta["module"]), str(meta["group"]), int(meta["index"]),
                             str(meta["kind"]), str(meta["routing"]), E)
            rec.n_tokens, rec.nonfinite, rec.n_calls = int(meta["n_tokens"]), int(meta["nonfinite"]), int(meta["n_calls"])
            rec.sum_token_entropy, rec.sum_z = float(meta["sum_token_entropy"]), float(meta["sum_z"])
            rec.sum_probs = _arr(arrays, p + "sum_probs", (E,), np.float64)
            rec.argmax_counts = _arr(arrays, p + "argmax_counts", (E,), np.int64)
            rec.sum_mixture = _arr(arrays, p + "sum_mixture", (E,), np.float64)
            codes = _arr(arrays, p + "label_codes", (None,), np.int64)
            n = len(codes)
            counts = _arr(arrays, p + "label_counts", (n,), np.int64)
            lprobs = _arr(arrays, p + "label_probs", (n, E), np.float64)
            largmax = _arr(arrays, p + "label_argmax", (n, E), np.int64)
            lent = _arr(arrays, p + "label_entropy", (n,), np.float64)
            rec.label_sums = {int(c): [int(counts[i]), lprobs[i], largmax[i], float(lent[i])] for i, c in enumerate(codes)}
            toks = _arr(arrays, p + "token_ids", (None,), np.int64)
            tcounts = _arr(arrays, p + "token_counts", (len(toks),), np.int64)
            tprobs = _arr(arrays, p + "token_probs", (len(toks), E), np.float64)
            rec.token_sums = {int(t): [int(tcounts[i]), tprobs[i]] for i, t in enumerate(toks)}
            extra = (_PHASE_COL,) if version >= 2 else ()
            rec.tokens = _reservoir(arrays, p + "tokens.", _TOKEN_COLS + extra, header["max_tokens"], meta["tokens_seen"], E)
            rec.mixtures = _reservoir(arrays, p + "mixtures.", _MIX_COLS + extra, header["max_tokens"], meta["mixtures_seen"], E)
            if version >= 2:
                _load_phases(arrays, p, rec)
            else:  # a recording from before phases: every token of phase None
                for res in (rec.tokens, rec.mixtures):
                    res.columns[_PHASE_COL] = np.full(len(res), -1, dtype=np.int8)
            records[rec.name] = rec
        routing = cls(records, header["labels"], int(header["max_tokens"]))
        routing.n_calls, routing.n_sequences = int(header["n_calls"]), int(header["n_sequences"])
    except (KeyError, TypeError, ValueError, IndexError) as err:
        if isinstance(err, RoutingError):
            raise
        raise RoutingError(f"{path.name} is a damaged lily_lab routing file: {type(err).__name__}: {err}") from None
    return routing


def _arr(arrays, key, shape, dtype):
    if key not in arrays:
        raise RoutingError(f"routing file lacks array {key!r}")
    a = arrays[key]
    if a.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, a.shape)):
        raise RoutingError(f"routing array {key!r} has shape {a.shape}, expected {shape}")
    if not np.can_cast(a.dtype, dtype, casting="same_kind"):
        raise RoutingError(f"routing array {key!r} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    return a.astype(dtype)


def _reservoir(arrays, prefix, cols, size, seen, E):
    res = Reservoir(int(size), {})
    res.columns = {c: arrays[prefix + c] for c in cols if prefix + c in arrays}
    if set(res.columns) != set(cols):
        raise RoutingError(f"routing file lacks sampled columns {sorted(set(cols) - set(res.columns))}")
    lengths = {len(v) for v in res.columns.values()}
    if len(lengths) != 1:
        raise RoutingError("routing file's sampled columns have different lengths")
    res.seen = int(seen)
    return res


def _load_phases(arrays, p, rec: SiteRecord) -> None:
    """The per-phase sums of a format-2 site (``Routing._npz_bytes``'s ``phase_…`` arrays), checked."""
    E = rec.num_B
    for res in (rec.tokens, rec.mixtures):
        col = res.columns[_PHASE_COL]
        if col.ndim != 1 or not np.issubdtype(col.dtype, np.integer) or not np.isin(col, list(_PHASE_NAMES)).all():
            raise RoutingError(f"routing file's sampled phase column of {rec.name!r} is not codes -1, 0, 1")
        res.columns[_PHASE_COL] = col.astype(np.int8)
    codes = _arr(arrays, p + "phase_codes", (None,), np.int64)
    P = len(codes)
    if len(set(codes.tolist())) != P or not set(codes.tolist()) <= set(_PHASE_NAMES):
        raise RoutingError(f"routing file's phase codes {codes.tolist()} of {rec.name!r} are not distinct codes -1, 0, 1")
    ints = {k: _arr(arrays, p + "phase_" + k, (P,), np.int64)
            for k in ("n_tokens", "nonfinite", "n_calls", "tokens_seen", "mixtures_seen")}
    sum_probs = _arr(arrays, p + "phase_sum_probs", (P, E), np.float64)
    sum_mixture = _arr(arrays, p + "phase_sum_mixture", (P, E), np.float64)
    argmax = _arr(arrays, p + "phase_argmax", (P, E), np.int64)
    entropy = _arr(arrays, p + "phase_sum_entropy", (P,), np.float64)
    z = _arr(arrays, p + "phase_sum_z", (P,), np.float64)
    for i, code in enumerate(codes.tolist()):
        ph = rec.phase_record(code)
        ph.n_tokens, ph.nonfinite, ph.n_calls = (int(ints[k][i]) for k in ("n_tokens", "nonfinite", "n_calls"))
        ph.tokens.seen, ph.mixtures.seen = int(ints["tokens_seen"][i]), int(ints["mixtures_seen"][i])
        ph.sum_probs, ph.sum_mixture, ph.argmax_counts = sum_probs[i], sum_mixture[i], argmax[i]
        ph.sum_token_entropy, ph.sum_z = float(entropy[i]), float(z[i])
    n = len(_arr(arrays, p + "phase_label_phase", (None,), np.int64))
    lphase = _arr(arrays, p + "phase_label_phase", (n,), np.int64)
    lcodes = _arr(arrays, p + "phase_label_codes", (n,), np.int64)
    lcounts = _arr(arrays, p + "phase_label_counts", (n,), np.int64)
    lprobs = _arr(arrays, p + "phase_label_probs", (n, E), np.float64)
    largmax = _arr(arrays, p + "phase_label_argmax", (n, E), np.int64)
    lent = _arr(arrays, p + "phase_label_entropy", (n,), np.float64)
    m = len(_arr(arrays, p + "phase_token_phase", (None,), np.int64))
    tphase = _arr(arrays, p + "phase_token_phase", (m,), np.int64)
    tids = _arr(arrays, p + "phase_token_ids", (m,), np.int64)
    tcounts = _arr(arrays, p + "phase_token_counts", (m,), np.int64)
    tprobs = _arr(arrays, p + "phase_token_probs", (m, E), np.float64)
    if not np.isin(lphase, codes).all() or not np.isin(tphase, codes).all():
        raise RoutingError(f"routing file's per-phase label or token sums of {rec.name!r} name a phase it lacks")
    for i in range(n):
        rec.phases[int(lphase[i])].label_sums[int(lcodes[i])] = [int(lcounts[i]), lprobs[i], largmax[i], float(lent[i])]
    for i in range(m):
        rec.phases[int(tphase[i])].token_sums[int(tids[i])] = [int(tcounts[i]), tprobs[i]]
    phs = list(rec.phases.values())
    for key in ("n_tokens", "nonfinite", "n_calls"):
        if phs and sum(getattr(ph, key) for ph in phs) != getattr(rec, key):
            raise RoutingError(f"routing file's per-phase {key} of {rec.name!r} do not add up to its total")
