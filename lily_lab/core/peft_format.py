"""PEFT's on-disk layout for its ``lily`` tuner: what it writes, and reading it back.

PEFT writes, for every site ``<name>``, ``base_model.model.<name>.lily_A.weight`` (``r × d_in``),
``….lily_B.weight`` (the bank stacked as ``E·r × d_out``) and ``….lily_router.weight``
(``E × r``) — a shared tensor is written once per site that uses it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import LilyConfig
from .errors import CheckpointError, LilyLabError
from .layer import is_conv1d

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PARTS = ("lily_A", "lily_B", "lily_router")

# The keys PEFT 0.19–0.21 writes in a lily adapter_config.json.
_PEFT_KEYS = {
    "auto_mapping", "base_model_name_or_path", "exclude_modules", "inference_mode", "init_weights",
    "layers_pattern", "layers_to_transform", "modules_to_save", "num_B", "peft_type", "peft_version",
    "r", "revision", "scaling", "stride_A", "target_modules", "task_type",
}


def peft_files(model: nn.Module, config: LilyConfig, layers: dict) -> list[tuple[str, bytes]]:
    """``[(file name, bytes)]`` for a PEFT-format save; raises if PEFT cannot express the adapter."""
    from safetensors.torch import save

    limits = []
    if config.num_B < 2:  # PEFT's LilyConfig raises on it, so PeftModel.from_pretrained would fail
        limits.append(f"num_B={config.num_B} (PEFT's lily needs num_B ≥ 2)")
    if config.routing != "batch":
        limits.append(f"routing={config.routing!r} (PEFT has batch routing only)")
    if config.router_temperature != 1.0:
        limits.append(f"router_temperature={config.router_temperature} (PEFT has none)")
    if config.router_top_k is not None and config.router_top_k < config.num_B:
        limits.append(f"router_top_k={config.router_top_k} (PEFT has none)")
    conv = [name for members in layers.values() for name, layer in members if is_conv1d(layer.base_layer)]
    if conv:
        limits.append(f"Conv1D sites such as {conv[0]!r} (PEFT's lily wraps nn.Linear only)")
    if limits:
        raise CheckpointError(
            "PEFT's lily tuner cannot express this adapter: " + "; ".join(limits)
            + ". Save it with format='lily_lab' instead."
        )
    tensors: dict[str, torch.Tensor] = {}
    for members in layers.values():
        for name, layer in members:
            E, r, d_out = layer.lily_B.shape
            key = f"{PREFIX}{name}"
            tensors[f"{key}.lily_A.weight"] = _plain(layer.lily_A)
            tensors[f"{key}.lily_B.weight"] = _plain(layer.lily_B).reshape(E * r, d_out)
            tensors[f"{key}.lily_router.weight"] = _plain(layer.lily_router)
    base_cfg = getattr(model, "config", None)
    cfg = {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(base_cfg, "_name_or_path", None) or None,
        "exclude_modules": config.exclude_modules,
        "inference_mode": True,
        "init_weights": config.init_weights,
        "layers_pattern": None,
        "layers_to_transform": None,
        "modules_to_save": None,
        "num_B": config.num_B,
        "peft_type": "LILY",
        "r": config.r,
        "revision": None,
        "scaling": config.scaling,
        "stride_A": config.stride_A,
        "target_modules": config.target_modules,
        "task_type": None,
    }
    return [(PEFT_WEIGHTS, save(tensors, metadata={"format": "pt"})),
            (PEFT_CONFIG, json.dumps(cfg, indent=2, sort_keys=True).encode())]


def read_peft(directory: Path) -> tuple[LilyConfig, dict[str, dict[str, torch.Tensor]]]:
    """The config and ``{site name: {"lily_A"|"lily_B"|"lily_router": tensor}}`` of a PEFT dir."""
    from .checkpoint import _read_json, read_bytes, read_safetensors

    meta = _read_json(directory / PEFT_CONFIG)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{PEFT_CONFIG} must hold a JSON object")
    kind = meta.get("peft_type")
    if kind != "LILY":
        hint = " lily_lab reads PEFT LoRA models through adapter_sites(peft_model)." if kind == "LORA" else ""
        raise CheckpointError(f"{PEFT_CONFIG} has peft_type {kind!r}; load_adapter reads PEFT 'LILY' adapters.{hint}")
    unknown = sorted(set(meta) - _PEFT_KEYS)
    if unknown:
        raise CheckpointError(f"{PEFT_CONFIG} has unknown keys {unknown}; expected only PEFT lily keys")
    for key in ("layers_to_transform", "layers_pattern", "modules_to_save"):
        if meta.get(key) not in (None, [], ""):
            raise CheckpointError(
                f"{PEFT_CONFIG} sets {key}={meta[key]!r}, which lily_lab does not support yet; "
                "load this adapter with peft.PeftModel.from_pretrained"
            )
    fields = {k: meta[k] for k in ("target_modules", "r", "stride_A", "num_B", "scaling", "init_weights",
                                   "exclude_modules") if k in meta}
    if "target_modules" not in fields:
        raise CheckpointError(f"{PEFT_CONFIG} has no target_modules")
    try:
        config = LilyConfig(**fields, routing="batch")
    except (TypeError, LilyLabError) as err:
        raise CheckpointError(f"{PEFT_CONFIG} holds an invalid Lily config: {err}") from None
    path = directory / PEFT_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
    raw = read_safetensors(read_bytes(path), PEFT_WEIGHTS)
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in raw.items():
        name, _, part = key.removeprefix(PREFIX).rpartition(".lily_")
        part = "lily_" + part.removesuffix(".weight")
        if not key.startswith(PREFIX) or not key.endswith(".weight") or part not in _PARTS or not name:
            raise CheckpointError(f"{PEFT_WEIGHTS} has a key PEFT's lily tuner does not write: {key!r}")
        sites.setdefault(name, {})[part] = tensor
    for name, parts in sites.items():
        if set(parts) != set(_PARTS):
            raise CheckpointError(f"{PEFT_WEIGHTS}: site {name!r} lacks {sorted(set(_PARTS) - set(parts))}")
    return config, sites


def to_group_tensors(sites: dict[str, dict[str, torch.Tensor]], layout: list[dict], config: LilyConfig) -> dict:
    """Map per-site PEFT tensors onto ``layout`` (the model's groups), checking every copy.

    The copies of a shared ``A`` or bank ``B`` must agree: PEFT writes the same tensor at each site.
    """
    r, E = config.r, config.num_B
    wanted = {name for g in layout for name in g["sites"]}
    extra = sorted(set(sites) - wanted)
    if extra:
        raise CheckpointError(f"the adapter does not fit this model: it has weights for {extra[0]!r}, "
                              "which is not a matching site here")
    out: dict[tuple, torch.Tensor] = {}
    for g in layout:
        shapes = {"lily_A": (r, g["d_in"]), "lily_B": (E * r, g["d_out"]), "lily_router": (E, r)}
        for i, name in enumerate(g["sites"]):
            if name not in sites:
                raise CheckpointError(f"the adapter does not fit this model: it has no weights for site {name!r}")
            for part, want in shapes.items():
                got = tuple(sites[name][part].shape)
                if got != want:
                    A, B = sites[name]["lily_A"].shape, sites[name]["lily_B"].shape
                    dims = (B[-1], A[-1]) if len(A) == len(B) == 2 else None
                    if dims == (g["d_out"], g["d_in"]):  # the site fits: the config and weights disagree
                        raise CheckpointError(
                            f"{PEFT_WEIGHTS} does not match {PEFT_CONFIG}: site {name!r} has {part} of shape "
                            f"{got}, but the config's r={r}, num_B={E} imply {want}; the two files come "
                            "from different saves — save the adapter again"
                        )
                    theirs = f"{dims[0]}x{dims[1]}" if dims else "unknown"
                    raise CheckpointError(
                        f"the adapter does not fit this model: site {name!r} has weight shape {theirs} "
                        f"(d_out x d_in) in the adapter, {g['d_out']}x{g['d_in']} here: its {part} is {got}, "
                        f"expected {want} for r={r}, num_B={E}"
                    )
            j = i // config.stride_A
            shared = [((g["key"], "A", j), sites[name]["lily_A"]),
                      ((g["key"], "B"), sites[name]["lily_B"].reshape(E, r, g["d_out"]))]
            for key, tensor in shared:
                if key not in out:
                    out[key] = tensor
                elif out[key].dtype != tensor.dtype or not torch.equal(out[key], tensor):
                    raise CheckpointError(
                        f"{PEFT_WEIGHTS}: site {name!r} holds a copy of shared tensor {key[1]} that differs "
                        "from its group's other copies; the file is corrupted"
                    )
            out[(g["key"], "router", i)] = sites[name]["lily_router"]
    return out


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()
