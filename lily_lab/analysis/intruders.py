"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence"): top singular vectors of the fine-tuned ``W + ΔW`` that resemble no singular vector
of the base ``W``."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core import adapter_sites
from ..core.errors import InputError, NonFiniteWeightsError
from ..core.layer import is_conv1d, require_module
from .finite import require_finite
from .routing import layer_of
from .spectra import mixtures_for, dense_delta

FULL_SVD_LIMIT = 2048  # min(d_out, d_in) above which partial (randomised) SVDs are used


def _base_weight(site) -> torch.Tensor:
    layer = site.layer
    if layer is None:
        raise InputError("intruder_dimensions needs the base weights: pass the model, not an adapter directory")
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer.base_layer  # PEFT / lily_lab
    W = base.weight.detach().double().cpu()
    return W.T if is_conv1d(base) else W  # (d_out, d_in)


def _left_vectors(M: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and values of ``M``: all of them, or the top ``k`` (randomised SVD)
    when the matrix is large."""
    if k is None or min(M.shape) <= FULL_SVD_LIMIT:
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        return (U, S) if k is None else (U[:, :k], S[:k])
    U, S, _ = torch.svd_lowrank(M, q=min(k + 10, min(M.shape)), niter=4)
    return U[:, :k], S[:k]


def intruder_dimensions(model: nn.Module, mixture: Any = None, k: int = 10,
                        epsilon: float | Sequence[float] = 0.5, *, base_vectors: int | None = None,
                        progress: bool = True) -> pd.DataFrame:
    """Per site: how many of the top-``k`` left singular vectors of ``W + ΔW(π)`` have largest
    ``|cosine|`` below ``epsilon`` with every left singular vector of ``W``, and the share of the
    fine-tuned matrix's spectral energy (Σσ²) they carry.

    ``epsilon`` may be a list (a sweep: one row per site × epsilon). ``mixture`` as in
    :func:`delta_spectra`. For layers larger than ``FULL_SVD_LIMIT`` the SVDs are partial and
    ``W`` is represented by its top ``base_vectors`` (default ``4k``, at least 256) vectors, which
    can only over-count intruders.
    """
    from tqdm.auto import tqdm

    import os

    if isinstance(model, (str, os.PathLike)):
        raise InputError(f"intruder_dimensions needs the base weights: pass the model with its adapter, not an "
                         f"adapter directory ({os.fspath(model)!r})")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InputError(f"k must be an integer ≥ 1 (how many top singular vectors to check), got {k!r}")
    try:
        eps = [float(epsilon)] if np.isscalar(epsilon) else [float(e) for e in epsilon]
    except (TypeError, ValueError):
        raise InputError(f"epsilon must be a number or a list of numbers in (0, 1], got {epsilon!r}") from None
    require_module(model, "intruder_dimensions")
    sites = adapter_sites(model)
    if not sites:
        raise InputError("intruder_dimensions: no adapter sites in this model; pass a model with a Lily or LoRA "
                         "adapter")
    require_finite(sites, "intruder_dimensions", ("A", "B"))
    rows = []
    with torch.no_grad():
        for s in tqdm(sites, desc="intruder dimensions", disable=not progress, unit="site"):
            W = _base_weight(s)
            if not torch.isfinite(W).all():
                raise NonFiniteWeightsError(
                    f"intruder_dimensions cannot run: the base weight of site {s.name!r} holds NaN or infinite "
                    "values; the base model itself is broken (reload it)")
            ((label, pi),) = mixtures_for(s, mixture, None, 1)
            W_ft = W + dense_delta(s, pi)
            large = min(W.shape) > FULL_SVD_LIMIT
            U0, _ = _left_vectors(W, max(4 * k, 256) if large and base_vectors is None else base_vectors)
            U1, S1 = _left_vectors(W_ft, k)
            max_cos = (U1.T @ U0).abs().max(dim=1).values.numpy()  # (k,)
            total = float(torch.linalg.matrix_norm(W_ft, "fro") ** 2)
            energy = S1.numpy() ** 2 / total
            for e in eps:
                intr = max_cos < e
                rows.append({"site": s.name, "module": s.module, "group": s.group, "index": s.index,
                             "layer": layer_of(s.name, s.index), "mixture": label, "k": len(max_cos),
                             "epsilon": e, "n_intruders": int(intr.sum()),
                             "intruder_energy": float(energy[intr].sum()),
                             "min_max_cosine": float(max_cos.min())})
    return pd.DataFrame(rows)
