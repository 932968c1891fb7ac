"""`lily-lab` argument parsing (the demo itself runs in `make demo`, not in the unit tests)."""

import pytest

from lily_lab.cli import build_parser


def test_demo_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.steps, args.routing, args.r, args.stride_A, args.num_B, args.seed) == (30, "batch", 8, 2, 4, 0)
    assert args.out_dir == "lily_lab_demo_adapter"


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
