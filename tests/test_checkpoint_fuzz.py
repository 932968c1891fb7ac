"""1,000 adapter directories corrupted at random (seeded): each either raises a LilyLabError or
loads exactly the weights in the file, never hangs, and a failed load changes no model.

One good adapter is saved per format up front; every case mutates its bytes in memory and writes
them into a fresh directory, then loads it into a plain base model and into an adapted one. When a
lily_lab case changes the weights file, either the SHA-256 is left as saved (the hash must catch
any change) or an "attacker" recomputes it, renames the file and rewrites lily_adapter.json (the
structural checks must catch what the hash cannot). The PEFT format has no hash at all.
Reproduce case ``i`` with ``_mutate(random.Random(_case_seed(i)), fmt, good_files)``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import random
import signal
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import lily_lab
from lily_lab.core.checkpoint import LILY_JSON

SEED = 20250611
N_LILY, N_PEFT = 700, 300  # 1,000 in all
CASE_SECONDS = 5.0
CONFIG = dict(target_modules=["query", "value"], r=4, stride_A=2, num_B=3, init_weights=False)
LILY_OPTIONS = dict(routing="sequence", router_temperature=0.5, router_top_k=2, scaling=0.75)
PEFT_JSON, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _case_seed(i: int) -> int:
    return SEED * 100_003 + i


# --------------------------------------------------------------------------- mutations

_VALUES = [0, -1, 1, 2, 3, 4, 5, 31, 32, 33, 2**31, 2**63, 10**30, 0.5, 1.0, -0.0, 1e308, float("nan"),
           float("inf"), True, False, None, "", "query", "value", "batch", "token", "bogus", "LILY",
           "lily_adapter.json", "../x.safetensors", "a\x00b.safetensors", [], {}, ["query"], [1, 2],
           {"a": 1}, "é" * 3]
_DTYPES = ["F16", "BF16", "F64", "F32", "I32", "I64", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "F33", "f32"]
_TORCH_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8,
                 torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64]


def _paths(node, path=()):
    """Every (path, value) in a JSON tree, the root included."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _edit_json(rng: random.Random, data):
    data = copy.deepcopy(data)
    path, value = rng.choice(list(_paths(data))[1:])
    parent, key = _get(data, path[:-1]), path[-1]
    op = rng.choice(["value", "value", "delete", "add", "type", "swap", "duplicate"])
    if op == "value":
        parent[key] = rng.choice(_VALUES)
    elif op == "delete":
        del parent[key]
    elif op == "add":
        target = value if isinstance(value, (dict, list)) else parent
        if isinstance(target, dict):
            target[rng.choice(["extra", "r", "sites", "key", "colour"]) + str(rng.randrange(3))] = rng.choice(_VALUES)
        else:
            target.insert(rng.randrange(len(target) + 1), copy.deepcopy(rng.choice(target or [1])))
    elif op == "type":  # the same content as another JSON type: 4 → "4" or [4], [x] → x, "4" → 4
        if isinstance(value, list):
            parent[key] = value[0] if value else None
        elif isinstance(value, str):
            parent[key] = int(value) if value.isdigit() else [value]
        else:
            parent[key] = str(value) if rng.random() < 0.5 else [value]
    elif op in ("swap", "duplicate"):  # swapped / repeated entries of a list (groups, sites, targets)
        lists = [(p, v) for p, v in _paths(data) if isinstance(v, list) and len(v) >= 2]
        if not lists:
            parent[key] = rng.choice(_VALUES)
            return data, "json:value"
        _, lst = rng.choice(lists)
        i, j = rng.sample(range(len(lst)), 2)
        if op == "swap":
            lst[i], lst[j] = lst[j], lst[i]
        else:
            lst[i] = copy.deepcopy(lst[j])
    return data, f"json:{op}"


def _split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, length_delta: int = 0) -> bytes:
    """Re-serialise: 8-byte little-endian header length (off by ``length_delta``), header, data."""
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return (len(h) + length_delta).to_bytes(8, "little") + h + body


def _edit_header(rng: random.Random, data: bytes):
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["shape", "dtype", "offsets", "rename", "swap-names", "delete", "add", "metadata", "length"])
    if op == "shape":
        shape = list(entry["shape"])
        how = rng.randrange(6)
        if how == 0 and shape:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1])
        elif how == 1:
            shape.reverse()
        elif how == 2:
            shape.append(1)
        elif how == 3 and shape:
            shape.pop()
        elif how == 4 and shape:
            shape[rng.randrange(len(shape))] = rng.choice([0, -1, 2**40, "4"])
        elif len(shape) == 2:  # same number of elements, another shape
            shape = [shape[0] * shape[1] // 2, 2] if shape[0] * shape[1] % 2 == 0 else [shape[1], shape[0]]
        entry["shape"] = shape
    elif op == "dtype":
        entry["dtype"] = rng.choice(_DTYPES)
    elif op == "offsets":
        a, b = entry["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        entry["data_offsets"] = rng.choice([[a, b + rng.choice([-4, 4])], [a + 4, b + 4], list(other), [b, a],
                                            [a, -1], [a, 2**62]])
    elif op == "rename":
        header[rng.choice(names + ["g0.A9", "g2.B", "x", "base_model.model.x.lily_A.weight"])] = header.pop(name)
    elif op == "swap-names" and len(names) >= 2:  # the same bytes, read under each other's names
        other = rng.choice([n for n in names if n != name])
        header[name], header[other] = header[other], header[name]
    elif op == "delete":
        del header[name]
    elif op == "add":
        header[rng.choice(["extra", "g0.A1x", name + "_"])] = copy.deepcopy(header[rng.choice(names)])
    elif op == "metadata":
        header["__metadata__"] = rng.choice([{"format": "np"}, {}, {"format": 3}, [], None])
    return _join(header, body, rng.choice([-8, -1, 1, 8, 2**40]) if op == "length" else 0), f"header:{op}"


def _edit_tensors(rng: random.Random, data: bytes):
    tensors = st_load(data)
    names = sorted(tensors)
    name = rng.choice(names)
    t = tensors[name]
    op = rng.choice(["swap", "swap-same-shape", "swap-same-shape", "dtype", "nonfinite", "huge", "delete",
                     "extra", "reshape", "transpose"])
    if op == "swap-same-shape":
        same = [n for n in names if n != name and tensors[n].shape == t.shape]
        op = "swap" if not same else op
        other = rng.choice(same or [n for n in names if n != name])
        tensors[name], tensors[other] = tensors[other], t
    elif op == "swap":
        other = rng.choice([n for n in names if n != name])
        tensors[name], tensors[other] = tensors[other], t
    elif op == "dtype":
        tensors[name] = t.to(rng.choice(_TORCH_DTYPES))
    elif op in ("nonfinite", "huge"):
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")]) \
            if op == "nonfinite" else rng.choice([3e38, -3e38, 1e-45])
        tensors[name] = t
    elif op == "delete":
        del tensors[name]
    elif op == "extra":
        tensors[rng.choice(["g0.A2", "g2.B", "g0.router9", "extra", name.replace("lily_A", "lily_C")])] = t.clone()
    elif op == "reshape":
        tensors[name] = t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1)
    else:
        tensors[name] = t.transpose(0, -1).contiguous()
    return st_save(tensors, metadata={"format": "pt"}), f"tensors:{op}"


def _flip_bits(rng: random.Random, data: bytes):
    out = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 8])):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out), "bits:flip"


def _cut(rng: random.Random, data: bytes):
    if rng.random() < 0.7:
        return data[: rng.randrange(len(data))], "bits:truncate"
    return data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 100]))), "bits:append"


def _description(meta) -> object:
    """The part of lily_adapter.json the description hash covers, or None if there is none."""
    if not isinstance(meta, dict) or not {"config", "groups"} <= set(meta):
        return None
    return json.dumps({"config": meta["config"], "groups": meta["groups"]}, sort_keys=True)


def _rehash(files: dict, weights_name: str) -> dict:
    """The attacker's move: name the weights after their new hash and rewrite the JSON to match."""
    meta = json.loads(files[LILY_JSON])
    data = files.pop(weights_name)
    digest = hashlib.sha256(data).hexdigest()
    meta["weights_file"], meta["weights_sha256"] = f"adapter-{digest[:16]}.safetensors", digest
    files[meta["weights_file"]] = data
    files[LILY_JSON] = json.dumps(meta, indent=2).encode()
    return files


def _mutate(rng: random.Random, fmt: str, good: dict):
    """``(files, label, weights_changed_without_rehash)`` for one corrupted directory."""
    files = dict(good)
    meta_name = LILY_JSON if fmt == "lily_lab" else PEFT_JSON
    weights_name = next(n for n in files if n.endswith(".safetensors"))
    kind = rng.choices(["bits", "cut", "header", "tensors", "json", "json-bytes", "files"],
                       weights=[15, 8, 22, 22, 23, 6, 4])[0]
    if kind in ("bits", "cut", "header", "tensors"):
        fn = {"bits": _flip_bits, "cut": _cut, "header": _edit_header, "tensors": _edit_tensors}[kind]
        files[weights_name], label = fn(rng, files[weights_name])
        changed = files[weights_name] != good[weights_name]
        if fmt == "lily_lab" and changed and rng.random() < (0.5 if kind in ("bits", "cut") else 0.85):
            return _rehash(files, weights_name), label + "+rehash", False
        return files, label, fmt == "lily_lab" and changed
    if kind == "json":
        data, label = _edit_json(rng, json.loads(files[meta_name]))
        files[meta_name] = json.dumps(data, indent=rng.choice([None, 2])).encode()
        # lily_lab's JSON is covered by the description hash in the weights: a changed config or
        # groups must never load (PEFT's JSON has no such check).
        edited = fmt == "lily_lab" and _description(data) != _description(json.loads(good[meta_name]))
        return files, label, edited
    elif kind == "json-bytes":
        files[meta_name], label = (_flip_bits if rng.random() < 0.6 else _cut)(rng, files[meta_name])
        label = "json-" + label
    else:
        victim = rng.choice(sorted(files))
        label = f"files:delete-{'json' if victim == meta_name else 'weights'}"
        del files[victim]
    return files, label, False


# --------------------------------------------------------------------------- expectations


def _expected(fmt: str, files: dict, site):
    """(A, B, router, scaling, routing, τ, top-k) that ``site`` must hold if the directory loaded."""
    if fmt == "lily_lab":
        meta = json.loads(files[LILY_JSON])
        raw, cfg = st_load(files[meta["weights_file"]]), meta["config"]
        k = [g["key"] for g in meta["groups"]].index(site.group)
        i = site.index
        A, B, R = raw[f"g{k}.A{i // cfg['stride_A']}"], raw[f"g{k}.B"], raw[f"g{k}.router{i}"]
        options = (float(cfg.get("scaling", 1.0)), cfg.get("routing", "batch"),
                   float(cfg.get("router_temperature", 1.0)), cfg.get("router_top_k"))
    else:
        meta, raw = json.loads(files[PEFT_JSON]), st_load(files[PEFT_WEIGHTS])
        key = f"base_model.model.{site.name}"
        A, B, R = (raw[f"{key}.lily_{p}.weight"] for p in ("A", "B", "router"))
        options = (float(meta.get("scaling", 1.0)), "batch", 1.0, None)
    return A, B.reshape(site.B.shape), R, options


def _check_loaded(fmt: str, files: dict, model) -> None:
    sites = lily_lab.adapter_sites(model)
    assert [s.name for s in sites] == [f"encoder.layer.{i}.attention.self.{m}" for i in range(4)
                                       for m in ("query", "value")]
    for s in sites:
        A, B, R, options = _expected(fmt, files, s)
        for got, want in ((s.A, A), (s.B, B), (s.router, R)):
            assert got.shape == want.shape and torch.equal(got, want.to(got.dtype)), s.name
            assert torch.isfinite(got).all(), f"{s.name}: a non-finite weight was loaded"
        assert (s.scaling, s.layer.routing, s.layer.router_temperature, s.layer.router_top_k) == options
    meta = json.loads(files[LILY_JSON if fmt == "lily_lab" else PEFT_JSON])
    stride_A = (meta["config"] if fmt == "lily_lab" else meta).get("stride_A", 1)  # the file's, or the default
    n_A = 2 * -(-4 // stride_A)  # two groups of 4 sites
    assert len({id(s.A) for s in sites}) == n_A and len({id(s.B) for s in sites}) == 2  # shared as saved


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    if not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise _Timeout(f"a load took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- the fuzz


def _good_files(fmt, tiny_bert, directory) -> dict:
    options = LILY_OPTIONS if fmt == "lily_lab" else {}
    model = lily_lab.add_lily(tiny_bert(), lily_lab.LilyConfig(**CONFIG, **options))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in lily_lab.adapter_sites(model):
            s.router.add_(torch.randn(s.router.shape, generator=gen))
    lily_lab.save_adapter(model, directory, format=fmt)
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("fmt, n_cases", [("lily_lab", N_LILY), ("peft", N_PEFT)])
def test_corrupted_adapters_raise_or_load_exactly(fmt, n_cases, tiny_bert, snapshot, tmp_path):
    good = _good_files(fmt, tiny_bert, tmp_path / "good")
    plain = tiny_bert()

    def fresh_adapted():
        return lily_lab.add_lily(tiny_bert(seed=1), lily_lab.LilyConfig(**CONFIG))

    adapted = fresh_adapted()
    snaps = {"plain": snapshot(plain), "adapted": snapshot(adapted)}
    stats, problems, slowest = Counter(), [], 0.0
    for i in range(n_cases):
        files, label, must_raise = _mutate(random.Random(_case_seed(i)), fmt, good)
        d = tmp_path / f"case{i}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        for which in ("plain", "adapted"):
            model = plain if which == "plain" else adapted
            start = time.perf_counter()
            try:
                with _time_limit(CASE_SECONDS):
                    lily_lab.load_adapter(model, d)
            except lily_lab.LilyLabError:
                stats[f"{which} raised"] += 1
                stats[f"{label} raised"] += 1
                try:
                    snaps[which].assert_same(model)
                except AssertionError as err:
                    problems.append(f"case {i} ({label}, {which}): a failed load changed the model: {err}")
            except Exception as err:  # noqa: BLE001 - any other exception type is the defect
                problems.append(f"case {i} ({label}, {which}): {type(err).__name__}: {err}")
            else:
                stats[f"{which} loaded"] += 1
                stats[f"{label} loaded"] += 1
                if must_raise:
                    problems.append(f"case {i} ({label}, {which}): weights or JSON description changed after "
                                    "saving, integrity not checked")
                try:
                    _check_loaded(fmt, files, model)
                except Exception as err:  # noqa: BLE001
                    problems.append(f"case {i} ({label}, {which}): loaded, but not the file's weights: {err!r}")
                if which == "plain":
                    lily_lab.remove_lily(model)  # gives back the base model, which must be untouched
                    try:
                        snaps["plain"].assert_same(model)
                    except AssertionError as err:
                        problems.append(f"case {i} ({label}): remove_lily after a load left changes: {err}")
                else:
                    adapted = fresh_adapted()
            slowest = max(slowest, time.perf_counter() - start)
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    summary = (f"{fmt}: {n_cases} corrupted directories × 2 models — "
               f"plain base: {stats['plain raised']} raised / {stats['plain loaded']} loaded; "
               f"adapted model: {stats['adapted raised']} raised / {stats['adapted loaded']} loaded; "
               f"slowest load {slowest * 1000:.0f} ms")
    by_label = sorted({k.rsplit(" ", 1)[0] for k in stats if ":" in k})
    detail = "\n".join(f"  {lab:28} raised {stats[lab + ' raised']:4}  loaded {stats[lab + ' loaded']:4}"
                       for lab in by_label)
    print(f"\n{summary}\n{detail}")
    assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:15]) + f"\n{summary}"
    assert stats["plain raised"] > n_cases // 3 and stats["plain loaded"] > n_cases // 20, summary
    assert slowest < CASE_SECONDS
