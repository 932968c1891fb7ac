"""Lily on a causal LM: SmolLM2-135M-Instruct (``lily_lab.app.llm.load_smollm2``; a tiny random Llama
for ``--smoke``), Lily on ``q_proj`` and ``v_proj`` with r = 8, stride_A = 2, num_B = 4,
``init_weights=False`` on both sides of every comparison.

Rows:

1. a training step (forward with the LM loss, backward, AdamW, zero_grad), batch 8 × 128 with
   random right padding, lily_lab (batch routing) against PEFT's ``lily`` tuner on the same
   weights;
2. the same lily_lab step under ``causal`` and under ``token`` routing against ``batch``;
3. greedy ``generate`` (4 prompts × 32 new tokens, causal routing) inside a ``record_routing``
   block against the same ``generate`` without one;
4. the host memory ``record_routing`` holds over ~10,000 generated tokens (ten ``generate``
   calls in one block): after the last call against after the first.

Rows 1 and 2 share one round robin: each repeat runs the four steps (PEFT, batch, causal, token)
once, in an order rotated from repeat to repeat; a row's ratio is the median over repeats of the
per-repeat ratio of its two sides. The three lily_lab modes are one model whose routing is
switched (``set_lily_options``, outside the timed call) before its step.
"""

from __future__ import annotations

import copy
import gc
import statistics
import tracemalloc
from dataclasses import dataclass

import torch

import lily_lab as ll

from ._common import LoadWindow, Pairs, Row, Settings, alternate_pairs, fmt_bytes, timed, timing_row
from ._models import copy_adapter, train_step, trainable
from .bench_training import check_same_loss

TARGETS = ["q_proj", "v_proj"]
ADAPTER = dict(r=8, stride_A=2, num_B=4, init_weights=False)
PEFT_LIMIT, MODE_LIMIT, RECORD_LIMIT, MEMORY_LIMIT = 1.00, 1.10, 1.05, 1.05


@dataclass(frozen=True)
class Sizes:
    """The batches and generations the rows run."""

    batch: int  # training batch: sequences × tokens
    tokens: int
    prompts: int  # row 3: prompts × prompt tokens, new tokens each
    prompt_tokens: int
    new_tokens: int
    memory_calls: int  # row 4: generate calls in one recording block, each prompts × new tokens
    memory_prompts: int
    memory_new: int
    memory_max_tokens: int  # the recorder's max_tokens in row 4


FULL = Sizes(batch=8, tokens=128, prompts=4, prompt_tokens=16, new_tokens=32,
             memory_calls=10, memory_prompts=32, memory_new=32, memory_max_tokens=1000)
SMOKE = Sizes(batch=2, tokens=16, prompts=2, prompt_tokens=6, new_tokens=4,
              memory_calls=10, memory_prompts=8, memory_new=16, memory_max_tokens=100)


def sizes_for(settings: Settings) -> Sizes:
    return SMOKE if settings.smoke else FULL


def tiny_llama():
    """A tiny random LlamaForCausalLM (the smoke run's stand-in for SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def base_lm(settings: Settings):
    """A frozen causal LM and its name: SmolLM2-135M-Instruct, or a tiny random Llama."""
    torch.manual_seed(0)
    if settings.smoke:
        model, name = tiny_llama(), "tiny random Llama"
    else:
        from lily_lab.app.llm import load_smollm2

        model, name = load_smollm2()[1], "SmolLM2-135M-Instruct"
    model.requires_grad_(False)
    return model.to(settings.device, settings.torch_dtype).eval(), name


def lm_batch(model, settings: Settings, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch × tokens`` random token ids, right padding after a random length (≥ half), labels
    the ids with -100 on the padding."""
    s = sizes_for(settings)
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (s.batch, s.tokens), generator=g)
    lengths = torch.randint(s.tokens // 2, s.tokens + 1, (s.batch,), generator=g)
    mask = (torch.arange(s.tokens)[None] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.to(settings.device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def prompts_for(model, settings: Settings, n: int, tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return torch.randint(min(1000, vocab // 2), vocab, (n, tokens), generator=g).to(settings.device)


def generate(model, prompts: torch.Tensor, new_tokens: int):
    """Greedy generation of exactly ``new_tokens`` per prompt (EOS held off), with the KV cache."""
    return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0)


def round_robin(sides: dict, settings: Settings, repeats: int | None = None,
                warmup: int | None = None) -> dict[str, tuple[list[float], list[float]]]:
    """Time several sides: ``sides`` maps a name to ``(setup, fn)``; each repeat calls every
    ``setup()`` (untimed) then ``fn()`` (timed), the order rotated by one each repeat. Returns
    ``name → (wall seconds, process CPU seconds)`` per repeat."""
    repeats = settings.repeats if repeats is None else repeats
    warmup = settings.warmup if warmup is None else warmup
    names = list(sides)
    for _ in range(warmup):
        for name in names:
            setup, fn = sides[name]
            setup()
            fn()
    gc.collect()
    out = {name: ([], []) for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            setup, fn = sides[name]
            setup()
            seconds, cpu_seconds = timed(fn, settings)
            out[name][0].append(seconds)
            out[name][1].append(cpu_seconds)
    return out


def _pairs(times: dict, a: str, b: str) -> Pairs:
    return Pairs(wall_a=times[a][0], wall_b=times[b][0], cpu_a=times[a][1], cpu_b=times[b][1])


def run(settings: Settings) -> list[Row]:
    import peft

    base, name = base_lm(settings)
    s = sizes_for(settings)
    config = ", ".join(f"{k} {v}" for k, v in (("r", ADAPTER["r"]), ("stride", ADAPTER["stride_A"]),
                                               ("num_B", ADAPTER["num_B"])))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(target_modules=TARGETS, **ADAPTER)).train()
    ours = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(TARGETS, routing="batch", **ADAPTER)).train()
    copy_adapter(theirs, ours)
    batch = lm_batch(base, settings)
    for mode in ("batch", "causal", "token"):  # the same loss as PEFT on the same weights (raises if not)
        ll.set_lily_options(ours, routing=mode)
        check_same_loss(theirs, ours, batch, settings, equal_experts=mode != "batch")
    their_opt = torch.optim.AdamW(trainable(theirs), lr=1e-4)
    opt = torch.optim.AdamW(trainable(ours), lr=1e-4)
    nothing = lambda: None  # noqa: E731
    switch = lambda m: (lambda: ll.set_lily_options(ours, routing=m))  # noqa: E731
    sides = {"peft": (nothing, lambda: train_step(theirs, batch, their_opt))}
    for m in ("batch", "causal", "token"):
        sides[m] = (switch(m), lambda: train_step(ours, batch, opt))
    with LoadWindow() as load:
        times = round_robin(sides, settings)
    rows = []
    row = timing_row(f"training step (forward, backward, AdamW), {name}, Lily on q_proj,v_proj, {config}, "
                     f"batch {s.batch} × {s.tokens}, batch routing", "PEFT `lily`, same config", "≤ 1.00×",
                     PEFT_LIMIT, _pairs(times, "batch", "peft"), load, settings)
    row.key = f"{name} step vs PEFT"
    rows.append(row)
    for m in ("causal", "token"):
        row = timing_row(f"same {name} step, {m} routing", "the same step, batch routing", "≤ 1.10×", MODE_LIMIT,
                         _pairs(times, m, "batch"), load, settings)
        row.key = f"{name} step, {m} vs batch"
        rows.append(row)
    rows[0].notes.append(f"one round robin for the three step rows ({len(times['peft'][0])} repeats of PEFT, "
                         "batch, causal, token in rotated order); the lily_lab modes are one model switched by "
                         "set_lily_options outside the timed call")
    ll.set_lily_options(ours, routing="causal")
    sides.clear()
    theirs = their_opt = opt = None  # free PEFT's copy and the optimiser states before generating
    gc.collect()
    ours.eval()
    rows.append(record_row(ours, name, settings))
    rows.append(memory_row(ours, name, settings))
    return rows


def record_row(model, name: str, settings: Settings) -> Row:
    """Greedy ``generate`` inside a ``record_routing`` block (the block opened and closed within
    the timed call, as a user records one generation) against the same call without it."""
    s = sizes_for(settings)
    prompts = prompts_for(model, settings, s.prompts, s.prompt_tokens)
    with torch.no_grad(), ll.record_routing(model) as rec:
        out = generate(model, prompts, s.new_tokens)
    want = s.prompts * (s.prompt_tokens + s.new_tokens - 1)  # the last new token is never fed back
    got = {rec.routing.record(site).n_tokens for site in rec.routing.sites}
    if got != {want}:
        raise AssertionError(f"record_routing around generate recorded {sorted(got)} tokens per site, expected {want}")
    if out.shape != (s.prompts, s.prompt_tokens + s.new_tokens):
        raise AssertionError(f"generate returned {tuple(out.shape)}")

    def recorded():
        with torch.no_grad(), ll.record_routing(model):
            generate(model, prompts, s.new_tokens)

    def plain():
        with torch.no_grad():
            generate(model, prompts, s.new_tokens)

    with LoadWindow() as load:
        pairs = alternate_pairs(recorded, plain, settings)
    row = timing_row(f"greedy `generate` under `record_routing` ({name}, causal routing, {s.prompts} prompts × "
                     f"{s.prompt_tokens} tokens, {s.new_tokens} new)", "the same `generate` without it", "≤ 1.05×",
                     RECORD_LIMIT, pairs, load, settings)
    row.key = "record_routing around generate"
    row.notes.append(f"{len(rec.routing.sites)} routed sites; each recording holds {want} tokens per site")
    return row


def memory_row(model, name: str, settings: Settings) -> Row:
    """Host bytes allocated and still held (``tracemalloc``: Python objects and numpy arrays;
    torch's tensors are not traced, so the model's KV cache is not counted) while one
    ``record_routing`` block records ``memory_calls`` generations, after the first call and
    after the last, above what was held before the block opened. With ``max_tokens`` below the
    tokens of one call, the token sample is full after the first call: what grows after it is
    memory that ``max_tokens`` does not bound."""
    s = sizes_for(settings)
    prompts = prompts_for(model, settings, s.memory_prompts, 1, seed=2)
    per_call = s.memory_prompts * s.memory_new  # one prompt token + new_tokens - 1 fed back, per prompt
    held = []
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        with LoadWindow() as load:
            start = tracemalloc.get_traced_memory()[0]
            with torch.no_grad(), ll.record_routing(model, max_tokens=s.memory_max_tokens) as rec:
                for _ in range(s.memory_calls):
                    generate(model, prompts, s.memory_new)
                    gc.collect()
                    held.append(tracemalloc.get_traced_memory()[0] - start)
                rec.routing  # noqa: B018 — reading it folds what waits; held again after that
                gc.collect()
                read = tracemalloc.get_traced_memory()[0] - start
    finally:
        if not was_tracing:
            tracemalloc.stop()
    n_tokens = rec.routing.record(rec.routing.sites[0]).n_tokens
    if n_tokens != s.memory_calls * per_call:
        raise AssertionError(f"the recording holds {n_tokens} tokens per site, expected {s.memory_calls * per_call}")
    ratio = held[-1] / max(held[0], 1)
    row = Row(f"memory held by `record_routing` over {n_tokens:,} generated tokens ({name}, causal routing, "
              f"{s.memory_calls} `generate` calls, max_tokens {s.memory_max_tokens:,})",
              f"held after the first call ({per_call:,} tokens)", "≤ 1.05× (flat once the sample is full)",
              fmt_bytes(held[-1]), fmt_bytes(held[0]), f"{ratio:.2f}×",
              None if settings.smoke else ratio <= MEMORY_LIMIT, str(load))
    row.key = "record_routing memory"
    row.notes.append("tracemalloc bytes above the block's start (Python objects and numpy arrays; torch tensors "
                     "untraced) after each call: " + ", ".join(fmt_bytes(h) for h in held)
                     + f"; after reading rec.routing {fmt_bytes(read)}")
    row.notes.append(f"median growth per call after the first: "
                     f"{fmt_bytes(statistics.median(b - a for a, b in zip(held, held[1:])))}")
    return row

