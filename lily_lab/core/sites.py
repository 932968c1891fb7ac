"""``adapter_sites`` and ``count_parameters``: one view of lily_lab Lily, PEFT Lily, PEFT LoRA and
PEFT X-LoRA.

PEFT models are read by duck typing (``lily_A`` / ``lora_A`` ``ModuleDict``s on a layer with a
``base_layer``; X-LoRA's classifier and layers as :mod:`lily_lab.core.xlora` finds them), so peft is
never imported here. ``lily_layers_by_group`` is the grouping of
lily_lab's own layers by bank that checkpoints and FSDP layouts are built on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .inject import get_state, match_target
from .errors import InputError
from .layer import LilyLayer, base_dims, require_module
from .routers import RouterSite, router_sites
from .xlora import XLoraSite, find_xlora


@dataclass(eq=False)
class Site:
    """One adapted linear layer.

    ``A`` (``r × d_in``), ``B`` (``E × r × d_out``; LoRA: ``E = 1``) and ``router`` (``E × r`` or
    ``None``) are the live parameters or views of them: editing them in place under
    ``torch.no_grad()`` edits the model.

    **X-LoRA** (kind ``"xlora"``): one site per X-LoRA layer, whose bank is its ``E`` LoRA experts
    ``(A_e, B_e, s_e)`` (``B_e`` as PEFT stores it, ``d_out × r_e``). Each expert has its own ``A``,
    so the site is written exactly in Lily's shape with ``A = [A_0; …; A_{E-1}]``
    (``Σ r_e × d_in``) and block-sparse experts: ``B[e]`` (``Σ r_e × d_out``) is zero but for rows
    of block ``e``, which hold ``(s_e / s) · B_eᵀ``, ``s = scaling`` (the first expert's). Then
    ``s · (Σ_e π_e B[e])ᵀ A = Σ_e π_e s_e B_e A_e``: the update the layer applies at the weights
    ``π`` (dense_delta, delta_spectra). ``router`` is ``None`` (the X-LoRA classifier routes), and
    ``A`` and ``B`` are copies built from the experts, not views: editing them changes nothing;
    ``parameters`` holds the live LoRA weights, then the classifier's (shared by every X-LoRA site;
    X-LoRA trains the classifier, its experts frozen). The group (``"<module>@<layer>:<d_out>x<d_in>"``)
    is the site's own, ``index`` and ``a_index`` 0. Plain cosines of such ``B[e]`` are 0 by
    construction: lily_lab's expert measures compare X-LoRA experts by their updates ``ΔW_e``
    (``expert_similarity``).
    """

    name: str  # path in model.named_modules() of the model passed to adapter_sites
    module: str  # the target it matched (for PEFT models: the name's last component if unknown)
    group: str  # "<target>:<d_out>x<d_in>"
    index: int  # position in the group, traversal order
    a_index: int  # which A of the group it uses
    A: torch.Tensor
    B: torch.Tensor
    router: torch.Tensor | None
    scaling: float
    kind: str  # "lily", "peft-lily", "peft-lora" or "xlora"
    layer: nn.Module = field(repr=False)  # the adapter module itself
    parameters: tuple[nn.Parameter, ...] = field(default=(), repr=False)  # the tensors it trains

    @property
    def num_B(self) -> int:
        return self.B.shape[0]

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[2]


def adapter_sites(model: nn.Module) -> list[Site]:
    """Every adapted layer of ``model`` in traversal order (lily_lab Lily, PEFT Lily, PEFT LoRA,
    PEFT X-LoRA: one site per X-LoRA layer, see :class:`Site`). A model whose X-LoRA parts do not
    fit together (a classifier without layers, say) is an :class:`~lily_lab.InputError`."""
    require_module(model, "adapter_sites")
    sites: list[Site] = []
    xlora = find_xlora(model)
    xlora_of = {id(xs.layer): xs for xs in xlora.sites} if xlora is not None else {}
    targets = _peft_targets(model)
    # Group and A-index by identity of the shared tensors, as they really are in the model.
    group_pos: dict[str, int] = {}
    a_ids: dict[str, dict[int, int]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LilyLayer):
            sites.append(
                Site(name, mod.target, mod.group, mod.index, mod.a_index, mod.lily_A, mod.lily_B,
                     mod.lily_router, mod.scaling, "lily", mod, (mod.lily_A, mod.lily_B, mod.lily_router))
            )
            continue
        if id(mod) in xlora_of:
            site = _xlora_site(xlora_of[id(mod)], xlora.classifier)
            if site is not None:
                sites.append(site)
            continue
        kind, adapter = _peft_kind(mod)
        if kind is None:
            continue
        d_in, d_out = base_dims(mod.get_base_layer())
        target = (match_target(name.removeprefix("base_model.model."), targets) if targets else None) or name.rsplit(".", 1)[-1]
        group = f"{target}:{d_out}x{d_in}"
        index = group_pos.get(group, 0)
        group_pos[group] = index + 1
        if kind == "peft-lily":
            A_w, B_w, R_w = (getattr(mod, f"lily_{p}")[adapter].weight for p in ("A", "B", "router"))
            E = R_w.shape[0]
            ids = a_ids.setdefault(group, {})
            a_index = ids.setdefault(id(A_w), len(ids))
            B = B_w.view(E, B_w.shape[0] // E, B_w.shape[1])  # PEFT stacks the bank as (E·r, d_out)
            sites.append(Site(name, target, group, index, a_index, A_w, B, R_w,
                              float(mod.scaling[adapter]), kind, mod, (A_w, B_w, R_w)))
        else:
            A_w, B_w = mod.lora_A[adapter].weight, mod.lora_B[adapter].weight  # (r, d_in), (d_out, r)
            sites.append(Site(name, target, group, index, index, A_w, B_w.t().unsqueeze(0), None,
                              float(mod.scaling[adapter]), kind, mod, (A_w, B_w)))
    return sites


def _xlora_site(xs: XLoraSite, classifier: nn.Module) -> Site | None:
    """The Site of one X-LoRA layer (see :class:`Site`); ``None`` for one that is not linear-like
    (X-LoRA's embedding and convolution layers: still recorded, without a bank)."""
    mod = xs.layer
    experts = []
    for name in xs.experts:
        a, b = getattr(mod, "lora_A", {}), getattr(mod, "lora_B", {})
        if name not in a or name not in b:
            return None
        A_w, B_w = getattr(a[name], "weight", None), getattr(b[name], "weight", None)
        if not (isinstance(A_w, torch.Tensor) and isinstance(B_w, torch.Tensor) and A_w.dim() == B_w.dim() == 2):
            return None
        experts.append((A_w, B_w, float(mod.scaling[name])))
    s = next((s_e for _, _, s_e in experts if s_e != 0), 1.0)
    d_out = experts[0][1].shape[0]
    ranks = [A_w.shape[0] for A_w, _, _ in experts]
    with torch.no_grad():
        A = torch.cat([A_w.detach() for A_w, _, _ in experts], dim=0)  # (Σ r_e, d_in)
        B = A.new_zeros(len(experts), sum(ranks), d_out)
        lo = 0
        for e, (_, B_w, s_e) in enumerate(experts):
            B[e, lo:lo + ranks[e]] = B_w.detach().t().to(B.dtype) * (s_e / s)
            lo += ranks[e]
    params = tuple(p for A_w, B_w, _ in experts for p in (A_w, B_w)) + tuple(classifier.parameters())
    return Site(xs.name, xs.module, xs.group, xs.index, 0, A, B, None, s, "xlora", mod, params)


def sites_or_routers(model: nn.Module, fn: str) -> tuple[list[Site], list[RouterSite]]:
    """What a view of ``model`` can show: its adapter sites and, when it has none, the top-k
    routers of its mixture-of-experts layers (``[]`` when it has adapter sites). Raises
    :class:`~lily_lab.InputError` naming ``fn`` when the model has neither."""
    sites = adapter_sites(model)
    routers = [] if sites else router_sites(model)
    if not sites and not routers:
        raise InputError(f"{fn} needs a model with a Lily (or LoRA) adapter or the top-k routers of a "
                         "mixture-of-experts model; this one has no adapter sites and no router")
    return sites, routers


def lily_layers_by_group(model: nn.Module) -> dict[str, list[tuple[str, LilyLayer]]]:
    """lily_lab's own Lily layers of ``model``, grouped by the bank ``B`` they share.

    ``{group key: [(name, layer), …]}``. A group key (``"<target>:<d_out>x<d_in>"``, the layers'
    ``group``) names one bank; its sites' ``A_j`` are shared within the group too (``a_index``).
    Groups come in the order their first site appears in ``model.named_modules()``, and each
    group's sites in that traversal order; names are as ``named_modules()`` gives them (with the
    wrapper components FSDP1 inserts, on a wrapped model). PEFT layers are left out (see
    :func:`adapter_sites` for every kind); a model without lily_lab Lily layers gives ``{}``.

    Saved checkpoints (``g<k>.…`` tensor keys, the JSON's ``groups``) and FSDP units follow this
    order, so it must not change.
    """
    layers: dict[str, list[tuple[str, LilyLayer]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LilyLayer):
            layers.setdefault(mod.group, []).append((name, mod))
    return layers


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``trainable``, ``total`` and ``adapter`` parameter counts, each shared tensor counted once."""
    require_module(model, "count_parameters")
    params = {id(p): p for p in model.parameters()}
    adapter = {id(p): p for s in adapter_sites(model) for p in s.parameters}
    return {
        "trainable": sum(p.numel() for p in params.values() if p.requires_grad),
        "total": sum(p.numel() for p in params.values()),
        "adapter": sum(p.numel() for p in adapter.values()),
    }


def lily_parameter_formula(L: int, d_in: int, d_out: int, r: int, stride_A: int, num_B: int) -> int:
    """Trainable parameters of one group (docs/lily.md): ``⌈L/stride_A⌉·r·d_in + E·r·d_out + L·r·E``."""
    return math.ceil(L / stride_A) * r * d_in + num_B * r * d_out + L * r * num_B


def adapter_summary(model: nn.Module) -> str:
    """A readable layout of the adapter: groups, shared ``A``s, banks, routers and counts."""
    require_module(model, "adapter_summary")
    sites = adapter_sites(model)
    if not sites:
        return "no adapter sites in this model"
    lines = []
    state = get_state(model)
    if state is not None:
        c = state.config
        lines.append(f"Lily adapter  r={c.r}  stride_A={c.stride_A}  num_B={c.num_B}  "
                     f"routing={c.routing!r}  scaling={c.scaling}")
    by_group: dict[str, list[Site]] = {}
    for s in sites:
        by_group.setdefault(s.group, []).append(s)
    for group, members in by_group.items():
        s0 = members[0]
        n_A = len({id(p) for s in members for p in s.parameters[:1]})
        # An X-LoRA bank's own parameters are its experts' (the classifier is every bank's router).
        own = (lambda s: s.parameters[:2 * s.num_B]) if s0.kind == "xlora" else (lambda s: s.parameters)
        n_params = sum({id(p): p.numel() for s in members for p in own(s)}.values())
        routers = ("routed by the X-LoRA classifier" if s0.kind == "xlora" else "no routers" if s0.router is None
                   else f"{len(members)} routers of {s0.num_B}×{s0.r}")
        lines.append(
            f"group {group}: {len(members)} sites ({s0.kind}), {n_A} A of {s0.r}×{s0.d_in}, "
            f"bank of {s0.num_B} B of {s0.r}×{s0.d_out}, {routers} — {n_params:,} parameters"
        )
        for s in members:
            lines.append(f"    [{s.index:>2}] {s.name}  A{s.a_index}")
    counts = count_parameters(model)
    lines.append(
        f"adapter parameters: {counts['adapter']:,}   trainable: {counts['trainable']:,}   "
        f"total: {counts['total']:,}   ({100 * counts['trainable'] / max(counts['total'], 1):.3f}% trainable)"
    )
    return "\n".join(lines)


def _peft_kind(mod: nn.Module) -> tuple[str | None, str | None]:
    for attr, kind in (("lily_A", "peft-lily"), ("lora_A", "peft-lora")):
        dct = getattr(mod, attr, None)
        if isinstance(dct, nn.ModuleDict) and hasattr(mod, "get_base_layer"):
            active = getattr(mod, "active_adapters", None) or list(dct.keys())
            if isinstance(active, str):
                active = [active]
            for name in active:
                if name in dct:
                    return kind, name
    return None, None


def _peft_targets(model: nn.Module) -> list[str] | str | None:
    """The target_modules of a PEFT model's active adapter config, when the model carries one."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    name = getattr(model, "active_adapter", None)
    cfg = configs.get(name) if isinstance(name, str) else None
    cfg = cfg or next(iter(configs.values()))
    targets = getattr(cfg, "target_modules", None)
    if isinstance(targets, set):
        targets = sorted(targets)
    return targets
