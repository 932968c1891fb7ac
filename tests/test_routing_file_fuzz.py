"""Damaged and tampered routing files (``Routing.load``): a case table of each tamper, a zip bomb,
and 1,000+ recordings corrupted at random (seeded). Every case raises ``RoutingError`` naming the
file, or loads exactly what the file holds; memory stays under twice the honest file's size.

Reproduce fuzz case ``i`` with ``_mutate(random.Random(SEED * 100_003 + i), good)``.
"""

from __future__ import annotations

import io
import json
import random
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from torch import nn

import lily_lab as ll
from lily_lab import RoutingError
from lily_lab.observe import Routing
from lily_lab.observe.routing_file import routing_bytes

from _measure import refusal_cost

SEED = 20261201
N_BYTES, N_MEMBERS = 550, 450  # 1,000 corrupted files in all


class TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(3, 4)
        self.down = nn.Linear(4, 3)

    def forward(self, x, attention_mask=None):
        return self.down(self.up(x))


def _recording(sites=("up", "down"), b=2, t=6, max_tokens=40) -> Routing:
    torch.manual_seed(0)
    model = ll.add_lily(TwoSites(), ll.LilyConfig(list(sites), r=2, num_B=3, routing="token", init_weights=False))
    with ll.record_routing(model, max_tokens=max_tokens) as rec, torch.no_grad():
        for i in range(3):
            mask = torch.ones(b, t, dtype=torch.long)
            mask[1, :2] = 0  # left padding: not recorded
            model(torch.randn(b, t, 3), attention_mask=mask)
            labels = ["neg", "pos"] if i != 1 else ["pos", 3]
            rec.annotate(labels=(labels * b)[:b], input_ids=torch.arange(b * t).reshape(b, t) % 7)
    return rec.routing


@pytest.fixture(scope="module")
def good():
    """A small recording of two sites: the case table's."""
    routing = _recording()
    assert len(routing.sites) == 2 and routing.labels == ["neg", "pos", 3]
    return routing_bytes(routing)


@pytest.fixture(scope="module")
def good_big():
    """One site, a sample of 4,000 tokens (≈ 380 kB of arrays, so that memory is measured against
    them rather than against Python's fixed costs of a load, ≈ 100 kB): the fuzz test's."""
    routing = _recording(sites=("up",), b=16, t=96, max_tokens=4000)
    assert len(routing.probs("up")) == 4000
    return routing_bytes(routing)


def _arrays(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _header(arrays: dict) -> dict:
    return json.loads(bytes(arrays["__header__"]).decode())


def _pack(arrays: dict, header: dict | None = None, compressed=True) -> bytes:
    arrays = dict(arrays)
    if header is not None:
        arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def _honest_size(data: bytes) -> int:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return max(len(data), sum(i.file_size for i in z.infolist()))


# Members whose rows are keyed (sorted by the key when saved): compared as key → row.
_KEYS = {"label_": ("label_codes",), "token_": ("token_ids",), "phase_label_": ("phase_label_phase", "phase_label_codes"),
         "phase_token_": ("phase_token_phase", "phase_token_ids"), "phase_": ("phase_codes",)}


def _canonical(arrays: dict) -> dict:
    """The arrays of a routing file with keyed rows in key order and every value as float64 or
    int64 (the loader widens sums), plus the header as parsed JSON."""
    out = {"__header__": _header(arrays)}
    for name, a in arrays.items():
        if name == "__header__":
            continue
        site, member = name.split(".", 1)
        for prefix in ("phase_label_", "phase_token_", "label_", "token_", "phase_"):
            if member.startswith(prefix) and not member.startswith("tokens."):
                keys = [arrays[f"{site}.{k}"] for k in _KEYS[prefix]]
                order = np.lexsort(keys[::-1]) if len(keys[0]) else np.arange(0)
                a = a[order]
                break
        out[name] = (a.dtype.kind, a.astype(np.float64 if a.dtype.kind == "f" else np.int64))
    return out


def _same(loaded: Routing, arrays: dict) -> None:
    """``loaded`` holds exactly ``arrays`` (a routing file's members)."""
    got, want = _canonical(_arrays(routing_bytes(loaded))), _canonical(arrays)
    assert got.keys() == want.keys()
    assert got["__header__"] == want["__header__"]
    for k in want:
        if k != "__header__":
            assert got[k][1].shape == want[k][1].shape and np.array_equal(got[k][1], want[k][1]), k


def _load(tmp_path, data: bytes, name="rec.npz"):
    path = tmp_path / name
    path.write_bytes(data)
    return Routing.load(path), path


# ----------------------------------------------------------------------------- the case table
def _npy_member(header: dict, payload: bytes) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def _with_members(data: bytes, replace: dict, drop=(), duplicate=False) -> bytes:
    """``data`` with raw members replaced or added (name → bytes) and ``drop`` left out."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in drop or (info.filename in replace and not duplicate):
                continue
            dst.writestr(info.filename, src.read(info))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns of a duplicate name
            for name, raw in replace.items():
                dst.writestr(name, raw)
    return out.getvalue()


def _edit(fn):
    """A tamper of the arrays and header (``fn(arrays, header)`` edits them in place)."""
    def apply(data):
        arrays = _arrays(data)
        header = _header(arrays)
        fn(arrays, header)
        return _pack(arrays, header)
    return apply


def _set(key, value):
    def fn(arrays, header):
        arrays[key] = value(arrays[key]) if callable(value) else value
    return _edit(fn)


def _meta(fn):
    return _edit(lambda arrays, header: fn(header))


CASES = {
    "extra member": (lambda d: _with_members(d, {"notes.npy": _npy_member(
        {"descr": "<i8", "fortran_order": False, "shape": (2,)}, bytes(16))}), "does not define"),
    "missing member": (lambda d: _with_members(d, {}, drop={"s1.token_probs.npy"}), "no members"),
    "member twice": (lambda d: _with_members(d, {"s0.sum_probs.npy": zipfile.ZipFile(io.BytesIO(d)).read(
        "s0.sum_probs.npy")}, duplicate=True), "twice"),
    "object dtype": (lambda d: _with_members(d, {"s0.label_entropy.npy": _npy_member(
        {"descr": "|O", "fortran_order": False, "shape": (3,)}, bytes(24))}), "dtype"),
    "10¹² elements declared": (lambda d: _with_members(d, {"s0.tokens.probs.npy": _npy_member(
        {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)}, bytes(64))}), "header"),
    "label code out of range (sample)": (_set("s0.tokens.label", lambda a: a + 5), "label codes"),
    "label code out of range (sums)": (_set("s1.label_codes", lambda a: a + 3), "codes"),
    "phase label code out of range": (_set("s0.phase_label_codes", lambda a: a + 3), "codes"),
    "label codes repeat": (_set("s0.label_codes", lambda a: np.zeros_like(a)), "repeat"),
    "phase code out of range": (_set("s0.tokens.phase", lambda a: a + 7), "codes"),
    "probability column too wide": (_set("s0.tokens.probs", lambda a: np.concatenate([a, a[:, :1]], 1)), "shape"),
    "mixture column too narrow": (_set("s1.mixtures.mixture", lambda a: a[:, :2]), "shape"),
    "token probs of wrong width": (_set("s0.token_probs", lambda a: a[:, :2]), "shape"),
    "labels a string": (_meta(lambda h: h.update(labels="ab")), "not a list"),
    "labels of lists": (_meta(lambda h: h.update(labels=[["a"], "b", 3])), "not a list"),
    "labels repeat": (_meta(lambda h: h.update(labels=["neg", "neg", 3])), "repeat"),
    "a NaN label": (_meta(lambda h: h.update(labels=["neg", float("nan"), 3])), "missing label"),
    "a null label": (_meta(lambda h: h.update(labels=["neg", None, 3])), "missing label"),
    "site names repeat": (_meta(lambda h: h["sites"][1].update(name=h["sites"][0]["name"])), "more than once"),
    "site name not a string": (_meta(lambda h: h["sites"][1].update(name=7)), "not a string"),
    "negative count (labels)": (_set("s0.label_counts", lambda a: -a), "negative"),
    "negative count (argmax)": (_set("s1.argmax_counts", lambda a: a - 100), "negative"),
    "negative n_tokens": (_meta(lambda h: h["sites"][0].update(n_tokens=-4)), "n_tokens"),
    "float count": (_set("s0.token_counts", lambda a: a.astype(np.float64)), "dtype"),
    "NaN sum": (_set("s0.sum_probs", lambda a: a * np.nan), "NaN"),
    "infinite phase sum": (_set("s1.phase_sum_mixture", lambda a: a + np.inf), "NaN or infinite"),
    "NaN entropy in header": (_meta(lambda h: h["sites"][0].update(sum_token_entropy=float("nan"))), "finite"),
    "sums do not match the count": (_meta(lambda h: h["sites"][0].update(n_tokens=h["sites"][0]["n_tokens"] + 1)),
                                    "add up"),
    "token counts exceed the tokens": (_edit(lambda arrays, header: arrays.update(
        {k: arrays[k] * 100 for k in ("s0.token_counts", "s0.token_probs")})), "more than"),
    "argmax not the label count": (_set("s0.label_argmax", lambda a: a + 1), "add up"),
    "negative sequence": (_set("s0.tokens.sequence", lambda a: a - 100), "negative"),
    "negative position": (_set("s1.tokens.position", lambda a: a - 100), "negative"),
    "more samples than max_tokens": (_meta(lambda h: h.update(max_tokens=3)), "max_tokens"),
    "format version from the future": (_meta(lambda h: h.update(format_version=4)), "format_version"),
    "version 2 with dispatch members": (_meta(lambda h: h.update(format_version=2)), "does not define"),
    "dispatch counts off by one": (_set("s0.dispatch_counts", lambda a: a + np.eye(len(a), dtype=a.dtype)[0]),
                                   "add up to"),
    "negative dispatch counts": (_set("s1.phase_dispatch", lambda a: a - 1), "negative"),
    "top_k more than the experts": (_meta(lambda h: h["sites"][0].update(top_k=99)), "top_k"),
    "version 1 with phase members": (_meta(lambda h: h.update(format_version=1)), "does not define"),
    "a site too many in the header": (_meta(lambda h: h["sites"].append(dict(h["sites"][0], name="x"))), "no members"),
    "header not JSON": (lambda d: _with_members(d, {"__header__.npy": _npy_member(
        {"descr": "|u1", "fortran_order": False, "shape": (3,)}, b"{{{")}), "header"),
    "not a zip": (lambda d: d[: len(d) // 2], "not a lily_lab routing file"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_tamper_is_refused(case, good, tmp_path):
    tamper, match = CASES[case]
    path = tmp_path / "tampered.npz"
    path.write_bytes(tamper(good))
    with pytest.raises(RoutingError, match=match) as info:
        Routing.load(path)
    assert str(path) in str(info.value)


def test_the_good_file_and_a_version_1_file_load(good, tmp_path):
    loaded, _ = _load(tmp_path, good)
    _same(loaded, _arrays(good))
    # Version 2: no dispatch members (no top-k router); version 1: no phases either.
    v2 = {k: v for k, v in _arrays(good).items() if "dispatch" not in k}
    header = _header(v2)
    header["format_version"] = 2
    old2, _ = _load(tmp_path, _pack(v2, header, compressed=False), "v2.npz")
    assert old2.phases == loaded.phases and ll.router_metrics(old2).equals(ll.router_metrics(loaded))
    arrays = {k: v for k, v in v2.items() if ".phase" not in k and not k.split(".", 1)[-1].startswith("phase_")}
    header = _header(arrays)
    header["format_version"] = 1
    old, _ = _load(tmp_path, _pack(arrays, header, compressed=False), "old.npz")
    assert old.phases == [None] and old.labels == loaded.labels
    assert ll.router_metrics(old).equals(ll.router_metrics(loaded))


def test_a_zip_bomb_fails_fast_in_tiny_memory(good, tmp_path):
    path = tmp_path / "bomb.npz"
    path.write_bytes(good)
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        with z.open("bomb.npy", "w", force_zip64=True) as w:  # 512 MiB of zeros, deflated to ~2 MB
            for _ in range(512):
                w.write(zeros)
    assert path.stat().st_size < 4 << 20
    # Under a name of the format too: a sample member swapped for the bomb.
    named = tmp_path / "bomb-named.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(named, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename not in ("bomb.npy", "s0.tokens.probs.npy"):
                dst.writestr(info.filename, src.read(info))
        with src.open("bomb.npy") as r, dst.open("s0.tokens.probs.npy", "w", force_zip64=True) as w:
            w.write(_npy_member({"descr": "<f4", "fortran_order": False, "shape": (40, 3)}, b""))
            while chunk := r.read(1 << 20):
                w.write(chunk)
    for p, match in ((path, "does not define|deflate"), (named, "holds|deflate")):
        seconds, peak = refusal_cost(lambda: Routing.load(p), RoutingError, match)
        assert seconds < 1.0
        assert peak < 1 << 20, peak


def test_saving_names_the_users_path_and_leaves_nothing_behind(good, tmp_path):
    routing = _recording()
    target = tmp_path / "taken.npz"
    target.mkdir()  # a directory where the file should go: the rename fails
    with pytest.raises(OSError, match="taken.npz") as info:
        routing.save(target)
    assert ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.npz"] and not list(target.iterdir())
    with pytest.raises(OSError, match="nowhere"):
        routing.save(tmp_path / "nowhere" / "rec.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.npz"]


# ----------------------------------------------------------------------------- the fuzz test
def _zip_layout(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the zip structure (local headers, the central directory): where a flip says
    most about the reader rather than hitting compressed data its CRC refuses anyway."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        ranges = [(i.header_offset, i.header_offset + 30 + len(i.filename) + len(i.extra) + 128)
                  for i in z.infolist()]  # a local header and the start of the member (its .npy header)
    ranges.append((data.find(b"PK\x01\x02"), len(data)))  # the central directory and its end record
    return [(a, min(b, len(data))) for a, b in ranges]


def _mutate_bytes(rng: random.Random, data: bytes, layout) -> bytes:
    b = bytearray(data)
    how = rng.random()
    if how < 0.15:
        return bytes(b[: rng.randrange(len(b))])
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        if rng.random() < 0.7:
            lo, hi = rng.choice(layout)
            i = rng.randrange(lo, hi)
        else:
            i = rng.randrange(len(b))
        b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
    return bytes(b)


_WILD = [0, -1, 1, 2, 3, 7, -2, 10**6, 10**12, 2**63 - 1, 0.5, float("nan"), float("inf"), -0.0, 1e300]


def _mutate_arrays(rng: random.Random, arrays: dict) -> dict:
    """Edit one or two members (values, dtype, shape) or the header; the file stays a valid npz."""
    arrays = dict(arrays)
    header = _header(arrays)
    for _ in range(rng.choice((1, 1, 2))):
        if rng.random() < 0.3:  # the header
            site = rng.choice(header["sites"])
            target, key = rng.choice([(header, k) for k in header if k not in ("format", "sites")]
                                     + [(site, k) for k in site])
            old = target[key]
            target[key] = rng.choice([rng.choice(_WILD), None, "ab", [1, 2], {"a": 1},
                                      old + rng.choice((-1, 1)) if isinstance(old, int) else old,
                                      str(old)] + ([old * 2, old[:1]] if isinstance(old, list) else []))
            continue
        key = rng.choice([k for k in arrays if k != "__header__"])
        a = arrays[key].copy()
        what = rng.random()
        if what < 0.5 and a.size:
            flat = a.reshape(-1)
            v = rng.choice(_WILD)
            i = rng.randrange(flat.size)
            try:
                flat[i] = v if a.dtype.kind == "f" else int(v) if isinstance(v, int) and abs(v) < 2**62 else flat[i] + 1
            except (OverflowError, ValueError):
                flat[i] = 0
        elif what < 0.7:
            a = a.astype(rng.choice([np.float32, np.float64, np.int8, np.int32, np.uint64, np.bool_]))
        elif what < 0.85:
            a = a[: rng.randrange(len(a) + 1)] if a.ndim else a
        elif what < 0.95:
            a = np.concatenate([a, a[:1]]) if a.ndim and len(a) else a.reshape(-1, 1)
        else:
            del arrays[key]
            continue
        arrays[key] = a
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    return arrays


def _mutate(rng: random.Random, good: bytes, layout, kind: str, arrays: dict | None = None):
    """(bytes of a corrupted file, the arrays it should load as, if it loads); ``arrays``: those
    of ``good``, if already read."""
    arrays = _arrays(good) if arrays is None else arrays
    if kind == "bytes":
        return _mutate_bytes(rng, good, layout), arrays
    arrays = _mutate_arrays(rng, arrays)
    return _pack(arrays, compressed=rng.random() < 0.05), arrays


def _equal(a: Routing, b: Routing) -> None:
    """``a`` and ``b`` hold the same recording (every field, sample and sum)."""
    assert (a.labels, a.max_tokens, a.n_calls, a.n_sequences, a.sites) == (b.labels, b.max_tokens, b.n_calls,
                                                                            b.n_sequences, b.sites)
    for name in a.sites:
        ra, rb = a.record(name), b.record(name)
        for x, y in [(ra, rb)] + [(ra.phases[c], rb.phases[c]) for c in rb.phases]:
            assert x is not ra or x.phases.keys() == y.phases.keys()
            for f in ("module", "group", "index", "kind", "routing", "num_B", "n_tokens", "sum_token_entropy",
                      "sum_z", "nonfinite", "n_calls"):
                assert getattr(x, f) == getattr(y, f), f
            for f in ("sum_probs", "argmax_counts", "sum_mixture"):
                assert np.array_equal(getattr(x, f), getattr(y, f)), f
            for f in ("label_sums", "token_sums"):
                da, db = getattr(x, f), getattr(y, f)
                assert da.keys() == db.keys()
                for k in db:
                    assert type(da[k]) is type(db[k]), (f, k)
                    fields = ("count", "probs", "argmax", "entropy") if f == "label_sums" else ("count", "probs")
                    assert all(np.array_equal(getattr(da[k], n), getattr(db[k], n)) for n in fields), (f, k)
            for f in ("tokens", "mixtures"):
                sa, sb = getattr(x, f), getattr(y, f)
                assert (sa.size, sa.seen) == (sb.size, sb.seen)
                assert sa.columns.keys() == sb.columns.keys()
                for k in sb.columns:
                    assert sa.columns[k].dtype == sb.columns[k].dtype and np.array_equal(sa.columns[k], sb.columns[k])


def test_corrupted_recordings_raise_or_load_what_they_hold(good_big, tmp_path):
    good = good_big
    layout = _zip_layout(good)
    honest = _honest_size(good)
    good_arrays = _arrays(good)
    path = tmp_path / "fuzz.npz"
    path.write_bytes(good)
    reference = Routing.load(path)  # and the first load's one-off costs (imports, caches) are paid
    _same(reference, good_arrays)
    outcomes = {"refused": 0, "loaded": 0}
    worst = 0
    t0 = time.perf_counter()
    for i in range(N_BYTES + N_MEMBERS):
        rng = random.Random(SEED * 100_003 + i)
        kind = "bytes" if i < N_BYTES else "members"
        with np.errstate(all="ignore"):  # the edits cast NaN and huge values to integers
            data, expected = _mutate(rng, good, layout, kind, good_arrays)
        path.write_bytes(data)
        tracemalloc.start()
        try:
            loaded = Routing.load(path)
        except RoutingError as err:
            assert str(path) in str(err), (i, err)
            outcomes["refused"] += 1
            loaded = None
        finally:
            worst = max(worst, tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        if loaded is not None:
            outcomes["loaded"] += 1
            if kind == "bytes":  # the file still says what was saved
                _equal(loaded, reference)
            else:
                _same(loaded, expected)
            del loaded
    elapsed = time.perf_counter() - t0
    assert worst < 2 * honest, (worst, honest)
    assert outcomes["refused"] > 500 and outcomes["loaded"] > 20, outcomes
    assert elapsed < 60, elapsed


def test_a_gathered_recording_is_checked_alike(good):
    from lily_lab.observe.distributed import _routing_from_bytes

    _same(_routing_from_bytes(good, "rank 1's recording"), _arrays(good))
    tampered = CASES["labels a string"][0](good)
    with pytest.raises(RoutingError, match="rank 1's recording is a damaged .*not a list"):
        _routing_from_bytes(tampered, "rank 1's recording")
