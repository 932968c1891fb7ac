"""Two processes saving adapters to one directory while a third loads from it.

Each writer saves its own adapter (different weights, and in the mixed case a different format)
again and again; the reader loads in a loop meanwhile. Every load must succeed and give exactly
one of the two adapters, and the directory must end holding one complete adapter — the one whose
save finished last — and nothing else. Without the directory lock of ``save_adapter`` a writer's
clean-up deletes the other's freshly committed weights file (the bug this guards against).

The processes are forked from the test process (the model and lily_lab are already imported), and
each runs one thread.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import pytest
import torch
from torch import nn

import lily_lab as ll

SAVES = 40  # per writer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a0, self.a1 = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.a1(self.a0(x))


def adapted(seed: int) -> nn.Module:
    torch.manual_seed(0)
    model = ll.add_lily(Net(), ll.LilyConfig(r"a0|a1", r=4, num_B=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in {id(p): p for s in ll.adapter_sites(model) for p in s.parameters}.values():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def weights(model) -> list[torch.Tensor]:
    return [t.detach().clone() for s in ll.adapter_sites(model) for t in (s.A, s.B, s.router)]


def _writer(directory: str, seed: int, fmt: str, start, done) -> None:
    torch.set_num_threads(1)
    try:
        model = adapted(seed)
        start.wait()
        for _ in range(SAVES):
            ll.save_adapter(model, directory, format=fmt)
    except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
        traceback.print_exc()
        os._exit(1)
    done.set()


def _reader(directory: str, start, stop, queue) -> None:
    torch.set_num_threads(1)
    loads, failures, unknown = 0, [], 0
    want = {seed: weights(adapted(seed)) for seed in (1, 2)}
    start.wait()
    while not stop.is_set() or loads == 0:
        try:
            got = weights(ll.load_adapter(Net(), directory))
        except ll.LilyLabError as err:
            failures.append(str(err))
        else:
            if not any(all(torch.equal(g, w) for g, w in zip(got, ws)) for ws in want.values()):
                unknown += 1
        loads += 1
    queue.put((loads, failures[:5], len(failures), unknown))


@pytest.mark.parametrize("formats", [("lily_lab", "lily_lab"), ("lily_lab", "peft")], ids=["both lily_lab", "mixed"])
def test_two_writers_and_a_reader_leave_one_complete_adapter(formats, tmp_path):
    ctx = mp.get_context("fork")
    directory = tmp_path / "adapter"
    ll.save_adapter(adapted(1), directory)  # so the reader has something from the start
    start, stop = ctx.Barrier(3), ctx.Event()
    done = [ctx.Event(), ctx.Event()]
    queue = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(str(directory), seed, fmt, start, ev))
               for seed, fmt, ev in zip((1, 2), formats, done)]
    reader = ctx.Process(target=_reader, args=(str(directory), start, stop, queue))
    for p in (*writers, reader):
        p.start()
    for w in writers:
        w.join(timeout=300)
    stop.set()
    loads, first_failures, n_failures, unknown = queue.get(timeout=120)
    reader.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0], "a save raised (see the captured stderr)"
    assert n_failures == 0, f"{n_failures} of {loads} loads failed during the saves: {first_failures}"
    assert unknown == 0, f"{unknown} of {loads} loads gave weights neither writer saved"
    # One complete adapter is left, and nothing else: it loads and is one of the two.
    final = weights(ll.load_adapter(Net(), directory))
    matches = [seed for seed in (1, 2) if all(torch.equal(g, w) for g, w in zip(final, weights(adapted(seed))))]
    assert len(matches) == 1
    names = sorted(p.name for p in directory.iterdir())
    if formats[matches[0] - 1] == "peft":
        assert names == ["adapter_config.json", "adapter_model.safetensors"]
    else:
        assert len(names) == 2 and names[1] == "lily_adapter.json" and names[0].startswith("adapter-")
    assert loads >= 1


def test_a_lily_lab_save_removes_a_stale_peft_lily_adapter_but_not_a_lora_one(tmp_path):
    """The directory holds one adapter: a lily_lab save after a PEFT Lily save removes the PEFT
    files (load_adapter would read lily_adapter.json first, but PEFT would read the stale ones); a
    PEFT adapter of another kind is the user's and stays."""
    model = adapted(1)
    ll.save_adapter(model, tmp_path / "a", format="peft")
    ll.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_config.json").exists()
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    lora = tmp_path / "b"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (lora / "adapter_model.safetensors").write_bytes(b"user's LoRA")
    ll.save_adapter(model, lora)
    assert (lora / "adapter_config.json").read_text() == '{"peft_type": "LORA", "r": 8}'
    assert (lora / "adapter_model.safetensors").read_bytes() == b"user's LoRA"
    got = weights(ll.load_adapter(Net(), lora))
    assert all(torch.equal(g, w) for g, w in zip(got, weights(model)))
