"""Non-finite adapter weights: a diverged run leaves NaN or ±inf in ``A``, ``B`` or a router.

Every analysis of the weights (spectra, expert geometry, intruders, merging) is meaningless on
such a bank, and the linear algebra under it fails with an opaque error. These helpers find the
sites and banks involved, so that ``diagnose`` can say so first and the analyses can refuse with
a message that names them.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..core import Site
from ..core.errors import NonFiniteWeightsError

#: The tensors of a site, by the name a message uses.
TENSORS = ("A", "B", "router")

DIVERGED_REMEDY = ("The run diverged. Lower the learning rate, clip gradients (e.g. "
                   "torch.nn.utils.clip_grad_norm_(params, 1.0)), and check for float16 overflow (train in "
                   "bfloat16 or float32, or use a GradScaler); then reload the last good checkpoint "
                   "(lily_lab.load_adapter) and train on from there.")


def count_nonfinite(t: torch.Tensor | None) -> int:
    """How many entries of ``t`` are NaN or ±inf (0 for ``None``)."""
    if t is None:
        return 0
    t = t.detach()
    if t.dtype.itemsize == 1:  # float8 has no isfinite kernel; the cast keeps NaN and inf as they are
        t = t.float()
    return int(t.numel() - torch.isfinite(t).sum())


def nonfinite_counts(sites: Iterable[Site], tensors: tuple[str, ...] = TENSORS) -> dict[str, dict]:
    """``{group: {"A": n, "B": n, "router": n, "sites": [site names]}}`` for every bank with a
    NaN or ±inf in one of ``tensors``: ``n`` counts the bad entries of the group's tensors, each
    shared tensor once (an ``A`` shared by several sites, the bank ``B``), and ``sites`` lists the
    group's sites that use a bad tensor (every site of the group when ``B`` is bad)."""
    out: dict[str, dict] = {}
    counted: dict[tuple, int] = {}  # storage, shape → bad entries: a shared tensor is counted once
    for s in sites:
        bad_here = False
        for name in tensors:
            t = getattr(s, name)
            if t is None:
                continue
            key = (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            first = key not in counted
            if first:
                counted[key] = count_nonfinite(t)
            n = counted[key]
            if n:
                bad_here = True
                entry = out.setdefault(s.group, {**dict.fromkeys(TENSORS, 0), "sites": []})
                entry[name] += n if first else 0
        if bad_here:
            out[s.group]["sites"].append(s.name)
    return out


def describe(bad: dict[str, dict], shown: int = 4) -> str:
    """``bank 'query:4x4' (B: 3 values; sites: …)`` for the first ``shown`` banks of ``bad``."""
    parts = []
    for group, entry in list(bad.items())[:shown]:
        counts = ", ".join(f"{k}: {entry[k]} value{'s' * (entry[k] != 1)}" for k in TENSORS if entry[k])
        names = entry["sites"]
        where = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        parts.append(f"bank {group!r} ({counts}; site{'s' * (len(names) != 1)} {where})")
    more = f" and {len(bad) - shown} more bank{'s' * (len(bad) - shown != 1)}" if len(bad) > shown else ""
    return "; ".join(parts) + more


def require_finite(sites: Iterable[Site], what: str, tensors: tuple[str, ...] = TENSORS) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the banks and sites where one of ``tensors``
    holds NaN or ±inf; ``what`` names the analysis that cannot run."""
    bad = nonfinite_counts(sites, tensors)
    if bad:
        raise NonFiniteWeightsError(
            f"{what} cannot run: non-finite weights (NaN or inf) in {describe(bad)}. {DIVERGED_REMEDY} "
            "lily_lab.diagnose(model) lists every bank affected.")


__all__ = ["count_nonfinite", "nonfinite_counts", "require_finite", "describe", "DIVERGED_REMEDY", "TENSORS"]
