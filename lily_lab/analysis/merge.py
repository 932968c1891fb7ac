"""Folding a Lily adapter into the base weights at one mixture, and what that costs in accuracy.

A routed adapter cannot be merged exactly: its mixture depends on the input. ``merge_at`` folds
``W + ΔW(π)`` at a fixed ``π`` per site; ``merge_error`` measures how far the merged model's
outputs are from the routed model's on your data.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from ..core import adapter_sites, remove_lily
from ..core.errors import InputError
from ..core.layer import LilyLayer, is_conv1d, require_module
from .finite import require_finite
from .spectra import mixtures_for, dense_delta


def merge_at(model: nn.Module, mixture: Any = None) -> nn.Module:
    """A plain copy of ``model`` (no Lily modules) with ``W + ΔW(π)`` folded into every site.

    ``mixture`` as in :func:`delta_spectra`: ``None`` (uniform), an expert index, a ``Routing``
    (each site's mean applied mixture) or ``{site_name: vector}``. ``model`` is not changed.
    """
    require_module(model, "merge_at")
    sites = adapter_sites(model)
    if not sites or any(s.kind != "lily" for s in sites):
        what = "has no adapter sites" if not sites else "is a PEFT model: use PEFT's merge_and_unload()"
        raise InputError(f"merge_at folds lily_lab Lily adapters (add_lily or load_adapter); this model {what}")
    require_finite(sites, "merge_at", ("A", "B"))
    deltas = {}
    for s in sites:
        ((_, pi),) = mixtures_for(s, mixture, None, 1)
        deltas[s.name] = dense_delta(s, pi)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in merged.named_modules():
            if isinstance(module, LilyLayer):
                base = module.base_layer
                delta = deltas[name].to(dtype=base.weight.dtype, device=base.weight.device)
                base.weight.add_(delta.T if is_conv1d(base) else delta)
    return remove_lily(merged)


@torch.no_grad()
def merge_error(model: nn.Module, merged: nn.Module, batches: Iterable[Any]) -> float:
    """Relative deviation ``‖y_routed − y_merged‖ / ‖y_routed‖`` of the first output, pooled over
    ``batches`` (dicts of model inputs, or tensors). Both models run in eval mode."""
    for name, m in (("model", model), ("merged", merged)):
        if not isinstance(m, nn.Module):
            from ..core.errors import LilyLabTypeError

            raise LilyLabTypeError(f"merge_error: {name} must be a torch.nn.Module (the routed model and "
                                   f"lily_lab.merge_at(model)), got {type(m).__name__}")
    num = den = 0.0
    modes = (model.training, merged.training)
    model.eval()
    merged.eval()
    try:
        for batch in batches:
            y, y_m = _first(_call(model, batch)), _first(_call(merged, batch))
            num += float((y.double() - y_m.double()).square().sum())
            den += float(y.double().square().sum())
    finally:
        model.train(modes[0])
        merged.train(modes[1])
    if den == 0:
        raise InputError("merge_error: batches gave no outputs to compare (no batches, or all-zero outputs); pass a "
                         "list of model inputs, e.g. [tokenizer(texts, return_tensors='pt')]")
    return (num / den) ** 0.5


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    return model(batch)


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]
