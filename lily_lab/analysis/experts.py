"""Expert geometry: how alike the ``B`` experts of each bank are, three ways.

- ``cosine``: of the flattened experts ``B_e`` (``r × d_out``) — what ``diagnose``'s
  ``redundant_experts`` uses.
- ``subspace_overlap``: mean ``cos²`` of the principal angles between the experts' row spaces in
  ``R^{d_out}`` (1: same output directions, 0: orthogonal ones).
- ``functional_cosine``: cosine of the updates ``ΔW_e = B_eᵀ A_j`` the experts make, summed over
  the group's ``A``s — two experts can differ as matrices yet act alike through ``A``.

All three are undefined (NaN) for a pair with an all-zero expert, as every expert is at
``init_weights=True`` before the first step.

**PEFT X-LoRA** (kind ``"xlora"``): each expert is a LoRA of its own, ``ΔW_e = s_e B_e A_e``, held
in the site as a block-sparse ``B[e]`` over the stacked ``A`` (``lily_lab.Site``), so the flattened
``B[e]`` of two experts never overlap and their plain cosine would be 0 whatever the experts are.
For X-LoRA banks ``cosine`` is therefore the cosine of the experts' updates ``ΔW_e`` (equal to
``functional_cosine``), in ``expert_similarity`` and in ``bank_summary`` (``mean_cosine``,
``max_cosine``, ``distinct_experts``; what ``diagnose``'s ``redundant_experts`` reads).
``subspace_overlap`` compares the experts' output directions (the column spaces of their
``B_e``), as for any bank.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from ..core import adapter_sites
from ..core.layer import require_module
from .finite import require_finite


def bank_cosines(B: np.ndarray) -> np.ndarray:
    """``E × E`` cosine similarity of the flattened experts of one bank ``B`` (``E × r × d_out``).

    The cosine of an all-zero expert is undefined: its row and column are NaN (its diagonal
    entry too). A freshly initialised bank (``init_weights=True``: every ``B_e = 0``) is all NaN,
    not "orthogonal"; the experts get a direction at the first optimiser step."""
    flat = np.asarray(B, dtype=np.float64).reshape(len(B), -1)
    norms = np.linalg.norm(flat, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    cos = (flat @ flat.T) / np.outer(safe, safe)
    np.fill_diagonal(cos, 1.0)
    zero = norms == 0
    cos[zero, :] = np.nan
    cos[:, zero] = np.nan
    return cos


def mean_pairwise(cos: np.ndarray) -> float:
    """Mean of the off-diagonal entries (each pair once) that are defined; NaN for a bank of one
    expert or one whose pairs all involve an all-zero expert."""
    iu = np.triu_indices(len(cos), k=1)
    off = cos[iu]
    off = off[~np.isnan(off)]
    return float(off.mean()) if len(off) else float("nan")


def _subspace_overlaps(B: np.ndarray) -> np.ndarray:
    """Mean cos² of principal angles between the row spaces of the experts."""
    bases = []
    for Be in B:  # (r, d_out)
        u, s, vt = np.linalg.svd(Be, full_matrices=False)
        keep = s > 1e-10 * max(s.max(initial=0), 1e-300)
        bases.append(vt[keep])  # orthonormal rows spanning the row space
    E = len(B)
    out = np.eye(E)
    for i in range(E):
        for j in range(i + 1, E):
            k = min(len(bases[i]), len(bases[j]))
            if k == 0:  # an all-zero expert has no row space: the overlap is undefined
                out[i, j] = out[j, i] = np.nan
                continue
            cosines = np.linalg.svd(bases[i] @ bases[j].T, compute_uv=False)[:k]
            out[i, j] = out[j, i] = float(np.mean(np.clip(cosines, 0, 1) ** 2))
    return out


def _functional_cosines(B: np.ndarray, As: list[np.ndarray]) -> np.ndarray:
    """Cosine between experts' updates: ⟨B_eᵀA, B_fᵀA⟩_F = tr(B_e B_fᵀ A Aᵀ), summed over the As."""
    G = sum(A @ A.T for A in As)  # (r, r)
    E = len(B)
    inner = np.array([[np.trace(B[e] @ B[f].T @ G) for f in range(E)] for e in range(E)])
    d = np.sqrt(np.clip(np.diag(inner), 0, None))
    safe = np.where(d > 0, d, 1.0)
    cos = inner / np.outer(safe, safe)
    np.fill_diagonal(cos, 1.0)
    cos[d == 0, :] = np.nan  # an expert whose update is zero has no direction
    cos[:, d == 0] = np.nan
    return cos


def distinct_experts(cos: np.ndarray) -> float:
    """Effective number of distinct experts: ``exp`` of the entropy of the normalised eigenvalues
    of the similarity matrix (E for orthogonal experts, 1 when all are the same). All-zero
    experts (NaN rows) are left out; NaN when no expert has a direction."""
    keep = ~np.isnan(np.diag(cos))
    cos = cos[np.ix_(keep, keep)]
    if cos.size == 0:
        return float("nan")
    lam = np.clip(np.linalg.eigvalsh((cos + cos.T) / 2), 0, None)
    if lam.sum() <= 0:
        return float("nan")
    p = lam / lam.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def banks(model: nn.Module) -> dict[str, dict]:
    """``{group: {"B": (E, r, d_out), "As": [(r, d_in), …], "kind": kind}}`` as float64 arrays."""
    out: dict[str, dict] = {}
    for s in adapter_sites(model):
        g = out.setdefault(s.group, {"B": s.B.detach().double().cpu().numpy(), "As": {}, "kind": s.kind})
        g["As"].setdefault(s.a_index, s.A.detach().double().cpu().numpy())
    for g in out.values():
        g["As"] = list(g["As"].values())
    return out


def expert_cosines(bank: dict) -> np.ndarray:
    """The ``cosine`` of a bank of :func:`banks`: of the flattened ``B_e`` (:func:`bank_cosines`),
    or for X-LoRA of the experts' updates ``ΔW_e`` (:func:`_functional_cosines`; module docstring)."""
    if bank.get("kind") == "xlora":
        return _functional_cosines(bank["B"], bank["As"])
    return bank_cosines(bank["B"])


def expert_similarity(model: nn.Module) -> pd.DataFrame:
    """Every pair of experts of every bank (``i < j``): ``group, expert_i, expert_j, cosine,
    subspace_overlap, functional_cosine``. Banks of one expert (LoRA) have no rows; for X-LoRA
    banks ``cosine`` is that of the experts' updates ``ΔW_e`` (module docstring)."""
    require_module(model, "expert_similarity")
    require_finite(adapter_sites(model), "expert_similarity", ("A", "B"))
    rows = []
    for group, bank in banks(model).items():
        B = bank["B"]
        if len(B) < 2:
            continue
        fun = _functional_cosines(B, bank["As"])
        cos, sub = (fun if bank["kind"] == "xlora" else bank_cosines(B)), _subspace_overlaps(B)
        for i in range(len(B)):
            for j in range(i + 1, len(B)):
                rows.append({"group": group, "expert_i": i, "expert_j": j, "cosine": float(cos[i, j]),
                             "subspace_overlap": float(sub[i, j]), "functional_cosine": float(fun[i, j])})
    return pd.DataFrame(rows, columns=["group", "expert_i", "expert_j", "cosine", "subspace_overlap",
                                       "functional_cosine"])


def bank_summary(model: nn.Module) -> pd.DataFrame:
    """One row per bank: ``group, num_B, mean_cosine, max_cosine, distinct_experts,
    mean_norm`` (mean Frobenius norm of the experts), ``max_norm``, ``nonfinite_B`` (NaN or ±inf
    entries of the bank: a diverged run; its other measures are then NaN). For X-LoRA banks the
    cosines are those of the experts' updates ``ΔW_e`` (module docstring) and the norms those of
    the ``B[e]`` (``(s_e / s)·‖B_e‖``)."""
    require_module(model, "bank_summary")
    rows = []
    for group, bank in banks(model).items():
        B = bank["B"]
        bad = int(B.size - np.isfinite(B).sum())
        if bad:
            rows.append({"group": group, "num_B": len(B), **dict.fromkeys(
                ("mean_cosine", "max_cosine", "distinct_experts", "mean_norm", "max_norm"), float("nan")),
                "nonfinite_B": bad})
            continue
        cos = expert_cosines(bank)
        norms = np.linalg.norm(B.reshape(len(B), -1), axis=1)
        off = cos[np.triu_indices(len(B), k=1)]
        off = off[~np.isnan(off)]  # pairs with an all-zero expert have no cosine
        rows.append({"group": group, "num_B": len(B), "mean_cosine": mean_pairwise(cos),
                     "max_cosine": float(off.max()) if len(off) else float("nan"),
                     "distinct_experts": distinct_experts(cos) if norms.max() > 0 else float("nan"),
                     "mean_norm": float(norms.mean()), "max_norm": float(norms.max()), "nonfinite_B": 0})
    return pd.DataFrame(rows, columns=["group", "num_B", "mean_cosine", "max_cosine", "distinct_experts",
                                       "mean_norm", "max_norm", "nonfinite_B"])
