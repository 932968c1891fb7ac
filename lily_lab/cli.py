"""The `lily-lab` command. Subcommands import their heavy dependencies only when they run."""

from __future__ import annotations

import argparse
import sys

ROUTING_MODES = ("batch", "sequence", "token")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lily-lab", description="Lily adapters and tools to see what they learned.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a Lily adapter on MiniLM (tweet sentiment), save it, reload it, compare",
        description="Train a small Lily adapter on all-MiniLM-L6-v2's query/value projections for "
        "tweet sentiment (CPU, a few minutes at most), then save it, reload it into a fresh model "
        "and check the reloaded logits match.",
    )
    demo.add_argument("--steps", type=_positive_int, default=30, help="training steps (default 30)")
    demo.add_argument("--routing", choices=ROUTING_MODES, default="batch", help="router mixing mode (default batch)")
    demo.add_argument("--r", type=_positive_int, default=8, help="rank of the shared A projectors (default 8)")
    demo.add_argument("--stride-A", dest="stride_A", type=_positive_int, default=2,
                      help="consecutive layers sharing one A (default 2)")
    demo.add_argument("--num-B", dest="num_B", type=_positive_int, default=4, help="B experts in each bank (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, init and batch order (default 0)")
    demo.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    demo.add_argument("--out-dir", default="lily_lab_demo_adapter",
                      help="where the adapter and classifier head are saved (default lily_lab_demo_adapter)")
    demo.set_defaults(handler=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from lily_lab.demo import run_demo

    return run_demo(steps=args.steps, routing=args.routing, r=args.r, stride_A=args.stride_A,
                    num_B=args.num_B, seed=args.seed, lr=args.lr, out_dir=args.out_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
