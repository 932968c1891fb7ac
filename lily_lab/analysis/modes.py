"""What each routing mode would apply, from a recording's sampled tokens."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..observe.routing import Routing


def mixture_modes(routing: Routing) -> pd.DataFrame:
    """Long frame ``site, mode, item, expert, weight``: the mixtures batch routing (one per call),
    sequence routing (one per sequence) and token routing (one per token) would apply to the
    sampled tokens of each site — the spread shows how much of the routers' per-token choice
    each mode keeps. Computed from the token sample, so with a sample smaller than the data the
    per-call and per-sequence means are estimates.

    Only real tokens are recorded, so the ``"batch"`` rows average real tokens only: what batch
    routing applies to the same calls without padding. Batch routing itself (PEFT's rule) also
    averages the padding positions of a padded call; the mixtures a batch-routed model actually
    applied are in ``routing.mixtures(site)``."""
    from .routing import require_routing

    require_routing(routing, "mixture_modes")
    frames = []
    for name in routing.sites:
        rec = routing.record(name)
        cols = rec.tokens.columns
        p = cols["probs"].astype(np.float64)
        if not len(p):
            continue
        E = p.shape[1]
        for mode, keys in (("batch", cols["call"]), ("sequence", cols["sequence"]),
                           ("token", np.arange(len(p)))):
            uniq, inv = np.unique(keys, return_inverse=True)
            sums = np.zeros((len(uniq), E))
            np.add.at(sums, inv, p)
            mix = sums / np.bincount(inv, minlength=len(uniq))[:, None]
            item = np.repeat(np.arange(len(uniq)), E)
            frames.append(pd.DataFrame({"site": name, "mode": mode, "item": item,
                                        "expert": np.tile(np.arange(E), len(uniq)), "weight": mix.reshape(-1)}))
    if not frames:
        return pd.DataFrame(columns=["site", "mode", "item", "expert", "weight"])
    return pd.concat(frames, ignore_index=True)
