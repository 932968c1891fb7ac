"""``resign(directory)``: what an attacker (or a careful hand edit) does to a lily_lab adapter
directory after changing it — record the JSON's description hash in the weights' metadata, name
the weights after their new SHA-256 and point the JSON at them — so that a test reaches the
structural checks behind the integrity checks. Imported by the bad-input and fuzz tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save

from lily_lab.core.checkpoint import DESCRIPTION_KEY, LILY_JSON, _description_sha256


def resign_bytes(meta: dict, weights: bytes) -> tuple[dict, str, bytes]:
    """``(meta, weights file name, weights bytes)`` re-signed for ``meta``'s config and groups."""
    from safetensors.torch import load

    n = int.from_bytes(weights[:8], "little")
    metadata = dict(json.loads(weights[8:8 + n]).get("__metadata__") or {})
    metadata[DESCRIPTION_KEY] = _description_sha256({"config": meta["config"], "groups": meta["groups"]})
    data = save(dict(load(weights)), metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    meta = {**meta, "weights_file": f"adapter-{digest[:16]}.safetensors", "weights_sha256": digest}
    return meta, meta["weights_file"], data


def resign(directory: Path) -> None:
    """Re-sign the lily_lab adapter in ``directory`` in place (its JSON and weights as they are now)."""
    meta = json.loads((directory / LILY_JSON).read_text())
    old = directory / meta["weights_file"]
    meta, name, data = resign_bytes(meta, old.read_bytes())
    old.unlink()
    (directory / name).write_bytes(data)
    (directory / LILY_JSON).write_text(json.dumps(meta))


__all__ = ["resign", "resign_bytes", "load_file", "safe_open"]
