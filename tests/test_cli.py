"""`lily-lab` argument parsing and start-up (the commands end to end: tests/test_commands.py)."""

import os

import pytest

import lily_lab as ll
from lily_lab.app.cli import build_parser


def test_demo_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.steps, args.r, args.stride_A, args.num_B, args.seed) == (30, 8, 2, 4, 0)
    assert args.out_dir == "lily_lab_demo_adapter"
    # None: the model kind's default (lily_lab.app.commands.ENCODER_DEFAULTS / CAUSAL_DEFAULTS)
    assert (args.routing, args.targets, args.lr, args.batch_size, args.n_train, args.n_heldout, args.causal_lm) == \
        (None,) * 7


def test_demo_routing_choices_are_the_cores_and_the_kind_flags_exclude_each_other(capsys):
    from lily_lab.core import ROUTING_MODES

    assert "causal" in ROUTING_MODES
    assert build_parser().parse_args(["demo", "--routing", "causal"]).routing == "causal"
    assert build_parser().parse_args(["demo", "--causal-lm"]).causal_lm is True
    assert build_parser().parse_args(["demo", "--encoder"]).causal_lm is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--causal-lm", "--encoder"])
    assert "not allowed with" in capsys.readouterr().err


def test_demo_options_reach_their_fields():
    args = build_parser().parse_args(
        ["demo", "--steps", "5", "--routing", "token", "--r", "4", "--stride-A", "3", "--num-B", "2",
         "--seed", "7", "--out-dir", "x"]
    )
    assert (args.steps, args.routing, args.r, args.stride_A, args.num_B, args.seed, args.out_dir) == (
        5, "token", 4, 3, 2, 7, "x"
    )


@pytest.mark.parametrize("argv", [[], ["demo", "--routing", "expert"], ["demo", "--steps", "0"], ["demo", "--r", "x"]])
def test_bad_command_lines_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "usage: lily-lab" in capsys.readouterr().err


def test_idle_threads_sleep_only_when_the_cores_are_busy(monkeypatch):
    import os
    import sys

    from lily_lab.app import runtime

    restarts = []
    monkeypatch.setattr(os, "execve", lambda exe, args, env: restarts.append((exe, args, env)))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(sys, "argv", ["lily-lab", "demo", "--steps", "3"])

    def policy(load, argv=None, preset=None, torch_loaded=True, running=0):
        restarts.clear()
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        if preset:
            monkeypatch.setenv("OMP_WAIT_POLICY", preset)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(runtime, "running_now", lambda: running)
        modules = dict(sys.modules)
        if torch_loaded:
            modules["torch"] = sys  # any module object: "torch is already imported"
        else:
            modules.pop("torch", None)
        monkeypatch.setattr(sys, "modules", modules)
        runtime.idle_threads_sleep_when_busy(argv)
        return os.environ.get("OMP_WAIT_POLICY")

    assert policy(0.5) is None and policy(1.9) is None and not restarts  # idle enough: spin, faster
    assert policy(2.0) is None  # busy, torch loaded: the command restarts itself with PASSIVE set
    (exe, args, env), = restarts
    assert exe == sys.executable and args == [sys.executable, "-m", "lily_lab.app.cli", "demo", "--steps", "3"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert policy(2.0, torch_loaded=False) == "PASSIVE" and not restarts  # torch not loaded yet: just set it
    assert policy(5.0, preset="ACTIVE") == "ACTIVE" and not restarts  # the user's choice stays
    assert policy(5.0, argv=["demo"]) is None and not restarts  # called from Python: never restarted
    assert policy(0.5, torch_loaded=False, running=2) == "PASSIVE"  # busy now, before the average knows


def test_running_now_counts_other_busy_processes():
    import subprocess
    import sys

    from lily_lab.app import runtime

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat on this platform")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        import time

        time.sleep(0.5)
        assert runtime.running_now() >= 2  # three spinners on however many cores: most are running
    finally:
        for p in spinners:
            p.kill()


@pytest.mark.parametrize("command", ["run_demo", "run_report"])
def test_the_commands_use_their_thread_count_and_give_the_callers_back(command, monkeypatch, tmp_path):
    """A notebook that calls run_demo / run_report keeps its own torch thread count afterwards,
    also when the command fails; during the command, the command's count holds."""
    import torch

    from lily_lab.app import commands

    seen = []

    def out_path(out):
        seen.append(torch.get_num_threads())
        raise ll.InputError("stop here")

    monkeypatch.setattr(commands, "check_out_path", out_path)
    before = torch.get_num_threads()
    mine = 1 if before != 1 else 2
    torch.set_num_threads(mine)
    try:
        run = getattr(commands, command)
        with pytest.raises(ll.InputError, match="stop here"):
            run(threads=3) if command == "run_demo" else run(tmp_path, threads=3)
        assert seen == [3] and torch.get_num_threads() == mine
    finally:
        torch.set_num_threads(before)
