"""Models and inputs for the benchmarks: MiniLM (or a tiny random BERT for ``--smoke``) with Lily
from lily_lab, PEFT's ``lily`` tuner or PEFT LoRA on the same frozen base weights."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import lily_lab as ll

from ._common import Settings

TARGETS = ["query", "value"]


@dataclass(frozen=True)
class Shape:
    """The adapter and the batch a benchmark runs."""

    r: int
    stride_A: int
    num_B: int
    batch: int
    tokens: int


FULL = Shape(r=16, stride_A=2, num_B=4, batch=32, tokens=64)
SMOKE = Shape(r=4, stride_A=2, num_B=4, batch=4, tokens=8)


def shape_for(settings: Settings) -> Shape:
    return SMOKE if settings.smoke else FULL


def tiny_bert_config(layers: int = 2, hidden: int = 32):
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      intermediate_size=2 * hidden, num_labels=2)


def base_model(settings: Settings) -> tuple[nn.Module, str]:
    """A frozen sequence classifier in train mode and its name: MiniLM, or a tiny random BERT."""
    torch.manual_seed(0)
    if settings.smoke:
        from transformers import BertForSequenceClassification

        model, name = BertForSequenceClassification(tiny_bert_config()), "tiny random BERT"
    else:
        from lily_lab.app.demo import load_minilm

        model, name = load_minilm()[1], "MiniLM"
    model.requires_grad_(False)
    return model.to(settings.device, settings.torch_dtype).train(), name


def batch_for(model: nn.Module, settings: Settings, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch × tokens`` random token ids, right padding after a random length (≥ a quarter),
    and labels."""
    shape = shape_for(settings)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (shape.batch, shape.tokens), generator=g)
    lengths = torch.randint(max(shape.tokens // 4, 1), shape.tokens + 1, (shape.batch,), generator=g)
    mask = (torch.arange(shape.tokens)[None] < lengths[:, None]).long()
    labels = torch.randint(0, 2, (shape.batch,), generator=g)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(settings.device) for k, v in out.items()}


def with_lily(base: nn.Module, settings: Settings, routing: str) -> nn.Module:
    s = shape_for(settings)
    config = ll.LilyConfig(TARGETS, r=s.r, stride_A=s.stride_A, num_B=s.num_B, routing=routing, init_weights=False)
    return ll.add_lily(copy.deepcopy(base), config)


def with_peft_lily(base: nn.Module, settings: Settings) -> nn.Module:
    import peft

    s = shape_for(settings)
    config = peft.LilyConfig(target_modules=TARGETS, r=s.r, stride_A=s.stride_A, num_B=s.num_B, init_weights=False)
    return peft.get_peft_model(copy.deepcopy(base), config)


def with_peft_lora(base: nn.Module, r: int) -> nn.Module:
    import peft

    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=TARGETS, r=r, lora_dropout=0.0))


@torch.no_grad()
def copy_adapter(source: nn.Module, dest: nn.Module) -> None:
    """Copy every site's A, B and router from ``source`` into ``dest`` (both read through
    ``adapter_sites``, PEFT or lily_lab), so both sides start from the same weights."""
    theirs, mine = ll.adapter_sites(source), ll.adapter_sites(dest)
    names = lambda sites: [s.name.removeprefix("base_model.model.") for s in sites]  # noqa: E731
    assert names(theirs) == names(mine), "the two adapters put their sites in different places"
    for t, m in zip(theirs, mine):
        m.A.copy_(t.A)
        m.B.copy_(t.B)
        m.router.copy_(t.router)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer):
    """Forward with labels, backward, AdamW step, gradients freed: one training step."""
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss
