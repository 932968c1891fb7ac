"""Adapter sites read from a directory alone — no base model needed (a 70B adapter on a laptop)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError
from .inject import match_target
from .sites import Site


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def sites_from_directory(directory: str | os.PathLike) -> list[Site]:
    """The sites of a saved adapter (lily_lab or PEFT Lily layout), with ``layer=None``.

    Tensors are the file's, not a model's: editing them changes nothing. For PEFT files, whose
    keys carry no order, sites are ordered by name with numbers compared as numbers.
    """
    from . import checkpoint, peft_format

    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no adapter directory at {str(directory)!r}")
    sites: list[Site] = []
    if (directory / checkpoint.LILY_JSON).is_file():
        config, layout, tensors = checkpoint._read_lily(directory)
        for g in layout:
            B = tensors[(g["key"], "B")]
            for i, name in enumerate(g["sites"]):
                j = i // config.stride_A
                A, R = tensors[(g["key"], "A", j)], tensors[(g["key"], "router", i)]
                sites.append(Site(name, g["target"], g["key"], i, j, A, B, R, config.scaling, "lily", None, (A, B, R)))
        return sites
    if (directory / peft_format.PEFT_CONFIG).is_file():
        config, per_site = peft_format.read_peft(directory)
        groups: dict[str, list[str]] = {}
        for name in sorted(per_site, key=_natural):
            A = per_site[name]["lily_A"]
            target = match_target(name, config.target_modules) or name.rsplit(".", 1)[-1]
            d_out = per_site[name]["lily_B"].shape[1]
            groups.setdefault(f"{target}:{d_out}x{A.shape[1]}", []).append(name)
        for key, names in groups.items():
            for i, name in enumerate(names):
                t = per_site[name]
                E = t["lily_router"].shape[0]
                B = t["lily_B"].reshape(E, -1, t["lily_B"].shape[1])
                sites.append(Site(name, key.rsplit(":", 1)[0], key, i, i // config.stride_A, t["lily_A"], B,
                                  t["lily_router"], config.scaling, "peft-lily", None,
                                  (t["lily_A"], B, t["lily_router"])))
        return sites
    raise CheckpointError(f"{str(directory)!r} holds no adapter ({checkpoint.LILY_JSON} or {peft_format.PEFT_CONFIG})")
