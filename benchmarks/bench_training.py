"""Training steps side by side: lily_lab's Lily against PEFT's ``lily`` tuner and PEFT LoRA.

One step is forward (with labels: the classifier's cross-entropy), backward and an AdamW step over
the adapter's parameters (the base model and its head stay frozen), on MiniLM with Lily on query
and value, r = 16, stride_A = 2, num_B = 4, a batch of 32 × 64 tokens with random right padding.
PEFT's tuner routes by batch only; the sequence and token rows compare against it all the same.
"""

from __future__ import annotations

import copy
import statistics

import torch

import lily_lab as ll
from lily_lab.app.demo import lora_parameter_count, lora_rank_for_budget

from ._common import LoadWindow, Row, Settings, alternate_pairs, fmt_bytes, median_ratio, peak_memory, timing_row
from ._models import base_model, batch_for, copy_adapter, shape_for, train_step, trainable, with_lily, \
    with_peft_lily, with_peft_lora

ROWS = [
    # (routing, reference, target text, limit)
    ("batch", "PEFT `lily`, same config", "≤ 1.00×", 1.00),
    ("sequence", "PEFT `lily`", "≤ 1.10×", 1.10),
    ("token", "PEFT `lily`", "≤ 1.5×", 1.5),
]
MEMORY_LIMIT = 1.3
LORA_LIMIT = 1.15


def _tolerance(settings: Settings) -> float:
    return 2e-2 if settings.dtype == "bf16" else 1e-5


@torch.no_grad()
def _eval_loss(model, batch) -> float:
    was = model.training
    model.eval()  # no dropout: the two sides must see the same function
    try:
        return model(**batch).loss.float().item()
    finally:
        model.train(was)


def check_same_loss(peft_model, ours, batch, settings: Settings, equal_experts: bool) -> tuple[float, float]:
    """lily_lab and PEFT give the same loss on the same weights (raises if not).

    For sequence and token routing, whose mixtures PEFT cannot compute, every expert of both banks
    is first set to the first one (on copies): then any mixture gives PEFT's ΔW.
    """
    theirs, mine = (copy.deepcopy(peft_model), copy.deepcopy(ours)) if equal_experts else (peft_model, ours)
    if equal_experts:
        with torch.no_grad():
            for site in ll.adapter_sites(theirs) + ll.adapter_sites(mine):
                site.B.copy_(site.B[:1].expand_as(site.B))
    a, b = _eval_loss(mine, batch), _eval_loss(theirs, batch)
    if not abs(a - b) <= _tolerance(settings) * max(1.0, abs(b)):
        raise AssertionError(f"lily_lab loss {a!r} differs from PEFT's {b!r} on the same weights "
                             f"(routing {mine_routing(mine)}, equal experts: {equal_experts})")
    return a, b


def mine_routing(model) -> str:
    return next(m.routing for m in model.modules() if isinstance(m, ll.LilyLayer))


def run(settings: Settings) -> list[Row]:
    base, name = base_model(settings)
    batch = batch_for(base, settings)
    shape = shape_for(settings)
    size = f"{name}, Lily on q,v, r = {shape.r}, stride {shape.stride_A}, num_B {shape.num_B}, " \
           f"batch {shape.batch} × {shape.tokens}"

    peft_lily = with_peft_lily(base, settings)
    peft_opt = torch.optim.AdamW(trainable(peft_lily), lr=1e-4)
    rows, models = [], {}
    for routing, reference, target, limit in ROWS:
        ours = with_lily(base, settings, routing)
        copy_adapter(peft_lily, ours)
        check_same_loss(peft_lily, ours, batch, settings, equal_experts=routing != "batch")
        opt = torch.optim.AdamW(trainable(ours), lr=1e-4)
        models[routing] = (ours, opt)
        with LoadWindow() as load:
            pairs = alternate_pairs(lambda: train_step(ours, batch, opt),
                                    lambda: train_step(peft_lily, batch, peft_opt), settings)
        what = (f"training step (forward, backward, AdamW), {size}, {routing} routing" if routing == "batch"
                else f"same, {routing} routing")
        rows.append(timing_row(what, reference, target, limit, pairs, load, settings))
        rows[-1].key = f"{routing} routing"

    # LoRA of the same budget on the same sites: ⌊Lily parameters / Σ (d_in + d_out)⌋.
    ours, opt = models["batch"]
    n_lily = ll.count_parameters(ours)["adapter"]
    dims = [(s.d_in, s.d_out) for s in ll.adapter_sites(ours)]
    lora_r = lora_rank_for_budget(n_lily, dims)
    lora = with_peft_lora(base, lora_r)
    n_lora = sum(p.numel() for p in trainable(lora))
    assert n_lora == lora_parameter_count(lora_r, dims) <= n_lily < lora_parameter_count(lora_r + 1, dims), \
        f"LoRA rank {lora_r} ({n_lora} parameters) is not the closest budget to Lily's {n_lily}"
    lora_opt = torch.optim.AdamW(trainable(lora), lr=1e-4)
    with LoadWindow() as load:
        pairs = alternate_pairs(lambda: train_step(ours, batch, opt), lambda: train_step(lora, batch, lora_opt),
                                settings)
    row = timing_row("same (batch routing), against LoRA with equal trainable parameters",
                     f"PEFT LoRA r = {lora_r}", "≤ 1.15×", LORA_LIMIT, pairs, load, settings)
    row.key = "LoRA row"
    row.notes.insert(0, f"trainable parameters: Lily {n_lily:,}, LoRA r = {lora_r} {n_lora:,}")
    rows.append(row)
    del lora, lora_opt

    rows.append(memory_row(models["token"], (peft_lily, peft_opt), batch, settings))
    rows.append(layers_row(settings))
    return rows


def layers_row(settings: Settings) -> Row:
    """The adapter alone, without a transformer around it: a stack of six d × d linear layers
    (MiniLM's d = 384) with Lily on each (batch routing, the same r, stride and num_B), forward
    and backward of a batch × tokens input, against PEFT ``lily`` on the same stack and weights.
    In a MiniLM step the frozen base model's work is the same on both sides and dominates; this
    row shows the part that differs."""
    import peft

    shape, d = shape_for(settings), (32 if settings.smoke else 384)
    torch.manual_seed(0)
    stack = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Tanh()) for _ in range(6)])
    stack = stack.to(settings.device, settings.torch_dtype).requires_grad_(False)
    targets = r"\d\.0"  # the six Linear layers
    options = dict(r=shape.r, stride_A=shape.stride_A, num_B=shape.num_B, init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(stack), peft.LilyConfig(target_modules=targets, **options))
    ours = ll.add_lily(copy.deepcopy(stack), ll.LilyConfig(targets, **options))
    copy_adapter(theirs, ours)
    x = torch.randn(shape.batch, shape.tokens, d, generator=torch.Generator().manual_seed(0))
    x = x.to(settings.device, settings.torch_dtype)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    if not torch.allclose(a.float(), b.float(), rtol=_tolerance(settings), atol=_tolerance(settings)):
        raise AssertionError(f"lily_lab's stack differs from PEFT's by {(a - b).abs().max().item():.2e}")

    def step(model):
        model(x).sum().backward()
        for p in trainable(model):
            p.grad = None

    with LoadWindow() as load:
        pairs = alternate_pairs(lambda: step(ours), lambda: step(theirs), settings, repeats=3 * settings.repeats)
    row = timing_row(f"the adapter alone: 6 stacked {d} × {d} linear layers with Lily (batch routing), "
                     f"forward + backward, {shape.batch} × {shape.tokens}", "PEFT `lily`, same stack and weights",
                     "—", float("inf"), pairs, load, settings)
    row.ok, row.key = None, "adapter alone"
    return row


def memory_row(ours_and_opt, peft_and_opt, batch, settings: Settings) -> Row:
    """Peak allocated bytes of one training step, token routing against PEFT ``lily``."""
    (ours, opt), (theirs, their_opt) = ours_and_opt, peft_and_opt
    repeats = 3
    mine, ref = [], []
    with LoadWindow() as load:
        for i in range(repeats):  # deterministic up to allocator timing; alternate anyway
            sides = [(ours, opt, mine), (theirs, their_opt, ref)]
            for model, o, out in sides if i % 2 == 0 else sides[::-1]:
                out.append(peak_memory(lambda: train_step(model, batch, o), settings))
    ratio = median_ratio(mine, ref)
    how = "torch.cuda.max_memory_allocated" if settings.cuda else "torch.profiler allocator events (CPU)"
    row = Row("peak memory of a training step, token routing", "PEFT `lily`", "≤ 1.3×",
              fmt_bytes(statistics.median(mine)), fmt_bytes(statistics.median(ref)), f"{ratio:.2f}×",
              None if settings.smoke else ratio <= MEMORY_LIMIT, str(load))
    row.key = "peak memory"
    row.notes.append(f"peak tensor bytes allocated during one step above those live at its start, from {how}")
    return row
