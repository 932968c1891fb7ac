"""The ``.npz`` file of a ``Routing``: writing it (``Routing.save``) and reading it back
(``Routing.load``) — every field checked on the way in, no pickle either way.

The file is a zip of ``.npy`` members. Nothing but the JSON header is decompressed before the zip
directory has been checked: the members must be exactly those the file's format version defines
for the sites its header lists (an unknown member, however large, is never inflated), and each
member's ``.npy`` header (read alone, from the start of the member) must give the dtype and shape
the header implies (number of sites, experts per site, max_tokens, counts) and its uncompressed
size exactly that ``.npy`` header plus that data. Only then are the arrays read, each into a buffer
of that size (reading stops there, and the member's CRC is checked), and their values checked: codes in
range, counts that add up, finite sums. No pickle, no object arrays.
"""

from __future__ import annotations

import io
import json
import lzma
import math
from collections import Counter
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from ..core.errors import LilyLabFileError, LilyLabFileNotFoundError
from ..core.files import atomic_write
from .routing import _PHASE_NAMES, LabelSums, Reservoir, Routing, RoutingError, SiteRecord, TokenSums

FORMAT = "lily_lab-routing"
# 2: per-phase sums and a phase column in the samples; 3: top-k routers' dispatch counts and top_k
# (1 and 2 still read, as sites that mix every expert)
FORMAT_VERSION = 3

_TOKEN_COLS = ("probs", "logits", "call", "sequence", "position", "token_id", "label")
_MIX_COLS = ("mixture", "call", "sequence")
_PHASE_COL = "phase"  # format 2 on: both samples carry each row's phase code
_FLOAT_TOKEN_COLS = {"probs", "logits", "mixture"}
_SITE_SUMS = ("sum_probs", "argmax_counts", "sum_mixture")
_LABEL_SUMS = ("label_codes", "label_counts", "label_probs", "label_argmax", "label_entropy")
_TOKEN_SUMS = ("token_ids", "token_counts", "token_probs")
_PHASE_INTS = ("n_tokens", "nonfinite", "n_calls", "tokens_seen", "mixtures_seen")
_PHASE_ROWS = ("sum_probs", "sum_mixture", "argmax")
_PHASE_FLOATS = ("sum_entropy", "sum_z")
_PHASE_LABELS = ("label_phase", "label_codes", "label_counts", "label_probs", "label_argmax", "label_entropy")
_PHASE_TOKENS = ("token_phase", "token_ids", "token_counts", "token_probs")

_HEADER = "__header__"
# The JSON header (site metadata and labels) is read whole: at most 64 MiB, and at most 200 times
# its compressed size (JSON text of sites and labels compresses far less).
_MAX_HEADER_BYTES, _HEADER_RATIO = 64 << 20, 200
_DEFLATE_RATIO = 1032  # deflate's most: a member claiming more than this per compressed byte lies
_CHUNK = 1 << 20
_PROB_TOL = 0.02  # Σ of a probability sum over its tokens may differ from the token count by this share
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError, struct.error, lzma.LZMAError, OverflowError, MemoryError)


# ---------------------------------------------------------------------- writing
def save_routing(routing: Routing, path: str | Path) -> Path:
    """``Routing.save``: ``routing`` written atomically to ``path`` (``.npz`` added if missing)."""
    return write_npz(Path(path), routing_bytes(routing), "routing file")


def npz_path(path: Path) -> Path:
    """``path`` with ``.npz`` added when it has another suffix or none (``run`` → ``run.npz``)."""
    if path.suffix == ".npz":
        return path
    return path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")


def write_npz(path: Path, data: bytes, what: str, where: str = "") -> Path:
    """``data`` written to :func:`npz_path` ``(path)`` atomically: to a temporary file beside it,
    renamed over it; on failure the temporary file is removed and the error (a ``LilyLabFileError``,
    ``LilyLabFileNotFoundError`` for a missing folder) names ``path``, not the hidden temporary
    name. ``what``: ``"routing file"``; ``where``: the function, for the message."""
    path = npz_path(path)
    prefix = f"{where}: " if where else ""
    try:
        atomic_write(path, data)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        if err.errno is None:
            raise RoutingError(f"{prefix}cannot write the {what} {str(path)!r}: {reason}") from None
        kind = LilyLabFileNotFoundError if isinstance(err, FileNotFoundError) else LilyLabFileError
        raise kind(err.errno, f"{prefix}cannot write the {what}: {reason}", str(path)) from None
    return path


def routing_bytes(routing: Routing) -> bytes:
    """The ``.npz`` file ``Routing.save`` writes, in memory (also what ``Routing.gather`` sends)."""
    arrays: dict[str, np.ndarray] = {}
    sites = []
    for k, rec in enumerate(routing.record(name) for name in routing.sites):
        p = f"s{k}."
        for col, arr in rec.tokens.columns.items():
            arrays[p + "tokens." + col] = arr
        for col, arr in rec.mixtures.columns.items():
            arrays[p + "mixtures." + col] = arr
        arrays[p + "sum_probs"], arrays[p + "argmax_counts"] = rec.sum_probs, rec.argmax_counts
        arrays[p + "sum_mixture"] = rec.sum_mixture
        arrays[p + "dispatch_counts"] = rec.dispatch_counts
        codes = sorted(rec.label_sums)
        arrays[p + "label_codes"] = np.array(codes, dtype=np.int64)
        arrays[p + "label_counts"] = np.array([rec.label_sums[c].count for c in codes], dtype=np.int64)
        E = rec.num_B
        arrays[p + "label_probs"] = np.array([rec.label_sums[c].probs for c in codes]).reshape(len(codes), E)
        arrays[p + "label_argmax"] = np.array([rec.label_sums[c].argmax for c in codes], dtype=np.int64).reshape(-1, E)
        arrays[p + "label_entropy"] = np.array([rec.label_sums[c].entropy for c in codes], dtype=np.float64)
        toks = sorted(rec.token_sums)
        arrays[p + "token_ids"] = np.array(toks, dtype=np.int64)
        arrays[p + "token_counts"] = np.array([rec.token_sums[t].count for t in toks], dtype=np.int64)
        arrays[p + "token_probs"] = np.array([rec.token_sums[t].probs for t in toks]).reshape(len(toks), E)
        _phase_arrays(arrays, p, rec)
        sites.append({
            "name": rec.name, "module": rec.module, "group": rec.group, "index": rec.index, "kind": rec.kind,
            "routing": rec.routing, "num_B": rec.num_B, "top_k": rec.top_k, "n_tokens": rec.n_tokens,
            "sum_token_entropy": rec.sum_token_entropy, "sum_z": rec.sum_z, "nonfinite": rec.nonfinite,
            "n_calls": rec.n_calls, "tokens_seen": rec.tokens.seen, "mixtures_seen": rec.mixtures.seen,
        })
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "labels": routing.labels,
              "max_tokens": routing.max_tokens, "n_calls": routing.n_calls, "n_sequences": routing.n_sequences,
              "sites": sites}
    try:
        arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    except TypeError as err:
        raise RoutingError(f"labels must be JSON values (int, str, float, bool) to save: {err}") from None
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _phase_arrays(arrays: dict, p: str, rec: SiteRecord) -> None:
    """``rec``'s per-phase sums as arrays named ``p + "phase_…"`` (empty for a record without phases)."""
    E = rec.num_B
    codes = sorted(rec.phases)
    phs = [rec.phases[c] for c in codes]
    ints = lambda vals: np.array(vals, dtype=np.int64)  # noqa: E731
    rows = lambda vals, dtype=np.float64: np.array(vals, dtype=dtype).reshape(len(vals), E)  # noqa: E731
    arrays[p + "phase_codes"] = ints(codes)
    for key in ("n_tokens", "nonfinite", "n_calls"):
        arrays[p + "phase_" + key] = ints([getattr(ph, key) for ph in phs])
    arrays[p + "phase_tokens_seen"] = ints([ph.tokens.seen for ph in phs])
    arrays[p + "phase_mixtures_seen"] = ints([ph.mixtures.seen for ph in phs])
    arrays[p + "phase_sum_probs"] = rows([ph.sum_probs for ph in phs])
    arrays[p + "phase_sum_mixture"] = rows([ph.sum_mixture for ph in phs])
    arrays[p + "phase_argmax"] = rows([ph.argmax_counts for ph in phs], np.int64)
    arrays[p + "phase_dispatch"] = rows([ph.dispatch_counts for ph in phs], np.int64)
    arrays[p + "phase_sum_entropy"] = np.array([ph.sum_token_entropy for ph in phs], dtype=np.float64)
    arrays[p + "phase_sum_z"] = np.array([ph.sum_z for ph in phs], dtype=np.float64)
    labels = [(c, code, v) for c, ph in zip(codes, phs) for code, v in sorted(ph.label_sums.items())]
    arrays[p + "phase_label_phase"] = ints([c for c, _, _ in labels])
    arrays[p + "phase_label_codes"] = ints([code for _, code, _ in labels])
    arrays[p + "phase_label_counts"] = ints([v.count for _, _, v in labels])
    arrays[p + "phase_label_probs"] = rows([v.probs for _, _, v in labels])
    arrays[p + "phase_label_argmax"] = rows([v.argmax for _, _, v in labels], np.int64)
    arrays[p + "phase_label_entropy"] = np.array([v.entropy for _, _, v in labels], dtype=np.float64)
    toks = [(c, t, v) for c, ph in zip(codes, phs) for t, v in sorted(ph.token_sums.items())]
    arrays[p + "phase_token_phase"] = ints([c for c, _, _ in toks])
    arrays[p + "phase_token_ids"] = ints([t for _, t, _ in toks])
    arrays[p + "phase_token_counts"] = ints([v.count for _, _, v in toks])
    arrays[p + "phase_token_probs"] = rows([v.probs for _, _, v in toks])


# ---------------------------------------------------------------------- reading

class _Bad(Exception):
    """What is wrong with the file (turned into a RoutingError naming it)."""


def load_routing(cls, path):
    """Read the routing file ``path`` (a ``Path``, or in-memory bytes with a ``name`` and
    ``is_file``, as ``distributed`` passes); every problem is a RoutingError naming it."""
    if not path.is_file():
        raise RoutingError(f"no routing file at {str(path)!r}")
    where = str(path) if isinstance(path, Path) else str(getattr(path, "name", "routing data"))
    try:
        size = path.stat().st_size if isinstance(path, Path) else len(path.getbuffer())
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as err:
        raise RoutingError(f"{where} is not a lily_lab routing file (.npz): {err}") from None
    try:
        with zf:
            return _Reader(zf, size).load(cls)
    except _Bad as err:
        raise RoutingError(f"{where} is a damaged lily_lab routing file: {err}") from None
    except RoutingError as err:
        raise RoutingError(f"{where} {err}") from None
    except _READ_ERRORS as err:
        raise RoutingError(f"{where} is a damaged lily_lab routing file: {type(err).__name__}: {err}") from None


def _int(meta: dict, key: str, what: str, low: int | None = 0) -> int:
    v = meta.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or (low is not None and v < low):
        raise _Bad(f"{what} {key} is {str(v)[:40]!r}, not an integer{'' if low is None else f' ≥ {low}'}")
    return v


def _float(meta: dict, key: str, what: str) -> float:
    v = meta.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise _Bad(f"{what} {key} is {str(v)[:40]!r}, not a finite number ≥ 0")
    return float(v)


def _str(meta: dict, key: str, what: str) -> str:
    v = meta.get(key)
    if not isinstance(v, str):
        raise _Bad(f"{what} {key} is {str(v)[:40]!r}, not a string")
    return v


def zip_members(zf: zipfile.ZipFile, file_size: int) -> dict[str, zipfile.ZipInfo]:
    """The members of ``zf`` by name, once its directory is sound — no name twice, nothing
    encrypted, stored or deflated only, a stored member's sizes equal, no member claiming more
    than deflate can hold in its compressed bytes, and no more compressed bytes than the file has —
    all read from the directory alone (nothing is decompressed). Refusals are ``_Bad``, without the
    file's name (the caller adds it). Routing files and timelines (``timeline.py``) check theirs here."""
    infos: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.filename in infos:
            raise _Bad(f"it holds member {info.filename!r} twice")
        infos[info.filename] = info
        if info.flag_bits & 0x1:
            raise _Bad(f"member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Bad(f"member {info.filename!r} uses compression method {info.compress_type}, "
                       "not stored or deflated")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise _Bad(f"member {info.filename!r} is stored, but claims {info.file_size:,} bytes "
                       f"in {info.compress_size:,}")
        if info.file_size > _DEFLATE_RATIO * info.compress_size + 1024:
            raise _Bad(f"member {info.filename!r} claims {info.file_size:,} bytes, more than deflate can "
                       f"hold in its {info.compress_size:,}")
    if sum(i.compress_size for i in infos.values()) > file_size:
        raise _Bad(f"its members claim more compressed bytes than the file's {file_size:,}")
    return infos


def require_members(infos: dict, want: set[str], context: str) -> None:
    """``_Bad`` unless the zip's members are exactly ``want``: the extra and the missing ones named
    (five of each at most), with ``context`` (what the header says) in parentheses."""
    have = set(infos)
    if have == want:
        return
    extra, lack = sorted(have - want), sorted(want - have)
    parts = []
    if extra:
        parts.append(f"members the format does not define: {extra[:5]}{'…' if len(extra) > 5 else ''}")
    if lack:
        parts.append(f"no members {lack[:5]}{'…' if len(lack) > 5 else ''}")
    raise _Bad(f"it holds {' and '.join(parts)} ({context})")


def read_exactly(fp, nbytes: int, name: str) -> bytearray:
    """The next ``nbytes`` of the open member ``fp``, and nothing after them: read in chunks into one
    buffer of that size (a member that claims more never grows it); a shorter or longer member is
    ``_Bad``. zipfile checks the member's CRC as it reaches its end."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    pos = 0
    while pos < nbytes:
        chunk = fp.read(min(_CHUNK, nbytes - pos))
        if not chunk:
            raise _Bad(f"member {name!r} is truncated")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
    if fp.read(1):
        raise _Bad(f"member {name!r} is longer than it claims")
    return buf


class _Reader:
    def __init__(self, zf: zipfile.ZipFile, file_size: int):
        self.zf = zf
        self.file_size = file_size
        self.infos = zip_members(zf, file_size)
        self.heads: dict[str, tuple] = {}  # member → (shape, fortran_order, dtype, header bytes)

    # ------------------------------------------------------------------ members
    def head(self, key: str) -> tuple:
        """The ``.npy`` header of member ``key`` (read alone), checked against its stored size."""
        if key in self.heads:
            return self.heads[key]
        info = self.infos[key + ".npy"]
        with self.zf.open(info) as fp:
            try:
                version = npy_format.read_magic(fp)
                if version == (1, 0):
                    shape, fortran, dtype = npy_format.read_array_header_1_0(fp)
                elif version == (2, 0):
                    shape, fortran, dtype = npy_format.read_array_header_2_0(fp)
                else:
                    raise _Bad(f"member {key!r} is a .npy of version {version}, not 1.0 or 2.0")
            except (_Bad, zipfile.BadZipFile, zlib.error, OSError, EOFError):
                raise
            except Exception as err:  # noqa: BLE001 - numpy parsing a damaged header can raise about anything
                raise _Bad(f"member {key!r} has no readable .npy header: {type(err).__name__}: {err}") from None
            start = fp.tell()
        if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
            raise _Bad(f"member {key!r} has dtype {dtype}, not a number type")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _Bad(f"member {key!r} has shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size != start + nbytes:
            raise _Bad(f"member {key!r} holds {info.file_size:,} bytes, but its .npy header "
                       f"(shape {shape}, {dtype}) means {start + nbytes:,}")
        self.heads[key] = (shape, fortran, dtype, start)
        return self.heads[key]

    def expect(self, key: str, shape: tuple, kind: str) -> tuple:
        """Check member ``key``'s header: ``shape`` (None: any length ≥ 0 on that axis) and ``kind``
        (``"f"`` floats, ``"i"`` integers, ``"b"`` bytes); its actual shape."""
        got, _, dtype, _ = self.head(key)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise _Bad(f"routing array {key!r} has shape {got}, expected {shape}")
        ok = {"f": dtype.kind == "f",
              "i": dtype.kind in "bi" or (dtype.kind == "u" and dtype.itemsize <= 4),
              "b": dtype.kind == "u" and dtype.itemsize == 1}[kind]
        if not ok:
            raise _Bad(f"routing array {key!r} has dtype {dtype}, expected {'float' if kind == 'f' else 'integer'}")
        return got

    def data(self, key: str) -> np.ndarray:
        """Member ``key``'s array (its header already checked), writable, in native byte order."""
        shape, fortran, dtype, start = self.heads[key]
        nbytes = math.prod(shape) * dtype.itemsize
        with self.zf.open(self.infos[key + ".npy"]) as fp:
            if len(fp.read(start)) != start:
                raise _Bad(f"member {key!r} is truncated")
            buf = read_exactly(fp, nbytes, key)
        a = np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")
        return a.astype(dtype.newbyteorder("="), copy=False)

    # ------------------------------------------------------------------ the file
    def load(self, cls):
        if _HEADER + ".npy" not in self.infos:
            raise RoutingError("has no readable lily_lab routing header (no __header__ member)")
        info = self.infos[_HEADER + ".npy"]
        if info.file_size > min(_MAX_HEADER_BYTES, _HEADER_RATIO * info.compress_size + (64 << 10)):
            raise RoutingError(f"has a routing header that claims {info.file_size:,} bytes "
                               f"({info.compress_size:,} compressed)")
        try:
            self.expect(_HEADER, (None,), "b")
            header = json.loads(bytes(self.data(_HEADER)).decode())
        except (_Bad, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise RoutingError(f"has no readable lily_lab routing header: {err}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise RoutingError(f"is not a lily_lab routing file (format {FORMAT!r} expected)")
        version = header.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION or version < 1:
            raise RoutingError(f"has routing format_version {version!r}; this lily_lab reads 1..{FORMAT_VERSION}")
        self.version = version
        labels = header.get("labels")
        if not isinstance(labels, list) or not all(
                isinstance(v, (str, int, float)) and v == v
                for v in labels):
            raise _Bad(f"its labels are {type(labels).__name__} {str(labels)[:80]!r}, not a list of strings or "
                       "numbers (a missing label, None or NaN, is no class)")
        if len(set(labels)) != len(labels):
            raise _Bad("its labels repeat a value")
        self.n_labels = len(labels)
        max_tokens = _int(header, "max_tokens", "the header's")
        n_calls, n_sequences = _int(header, "n_calls", "the header's"), _int(header, "n_sequences", "the header's")
        sites = header.get("sites")
        if not isinstance(sites, list):
            raise _Bad("its header has no list of sites")
        metas = [self._site_meta(k, meta) for k, meta in enumerate(sites)]
        names = [m["name"] for m in metas]
        if len(set(names)) != len(names):
            dup = sorted(n for n, c in Counter(names).items() if c > 1)
            raise _Bad(f"it names sites {dup} more than once")
        # The member list, exactly; then every member's header, before any data is read.
        want = {_HEADER + ".npy"} | {f"s{k}.{m}.npy" for k in range(len(metas)) for m in self._site_members()}
        require_members(self.infos, want, f"format version {version}, {len(metas)} sites")
        for k, meta in enumerate(metas):
            self._site_heads(f"s{k}.", meta, max_tokens)
        records = {}
        for k, meta in enumerate(metas):
            rec = self._site(f"s{k}.", meta, max_tokens)
            records[rec.name] = rec
        routing = cls(records, labels, max_tokens)
        routing.n_calls, routing.n_sequences = n_calls, n_sequences
        return routing

    def _site_members(self) -> list[str]:
        cols = _TOKEN_COLS + ((_PHASE_COL,) if self.version >= 2 else ())
        mcols = _MIX_COLS + ((_PHASE_COL,) if self.version >= 2 else ())
        out = [f"tokens.{c}" for c in cols] + [f"mixtures.{c}" for c in mcols]
        out += list(_SITE_SUMS + _LABEL_SUMS + _TOKEN_SUMS)
        if self.version >= 2:
            out += ["phase_codes"] + [f"phase_{k}" for k in
                                      _PHASE_INTS + _PHASE_ROWS + _PHASE_FLOATS + _PHASE_LABELS + _PHASE_TOKENS]
        if self.version >= 3:
            out += ["dispatch_counts", "phase_dispatch"]
        return out

    def _site_meta(self, k: int, meta) -> dict:
        what = f"site {k}'s"
        if not isinstance(meta, dict):
            raise _Bad(f"{what} metadata is not an object")
        out = {key: _str(meta, key, what) for key in ("name", "module", "group", "kind", "routing")}
        out["index"] = _int(meta, "index", what, low=None)
        out["num_B"] = _int(meta, "num_B", what, low=1)
        if out["num_B"] > 1 << 20:
            raise _Bad(f"{what} num_B is {out['num_B']}")
        out["top_k"] = _int(meta, "top_k", what) if self.version >= 3 else 0
        if out["top_k"] > out["num_B"]:
            raise _Bad(f"{what} top_k {out['top_k']} is more than its {out['num_B']} experts")
        for key in ("n_tokens", "nonfinite", "n_calls", "tokens_seen", "mixtures_seen"):
            out[key] = _int(meta, key, what)
        for key in ("sum_token_entropy", "sum_z"):
            out[key] = _float(meta, key, what)
        return out

    def _site_heads(self, p: str, meta: dict, max_tokens: int) -> None:
        """Check the ``.npy`` header of every member of the site (prefix ``p``)."""
        E, n_tok = meta["num_B"], meta["n_tokens"]
        rows = self.expect(p + "tokens.probs", (None, E), "f")[0]
        if rows > min(max_tokens, meta["tokens_seen"]):
            raise _Bad(f"routing array {p + 'tokens.probs'!r} samples {rows} tokens, more than max_tokens "
                       f"{max_tokens} or the {meta['tokens_seen']} seen")
        for c in _site_cols(self.version, "tokens"):
            floats = c in _FLOAT_TOKEN_COLS
            self.expect(p + "tokens." + c, (rows, E) if floats else (rows,), "f" if floats else "i")
        mrows = self.expect(p + "mixtures.mixture", (None, E), "f")[0]
        if mrows > min(max_tokens, meta["mixtures_seen"]):
            raise _Bad(f"routing array {p + 'mixtures.mixture'!r} samples {mrows} rows, more than max_tokens "
                       f"{max_tokens} or the {meta['mixtures_seen']} seen")
        for c in _site_cols(self.version, "mixtures")[1:]:
            self.expect(p + "mixtures." + c, (mrows,), "i")
        self.expect(p + "sum_probs", (E,), "f")
        self.expect(p + "argmax_counts", (E,), "i")
        self.expect(p + "sum_mixture", (E,), "f")
        if self.version >= 3:
            self.expect(p + "dispatch_counts", (E,), "i")
        n = self.expect(p + "label_codes", (None,), "i")[0]
        if n > self.n_labels + 1:
            raise _Bad(f"routing array {p}label_codes has {n} codes for {self.n_labels} labels")
        self._sum_heads(p + "label_", n, E)
        m = self.expect(p + "token_ids", (None,), "i")[0]
        if m > n_tok:
            raise _Bad(f"routing array {p}token_ids has {m} ids for {n_tok} tokens")
        self._token_heads(p + "token_", m, E)
        if self.version < 2:
            return
        P = self.expect(p + "phase_codes", (None,), "i")[0]
        if P > len(_PHASE_NAMES):
            raise _Bad(f"routing array {p}phase_codes has {P} phases")
        for key in _PHASE_INTS:
            self.expect(p + "phase_" + key, (P,), "i")
        for key in _PHASE_ROWS:
            self.expect(p + "phase_" + key, (P, E), "i" if key == "argmax" else "f")
        for key in _PHASE_FLOATS:
            self.expect(p + "phase_" + key, (P,), "f")
        if self.version >= 3:
            self.expect(p + "phase_dispatch", (P, E), "i")
        n = self.expect(p + "phase_label_phase", (None,), "i")[0]
        if n > P * (self.n_labels + 1):
            raise _Bad(f"routing array {p}phase_label_phase has {n} rows for {P} phases and {self.n_labels} labels")
        self._sum_heads(p + "phase_label_", n, E)
        m = self.expect(p + "phase_token_phase", (None,), "i")[0]
        if m > n_tok:
            raise _Bad(f"routing array {p}phase_token_phase has {m} rows for {n_tok} tokens")
        self._token_heads(p + "phase_token_", m, E)

    def _sum_heads(self, p: str, n: int, E: int) -> None:
        for key, shape, kind in (("codes", (n,), "i"), ("counts", (n,), "i"), ("probs", (n, E), "f"),
                                 ("argmax", (n, E), "i"), ("entropy", (n,), "f")):
            self.expect(p + key, shape, kind)

    def _token_heads(self, p: str, m: int, E: int) -> None:
        for key, shape, kind in (("ids", (m,), "i"), ("counts", (m,), "i"), ("probs", (m, E), "f")):
            self.expect(p + key, shape, kind)

    # ------------------------------------------------------------------ values
    def _ints(self, key: str) -> np.ndarray:
        return self.data(key).astype(np.int64, copy=False)

    def _floats(self, key: str) -> np.ndarray:
        a = self.data(key).astype(np.float64, copy=False)
        if not np.isfinite(a).all():
            raise _Bad(f"routing array {key!r} holds NaN or infinite sums")
        return a

    def _site(self, p: str, meta: dict, max_tokens: int) -> SiteRecord:
        E = meta["num_B"]
        rec = SiteRecord(meta["name"], meta["module"], meta["group"], meta["index"], meta["kind"], meta["routing"], E,
                         top_k=meta["top_k"])
        rec.n_tokens, rec.nonfinite, rec.n_calls = meta["n_tokens"], meta["nonfinite"], meta["n_calls"]
        rec.sum_token_entropy, rec.sum_z = meta["sum_token_entropy"], meta["sum_z"]
        what = f"site {rec.name!r}"
        rec.sum_probs = _probs(self._floats(p + "sum_probs"), rec.n_tokens, f"{what}'s sum_probs")
        rec.argmax_counts = _counts(self._ints(p + "argmax_counts"), f"{what}'s argmax_counts")
        if int(rec.argmax_counts.sum()) != rec.n_tokens:
            raise _Bad(f"{what}'s argmax_counts add up to {int(rec.argmax_counts.sum())}, "
                       f"not its {rec.n_tokens} tokens")
        rec.sum_mixture = self._floats(p + "sum_mixture")
        if self.version >= 3:
            rec.dispatch_counts = _dispatch(self._ints(p + "dispatch_counts"), rec.top_k, rec.n_tokens,
                                            f"{what}'s dispatch_counts")
        rec.label_sums = self._label_sums(p + "label_", None, rec.n_tokens, what)[None]
        rec.token_sums = self._token_sums(p + "token_", None, rec.n_tokens, what)[None]
        rec.tokens = self._reservoir(p + "tokens.", "tokens", max_tokens, meta["tokens_seen"], what)
        rec.mixtures = self._reservoir(p + "mixtures.", "mixtures", max_tokens, meta["mixtures_seen"], what)
        if self.version >= 2:
            self._phases(p, rec)
        else:  # a recording from before phases: every token of phase None
            for res in (rec.tokens, rec.mixtures):
                res.columns[_PHASE_COL] = np.full(len(res), -1, dtype=np.int8)
        return rec

    def _reservoir(self, prefix: str, which: str, size: int, seen: int, what: str) -> Reservoir:
        res = Reservoir(size, {})
        res.seen = seen
        for c in _site_cols(self.version, which):
            a = self.data(prefix + c)
            if c == _PHASE_COL:
                if not np.isin(a, list(_PHASE_NAMES)).all():
                    raise _Bad(f"the sampled phase column of {what} is not codes -1, 0, 1")
                a = a.astype(np.int8, copy=False)
            elif c == "label":
                if len(a) and (a.min() < -1 or a.max() >= self.n_labels):
                    raise _Bad(f"the sampled label codes of {what} are not codes -1..{self.n_labels - 1}")
            elif c == "token_id" or (c == "sequence" and which == "mixtures"):
                if len(a) and a.min() < -1:
                    raise _Bad(f"the sampled {which}' {c} column of {what} holds values below -1")
            elif c in ("call", "sequence", "position"):
                if len(a) and a.min() < 0:
                    raise _Bad(f"the sampled {which}' {c} column of {what} holds negative values")
            res.columns[c] = a
        return res

    def _label_sums(self, p: str, phases, n_tokens: int, what: str) -> dict:
        """Label sums by phase code (``phases``: the phase of each row; None: one group, key None)."""
        codes = self._ints(p + "codes")
        counts = _counts(self._ints(p + "counts"), f"{what}'s {p}counts")
        probs = _probs(self._floats(p + "probs"), counts, f"{what}'s {p}probs")
        argmax = _counts(self._ints(p + "argmax"), f"{what}'s {p}argmax")
        entropy = self._floats(p + "entropy")
        if len(codes) and (codes.min() < -1 or codes.max() >= self.n_labels):
            raise _Bad(f"{what}'s {p}codes are not codes -1..{self.n_labels - 1}")
        if (entropy < 0).any():
            raise _Bad(f"{what}'s {p}entropy holds negative sums")
        if int(counts.sum()) > n_tokens:
            raise _Bad(f"{what}'s {p}counts add up to {int(counts.sum())}, more than its {n_tokens} tokens")
        if not np.array_equal(argmax.sum(axis=1), counts):
            raise _Bad(f"{what}'s {p}argmax rows do not add up to their label counts")
        keys = [None] * len(codes) if phases is None else phases.tolist()
        out: dict = {None: {}} if phases is None else {}
        for i, (key, c) in enumerate(zip(keys, codes.tolist())):
            if c in out.setdefault(key, {}):
                raise _Bad(f"{what}'s {p}codes repeat code {c}")
            out[key][c] = LabelSums(int(counts[i]), probs[i], argmax[i], float(entropy[i]))
        return out

    def _token_sums(self, p: str, phases, n_tokens: int, what: str) -> dict:
        ids = self._ints(p + "ids")
        counts = _counts(self._ints(p + "counts"), f"{what}'s {p}counts")
        probs = _probs(self._floats(p + "probs"), counts, f"{what}'s {p}probs")
        if len(ids) and ids.min() < 0:
            raise _Bad(f"{what}'s {p}ids hold negative token ids")
        if int(counts.sum()) > n_tokens:
            raise _Bad(f"{what}'s {p}counts add up to {int(counts.sum())}, more than its {n_tokens} tokens")
        keys = [None] * len(ids) if phases is None else phases.tolist()
        out: dict = {None: {}} if phases is None else {}
        for i, (key, t) in enumerate(zip(keys, ids.tolist())):
            if t in out.setdefault(key, {}):
                raise _Bad(f"{what}'s {p}ids repeat token id {t}")
            out[key][t] = TokenSums(int(counts[i]), probs[i])
        return out

    def _phases(self, p: str, rec: SiteRecord) -> None:
        """The per-phase sums of a format-2 site (``routing_bytes``'s ``phase_…`` arrays), checked."""
        what = f"site {rec.name!r}"
        codes = self._ints(p + "phase_codes")
        if len(set(codes.tolist())) != len(codes) or not set(codes.tolist()) <= set(_PHASE_NAMES):
            raise _Bad(f"the phase codes {codes.tolist()} of {what} are not distinct codes -1, 0, 1")
        ints = {k: _counts(self._ints(p + "phase_" + k), f"{what}'s phase_{k}") for k in _PHASE_INTS}
        sum_probs = _probs(self._floats(p + "phase_sum_probs"), ints["n_tokens"], f"{what}'s phase_sum_probs")
        sum_mixture = self._floats(p + "phase_sum_mixture")
        argmax = _counts(self._ints(p + "phase_argmax"), f"{what}'s phase_argmax")
        if not np.array_equal(argmax.sum(axis=1), ints["n_tokens"]):
            raise _Bad(f"{what}'s phase_argmax rows do not add up to the phases' token counts")
        entropy, z = self._floats(p + "phase_sum_entropy"), self._floats(p + "phase_sum_z")
        dispatch = self._ints(p + "phase_dispatch") if self.version >= 3 else np.zeros_like(argmax)
        for i, n in enumerate(ints["n_tokens"].tolist()):
            _dispatch(dispatch[i], rec.top_k, n, f"{what}'s phase_dispatch")
        if (entropy < 0).any() or (z < 0).any():
            raise _Bad(f"{what}'s per-phase entropy or z sums are negative")
        lphase = self._ints(p + "phase_label_phase")
        tphase = self._ints(p + "phase_token_phase")
        if not np.isin(lphase, codes).all() or not np.isin(tphase, codes).all():
            raise _Bad(f"the per-phase label or token sums of {what} name a phase it lacks")
        labels = self._label_sums(p + "phase_label_", lphase, rec.n_tokens, what)
        tokens = self._token_sums(p + "phase_token_", tphase, rec.n_tokens, what)
        for i, code in enumerate(codes.tolist()):
            ph = rec.phase_record(code)
            ph.n_tokens, ph.nonfinite, ph.n_calls = (int(ints[k][i]) for k in ("n_tokens", "nonfinite", "n_calls"))
            ph.tokens.seen, ph.mixtures.seen = int(ints["tokens_seen"][i]), int(ints["mixtures_seen"][i])
            ph.sum_probs, ph.sum_mixture, ph.argmax_counts = sum_probs[i], sum_mixture[i], argmax[i]
            ph.dispatch_counts = dispatch[i]
            ph.sum_token_entropy, ph.sum_z = float(entropy[i]), float(z[i])
            ph.label_sums = labels.get(code, {})
            ph.token_sums = tokens.get(code, {})
            for key, total in (("label_sums", ph.n_tokens), ("token_sums", ph.n_tokens)):
                got = sum(v.count for v in getattr(ph, key).values())
                if got > total:
                    raise _Bad(f"{what}'s phase {_PHASE_NAMES[code]!r} {key} count {got} tokens, more than its {total}")
        phs = list(rec.phases.values())
        for key in ("n_tokens", "nonfinite", "n_calls"):
            if phs and sum(getattr(ph, key) for ph in phs) != getattr(rec, key):
                raise _Bad(f"the per-phase {key} of {what} do not add up to its total")
        if phs and (sum(ph.tokens.seen for ph in phs) != rec.tokens.seen
                    or sum(ph.mixtures.seen for ph in phs) != rec.mixtures.seen):
            raise _Bad(f"the per-phase tokens_seen or mixtures_seen of {what} do not add up to its total")


def _site_cols(version: int, which: str) -> tuple:
    return (_TOKEN_COLS if which == "tokens" else _MIX_COLS) + ((_PHASE_COL,) if version >= 2 else ())


def _counts(a: np.ndarray, what: str) -> np.ndarray:
    if a.size and a.min() < 0:
        raise _Bad(f"{what} holds negative counts")
    return a


def _dispatch(a: np.ndarray, top_k: int, n_tokens: int, what: str) -> np.ndarray:
    """A top-k router's dispatch counts: not negative, adding up to ``top_k`` per token (all zero
    for a site that mixes every expert, ``top_k`` 0)."""
    _counts(a, what)
    if int(a.sum()) != top_k * n_tokens:
        raise _Bad(f"{what} add up to {int(a.sum())}, not top_k {top_k} × {n_tokens} tokens")
    return a


def _probs(a: np.ndarray, counts, what: str) -> np.ndarray:
    """Probability sums ``a`` (rows, or one row): not negative, each row adding up to its count."""
    if (a < 0).any():
        raise _Bad(f"{what} holds negative sums of probabilities")
    total = a.sum(axis=-1)
    counts = np.asarray(counts, dtype=np.float64)
    if (np.abs(total - counts) > _PROB_TOL * counts + 1e-6).any():
        raise _Bad(f"{what} does not add up to its token counts")
    return a
