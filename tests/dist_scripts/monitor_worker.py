"""``RoutingCallback`` on training traffic (no probe) under a transformers ``Trainer``, in one or
several processes: what each rank's logs hold, what rank 0's timeline holds, and stopping.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_ip 127.0.0.1 --main_process_port PORT \
        tests/dist_scripts/monitor_worker.py OUT_DIR

Each rank writes ``OUT_DIR/rank{r}.pt``: for every scenario of :data:`SCENARIOS`, the log dicts
its callbacks were handed, the Trainer's ``log_history``, the rows each of its training forwards
saw, its final ``global_step``, and (its timeline being rank 0's alone) the token counts of every
observation. ``OUT_DIR/<scenario>/`` is the shared ``output_dir`` (where ``lily_timeline.npz``
goes). tests/test_distributed_monitor.py calls :func:`run` in its own process with one rank and
the whole global batch (``per_device_batch=GLOBAL_BATCH``) as the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import common  # noqa: E402

import lily_lab  # noqa: E402

GLOBAL_BATCH = common.GLOBAL_BATCH  # 8 rows per optimizer step, all ranks together
LOGGING_STEPS = 2
N_ROWS = 32  # 4 global batches; longer runs cycle through them again
#: name → (healthy model?, learning rate, max_steps, RoutingCallback options)
SCENARIOS = {
    "exact": (True, 0.0, 4, {}),  # lr=0: the same weights in every run, so the same routing
    "trained": (True, 10.0, 4, {}),  # lr>0: DDP's averaged gradients equal one process's up to rounding
    "stop": (False, 0.0, 10, {"warn_after": 1, "stop_on": "critical"}),  # identical experts: critical at once
}


def build_model(healthy: bool = True, seed: int = 0):
    """A 4-layer BertForSequenceClassification (hidden 32, no dropout: the same rows route the same
    in every run) with token-routed Lily on query and value, random B. ``healthy``: a router sharp
    enough that routing depends on the input; else every bank's experts are one and the same."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**common.TINY_BERT, num_labels=2))
    lily_lab.add_lily(model, lily_lab.LilyConfig(["query", "value"], r=4, num_B=3, routing="token",
                                                 init_weights=False))
    with torch.no_grad():
        for site in lily_lab.adapter_sites(model):
            if healthy:
                site.router.mul_(5.0)
            else:
                site.B.copy_(site.B[:1].expand_as(site.B))
    return model


def make_rows(n: int = N_ROWS, seq_len: int = common.SEQ_LEN, seed: int = 1) -> list[dict]:
    """``n`` fixed samples (``input_ids``, ``attention_mask`` with some padding, ``labels``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, seq_len + 1, (1,), generator=g))
        mask = (torch.arange(seq_len) < length).long()
        ids = torch.randint(1, common.TINY_BERT["vocab_size"], (seq_len,), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (), generator=g)})
    return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class CountingTimeline(lily_lab.Timeline):
    """A Timeline that counts its saves (the callback saves whatever timeline it was given)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saves = 0

    def save(self, *args, **kwargs):
        self.saves += 1
        return super().save(*args, **kwargs)


def _capture_class():
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        """Placed after RoutingCallback: a copy of every log dict as the callbacks are handed it."""

        def __init__(self):
            self.logs = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({"step": state.global_step, **(logs or {})})

    return Capture


def run(scenario: str, output_dir: Path, per_device_batch: int) -> dict:
    """Train one scenario (``output_dir`` shared by every rank) and say what this rank saw."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    healthy, lr, max_steps, options = SCENARIOS[scenario]
    model = build_model(healthy)
    seen: list[list[list[int]]] = []  # per training forward: its rows' input_ids

    def record_rows(module, args, kwargs):
        if module.training:
            seen.append(kwargs["input_ids"].tolist())

    hook = model.register_forward_pre_hook(record_rows, with_kwargs=True)
    timeline = CountingTimeline(track_experts=True)
    callback = lily_lab.RoutingCallback(timeline=timeline, **options)
    capture = _capture_class()()
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=per_device_batch, max_steps=max_steps,
        learning_rate=lr, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        train_sampling_strategy="sequential",  # each global batch: the same 8 rows as one process's batch
        ddp_timeout=60, use_cpu=True, seed=0,
        average_tokens_across_devices=False,  # see trainer_worker.py: BERT classification's loss is a mean
        report_to=[], save_strategy="no", logging_steps=LOGGING_STEPS, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(make_rows()), callbacks=[callback, capture])
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's printing of every log: noise in the launch log
    order = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    trainer.train()
    hook.remove()
    return {
        "rank": args.process_index, "world": args.world_size, "global_step": trainer.state.global_step,
        "callback_order": order, "logs": capture.logs, "log_history": list(trainer.state.log_history),
        "rows_seen": seen, "timeline_steps": list(timeline.steps), "timeline_saves": timeline.saves,
        "timeline_tokens": [{s: r.record(s).n_tokens for s in r.sites} for r in timeline.routings],
        "warnings": [(w.kind, w.severity, w.step) for w in callback.warnings],
        "adapter": common.adapter_state(model),
    }


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    results = {name: run(name, out / name, per_device_batch=GLOBAL_BATCH // common.WORLD) for name in SCENARIOS}
    torch.save(results, out / f"rank{results['exact']['rank']}.pt")
