"""Reading module paths: the layer number in ``encoder.layer.3.attention.self.query``.

Imports nothing of lily_lab, so every layer may use it (``plots`` included: see
docs/architecture.md and tests/test_architecture.py).
"""

from __future__ import annotations

import re
from typing import Any

_LAYER = re.compile(r"\.(\d+)(?:\.|$)")


def layer_of(name: Any, default: Any = None) -> Any:
    """The layer number in a module path (``encoder.layer.3.attention.self.query`` → 3): the first
    dotted component that is a number; ``default`` when there is none."""
    m = _LAYER.search(str(name))
    return int(m.group(1)) if m else default
