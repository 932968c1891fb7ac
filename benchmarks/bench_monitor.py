"""What a ``RoutingMonitor`` recording the training traffic costs a training step (issue 17, item 2).

``lily_lab.RoutingMonitor(model)`` in its default traffic mode keeps one
``record_routing(model, training_only=True, token_sums=False, max_tokens=256, gather=False)``
block open across the run: hooks on the forwards the loop runs anyway, whose sums are folded in
when the next forward starts. Each ``monitor.observe(step)`` takes that recording, computes the
metrics (``router_metrics``, ``bank_summary``, ``diagnose``'s bank and router checks), adds it to
the monitor's timeline with a snapshot of the banks, and starts a new recording.

One training step (forward with the loss, backward, ``AdamW.step``, ``zero_grad``; the
``bench_training`` step) of the model with the monitor attached against the same step of an
identical copy (``copy.deepcopy`` before attaching) without one. The two alternate step by step,
in blocks of ``EVERY`` = 10 pairs; after each block the monitor observes (timed, on the monitored
side). Rows:

1. the step with the traffic hooks: per-pair ratio of the monitored step to the plain one;
2. the amortised cost at a logging interval of 10 steps: per-block ratio of
   (10 monitored steps + one ``observe``) / (10 plain steps);
3. with ``python -m benchmarks.bench_monitor --llm`` only (not in ``--only monitor``: 3–6 min on
   2 shared cores): row 2 on SmolLM2-135M-Instruct (60 routed sites), ``LLM_BLOCKS`` block(s) of
   10 pairs.

Before timing, the two copies must give the same loss (eval mode, and train mode with the monitor
recording, under one RNG seed), and one recorded step must hold exactly the real tokens and the
router probabilities a recomputation from the layers' inputs gives.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import statistics
import time

import numpy as np
import torch

import lily_lab as ll

from ._common import LoadWindow, Pairs, Row, Settings, fmt_seconds, median_ratio, table, timed, timing_row
from ._models import base_model, batch_for, shape_for, train_step, trainable, with_lily

LIMIT = 1.03
EVERY = 10  # steps between two observations (the logging interval)
# SmolLM2 blocks of EVERY pairs: a step is 3.4 s a side on 2 quiet cores, 6–8 s at load 3 (two
# blocks took 346 s at load 3, one 182 s).
LLM_BLOCKS = 2


def _tolerance(settings: Settings) -> float:
    return 2e-2 if settings.dtype == "bf16" else 1e-5


@contextlib.contextmanager
def _quiet_warnings():
    """The monitor's early warnings go to the ``transformers.trainer`` logger; keep them out of the
    table's output (the warning is still computed and kept in ``monitor.warnings``)."""
    log = logging.getLogger("transformers.trainer")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _loss(model, batch, seed: int | None) -> float:
    """The loss of one forward without gradients: in eval mode (``seed`` None), or in train mode
    with torch's RNG seeded (the same dropout masks on both sides)."""
    was = model.training
    model.train(seed is not None)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return model(**batch).loss.float().item()
    finally:
        model.train(was)


def check(model, twin, monitor, batch, settings: Settings) -> None:
    """The monitored model and its twin give the same loss, and one recorded training-mode forward
    is summed exactly (raises if not). Leaves the monitor with an empty recording."""
    tol = _tolerance(settings)
    for seed in (None, 1234):
        a, b = _loss(model, batch, seed), _loss(twin, batch, seed)
        if not abs(a - b) <= tol * max(1.0, abs(b)):
            raise AssertionError(f"the monitored model's loss {a!r} differs from its copy's {b!r} "
                                 f"({'eval mode' if seed is None else 'train mode, same seed'})")
    monitor.observe(0)  # the eval forward was not recorded (training_only), the train-mode one was: drop it
    mask = batch["attention_mask"].bool()
    real = int(mask.sum())
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: captured.__setitem__(n, args[0].detach()))
             for n, m in model.named_modules() if isinstance(m, ll.LilyLayer)]
    try:
        _loss(model, batch, seed=1234)
    finally:
        for h in hooks:
            h.remove()
    logs = monitor.observe(1)
    routing = monitor.timeline.routings[-1]
    if monitor.timeline.steps[-1] != 1 or sorted(routing.sites) != sorted(captured):
        raise AssertionError(f"the monitor's last observation records sites {routing.sites}, "
                             f"expected {sorted(captured)}")
    rtol = 1e-2 if settings.dtype == "bf16" else 1e-4
    for name in routing.sites:
        rec = routing.record(name)
        if rec.n_tokens != real or rec.n_calls != 1:
            raise AssertionError(f"{name}: the monitor recorded {rec.n_tokens} tokens in {rec.n_calls} calls, "
                                 f"expected {real} in 1")
        layer = model.get_submodule(name)
        with torch.no_grad():
            h = captured[name].to(layer.lily_A.dtype) @ layer.lily_A.T
            p = torch.softmax((h @ layer.lily_router.T).float(), dim=-1)[mask.to(h.device)]
        if not np.allclose(rec.sum_probs, p.double().sum(0).cpu().numpy(), rtol=rtol, atol=1e-6):
            raise AssertionError(f"{name}: the monitor's usage sums differ from a recomputation")
    if not any(k.endswith("load_entropy") or k.endswith("load_entropy/median") for k in logs):
        raise AssertionError(f"observe logged no router metrics: {sorted(logs)[:8]}")


def monitored_blocks(model, twin, batch, settings: Settings, blocks: int, every: int = EVERY):
    """Time ``blocks`` blocks of ``every`` pairs of training steps, monitored model against its
    twin alternating step by step (which side goes first alternates pair by pair), with a timed
    ``monitor.observe`` after each block. Returns ``(steps, amortised, observe_wall, monitor)``:
    per-pair ``Pairs`` of single steps, per-block ``Pairs`` of (steps + observe) against steps,
    and each observation's wall seconds."""
    opt, twin_opt = (torch.optim.AdamW(trainable(m), lr=1e-4) for m in (model, twin))
    monitor = ll.RoutingMonitor(model)  # traffic mode: the training batches themselves
    try:
        check(model, twin, monitor, batch, settings)
        mine = lambda: train_step(model, batch, opt)  # noqa: E731
        plain = lambda: train_step(twin, batch, twin_opt)  # noqa: E731
        step = 1
        for _ in range(max(settings.warmup, 1)):
            mine(), plain()
            step += 1
        monitor.observe(step)  # the first observation's one-off costs (lazy imports, caches) untimed
        gc.collect()
        steps, amortised, observe_wall = Pairs(), Pairs(), []
        k = 0
        for _ in range(blocks):
            wa = wb = ca = cb = 0.0
            for _ in range(every):
                order = [(mine, steps.wall_a, steps.cpu_a), (plain, steps.wall_b, steps.cpu_b)]
                for fn, wall, cpu in order if k % 2 == 0 else order[::-1]:
                    seconds, cpu_seconds = timed(fn, settings)
                    wall.append(seconds)
                    cpu.append(cpu_seconds)
                k += 1
                step += 1
                wa, wb = wa + steps.wall_a[-1], wb + steps.wall_b[-1]
                ca, cb = ca + steps.cpu_a[-1], cb + steps.cpu_b[-1]
            ow, oc = timed(lambda: monitor.observe(step), settings)
            observe_wall.append(ow)
            amortised.wall_a.append(wa + ow)
            amortised.wall_b.append(wb)
            amortised.cpu_a.append(ca + oc)
            amortised.cpu_b.append(cb)
    finally:
        monitor.close()
    return steps, amortised, observe_wall, monitor


def _observe_note(observe_wall: list[float], steps: Pairs, monitor, every: int, seconds: float) -> str:
    """The observations' cost, and the amortised ratio estimated from medians (the median per-pair
    step ratio plus the median observation over ``every`` median plain steps): steadier than the
    per-block ratio when a few blocks carry a load spike."""
    o, plain = statistics.median(observe_wall), statistics.median(steps.wall_b)
    sites = len(monitor.timeline.routings[-1].sites)
    share = o / every / plain
    return (f"`observe` (metrics, diagnose, bank snapshot, new recording; {sites} sites, per={monitor.per!r}): "
            f"median {fmt_seconds(o)} over {len(observe_wall)} observations (range {fmt_seconds(min(observe_wall))}–"
            f"{fmt_seconds(max(observe_wall))}) = {share:.2%} of a plain step per step at every {every} steps; "
            f"from medians, hooks {median_ratio(steps.wall_a, steps.wall_b):.3f}× + observe {share:.3f} = "
            f"{median_ratio(steps.wall_a, steps.wall_b) + share:.3f}×; {len(monitor.warnings)} early warning(s) "
            f"given; {seconds:.0f} s for this model, loading and checks included")


def run(settings: Settings, llm: bool = False) -> list[Row]:
    """The MiniLM rows; with ``llm``, the SmolLM2 row too."""
    with _quiet_warnings():
        rows = minilm_rows(settings)
        if llm:
            rows.append(llm_row(settings))
    return rows


def minilm_rows(settings: Settings) -> list[Row]:
    started = time.perf_counter()
    base, name = base_model(settings)
    model = with_lily(base, settings, "batch")
    twin = copy.deepcopy(model)  # the same weights, never hooked
    batch = batch_for(model, settings)
    shape = shape_for(settings)
    with LoadWindow() as load:
        steps, amortised, observe_wall, monitor = monitored_blocks(model, twin, batch, settings,
                                                                   blocks=settings.repeats)
    what = (f"training step with a `RoutingMonitor` recording the traffic ({name}, Lily on q,v, r = {shape.r}, "
            f"num_B {shape.num_B}, batch routing, batch {shape.batch} × {shape.tokens}): the hooks")
    step_row = timing_row(what, "the same step of an identical copy, no monitor", f"≤ {LIMIT:.2f}×", LIMIT,
                          steps, load, settings)
    step_row.key = "monitor hooks"
    step_row.notes.append(f"{len(steps.wall_a)} step pairs, alternating step by step, in {settings.repeats} blocks "
                          f"of {EVERY} with an `observe` after each")
    row = timing_row(f"same, amortised over a logging interval of {EVERY} steps: ({EVERY} monitored steps + one "
                     f"`monitor.observe`) / {EVERY} plain steps", f"{EVERY} plain steps", f"≤ {LIMIT:.2f}×", LIMIT,
                     amortised, load, settings)
    row.key = "monitor, amortised"
    row.notes.append(_observe_note(observe_wall, steps, monitor, EVERY, time.perf_counter() - started))
    return [step_row, row]


def llm_row(settings: Settings) -> Row:
    from .bench_llm import ADAPTER, TARGETS, base_lm, lm_batch, sizes_for

    started = time.perf_counter()
    base, name = base_lm(settings)
    model = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(TARGETS, routing="batch", **ADAPTER)).train()
    twin = copy.deepcopy(model)
    del base
    batch = lm_batch(model, settings)
    s = sizes_for(settings)
    blocks = min(LLM_BLOCKS, settings.repeats)
    with LoadWindow() as load:
        steps, amortised, observe_wall, monitor = monitored_blocks(model, twin, batch, settings, blocks=blocks)
    row = timing_row(f"same amortised cost, {name}, Lily on q_proj,v_proj, r {ADAPTER['r']}, num_B "
                     f"{ADAPTER['num_B']}, batch routing, batch {s.batch} × {s.tokens}", f"{EVERY} plain steps",
                     f"≤ {LIMIT:.2f}×", LIMIT, amortised, load, settings)
    row.key = f"monitor, {name}"
    per_pair = sorted(a / b for a, b in zip(steps.wall_a, steps.wall_b))
    row.notes.append(f"{blocks} block(s) of {EVERY} step pairs; the hooks alone (per step pair): wall "
                     f"{median_ratio(steps.wall_a, steps.wall_b):.3f}× "
                     f"(spread {per_pair[0]:.2f}–{per_pair[-1]:.2f}), "
                     f"CPU time {median_ratio(steps.cpu_a, steps.cpu_b):.3f}×, medians "
                     f"{fmt_seconds(statistics.median(steps.wall_a))} / {fmt_seconds(statistics.median(steps.wall_b))}")
    row.notes.append(_observe_note(observe_wall, steps, monitor, EVERY, time.perf_counter() - started))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random models, seconds")
    ap.add_argument("--llm", action="store_true", help="add the SmolLM2 row (minutes)")
    ap.add_argument("--repeats", type=int, default=None, help="MiniLM blocks of 10 step pairs (default 9, smoke 2)")
    args = ap.parse_args(argv)
    settings = Settings(smoke=args.smoke, threads=1 if args.smoke else 2, warmup=1 if args.smoke else 2,
                        repeats=args.repeats or (2 if args.smoke else 9))
    torch.set_num_threads(settings.threads)
    print(table(run(settings, llm=args.llm), settings))


if __name__ == "__main__":
    main()
