"""Routing → metrics (docs/metrics.md): pure functions from a ``Routing`` to tidy DataFrames.

All entropies are natural-log and, where the name says so, divided by ``ln E`` to lie in [0, 1].
Every metric comes from the recording's exact sums, never from its token sample.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from ..core.errors import LilyLabTypeError
from ..core.names import layer_of  # noqa: F401 (spectra, layout and intruders import it from here)
from ..observe.routing import Routing, RoutingError, SiteRecord, entropy
from ..observe.tokens import token_texts

METRIC_COLUMNS = ["load_entropy", "token_entropy", "routing_mi", "effective_experts", "max_usage", "cv2",
                  "switch_balance", "z_loss"]
#: The dispatch view of a top-k router (docs/metrics.md, "Top-k routers"): what each expert was
#: actually sent. NaN for a site that mixes every expert (Lily).
DISPATCH_COLUMNS = ["tokens_min", "tokens_max", "tokens_std", "aux_loss"]


def require_routing(routing, fn: str, arg: str = "routing") -> None:
    """Raise :class:`~lily_lab.LilyLabTypeError` naming ``fn`` and ``arg`` unless ``routing`` is a
    :class:`~lily_lab.Routing`."""
    if not isinstance(routing, Routing):
        raise LilyLabTypeError(f"{fn}: {arg} must be a lily_lab.Routing (rec.routing of record_routing, or "
                               f"Routing.load(path)), got {type(routing).__name__}")


def site_metrics(rec: SiteRecord) -> dict[str, float]:
    """The router metrics (docs/metrics.md) of one site's sums (``n_tokens`` > 0, ``num_B`` ≥ 2)."""
    E, n = rec.num_B, rec.n_tokens
    u = rec.sum_probs / n
    H_u = float(entropy(u))
    mean_H = rec.sum_token_entropy / n
    f = rec.argmax_counts / n
    mean_u = u.mean()
    return {
        "load_entropy": H_u / np.log(E),
        "token_entropy": mean_H / np.log(E),
        "routing_mi": (H_u - mean_H) / np.log(E),
        "effective_experts": float(np.exp(H_u)),
        "max_usage": float(u.max()),
        "cv2": float(u.var() / mean_u**2),
        "switch_balance": float(E * (f * u).sum()),
        "z_loss": rec.sum_z / n,
    }


def dispatch_metrics(rec: SiteRecord) -> dict[str, float]:
    """The dispatch metrics (docs/metrics.md) of one top-k router's sums (``n_tokens`` > 0,
    ``top_k`` > 0): tokens sent to each expert — min, max and standard deviation over the experts
    — and the auxiliary load-balancing loss of this layer alone,
    ``aux_loss = E · Σ_e (c_e / N) · u_e`` (``c_e`` tokens sent to expert ``e``, ``u_e`` its mean
    router probability), which is what transformers' ``load_balancing_loss_func`` computes when
    given this one layer's router logits (and the attention mask)."""
    c, n, E = rec.dispatch_counts.astype(np.float64), rec.n_tokens, rec.num_B
    u = rec.sum_probs / n
    return {"tokens_min": float(c.min()), "tokens_max": float(c.max()), "tokens_std": float(c.std()),
            "aux_loss": float(E * (c / n * u).sum())}


def _site_columns(rec: SiteRecord) -> dict:
    return {"site": rec.name, "module": rec.module, "group": rec.group, "index": rec.index,
            "layer": layer_of(rec.name, rec.index), "kind": rec.kind, "routing": rec.routing, "num_B": rec.num_B,
            "top_k": rec.top_k}


def router_metrics(routing: Routing) -> pd.DataFrame:
    """One row per routed site (``E ≥ 2``): site, module, group, index, layer, kind, routing,
    ``num_B`` (experts), ``top_k`` (0 for Lily, which mixes every expert), ``n_tokens``,
    ``nonfinite``, every router metric of docs/metrics.md and, for top-k routers (mixture-of-experts
    layers), the dispatch metrics (``DISPATCH_COLUMNS``; NaN elsewhere). Sites that saw no token
    have NaN metrics."""
    require_routing(routing, "router_metrics")
    rows = []
    for name in routing.sites:
        rec = routing.record(name)
        if rec.num_B < 2:
            continue
        row = {**_site_columns(rec), "n_tokens": rec.n_tokens, "nonfinite": rec.nonfinite}
        row.update(site_metrics(rec) if rec.n_tokens else dict.fromkeys(METRIC_COLUMNS, np.nan))
        row.update(dispatch_metrics(rec) if rec.n_tokens and rec.top_k else dict.fromkeys(DISPATCH_COLUMNS, np.nan))
        rows.append(row)
    columns = list(_site_columns_template()) + ["n_tokens", "nonfinite"] + METRIC_COLUMNS + DISPATCH_COLUMNS
    return pd.DataFrame(rows, columns=columns)


def expert_load(routing: Routing) -> pd.DataFrame:
    """The dispatch view of every top-k router (mixture-of-experts layer) in ``routing``: one row
    per site × expert with ``tokens`` (tokens sent to the expert: the load the layer really
    carried), ``share`` (``tokens / (top_k · n_tokens)``, adding up to 1 over a site's experts),
    ``usage`` (its mean router probability ``u_e``) and the site's ``n_tokens``. Sites that mix every
    expert (Lily) have no dispatch and are left out; a recording without top-k routers raises."""
    require_routing(routing, "expert_load")
    rows = []
    for name in routing.sites:
        rec = routing.record(name)
        if not rec.top_k:
            continue
        n = max(rec.n_tokens, 1)
        for e in range(rec.num_B):
            rows.append({**_site_columns(rec), "expert": e, "tokens": int(rec.dispatch_counts[e]),
                         "share": float(rec.dispatch_counts[e] / (rec.top_k * n)),
                         "usage": float(rec.sum_probs[e] / n), "n_tokens": rec.n_tokens})
    if not rows:
        raise RoutingError("expert_load reads top-k routers (mixture-of-experts layers), and this recording has "
                           "none: its sites mix every expert (router_metrics and specialization read those)")
    return pd.DataFrame(rows)


def _site_columns_template():
    return ("site", "module", "group", "index", "layer", "kind", "routing", "num_B", "top_k")


def _js_divergence(dists: np.ndarray) -> float:
    """Mean pairwise Jensen–Shannon divergence (base 2, in [0, 1]) between rows of ``dists``.
    One vectorised pass per row (thousands of token ids stay fast)."""
    n = len(dists)
    if n < 2:
        return float("nan")
    H = entropy(dists)
    total = 0.0
    for i in range(n - 1):
        m = (dists[i] + dists[i + 1:]) / 2
        total += float((entropy(m) - (H[i] + H[i + 1:]) / 2).sum())
    return total / (n * (n - 1) / 2) / np.log(2)


def specialization(routing: Routing, by: str = "label", min_count: int = 1) -> pd.DataFrame:
    """How expert usage depends on a value: the label of the sequence (``by="label"``) or the
    token id (``by="token"``).

    One row per site × value × expert: ``usage`` = mean router probability of the expert over
    that value's tokens (the router's ``p_t``: under batch or sequence routing a preference the
    layer does not apply), ``n_tokens`` of the value, ``load_entropy`` of the value's usage vector
    (``H(u_v) / ln E``, as ``router_metrics`` for the whole site), and per site (repeated on its rows)
    ``mutual_information`` I(value; expert) in nats, ``normalized_mi`` (÷ ln E, so at most
    ``min(ln(number of values), ln E) / ln E``: 0.5 for 2 labels and 4 experts) and
    ``js_divergence``, the mean pairwise Jensen–Shannon divergence (bits) between the values'
    usage vectors. Values seen fewer than ``min_count`` times are left out of the rows, not the MI.
    """
    require_routing(routing, "specialization")
    if by not in ("label", "token"):
        raise RoutingError(f"by must be 'label' or 'token', got {by!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 0:
        raise RoutingError(f"min_count must be an integer ≥ 0, got {min_count!r}")
    rows = []
    for name in routing.sites:
        rec = routing.record(name)
        if rec.num_B < 2:
            continue
        sums = rec.label_sums if by == "label" else rec.token_sums
        if not sums:
            continue
        keys = sorted(sums)
        counts = np.array([sums[k].count for k in keys], dtype=float)
        usage = np.array([sums[k].probs for k in keys]) / np.maximum(counts, 1)[:, None]
        N = counts.sum()
        u = (usage * counts[:, None]).sum(axis=0) / N
        mi = float(entropy(u) - (counts / N * entropy(usage)).sum())
        frequent = counts >= min_count
        js = _js_divergence(usage[frequent])
        values = [routing.labels[k] if by == "label" else k for k in keys]
        for v, c, uv, keep in zip(values, counts, usage, frequent):
            if not keep:
                continue
            H_v = float(entropy(uv) / np.log(rec.num_B))  # the value's own load entropy (docs/metrics.md)
            for e in range(rec.num_B):
                rows.append({**_site_columns(rec), "value": v, "expert": e, "usage": float(uv[e]),
                             "n_tokens": int(c), "load_entropy": H_v, "mutual_information": mi,
                             "normalized_mi": mi / np.log(rec.num_B), "js_divergence": js})
    if not rows:
        what = "labels: call recorder.annotate(labels=…) after each call" if by == "label" else \
            "token ids: call the model with input_ids or recorder.annotate(input_ids=…)"
        raise RoutingError(f"this recording has no {what}")
    return pd.DataFrame(rows)


def expert_layer_profile(routing: Routing) -> pd.DataFrame:
    """Lily's cross-layer view: each global expert of a bank, its usage at every site of the group.

    Rows group × expert × site with ``usage`` and ``share`` (the expert's usage at that site over
    its usage summed across the group's sites), and per group × expert ``layer_entropy``
    = H(share) / ln L: 1 when the expert serves all layers alike, 0 when it serves one layer.
    """
    require_routing(routing, "expert_layer_profile")
    rows = []
    by_group: dict[str, list[SiteRecord]] = {}
    for name in routing.sites:
        rec = routing.record(name)
        if rec.num_B >= 2 and rec.n_tokens:
            by_group.setdefault(rec.group, []).append(rec)
    for group, recs in by_group.items():
        recs = sorted(recs, key=lambda r: r.index)
        U = np.array([r.sum_probs / r.n_tokens for r in recs])  # (L, E)
        share = U / np.where(U.sum(axis=0) > 0, U.sum(axis=0), 1)
        L = len(recs)
        for e in range(U.shape[1]):
            H = float(entropy(share[:, e]) / np.log(L)) if L > 1 else float("nan")
            for i, rec in enumerate(recs):
                rows.append({"group": group, "expert": e, "site": rec.name, "index": rec.index,
                             "layer": layer_of(rec.name, rec.index), "usage": float(U[i, e]),
                             "share": float(share[i, e]), "layer_entropy": H})
    return pd.DataFrame(rows, columns=["group", "expert", "site", "index", "layer", "usage", "share", "layer_entropy"])


def top_tokens(routing: Routing, k: int = 10, min_count: int = 3, tokenizer=None) -> pd.DataFrame:
    """Per site and expert, the ``k`` token ids whose tokens give the expert the highest mean
    probability (among tokens seen at least ``min_count`` times): site, expert, rank, token_id,
    token (with a tokenizer: readable text, as in ``Routing.token_table``), usage, n_tokens."""
    require_routing(routing, "top_tokens")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RoutingError(f"k must be an integer ≥ 1 (tokens per expert), got {k!r}")
    spec = specialization(routing, by="token", min_count=min_count)
    spec = spec.sort_values(["site", "expert", "usage"], ascending=[True, True, False], kind="stable")
    top = spec.groupby(["site", "expert"], sort=False).head(k).copy()
    top["rank"] = top.groupby(["site", "expert"], sort=False).cumcount()
    top = top.rename(columns={"value": "token_id"})
    if tokenizer is not None:
        ids = sorted(set(top["token_id"].tolist()))
        text = dict(zip(ids, token_texts(tokenizer, ids)))
        top["token"] = top["token_id"].map(text)
    cols = ["site", "module", "group", "index", "layer", "expert", "rank", "token_id"] + \
        (["token"] if tokenizer is not None else []) + ["usage", "n_tokens"]
    return top[cols].reset_index(drop=True)
