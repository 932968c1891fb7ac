"""How the `lily-lab` command uses the CPU: torch's thread count and OpenMP's wait policy.

Both choices are made here and nowhere else; the library packages never choose threads.

Thread count (:func:`threads_for_the_run`). ``run_demo`` and ``run_report`` take ``threads``
(default 2: what this project's small CPU machines have) and run with that many torch intra-op
threads (``torch.set_num_threads``). The caller's count is put back when the command returns or
fails, so a notebook or script that calls them keeps its own. ``threads`` is checked once, there.

Wait policy (:func:`idle_threads_sleep_when_busy`). Between parallel regions OpenMP's idle
threads spin by default, the fastest choice on idle cores. When other processes already keep every
core busy, the spinning takes CPU from the threads doing the work, and ``OMP_WAIT_POLICY=PASSIVE``
(idle threads sleep) runs the demo much faster; on idle cores PASSIVE is a little slower. So it is
set only when the cores are busy (:func:`cores_are_busy`: the 1-minute load average, or the
processes running right now, at least the core count — the average lags by a minute). The
figures: benchmarks/README.md ("The command's wait policy"). An ``OMP_WAIT_POLICY`` already in the
environment (yours, or set by the restart below) is kept.

Why the command restarts itself. OpenMP reads ``OMP_WAIT_POLICY`` once, when its runtime loads
with torch, and the `lily-lab` entry point has imported ``lily_lab`` — and so torch — before
``main`` runs. Setting the variable then changes nothing, so the command line replaces its process
once (``os.execve``: ``python -m lily_lab.app.cli`` and the same arguments) with the variable set,
at the price of one more start-up. Because the variable is then set, it restarts at most once. A call
of ``main(argv)`` from Python is never restarted: that process is not the command's to replace.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys

from ..core.errors import check_positive_int

COMMAND_MODULE = "lily_lab.app.cli"  # what the restart runs with `python -m`


def threads_for_the_run(fn):
    """Run ``fn`` with torch's intra-op thread count set to its ``threads`` argument (checked: an
    integer ≥ 1), and put the caller's count back afterwards, also when ``fn`` raises."""
    default = inspect.signature(fn).parameters["threads"].default

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        threads = check_positive_int(kwargs.get("threads", default), "threads")
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return run


def running_now() -> float:
    """Processes running or runnable right now besides this one (Linux ``/proc/stat``; the median
    of five looks 20 ms apart), or 0 where that cannot be read."""
    import statistics
    import time

    counts = []
    for _ in range(5):
        try:
            with open("/proc/stat") as f:
                line = next((ln for ln in f if ln.startswith("procs_running")), None)
        except OSError:
            return 0.0
        if line is None:
            return 0.0
        counts.append(int(line.split()[1]) - 1)
        time.sleep(0.02)
    return statistics.median(counts)


def cores_are_busy() -> bool:
    """Whether other processes already keep every core busy: the 1-minute load average, or the
    processes running right now (:func:`running_now`), at least the core count."""
    cores = os.cpu_count() or 1
    try:
        if os.getloadavg()[0] >= cores:
            return True
    except OSError:  # no load average on this platform
        pass
    return running_now() >= cores


def idle_threads_sleep_when_busy(argv: list[str] | None) -> None:
    """On a busy machine, let torch's idle OpenMP threads sleep instead of spinning
    (``OMP_WAIT_POLICY=PASSIVE``): set before torch loads, else by restarting the command line
    once with it set; ``argv`` given (a call from Python): never restarted. The module docstring
    says why."""
    if "OMP_WAIT_POLICY" in os.environ or not cores_are_busy():
        return
    if "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    elif argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", COMMAND_MODULE, *sys.argv[1:]],
                  {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
