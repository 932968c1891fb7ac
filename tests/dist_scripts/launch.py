"""Launching the 2-process workers from a test: the exact torchrun / accelerate launch commands,
a free port on 127.0.0.1, and a process group killed as a whole when a run overstays."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT = 100  # seconds per launch; a hung collective also fails inside (common.TIMEOUT)
WORLD = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str, module: list[str]) -> list[str]:
    """The console script beside this Python (``torchrun``, ``accelerate``), else ``python -m``."""
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", *module]


def torchrun_command(script: Path, out: Path, port: int) -> list[str]:
    return [*_tool("torchrun", ["torch.distributed.run"]), "--nproc_per_node", str(WORLD),
            "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), str(out)]


def accelerate_command(script: Path, out: Path, port: int) -> list[str]:
    # --multi_gpu is accelerate's multi-process (torchrun) launcher; with no GPU, or with
    # TrainingArguments(use_cpu=True) as in the worker, the processes run on the CPU over gloo.
    return [*_tool("accelerate", ["accelerate.commands.accelerate_cli"]), "launch", "--multi_gpu",
            "--num_processes", str(WORLD), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            str(script), str(out)]


def launch(build, script: Path, out: Path) -> dict:
    """Run ``build(script, out, port)`` (a 2-process launch) and return each rank's ``rank{r}.pt``.
    The launcher and its workers run in a session of their own, killed together on timeout. A
    port taken between finding it free and binding it gets one retry with another."""
    for attempt in range(2):
        command = build(script, out, free_port())
        returncode, output = _run(command, out)
        if returncode == 0 or "address already in use" not in output.lower() or attempt:
            break
    if returncode != 0:
        pytest.fail(f"{' '.join(command)} exited {returncode}:\n{output[-6000:]}")
    return {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}


def _run(command: list[str], out: Path) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(out / "hf_home"),  # no user accelerate config can change the launch
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback, whatever the host name resolves to
    log = out / "launch.log"  # a file, not a pipe: a lingering worker cannot keep the test waiting
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            pytest.fail(f"{' '.join(command)} did not finish in {LAUNCH_TIMEOUT} s:\n{log.read_text()[-4000:]}")
    return proc.returncode, log.read_text()


def _kill_tree(pid: int) -> None:
    """Kill the launcher and every process under it (torchrun starts its workers in sessions of
    their own, so killing the launcher's process group alone would leave them running)."""
    try:
        import psutil
    except ImportError:
        os.killpg(pid, signal.SIGKILL)
        return
    try:
        parent = psutil.Process(pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
