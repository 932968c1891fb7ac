"""Reading a plotly figure's JSON in tests: every string it holds (text, hover, titles, ticks).

Imported by tests/test_plots.py, tests/test_figure_text.py and tests/test_expert_trajectories.py.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np


def strings(obj: Any) -> Iterator[str]:
    """Every string inside a plotly JSON structure (``fig.to_plotly_json()``)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from strings(v)
    elif isinstance(obj, (list, tuple)) or (isinstance(obj, np.ndarray) and obj.dtype == object):
        for v in obj:
            yield from strings(v)
