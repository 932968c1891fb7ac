"""What ``record_routing`` costs an eval forward pass.

One eval forward (``torch.no_grad``, batch routing) of MiniLM with Lily on query and value, 32 × 64
tokens with padding, labels annotated after each call, inside an open ``record_routing`` block — as
``record_dataset`` runs a loader — against the same forward of an identical copy of the model with
no recorder. The two alternate call by call. The recorder folds each call's labels and token ids
into its sums when the next call starts, so that work is timed with the next forward; the last
fold, when the block exits, happens once per recording and is reported beside the row.
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import torch

import lily_lab as ll

from ._common import LoadWindow, Row, Settings, alternate_pairs, fmt_seconds, timing_row
from ._models import base_model, batch_for, shape_for, with_lily

LIMIT = 1.05
CALLS = 4  # forwards recorded by the correctness check


def run(settings: Settings) -> list[Row]:
    base, name = base_model(settings)
    model = with_lily(base, settings, "batch").eval()
    twin = copy.deepcopy(model)  # the same weights, never hooked
    batch = batch_for(model, settings)
    labels = batch.pop("labels")

    def check_run():
        with torch.no_grad(), ll.record_routing(model) as rec:
            for _ in range(CALLS):
                model(**batch)
                rec.annotate(labels=labels)
        return rec.routing

    check(model, batch, labels, check_run(), rtol=1e-2 if settings.dtype == "bf16" else 1e-4)

    repeats = 3 * settings.repeats  # a forward is cheap: more pairs, finer alternation
    with torch.no_grad(), LoadWindow() as load:
        with ll.record_routing(model) as rec:
            def recorded():
                model(**batch)
                rec.annotate(labels=labels)

            pairs = alternate_pairs(recorded, lambda: twin(**batch), settings, repeats=repeats)
            t0 = time.perf_counter()
        exit_seconds = time.perf_counter() - t0
    calls = repeats + settings.warmup
    assert rec.routing.record(rec.routing.sites[0]).n_calls == calls
    shape = shape_for(settings)
    row = timing_row(f"eval forward under `record_routing` ({name}, batch {shape.batch} × {shape.tokens})",
                     "the same forward without it", "≤ 1.05×", LIMIT, pairs, load, settings)
    row.key = "record_routing"
    row.notes.append(f"labels annotated after each call; closing the block (the last fold of token ids) took "
                     f"{fmt_seconds(exit_seconds)} once for {calls} calls "
                     f"({exit_seconds / calls / statistics.median(pairs.wall_b):.1%} of a forward each)")
    return [row]


def check(model, batch, labels, routing, rtol: float = 1e-4) -> None:
    """The recording holds what a recomputation from the layers' inputs gives (raises if not).
    ``rtol``: 1e-4 in float32; a bf16 model rounds its router probabilities to bf16 (2⁻⁸)."""
    mask = batch["attention_mask"].bool().cpu()
    real = int(mask.sum())
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, ll.LilyLayer)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    for name in routing.sites:
        rec = routing.record(name)
        assert rec.n_tokens == CALLS * real, f"{name}: recorded {rec.n_tokens} tokens, expected {CALLS * real}"
        layer = model.get_submodule(name)
        with torch.no_grad():
            h = captured[name].to(layer.lily_A.dtype) @ layer.lily_A.T
            p = torch.softmax((h @ layer.lily_router.T).float(), dim=-1)[mask.to(h.device)].double().cpu().numpy()
        assert np.allclose(rec.sum_probs, CALLS * p.sum(axis=0), rtol=rtol, atol=1e-6), f"{name}: usage sums differ"
        assert sum(v.count for v in rec.label_sums.values()) == CALLS * real, f"{name}: labels not folded in"
        assert sum(v.count for v in rec.token_sums.values()) == CALLS * real, f"{name}: token ids not folded in"
