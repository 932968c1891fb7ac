"""Singular values of ΔW from the factors, and rank metrics (docs/lily.md, docs/metrics.md).

``ΔW(π) = s · B_πᵀ A_j`` with ``B_π = Σ_e π_e B_e``. With ``A_jᵀ = Q_a R_a`` and ``B_πᵀ = Q_b R_b``
(reduced QR), ``ΔW = s · Q_b (R_b R_aᵀ) Q_aᵀ``: its singular values are ``s`` times those of the
small core ``R_b R_aᵀ``. Cost ``O((d_in + d_out) r²)`` per site; no dense ``d_out × d_in`` matrix.

A PEFT X-LoRA site (``lily_lab.Site``, kind ``"xlora"``) is in this form exactly, with ``A`` its
experts' ``A_e`` stacked (``r = Σ r_e``) and block-sparse ``B_e``: ``ΔW(π) = Σ_e π_e s_e B_e A_e``,
the update the layer applies when the classifier weights its experts ``π``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core import Site, adapter_sites
from ..core.layer import mix_experts
from ..core.errors import InputError, LilyLabTypeError, MixtureError
from ..core.offline import sites_from_directory
from ..observe.routing import Routing, RoutingError
from .finite import require_finite
from .routing import layer_of

SPECTRA_COLUMNS = ["site", "module", "group", "index", "layer", "kind", "mixture", "r", "k", "sigma"]


def factor_singular_values(A: torch.Tensor, B_mix: torch.Tensor, scaling: float) -> torch.Tensor:
    """Singular values (descending) of ``scaling · B_mixᵀ A`` for ``A`` (``… × r × d_in``) and
    ``B_mix`` (``… × r × d_out``), batched over leading dimensions, in float64."""
    A, B_mix = A.double(), B_mix.double()
    R_a = torch.linalg.qr(A.transpose(-1, -2), mode="r")[1]  # (…, min(d_in, r), r)
    R_b = torch.linalg.qr(B_mix.transpose(-1, -2), mode="r")[1]  # (…, min(d_out, r), r)
    core = R_b @ R_a.transpose(-1, -2)  # (…, min(d_out, r), min(d_in, r))
    return abs(scaling) * torch.linalg.svdvals(core)


def mixtures_for(site: Site, mixture: Any, by: str | None, max_samples: int) -> list[tuple[str, np.ndarray]]:
    """``[(label, π)]`` for one site from the ``mixture`` argument of :func:`delta_spectra`; every
    ``π`` has the bank's ``E`` entries, all finite, else :class:`MixtureError`."""
    out = _raw_mixtures_for(site, mixture, by, max_samples)
    E = site.num_B
    for label, pi in out:
        if pi.shape != (E,):
            raise MixtureError(f"the mixture {label!r} for site {site.name!r} has {pi.size} entries, but its bank "
                               f"has {E} experts: give one weight per expert")
        if not np.isfinite(pi).all():
            hint = (" (the recording saw no finite routing at this site: was it made on a diverged model?)"
                    if isinstance(mixture, Routing) else "")
            raise MixtureError(f"the mixture {label!r} for site {site.name!r} holds NaN or infinite weights "
                               f"{np.round(pi, 4).tolist()}{hint}; give finite weights, e.g. the uniform 1/{E}")
    return out


def _raw_mixtures_for(site: Site, mixture: Any, by: str | None, max_samples: int) -> list[tuple[str, np.ndarray]]:
    E = site.num_B
    if E == 1:
        return [("single expert", np.ones(1))]
    if mixture is None:
        return [("uniform", np.full(E, 1 / E))]
    if isinstance(mixture, (int, np.integer)) and not isinstance(mixture, bool):
        if not 0 <= mixture < E:
            raise MixtureError(f"mixture={mixture} names no expert: experts are 0..{E - 1}")
        return [(f"expert {mixture}", np.eye(E)[mixture])]
    if isinstance(mixture, Routing):
        name = _routing_name(site, mixture)
        rec = mixture.record(name)
        if by is None:
            return [("routed mean", mixture.mean_mixture(name))]
        if by == "label":
            if not rec.label_sums:
                raise RoutingError("mixture=routing, by='label' needs a recording annotated with labels")
            return [(f"label={mixture.labels[c]}", s.probs / max(s.count, 1)) for c, s in sorted(rec.label_sums.items())]
        if by == "token":
            probs = mixture.probs(name)[:max_samples]
            return [(f"token {i}", p.astype(np.float64)) for i, p in enumerate(probs)]
        raise InputError(f"by must be None, 'label' or 'token', got {by!r}")
    if isinstance(mixture, dict):
        key = site.name if site.name in mixture else site.name.removeprefix("base_model.model.")
        if key not in mixture:
            raise MixtureError(f"mixture dict has no entry for site {site.name!r}; give one vector per site")
        try:
            pi = np.asarray(mixture[key], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise MixtureError(f"the mixture for site {site.name!r} is not a vector of numbers ({err})") from None
        return [("given", pi)]
    raise LilyLabTypeError(f"mixture must be None, an expert index, a Routing or a {{site: vector}} dict, got "
                           f"{type(mixture).__name__}")


def _routing_name(site: Site, routing: Routing) -> str:
    for name in (site.name, "base_model.model." + site.name, site.name.removeprefix("base_model.model.")):
        if name in routing.sites:
            return name
    raise RoutingError(f"the recording has no site {site.name!r}; it recorded: {', '.join(routing.sites[:6])}…")


def _sites_of(model) -> list[Site]:
    if isinstance(model, (str, os.PathLike)):
        return sites_from_directory(model)
    if isinstance(model, (list, tuple)) and all(isinstance(s, Site) for s in model):
        return list(model)
    if not isinstance(model, nn.Module):
        raise LilyLabTypeError(f"model must be a model with an adapter (torch.nn.Module), an adapter directory or a "
                               f"list of Sites (lily_lab.adapter_sites(model)), got {type(model).__name__}")
    return adapter_sites(model)


def delta_spectra(model: nn.Module | str | os.PathLike | list[Site], mixture: Any = None, *, by: str | None = None,
                  max_samples: int = 32) -> pd.DataFrame:
    """Exact singular values of every site's ΔW, one row per site × mixture × k.

    ``model`` is a model with an adapter (lily_lab Lily, PEFT Lily or PEFT LoRA), an adapter
    directory on its own (no base weights are needed), or a list of ``Site``s. ``mixture``: ``None`` (uniform), an ``int``
    (one expert), a ``Routing`` (each site's mean applied mixture; with ``by="label"`` one spectrum
    per label's mean distribution, with ``by="token"`` one per sampled token, at most
    ``max_samples``), or ``{site_name: vector}``. Columns: site, module, group, index, layer,
    kind, mixture, r, k (0-based), sigma.

    Per-label and per-token mixtures are the router's distributions ``p``: under batch or sequence
    routing the layer never applies them (it applies the call's or the sequence's mean), so those
    spectra show the update the router *would* pick for that label or token, not one it made.

    PEFT X-LoRA: ``ΔW(π) = Σ_e π_e s_e B_e A_e`` at each X-LoRA layer (its ``r`` is the experts'
    ranks summed); with a ``Routing`` the mean of the weights the layer applied (the recorded
    scalings, after top-k where configured), ``None`` the uniform ``1/E``.
    """
    sites = _sites_of(model)
    if not sites:
        raise InputError("no adapter sites: pass a model with a Lily or LoRA adapter, or an adapter directory")
    require_finite(sites, "delta_spectra", ("A", "B"))
    jobs = []  # (site, label, π)
    for s in sites:
        for label, pi in mixtures_for(s, mixture, by, max_samples):
            jobs.append((s, label, pi))
    # Batch the QR/SVD over jobs of equal shapes.
    by_shape: dict[tuple, list[int]] = {}
    for i, (s, _, _) in enumerate(jobs):
        by_shape.setdefault((s.r, s.d_in, s.d_out, s.scaling), []).append(i)
    sigmas: list[np.ndarray | None] = [None] * len(jobs)
    with torch.no_grad():
        for (r, d_in, d_out, scaling), idx in by_shape.items():
            A = torch.stack([jobs[i][0].A.detach().double().cpu() for i in idx])
            B_mix = torch.stack([
                mix_experts(torch.from_numpy(jobs[i][2]), jobs[i][0].B.detach().double().cpu())
                for i in idx])
            sv = factor_singular_values(A, B_mix, scaling).numpy()
            for row, i in enumerate(idx):
                sigmas[i] = sv[row]
    rows = []
    for (s, label, _), sv in zip(jobs, sigmas):
        base = {"site": s.name, "module": s.module, "group": s.group, "index": s.index,
                "layer": layer_of(s.name, s.index), "kind": s.kind, "mixture": label, "r": s.r}
        for k, v in enumerate(sv):
            rows.append({**base, "k": k, "sigma": float(v)})
    return pd.DataFrame(rows, columns=SPECTRA_COLUMNS)


def spectrum_ranks(sigma: np.ndarray, tol: float = 1e-6) -> dict[str, float]:
    """effective, stable and numerical rank of one spectrum (docs/metrics.md), and energy shares."""
    s = np.sort(np.asarray(sigma, dtype=np.float64))[::-1]
    if len(s) == 0 or s[0] <= 0:
        return {"effective_rank": 0.0, "stable_rank": 0.0, "numerical_rank": 0,
                "energy_top1": float("nan"), "energy_top4": float("nan"), "energy_top16": float("nan")}
    p = s / s.sum()
    nz = p[p > 0]
    energy = np.cumsum(s**2) / (s**2).sum()
    top = lambda k: float(energy[min(k, len(s)) - 1])  # noqa: E731
    return {
        "effective_rank": float(np.exp(-(nz * np.log(nz)).sum())),
        "stable_rank": float((s**2).sum() / s[0] ** 2),
        "numerical_rank": int((s > tol * s[0]).sum()),
        "energy_top1": top(1), "energy_top4": top(4), "energy_top16": top(16),
    }


def rank_summary(spectra: pd.DataFrame, tol: float = 1e-6) -> pd.DataFrame:
    """One row per site (and mixture): ``effective_rank``, ``stable_rank``, ``numerical_rank``
    (σ > tol·σ_max), ``energy_top1/4/16`` (share of Σσ² in the largest 1, 4, 16) and ``r``."""
    if not isinstance(spectra, pd.DataFrame):
        raise LilyLabTypeError(f"rank_summary takes the spectra DataFrame of lily_lab.delta_spectra(model), got "
                               f"{type(spectra).__name__}")
    missing = [c for c in ("site", "sigma") if c not in spectra.columns]
    if missing:
        raise InputError(f"rank_summary needs the spectra columns {missing}, which this frame lacks (it has "
                         f"{list(spectra.columns)}): pass the frame of lily_lab.delta_spectra(model)")
    keys = [c for c in ("site", "module", "group", "index", "layer", "kind", "mixture", "r") if c in spectra.columns]
    rows = []
    for key, part in spectra.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, key)), **spectrum_ranks(part["sigma"].to_numpy(), tol)})
    cols = keys + ["effective_rank", "stable_rank", "numerical_rank", "energy_top1", "energy_top4", "energy_top16"]
    return pd.DataFrame(rows, columns=cols)


def lora_equivalent_rank(model: nn.Module) -> int:
    """The LoRA rank with (at most) the same trainable adapter parameters on the same sites:
    ``⌊adapter parameters / Σ_sites (d_in + d_out)⌋``."""
    from ..core import count_parameters

    from ..core.layer import require_module

    require_module(model, "lora_equivalent_rank")
    sites = adapter_sites(model)
    if not sites:
        raise InputError("lora_equivalent_rank: no adapter sites in this model; pass a model with a Lily or LoRA "
                         "adapter (lily_lab.add_lily, load_adapter or PEFT)")
    from .layout import lora_rank_for_budget

    return lora_rank_for_budget(count_parameters(model)["adapter"], [(s.d_in, s.d_out) for s in sites])


def dense_delta(site: Site, pi: np.ndarray | None = None) -> torch.Tensor:
    """The dense ``d_out × d_in`` ΔW of one site at mixture ``π`` (uniform if None), float64.
    For tests, merging and small layers; spectra never need it."""
    E = site.num_B
    pi = np.full(E, 1 / E) if pi is None else np.asarray(pi, dtype=np.float64)
    B_mix = mix_experts(torch.from_numpy(pi), site.B.detach().double().cpu())
    return site.scaling * B_mix.T @ site.A.detach().double().cpu()


__all__ = ["delta_spectra", "rank_summary", "spectrum_ranks", "lora_equivalent_rank", "factor_singular_values",
           "dense_delta"]
