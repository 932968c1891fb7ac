"""Read and check a safetensors file's header before anything is allocated from it.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON naming each
tensor's ``dtype``, ``shape`` and ``data_offsets`` (``[begin, end)`` in the data that follows), then
the data. Everything in the header is a claim: :func:`read_header` reads only the header, and
checks that its length fits the file, that it is a JSON object of well-formed entries, and that the
entries tile the data exactly, each holding ``prod(shape) * itemsize`` bytes — so no declared
shape can ask for more than the file holds.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

from .errors import CheckpointError

#: bytes per element of the dtypes safetensors names
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


class TensorEntry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data after the header
    end: int


def read_header(path: str | os.PathLike, fix: str = "", max_header: int = MAX_HEADER_BYTES) -> dict[str, TensorEntry]:
    """The tensors ``path`` declares, checked against its size; a :class:`CheckpointError` that
    names the file (and ends with ``fix``, when given) for anything malformed, or for a header of
    more than ``max_header`` bytes.

    Python holds up to about twice the header's bytes while it parses (its text, then the parsed
    values), but one character above U+FFFF makes a string cost 4 bytes a character: a header of
    ``n`` bytes can then take ~9 ``n`` (its text and one long string in it, at 4 bytes a character,
    and json's working copy). A caller that knows its files' headers are small bounds that with
    ``max_header``."""
    path = Path(path)
    max_header = min(max_header, MAX_HEADER_BYTES)

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {problem}" + (f"; {fix}" if fix else ""))

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise bad(f"it has {size} bytes, fewer than the 8 of the header length")
            (n,) = struct.unpack("<Q", prefix)
            if n < 2 or n > size - 8:
                raise bad(f"its header claims {n:,} bytes, but the file has {size - 8:,} after the length")
            if n > max_header:
                raise bad(f"its header claims {n:,} bytes, more than the {max_header:,} this file's header may have")
            raw = f.read(n)
    except OSError as err:
        raise CheckpointError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    if len(raw) != n:
        raise bad("the file changed while it was read")
    try:
        text = raw.decode("utf-8")
        del raw  # the bytes and the text and the parsed header are not all held at once
        header = json.loads(text, object_pairs_hook=_no_repeats)
    except _Repeated as err:
        raise bad(f"its header names {shorten(err.args[0])} more than once") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"its header is not JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not an object of strings")
    data_size = size - 8 - n
    entries = {}
    for name, entry in header.items():
        entries[name] = _entry(name, entry, data_size, bad)
    at = 0
    for name, e in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if e.begin != at:
            raise bad(f"tensor {shorten(name)} starts at byte {e.begin:,} of the data, expected {at:,} (gap or overlap)")
        at = e.end
    if at != data_size:
        raise bad(f"the tensors cover {at:,} bytes of data, but the file holds {data_size:,}")
    return entries


def _entry(name: str, entry, data_size: int, bad) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise bad(f"entry {shorten(name)} is not an object of dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise bad(f"tensor {shorten(name)} has dtype {shorten(dtype)}, not one of {', '.join(ITEMSIZE)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"tensor {shorten(name)} has shape {shorten(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] <= data_size):
        raise bad(f"tensor {shorten(name)} has data_offsets {shorten(offsets)}, not [begin, end] within the "
                  f"{data_size:,} bytes of data")
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != nbytes:
        # nbytes can have more digits than Python will format (``sys.get_int_max_str_digits()``):
        # a size beyond the data is said as such, not spelled out.
        size = f"{nbytes:,} bytes" if nbytes <= data_size else f"more than the {data_size:,} bytes of data"
        raise bad(f"tensor {shorten(name)} declares shape {shorten(shape)} of {dtype} ({size}) but spans "
                  f"{offsets[1] - offsets[0]:,} bytes")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def shorten(value, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters: a header's names and values go into a
    one-line message, and a hostile header can make them megabytes long (or integers with more
    digits than Python will format)."""
    try:
        text = repr(value)
    except ValueError:  # an integer beyond sys.get_int_max_str_digits()
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 5] + "…" + text[-4:]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _Repeated(ValueError):
    pass


def _no_repeats(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Repeated(sorted(k for k in set(keys) if keys.count(k) > 1)[0])
    return dict(pairs)


__all__ = ["read_header", "TensorEntry", "ITEMSIZE", "FLOAT_DTYPES"]
