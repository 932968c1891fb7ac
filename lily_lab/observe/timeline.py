"""Routing over training: a ``Timeline`` of recordings on a fixed probe batch.

``observe`` keeps, per observed step, a small ``Routing`` (exact sums, a few sampled tokens)
and, optionally, a copy of every ``B`` bank; ``add`` appends an observation made elsewhere.
Turning them into metrics is ``analysis``'s job: ``lily_lab.timeline_metrics(timeline)``.
``Timeline.save`` / ``Timeline.load`` write and read one zip file (the timeline file, below):
a JSON header, each step's routing file as ``Routing.save`` writes it, the banks as raw float32;
no pickle, and nothing in a file trusted before it is checked.
"""

from __future__ import annotations

import io
import json
import math
import operator
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import adapter_sites
from ..core.errors import LilyLabFileError, LilyLabFileNotFoundError, LilyLabTypeError
from .distributed import _NamedBytes
from .record import _to, device_of, evaluating, record_routing
from .routing import Routing, RoutingError
from .routing_file import (_HEADER_RATIO, _MAX_HEADER_BYTES, _READ_ERRORS, _Bad, load_routing, npz_path,
                           read_exactly, require_members, routing_bytes, write_npz,
                           zip_members)
from .routing_file import _HEADER as _ROUTING_HEADER_NAME

_ROUTING_HEADER = _ROUTING_HEADER_NAME + ".npy"  # a routing file's header member


class Timeline:
    """Router recordings (and ``B`` banks) of one model at chosen training steps.

    ``probe`` is the batch every observation runs: a dict of model inputs (a ``labels`` entry is
    used as annotation, not passed to the model) or a tensor. Observations run in eval mode
    without gradients and put the model's mode back afterwards.

    Attributes, one entry per observation, in the order observed:

    - ``steps``: the training step of each observation (``int``).
    - ``routings``: the :class:`~lily_lab.Routing` recorded at each step.
    - ``banks``: with ``track_experts=True`` (the default), a copy of every bank at each step —
      a dict ``{group: np.ndarray of shape (E, r, d_out)}`` (float32, on the CPU; ``banks[i]
      [group][e]`` is expert ``B_e`` of that group at ``steps[i]``). Empty with
      ``track_experts=False``. ``lily_lab.timeline_expert_similarity`` and
      ``lily_lab.timeline_expert_trajectories`` read it.
    """

    def __init__(self, probe: Any = None, *, track_experts: bool = True, max_tokens: int = 2048):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise RoutingError(f"Timeline: max_tokens must be an integer ≥ 0, got {max_tokens!r}")
        _check_probe(probe, "Timeline")
        self.probe = probe
        self.track_experts = track_experts
        self.max_tokens = max_tokens
        self.steps: list[int] = []
        self.routings: list[Routing] = []
        self.banks: list[dict[str, np.ndarray]] = []  # per step: group → (E, r, d_out)

    def __len__(self) -> int:
        return len(self.steps)

    def observe(self, model: nn.Module, step: int, probe: Any = None) -> Routing:
        """Run the probe through ``model`` under a recorder and keep the result for ``step``."""
        from ..core.layer import require_module

        require_module(model, "Timeline.observe")
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise RoutingError(f"Timeline.observe: step must be an integer (the training step), got {step!r}")
        probe = self.probe if probe is None else probe
        if probe is None:
            raise RoutingError("Timeline.observe needs a probe batch: Timeline(probe=batch) or observe(model, step, probe)")
        _check_probe(probe, "Timeline.observe")
        device = device_of(model)
        labels = None
        with evaluating(model):
            # gather=False: every rank runs the same probe, so rank 0's recording is the whole story.
            with record_routing(model, max_tokens=self.max_tokens, gather=False) as rec, torch.no_grad():
                if isinstance(probe, Mapping):  # a dict, or a tokenizer's BatchEncoding
                    inputs = {k: v for k, v in probe.items() if k != "labels"}
                    labels = probe.get("labels")
                    model(**{k: _to(v, device) for k, v in inputs.items()})
                else:
                    model(probe.to(device))
                if labels is not None:
                    rec.annotate(labels=labels)
        routing = rec.routing
        self._append(int(step), routing, bank_snapshot(model) if self.track_experts else None)
        return routing

    def add(self, step: int, routing: Routing, banks: Mapping[str, np.ndarray] | None = None) -> None:
        """Append an observation made elsewhere: ``routing`` (a :class:`~lily_lab.Routing`, e.g. a
        recording of training batches) at training step ``step``, with the banks at that step.

        ``banks`` is ``{group: float32 np.ndarray of shape (E, r, d_out)}`` — what ``observe``
        copies from the model, :func:`bank_snapshot` ``(model)``. A timeline with ``track_experts=True`` (the default) keeps the
        banks of every step, so ``banks`` is then required; with ``track_experts=False`` it must be
        left out. Each array is copied. A bank whose group the routing records must have one
        expert per routing weight (``E == num_B``). Refusals are a ``RoutingError`` (a ``TypeError``
        subclass for arguments of the wrong kind) naming the argument.
        """
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise RoutingError(f"Timeline.add: step must be an integer (the training step), got {step!r}")
        try:
            step = operator.index(step)
        except TypeError:
            raise RoutingError(f"Timeline.add: step must be an integer (the training step), got {step!r}") from None
        if not isinstance(routing, Routing):
            raise LilyLabTypeError(f"Timeline.add: routing must be a lily_lab Routing (record_routing(model) as rec: "
                                   f"... rec.routing, or Routing.load), got {type(routing).__name__}")
        if banks is None:
            if self.track_experts:
                raise RoutingError("Timeline.add: this timeline keeps the banks of every step (track_experts=True): "
                                   "pass banks={group: np.ndarray (E, r, d_out)} — "
                                   "lily_lab.observe.timeline.bank_snapshot(model) — or use "
                                   "Timeline(track_experts=False)")
            self._append(step, routing, None)
            return
        if not self.track_experts:
            raise RoutingError("Timeline.add: this timeline keeps no banks (track_experts=False): leave banks out, "
                               "or use Timeline(track_experts=True)")
        if not isinstance(banks, Mapping):
            raise LilyLabTypeError(f"Timeline.add: banks must be a dict {{group: np.ndarray (E, r, d_out)}}, "
                                   f"got {type(banks).__name__}")
        copied = {}
        for group, B in banks.items():
            problem = _bank_problem(group, B)
            if problem:
                kind = LilyLabTypeError if not isinstance(group, str) or not isinstance(B, np.ndarray) else RoutingError
                raise kind(f"Timeline.add: {problem}")
            copied[group] = B.copy()
        for name in routing.sites:
            rec = routing.record(name)
            if rec.group in copied and copied[rec.group].shape[0] != rec.num_B:
                raise RoutingError(f"Timeline.add: banks[{rec.group!r}] holds {copied[rec.group].shape[0]} experts, "
                                   f"but the routing's site {name!r} of that group routes over {rec.num_B}: pass "
                                   "the banks of the model the routing was recorded on")
        self._append(step, routing, copied)

    def _append(self, step: int, routing: Routing, banks: dict[str, np.ndarray] | None) -> None:
        """The one place an observation joins the timeline (``observe`` and ``add``)."""
        self.steps.append(step)
        self.routings.append(routing)
        if banks is not None:
            self.banks.append(banks)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the timeline to one file at ``path`` (``.npz`` added when missing, as
        ``Routing.save`` does) and return that path. No pickle.

        The file is a zip: ``timeline.json`` (``format`` ``"lily_lab-timeline"``,
        ``format_version`` 1, ``track_experts``, ``max_tokens``, ``steps``, and per step the bank
        groups with their shapes, or ``null`` for a timeline without banks); ``steps/<i>.npz``,
        the routing of observation ``i`` exactly as ``Routing.save`` writes it (stored, not
        compressed again); ``banks/<i>.<k>.f32``, bank ``k`` of observation ``i`` as raw
        little-endian float32 (deflated), its shape in the JSON. It is written to a temporary file
        beside ``path`` and renamed over it, so a reader sees the old file or the new one, and a
        failed save leaves nothing behind (a ``LilyLabFileError`` naming ``path``). A timeline it
        cannot hold — steps without routings (banks put in by hand), banks for some steps only,
        banks that are not float32 ``(E, r, d_out)`` arrays — is a ``RoutingError`` saying which.

        **The probe is not saved** (it is a batch of your data, as tensors): a loaded timeline has
        ``probe=None``; give ``observe`` a probe to go on observing.
        """
        path = _file_path(path, "Timeline.save")
        return write_npz(path, _timeline_bytes(self), "timeline file", "Timeline.save")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Timeline":
        """Read a timeline written by :meth:`save` (``path``, or ``path`` + ``.npz`` when only that
        exists). The result has the file's steps, routings and banks, and ``probe=None`` (the
        probe is not saved).

        Nothing in the file is trusted: the zip directory must list exactly the members the JSON
        header implies (no more, none missing; members stored or deflated, never encrypted), each
        member's declared size must be the one the header implies (a bank: 4·E·r·d_out bytes) or,
        for a routing, stored at its own size within the file's — all before anything but the
        header (at most 64 MiB) is inflated, so a zip bomb is refused unread. Steps must be
        integers, one per routing; every routing goes through every check of ``Routing.load``;
        banks are float32 of their declared shapes (NaN and infinite values are kept: a diverged
        run's banks are data). Every refusal is a ``RoutingError`` naming the file and the
        problem (a ``LilyLabFileNotFoundError`` for a missing file).
        """
        return _read_timeline(cls, _file_path(path, "Timeline.load"))


def bank_snapshot(model: nn.Module) -> dict[str, np.ndarray]:
    """A copy of every bank of ``model``: ``{group: float32 np.ndarray (E, r, d_out)}`` on the CPU
    (what a timeline keeps per step). An FSDP2-sharded bank is gathered, by every rank together."""
    banks = {}
    for s in adapter_sites(model):
        if s.group not in banks:
            B = s.B.detach()
            if hasattr(B, "full_tensor"):  # an FSDP2 shard: gathered by every rank together
                B = B.full_tensor()
            banks[s.group] = B.float().cpu().numpy().copy()
    return banks


def _check_probe(probe: Any, fn: str) -> None:
    """A probe is a dict of model inputs or a tensor (or None: given later)."""
    if probe is not None and not isinstance(probe, (Mapping, torch.Tensor)):
        raise LilyLabTypeError(f"{fn}: probe must be a dict of model inputs (tokenizer(texts, return_tensors='pt')) "
                               f"or a tensor of input ids, got {type(probe).__name__}")


# ---------------------------------------------------------------------- the timeline file
FORMAT = "lily_lab-timeline"
FORMAT_VERSION = 1
_HEADER_MEMBER = "timeline.json"
_HEADER_KEYS = {"format", "format_version", "track_experts", "max_tokens", "steps", "banks"}
_BANK_KEYS = {"group", "shape"}
_ROUTING_MEMBER, _BANK_MEMBER = "steps/{i}.npz", "banks/{i}.{k}.f32"
_BANK_DTYPE = np.dtype("<f4")
_END_RECORD = 22  # the zip directory's end record, without a comment: the last bytes of the file
_STAMP = (1980, 1, 1, 0, 0, 0)  # every member's date: the same timeline gives the same bytes


def _file_path(path, fn: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise LilyLabTypeError(f"{fn}: path must be a str or pathlib.Path, got {type(path).__name__}")
    return Path(path)


def _bank_problem(group, B) -> str | None:
    """Why ``B`` is not a bank of group ``group`` (None when it is one)."""
    if not isinstance(group, str):
        return f"bank groups must be strings (a site's group, e.g. 'query:32x32'), got {group!r}"
    if not isinstance(B, np.ndarray):
        return (f"banks[{group!r}] must be a float32 np.ndarray of shape (E, r, d_out) "
                f"(site.B.detach().float().cpu().numpy()), got {type(B).__name__}")
    if B.dtype != np.float32 or B.ndim != 3 or 0 in B.shape:
        return (f"banks[{group!r}] must be float32 of shape (E, r, d_out), got {B.dtype} of shape {B.shape}"
                + (" (convert it: .astype(np.float32))" if B.dtype != np.float32 else ""))
    return None


def _timeline_bytes(t: Timeline) -> bytes:
    """The file ``Timeline.save`` writes, in memory; a RoutingError for a timeline it cannot hold."""
    n = len(t.steps)
    if len(t.routings) != n:
        raise RoutingError(f"Timeline.save: the timeline has {n} steps but {len(t.routings)} routings; only "
                           "observations made with observe or add (a routing for each step) can be saved")
    if len(t.banks) not in (0, n):
        raise RoutingError(f"Timeline.save: the timeline has banks for {len(t.banks)} of its {n} steps "
                           "(track_experts was changed between observations); keep the banks of every step "
                           "or of none")
    steps = []
    for step in t.steps:
        if isinstance(step, bool) or not hasattr(step, "__index__"):
            raise RoutingError(f"Timeline.save: steps must be integers, got {step!r}")
        steps.append(operator.index(step))
    for step, routing in zip(steps, t.routings):
        if not isinstance(routing, Routing):
            raise RoutingError(f"Timeline.save: the routing of step {step} is a {type(routing).__name__}, "
                               "not a lily_lab Routing")
    if not isinstance(t.max_tokens, int) or isinstance(t.max_tokens, bool) or t.max_tokens < 0:
        raise RoutingError(f"Timeline.save: max_tokens must be an integer ≥ 0, got {t.max_tokens!r}")
    shapes = []
    for step, banks in zip(steps, t.banks):
        if not isinstance(banks, Mapping):
            raise RoutingError(f"Timeline.save: the banks of step {step} are a {type(banks).__name__}, not a dict")
        for group, B in banks.items():
            problem = _bank_problem(group, B)
            if problem:
                raise RoutingError(f"Timeline.save: at step {step}, {problem}")
        shapes.append([{"group": g, "shape": list(B.shape)} for g, B in banks.items()])
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "track_experts": bool(t.track_experts),
              "max_tokens": t.max_tokens, "steps": steps, "banks": shapes if t.banks else None}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        _put(zf, _HEADER_MEMBER, json.dumps(header).encode(), zipfile.ZIP_DEFLATED)
        for i, (step, routing) in enumerate(zip(steps, t.routings)):
            try:
                data = routing_bytes(routing)
            except RoutingError as err:
                raise RoutingError(f"Timeline.save: the routing of step {step} cannot be saved: {err}") from None
            _put(zf, _ROUTING_MEMBER.format(i=i), data, zipfile.ZIP_STORED)  # a zip already: compressed
        for i, banks in enumerate(t.banks):
            for k, B in enumerate(banks.values()):
                _put(zf, _BANK_MEMBER.format(i=i, k=k), np.ascontiguousarray(B, dtype=_BANK_DTYPE).tobytes(),
                     zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


def _put(zf: zipfile.ZipFile, name: str, data: bytes, method: int) -> None:
    info = zipfile.ZipInfo(name, date_time=_STAMP)
    info.compress_type = method
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def _read_timeline(cls, path: Path) -> Timeline:
    where = str(path)
    try:
        if not path.exists() and path.suffix != ".npz":
            suffixed = npz_path(path)
            if suffixed.exists():
                path, where = suffixed, str(suffixed)
        if not path.exists():
            raise LilyLabFileNotFoundError(f"Timeline.load: no timeline file at {where!r} (Timeline.save writes one)")
        if path.is_dir():
            raise LilyLabFileError(f"Timeline.load: {where!r} is a folder, not a timeline file "
                                   "(Timeline.save writes one)")
        f = open(path, "rb")
    except LilyLabFileError:
        raise
    except OSError as err:  # a folder that cannot be searched, a file that cannot be read
        raise LilyLabFileError(err.errno, f"Timeline.load: cannot read the timeline file: {err.strerror or err}",
                               where) from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(size - _END_RECORD, 0))
            tail = f.read(_END_RECORD)
            f.seek(0)
            zf = zipfile.ZipFile(f)
        except _READ_ERRORS as err:
            raise RoutingError(f"Timeline.load: {where} is not a lily_lab timeline file (a zip archive, as "
                               f"Timeline.save writes), or is cut short: {_describe(err)}") from None
        try:
            with zf:
                return _TimelineReader(zf, size, tail, where).load(cls)
        except _Bad as err:
            raise RoutingError(f"Timeline.load: {where} is a damaged lily_lab timeline file: {err}") from None
        except RoutingError:
            raise  # already names the file
        except _READ_ERRORS as err:
            raise RoutingError(f"Timeline.load: {where} is a damaged lily_lab timeline file: "
                               f"{_describe(err)}") from None


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else f"{type(err).__name__} (the data ends early)"


class _TimelineReader:
    def __init__(self, zf: zipfile.ZipFile, file_size: int, tail: bytes, where: str):
        self.zf, self.file_size, self.where = zf, file_size, where
        # zipfile looks for the directory's end record anywhere in the last 64 KiB, so a timeline
        # cut short can read as the routing file stored inside it: the file must end with the
        # record (Timeline.save writes no comment), and its first member must start the file.
        if len(tail) != _END_RECORD or tail[:4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
            raise _Bad("it does not end with the end record of its zip directory (the file is cut short, or "
                       "has bytes after it)")
        if zf.infolist() and min(i.header_offset for i in zf.infolist()) != 0:
            raise _Bad("its zip directory is not the file's own: no member starts at its first byte (the file is "
                       "cut short)")
        self.infos = zip_members(zf, file_size)  # the directory checked, as a routing file's is

    def _refuse(self, message: str) -> RoutingError:
        return RoutingError(f"Timeline.load: {self.where} {message}")

    def load(self, cls) -> Timeline:
        if _HEADER_MEMBER not in self.infos:
            if _ROUTING_HEADER in self.infos:
                raise self._refuse("is a routing file, not a timeline: use Routing.load")
            names = sorted(self.infos)
            raise self._refuse(f"is not a lily_lab timeline file: it has no {_HEADER_MEMBER} member (it holds "
                               f"{names[:5]}{'…' if len(names) > 5 else ''}); Timeline.save writes one")
        header = self._header()
        n, banks = len(header["steps"]), header["banks"]
        # The member list, exactly; not built when the header claims far more members than the
        # zip's directory lists (a header may claim millions of steps).
        expected = 1 + n + sum(len(entry) for entry in banks or ())
        if expected > 2 * len(self.infos) + 100:
            raise _Bad(f"it holds {len(self.infos):,} members, but its header ({n:,} steps) implies {expected:,}")
        want = {_HEADER_MEMBER} | {_ROUTING_MEMBER.format(i=i) for i in range(n)}
        if banks is not None:
            want |= {_BANK_MEMBER.format(i=i, k=k) for i, entry in enumerate(banks) for k in range(len(entry))}
        require_members(self.infos, want, f"for the {n} steps its header lists")
        # Every member's declared size, before any is read.
        for i in range(n):
            info = self.infos[_ROUTING_MEMBER.format(i=i)]
            if info.compress_type != zipfile.ZIP_STORED:
                raise _Bad(f"member {info.filename!r} (a routing file, compressed already) is not stored")
        for i, step in enumerate(banks or ()):
            for k, meta in enumerate(step):
                info = self.infos[_BANK_MEMBER.format(i=i, k=k)]
                nbytes = math.prod(meta["shape"]) * _BANK_DTYPE.itemsize
                if info.file_size != nbytes:
                    raise _Bad(f"member {info.filename!r} (bank {meta['group']!r} of step {header['steps'][i]}, "
                               f"float32 of shape {tuple(meta['shape'])}) claims {info.file_size:,} bytes, "
                               f"not {nbytes:,}")
        timeline = cls(None, track_experts=header["track_experts"], max_tokens=header["max_tokens"])
        for i, step in enumerate(header["steps"]):
            bank = None
            if banks is not None:
                bank = {}
                for k, meta in enumerate(banks[i]):
                    raw = self._read(_BANK_MEMBER.format(i=i, k=k))
                    bank[meta["group"]] = np.frombuffer(raw, dtype=_BANK_DTYPE).reshape(meta["shape"]).astype(
                        np.float32, copy=False)
            name = _ROUTING_MEMBER.format(i=i)
            try:
                routing = load_routing(Routing, _NamedBytes(self._read(name), "the recording"))
            except RoutingError as err:
                raise _Bad(f"member {name!r}, the routing of step {step}, is unreadable: {err}") from None
            timeline._append(step, routing, bank)
        return timeline

    def _header(self) -> dict:
        info = self.infos[_HEADER_MEMBER]
        if info.file_size > min(_MAX_HEADER_BYTES, _HEADER_RATIO * info.compress_size + (64 << 10)):
            raise _Bad(f"its {_HEADER_MEMBER} claims {info.file_size:,} bytes ({info.compress_size:,} compressed)")
        try:
            header = json.loads(bytes(self._read(_HEADER_MEMBER)).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise _Bad(f"its {_HEADER_MEMBER} is not readable JSON: {type(err).__name__}: {err}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            got = header.get("format") if isinstance(header, dict) else type(header).__name__
            raise self._refuse(f"is not a lily_lab timeline file (format {repr(got)[:60]}, expected {FORMAT!r})")
        version = header.get("format_version")
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise self._refuse(f"was written by a newer lily_lab (timeline format_version {version}; this lily_lab "
                               f"reads {FORMAT_VERSION}): upgrade lily_lab to read it")
        if version != FORMAT_VERSION or isinstance(version, bool):
            raise _Bad(f"its format_version is {repr(version)[:40]}, not {FORMAT_VERSION}")
        if set(header) != _HEADER_KEYS:
            extra, lack = sorted(set(header) - _HEADER_KEYS), sorted(_HEADER_KEYS - set(header))
            raise _Bad(f"its header has keys {[k[:40] for k in extra[:5]]} the format does not define"
                       if extra else f"its header lacks keys {lack}")
        if not isinstance(header["track_experts"], bool):
            raise _Bad(f"its track_experts is {repr(header['track_experts'])[:40]}, not true or false")
        mt = header["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
            raise _Bad(f"its max_tokens is {repr(mt)[:40]}, not an integer ≥ 0")
        steps = header["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise _Bad("its steps are not a list of integers")
        banks = header["banks"]
        if banks is not None:
            if not isinstance(banks, list) or len(banks) != len(steps):
                raise _Bad(f"its banks are not null or a list of one entry per step ({len(steps)})")
            for step, entry in zip(steps, banks):
                self._bank_entry(step, entry)
        return header

    def _bank_entry(self, step: int, entry) -> None:
        if not isinstance(entry, list):
            raise _Bad(f"the banks of step {step} are not a list")
        groups = set()
        for meta in entry:
            if not isinstance(meta, dict) or set(meta) != _BANK_KEYS or not isinstance(meta["group"], str):
                raise _Bad(f"a bank of step {step} is not {{\"group\": name, \"shape\": [E, r, d_out]}}")
            shape = meta["shape"]
            if not (isinstance(shape, list) and len(shape) == 3
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
                raise _Bad(f"bank {meta['group'][:60]!r} of step {step} has shape {str(shape)[:60]}, "
                           "not three integers ≥ 1 (E, r, d_out)")
            if meta["group"] in groups:
                raise _Bad(f"step {step} lists bank {meta['group'][:60]!r} twice")
            groups.add(meta["group"])

    def _read(self, name: str) -> bytearray:
        """Member ``name``, whose declared size is already checked: exactly that many bytes, read in
        chunks (a member longer or shorter than it claims is refused; zipfile checks its CRC)."""
        info = self.infos[name]
        with self.zf.open(info) as fp:
            return read_exactly(fp, info.file_size, name)
