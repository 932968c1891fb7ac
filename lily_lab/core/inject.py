"""``add_lily`` / ``remove_lily``: find the sites, group them, share ``A`` and ``B``, swap modules.

Sharing is by identity: every site of a group holds the *same* ``nn.Parameter`` as its bank ``B``,
and the sites ``i`` with ``i // stride_A == j`` hold the same ``A_j``. An optimizer therefore sees
each shared tensor once, and ``model.parameters()`` lists it once.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import AUX_LOSS_FIELDS, LAYER_OPTIONS, RUNTIME_FIELDS, LilyConfig
from .errors import LilyConfigError, LilyLabTypeError, TargetError, TargetTypeError
from .layer import CallContext, LilyLayer, base_dims, is_conv1d, require_module, scaling_overflow

_STATE_ATTR = "_lily_lab_state"


@dataclass
class _Planned:
    name: str  # path in model.named_modules()
    module: nn.Module
    target: str  # the target_modules entry (or regex) it matched


@dataclass
class GroupPlan:
    """One group: the sites that share a bank, in traversal order."""

    key: str  # e.g. "query:384x384"
    target: str
    d_in: int
    d_out: int
    sites: list[_Planned] = field(default_factory=list)


@dataclass
class _AdapterState:
    config: LilyConfig
    groups: list[GroupPlan]
    context: CallContext
    requires_grad: dict[int, bool]
    handles: list[Any]


def match_target(name: str, targets: list[str] | str) -> str | None:
    """The target that ``name`` matches, PEFT's rule: a regex fully matches the dotted name; a list
    entry equals it or is a dotted suffix of it. When several entries match, the last one wins
    (PEFT groups by the last matching suffix)."""
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, name) else None
    found = None
    for t in targets:
        if name == t or name.endswith("." + t):
            found = t
    return found


def plan_groups(model: nn.Module, config: LilyConfig) -> list[GroupPlan]:
    """The groups ``add_lily`` would build, without touching the model; raises on bad targets."""
    if get_state(model) is not None or any(isinstance(m, LilyLayer) for m in model.modules()):
        raise TargetError(
            "this model already has a lily_lab Lily adapter; call lily_lab.remove_lily(model) first "
            "(or load_adapter to replace its weights)"
        )
    planned: list[_Planned] = []
    for name, module in model.named_modules():
        if not name:
            continue
        target = match_target(name, config.target_modules)
        if target is None:
            continue
        if config.exclude_modules and match_target(name, config.exclude_modules) is not None:
            continue
        if _is_peft_layer(module):
            raise TargetError(
                f"module {name!r} is already a PEFT adapter layer ({type(module).__name__}); "
                "add lily_lab's Lily to the base model, not to a PEFT model"
            )
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise TargetTypeError(
                f"target {target!r} matched {name!r}, a {type(module).__name__}; Lily wraps only "
                "torch.nn.Linear and transformers' Conv1D: name the linear layers inside it instead "
                f"(e.g. {_linear_children(module)})"
            )
        planned.append(_Planned(name, module, target))
    if not planned:
        raise TargetError(_no_match_message(model, config))

    groups: dict[tuple[str, int, int], GroupPlan] = {}
    for p in planned:
        d_in, d_out = base_dims(p.module)
        key = (p.target, d_out, d_in)
        if key not in groups:
            groups[key] = GroupPlan(f"{p.target}:{d_out}x{d_in}", p.target, d_in, d_out)
        groups[key].sites.append(p)
    return list(groups.values())


def add_lily(model: nn.Module, config: LilyConfig) -> nn.Module:
    """Inject Lily into ``model`` in place, freeze every base parameter, return the model.

    Raises a :class:`~lily_lab.LilyLabError` (and leaves the model untouched) when no module
    matches, a match is not a linear layer, or the model already carries an adapter.
    """
    require_module(model, "add_lily")
    if not isinstance(config, LilyConfig):
        hint = " (build one: LilyConfig(**your_dict))" if isinstance(config, dict) else ""
        raise LilyLabTypeError(f"config must be a lily_lab.LilyConfig, got {type(config).__name__}{hint}")
    groups = plan_groups(model, config)  # every check happens before the model is touched
    check_scaling_fits(config, {g.key: g.sites[0].module.weight.dtype for g in groups}.values())
    context = CallContext()
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    layers = _build_layers(groups, config, context)
    for p in model.parameters():
        p.requires_grad_(False)
    for group in groups:
        for site, layer in zip(group.sites, layers[group.key]):
            _set_submodule(model, site.name, layer)
    handles = _install_mask_hooks(model, context)
    setattr(model, _STATE_ATTR, _AdapterState(config, groups, context, requires_grad, handles))
    return model


def remove_lily(model: nn.Module) -> nn.Module:
    """Put back the original modules (the same objects, bit for bit) and ``requires_grad`` flags."""
    state = get_state(model)
    if state is None:
        raise TargetError("this model has no lily_lab Lily adapter to remove (add_lily was not called on it)")
    for name, module in list(model.named_modules()):
        if isinstance(module, LilyLayer):
            _set_submodule(model, name, module.base_layer)
    for h in state.handles:
        h.remove()
    for p in model.parameters():
        if id(p) in state.requires_grad:
            p.requires_grad_(state.requires_grad[id(p)])
    delattr(model, _STATE_ATTR)
    return model


RUNTIME_OPTIONS = RUNTIME_FIELDS  # the name this had here before config.py declared it


def set_lily_options(model: nn.Module, **options) -> nn.Module:
    """Change the runtime options of a model's lily_lab adapter in place, keeping every weight.

    ``options`` are LilyConfig fields that do not change the adapter's tensors: ``routing``,
    ``router_temperature``, ``router_top_k``, ``scaling`` and the aux-loss weights. E.g. evaluate
    a batch-routed adapter under token routing with ``set_lily_options(model, routing="token")``.
    The model's config is updated too, so ``save_adapter`` writes what the model now computes.
    Invalid values raise :class:`LilyConfigError` and leave the model as it was.
    """
    state = get_state(model)
    if state is None:
        raise TargetError("this model has no lily_lab Lily adapter (add_lily or load_adapter first); "
                          "a PEFT Lily model's options are set on its PEFT config")
    fixed = sorted(set(options) - set(RUNTIME_OPTIONS))
    if fixed:
        known = set(LilyConfig.__dataclass_fields__)
        unknown = [k for k in fixed if k not in known]
        if unknown:
            raise LilyConfigError(f"set_lily_options: unknown option(s) {unknown}; runtime options are "
                                  f"{list(RUNTIME_OPTIONS)}")
        raise LilyConfigError(f"set_lily_options: {fixed} change(s) the adapter's tensors or where it sits; "
                              f"remove_lily and add_lily with a new LilyConfig instead (runtime options: "
                              f"{list(RUNTIME_OPTIONS)})")
    config = dataclasses.replace(state.config, **options)  # validates every field first
    check_scaling_fits(config, {m.lily_A.dtype for m in model.modules() if isinstance(m, LilyLayer)})
    for module in model.modules():
        if isinstance(module, LilyLayer):
            module.apply_config(config)
    state.config = config
    return model


def check_scaling_fits(config: LilyConfig, dtypes) -> None:
    """Raise :class:`LilyConfigError` when ``config.scaling`` overflows one of the adapter ``dtypes``."""
    for dtype in dict.fromkeys(dtypes):
        problem = scaling_overflow(config.scaling, dtype)
        if problem is not None:
            raise LilyConfigError(problem)


def get_state(model: nn.Module) -> _AdapterState | None:
    return getattr(model, _STATE_ATTR, None)


# --------------------------------------------------------------------------- helpers


def _build_layers(groups: list[GroupPlan], config: LilyConfig, context: CallContext) -> dict[str, list[LilyLayer]]:
    r, E = config.r, config.num_B
    out: dict[str, list[LilyLayer]] = {}
    for g in groups:
        w = g.sites[0].module.weight
        kw = {"dtype": w.dtype, "device": w.device}
        n_A = math.ceil(len(g.sites) / config.stride_A)
        As = [nn.Parameter(_kaiming(torch.empty(r, g.d_in, **kw))) for _ in range(n_A)]
        B = nn.Parameter(torch.empty(E, r, g.d_out, **kw))
        with torch.no_grad():
            if config.init_weights:
                B.zero_()
            else:  # kaiming on the (E·r, d_out) matrix, as PEFT initialises its stacked bank
                _kaiming(B.view(E * r, g.d_out))
        out[g.key] = []
        for i, site in enumerate(g.sites):
            router = nn.Parameter(_kaiming(torch.empty(E, r, **kw)))
            out[g.key].append(
                LilyLayer(
                    site.module,
                    A=As[i // config.stride_A],
                    B=B,
                    router=router,
                    **{k: getattr(config, k) for k in LAYER_OPTIONS},  # the runtime options
                    aux_weights=tuple(getattr(config, f) for f in AUX_LOSS_FIELDS),
                    target=g.target,
                    group=g.key,
                    index=i,
                    a_index=i // config.stride_A,
                    context=context,
                )
            )
    return out


def _kaiming(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


class _MaskCapture:
    """Forward hooks of the top-level model: push its ``attention_mask`` for the layers, pop after.

    Bound methods of an object (not closures), so ``copy.deepcopy(model)`` gives the copy hooks
    that feed the copy's own context.
    """

    def __init__(self, context: CallContext, position: int | None):
        self.context, self.position = context, position

    def pre(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        self.context.push(mask if isinstance(mask, torch.Tensor) else None, past_length_of(kwargs))

    def post(self, module, args, kwargs, output):
        self.context.pop()


def kv_cache_of(kwargs: dict):
    """The KV cache object a transformers call was given (``past_key_values``, or ``cache`` as
    ``generate`` passes it): one with a ``get_seq_length`` method; ``None`` without one."""
    for key in ("past_key_values", "cache"):
        cache = kwargs.get(key)
        if callable(getattr(cache, "get_seq_length", None)):
            return cache
    return None


def past_length_of(kwargs: dict) -> int:
    """Positions already in the KV cache of a transformers call (see :func:`kv_cache_of`), before
    this call adds its own; 0 without one."""
    cache = kv_cache_of(kwargs)
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (TypeError, ValueError, RuntimeError, IndexError):
        return 0


def _install_mask_hooks(model: nn.Module, context: CallContext) -> list[Any]:
    """Capture the top-level call's ``attention_mask`` (keyword or positional) for the layers."""
    position = None
    try:
        params = list(inspect.signature(model.forward).parameters)
        if "attention_mask" in params:
            position = params.index("attention_mask")
    except (TypeError, ValueError):
        pass
    capture = _MaskCapture(context, position)
    return [
        model.register_forward_pre_hook(capture.pre, with_kwargs=True),
        model.register_forward_hook(capture.post, with_kwargs=True, always_call=True),
    ]


def _is_peft_layer(module: nn.Module) -> bool:
    return any(isinstance(getattr(module, a, None), nn.ModuleDict) for a in ("lily_A", "lora_A"))


def _linear_children(module: nn.Module) -> str:
    names = [n for n, m in module.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))]
    return ", ".join(repr(n.rsplit(".", 1)[-1]) for n in dict.fromkeys(names[:6])) or "none found"


def _no_match_message(model: nn.Module, config: LilyConfig) -> str:
    leaves = [n for n, m in model.named_modules() if n and (isinstance(m, nn.Linear) or is_conv1d(m))]
    suffixes = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in leaves))
    targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    close: list[str] = []
    for t in targets:
        close += difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=3, cutoff=0.3)
    close = list(dict.fromkeys(close)) or suffixes[:8]
    hint = ", ".join(close) if close else "none: the model has no nn.Linear or Conv1D layer"
    excluded = " (after exclude_modules)" if config.exclude_modules else ""
    return (
        f"no module matched target_modules={config.target_modules!r}{excluded}; linear layers here "
        f"that look closest: {hint}. Layer names here end in: {', '.join(suffixes[:20]) or 'nothing'}"
    )
