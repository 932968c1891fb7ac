"""The `lily-lab` command. Subcommands import their heavy dependencies only when they run; the
command's thread choices are lily_lab/app/runtime.py's."""

from __future__ import annotations

import argparse
import sys

from ..core import ROUTING_MODES
from . import runtime


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
        help="train a Lily adapter (MiniLM on tweet sentiment, or a causal LM answering in chat), save, reload, compare",
        description="Train a small Lily adapter for tweet sentiment (CPU, a few minutes at most), then save it, "
        "reload it into a fresh model and check the reloaded logits match. An encoder (default: the packaged "
        "all-MiniLM-L6-v2) gets a new classification head. A causal LM (--model smollm2, the packaged "
        "SmolLM2-135M-Instruct, or a folder whose config names a …ForCausalLM / …LMHeadModel, or --causal-lm) "
        "learns to answer a chat prompt with the label word: zero-shot and trained held-out accuracy from the "
        "answers' log-probabilities, routers recorded while it generates its answers.",
    )
    demo.add_argument("--steps", type=_positive_int, default=30, help="training steps (default 30)")
    demo.add_argument("--routing", choices=ROUTING_MODES, default=None,
                      help="router mixing mode (default batch; causal for causal LMs)")
    demo.add_argument("--r", type=_positive_int, default=8, help="rank of the shared A projectors (default 8)")
    demo.add_argument("--stride-A", dest="stride_A", type=_positive_int, default=2,
                      help="consecutive layers sharing one A (default 2)")
    demo.add_argument("--num-B", dest="num_B", type=_positive_int, default=4, help="B experts in each bank (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data split, init and batch order (default 0)")
    demo.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-3; 2e-3 for causal LMs)")
    demo.add_argument("--batch-size", type=_positive_int, default=None,
                      help="training batch size (default 16; 8 for causal LMs)")
    demo.add_argument("--n-train", type=_positive_int, default=None,
                      help="training texts (default 2048; 512 for causal LMs, to fit 2 CPU cores)")
    demo.add_argument("--n-heldout", type=_positive_int, default=None,
                      help="held-out texts (default 512; 128 for causal LMs)")
    demo.add_argument("--out-dir", default="lily_lab_demo_adapter",
                      help="where the adapter (and an encoder's classifier head) is saved (default lily_lab_demo_adapter)")
    demo.add_argument("--out", default="lily_lab_report.html", help="the HTML report (default lily_lab_report.html)")
    demo.add_argument("--targets", default=None,
                      help="comma-separated target module names (default query,value; q_proj,v_proj for causal LMs "
                      "— a GPT-2 base needs c_attn)")
    kind = demo.add_mutually_exclusive_group()
    kind.add_argument("--causal-lm", dest="causal_lm", action="store_const", const=True, default=None,
                      help="load --model as a causal LM (default: when its config names a …ForCausalLM or "
                      "…LMHeadModel architecture, or --model smollm2)")
    kind.add_argument("--encoder", dest="causal_lm", action="store_const", const=False,
                      help="load --model as an encoder with a new classification head (an error for a causal LM)")
    _data_options(demo, label_default="label",
                  model_help="a local transformers model directory, or smollm2 for the packaged SmolLM2-135M-Instruct "
                  "(default: the packaged all-MiniLM-L6-v2)")
    demo.set_defaults(handler=_demo)

    report = commands.add_parser(
        "report", help="analyse a saved adapter (lily_lab, PEFT Lily or PEFT LoRA) on data; write an HTML report",
        description="Load ADAPTER_DIR onto the model, record its routers on the data and write one self-contained "
        "HTML report (routers, experts, spectra, diagnosis). Reads only safetensors and JSON.")
    report.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a directory written by save_adapter or PEFT")
    report.add_argument("--out", default="lily_lab_report.html", help="the HTML report (default lily_lab_report.html)")
    report.add_argument("--texts", type=_positive_int, default=512, help="how many texts to record (default 512)")
    report.add_argument("--seed", type=int, default=0, help="seed for picking the texts (default 0)")
    report.add_argument("--causal-lm", action="store_true", help="load --model as a causal LM (default: when its "
                        "config names a …ForCausalLM or …LMHeadModel architecture)")
    _data_options(report, label_default=None,
                  model_help="the adapter's base: a local transformers model directory, or smollm2 for the packaged "
                  "SmolLM2-135M-Instruct (default: the packaged all-MiniLM-L6-v2)")
    report.set_defaults(handler=_report)
    return parser


def _data_options(parser: argparse.ArgumentParser, label_default: str | None, model_help: str | None = None) -> None:
    parser.add_argument("--model", dest="model_dir", default=None,
                        help=model_help or "a local transformers model directory (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--data", default=None, help="a CSV of texts (default: the packaged tweets)")
    parser.add_argument("--text-column", default="text", help="the CSV's text column (default text)")
    parser.add_argument("--label-column", default=label_default,
                        help=f"the CSV's label column (default {label_default or 'none'})")


def _demo(args: argparse.Namespace) -> int:
    from .commands import run_demo

    return run_demo(steps=args.steps, routing=args.routing, r=args.r, stride_A=args.stride_A,
                    num_B=args.num_B, seed=args.seed, out_dir=args.out_dir, out=args.out,
                    model_dir=args.model_dir, data=args.data, text_column=args.text_column,
                    label_column=args.label_column, lr=args.lr, batch_size=args.batch_size, n_train=args.n_train,
                    n_heldout=args.n_heldout, causal_lm=args.causal_lm,
                    targets=[t for t in args.targets.split(",") if t] if args.targets else None)


def _report(args: argparse.Namespace) -> int:
    from .commands import run_report

    return run_report(args.adapter_dir, model_dir=args.model_dir, data=args.data, text_column=args.text_column,
                      label_column=args.label_column, out=args.out, n_texts=args.texts, seed=args.seed,
                      causal_lm=args.causal_lm)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runtime.idle_threads_sleep_when_busy(argv)  # OMP_WAIT_POLICY: lily_lab/app/runtime.py
    try:
        return args.handler(args)
    except Exception as err:  # noqa: BLE001 — bad input: one line, exit 2, no traceback
        from ..core.errors import LilyLabError

        if not isinstance(err, (LilyLabError, OSError, ValueError, KeyError)):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"lily-lab: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
