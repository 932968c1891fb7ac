"""What every benchmark shares: settings, side-by-side timing, rows of the result table.

Two sides of a comparison are measured in one process, alternating (A B A B …) after a warm-up,
so a load spike on this shared machine hits both sides alike. A row's ratio is the median over
repeats of the per-repeat ratio ``A_i / B_i`` (each pair ran back to back); the absolute medians
of each side are printed beside it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Settings:
    smoke: bool = False  # tiny random models and sizes: checks the plumbing, measures nothing
    device: str = "cpu"
    dtype: str = "fp32"  # "fp32" or "bf16"
    threads: int = 2
    repeats: int = 9  # timed repeats per side (after the warm-up)
    warmup: int = 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        """Wait for queued GPU work, so a timer brackets the work itself."""
        if self.cuda:
            torch.cuda.synchronize()


@dataclass
class Row:
    """One line of the table. ``ratio`` is lily_lab / reference unless ``speedup`` (reference /
    lily_lab, for "n× faster" targets); ``ok`` is None when the row has no pass/fail."""

    what: str
    reference: str
    target: str
    ours: str = "—"  # absolute median of the lily_lab side, formatted
    theirs: str = "—"  # absolute median of the reference side, formatted
    ratio: str = "—"
    ok: bool | None = None
    load: str = "—"
    notes: list[str] = field(default_factory=list)
    key: str = ""  # a short name for the notes under the table


def load_now() -> float:
    return os.getloadavg()[0]


class LoadWindow:
    """The 1-minute load average at the start and the end of a measurement."""

    def __enter__(self):
        self.start = load_now()
        return self

    def __exit__(self, *exc):
        self.end = load_now()

    def __str__(self) -> str:
        return f"{self.start:.1f}→{self.end:.1f}"


@dataclass
class Pairs:
    """Per-repeat seconds of the two sides: wall clock, and this process's CPU time (all threads)."""

    wall_a: list[float] = field(default_factory=list)
    wall_b: list[float] = field(default_factory=list)
    cpu_a: list[float] = field(default_factory=list)
    cpu_b: list[float] = field(default_factory=list)


def timed(fn: Callable[[], object], settings: Settings) -> tuple[float, float]:
    """``fn()``'s wall-clock seconds and this process's CPU seconds (all threads), the device
    synchronised before and after (``settings.sync``)."""
    settings.sync()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    settings.sync()
    return time.perf_counter() - t0, time.process_time() - c0


def alternate_pairs(a: Callable[[], object], b: Callable[[], object], settings: Settings,
                    repeats: int | None = None, warmup: int | None = None) -> Pairs:
    """Time ``a()`` and ``b()``: ``warmup`` untimed calls of each, then ``repeats`` timed pairs,
    alternating which side goes first so neither always runs on a warmer cache."""
    repeats = settings.repeats if repeats is None else repeats
    warmup = settings.warmup if warmup is None else warmup
    for _ in range(warmup):
        a(), b()
    gc.collect()
    out = Pairs()
    for i in range(repeats):
        order = ((a, out.wall_a, out.cpu_a), (b, out.wall_b, out.cpu_b))
        for fn, wall, cpu in order if i % 2 == 0 else order[::-1]:
            seconds, cpu_seconds = timed(fn, settings)
            wall.append(seconds)
            cpu.append(cpu_seconds)
    return out


def alternate(a: Callable[[], object], b: Callable[[], object], settings: Settings,
              repeats: int | None = None, warmup: int | None = None) -> tuple[list[float], list[float]]:
    """Wall-clock seconds of ``a()`` and of ``b()``, as :func:`alternate_pairs` measures them."""
    pairs = alternate_pairs(a, b, settings, repeats, warmup)
    return pairs.wall_a, pairs.wall_b


def median_ratio(ta: list[float], tb: list[float]) -> float:
    """Median over repeats of ``ta[i] / tb[i]``."""
    return statistics.median(x / y for x, y in zip(ta, tb))


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def timing_row(what: str, reference: str, target: str, limit: float, pairs: Pairs, load: LoadWindow,
               settings: Settings) -> Row:
    """A ratio row ``lily_lab / reference ≤ limit`` (wall clock), with the CPU-time ratio in a note:
    CPU time does not count waiting for a core, so on a loaded machine it is the steadier of the two."""
    ta, tb = pairs.wall_a, pairs.wall_b
    ratio = median_ratio(ta, tb)
    row = Row(what, reference, target, fmt_seconds(statistics.median(ta)), fmt_seconds(statistics.median(tb)),
              f"{ratio:.2f}×", None if settings.smoke else ratio <= limit, str(load))
    if not settings.cuda and pairs.cpu_a:
        row.notes.append(f"ratio of process CPU time (all threads): {median_ratio(pairs.cpu_a, pairs.cpu_b):.3f}×; "
                         f"of wall time: {ratio:.3f}× (spread of the wall ratios {_spread(ta, tb)})")
    return row


def _spread(ta: list[float], tb: list[float]) -> str:
    ratios = sorted(x / y for x, y in zip(ta, tb))
    return f"{ratios[0]:.2f}–{ratios[-1]:.2f}"


def table(rows: list[Row], settings: Settings) -> str:
    """The markdown table; ✓/✗ against the target (— for smoke runs and rows without a target)."""
    head = ["what", "reference", "lily_lab (median)", "reference (median)", "ratio", "target", "met", "load 1-min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = "—" if r.ok is None else ("✓" if r.ok else "✗")
        cells = [r.what, r.reference, r.ours, r.theirs, r.ratio, r.target, met, r.load]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = [f"- {r.key or r.what}: {n}" for r in rows for n in r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines), then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(step: Callable[[], object], settings: Settings) -> int:
    """Peak bytes that torch allocated during one ``step()``, above what was live when it began.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True`` (every tensor storage the CPU allocator
    hands out or takes back, on any thread), summed in time order; the peak of that running sum.
    Both count tensor storage only: not Python objects, not allocator caching, not the RSS.
    """
    if settings.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak
