"""``save_adapter`` / ``load_adapter``: safetensors + JSON, lily_lab's own layout or PEFT's.

lily_lab layout (a directory)::

    lily_adapter.json                  config, groups and site names, name and SHA-256 of the weights
    adapter-<sha256[:16]>.safetensors  each shared tensor once: g<k>.A<j>, g<k>.B, g<k>.router<i>

The weights file is named after its content and the JSON is replaced last, atomically: the JSON is
the commit point, so a save that dies half-way leaves the previous checkpoint loadable. Loading
checks the hash, so a corrupted weights file is refused rather than silently loaded. The JSON is
covered too (format version 2): the weights file's safetensors metadata holds the SHA-256 of the
JSON's ``config`` and ``groups`` in a canonical form, so an edit that still parses (a scaling, a
routing mode) is refused rather than loaded.

Saves to one directory hold an exclusive ``flock`` on the directory itself (POSIX; no lock file is
left behind), so two processes saving at once leave the later save complete, never a JSON naming a
weights file the other save deleted. A load that meets a save in progress (the JSON it read names
a weights file that has since been replaced) reads the new JSON again.

PEFT layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with the keys PEFT's ``lily``
tuner writes (every site's own copy of the shared tensors), loadable by
``peft.PeftModel.from_pretrained``. A PEFT-format save removes a lily_lab checkpoint from the same
directory (after writing), since ``load_adapter`` reads ``lily_adapter.json`` first and would
otherwise load the older adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LilyConfig
from .errors import CheckpointError, LilyLabError, LilyLabTypeError
from .inject import add_lily, get_state, plan_groups, remove_lily
from .files import atomic_write as _atomic_write, directory_lock
from .layer import LilyLayer, require_module, scaling_overflow
from .sites import lily_layers_by_group
from . import peft_format

LILY_JSON = "lily_adapter.json"
FORMAT_NAME = "lily_lab-adapter"
FORMAT_VERSION = 2  # 2: the weights' metadata holds the SHA-256 of the JSON's description
DESCRIPTION_KEY = "lily_description_sha256"


# --------------------------------------------------------------------------- save


def save_adapter(model: nn.Module, directory: str | os.PathLike, format: str = "lily_lab") -> Path:
    """Write the model's Lily adapter to ``directory`` (created if missing); return its path.

    ``format="lily_lab"`` stores each shared tensor once and keeps every option (routing mode,
    temperature, top-k, Conv1D sites). ``format="peft"`` writes what PEFT's ``lily`` tuner writes,
    for adapters PEFT can express (batch routing, temperature 1, no top-k, ``nn.Linear`` sites).
    """
    require_module(model, "save_adapter")
    directory = _require_path(directory, "save_adapter")
    state = get_state(model)
    if state is None:
        raise CheckpointError("this model has no lily_lab Lily adapter to save; call add_lily(model, config) first")
    layers = lily_layers_by_group(model)
    if format == "lily_lab":
        files = _lily_files(state, layers)
    elif format == "peft":
        files = peft_format.peft_files(model, state.config, layers)
    else:
        raise CheckpointError(f"format must be 'lily_lab' or 'peft', got {format!r}")
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory; choose a directory path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create the adapter directory {str(directory)!r} ({err.strerror or err})") from None
    with directory_lock(directory):
        for name, data in files:  # the last file written is the commit point
            _atomic_write(directory / name, data)
        # Only now is the new checkpoint committed: drop the files that no longer describe it, so
        # the directory holds one adapter. The JSON goes first, so a checkpoint never points at a
        # deleted weights file.
        if format == "peft":
            (directory / LILY_JSON).unlink(missing_ok=True)
            keep = None
        else:
            keep = json.loads(files[-1][1])["weights_file"]
            _remove_stale_peft_lily(directory)
        for old in directory.glob("adapter-*.safetensors"):
            if old.name != keep:
                old.unlink(missing_ok=True)
    return directory


def _require_path(directory: Any, fn: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise LilyLabTypeError(f"{fn}: directory must be a path (a str or pathlib.Path), got "
                               f"{type(directory).__name__} {directory!r:.60}")
    return Path(directory)


def _remove_stale_peft_lily(directory: Path) -> None:
    """Remove a PEFT *Lily* adapter a previous ``format="peft"`` save left here (its config says
    ``peft_type: LILY``). Any other PEFT adapter (LoRA, say) is the user's and stays."""
    config = directory / peft_format.PEFT_CONFIG
    try:
        kind = json.loads(config.read_bytes()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return
    if kind == "LILY":
        config.unlink(missing_ok=True)
        (directory / peft_format.PEFT_WEIGHTS).unlink(missing_ok=True)


def _lily_files(state, layers: dict[str, list[tuple[str, LilyLayer]]]) -> list[tuple[str, bytes]]:
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    groups = []
    for k, (key, members) in enumerate(layers.items()):
        seen_A: set[int] = set()
        for _, layer in members:
            if layer.a_index not in seen_A:
                seen_A.add(layer.a_index)
                tensors[f"g{k}.A{layer.a_index}"] = _plain(layer.lily_A)
            tensors[f"g{k}.router{layer.index}"] = _plain(layer.lily_router)
        m0 = members[0][1]
        tensors[f"g{k}.B"] = _plain(m0.lily_B)
        groups.append({"key": key, "target": m0.target, "d_in": m0.d_in, "d_out": m0.d_out,
                       "sites": [name for name, _ in members]})
    config = state.config.to_dict()
    description = {"config": config, "groups": groups}
    weights = save(tensors, metadata={"format": FORMAT_NAME, DESCRIPTION_KEY: _description_sha256(description)})
    digest = hashlib.sha256(weights).hexdigest()
    weights_file = f"adapter-{digest[:16]}.safetensors"
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config,
        "groups": groups,
        "weights_file": weights_file,
        "weights_sha256": digest,
    }
    return [(weights_file, weights), (LILY_JSON, json.dumps(meta, indent=2).encode())]


def _description_sha256(description: dict) -> str:
    """SHA-256 of the JSON's ``config`` and ``groups`` in a canonical form (sorted keys, no spaces,
    ASCII), computed from what a JSON reader gives back so that saving and loading agree."""
    canonical = json.dumps(json.loads(json.dumps(description)), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- load


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a lily_lab or PEFT Lily adapter directory into ``model`` and return it.

    ``model`` is either the base model (Lily is added with the saved config) or a model already
    carrying a lily_lab adapter of the same layout (its weights and options are replaced). On any
    error — missing or corrupted files, a config that is not valid, an adapter that does not fit
    this model — a :class:`~lily_lab.LilyLabError` is raised and the model is left as it was.
    """
    require_module(model, "load_adapter")
    directory = _require_path(directory, "load_adapter")
    if not directory.is_dir():
        raise CheckpointError(f"no adapter directory at {str(directory)!r}")
    with directory_lock(directory, shared=True):  # a save to this directory waits until we have read it
        if (directory / LILY_JSON).is_file():
            config, layout, tensors = _read_lily(directory)
        elif (directory / peft_format.PEFT_CONFIG).is_file():
            config, per_site = peft_format.read_peft(directory)
            layout, tensors = None, per_site
        else:
            raise CheckpointError(
                f"{str(directory)!r} holds no adapter: expected {LILY_JSON} (lily_lab) or "
                f"{peft_format.PEFT_CONFIG} (PEFT); found {sorted(p.name for p in directory.iterdir())[:10]}"
            )
    return _apply(model, config, layout, tensors)


def _read_lily(directory: Path):
    meta = _read_json(directory / LILY_JSON)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{LILY_JSON} is not a lily_lab adapter description (no 'format': {FORMAT_NAME!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{LILY_JSON}: format_version must be an integer ≥ 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{LILY_JSON} has format_version {version}, newer than the {FORMAT_VERSION} this lily_lab "
            "reads: upgrade lily_lab to load it"
        )
    known = {"format", "format_version", "config", "groups", "weights_file", "weights_sha256"}
    if set(meta) != known:
        extra, missing = sorted(set(meta) - known), sorted(known - set(meta))
        raise CheckpointError(f"{LILY_JSON}: unexpected keys {extra}, missing keys {missing}")
    config = _config_from(meta["config"])
    layout = _check_layout(meta["groups"])
    name, digest = meta["weights_file"], meta["weights_sha256"]
    if not (isinstance(name, str) and "/" not in name and "\\" not in name and name.endswith(".safetensors")):
        raise CheckpointError(f"{LILY_JSON}: weights_file must be a file name in the directory, got {name!r}")
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"the weights file {name!r} named by {LILY_JSON} is missing from {str(directory)!r}")
    data = read_bytes(path)
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"{name} is corrupted or was changed after saving: its SHA-256 does not match {LILY_JSON}; "
            "save the adapter again"
        )
    raw = read_safetensors(data, name)
    if version >= 2:
        recorded = _metadata(data).get(DESCRIPTION_KEY)
        try:
            ours = _description_sha256({"config": meta["config"], "groups": layout})
        except ValueError:  # NaN or infinity in the JSON: not what a save writes
            ours = None
        if recorded != ours:
            raise CheckpointError(
                f"{LILY_JSON} was edited after saving: its config and groups do not match the SHA-256 "
                f"recorded in {name} when the adapter was saved; save the adapter again (or change "
                "runtime options after loading, with set_lily_options)"
            )
    tensors: dict[tuple, torch.Tensor] = {}
    for k, group in enumerate(layout):
        for j in range(-(-len(group["sites"]) // config.stride_A)):
            tensors[(group["key"], "A", j)] = _take(raw, f"g{k}.A{j}", name)
        tensors[(group["key"], "B")] = _take(raw, f"g{k}.B", name)
        for i in range(len(group["sites"])):
            tensors[(group["key"], "router", i)] = _take(raw, f"g{k}.router{i}", name)
    if raw:
        raise CheckpointError(f"{name} has tensors this adapter does not use: {sorted(raw)[:5]}")
    return config, layout, tensors


def _apply(model: nn.Module, config: LilyConfig, layout: list[dict] | None, tensors: dict) -> nn.Module:
    """Check that the adapter fits ``model``, then (and only then) change the model.

    ``layout=None`` means a PEFT directory: ``tensors`` is per site and the layout is the model's.
    """
    state = get_state(model)
    if state is not None:
        ours = [{"key": g.key, "d_in": g.d_in, "d_out": g.d_out, "sites": [s.name for s in g.sites]}
                for g in state.groups]
        dtypes = {key: members[0][1].lily_A.dtype for key, members in lily_layers_by_group(model).items()}
        structural = ("r", "stride_A", "num_B")
        if any(getattr(state.config, f) != getattr(config, f) for f in structural):
            raise CheckpointError(
                "the adapter's r / stride_A / num_B ("
                f"{config.r}/{config.stride_A}/{config.num_B}) differ from the model's adapter "
                f"({state.config.r}/{state.config.stride_A}/{state.config.num_B}); "
                "call remove_lily(model) first to load a different layout"
            )
    else:
        try:
            planned = plan_groups(model, config)
        except LilyLabError as err:
            raise CheckpointError(f"the adapter does not fit this model: {err}") from None
        ours = [{"key": g.key, "d_in": g.d_in, "d_out": g.d_out, "sites": [s.name for s in g.sites]}
                for g in planned]
        dtypes = {g.key: g.sites[0].module.weight.dtype for g in planned}  # what add_lily will build
    if layout is None:
        layout, tensors = ours, peft_format.to_group_tensors(tensors, ours, config)
    _compare_layouts(layout, ours, config)
    # The sites are now known to be the same, group by group. Group keys follow how
    # target_modules was spelled (a list ['query'] or a regex '.*\.query' pick the same sites):
    # use this model's keys.
    renamed = {g_s["key"]: g_o["key"] for g_s, g_o in zip(layout, ours)}
    if any(k != v for k, v in renamed.items()):
        tensors = {(renamed[key[0]], *key[1:]): t for key, t in tensors.items()}
        layout = [{**g_s, "key": g_o["key"]} for g_s, g_o in zip(layout, ours)]
    if state is not None:
        # An adapted model keeps its own site selection: the saved target_modules/exclude_modules
        # chose the same sites (checked above), and the model's group keys are built from its own.
        # Writing the saved ones into its config would make its next save unloadable onto the
        # base model whenever the two were spelled differently.
        config = dataclasses.replace(config, target_modules=state.config.target_modules,
                                     exclude_modules=state.config.exclude_modules)
    _check_tensors(tensors, layout, config, dtypes)
    for dtype in dict.fromkeys(dtypes.values()):
        problem = scaling_overflow(config.scaling, dtype)
        if problem is not None:
            raise CheckpointError(f"the adapter's config does not fit this model: {problem}")
    added = state is None
    if added:
        add_lily(model, config)
    before = None
    try:
        layers = lily_layers_by_group(model)
        if not added:  # what to put back if the copy below is interrupted half-way
            before = [(layer, [p.detach().clone() for p in _tensors_of(layer)], layer.options())
                      for members in layers.values() for _, layer in members]
        with torch.no_grad():
            for group in layout:
                for _, layer in layers[group["key"]]:
                    if layer.index % config.stride_A == 0:
                        layer.lily_A.copy_(tensors[(group["key"], "A", layer.a_index)])
                    if layer.index == 0:
                        layer.lily_B.copy_(tensors[(group["key"], "B")])
                    layer.lily_router.copy_(tensors[(group["key"], "router", layer.index)])
                    layer.apply_config(config)
        get_state(model).config = config
    except BaseException:
        if added:
            remove_lily(model)
        elif before is not None:
            with torch.no_grad():
                for layer, saved, options in before:
                    for p, t in zip(_tensors_of(layer), saved):
                        p.copy_(t)
                    for key, value in options.items():
                        setattr(layer, key, value)
        raise
    return model


def _compare_layouts(saved: list[dict], ours: list[dict], config: LilyConfig) -> None:
    """Raise naming the first site where the saved adapter and this model disagree."""
    fit = "the adapter does not fit this model"
    for g_s, g_o in zip(saved, ours):
        if ((g_s["d_out"], g_s["d_in"]) == (g_o["d_out"], g_o["d_in"]) and g_s["key"] != g_o["key"]
                and g_s["sites"] != g_o["sites"]):
            raise CheckpointError(
                f"{fit}: its group {g_s['key']!r} (first site {g_s['sites'][0]!r}) is group "
                f"{g_o['key']!r} (first site {g_o['sites'][0]!r}) here; the adapter was saved for "
                "other target_modules or another model"
            )
        if (g_s["d_out"], g_s["d_in"]) != (g_o["d_out"], g_o["d_in"]):
            raise CheckpointError(
                f"{fit}: site {g_s['sites'][0]!r} has weight shape {g_s['d_out']}x{g_s['d_in']} (d_out x d_in) "
                f"in the adapter, but the matching site here, {g_o['sites'][0]!r}, has "
                f"{g_o['d_out']}x{g_o['d_in']}"
            )
        for i, (name_s, name_o) in enumerate(zip(g_s["sites"], g_o["sites"])):
            if name_s != name_o:
                raise CheckpointError(f"{fit}: site {i} of group {g_s['key']!r} is {name_s!r} in the adapter, {name_o!r} here")
        if len(g_s["sites"]) != len(g_o["sites"]):
            n = min(len(g_s["sites"]), len(g_o["sites"]))
            first = (f"{g_s['sites'][n]!r} is only in the adapter" if len(g_s["sites"]) > n
                     else f"{g_o['sites'][n]!r} is only here")
            raise CheckpointError(
                f"{fit}: group {g_s['key']!r} has {len(g_s['sites'])} sites in the adapter and "
                f"{len(g_o['sites'])} here (first unmatched: {first}); was it saved from a model "
                "with another number of layers?"
            )
    if len(saved) != len(ours):
        extra = saved[len(ours):] or ours[len(saved):]
        raise CheckpointError(
            f"{fit}: {len(saved)} groups in the adapter, {len(ours)} here (first unmatched: group "
            f"{extra[0]['key']!r}, site {extra[0]['sites'][0]!r})"
        )


def _check_tensors(tensors: dict, layout: list[dict], config: LilyConfig, dtypes: dict) -> None:
    """Shapes as the config says, float dtypes, and values still finite in the model's dtype."""
    r, E = config.r, config.num_B
    for group in layout:
        for key, t in tensors.items():
            if key[0] != group["key"]:
                continue
            want = {"A": (r, group["d_in"]), "B": (E, r, group["d_out"]), "router": (E, r)}[key[1]]
            if tuple(t.shape) != want:
                raise CheckpointError(
                    f"tensor {key[1]}{key[2] if len(key) > 2 else ''} of group {group['key']!r} has shape "
                    f"{tuple(t.shape)}, expected {want} for r={r}, num_B={E}"
                )
            if not t.is_floating_point():
                raise CheckpointError(f"tensor {key[1]} of group {group['key']!r} has dtype {t.dtype}, expected a float")
            # Checked after the cast load_adapter will do: a float64 1e300 becomes inf in float32,
            # and isfinite has no float8 kernel.
            if not torch.isfinite(t.to(dtypes[group["key"]])).all():
                raise CheckpointError(
                    f"tensor {key[1]} of group {group['key']!r} holds NaN or infinite values (as "
                    f"{dtypes[group['key']]}, the model's dtype)"
                )


# --------------------------------------------------------------------------- shared helpers


def read_safetensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return dict(load(data))
    except Exception as err:  # safetensors raises its own error types, and others on odd headers
        raise CheckpointError(f"{name} is not a readable safetensors file ({type(err).__name__}: {err})") from None


def _metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes already read successfully by safetensors."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r} ({type(err).__name__}: {err.strerror or err})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path.name} is not valid JSON ({err}); save the adapter again") from None


def _config_from(data: Any) -> LilyConfig:
    try:
        config = LilyConfig.from_dict(data)
    except (TypeError, LilyLabError) as err:
        raise CheckpointError(f"the adapter's config is invalid: {err}") from None
    return config


def _check_layout(groups: Any) -> list[dict]:
    ok = isinstance(groups, list) and groups and all(
        isinstance(g, dict) and set(g) == {"key", "target", "d_in", "d_out", "sites"}
        and isinstance(g["key"], str) and isinstance(g["target"], str)
        and all(isinstance(g[d], int) and not isinstance(g[d], bool) and g[d] > 0 for d in ("d_in", "d_out"))
        and isinstance(g["sites"], list) and g["sites"] and all(isinstance(s, str) for s in g["sites"])
        for g in groups
    )
    if not ok:
        raise CheckpointError(f"{LILY_JSON}: 'groups' is malformed; save the adapter again")
    return groups


def _take(raw: dict, key: str, name: str) -> torch.Tensor:
    if key not in raw:
        raise CheckpointError(f"{name} has no tensor {key!r}: the file does not match its description")
    return raw.pop(key)


def _tensors_of(layer: LilyLayer) -> tuple[torch.Tensor, ...]:
    return layer.lily_A, layer.lily_B, layer.lily_router


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu").contiguous().clone()
