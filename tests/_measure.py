"""What a call costs: the peak of Python's allocations, and the time of a refusal — the bounds the
file-fuzz tests put on reading an untrusted file."""

from __future__ import annotations

import time
import tracemalloc

import pytest


def traced(fn, *args):
    """``(fn(*args), the peak of Python's allocations during the call)``; an exception gets that
    peak as its ``peak``."""
    tracemalloc.start()
    try:
        return fn(*args), tracemalloc.get_traced_memory()[1]
    except BaseException as err:
        err.peak = tracemalloc.get_traced_memory()[1]
        raise
    finally:
        tracemalloc.stop()


def refusal_cost(fn, error, match: str) -> tuple[float, int]:
    """``fn()`` must raise ``error`` with a message matching ``match``: ``(seconds, peak bytes)`` it
    took to refuse."""
    t0 = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        traced(fn)
    return time.perf_counter() - t0, info.value.peak
