"""What the multi-process tests and their single-process references share: a tiny Lily model, the
data, the training step, and how to read adapter weights out of a wrapped model.

Imported by the worker scripts (launched with torchrun / accelerate launch) and by
tests/test_distributed.py, so both sides build bit-identical models and batches.
"""

from __future__ import annotations

import datetime
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import lily_lab

TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
WORLD = 2  # processes in every multi-process test
GLOBAL_BATCH = 8  # sequences per optimizer step, all ranks together
SEQ_LEN = 8
STEPS = 4
LR = 100.0  # large: the tiny adapter moves ~1e-2 in 4 steps, far above the 1e-5 tolerance
TIMEOUT = datetime.timedelta(seconds=60)  # a hung collective fails the run instead of hanging it


def lily_config(routing: str) -> lily_lab.LilyConfig:
    # stride_A=2: each A is shared by two layers, B by all four; random B so that routers and A
    # get gradients from the first step.
    return lily_lab.LilyConfig(["query", "value"], r=4, stride_A=2, num_B=3, routing=routing, init_weights=False)


def build_model(routing: str = "sequence", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 4-layer BertForSequenceClassification (hidden 32) with Lily on query and value."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=2))
    lily_lab.add_lily(model, lily_config(routing))
    return model.to(dtype)


def make_batches(steps: int = STEPS, batch: int = GLOBAL_BATCH, seed: int = 1) -> list[dict]:
    """``steps`` global batches: ``input_ids``, ``attention_mask`` (some rows padded), ``labels``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, TINY_BERT["vocab_size"], (batch, SEQ_LEN), generator=g)
        lengths = torch.randint(3, SEQ_LEN + 1, (batch,), generator=g)
        mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (batch,), generator=g)})
    return out


def shard(batch: dict, rank: int, world: int = WORLD) -> dict:
    """Rank ``rank``'s contiguous slice of a global batch (what a DistributedSampler-like split gives)."""
    n = len(batch["input_ids"]) // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}


def train_step(model, optimizer, batch: dict) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_reference(routing: str, batches: list[dict], *, shards: int = 1, seed: int = 0) -> dict:
    """One process. ``shards=1``: each global batch is one forward call. ``shards=k``: each is cut
    into k forward calls whose mean loss is minimised — what k DDP ranks compute together."""
    model = build_model(routing, seed).train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for batch in batches:
        loss = sum(model(**shard(batch, k, shards)).loss for k in range(shards)) / shards
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return adapter_state(model)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by their name in the unwrapped model (shared tensors once), full
    tensors even when FSDP sharded them; float32 on the CPU."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        t = p.detach()
        if hasattr(t, "full_tensor"):  # an FSDP2 DTensor shard
            t = t.full_tensor()
        out[_clean(name)] = t.float().cpu().clone()
    return out


def _clean(name: str) -> str:
    for prefix in ("module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def max_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def recording_calls(rank: int | None = None, world: int = WORLD) -> list[dict]:
    """The forward calls of the recording test: 3 calls of 4 sequences per rank. ``rank=None``
    gives every rank's calls in rank order (the single-process reference)."""
    g = torch.Generator().manual_seed(7)
    calls = []
    for r in range(world):
        for _ in range(3):
            ids = torch.randint(1, TINY_BERT["vocab_size"], (4, SEQ_LEN), generator=g)
            lengths = torch.randint(2, SEQ_LEN + 1, (4,), generator=g)
            mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
            labels = [["pos", "neg", "neutral"][int(i)] for i in torch.randint(0, 3, (4,), generator=g)]
            calls.append({"rank": r, "input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return [c for c in calls if rank is None or c["rank"] == rank]
