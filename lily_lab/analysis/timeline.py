"""A ``Timeline`` → metrics over training steps."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..core.errors import LilyLabTypeError
from ..observe.timeline import Timeline
from .experts import bank_cosines, mean_pairwise
from .routing import METRIC_COLUMNS, router_metrics


def _require_timeline(timeline, fn: str) -> None:
    if not isinstance(timeline, Timeline):
        raise LilyLabTypeError(f"{fn}: timeline must be a lily_lab.Timeline (Timeline(probe).observe(model, step), "
                               f"or RoutingCallback(...).timeline), got {type(timeline).__name__}")


def timeline_metrics(timeline: Timeline) -> pd.DataFrame:
    """Long DataFrame ``step, site, module, group, index, layer, metric, value``: every §5 router
    metric of every routed site at every observed step."""
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
            rows.append({"step": step, "group": group, "mean_cosine": mean_pairwise(cos),
                         "min_cosine": float(off.min()) if len(off) else np.nan,
                         "max_cosine": float(off.max()) if len(off) else np.nan,
                         "mean_norm": float(np.linalg.norm(B.reshape(len(B), -1), axis=1).mean())})
    return pd.DataFrame(rows, columns=["step", "group", "mean_cosine", "min_cosine", "max_cosine", "mean_norm"])
