"""``make demo`` end to end: wall time of the whole command, run once in a subprocess.

The adapter goes to a temporary directory (``DEMO_ARGS=--out-dir …``). When ``.venv`` is not yet
installed for the current ``pyproject.toml``, ``make`` installs it first and that time counts
too (the row's note says so). Not run by ``--smoke``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ._common import Row, Settings, fmt_seconds, load_now

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 180.0  # seconds


def run(settings: Settings) -> list[Row]:
    what, target = "`make demo`, end to end", "< 3 min"
    if settings.smoke:
        return [Row(what, "—", target, "not run (--smoke)", "—", "—", None, "—")]
    if shutil.which("make") is None:
        return [Row(what, "—", target, "not run (no `make`)", "—", "—", None, "—")]
    # `make -n` prints what make would run: pip only when .venv is out of date (`venv` is phony).
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True).stdout
    up_to_date = "pip" not in dry
    load_start = load_now()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        done = subprocess.run(["make", "demo", f"DEMO_ARGS=--out-dir {tmp}/adapter"], cwd=ROOT,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"make demo failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    inner = re.search(r"done in ([0-9.]+) s", done.stdout)
    row = Row(what, "—", target, fmt_seconds(seconds), "—", "—", seconds < LIMIT, f"{load_start:.1f}→{load_now():.1f}")
    row.key = "make demo"
    if inner:
        row.notes.append(f"the demo itself reported {inner.group(1)} s; the rest is make, imports and start-up")
    if not up_to_date:
        row.notes.append(".venv was out of date: the time includes make installing it")
    return [row]
