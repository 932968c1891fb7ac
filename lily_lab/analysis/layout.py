"""How a Lily adapter is wired and what it costs: the sharing layout and the parameter budget.

Both work from a model or from a config alone (for teaching: no model needed). The parameter
formula is docs/lily.md's: one group of ``L`` sites of shape ``d_out × d_in`` trains
``⌈L/stride_A⌉·r·d_in`` (the shared ``A``s) ``+ E·r·d_out`` (the bank) ``+ L·r·E`` (the routers).
"""

from __future__ import annotations

import math
from typing import Iterable

import pandas as pd
from torch import nn

from ..core import LilyConfig, adapter_sites
from ..core.errors import InputError, LilyLabTypeError, check_positive_int
from .routing import layer_of

LAYOUT_COLUMNS = ["group", "module", "site", "index", "layer", "a_index", "num_B", "r", "d_in", "d_out", "kind"]
BUDGET_COLUMNS = ["r", "layers", "d_in", "d_out", "stride_A", "num_B", "groups", "n_A", "lily_params",
                  "lora_params_same_r", "lora_equivalent_rank", "lily_rank_bound", "lora_rank_bound",
                  "params_ratio"]


def sharing_layout(model: nn.Module) -> pd.DataFrame:
    """One row per site of ``model``'s adapter: ``group, module, site, index, layer, a_index``
    (which shared ``A`` of the group it uses), ``num_B`` (experts in its group's bank), ``r``,
    ``d_in``, ``d_out``, ``kind``. Works for lily_lab Lily, PEFT Lily and PEFT LoRA models."""
    from ..core.layer import require_module

    require_module(model, "sharing_layout")
    sites = adapter_sites(model)
    if not sites:
        raise InputError("sharing_layout needs a model with a Lily (or LoRA) adapter; this one has no adapter sites")
    rows = [{"group": s.group, "module": s.module, "site": s.name, "index": s.index,
             "layer": layer_of(s.name, s.index), "a_index": s.a_index, "num_B": s.num_B, "r": s.r,
             "d_in": s.d_in, "d_out": s.d_out, "kind": s.kind} for s in sites]
    return pd.DataFrame(rows, columns=LAYOUT_COLUMNS)


def sharing_layout_from_config(config: LilyConfig, layers: int, d_in: int, d_out: int) -> pd.DataFrame:
    """The layout ``config`` would give a model with ``layers`` sites of shape ``d_out × d_in`` per
    target: one group per target module (a regex target is one group), sites named
    ``"layer {i}"``. Same columns as :func:`sharing_layout`."""
    if not isinstance(config, LilyConfig):
        raise LilyLabTypeError(f"config must be a lily_lab.LilyConfig, got {type(config).__name__}")
    layers = check_positive_int(layers, "layers")
    d_in, d_out = check_positive_int(d_in, "d_in"), check_positive_int(d_out, "d_out")
    targets = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    rows = []
    for target in targets:
        for i in range(layers):
            rows.append({"group": f"{target}:{d_out}x{d_in}", "module": target, "site": f"layer {i}", "index": i,
                         "layer": i, "a_index": i // config.stride_A, "num_B": config.num_B, "r": config.r,
                         "d_in": d_in, "d_out": d_out, "kind": "lily"})
    return pd.DataFrame(rows, columns=LAYOUT_COLUMNS)


def lily_group_parameters(layers: int, d_in: int, d_out: int, r: int, stride_A: int, num_B: int) -> int:
    """Trainable parameters of one group (docs/lily.md): ``⌈L/stride_A⌉·r·d_in + E·r·d_out + L·r·E``."""
    return math.ceil(layers / stride_A) * r * d_in + num_B * r * d_out + layers * r * num_B


def lora_rank_for_budget(adapter_params: int, dims: Iterable[tuple[int, int]]) -> int:
    """The LoRA rank with the same budget: ``⌊adapter_params / Σ (d_in + d_out)⌋`` over the sites
    ``dims = [(d_in, d_out), ...]`` — a rank-r LoRA costs ``r·(d_in + d_out)`` per site. May be 0.
    The one definition behind ``parameter_budget``, ``lora_equivalent_rank`` and the demo."""
    per_rank = sum(d_in + d_out for d_in, d_out in dims)
    if per_rank <= 0:
        raise InputError("dims must name at least one site with d_in + d_out > 0, e.g. [(384, 384)]")
    return adapter_params // per_rank


def parameter_budget(d_in: int, d_out: int, layers: int, r_values: Iterable[int], stride_A: int = 1,
                     num_B: int = 2, *, groups: int = 1) -> pd.DataFrame:
    """Lily against LoRA on the same ``layers`` sites of shape ``d_out × d_in``, one row per ``r``.

    Columns: ``lily_params`` (``groups`` groups of the formula above), ``lora_params_same_r``
    (LoRA of rank ``r`` on every site: ``L·r·(d_in + d_out)`` per group), ``lora_equivalent_rank``
    (the largest LoRA rank within Lily's budget: ``⌊lily_params / (groups·L·(d_in + d_out))⌋``),
    ``lily_rank_bound`` (rank bound of one site's ΔW: ``min(r, d_in, d_out)``), ``lora_rank_bound``
    (the same for the equal-budget LoRA), ``params_ratio`` (Lily over LoRA at the same ``r``),
    ``n_A`` (shared ``A``s per group) and the inputs.
    """
    d_in, d_out = check_positive_int(d_in, "d_in"), check_positive_int(d_out, "d_out")
    layers = check_positive_int(layers, "layers")
    stride_A, num_B = check_positive_int(stride_A, "stride_A"), check_positive_int(num_B, "num_B")
    groups = check_positive_int(groups, "groups")
    if hasattr(r_values, "__index__"):
        r_values = [r_values]
    try:
        r_values = list(r_values)
    except TypeError:
        raise LilyLabTypeError(f"r_values must be ranks to compare (an integer or a list of them, e.g. "
                               f"range(1, 33)), got {type(r_values).__name__}") from None
    r_values = [check_positive_int(r, "r") for r in r_values]
    if not r_values:
        raise InputError("r_values is empty: give the ranks to compare, e.g. range(1, 33)")
    rows = []
    for r in r_values:
        lily = groups * lily_group_parameters(layers, d_in, d_out, r, stride_A, num_B)
        per_rank = groups * layers * (d_in + d_out)  # LoRA parameters per unit of rank
        equivalent = lora_rank_for_budget(lily, [(d_in, d_out)] * (groups * layers))
        rows.append({"r": r, "layers": layers, "d_in": d_in, "d_out": d_out, "stride_A": stride_A, "num_B": num_B,
                     "groups": groups, "n_A": math.ceil(layers / stride_A), "lily_params": lily,
                     "lora_params_same_r": per_rank * r, "lora_equivalent_rank": equivalent,
                     "lily_rank_bound": min(r, d_in, d_out), "lora_rank_bound": min(equivalent, d_in, d_out),
                     "params_ratio": lily / (per_rank * r)})
    return pd.DataFrame(rows, columns=BUDGET_COLUMNS)


__all__ = ["sharing_layout", "sharing_layout_from_config", "parameter_budget", "lily_group_parameters"]
