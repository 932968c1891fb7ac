"""A ``Timeline`` → metrics over training steps; timelines → the experts' trajectories."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..core.errors import InputError, LilyLabTypeError, NonFiniteWeightsError
from ..observe.timeline import Timeline
from .experts import bank_cosines, mean_pairwise
from .finite import DIVERGED_REMEDY
from .routing import METRIC_COLUMNS, router_metrics


def _require_timeline(timeline, fn: str) -> None:
    if not isinstance(timeline, Timeline):
        raise LilyLabTypeError(f"{fn}: timeline must be a lily_lab.Timeline (Timeline(probe).observe(model, step), "
                               f"or RoutingCallback(...).timeline), got {type(timeline).__name__}")


def timeline_metrics(timeline: Timeline) -> pd.DataFrame:
    """Long DataFrame ``step, site, module, group, index, layer, metric, value``: every router
    metric (docs/metrics.md) of every routed site at every observed step."""
    _require_timeline(timeline, "timeline_metrics")
    frames = []
    for step, routing in zip(timeline.steps, timeline.routings):
        m = router_metrics(routing)
        if m.empty:
            continue
        m = m.melt(id_vars=["site", "module", "group", "index", "layer"], value_vars=METRIC_COLUMNS,
                   var_name="metric", value_name="value")
        m.insert(0, "step", step)
        frames.append(m)
    cols = ["step", "site", "module", "group", "index", "layer", "metric", "value"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def timeline_expert_similarity(timeline: Timeline) -> pd.DataFrame:
    """``step, group, mean_cosine, min_cosine, max_cosine, mean_norm`` of each bank's experts at
    every observed step (needs ``Timeline(track_experts=True)``)."""
    _require_timeline(timeline, "timeline_expert_similarity")
    rows = []
    for step, banks in zip(timeline.steps, timeline.banks):
        for group, B in banks.items():
            cos = bank_cosines(B)
            off = cos[np.triu_indices(len(cos), k=1)]
            off = off[~np.isnan(off)]  # pairs with an all-zero expert have no cosine
            rows.append({"step": step, "group": group, "mean_cosine": mean_pairwise(cos),
                         "min_cosine": float(off.min()) if len(off) else np.nan,
                         "max_cosine": float(off.max()) if len(off) else np.nan,
                         "mean_norm": float(np.linalg.norm(B.reshape(len(B), -1), axis=1).mean())})
    return pd.DataFrame(rows, columns=["step", "group", "mean_cosine", "min_cosine", "max_cosine", "mean_norm"])


#: The run name of a single ``Timeline`` given to ``timeline_expert_trajectories``.
SINGLE_RUN = "timeline"


def _runs_of(timelines, fn: str) -> dict:
    """``{run name: Timeline}`` from one ``Timeline`` or a mapping of them, each checked."""
    if isinstance(timelines, Timeline):
        return {SINGLE_RUN: timelines}
    if not isinstance(timelines, Mapping):
        raise LilyLabTypeError(f"{fn}: timelines must be a lily_lab.Timeline or a dict {{run name: Timeline}} "
                               f"(Timeline(probe).observe(model, step), or RoutingCallback(...).timeline), "
                               f"got {type(timelines).__name__}")
    if not timelines:
        raise InputError(f"{fn}: timelines is an empty dict; give at least one {{run name: Timeline}}")
    for run, t in timelines.items():
        if not isinstance(t, Timeline):
            raise LilyLabTypeError(f"{fn}: timelines[{run!r}] must be a lily_lab.Timeline, got {type(t).__name__}")
    return dict(timelines)


def timeline_expert_trajectories(timelines, group: str | None = None, components: int = 2) -> pd.DataFrame:
    """Where every expert of one bank went over training: the experts of every observed step of
    every run, projected on the principal components of that whole collection.

    ``timelines`` is one :class:`~lily_lab.Timeline` (its run is named ``"timeline"``) or a dict
    ``{run name: Timeline}``, observed with ``track_experts=True`` (the default: each observation
    keeps a copy of every bank, ``timeline.banks``). ``group`` picks the bank (default: the first
    bank of the first run); every run must have it, in the same shape ``(E, r, d_out)``.

    Each expert ``B_e`` (``r × d_out``) at each step of each run is one point, its ``r·d_out``
    numbers one row of a matrix ``X`` (all runs, steps and experts). ``X`` is centred on its mean
    row and its principal directions found exactly, by the SVD of ``X`` — or, when ``X`` has no
    more rows than columns (the usual case: a few hundred points of thousands of numbers), by the
    eigendecomposition of the smaller Gram matrix ``X Xᵀ``, which gives the same projections.

    Returns a DataFrame ``run, step, expert, PC1, …, PC{components}`` (``expert`` the index
    ``e``; rows in run, step, expert order) with

    - ``df.attrs["explained"]``: each component's share of the spread (of the total squared
      distance of the points from their mean): ``[share of PC1, share of PC2, …]``, NaN when the
      points do not spread at all (every expert equal at every step);
    - ``df.attrs["group"]``: the bank.

    Signs: a principal direction has no sign of its own; here each is turned so that its largest
    entry (in absolute value; the first of equal ones) is positive, so the same data always gives
    the same picture.

    How to read it (``lily_lab.plots.plot_expert_trajectories``): distinct experts trace separate
    paths; collapse shows as the experts' paths running together into one line. The projection
    keeps only the explained share of the spread: experts that overlap on the plane may still be
    far apart in the components left out — quote ``attrs["explained"]`` with the picture.

    A bank holding NaN or ±inf (a diverged run) raises :class:`~lily_lab.NonFiniteWeightsError`
    naming the run and the step.
    """
    fn = "timeline_expert_trajectories"
    runs = _runs_of(timelines, fn)
    if isinstance(components, bool) or not isinstance(components, (int, np.integer)) or components < 1:
        raise InputError(f"{fn}: components must be an integer ≥ 1 (how many principal components), "
                         f"got {components!r}")
    for run, t in runs.items():
        if not len(t):
            raise InputError(f"{fn}: timelines[{run!r}] has no observations yet — call timeline.observe(model, step) "
                             f"or train with RoutingCallback")
        if any(t.banks) and len(t.banks) != len(t.steps):
            raise InputError(f"{fn}: timelines[{run!r}] has banks for {len(t.banks)} of its {len(t.steps)} steps "
                             f"(track_experts was changed between observations); observe every step with "
                             f"track_experts=True")
        if not any(t.banks):
            raise InputError(f"{fn}: timelines[{run!r}] recorded no expert banks — observe with "
                             f"Timeline(probe, track_experts=True) (the default; RoutingCallback(..., "
                             f"track_experts=True)), which keeps a copy of every bank at each step")
    first_run = next(iter(runs))
    groups = list(next(b for b in runs[first_run].banks if b))
    if group is None:
        group = groups[0]
    elif not isinstance(group, str):
        raise LilyLabTypeError(f"{fn}: group must be a group key such as {groups[0]!r} (or None: the first), "
                               f"got {type(group).__name__}")
    shape, rows, points = None, [], []
    for run, t in runs.items():
        for step, banks in zip(t.steps, t.banks):
            if group not in banks:
                have = list(banks) or list(next(b for b in t.banks if b))
                raise InputError(f"{fn}: group={group!r} is not a bank of timelines[{run!r}] (at step {step}); "
                                 f"its banks are: {', '.join(map(repr, have))}")
            B = np.asarray(banks[group], dtype=np.float64)
            if shape is None:
                shape, shape_at = B.shape, (run, step)
            elif B.shape != shape:
                raise InputError(f"{fn}: bank {group!r} is {'×'.join(map(str, B.shape))} (E×r×d_out) in "
                                 f"timelines[{run!r}] at step {step} but {'×'.join(map(str, shape))} in "
                                 f"timelines[{shape_at[0]!r}] at step {shape_at[1]}; the experts of different "
                                 f"shapes share no space — compare runs of the same adapter configuration")
            bad = int(B.size - np.isfinite(B).sum())
            if bad:
                raise NonFiniteWeightsError(
                    f"{fn} cannot run: non-finite weights (NaN or inf) in bank {group!r} of timelines[{run!r}] at "
                    f"step {step} ({bad} value{'s' * (bad != 1)}). {DIVERGED_REMEDY}")
            rows.append(B.reshape(len(B), -1))
            points += [(run, int(step), e) for e in range(len(B))]
    X = np.concatenate(rows)
    n, d = X.shape
    if components > min(n, d):
        raise InputError(f"{fn}: components={components} is more than the collection has: {n} points of {d} "
                         f"numbers give at most {min(n, d)}")
    scores, explained = _principal_components(X, components)
    df = pd.DataFrame(points, columns=["run", "step", "expert"])
    for k in range(components):
        df[f"PC{k + 1}"] = scores[:, k]
    df.attrs["explained"] = explained
    df.attrs["group"] = group
    return df


def _principal_components(X: np.ndarray, k: int, *, gram: bool | None = None) -> tuple[np.ndarray, list[float]]:
    """The centred rows of ``X`` projected on their top ``k`` principal directions (``n × k``) and
    each direction's share of the total squared spread. ``gram``: use the ``n × n`` Gram matrix
    (default: when ``X`` has no more rows than columns) instead of the SVD of ``X``. Each direction
    is signed so that its largest-magnitude entry is positive."""
    X = X - X.mean(axis=0)
    n, d = X.shape
    total = float(np.einsum("ij,ij->", X, X))
    if gram if gram is not None else n <= d:
        lam, U = np.linalg.eigh(X @ X.T)
        order = np.argsort(lam)[::-1][:k]
        S = np.sqrt(np.clip(lam[order], 0.0, None))
        U = U[:, order]
        # The directions themselves, for the sign: V = Xᵀ U / S (none for a zero component).
        V = (X.T @ U) / np.where(S > 0, S, 1.0)
        scores = U * S
    else:
        _, S, Vt = np.linalg.svd(X, full_matrices=False)
        S, V = S[:k], Vt[:k].T
        scores = X @ V
    # A component with no spread of its own (σ below 1e-7 of the largest: rounding, which the Gram
    # matrix raises to about 1e-8) has no direction: its scores and its share are 0.
    zero = S <= S.max(initial=0.0) * 1e-7
    scores[:, zero] = 0.0
    flip = np.sign(V[np.argmax(np.abs(V), axis=0), np.arange(V.shape[1])])
    scores = scores * np.where(flip == 0, 1.0, flip) + 0.0  # + 0.0: no -0.0
    shares = [float("nan") if total <= 0 else 0.0 if z else float(s * s / total) for s, z in zip(S, zero)]
    return scores, shares
