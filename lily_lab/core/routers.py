"""``router_sites``: the routers of mixture-of-experts models, found by what they are.

A mixture-of-experts LLM (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V3, GPT-OSS in transformers) routes
each token of each MoE layer to ``top_k`` of its ``E`` experts. lily_lab reads those routers the
way it reads Lily's (docs/beyond_lily.md): per token, the router's distribution over all ``E``
experts before top-k (``p``), its logits (for the z-loss), the experts chosen and the weights the
layer applied to them.

A router is found by its structure, not its class name: a module with an integer ``top_k`` and
``num_experts`` (``E ≥ 2``) and a 2-D ``weight`` parameter of ``E`` rows (``E × hidden``). Called on
the layer's tokens it returns ``(logits, weights, indices)`` — logits ``N × E``, the applied weights
and chosen experts ``N × top_k`` — which is every top-k router of transformers' MoE models. How
``p`` is read from the logits depends on the scoring:

- ``"softmax"``: ``p = softmax(logits)`` (Mixtral, Qwen2-MoE, OLMoE; GPT-OSS, whose layer applies
  a softmax over the chosen logits only, but picks the same experts: the top-k of the logits).
- ``"sigmoid"``: ``s = σ(logits)``, ``p = s / Σ s`` (DeepSeek-V3: a router with an
  ``e_score_correction_bias``, which chooses experts by ``s + bias`` within the best groups and
  weights them by ``s``; the bias steers the choice, ``p`` is the scores themselves).

torch only: transformers is never imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .layer import require_module
from .names import layer_of

SCORINGS = ("softmax", "sigmoid")


@dataclass(eq=False)
class RouterSite:
    """One router of a mixture-of-experts layer.

    ``name`` is its path in ``model.named_modules()``; ``module`` the path below its layer
    number (``mlp.gate``), shared by the routers of every layer; ``group`` ``"<module>:E<E>"``;
    ``index`` its position among the routers of that module, in traversal order.
    """

    name: str
    module: str
    group: str
    index: int
    num_experts: int
    top_k: int
    scoring: str  # "softmax" or "sigmoid" (see the module docstring)
    kind: str  # "moe"
    layer: nn.Module = field(repr=False)  # the router module

    @property
    def num_B(self) -> int:  # the experts, under the name lily_lab's recordings give them
        return self.num_experts


def is_topk_router(module: nn.Module) -> bool:
    """Whether ``module`` is a top-k router: integer ``top_k`` and ``num_experts`` (≥ 2), and a
    2-D ``weight`` parameter with one row per expert."""
    top_k, E = getattr(module, "top_k", None), getattr(module, "num_experts", None)
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    return (_is_int(top_k) and _is_int(E) and E >= 2 and 1 <= top_k <= E
            and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == E)


def router_sites(model: nn.Module) -> list[RouterSite]:
    """Every top-k router of ``model`` (:func:`is_topk_router`), in traversal order. A model
    without any gives ``[]``."""
    require_module(model, "router_sites")
    sites: list[RouterSite] = []
    position: dict[str, int] = {}
    for name, mod in model.named_modules():
        if not is_topk_router(mod):
            continue
        module = _below_layer(name)
        E = int(mod.num_experts)
        group = f"{module}:E{E}"
        index = position.get(group, 0)
        position[group] = index + 1
        scoring = "sigmoid" if isinstance(getattr(mod, "e_score_correction_bias", None), torch.Tensor) else "softmax"
        sites.append(RouterSite(name, module, group, index, E, int(mod.top_k), scoring, "moe", mod))
    return sites


def router_output(site: RouterSite, output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What ``site``'s router routed in one call, from what its forward returned.

    Returns ``(logits, probs, mixture, chosen)``, detached, float32: ``logits`` and ``probs``
    ``N × E`` (``probs`` by the site's scoring), ``mixture`` ``N × E`` the weights the layer applied
    (zero for the experts not chosen), ``chosen`` ``N × top_k`` the chosen experts (int64).
    Raises :class:`~lily_lab.InputError` when the output is not ``(logits, weights, indices)`` of
    those shapes."""
    E, k = site.num_experts, site.top_k
    if not (isinstance(output, (tuple, list)) and len(output) >= 3
            and all(isinstance(t, torch.Tensor) for t in output[:3])):
        raise InputError(f"the router {site.name!r} ({type(site.layer).__name__}) returned "
                         f"{type(output).__name__}, not (logits, weights, indices): lily_lab reads top-k routers "
                         "that return those three tensors (transformers' MoE routers do)")
    logits, weights, indices = output[:3]
    N = logits.numel() // E if logits.numel() % E == 0 else -1
    if (logits.shape[-1] != E or N < 0 or weights.shape[-1] != k or indices.shape[-1] != k
            or weights.numel() != N * k or indices.numel() != N * k or indices.is_floating_point()):
        raise InputError(f"the router {site.name!r} returned logits {tuple(logits.shape)}, weights "
                         f"{tuple(weights.shape)} and indices {tuple(indices.shape)}; expected (N, {E}), (N, {k}) "
                         f"and integer (N, {k}) for {E} experts and top_k = {k}")
    with torch.no_grad():
        logits = logits.detach().reshape(N, E).float()
        chosen = indices.detach().reshape(N, k).long()
        if site.scoring == "sigmoid":
            scores = torch.sigmoid(logits)
            probs = scores / scores.sum(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits, dim=-1)
        mixture = torch.zeros_like(probs).scatter_(1, chosen, weights.detach().reshape(N, k).float())
    return logits, probs, mixture, chosen


def _below_layer(name: str) -> str:
    """``model.layers.3.mlp.gate`` → ``mlp.gate``: the path past the layer number (the last
    component when there is none)."""
    parts = name.split(".")
    if layer_of(name) is not None:
        for i, part in enumerate(parts):
            if part.isdigit():
                return ".".join(parts[i + 1:]) or name
    return parts[-1]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
