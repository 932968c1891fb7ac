"""Timeline files: ``Timeline.add``, ``Timeline.save`` / ``Timeline.load`` round trips (with and
without banks), tampered files (a case table, built by hand with a small zip writer), zip bombs of
1 GiB, atomic saves, and a fuzz of truncations and byte flips (seeded): every damaged file raises a
lily_lab error naming it, or loads a timeline whose steps, banks and metrics are the original's.

Reproduce flip ``i`` of the fuzz with ``random.Random(SEED)`` as ``test_truncated_and_flipped_files``
draws it.
"""

from __future__ import annotations

import bz2
import errno
import io
import json
import os
import random
import struct
import zipfile
import zlib

import numpy as np
import pandas.testing as pdt
import pytest
import torch
from torch import nn

import lily_lab as ll
import lily_lab.core.files
from lily_lab import RoutingError
from lily_lab.observe.routing_file import routing_bytes

from _measure import refusal_cost

SEED = 20261215
N_CUTS, N_FLIPS = 200, 200
GIB = 1 << 30


# ----------------------------------------------------------------------------- timelines
def _nudge(model: nn.Module, gen: torch.Generator) -> None:
    """A stand-in for a training step: every bank and router moved a little."""
    params = {id(p): p for s in ll.adapter_sites(model) for p in (s.B, s.router) if p is not None}
    with torch.no_grad():
        for p in params.values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _bert_timeline(tiny_bert, track_experts: bool) -> ll.Timeline:
    model = ll.add_lily(tiny_bert(num_hidden_layers=2), ll.LilyConfig(["query", "value"], r=4, num_B=3,
                                                                      routing="token", init_weights=False))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (4, 7), generator=gen)
    probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    t = ll.Timeline(probe, track_experts=track_experts, max_tokens=64)
    for step in (0, 10, 20):
        t.observe(model, step)
        _nudge(model, gen)
    return t


class OneSite(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def _small_timeline() -> ll.Timeline:
    """One site, three steps, banks kept: quick to load, for the fuzz."""
    torch.manual_seed(0)
    model = ll.add_lily(OneSite(), ll.LilyConfig(["proj"], r=2, num_B=3, routing="token", init_weights=False))
    gen = torch.Generator().manual_seed(1)
    t = ll.Timeline(torch.randn(2, 5, 3, generator=gen), max_tokens=8)
    for step in (0, 5, 10):
        t.observe(model, step)
        _nudge(model, gen)
    return t


@pytest.fixture(scope="module")
def banked(tiny_bert):
    return _bert_timeline(tiny_bert, True)


@pytest.fixture(scope="module")
def bankless(tiny_bert):
    return _bert_timeline(tiny_bert, False)


@pytest.fixture(scope="module")
def good(banked, tmp_path_factory):
    """The bytes of ``banked`` saved."""
    return banked.save(tmp_path_factory.mktemp("good") / "t.npz").read_bytes()


def assert_same_timeline(got: ll.Timeline, want: ll.Timeline) -> None:
    assert got.steps == want.steps and all(type(s) is int for s in got.steps)
    assert got.track_experts == want.track_experts and got.max_tokens == want.max_tokens
    assert got.probe is None
    assert len(got.banks) == len(want.banks)
    for a, b in zip(got.banks, want.banks):
        assert list(a) == list(b)
        for g in b:
            assert a[g].dtype == np.float32 and np.array_equal(a[g], b[g], equal_nan=True), g
    pdt.assert_frame_equal(ll.timeline_metrics(got), ll.timeline_metrics(want))


# ----------------------------------------------------------------------------- a zip written by hand
def _deflate(data: bytes) -> bytes:
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush()


def _zeros_deflated(n_mib: int) -> tuple[bytes, int]:
    """``n_mib`` MiB of zeros as one raw deflate stream, and its CRC-32, without deflating them
    all: a full flush resets the compressor, so every MiB compresses to the same bytes."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    mib = bytes(1 << 20)
    block = co.compress(mib) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(mib) + co.flush(zlib.Z_FULL_FLUSH) == block
    crc = 0
    for _ in range(n_mib):
        crc = zlib.crc32(mib, crc)
    return block * (n_mib - 1) + block + co.flush(), crc


def _entry(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED, **kw) -> dict:
    """A member: ``data`` stored or deflated (or ``payload``/``crc``/``size`` given outright)."""
    if "payload" not in kw:
        kw["payload"] = data if method == zipfile.ZIP_STORED else _deflate(data)
        kw.setdefault("crc", zlib.crc32(data))
        kw.setdefault("size", len(data))
    return {"name": name, "method": method, "flags": 0, **kw}


def _write_zip(entries: list[dict]) -> bytes:
    """A zip archive of ``entries`` (no zip64: every size under 4 GiB), written field by field."""
    out, central = io.BytesIO(), io.BytesIO()
    for e in entries:
        name = e["name"].encode()
        offset = out.tell()
        out.write(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, e["flags"], e["method"], 0, 33,
                              e["crc"], len(e["payload"]), e["size"], len(name), 0))
        out.write(name + e["payload"])
        central.write(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, e["flags"], e["method"], 0, 33,
                                  e["crc"], len(e["payload"]), e["size"], len(name), 0, 0, 0, 0, 0o644 << 16,
                                  offset))
        central.write(name)
    start = out.tell()
    out.write(central.getvalue())
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central.getvalue()),
                          start, 0))
    return out.getvalue()


def _members(data: bytes) -> list[dict]:
    """The members of a timeline file, as entries for ``_write_zip`` (their methods kept)."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [_entry(i.filename, z.read(i), i.compress_type) for i in z.infolist()]


def _rebuilt(data: bytes, replace: dict | None = None, drop=(), add=()) -> bytes:
    """``data`` with members replaced (name → bytes or entry), dropped, or added (entries)."""
    entries = []
    for e in _members(data):
        if e["name"] in drop:
            continue
        new = (replace or {}).get(e["name"])
        if isinstance(new, dict):
            e = new
        elif new is not None:
            e = _entry(e["name"], new, e["method"])
        entries.append(e)
    return _write_zip(entries + list(add))


def _header_of(data: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return json.loads(z.read("timeline.json"))


def _with_header(fn):
    def apply(data):
        header = _header_of(data)
        fn(header)
        return _rebuilt(data, {"timeline.json": json.dumps(header).encode()})
    return apply


def _damaged_routing(data: bytes) -> bytes:
    """The routing of step 10 with one of its own members left out, stored as the format says."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        inner = z.read("steps/1.npz")
    smaller = _rebuilt(inner, drop={"s0.sum_probs.npy"})
    return _rebuilt(data, {"steps/1.npz": _entry("steps/1.npz", smaller, zipfile.ZIP_STORED)})


def _encrypted(data: bytes) -> bytes:
    entries = _members(data)
    entries[-1]["flags"] = 0x1
    return _write_zip(entries)


# ----------------------------------------------------------------------------- round trips
def test_round_trip_with_banks(banked, tmp_path):
    path = banked.save(tmp_path / "run")
    assert path == tmp_path / "run.npz" and sorted(os.listdir(tmp_path)) == ["run.npz"]
    loaded = ll.Timeline.load(path)
    assert_same_timeline(loaded, banked)
    assert len(loaded.banks) == 3 and list(loaded.banks[0]) == ["query:32x32", "value:32x32"]
    assert not np.array_equal(loaded.banks[0]["query:32x32"], loaded.banks[2]["query:32x32"])  # it moved
    pdt.assert_frame_equal(ll.timeline_expert_similarity(loaded), ll.timeline_expert_similarity(banked))
    assert loaded.routings[0].labels == banked.routings[0].labels == [0, 1]
    assert_same_timeline(ll.Timeline.load(tmp_path / "run"), banked)  # the suffix save added, found
    assert banked.save(tmp_path / "again.npz").read_bytes() == path.read_bytes()  # the same bytes


def test_round_trip_without_banks(bankless, tmp_path):
    loaded = ll.Timeline.load(bankless.save(tmp_path / "t.npz"))
    assert loaded.banks == [] and loaded.track_experts is False
    assert_same_timeline(loaded, bankless)
    with zipfile.ZipFile(tmp_path / "t.npz") as z:
        assert z.namelist() == ["timeline.json", "steps/0.npz", "steps/1.npz", "steps/2.npz"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist()[1:])
        header = json.loads(z.read("timeline.json"))
    assert header == {"format": "lily_lab-timeline", "format_version": 1, "track_experts": False,
                      "max_tokens": 64, "steps": [0, 10, 20], "banks": None}


def test_an_empty_timeline_and_nonfinite_banks(tmp_path):
    empty = ll.Timeline.load(ll.Timeline(max_tokens=5).save(tmp_path / "empty"))
    assert len(empty) == 0 and empty.max_tokens == 5 and empty.track_experts
    t = _small_timeline()
    t.banks[1]["proj:4x3"][0, 0, :2] = [np.nan, np.inf]  # a diverged run: kept as it is
    assert_same_timeline(ll.Timeline.load(t.save(tmp_path / "nan")), t)


def test_add_then_save_and_load(banked, bankless, tmp_path):
    t = ll.Timeline()
    for step, routing, banks in zip(banked.steps, banked.routings, banked.banks):
        t.add(np.int64(step + 1), routing, banks)
    assert t.steps == [1, 11, 21] and t.routings == banked.routings
    source = banked.banks[0]["query:32x32"]
    assert t.banks[0]["query:32x32"] is not source and np.array_equal(t.banks[0]["query:32x32"], source)  # copied
    loaded = ll.Timeline.load(t.save(tmp_path / "added"))
    assert_same_timeline(loaded, t)
    pdt.assert_frame_equal(ll.timeline_expert_similarity(loaded), ll.timeline_expert_similarity(t))
    # Without banks, and observing on after adding: one list of observations.
    plain = ll.Timeline(track_experts=False)
    plain.add(3, bankless.routings[0])
    loaded = ll.Timeline.load(plain.save(tmp_path / "plain"))
    assert loaded.steps == [3] and loaded.banks == []
    small = _small_timeline()
    small.add(11, small.routings[0], {g: b + 1 for g, b in small.banks[0].items()})
    assert small.steps == [0, 5, 10, 11] and len(small.banks) == 4


def test_add_refuses_what_it_cannot_keep(banked):
    routing, banks = banked.routings[0], banked.banks[0]
    cases = [
        (lambda: ll.Timeline().add(0, routing), RoutingError, "pass banks="),
        (lambda: ll.Timeline(track_experts=False).add(0, routing, banks), RoutingError, "track_experts=False"),
        (lambda: ll.Timeline().add("first", routing, banks), RoutingError, "step must be an integer"),
        (lambda: ll.Timeline().add(True, routing, banks), RoutingError, "step must be an integer"),
        (lambda: ll.Timeline().add(0, routing.usage(), banks), TypeError, "routing must be a lily_lab Routing"),
        (lambda: ll.Timeline().add(0, routing, [banks]), TypeError, "banks must be a dict"),
        (lambda: ll.Timeline().add(0, routing, {"query:32x32": torch.zeros(3, 4, 32)}), TypeError, "np.ndarray"),
        (lambda: ll.Timeline().add(0, routing, {1: banks["query:32x32"]}), TypeError, "groups must be strings"),
        (lambda: ll.Timeline().add(0, routing, {"query:32x32": banks["query:32x32"].astype(np.float64)}),
         RoutingError, "astype(np.float32)"),
        (lambda: ll.Timeline().add(0, routing, {"query:32x32": banks["query:32x32"][0]}), RoutingError,
         "shape (E, r, d_out)"),
        (lambda: ll.Timeline().add(0, routing, {"query:32x32": banks["query:32x32"][:2]}), RoutingError,
         "2 experts"),
    ]
    for call, kind, fragment in cases:
        with pytest.raises(kind, match=fragment.replace("(", r"\(").replace(")", r"\)")) as info:
            call()
        assert isinstance(info.value, ll.LilyLabError) and "Timeline.add" in str(info.value)


def test_save_refuses_a_timeline_it_cannot_hold(banked, tmp_path):
    toy = ll.Timeline()
    toy.steps.append(0)
    toy.banks.append({"g": np.zeros((2, 1, 3), np.float32)})
    with pytest.raises(RoutingError, match="1 steps but 0 routings"):
        toy.save(tmp_path / "toy")
    mixed = ll.Timeline()
    for step, routing, banks in zip(banked.steps, banked.routings, banked.banks):
        mixed._append(step, routing, banks if step == 0 else None)  # track_experts switched off after step 0
    with pytest.raises(RoutingError, match="banks for 1 of its 3 steps"):
        mixed.save(tmp_path / "mixed")
    wide = ll.Timeline()
    wide.add(0, banked.routings[0], banked.banks[0])
    wide.banks[0]["query:32x32"] = wide.banks[0]["query:32x32"].astype(np.float64)
    with pytest.raises(RoutingError, match="step 0.*float32"):
        wide.save(tmp_path / "wide")
    with pytest.raises(TypeError, match="path must be"):
        banked.save(5)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- tampered files
CASES = {
    "extra member": (lambda d: _rebuilt(d, add=[_entry("notes.txt", b"hello")]), "does not define"),
    "missing bank": (lambda d: _rebuilt(d, drop={"banks/1.0.f32"}), "no members.*banks/1.0.f32"),
    "missing routing": (lambda d: _rebuilt(d, drop={"steps/2.npz"}), "no members.*steps/2.npz"),
    "member twice": (lambda d: _rebuilt(d, add=[_members(d)[-1]]), "twice"),
    "a routing deflated": (lambda d: _rebuilt(d, {"steps/0.npz": _entry("steps/0.npz", _members(d)[1]["payload"])}),
                           "not stored"),
    "a bank too short": (lambda d: _rebuilt(d, {"banks/0.0.f32": bytes(1532)}), "claims 1,532 bytes"),
    "a bank's shape in the header": (_with_header(lambda h: h["banks"][0][0].update(shape=[3, 4, 16])),
                                     "claims 1,536 bytes, not 768"),
    "a bank of shape 0": (_with_header(lambda h: h["banks"][0][0].update(shape=[0, 4, 32])), "integers ≥ 1"),
    "a bank of two axes": (_with_header(lambda h: h["banks"][0][0].update(shape=[12, 32])), "integers ≥ 1"),
    "a bank group twice": (_with_header(lambda h: h["banks"][0][1].update(group=h["banks"][0][0]["group"])),
                           "twice"),
    "banks for two of three steps": (_with_header(lambda h: h["banks"].pop()), "one entry per step"),
    "wrong format": (_with_header(lambda h: h.update(format="lily_lab-routing")), "not a lily_lab timeline file"),
    "newer version": (_with_header(lambda h: h.update(format_version=2)), "newer lily_lab.*upgrade"),
    "version 0": (_with_header(lambda h: h.update(format_version=0)), "format_version is 0"),
    "version true": (_with_header(lambda h: h.update(format_version=True)), "format_version is True"),
    "an unknown header key": (_with_header(lambda h: h.update(probe=[1, 2])), r"keys \['probe'\]"),
    "a header key missing": (_with_header(lambda h: h.pop("max_tokens")), "lacks keys"),
    "steps as text": (_with_header(lambda h: h.update(steps=["0", 10, 20])), "not a list of integers"),
    "a step true": (_with_header(lambda h: h.update(steps=[True, 10, 20])), "not a list of integers"),
    "fewer steps than routings": (_with_header(lambda h: h.update(steps=[0, 10], banks=h["banks"][:2])),
                                  "does not define.*steps/2.npz"),
    "a million steps": (_with_header(lambda h: h.update(steps=list(range(10**6)), banks=None)),
                        "holds 10 members, but its header .1,000,000 steps. implies 1,000,001"),
    "track_experts 1": (_with_header(lambda h: h.update(track_experts=1)), "track_experts"),
    "max_tokens -1": (_with_header(lambda h: h.update(max_tokens=-1)), "max_tokens"),
    "header not JSON": (lambda d: _rebuilt(d, {"timeline.json": b"{"}), "not readable JSON"),
    "header a list": (lambda d: _rebuilt(d, {"timeline.json": b"[1, 2]"}), "not a lily_lab timeline file"),
    "header deeply nested": (lambda d: _rebuilt(d, {"timeline.json": b"[" * 50_000}), "not readable JSON"),
    "a damaged routing": (_damaged_routing, "steps/1.npz.*step 10.*no members"),
    "an encrypted member": (_encrypted, "encrypted"),
    "bzip2": (lambda d: _rebuilt(d, {"banks/0.0.f32": _entry("banks/0.0.f32", b"", 12, payload=bz2.compress(
        bytes(1536)), crc=zlib.crc32(bytes(1536)), size=1536)}), "compression method 12"),
    "a stored member's sizes differ": (lambda d: _rebuilt(d, {"steps/0.npz": {**_members(d)[1], "size": 10**6}}),
                                       "stored, but claims"),
    "a CRC wrong": (lambda d: _rebuilt(d, {"banks/2.1.f32": {**_members(d)[-1], "crc": 12345}}), "CRC"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_tamper_is_refused(case, good, tmp_path):
    tamper, match = CASES[case]
    path = tmp_path / "bad.npz"
    path.write_bytes(tamper(good))
    with pytest.raises(RoutingError, match=match) as info:
        ll.Timeline.load(path)
    assert str(path) in str(info.value) and str(info.value).startswith("Timeline.load: ")


def test_the_hand_written_zip_is_a_good_timeline(good, banked, tmp_path):
    path = tmp_path / "rebuilt.npz"
    path.write_bytes(_rebuilt(good))
    assert_same_timeline(ll.Timeline.load(path), banked)


def test_a_timeline_cut_after_a_routing_is_not_taken_for_one(good, tmp_path):
    """zipfile finds a directory's end record anywhere in the last 64 KiB: cut just after a stored
    routing, a timeline ends with that routing's record, and would read as a routing file."""
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = z.getinfo("steps/1.npz")
    end = info.header_offset + 30 + len(info.filename) + info.compress_size
    path = tmp_path / "cut.npz"
    path.write_bytes(good[:end])
    with zipfile.ZipFile(path) as z:
        assert "__header__.npy" in z.namelist()  # what zipfile alone makes of it
    with pytest.raises(RoutingError, match="damaged lily_lab timeline file.*cut short") as info:
        ll.Timeline.load(path)
    assert "routing file" not in str(info.value)
    path.write_bytes(good + b"trailing")
    with pytest.raises(RoutingError, match="bytes after it"):
        ll.Timeline.load(path)


def test_not_a_timeline(banked, tmp_path):
    routing_path = banked.routings[0].save(tmp_path / "routing")
    with pytest.raises(RoutingError, match="is a routing file, not a timeline: use Routing.load"):
        ll.Timeline.load(routing_path)
    for name, data, match in (("text.npz", b"step,value\n0,1\n", "not a lily_lab timeline file .a zip archive"),
                              ("empty.npz", b"", "not a lily_lab timeline file"),
                              ("other.zip", _write_zip([_entry("a.txt", b"a")]), "no timeline.json member")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RoutingError, match=match) as info:
            ll.Timeline.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(ll.LilyLabFileNotFoundError, match="no timeline file at.*missing.npz") as info:
        ll.Timeline.load(tmp_path / "missing.npz")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ll.LilyLabFileError, match="is a folder"):
        ll.Timeline.load(tmp_path)
    with pytest.raises(TypeError, match="path must be"):
        ll.Timeline.load(None)


@pytest.fixture(scope="module")
def gib_of_zeros():
    payload, crc = _zeros_deflated(1024)
    assert len(payload) < 2 << 20  # ~1 MB: under deflate's 1032:1, so the ratio check alone lets it by
    return payload, crc


@pytest.mark.parametrize("where", ["a bank", "a routing", "an extra member", "the header"])
def test_a_gib_zip_bomb_is_refused_unread(where, good, gib_of_zeros, tmp_path):
    payload, crc = gib_of_zeros
    name = {"a bank": "banks/0.0.f32", "a routing": "steps/0.npz", "an extra member": "zeros.bin",
            "the header": "timeline.json"}[where]
    bomb = _entry(name, b"", payload=payload, crc=crc, size=GIB)
    data = _rebuilt(good, add=[bomb]) if where == "an extra member" else _rebuilt(good, {name: bomb})
    path = tmp_path / "bomb.npz"
    path.write_bytes(data)
    match = {"a bank": "claims 1,073,741,824 bytes, not 1,536", "a routing": "not stored",
             "an extra member": "does not define.*zeros.bin", "the header": "timeline.json claims"}[where]
    seconds, peak = refusal_cost(lambda: ll.Timeline.load(path), RoutingError, match)
    assert seconds < 2.0
    assert peak < 50 << 20, peak


# ----------------------------------------------------------------------------- saving
def test_saving_into_a_missing_folder_leaves_nothing(banked, tmp_path):
    with pytest.raises(ll.LilyLabFileNotFoundError, match="cannot write the timeline file.*nowhere") as info:
        banked.save(tmp_path / "nowhere" / "t.npz")
    assert isinstance(info.value, FileNotFoundError) and ".tmp" not in str(info.value)
    assert os.listdir(tmp_path) == []
    (tmp_path / "taken.npz").mkdir()  # a folder where the file belongs
    with pytest.raises(ll.LilyLabFileError, match="taken.npz"):
        banked.save(tmp_path / "taken.npz")
    assert os.listdir(tmp_path) == ["taken.npz"] and os.listdir(tmp_path / "taken.npz") == []


def test_saving_over_a_file_is_atomic(banked, bankless, tmp_path, monkeypatch):
    path = bankless.save(tmp_path / "t.npz")
    old = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lily_lab.core.files.os, "fsync", failing_fsync)
    with pytest.raises(ll.LilyLabFileError, match="No space left.*t.npz") as info:
        banked.save(path)
    assert ".tmp" not in str(info.value)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["t.npz"]  # the old file, no temporary file
    monkeypatch.undo()
    banked.save(path)
    assert os.listdir(tmp_path) == ["t.npz"]
    assert_same_timeline(ll.Timeline.load(path), banked)


# ----------------------------------------------------------------------------- the fuzz test
def test_truncated_and_flipped_files(tmp_path):
    original = _small_timeline()
    path = original.save(tmp_path / "t.npz")
    data = path.read_bytes()
    want = ll.timeline_metrics(original)
    outcomes = {"cut refused": 0, "cut loaded": 0, "flip refused": 0, "flip loaded": 0}

    def attempt(bad: bytes, kind: str, detail: str) -> None:
        path.write_bytes(bad)
        try:
            loaded = ll.Timeline.load(path)
        except ll.LilyLabError as err:
            assert str(path) in str(err), (detail, err)
            outcomes[kind + " refused"] += 1
            return
        except Exception as err:  # noqa: BLE001 - the finding
            pytest.fail(f"{detail}: {type(err).__name__}: {err}")
        outcomes[kind + " loaded"] += 1
        assert loaded.steps == original.steps, detail
        for a, b in zip(loaded.banks, original.banks):
            assert a.keys() == b.keys() and all(np.array_equal(a[g], b[g]) for g in b), detail
        pdt.assert_frame_equal(ll.timeline_metrics(loaded), want, obj=detail)

    for n in np.linspace(0, len(data) - 1, N_CUTS).astype(int).tolist():
        attempt(data[:n], "cut", f"cut at {n} of {len(data)}")
    # Half the flips anywhere (mostly compressed data, which CRCs guard), half in the zip's own
    # structure — local headers, the central directory — where they say most about the reader.
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        structure = [(i.header_offset, i.header_offset + 30 + len(i.filename)) for i in z.infolist()]
    structure.append((data.find(b"PK\x01\x02"), len(data)))
    rng = random.Random(SEED)
    for i in range(N_FLIPS):
        if i % 2:
            start, end = rng.choice(structure)
            pos = rng.randrange(start, end)
        else:
            pos = rng.randrange(len(data))
        xor = rng.randrange(1, 256)
        bad = bytearray(data)
        bad[pos] ^= xor
        attempt(bytes(bad), "flip", f"flip {i}: byte {pos} ^ {xor:#04x}")
    assert outcomes["cut refused"] == N_CUTS and outcomes["cut loaded"] == 0, outcomes
    assert outcomes["flip refused"] + outcomes["flip loaded"] == N_FLIPS, outcomes
    assert outcomes["flip refused"] > N_FLIPS // 2, outcomes  # most bytes are checked (CRCs, sizes, names)


def test_routing_bytes_are_stored_as_routing_save_writes_them(banked, good):
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        for i, routing in enumerate(banked.routings):
            assert z.read(f"steps/{i}.npz") == routing_bytes(routing)
