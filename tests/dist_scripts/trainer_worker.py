"""transformers ``Trainer`` with a Lily model and a ``RoutingCallback``, in one or several processes.

    accelerate launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_ip 127.0.0.1 --main_process_port PORT \
        tests/dist_scripts/trainer_worker.py OUT_DIR

Each rank writes ``OUT_DIR/rank{r}.pt``: its adapter weights, how many observations its
callback kept, the wrapper Trainer trained through; rank 0 also its last observation
(``OUT_DIR/timeline_last.npz``). tests/test_distributed.py calls :func:`train` in its own process
with one rank and the whole global batch as the reference.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

torch.set_num_threads(1)

import common  # noqa: E402


class _Samples(torch.utils.data.Dataset):
    """The global batches of ``common.make_batches``, one sample per row, in order."""

    def __init__(self, batches):
        self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train(out: Path, per_device_batch: int) -> dict:
    from transformers import Trainer, TrainingArguments

    import lily_lab

    batches = common.make_batches()
    model = common.build_model("sequence")
    callback = lily_lab.RoutingCallback(probe=dict(batches[0]), every=2)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=per_device_batch, max_steps=common.STEPS,
            learning_rate=common.LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
            train_sampling_strategy="sequential",  # the same samples in each global batch as the reference
            ddp_find_unused_parameters=False,  # strict: a parameter without gradient would fail
            ddp_timeout=60, use_cpu=True, seed=0,
            # transformers 5 multiplies the loss by the number of processes for models whose forward
            # takes **kwargs, assuming they divide by the global label count; BERT classification
            # does not, so its gradients would come out world_size times too large.
            average_tokens_across_devices=False,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=_Samples(batches), callbacks=[callback])
        trainer.train()
        rank = args.process_index
    result = {
        "world": args.world_size, "wrapper": type(trainer.model_wrapped).__name__,
        "adapter": common.adapter_state(model), "observed_steps": list(callback.timeline.steps),
    }
    if callback.timeline.steps:
        callback.timeline.routings[-1].save(out / f"timeline_last_rank{rank}.npz")
    torch.save(result, out / f"rank{rank}.pt")
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    train(out, per_device_batch=common.GLOBAL_BATCH // common.WORLD)
