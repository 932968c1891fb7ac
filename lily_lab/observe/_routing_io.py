"""Reading a ``Routing`` saved by ``Routing.save`` — every field checked, no pickle."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from .routing import FORMAT, FORMAT_VERSION, Reservoir, RoutingError, SiteRecord

_TOKEN_COLS = ("probs", "logits", "call", "sequence", "position", "token_id", "label")
_MIX_COLS = ("mixture", "call", "sequence")


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
            rec.tokens = _reservoir(arrays, p + "tokens.", _TOKEN_COLS, header["max_tokens"], meta["tokens_seen"], E)
            rec.mixtures = _reservoir(arrays, p + "mixtures.", _MIX_COLS, header["max_tokens"], meta["mixtures_seen"], E)
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
