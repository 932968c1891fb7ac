"""Damaged and tampered classifier heads (``classifier_head.safetensors``, which ``lily-lab report``
reads with ``demo.head_num_labels`` and then ``demo.load_head``): 1,000+ head files corrupted at
random (seeded) from the head of a tiny random BERT classifier, and a few that declare gigabytes.

Every case either raises :class:`~lily_lab.CheckpointError` naming the file — and leaves the
model bit for bit as it was — or loads exactly the head the bytes hold, as ``safetensors`` itself
reads them, and changes nothing else in the model. Python's allocations stay under twice the
file's size (plus a fixed allowance), and in a subprocess capped in address space, files that
declare gigabytes are refused without the process growing.

Reproduce fuzz case ``i`` with ``_mutate(random.Random(SEED * 100_003 + i), good, kind)``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load as st_load

import lily_lab as ll
from lily_lab.app import demo as D

from _measure import traced

transformers = pytest.importorskip("transformers")

SEED = 20261207
N_BYTES, N_HEADER, N_VALUES = 400, 450, 150  # 1,000 corrupted files in all
TINY = dict(vocab_size=21, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
HIDDEN = TINY["hidden_size"]
HEAD = ("classifier.bias", "classifier.weight")
# What Python allocates on a refusal or a load besides what scales with the file (json's parse,
# the message, safetensors' bookkeeping): ~15 kB measured. Small enough that reading a header's
# bytes, its text and its parsed values all at once (3×, as read_header once did) fails the 2×
# bound on the 60 kB headers below.
PY_ALLOWANCE = 32 << 10


def _classifier(num_labels: int, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=num_labels)).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The head of a second, differently seeded classifier, as ``save_head`` writes it: loading it
    changes the test's model, so a load that silently did nothing would be seen."""
    trained = _classifier(2, seed=1)
    folder = tmp_path_factory.mktemp("trained")
    path = D.save_head(trained, D.head_parameter_names(trained), folder)
    return path.read_bytes()


# ----------------------------------------------------------------------------- a head file's parts
def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n]), data[8 + n:]


def _join(header: dict | bytes, payload: bytes, pad: bool = True) -> bytes:
    """A file of ``header`` (JSON, padded with spaces to a multiple of 8 as safetensors writes it,
    when ``pad``; bytes: as they are) and ``payload``."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if pad and not isinstance(header, bytes):
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + payload


def _tensors(data: bytes) -> dict[str, tuple[str, list, bytes]]:
    """name → (dtype, shape, bytes) of a well-formed file, in the order of its data."""
    header, payload = _split(data)
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    return {k: (e["dtype"], e["shape"], payload[e["data_offsets"][0]: e["data_offsets"][1]]) for k, e in items}


_ABSENT = object()


def _build(tensors: dict, metadata=_ABSENT, order=None) -> tuple[dict, bytes]:
    """An honest header and payload for ``tensors`` (laid out in ``order``, default their order);
    a tensor's bytes of None: its declared size, left to the caller to supply (a sparse file)."""
    header, payload, at = {}, b"", 0
    if metadata is not _ABSENT:
        header["__metadata__"] = metadata
    for name in order or tensors:
        dtype, shape, raw = tensors[name]
        size = len(raw) if raw is not None else math.prod(shape) * 4
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        payload, at = payload + (raw or b""), at + size
    return header, payload


_TORCH = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _as(raw: bytes, dtype: str, to: str) -> bytes:
    """``raw`` (of ``dtype``) converted to the float dtype ``to``."""
    t = torch.frombuffer(bytearray(raw), dtype=_TORCH[dtype]).to(_TORCH[to])
    return t.numpy().tobytes() if to != "BF16" else t.view(torch.int16).numpy().tobytes()


def _honest(rng: random.Random, shape: list, dtype: str = "F32") -> tuple[str, list, bytes]:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    t = torch.randn(math.prod(shape), generator=g)
    return dtype, shape, _as(t.numpy().tobytes(), "F32", dtype)


# ----------------------------------------------------------------------------- the mutations
# Each returns (file bytes, expectation): "load" (the file is a valid head for the model, which
# must load), "refuse", or None (either is right; what loads must still equal what the bytes say).
def _mutate_bytes(rng: random.Random, data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    b = bytearray(data)
    how = rng.random()
    if how < 0.12:
        return bytes(b[: rng.randrange(len(b))]), "refuse"
    if how < 0.24:  # the length field
        length = rng.choice([0, 1, 2, 7, n - 8, n - 1, n + 1, n + 8, len(b) - 8, len(b), 2**31, 2**63, 2**64 - 1,
                             100_000_000, rng.randrange(2**64)])
        return bytes(struct.pack("<Q", length) + b[8:]), "refuse" if length != n else "load"
    if how < 0.30:  # junk after the data
        return bytes(b + bytes(rng.randrange(256) for _ in range(rng.choice((1, 4, 8, 13))))), "refuse"
    in_data = True
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        i = rng.randrange(8 + n) if rng.random() < 0.45 else rng.randrange(len(b))
        in_data &= i >= 8 + n
        b[i] = rng.randrange(256) if rng.random() < 0.5 else b[i] ^ (1 << rng.randrange(8))
    if not in_data:
        return bytes(b), None  # e.g. a padding space that became a tab is still the same header
    finite = all(torch.isfinite(t).all() for t in st_load(bytes(b)).values())
    return bytes(b), "load" if finite else "refuse"


_SHAPES = [[10**12, 32], [2**63], [2**64], [2**64, 2**64], [10**4000, 10**4000], [30_000_000, 0], [0, 32], [2, 0],
           [0], [], [-2, 32], [2, -32], [2, 32, 1], [1, 2, 32], [64], [32, 2], [4, 16], [1, 64], [1, 2], [2, 1],
           [2.0, 32], [True, 32], "2,32", None, [[2], [32]], [2, "32"], {"2": 32}, [3, 32], [3]]
_OFFSETS = [[0, 10**6], [0, 2**64], [-8, 0], [8, 0], [0, 8, 16], [0.0, 8.0], ["0", "8"], None, [0], [], {"0": 8},
            [2**63, 2**63 + 8], [10**5000 // 10**4990, 0]]
_DTYPES = ["F128", "f32", "", 5, None, ["F32"], {"F32": 1}, "BOOL", "U8", "I8", "I16", "I32", "U32", "I64",
           "F8_E4M3", "F8_E5M2", "float32", "F32 ", "U64"]
_EXTRA = {"bert.embeddings.word_embeddings.weight": [TINY["vocab_size"], HIDDEN], "bert.pooler.dense.bias": [HIDDEN],
          "bert.pooler.dense.weight": [HIDDEN, HIDDEN], "classifier.extra.bias": [2], "score.bias": [2],
          "score.weight": [2, HIDDEN], "classifier.out_proj.bias": [2], "head.bias": [2], "weight": [2, HIDDEN],
          "Classifier.bias": [2], "classifier.bias ": [2], "classifier.bias\u0000": [2], "\ud800": [1]}
# (a head's header may have up to demo.HEAD_MAX_HEADER = 64 KiB: 60,000 characters fit, 300,000 do not)
_GOOD_META = [{"format": "pt"}, {}, {"note": "x" * 60_000}, {"é": "ü", "format": "pt"}, {"format": "np", "a": ""},
              {"note": "\U0001F600" * 500}]
_BAD_META = [{"a": 1}, [], "pt", None, {"a": None}, {"a": {"b": "c"}}, {"a": ["b"]}, {"a": 1.5}, {"a": True}, 0,
             {"note": "x" * 300_000}]


def _edit(rng: random.Random, tensors: dict):
    """One edit of the head's tensors or header; returns (header, payload, expectation, raw) where
    ``raw`` is a replacement header text (not JSON of a dict), or None."""
    tensors = dict(tensors)
    metadata = {"format": "pt"}
    name = rng.choice(list(tensors))
    what = rng.randrange(14)
    if what == 0:  # a dtype the bytes are not, or no dtype at all
        dtype = rng.choice(_DTYPES)
        header, payload = _build(tensors, metadata)
        header[name]["dtype"] = dtype
        return header, payload, "refuse", None
    if what == 1:  # the values honestly stored as another float dtype: a valid head
        dtype, shape, raw = tensors[name]
        to = rng.choice(["F16", "BF16", "F64", "F32"])
        tensors[name] = (to, shape, _as(raw, dtype, to))
        return *_build(tensors, metadata), "load", None
    if what == 2:  # a declared shape the data does not hold, of any size or rank
        shape = rng.choice(_SHAPES)
        header, payload = _build(tensors, metadata)
        if shape == header[name]["shape"]:
            shape = [10**12, 32]
        header[name]["shape"] = shape
        return header, payload, "refuse", None
    if what == 3:  # a shape of the same size, honestly laid out: the wrong rank or a transposed matrix
        dtype, shape, raw = tensors[name]
        size = math.prod(shape)
        other = rng.choice([[size], [1, size], [size, 1], [size // 2, 2], [1, 1, size], [2, size // 2]])
        if other == shape:
            other = [1, 1, size]
        tensors[name] = (dtype, other, raw)
        return *_build(tensors, metadata), "refuse", None
    if what == 4:  # data_offsets out of range, reversed, overlapping, shifted, of the wrong kind
        header, payload = _build(tensors, metadata)
        begin, end = header[name]["data_offsets"]
        other = rng.choice(_OFFSETS + [[begin + 4, end + 4], [begin - 4, end - 4] if begin else [4, end],
                                       [0, end - begin], [end, begin], [begin, len(payload) + 8]])
        if other == [begin, end]:
            other = [end, begin]
        header[name]["data_offsets"] = other
        return header, payload, "refuse", None
    if what == 5:  # a tensor too many (a base weight, a second head's), honestly stored
        extra = rng.choice(list(_EXTRA))
        tensors[extra] = _honest(rng, _EXTRA[extra])
        order = list(tensors)
        rng.shuffle(order)
        return *_build(tensors, metadata, order), "refuse", None
    if what == 6:  # a tensor missing
        del tensors[name]
        return *_build(tensors, metadata), "refuse", None
    if what == 7:  # a tensor renamed
        tensors[rng.choice([k for k in _EXTRA if k not in tensors])] = tensors.pop(name)
        return *_build(tensors, metadata), "refuse", None
    if what == 8:  # __metadata__: strings are fine, anything else is not
        if rng.random() < 0.4:
            return *_build(tensors, dict(rng.choice(_GOOD_META))), "load", None
        return *_build(tensors, rng.choice(_BAD_META)), "refuse", None
    if what == 9:  # the same head, laid out in another order (of the data and of the JSON)
        order = list(tensors)[::-1]
        header, payload = _build(tensors, metadata, order)
        keys = list(header)
        rng.shuffle(keys)
        return {k: header[k] for k in keys}, payload, "load", None
    if what == 10:  # a head for another number of labels or another hidden size, honestly stored
        labels, hidden = rng.choice([(3, HIDDEN), (1, HIDDEN), (5, HIDDEN), (2, 16), (2, 64), (3, 64)])
        tensors = {"classifier.weight": _honest(rng, [labels, hidden]), "classifier.bias": _honest(rng, [labels])}
        return *_build(tensors, metadata), "load" if hidden == HIDDEN else "refuse", None
    if what == 11:  # an entry with a key too many or too few
        header, payload = _build(tensors, metadata)
        entry = header[name]
        if rng.random() < 0.5:
            entry[rng.choice(["offsets", "dtype ", "names", "__metadata__"])] = rng.choice([1, "F32", [0, 8], None])
        else:
            del entry[rng.choice(list(entry))]
        return header, payload, "refuse", None
    header, payload = _build(tensors, metadata)
    text = json.dumps(header, separators=(",", ":"))
    if what == 12:  # text that is JSON and a head, or is a head to one reader and not another
        raw, expect = rng.choice([
            (" " + text, None), ("\n" + text, None), (text + "\n", None), (text + "   \t", None),
            (text.replace(":", ": ").replace(",", ", "), "load"),
            ("\ufeff" + text, None),  # a byte-order mark
            (text.replace('"format":"pt"', '"format":"p\\u0074"'), None),
        ])
        return header, payload, expect, raw.encode()
    # text that is not a head's header at all
    first = next(k for k in header if k != "__metadata__")
    entry = json.dumps(header[first], separators=(",", ":"))
    raw = rng.choice([
        text[:-1], text + "}", text + ",", text[: rng.randrange(len(text))], "[" + text + "]", "null", '"a"',
        text.replace("{", "[", 1), text.replace('"format":"pt"', '"format":NaN'),
        text.replace('"format":"pt"', '"format":"pt","format":"pt"'),
        text[:-1] + f',"{first}":{entry}}}',  # a tensor named twice
        "[" * 30_000 + "]" * 30_000, '{"a":' * 10_000 + "1" + "}" * 10_000,  # deeper than Python recurses
        text.replace('"F32"', '"F\\ud800"', 1), text.replace("classifier", "classif\\u0069er"),
    ]).encode("utf-8", "surrogatepass")
    if rng.random() < 0.15:
        raw = raw.replace(b"classifier", b"classifi\xe9r", 1)  # not UTF-8
    expect = "load" if b"classif\\u0069er" in raw and b"\xe9" not in raw else "refuse"
    return header, payload, expect, raw


def _mutate_header(rng: random.Random, good: bytes):
    tensors = _tensors(good)
    header, payload, expect, raw = _edit(rng, tensors)
    if raw is None and rng.random() < 0.25 and expect != "refuse":  # and a second edit, of the values
        data, expect2 = _mutate_values(rng, _join(header, payload))
        return data, "refuse" if expect2 == "refuse" else expect
    return _join(raw if raw is not None else header, payload, pad=rng.random() < 0.8), expect


_WILD = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3.4e38, -3.4e38, 1e30, 65504.0, 1e300, -1e308]


def _mutate_values(rng: random.Random, data: bytes):
    """Values set to NaN, ±inf, huge, tiny or signed zeros, in a file that stays well-formed:
    a head loads when every value is finite in float32 (the model's dtype)."""
    header, payload = _split(data)
    meta = header.pop("__metadata__", _ABSENT)
    tensors = _tensors(data)
    for _ in range(rng.choice((1, 1, 2, 5))):
        name = rng.choice(list(tensors))
        dtype, shape, raw = tensors[name]
        if rng.random() < 0.3:
            to = rng.choice(["F16", "BF16", "F64"])
            raw, dtype = _as(raw, dtype, to), to
        t = torch.frombuffer(bytearray(raw), dtype=_TORCH[dtype]).clone()
        t[rng.randrange(t.numel())] = torch.tensor(rng.choice(_WILD), dtype=torch.float64).to(t.dtype)  # may overflow
        raw = t.numpy().tobytes() if dtype != "BF16" else t.view(torch.int16).numpy().tobytes()
        tensors[name] = (dtype, shape, raw)
    header, payload = _build(tensors, meta)
    finite = all(torch.isfinite(t.to(torch.float32)).all() for t in st_load(_join(header, payload)).values())
    return _join(header, payload), "load" if finite else "refuse"


def _mutate(rng: random.Random, good: bytes, kind: str):
    """(bytes of a corrupted head file, expectation: "load", "refuse" or None)."""
    if kind == "bytes":
        return _mutate_bytes(rng, good)
    if kind == "header":
        return _mutate_header(rng, good)
    return _mutate_values(rng, good)


# ----------------------------------------------------------------------------- the fuzz test
class Models:
    """A tiny classifier per number of labels (as report sizes it by head_num_labels), each with
    a bit-exact copy of its weights: what a refusal must leave, and a load may change only in the head."""

    def __init__(self):
        self.models, self.before = {}, {}

    def __call__(self, num_labels: int):
        if num_labels not in self.models:
            model = _classifier(num_labels)
            self.models[num_labels] = model
            self.before[num_labels] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self.models[num_labels]

    def assert_as_before(self, num_labels: int, loaded: dict | None = None) -> None:
        """The model's weights are as they were, except the head, which holds ``loaded`` (name →
        tensor, as safetensors reads the file) when given; then the head is put back."""
        model, before = self.models[num_labels], self.before[num_labels]
        now = model.state_dict()
        assert list(now) == list(before)
        for k, v in before.items():
            want = loaded[k].to(v.dtype) if loaded is not None and k in HEAD else v
            assert now[k].shape == want.shape and torch.equal(now[k].reshape(-1).contiguous().view(torch.uint8),
                                                              want.reshape(-1).contiguous().view(torch.uint8)), k
        if loaded is not None:
            with torch.no_grad():
                for k in HEAD:
                    now[k].copy_(before[k])


def _attempt(models: Models, folder, path) -> tuple[int, int]:
    """What report does with a head file: size the model by ``head_num_labels``, then
    ``load_head``. Returns (the number of labels, the peak Python allocated in either call; the
    model is built outside the measurement), or raises with that peak as ``peak``."""
    n, peak = traced(D.head_num_labels, path, HIDDEN)
    assert isinstance(n, int) and n >= 1
    model = models(n)
    try:
        return n, max(peak, traced(D.load_head, model, folder)[1])
    except ll.CheckpointError as err:
        err.peak = max(peak, err.peak)
        raise


def test_corrupted_heads_raise_or_load_what_they_hold(good, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    path = folder / D.HEAD_FILE
    models = Models()
    path.write_bytes(good)
    assert _attempt(models, folder, path)[0] == 2  # the honest file loads (and one-off costs are paid)
    models.assert_as_before(2, st_load(good))
    outcomes = {"refused": 0, "loaded": 0}
    kinds = {"bytes": [0, 0], "header": [0, 0], "values": [0, 0]}
    worst = (0.0, None)
    t0 = time.perf_counter()
    for i in range(N_BYTES + N_HEADER + N_VALUES):
        rng = random.Random(SEED * 100_003 + i)
        kind = "bytes" if i < N_BYTES else "header" if i < N_BYTES + N_HEADER else "values"
        data, expect = _mutate(rng, good, kind)
        path.write_bytes(data)
        try:
            n, peak = _attempt(models, folder, path)
        except ll.CheckpointError as err:
            peak = err.peak
            assert str(path) in str(err) and "\n" not in str(err) and len(str(err)) < 1000, (i, str(err)[:2000])
            assert expect != "load", (i, kind, str(err))
            # the 2-label model report would have built had the header said so: refused alike, untouched
            with pytest.raises(ll.CheckpointError, match=re.escape(str(path))):
                D.load_head(models(2), folder)
            for labels in models.models:
                models.assert_as_before(labels)
            outcomes["refused"] += 1
            kinds[kind][0] += 1
        else:
            assert expect != "refuse", (i, kind)
            tensors = st_load(data)  # what the bytes hold, as safetensors reads them
            assert sorted(tensors) == list(HEAD), (i, sorted(tensors))
            assert all(torch.isfinite(t.to(torch.float32)).all() for t in tensors.values()), i
            models.assert_as_before(n, tensors)
            for labels in models.models:
                models.assert_as_before(labels)
            outcomes["loaded"] += 1
            kinds[kind][1] += 1
        ratio = (peak - PY_ALLOWANCE) / len(data) if data else 0
        worst = max(worst, (ratio, i))
    elapsed = time.perf_counter() - t0
    # Python allocates at most twice the file (its bytes, and safetensors' copy of its data),
    # besides a fixed allowance.
    assert worst[0] < 2, worst
    assert outcomes["refused"] > 500 and outcomes["loaded"] > 100, (outcomes, kinds)
    assert all(refused > 20 and loaded > 10 for refused, loaded in kinds.values()), kinds
    assert elapsed < 45, elapsed


def test_a_header_of_wide_characters_costs_a_bounded_multiple_of_the_cap(good, tmp_path):
    """One character above U+FFFF, written as UTF-8 the way safetensors writes metadata, makes
    Python hold the header's text and each string in it at 4 bytes a character: beyond twice the
    file. That is why a head's header is capped (``demo.HEAD_MAX_HEADER``): the cost stays under
    10× the cap (measured: 8.9× the header), a fixed amount, and a header over the cap is refused
    before it is read."""
    header, payload = _build(_tensors(good), {"note": "x" * 60_000})
    text = json.dumps(header, separators=(",", ":")).replace('"x', '"\U0001F600x', 1)  # as UTF-8
    path = tmp_path / D.HEAD_FILE
    for note, refused in ((60_000, False), (D.HEAD_MAX_HEADER, True)):
        raw = text.replace("x" * 60_000, "x" * note).encode()
        path.write_bytes(_join(raw, payload))
        models = Models()
        try:
            n, peak = _attempt(models, tmp_path, path)
            assert not refused and n == 2
            models.assert_as_before(2, st_load(path.read_bytes()))
        except ll.CheckpointError as err:
            assert refused and "more than the 65,536" in str(err), str(err)
            peak = err.peak
        assert peak < (10 * D.HEAD_MAX_HEADER if not refused else 0) + PY_ALLOWANCE, (note, peak)


# ----------------------------------------------------------------------------- declared gigabytes
def _huge_cases(good: bytes) -> dict[str, tuple[bytes, int]]:
    """name → (file bytes, size of the file on disk once sparse-extended; 0: not extended)."""
    tensors = _tensors(good)
    header, payload = _build(tensors, {"format": "pt"})

    def declared(name, **entry):
        h = json.loads(json.dumps(header))
        h[name].update(entry)
        return _join(h, payload)

    gib = 1 << 30
    base_weight = dict(tensors, **{"bert.embeddings.word_embeddings.weight": ("F32", [gib // 4 // 1024, 1024], None)})
    sparse_extra, _ = _build(base_weight, {"format": "pt"})
    many = {"classifier.weight": ("F32", [30_000_000, HIDDEN], None), "classifier.bias": ("F32", [30_000_000], None)}
    sparse_many, _ = _build(many)
    zero_width = dict(tensors, **{"classifier.bias": ("F32", [30_000_000, 0], b"")})
    return {
        "30 million labels of zero width": (_join(*_build(zero_width)), 0),
        "a 10¹² × 32 weight": (declared("classifier.weight", shape=[10**12, HIDDEN]), 0),
        "a 2⁶² bias in its 8 bytes": (declared("classifier.bias", shape=[2**62]), 0),
        "offsets of 4 GiB": (declared("classifier.weight", data_offsets=[0, 4 * gib]), 0),
        "a shape of 8,000 digits": (declared("classifier.weight", shape=[10**4000, 10**4000]), 0),
        "header length 2⁶³": (struct.pack("<Q", 2**63) + good[8:], 0),
        "header length 100 MB": (struct.pack("<Q", 100_000_000) + good[8:], 0),
        # sparse files: the header is honest about gigabytes the disk does not hold
        "a 1 GiB base weight beside the head": (_join(sparse_extra, payload), gib),
        "an honest 30-million-label head": (_join(sparse_many, b""), 30_000_000 * (HIDDEN + 1) * 4),
    }


HUGE_RUN = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path
    import torch, transformers
    from lily_lab import CheckpointError
    from lily_lab.app import demo as D
    torch.set_num_threads(1)
    folder, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**json.loads(sys.argv[3]))).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    D.load_head(model, folder / "good")  # the honest head: one-off costs paid before measuring
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(before[k])
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (256 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {}
    for name in cases:
        sub = folder / name
        t0 = time.perf_counter()
        try:
            n = D.head_num_labels(sub / D.HEAD_FILE, 32)
        except CheckpointError as err:
            n = str(err)
        try:
            D.load_head(model, sub)
            loaded = "loaded"
        except CheckpointError as err:
            loaded = str(err)
        same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        out[name] = dict(num_labels=n, load=loaded, same=same, seconds=time.perf_counter() - t0,
                         growth=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    print(json.dumps(out))
""")
# Why a subprocess, an address-space cap and ru_maxrss: tracemalloc (above) sees Python's
# allocations but not torch's, and a loader that sized a tensor by a declared shape would do it
# in torch (torch.empty(shape), a model of that many labels). Peak RSS alone misses an allocation
# never written to (torch.empty of 4 GiB costs no RSS), so the process is also capped at 256 MiB of
# address space above what it holds after the imports and one honest load: any allocation sized
# by these headers (≥ 1 GiB each) fails with MemoryError or RuntimeError, not CheckpointError.
# Peak RSS may then grow by at most 2 × the largest file's bytes on disk (all under 1 kB here) plus
# 8 MiB: the interpreter's own churn (error messages, json, malloc's arenas), measured at ~0.3 MiB.
RSS_ALLOWANCE = 8 << 20
# the sparse files' headers are honest: case → (head_num_labels, what load_head's refusal names)
HONEST_HEADERS = {"a 1 GiB base weight beside the head": (2, "'bert.embeddings.word_embeddings.weight'"),
                  "an honest 30-million-label head": (30_000_000, "[30000000]")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS, ru_maxrss in kB and /proc are Linux's")
def test_heads_that_declare_gigabytes_are_refused_without_allocating(good, tmp_path):
    cases = _huge_cases(good)
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / D.HEAD_FILE).write_bytes(good)
    on_disk = 0
    for name, (data, sparse_size) in cases.items():
        (tmp_path / name).mkdir()
        path = tmp_path / name / D.HEAD_FILE
        path.write_bytes(data)
        on_disk = max(on_disk, len(data))
        if sparse_size:
            with open(path, "r+b") as f:
                f.truncate(len(data) + sparse_size)  # a hole: no disk, no page cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", HUGE_RUN, str(tmp_path), json.dumps(list(cases)),
                           json.dumps(dict(TINY, num_labels=2))], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    for name, got in out.items():
        path = str(tmp_path / name / D.HEAD_FILE)
        assert got["same"], name
        assert got["load"] != "loaded" and path in got["load"], (name, got)
        if name in HONEST_HEADERS:  # sized from the header alone, which says what the file holds;
            assert got["num_labels"] == HONEST_HEADERS[name][0], got  # but not this model's head:
            assert HONEST_HEADERS[name][1] in got["load"], got  # refused before a byte of data is read
        else:
            assert isinstance(got["num_labels"], str) and path in got["num_labels"], (name, got)
        assert got["seconds"] < 2, (name, got)
        assert got["growth"] < 2 * on_disk + RSS_ALLOWANCE, (name, got)
