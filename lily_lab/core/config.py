"""``LilyConfig``: what to adapt and how, validated on construction, with a JSON round trip."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import LilyConfigError

ROUTING_MODES = ("batch", "sequence", "token", "causal")

#: Version of the JSON layout written by :meth:`LilyConfig.to_json`. Readers accept this version
#: and older ones; a newer file is rejected with a message asking to upgrade lily_lab.
CONFIG_FORMAT_VERSION = 1

#: The largest float32 and its smallest positive normal number: the router's softmax runs in
#: float32, so the temperature it divides by, and its inverse, must be finite there. The scaling
#: must fit in float32 too, whatever dtype the adapter has now; a narrower adapter dtype (float16,
#: bfloat16) is checked against the weights when they are known (``scaling_overflow``).
FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38

#: Config fields that weight the optional router losses gathered by ``lily_aux_loss``.
AUX_LOSS_FIELDS = ("balance_loss_weight", "router_z_loss_weight", "router_entropy_weight")
#: The options a LilyLayer reads from its config at run time, one attribute each.
LAYER_OPTIONS = ("scaling", "routing", "router_temperature", "router_top_k")
#: The config fields that change what an adapter computes but none of its tensors: the only ones
#: ``set_lily_options`` accepts, ``LilyLayer.apply_config`` takes and a failed load puts back.
#: Declared here once; the layer, injection and checkpoint code all read them from here.
RUNTIME_FIELDS = LAYER_OPTIONS + AUX_LOSS_FIELDS


@dataclass
class LilyConfig:
    """How Lily adapts a model.

    A Lily adapter adds ``Δy = scaling · h · Σ_e π_e B_e`` to each adapted linear layer (a *site*),
    where ``h = x A_jᵀ`` is a low-rank projection of the input and ``π`` a mixture of the ``B``
    experts chosen by the site's router. Sites are grouped by the target name they matched and
    their weight shape; inside a group, neighbouring sites share ``A`` and all sites share one bank
    of ``B`` experts.

    Attributes:
        target_modules: Which layers to adapt. A list of module-name suffixes (``["query",
            "value"]`` adapts every module whose dotted name is ``query`` or ends in ``.query``), or
            one regular expression matched against the whole dotted name (``r".*\\.(q|v)_proj"``).
            This is PEFT's rule.
        r: Rank of the low-rank projection: ``A`` maps ``d_in → r`` and each expert ``B_e`` maps
            ``r → d_out``. The update of one site has rank at most ``r``.
        stride_A: How many consecutive sites of a group share one ``A`` projector. ``1`` gives
            every site its own ``A``; ``4`` makes sites 0–3 share one, 4–7 the next, and so on.
        num_B: Number of ``B`` experts in each group's bank. The bank is shared by every site of
            the group; each site's router mixes the experts. ``1`` means one shared ``B`` and no
            routing at all (useful for teaching: Lily without the router).
        scaling: Plain multiplier of the adapter's output (no ``alpha / r`` as in LoRA).
        routing: How the router's per-token distributions ``p`` become the mixture ``π``:
            ``"batch"`` averages ``p`` over every token of the forward call — padding and other
            samples included — as the paper and PEFT do, so one sample's output depends on the
            rest of its batch; ``"sequence"`` averages per sequence, skipping padding when the
            model is called with an ``attention_mask``, so outputs do not depend on batching;
            ``"token"`` uses each token's own distribution, ``π_t = p_t``; ``"causal"`` (for
            causal LMs) mixes position ``t`` with the mean of ``p`` over the real positions
            ``≤ t`` of its sequence, so no output depends on a later token and generation with
            a KV cache computes what one forward pass over the same text computes.
        router_temperature: Divides the router logits before the softmax. Above 1 the router's
            distributions are flatter, below 1 sharper.
        router_top_k: Keep only the ``k`` largest router probabilities of each token,
            renormalised to sum to 1, before any averaging. ``None`` keeps all ``num_B``.
        init_weights: ``True`` (the paper's and PEFT's choice) starts the experts ``B`` at zero,
            so the adapted model starts exactly as the base model. ``False`` starts them
            kaiming-uniform like ``A`` and the routers.
        exclude_modules: Modules never adapted even if they match ``target_modules``: a list of
            names or suffixes, or one regular expression, with the same rule.
        balance_loss_weight: Weight of a Switch-Transformer load-balancing loss
            ``E · Σ_e f_e P_e`` per site (``f_e`` the share of tokens whose top expert is ``e``,
            ``P_e`` the mean router probability): 1 when load is balanced, ``E`` when collapsed.
            Added to :func:`lily_lab.lily_aux_loss` in training mode; 0 turns it off.
        router_z_loss_weight: Weight of the router z-loss, the mean over tokens of
            ``logsumexp(logits)²``: keeps router logits small and training stable. 0 turns it off.
        router_entropy_weight: Weight of the mean per-token router entropy ``H(p_t) / ln E``:
            a positive weight pushes each token towards a decisive choice of experts (pair it
            with the balance loss so the choices spread over experts). 0 turns it off.
    """

    target_modules: list[str] | str
    r: int = 32
    stride_A: int = 1
    num_B: int = 2
    scaling: float = 1.0
    routing: str = "batch"
    router_temperature: float = 1.0
    router_top_k: int | None = None
    init_weights: bool = True
    exclude_modules: list[str] | str | None = None
    balance_loss_weight: float = 0.0
    router_z_loss_weight: float = 0.0
    router_entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        self.target_modules = _check_names("target_modules", self.target_modules, allow_none=False)
        self.exclude_modules = _check_names("exclude_modules", self.exclude_modules, allow_none=True)
        for name in ("r", "stride_A", "num_B"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise LilyConfigError(f"{name} must be an integer ≥ 1, got {value!r}")
        if not _is_number(self.scaling) or not math.isfinite(self.scaling):
            raise LilyConfigError(f"scaling must be a finite number, got {self.scaling!r}")
        if abs(self.scaling) > FLOAT32_MAX:
            raise LilyConfigError(
                f"scaling={self.scaling!r} does not fit in float32 (|scaling| ≤ {FLOAT32_MAX:.4g}): the forward "
                "would overflow. Use a scaling of a sensible size (Lily's is usually 0.1 … 10)"
            )
        if self.routing not in ROUTING_MODES:
            raise LilyConfigError(
                f"routing must be one of {', '.join(map(repr, ROUTING_MODES))}, got {self.routing!r}"
            )
        t = self.router_temperature
        if not _is_number(t) or not math.isfinite(t) or t <= 0:
            raise LilyConfigError(f"router_temperature must be a finite number > 0, got {t!r}")
        if not FLOAT32_TINY <= t <= FLOAT32_MAX:
            raise LilyConfigError(
                f"router_temperature={t!r} is outside what the router's float32 softmax can divide by "
                f"({FLOAT32_TINY:.4g} … {FLOAT32_MAX:.4g}; 1/temperature must be finite in float32). For a "
                "near-argmax router use a small temperature such as 0.01, or router_top_k=1"
            )
        k = self.router_top_k
        if k is not None and (not _is_int(k) or not 1 <= k <= self.num_B):
            raise LilyConfigError(
                f"router_top_k must be None or an integer in 1..num_B (1..{self.num_B}), got {k!r}"
            )
        for name in AUX_LOSS_FIELDS:
            w = getattr(self, name)
            if not _is_number(w) or not math.isfinite(w) or w < 0:
                raise LilyConfigError(f"{name} must be a finite number ≥ 0 (0 turns it off), got {w!r}")
            setattr(self, name, float(w))
        if not isinstance(self.init_weights, bool):
            raise LilyConfigError(f"init_weights must be True or False, got {self.init_weights!r}")
        self.scaling = float(self.scaling)
        self.router_temperature = float(self.router_temperature)

    # ------------------------------------------------------------------ JSON round trip
    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON values, plus ``format_version``."""
        return {"format_version": CONFIG_FORMAT_VERSION, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "LilyConfig":
        """Build a config from :meth:`to_dict`'s output; unknown keys and newer versions raise."""
        if not isinstance(data, dict):
            raise LilyConfigError(f"a Lily config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("format_version", None)
        if not _is_int(version) or version < 1:
            raise LilyConfigError(
                f"format_version must be an integer ≥ 1 (this lily_lab writes {CONFIG_FORMAT_VERSION}), "
                f"got {version!r}"
            )
        if version > CONFIG_FORMAT_VERSION:
            raise LilyConfigError(
                f"this config has format_version {version}, newer than the {CONFIG_FORMAT_VERSION} this "
                "lily_lab reads: upgrade lily_lab to load it"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LilyConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(known))}"
            )
        if "target_modules" not in data:
            raise LilyConfigError("the config has no 'target_modules'")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "LilyConfig":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise LilyConfigError(f"the config is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_names(field: str, value: Any, *, allow_none: bool) -> list[str] | str | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if not value:
            raise LilyConfigError(f"{field} must not be an empty string")
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as err:
            raise LilyConfigError(
                f"{field}={value!r} is not a valid regular expression ({err}); pass a list of module-name "
                "suffixes instead, e.g. ['query', 'value'], or fix the pattern"
            ) from None
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) and v for v in value):
        if not value and not allow_none:
            raise LilyConfigError(f"{field} must name at least one module, e.g. ['query', 'value']")
        return list(value) if not isinstance(value, set) else sorted(value)
    raise LilyConfigError(
        f"{field} must be a list of non-empty module-name suffixes or one regex string, got {value!r}"
    )
