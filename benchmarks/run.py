"""The benchmark suite: lily_lab side by side with its references, one markdown table.

    .venv/bin/python -m benchmarks                       # everything, CPU, ~10 min on 2 cores
    .venv/bin/python -m benchmarks --smoke               # tiny random models, seconds (make test runs it)
    .venv/bin/python -m benchmarks --only browser        # the dashboard's round trip in JupyterLab + Chromium
    .venv/bin/python -m benchmarks --only training,record
    .venv/bin/python -m benchmarks --only monitor       # RoutingMonitor's cost to a training step
    .venv/bin/python -m benchmarks --device cuda --dtype bf16

Each row runs its two sides in this one process, alternating them (A B A B …) after a warm-up;
the ratio is the median over repeats of lily_lab / reference. Torch uses ``--threads`` threads
(default 2). The 1-minute load average before and after each row is printed beside it: on a
shared machine, read a row measured under heavy load with care.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profiler's start/stop lines

import torch  # noqa: E402

from ._common import Row, Settings, load_now, table  # noqa: E402

SECTIONS = ["training", "record", "monitor", "llm", "spectra", "adapter_file", "widgets", "browser", "demo"]
# Not in a plain `--smoke` run (which `make test` runs): starting JupyterLab and Chromium takes
# ~30 s on 2 busy cores, and tests/test_browser.py drives the same page. `--smoke --only browser`
# runs it. `monitor` (bench_monitor.py, issue 17): `--smoke --only monitor` runs it; the plain smoke
# run's rows are the ones tests/test_benchmarks_smoke.py lists.
NOT_IN_SMOKE = {"browser", "monitor"}
WIDGET_PLACEHOLDER = "widget control update — see benchmarks/bench_widgets.py (issue 5)"


def machine(settings: Settings) -> str:
    """One line: cores, CPU model, torch, device."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    device = "no GPU"
    if settings.cuda:
        device = torch.cuda.get_device_name(torch.device(settings.device))
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__} with {settings.threads} threads, "
            f"{settings.device} {settings.dtype} ({device}), Python {platform.python_version()}")


def run_section(name: str, settings: Settings) -> list[Row]:
    if name == "widgets":
        if not (Path(__file__).parent / "bench_widgets.py").exists():
            return [Row(WIDGET_PLACEHOLDER, "—", "median < 50 ms", "not measured here")]
    module = importlib.import_module(f"benchmarks.bench_{name}")
    return module.run(settings)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random models and sizes, few repeats: checks the "
                    "suite runs and its side checks hold; its numbers mean nothing")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default 2; smoke 1: "
                    "tiny ops on a busy machine only lose to a second spinning thread)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 9, smoke 2; "
                    "record_routing takes 3×, the dense SVD at most 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per side first (default 2; smoke 1)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections of: {', '.join(SECTIONS)} (default: "
                    f"all; with --smoke all but {', '.join(sorted(NOT_IN_SMOKE))})")
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    args = ap.parse_args(argv)

    if args.only is None:
        sections = [s for s in SECTIONS if not (args.smoke and s in NOT_IN_SMOKE)]
    else:
        sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda asked for, but torch sees no CUDA device")
    settings = Settings(smoke=args.smoke, device=args.device, dtype=args.dtype, threads=args.threads or (1 if args.smoke else 2),
                        repeats=args.repeats or (2 if args.smoke else 9),
                        warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 2))
    torch.set_num_threads(settings.threads)

    started, load_start = time.perf_counter(), os.getloadavg()
    rows: list[Row] = []
    for name in sections:
        t0 = time.perf_counter()
        rows += run_section(name, settings)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s, load {load_now():.1f}]", file=sys.stderr, flush=True)
    load_end = os.getloadavg()

    lines = [
        f"machine: {machine(settings)}",
        f"load average (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in load_start)} at the start, "
        f"{', '.join(f'{x:.2f}' for x in load_end)} at the end; {time.perf_counter() - started:.0f} s in all",
        f"repeats {settings.repeats} per side after {settings.warmup} warm-up; ratio = median over repeats of "
        "lily_lab / reference" + ("; SMOKE RUN: tiny sizes, no targets judged" if settings.smoke else ""),
        "",
        table(rows, settings),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0
