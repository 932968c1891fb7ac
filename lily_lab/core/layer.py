"""The Lily layer: a frozen linear layer plus a routed low-rank update.

For one site with base weight ``W`` (``d_out × d_in``), shared projector ``A`` (``r × d_in``), the
group's bank ``B`` (``E × r × d_out``) and the site's own router ``R`` (``E × r``)::

    h  = x Aᵀ                      # (…, r)
    p  = softmax(h Rᵀ / τ)         # (…, E)   one distribution per token
    Δy = s · h · Σ_e π_e B_e       # π: the mixture, from p by the routing mode
    y  = x Wᵀ + b + Δy

``A`` and ``B`` are ``nn.Parameter`` objects shared *by identity* between sites (see
``inject.py``); the router is the site's own.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle


def require_module(model: Any, fn: str, arg: str = "model") -> None:
    """Raise :class:`~lily_lab.LilyLabTypeError` naming ``fn`` and ``arg`` unless ``model`` is a
    ``torch.nn.Module``."""
    if not isinstance(model, nn.Module):
        from .errors import LilyLabTypeError

        hint = (" (a path: load the model first, then lily_lab.load_adapter(model, path))"
                if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") else "")
        raise LilyLabTypeError(f"{fn}: {arg} must be a torch.nn.Module (a transformers model, say), got "
                               f"{type(model).__name__}{hint}")


def base_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight ``d_in × d_out``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores its weight transposed
    return int(d_in), int(d_out)


def scaling_overflow(scaling: float, dtype: torch.dtype) -> str | None:
    """Why ``scaling`` cannot be applied in an adapter of ``dtype`` (it overflows there), or None."""
    if not dtype.is_floating_point:
        return None
    big = torch.finfo(dtype).max
    if abs(scaling) <= big:
        return None
    return (f"scaling={scaling!r} overflows the adapter's dtype {dtype} (largest value {big:.4g}): use "
            f"|scaling| ≤ {big:.4g} (Lily's scaling is usually 0.1 … 10), or keep the adapter in float32")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (``y = x W + b``, ``W`` is ``d_in × d_out``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class CallContext:
    """What the top-level model was called with, for layers that need it (the attention mask).

    A stack, so a model called from inside another call (rare, but legal) sees its own mask. The
    last call's mask also stays available *during backward*: gradient checkpointing recomputes a
    layer's forward there, after the top-level forward has returned, and the recomputation must
    route exactly as the forward did.
    """

    def __init__(self) -> None:
        self._masks: list[torch.Tensor | None] = []
        self._past: list[int] = []
        self._last: torch.Tensor | None = None

    def push(self, mask: torch.Tensor | None, past: int = 0) -> None:
        self._masks.append(mask)
        self._past.append(past)

    def pop(self) -> None:
        if self._masks:
            self._last = self._masks.pop()
            self._past.pop()

    @property
    def past_length(self) -> int:
        """Positions already in the KV cache the call was given (0: no cache, or an empty one)."""
        return self._past[-1] if self._past else 0

    @property
    def attention_mask(self) -> torch.Tensor | None:
        if self._masks:
            return self._masks[-1]
        if self._last is not None and in_backward():
            return self._last
        return None


def in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointing recomputes forwards)."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class RoutingEvent:
    """What one forward call of one site routed; handed to routing observers.

    ``logits`` and ``probs`` are per token (shape ``(…, E)``, before the temperature for
    ``logits``; after temperature and top-k for ``probs``). ``mixture`` is what was applied:
    ``(E,)`` for batch routing, ``(batch, E)`` for sequence routing, ``(…, E)`` for token routing.
    ``token_mask`` is ``x.shape[:-1]`` booleans (``True`` = real token) when the model's
    ``attention_mask`` applied to this input, else ``None``.
    """

    layer: "LilyLayer"
    logits: torch.Tensor
    probs: torch.Tensor
    mixture: torch.Tensor
    token_mask: torch.Tensor | None


class LilyLayer(nn.Module):
    """A Lily site: wraps an ``nn.Linear`` or ``Conv1D`` (kept as ``base_layer``, untouched)."""

    # lily_A and lily_B are shared by identity between sites. transformers' save_pretrained (what
    # a Trainer's checkpoints call) refuses tensors shared under several names unless a module
    # declares them as tied weights; declared, it keeps one name of each and drops the others.
    # Loading the checkpoint back into a model with these layers fills every site from that one
    # name, since the sites hold one Parameter (tests/test_monitor.py checks both ways).
    _tied_weights_keys = {"lily_A": "lily_A", "lily_B": "lily_B"}

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        A: nn.Parameter,
        B: nn.Parameter,
        router: nn.Parameter,
        scaling: float,
        routing: str,
        router_temperature: float = 1.0,
        router_top_k: int | None = None,
        aux_weights: tuple[float, float, float] = (0.0, 0.0, 0.0),
        target: str = "",
        group: str = "",
        index: int = 0,
        a_index: int = 0,
        context: CallContext | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lily_A = A  # (r, d_in)       shared by stride_A consecutive sites
        self.lily_B = B  # (E, r, d_out)   shared by the whole group
        self.lily_router = router  # (E, r)  this site's own
        self.scaling = scaling
        self.routing = routing
        self.router_temperature = router_temperature
        self.router_top_k = router_top_k
        self.aux_weights = aux_weights  # (balance, z-loss, entropy), see LilyConfig
        self.aux_loss: torch.Tensor | None = None  # gathered and reset by lily_aux_loss(model)
        self.target, self.group, self.index, self.a_index = target, group, index, a_index
        self._context = context
        self._observers: OrderedDict[int, Callable[[RoutingEvent], None]] = OrderedDict()
        # Causal routing: (Σ p, count, positions) of each sequence after the last call, carried
        # into the next call of a cached generation (see _causal_mask).
        self._causal_state: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._scaling_fits: tuple[float, torch.dtype] | None = None  # (scaling, dtype) last checked
        self.d_in, self.d_out = base_dims(base_layer)

    def options(self) -> dict:
        """The runtime options a config sets (not weights), as attributes: ``config.LAYER_OPTIONS``
        and ``aux_weights`` (the ``AUX_LOSS_FIELDS`` as a tuple). See :meth:`apply_config`."""
        from .config import LAYER_OPTIONS

        return {**{k: getattr(self, k) for k in LAYER_OPTIONS}, "aux_weights": self.aux_weights}

    def apply_config(self, config) -> None:
        """Take the runtime options (``config.RUNTIME_FIELDS``: scaling, routing mode, temperature,
        top-k, aux-loss weights) from ``config``."""
        from .config import AUX_LOSS_FIELDS, LAYER_OPTIONS

        for k in LAYER_OPTIONS:
            setattr(self, k, getattr(config, k))
        self.aux_weights = tuple(getattr(config, f) for f in AUX_LOSS_FIELDS)

    @property
    def num_B(self) -> int:
        return self.lily_B.shape[0]

    @property
    def r(self) -> int:
        return self.lily_A.shape[0]

    def register_routing_observer(self, fn: Callable[[RoutingEvent], None]) -> RemovableHandle:
        """Call ``fn(event)`` after each forward's routing; remove with ``handle.remove()``."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        A, B, R = self.lily_A, self.lily_B, self.lily_router
        if getattr(self, "_scaling_fits", None) != (self.scaling, A.dtype):  # the model may have been cast since
            self._check_scaling(A.dtype)
        h = F.linear(x.to(A.dtype), A)  # (…, r)
        logits = F.linear(h, R)  # (…, E)
        # float32 softmax (the cast happens inside it); dividing by τ = 1 would be a wasted op.
        # Otherwise the largest logit is subtracted first: with a small τ, logits / τ alone can
        # reach +inf, and a softmax over +inf is NaN.
        tau = self.router_temperature
        if tau != 1:
            shifted = logits.float()
            logits_tau = (shifted - shifted.amax(dim=-1, keepdim=True)) / tau
        probs = torch.softmax(logits if tau == 1 else logits_tau, dim=-1, dtype=torch.float32)
        k = self.router_top_k
        if k is not None and k < probs.shape[-1]:
            top, idx = probs.topk(k, dim=-1)
            probs = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
        probs = probs.to(h.dtype)
        aux = self.training and any(self.aux_weights) and torch.is_grad_enabled()
        if self.routing == "causal":
            token_mask, continues = self._causal_mask(x)
            lhs, rhs, mixture = self._mix_causal(h, probs, B, token_mask, continues)
        else:
            # Padding matters to the per-sequence mean, the aux losses and observers only.
            token_mask = self._token_mask(x) if (self.routing == "sequence" or aux or self._observers) else None
            lhs, rhs, mixture = _MIXERS[self.routing](h, probs, B, token_mask)
        if aux:
            loss = _router_aux_loss(logits, probs, token_mask, self.aux_weights)
            self.aux_loss = loss if self.aux_loss is None else self.aux_loss + loss
        if self._observers and not in_backward():  # a checkpointing recomputation is no new call
            event = RoutingEvent(self, logits.detach(), probs.detach(), mixture.detach(), token_mask)
            for fn in list(self._observers.values()):
                fn(event)
        return _add_scaled_product(result, lhs, rhs, self.scaling)

    def _check_scaling(self, dtype: torch.dtype) -> None:
        from .errors import LilyConfigError

        problem = scaling_overflow(self.scaling, dtype)
        if problem is not None:
            raise LilyConfigError(f"Lily site {self.group!r} #{self.index}: {problem}; change it with "
                                  "lily_lab.set_lily_options(model, scaling=...)")
        self._scaling_fits = (self.scaling, dtype)

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's attention mask as ``x.shape[:-1]`` booleans, when it fits this input.

        It fits when ``x`` is ``(batch, positions, d_in)`` and the mask ``(batch, positions)``.
        Otherwise (no mask given, a 4-D mask, cached generation, cross-attention over another
        sequence) every token counts.
        """
        mask = self._context.attention_mask if self._context is not None else None
        if mask is None or mask.dim() != 2 or x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
            return None
        return mask.to(device=x.device) != 0

    def _causal_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """``(token_mask, continues)`` for causal routing. A call given a KV cache that already
        holds exactly the positions this site has summed is the next step of a cached
        generation: the running sums go on (its mask, when given, covers cache and input: the
        last positions are the input's). Any other call starts the sums afresh."""
        context = self._context
        mask = context.attention_mask if context is not None else None
        past = context.past_length if context is not None else 0
        state = self._causal_state
        continues = (past > 0 and x.dim() == 3 and state is not None and state[2] == past
                     and state[0].shape[0] == x.shape[0])
        if mask is None or mask.dim() != 2 or x.dim() != 3 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None, continues
        return mask[:, -x.shape[1]:].to(device=x.device) != 0, continues

    def _mix_causal(self, h, probs, B, token_mask, continues):
        """π_{b,t} = the mean of p over the real positions ≤ t of sequence b (``routing="causal"``),
        then applied per token like token routing. The sums at the last position are kept
        (detached) for the next step of a cached generation."""
        if h.dim() < 3:  # rows without positions: each is its own sequence of one token
            return _mix_token(h, probs, B, token_mask)
        p = probs.float()  # (batch, tokens, E), sums in float32
        m = torch.ones_like(p[..., :1]) if token_mask is None else token_mask.unsqueeze(-1).to(p.dtype)
        S, C = torch.cumsum(p * m, dim=1), torch.cumsum(m, dim=1)  # (batch, tokens, E), (batch, tokens, 1)
        if continues:
            S0, C0, _ = self._causal_state
            S, C = S + S0.unsqueeze(1), C + C0.unsqueeze(1)
        # A position with no real token yet (left padding) uses its own p.
        mixture = torch.where(C > 0, S / C.clamp_min(1), p).to(probs.dtype)
        seen = (self._causal_state[2] if continues else 0) + h.shape[1]
        if h.shape[1]:
            last = S[:, -1], C[:, -1]
        elif continues:  # a call of 0 positions adds nothing to the running sums
            last = self._causal_state[:2]
        else:
            last = p.new_zeros(p.shape[0], p.shape[-1]), p.new_zeros(p.shape[0], 1)
        self._causal_state = (last[0].detach(), last[1].detach(), seen)
        return _mix_token(h, mixture, B, token_mask)

    def extra_repr(self) -> str:
        return (
            f"group={self.group!r}, index={self.index}, a_index={self.a_index}, r={self.r}, "
            f"num_B={self.num_B}, routing={self.routing!r}, scaling={self.scaling}"
        )


def _router_aux_loss(logits, probs, token_mask, weights) -> torch.Tensor:
    """Weighted balance, z- and entropy losses of one call, over its real tokens."""
    w_balance, w_z, w_entropy = weights
    E = probs.shape[-1]
    logits, probs = logits.reshape(-1, E).float(), probs.reshape(-1, E).float()
    if token_mask is not None:
        keep = token_mask.reshape(-1)
        logits, probs = logits[keep], probs[keep]
    loss = logits.new_zeros(())
    if len(probs) == 0:
        return loss
    if w_balance:
        f = torch.bincount(probs.argmax(dim=-1), minlength=E).float() / len(probs)  # no gradient, as in Switch
        loss = loss + w_balance * E * (f * probs.mean(dim=0)).sum()
    if w_z:
        loss = loss + w_z * torch.logsumexp(logits, dim=-1).square().mean()
    if w_entropy and E > 1:
        H = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        loss = loss + w_entropy * H.mean() / math.log(E)
    return loss


def lily_aux_loss(model: nn.Module) -> torch.Tensor:
    """The router losses the config asked for (balance, z, entropy), summed over every Lily site
    since the last call, and reset. Add it to the task loss before ``backward()``::

        loss = task_loss + lily_aux_loss(model)

    Returns a zero tensor when every weight is 0 or the model is in eval mode.
    """
    require_module(model, "lily_aux_loss")
    total = None
    for m in model.modules():
        if isinstance(m, LilyLayer) and m.aux_loss is not None:
            total = m.aux_loss if total is None else total + m.aux_loss
            m.aux_loss = None
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


# --------------------------------------------------------------------------- routing modes
# Each takes h (…, r), probs (…, E), the bank B (E, r, d_out) and an optional token mask, and
# returns (lhs, rhs, the mixture applied) with Δ before scaling = lhs @ rhs: lhs (…, k) and rhs
# (k, d_out), or lhs (batch, tokens, k) and rhs (batch, k, d_out). The forward adds s · Δ to the
# base output in the same matmul (addmm / baddbmm), never materialising Δ or s · Δ.


def _uniform_where_empty(mixture: torch.Tensor, count) -> torch.Tensor:
    """``mixture`` (a mean over ``count`` tokens) where ``count > 0``, else the uniform mixture:
    a call or sequence without a single position mixes nothing, and a NaN mean would reach the
    routing observers."""
    if not isinstance(count, torch.Tensor):  # a size: no tensor op when it is positive
        return mixture if count > 0 else torch.full_like(mixture, 1 / mixture.shape[-1])
    return torch.where(count > 0, mixture, torch.full_like(mixture, 1 / mixture.shape[-1]))


def mix_experts(mixture: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``B_π = Σ_e π_e B_e``: one mixture ``(E,)`` of a bank ``(E, r, d_out)`` → ``(r, d_out)``."""
    return torch.einsum("e,erd->rd", mixture, B)


def _mix_batch(h, probs, B, token_mask):
    flat = probs.reshape(-1, probs.shape[-1])
    mixture = _uniform_where_empty(flat.mean(dim=0), flat.shape[0])  # (E,) every token, padding included
    B_mix = mix_experts(mixture, B)  # (r, d_out)
    return h, B_mix, mixture


def _mix_sequence(h, probs, B, token_mask):
    if h.dim() < 3:  # (batch, d) or (d,): each row is a sequence of one token
        return _mix_token(h, probs, B, token_mask)
    # flatten, not reshape(batch, -1, …): a batch of 0 sequences leaves -1 undetermined
    p = probs.flatten(1, -2)  # (batch, tokens, E)
    mean = _uniform_where_empty(p.mean(dim=1), p.shape[1])  # a sequence of 0 positions: uniform
    if token_mask is None:
        mixture = mean
    else:
        m = token_mask.flatten(1).unsqueeze(-1).to(p.dtype)  # (batch, tokens, 1)
        count = m.sum(dim=1)  # (batch, 1)
        # A sequence with no real token (all padding) falls back to the plain mean.
        mixture = torch.where(count > 0, (p * m).sum(dim=1) / count.clamp_min(1), mean)
    B_mix = torch.einsum("be,erd->brd", mixture, B)  # (batch, r, d_out)
    return h.flatten(1, -2), B_mix, mixture  # (batch, tokens, r), (batch, r, d_out)


def _mix_token(h, probs, B, token_mask):
    E, r, d_out = B.shape
    # (p ⊗ h) then one matmul with the stacked bank: never a per-token r × d_out matrix.
    ph = (probs.unsqueeze(-1) * h.unsqueeze(-2)).reshape(*h.shape[:-1], E * r)  # (…, E·r)
    return ph, B.reshape(E * r, d_out), probs


_MIXERS = {"batch": _mix_batch, "sequence": _mix_sequence, "token": _mix_token}


def _add_scaled_product(result: torch.Tensor, lhs: torch.Tensor, rhs: torch.Tensor, scaling: float) -> torch.Tensor:
    """``result + scaling · (lhs @ rhs)``, reshaped to ``result``'s shape, in one fused matmul."""
    d_out = rhs.shape[-1]
    if result.dtype != lhs.dtype:  # e.g. an fp32 adapter on a bf16 base: add in the base's dtype
        return result + (lhs @ rhs * scaling).to(result.dtype).reshape(result.shape)
    if rhs.dim() == 2:
        out = torch.addmm(result.reshape(-1, d_out), lhs.reshape(-1, lhs.shape[-1]), rhs, alpha=scaling)
    else:
        out = torch.baddbmm(result.reshape(lhs.shape[0], lhs.shape[1], d_out), lhs, rhs, alpha=scaling)
    return out.view(result.shape)
