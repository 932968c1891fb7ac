"""Expert geometry: how alike the ``B`` experts of each bank are."""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from ..core import adapter_sites


def bank_cosines(B: np.ndarray) -> np.ndarray:
    """``E × E`` cosine similarity of the flattened experts of one bank ``B`` (``E × r × d_out``).
    An all-zero expert has cosine 0 with every expert (1 with itself)."""
    flat = np.asarray(B, dtype=np.float64).reshape(len(B), -1)
    norms = np.linalg.norm(flat, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    cos = (flat @ flat.T) / np.outer(safe, safe)
    np.fill_diagonal(cos, 1.0)
    return cos


def mean_pairwise(cos: np.ndarray) -> float:
    """Mean of the off-diagonal entries (each pair once); NaN for a bank of one expert."""
    iu = np.triu_indices(len(cos), k=1)
    return float(cos[iu].mean()) if len(iu[0]) else float("nan")


def banks(model: nn.Module) -> dict[str, np.ndarray]:
    """``{group: B}`` for every bank of the model (float64 copies)."""
    out: dict[str, np.ndarray] = {}
    for s in adapter_sites(model):
        if s.group not in out:
            out[s.group] = s.B.detach().double().cpu().numpy()
    return out


def expert_similarity(model: nn.Module) -> pd.DataFrame:
    """Pairwise cosine of the flattened ``B`` experts of every bank: ``group, expert_i, expert_j,
    cosine`` (each unordered pair once, ``i < j``)."""
    rows = []
    for group, B in banks(model).items():
        cos = bank_cosines(B)
        for i in range(len(B)):
            for j in range(i + 1, len(B)):
                rows.append({"group": group, "expert_i": i, "expert_j": j, "cosine": float(cos[i, j])})
    return pd.DataFrame(rows, columns=["group", "expert_i", "expert_j", "cosine"])
