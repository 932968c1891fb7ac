"""PEFT's X-LoRA read like a Lily adapter: its classifier as the routers, its LoRAs as the experts.

An X-LoRA model (peft's ``XLoraModel``) holds ``E`` LoRA adapters (named ``"0"…"E-1"``) on the
same layers, and a classifier that, once per forward, reads the base model's last hidden state
and gives every token a weight per adapter at every adapted layer: its *scalings*, shaped
``(batch, positions, n_layers, E)`` (after a temperature-scaled softmax by default). lily_lab reads
each adapted layer as one routed site (kind ``"xlora"``, token routing) whose bank is its ``E``
LoRA experts, and the scalings at that layer as the site's router distribution.

Found by structure, never by class name (peft is not imported here):

- the classifier: a module with ``make_dummy_scalings``, ``log_scalings``, ``n_layers``,
  ``n_classes`` and ``layers`` (its ``nn.Sequential``; the last module gives the raw logits);
- an X-LoRA layer: a LoRA layer whose ``forward`` is an instance attribute bound to an object
  with ``layer_number`` (its index on the scalings' ``n_layers`` axis) and
  ``get_maybe_topk_scalings`` (how it turns the scalings into the weights it applies). Its
  experts are the LoRA layer's ``active_adapters`` in order: column ``e`` of the scalings weights
  adapter ``active_adapters[e]``.

torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InputError
from .layer import base_dims
from .names import layer_of
from .routers import _below_layer

CLASSIFIER_ATTRS = ("make_dummy_scalings", "log_scalings", "n_layers", "n_classes", "layers")


@dataclass(eq=False)
class XLoraSite:
    """One X-LoRA layer: the LoRA layer at ``name`` (its path in ``model.named_modules()``).

    ``module`` is the path below its layer number (``self_attn.q_proj``); ``group``
    ``"<module>@<layer>:<d_out>x<d_in>"``, its own (each X-LoRA layer has its own experts, so each
    is a bank of its own); ``layer_number`` its index on the scalings' ``n_layers`` axis;
    ``experts`` the adapter names of the scalings' last axis, in order.
    """

    name: str
    module: str
    group: str
    index: int
    layer_number: int
    experts: tuple[str, ...]
    kind: str  # "xlora"
    routing: str  # "token"
    layer: nn.Module = field(repr=False)  # the LoRA layer
    xlora_layer: object = field(repr=False)  # peft's X-LoRA layer object (not a module)

    @property
    def num_B(self) -> int:
        return len(self.experts)


@dataclass(eq=False)
class XLora:
    """The classifier of an X-LoRA model (at ``classifier_name``) and its layers, by ``layer_number``."""

    classifier_name: str
    classifier: nn.Module = field(repr=False)
    sites: list[XLoraSite]

    @property
    def n_layers(self) -> int:
        return int(self.classifier.n_layers)

    @property
    def n_experts(self) -> int:
        return int(self.classifier.n_classes)

    @property
    def logits_module(self) -> nn.Module | None:
        """The classifier's last module, whose output is the raw logits (``None`` when it has none)."""
        layers = self.classifier.layers
        if isinstance(layers, (nn.Sequential, nn.ModuleList)) and len(layers):
            return layers[-1]
        return layers if isinstance(layers, nn.Module) and not len(list(layers.children())) else None


def is_xlora_classifier(module) -> bool:
    """Whether ``module`` is an X-LoRA classifier (``CLASSIFIER_ATTRS``)."""
    return isinstance(module, nn.Module) and all(hasattr(module, a) for a in CLASSIFIER_ATTRS)


def xlora_layer_of(module):
    """The X-LoRA layer object whose bound ``forward`` replaced ``module``'s, or ``None``."""
    forward = getattr(module, "__dict__", {}).get("forward")
    owner = getattr(forward, "__self__", None)
    if owner is None or isinstance(owner, nn.Module):
        return None
    if hasattr(owner, "layer_number") and callable(getattr(owner, "get_maybe_topk_scalings", None)):
        return owner
    return None


def find_xlora(model: nn.Module) -> XLora | None:
    """The X-LoRA classifier and layers of ``model``; ``None`` for a model without either.

    Raises :class:`~lily_lab.InputError` for a model lily_lab cannot read as X-LoRA: a classifier
    without X-LoRA layers (or layers without a classifier), several classifiers, layer numbers that
    are not ``0 … n_layers-1`` each once, or a layer whose experts are not the classifier's
    ``n_classes``."""
    classifiers, found = [], []
    for name, mod in model.named_modules():
        if is_xlora_classifier(mod):
            classifiers.append((name, mod))
        owner = xlora_layer_of(mod)
        if owner is not None:
            found.append((name, mod, owner))
    if not classifiers and not found:
        return None
    if not classifiers:
        raise InputError(f"{len(found)} X-LoRA layers ({found[0][0]!r}, …) but no X-LoRA classifier (a module with "
                         f"{', '.join(CLASSIFIER_ATTRS)}): lily_lab reads the scalings from the classifier")
    if len(classifiers) > 1:
        raise InputError(f"several X-LoRA classifiers ({', '.join(repr(n) for n, _ in classifiers)}); lily_lab reads "
                         "models with one")
    clf_name, clf = classifiers[0]
    n_layers, n_classes = clf.n_layers, clf.n_classes
    if not found:
        raise InputError(f"the X-LoRA classifier {clf_name!r} has no X-LoRA layers to route: no LoRA layer's forward "
                         "is an X-LoRA layer's (with layer_number and get_maybe_topk_scalings); was the model built "
                         "with peft's get_peft_model(model, XLoraConfig(...))?")
    numbers = sorted(int(owner.layer_number) for _, _, owner in found)
    if numbers != list(range(n_layers)):
        raise InputError(f"the X-LoRA classifier {clf_name!r} gives scalings for n_layers = {n_layers} layers, but the "
                         f"X-LoRA layers have layer numbers {numbers[:8]}{' …' if len(numbers) > 8 else ''}: expected "
                         f"0 … {n_layers - 1}, each once")
    sites, used = [], set()
    for name, mod, owner in sorted(found, key=lambda f: int(f[2].layer_number)):
        active = getattr(mod, "active_adapters", None)
        experts = tuple([active] if isinstance(active, str) else list(active or ()))
        if len(experts) != n_classes:
            raise InputError(f"the X-LoRA layer {name!r} has {len(experts)} active adapters {list(experts)}, but the "
                             f"classifier {clf_name!r} weights n_classes = {n_classes} experts")
        module = _below_layer(name)
        d_in, d_out = _dims(mod)
        layer = layer_of(name, int(owner.layer_number))
        group = f"{module}@{layer}:{d_out}x{d_in}"
        if group in used:  # two layers of one module and layer number: told apart by X-LoRA's number
            group = f"{module}@{layer}#{int(owner.layer_number)}:{d_out}x{d_in}"
        used.add(group)
        sites.append(XLoraSite(name, module, group, 0, int(owner.layer_number), experts, "xlora", "token", mod, owner))
    return XLora(clf_name, clf, sites)


def xlora_routing(xlora: XLora, scalings: torch.Tensor, logits: torch.Tensor | None = None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each X-LoRA site's routing in one classifier call: ``{site name: (logits, probs, mixture)}``,
    each ``(batch, positions, E)``, detached, float32.

    ``scalings`` is what the classifier returned (``(b, t, n_layers, E)``); ``logits`` the raw
    output of its last module (``(b, t, n_layers·E)``, or ``(b, t, E)`` without layerwise
    scalings), when captured.

    - ``probs``: the scalings at the site's layer, as X-LoRA logs them (``get_scalings_log``):
      already a softmax (at the classifier's temperature) by default. With
      ``enable_softmax=False`` X-LoRA's scalings are raw logits, and ``probs`` is their softmax
      (no temperature), so that it is a distribution.
    - ``logits``: the raw classifier logits at the layer, before the temperature (as a Lily
      router's); when not captured, ``T · log probs`` (the same up to a constant per token).
    - ``mixture``: the weights the layer applies to its experts: the layer's own top-k of the
      scalings (``top_k_lora``, not renormalised) and softmax over the kept ones
      (``enable_softmax_topk``) where configured, times ``global_scaling_weight``; else the
      scalings themselves.
    """
    L, E = xlora.n_layers, xlora.n_experts
    if not isinstance(scalings, torch.Tensor) or scalings.dim() != 4 or tuple(scalings.shape[2:]) != (L, E):
        shape = tuple(scalings.shape) if isinstance(scalings, torch.Tensor) else type(scalings).__name__
        raise InputError(f"the X-LoRA classifier {xlora.classifier_name!r} returned scalings {shape}; expected "
                         f"(batch, positions, {L}, {E}) for n_layers = {L} and n_classes = {E}")
    config = getattr(xlora.classifier, "config", None)
    softmax = bool(getattr(config, "enable_softmax", True))
    weight = float(getattr(config, "global_scaling_weight", 1.0))
    softmax_module = getattr(xlora.classifier, "softmax", None)
    T = float(getattr(softmax_module, "temperature", getattr(config, "softmax_temperature", 1.0)) or 1.0)
    b, t = scalings.shape[:2]
    out = {}
    with torch.no_grad():
        S = scalings.detach()
        raw = None
        if logits is not None and logits.numel() in (b * t * L * E, b * t * E):
            raw = logits.detach().reshape(b, t, -1, E).float()
            if raw.shape[2] == 1:  # not layerwise: the same logits at every layer
                raw = raw.expand(b, t, L, E)
        S32 = S.float()
        P = S32 if softmax else torch.softmax(S32, dim=-1)
        for site in xlora.sites:
            j = site.layer_number
            probs = P[:, :, j]
            if raw is not None:
                lg = raw[:, :, j]
            elif softmax:
                lg = T * torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny))
            else:
                lg = S32[:, :, j]
            mixture = site.xlora_layer.get_maybe_topk_scalings(S).float()
            if weight != 1.0:
                mixture = mixture * weight
            out[site.name] = (lg.contiguous(), probs.contiguous(), mixture.contiguous())
    return out


def _dims(mod: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of the layer X-LoRA adapts (0, 0 when it is not a linear-like one)."""
    base = mod.get_base_layer() if callable(getattr(mod, "get_base_layer", None)) else mod
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    w = getattr(base, "weight", None)
    if isinstance(base, nn.Linear) or (isinstance(w, torch.Tensor) and w.dim() == 2):
        return base_dims(base)
    return 0, 0
