"""FSDP wrapping that keeps Lily's shared tensors whole.

FSDP shards parameters *by unit*: a unit's parameters are gathered when the unit runs and freed
after. Lily shares one bank ``B`` among every site of a group and each ``A_j`` among ``stride_A``
consecutive sites, usually in different transformer layers. A unit that holds some of a bank's
sites but not all splits it: FSDP2 refuses at the first forward ("shared with a parameter already
managed by another FSDP group"), FSDP1 fails with a size mismatch on a freed shard. Measured here
(torch 2.13, 2 CPU processes, gloo): per-layer units with the Lily parameters left to the root
through ``ignored_params`` train *silently wrong* (weights off by more than a step's update), so
that layout is not offered.

What works, checked against a single-process run to 1e-5:

- FSDP2 (``fully_shard``): :func:`lily_fully_shard` shards the sites of each group together as one
  unit (``fully_shard([site, site, …])``), then each transformer layer, then the root. Layers
  keep their own units; only a group's sites (their frozen ``W`` and the adapter) share one.
- FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True`` because a unit mixes frozen and
  trainable tensors): :func:`lily_auto_wrap_policy` wraps each group at the smallest called module
  holding all its sites (``bert.encoder`` in BERT); layers holding sites cannot be units of their
  own there, since FSDP1 cannot put modules side by side in one unit.

:func:`check_fsdp_units` (a plan) and :func:`check_fsdp_wrapping` (a wrapped model) raise
:class:`FSDPSplitError` naming the bank a layout would split. Tested in tests/test_distributed.py.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from torch import nn

from .errors import FSDPLayoutError, FSDPSplitError
from .layer import LilyLayer
from .sites import lily_layers_by_group


def lily_fsdp_units(model: nn.Module, layer_cls=None) -> list[list[str]]:
    """The FSDP2 units that keep every shared tensor whole, innermost first: apply ``fully_shard``
    to each list (one call per list), then to the root.

    First one unit per group: all its sites (``B`` and every ``A_j`` inside). Then every instance
    of ``layer_cls`` — a class, a tuple of classes or class names; by default the model's
    ``_no_split_modules`` (transformers' own choice of layer: ``BertLayer``, ``LlamaDecoderLayer``…).
    Their sites already belong to a group unit, so the layers never split a bank.
    """
    units = list(_groups(model).values())
    units += [[name] for name in _layer_names(model, layer_cls)]
    return units


def lily_fully_shard(model: nn.Module, *, mesh=None, layer_cls=None, **kwargs) -> nn.Module:
    """Shard ``model`` with FSDP2 along :func:`lily_fsdp_units`, then the root; returns ``model``.

    ``mesh`` and ``kwargs`` (``reshard_after_forward``, ``mp_policy``…) go to every
    ``fully_shard`` call. Build the optimizer afterwards: sharding replaces the parameters.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps FSDP2 under _composable
        from torch.distributed._composable.fsdp import fully_shard
    units = lily_fsdp_units(model, layer_cls)
    check_fsdp_units(model, units)
    for unit in units:
        modules = [model.get_submodule(n) for n in unit]
        fully_shard(modules if len(modules) > 1 else modules[0], mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def lily_auto_wrap_policy(model: nn.Module, layer_cls=None):
    """An ``auto_wrap_policy`` for FSDP1 ``FullyShardedDataParallel`` (use ``use_orig_params=True``).

    Wraps each group at the smallest module that holds all its sites and is called in forward (a
    ``ModuleList`` is never called: its parent is taken), and each ``layer_cls`` instance (default:
    ``_no_split_modules``) that holds no site or whole groups only. Raises
    :class:`FSDPSplitError` when those units would still split a bank.
    """
    from torch.distributed.fsdp.wrap import CustomPolicy

    planned: dict[int, str] = {}
    groups = _groups(model)
    for members in groups.values():
        lca = _called_ancestor(model, _common_prefix(members))
        if lca:  # "" is the root, which FSDP wraps anyway
            planned[id(model.get_submodule(lca))] = lca
    site_names = [n for n, _ in _sites(model)]
    for name in _layer_names(model, layer_cls):
        inside = [s for s in site_names if _within(s, name)]
        whole = all(set(groups[g]) <= set(inside) or not set(groups[g]) & set(inside) for g in groups)
        if whole:
            planned[id(model.get_submodule(name))] = name
    check_fsdp_units(model, [[n] for n in planned.values()])
    wrap = set(planned)
    return CustomPolicy(lambda module: id(module) in wrap)


def check_fsdp_units(model: nn.Module, units: Iterable) -> None:
    """Raise :class:`FSDPSplitError` if wrapping ``units`` (in any order, then the root) would put
    the sites of one shared ``A`` or ``B`` in different units.

    ``units``: module names or modules, or lists of them (one FSDP2 ``fully_shard`` call each).
    """
    names = {id(m): n for n, m in model.named_modules()}
    plan = []
    for unit in units:
        members = unit if isinstance(unit, (list, tuple)) else [unit]
        resolved = []
        for m in members:
            if isinstance(m, str):
                try:
                    resolved.append(model.get_submodule(m))
                except AttributeError:
                    raise FSDPLayoutError(f"no module named {m!r} in this model") from None
            else:
                resolved.append(m)
        label = " + ".join(names.get(id(m), type(m).__name__) or "<root>" for m in resolved)
        plan.append((label, resolved))
    _check(model, plan)


def check_fsdp_wrapping(model: nn.Module) -> None:
    """Raise :class:`FSDPSplitError` if an FSDP-wrapped model (FSDP1 or FSDP2) already splits a
    shared ``A`` or ``B`` across units — a clear error before the first forward fails obscurely."""
    units: dict[int, tuple[str, list[nn.Module]]] = {}
    for name, m in model.named_modules():
        key = _unit_key(m)
        if key is not None:
            label, members = units.setdefault(key, (_clean(name) or "<root>", []))
            members.append(m)
    _check(model, list(units.values()))


# --------------------------------------------------------------------------- helpers


def _sites(model: nn.Module) -> list[tuple[str, LilyLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LilyLayer)]


def _groups(model: nn.Module) -> dict[str, list[str]]:
    """Group → its sites' names, in traversal order (:func:`~lily_lab.core.sites.lily_layers_by_group`)."""
    groups = {key: [name for name, _ in members] for key, members in lily_layers_by_group(model).items()}
    if not groups:
        raise FSDPLayoutError("this model has no lily_lab Lily sites: call lily_lab.add_lily(model, config) first")
    return groups


def _shared_keys(layer: LilyLayer) -> list[tuple[str, str]]:
    """What a site shares with others: its group's bank and its ``A_j``."""
    return [(f"bank B of group {layer.group!r}", layer.group),
            (f"A_{layer.a_index} of group {layer.group!r}", f"{layer.group}/A{layer.a_index}")]


def _unit_key(module: nn.Module):
    """Identity of the FSDP unit ``module`` roots, or ``None`` (FSDP1 wrapper or FSDP2 module)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    if isinstance(module, FullyShardedDataParallel):
        return id(module)
    if isinstance(module, FSDPModule):
        return id(module._get_fsdp_state())  # one state for all modules of a fully_shard([...]) call
    return None


def _check(model: nn.Module, plan: Sequence[tuple[str, list[nn.Module]]]) -> None:
    # Each site belongs to the unit whose member is its nearest ancestor (FSDP claims parameters
    # innermost first); sites under no unit belong to the root.
    owner: dict[int, tuple[int, str]] = {}  # id(module) -> (depth of the claiming member, unit label)
    for label, members in plan:
        for member in members:
            for name, m in member.named_modules():
                depth = name.count(".") + (1 if name else 0)
                if id(m) not in owner or depth < owner[id(m)][0]:
                    owner[id(m)] = (depth, label)
    spans: dict[str, tuple[str, dict[str, list[str]]]] = {}
    for name, layer in _sites(model):
        unit = owner.get(id(layer), (0, "<root>"))[1]
        for text, key in _shared_keys(layer):
            spans.setdefault(key, (text, {}))[1].setdefault(unit, []).append(name)
    for text, by_unit in spans.values():
        if len(by_unit) > 1:
            detail = "; ".join(f"unit {u!r} holds {', '.join(map(_clean, s))}" for u, s in by_unit.items())
            sites = [s for ss in by_unit.values() for s in ss]
            common = _clean(_called_ancestor(model, _common_prefix(sites))) or "<root>"
            raise FSDPSplitError(
                f"this FSDP layout splits the {text} across {len(by_unit)} units ({detail}); every "
                f"site of a shared tensor must be in one unit. Use lily_lab.core.fsdp.lily_fully_shard "
                f"(FSDP2) or lily_auto_wrap_policy (FSDP1), or wrap a module that holds them all "
                f"({common!r}), or list the sites in one fully_shard([...]) call"
            )


def _layer_names(model: nn.Module, layer_cls) -> list[str]:
    """Names of the ``layer_cls`` instances (default ``_no_split_modules``), innermost first."""
    given = layer_cls is not None
    if not given:
        layer_cls = tuple(getattr(model, "_no_split_modules", None) or ())
    elif not isinstance(layer_cls, (tuple, list, set, frozenset)):
        layer_cls = (layer_cls,)
    bad = [c for c in layer_cls if not isinstance(c, (str, type))]
    if bad:
        raise FSDPLayoutError(f"layer_cls takes module classes or class names, got {bad[0]!r}")
    found = [n for n, m in model.named_modules()
             if n and not isinstance(m, LilyLayer)
             and any(type(m).__name__ == c if isinstance(c, str) else isinstance(m, c) for c in layer_cls)]
    if given and layer_cls and not found:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules()} - {"LilyLayer"})
        raise FSDPLayoutError(f"layer_cls {layer_cls!r} matched no module; module classes here: {', '.join(kinds[:12])}")
    return sorted(found, key=lambda n: -n.count("."))  # innermost first: FSDP wraps bottom-up


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _called_ancestor(model: nn.Module, name: str) -> str:
    """``name`` or its nearest ancestor that forward calls (containers are iterated, not called)."""
    while name and isinstance(model.get_submodule(name), (nn.ModuleList, nn.ModuleDict)):
        name = name.rpartition(".")[0]
    return name


def _clean(name: str) -> str:
    """A module path without the wrappers FSDP1 inserts."""
    return name.replace("_fsdp_wrapped_module.", "").replace("._fsdp_wrapped_module", "")


def _within(name: str, ancestor: str) -> bool:
    return name == ancestor or name.startswith(ancestor + ".")
