"""Reading back what the experiment trackers wrote, for ``tests/test_trackers.py``.

- ``wandb_records(path)`` / ``wandb_history(path)``: the records of an offline W&B run's
  ``run-<id>.wandb`` file, parsed with W&B's own protobuf classes
  (``wandb.proto.wandb_internal_pb2.Record``). wandb 0.31 has no Python reader of that file
  (``wandb.sdk.internal.datastore`` went with the Python internal process; the Go ``wandb-core``
  writes the file now), so the framing is read here: a 7-byte header (``:W&B``, magic
  ``0xBEE1`` little-endian, version 0), then LevelDB's log format — 32 KiB blocks of records
  ``crc32 (4, LE) | length (2, LE) | type (1: FULL, 2: FIRST, 3: MIDDLE, 4: LAST) | data``, where
  W&B's CRC is zlib's CRC-32 of the type byte and the data (not LevelDB's masked CRC-32C). Every
  checksum is verified, so a misread framing fails instead of parsing garbage.
- ``child_processes(name)``: what is left running of a service a tracker started.
- ``tensorboard_server(logdir)``: TensorBoard's own server (``python -m tensorboard.main``) on
  127.0.0.1, stopped by its PID; ``SCALAR_CARDS``: what the scalars dashboard's tag-filter results
  show (card titles, line points, whether a line runs out of its plot).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator

import _lab
from _lab import free_port

WANDB_HEADER = struct.Struct("<4sHB")  # ident, magic, version
WANDB_IDENT, WANDB_MAGIC = b":W&B", 0xBEE1
BLOCK = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _wandb_payloads(data: bytes) -> Iterator[bytes]:
    ident, magic, version = WANDB_HEADER.unpack_from(data)
    if (ident, magic) != (WANDB_IDENT, WANDB_MAGIC) or version != 0:
        raise ValueError(f"not a W&B run file (header {ident!r} {magic:#x} v{version})")
    pos, parts = WANDB_HEADER.size, None
    while pos + RECORD_HEADER.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD_HEADER.size:  # a block's zero trailer
            pos += left
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, pos)
        if crc == length == kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + RECORD_HEADER.size:pos + RECORD_HEADER.size + length]
        if zlib.crc32(bytes([kind]) + chunk) != crc or len(chunk) != length:
            raise ValueError(f"bad record at byte {pos} (type {kind}, length {length})")
        pos += RECORD_HEADER.size + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            parts = [chunk]
        elif kind == MIDDLE and parts is not None:
            parts.append(chunk)
        elif kind == LAST and parts is not None:
            yield b"".join([*parts, chunk])
            parts = None
        else:
            raise ValueError(f"record type {kind} out of order at byte {pos}")


def wandb_records(path: Path) -> list:
    """Every ``Record`` (W&B's protobuf) of an offline run's ``run-<id>.wandb``, in order."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in _wandb_payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _item_key(item) -> str:
    # a flat key is one element of nested_key (W&B keeps "a/b.c" whole); a nested dict's path is
    # shown joined by "." in W&B's UI
    return item.key or ".".join(item.nested_key)


def wandb_history(path: Path) -> list[dict]:
    """The run's history rows (one per ``wandb.log``): ``{key: value}`` with W&B's ``_step``."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {_item_key(item): json.loads(item.value_json) for item in record.history.item}
            row["_step"] = record.history.step.num
            rows.append(row)
    return rows


def child_processes(name: str) -> list[int]:
    """PIDs of this process's children whose command line holds ``name`` (Linux ``/proc``; [] elsewhere)."""
    me, found = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == me and name.encode() in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


# ------------------------------------------------------------------------------------ TensorBoard


@contextlib.contextmanager
def tensorboard_server(logdir: Path, *, ready_tag: str, timeout: float = 60) -> Iterator[str]:
    """TensorBoard on 127.0.0.1 over ``logdir`` (given to it relative to its parent, so the page
    shows ``logdir``'s name rather than a temporary path); yields its base URL once the scalars
    plugin lists ``ready_tag``. Loaded once (``--reload_interval 0``: the run is over), with the
    Python loader (``--load_fast false``: no data-server binary). Stopped by its PID."""
    port = free_port()
    log_path = logdir.parent / "tensorboard.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logdir.name, "--host", "127.0.0.1",
         "--port", str(port), "--load_fast", "false", "--reload_interval", "0"],
        cwd=logdir.parent, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=2) as r:
                    if any(ready_tag in tags for tags in json.load(r).values()):
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"TensorBoard did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        _lab.stop_server(proc, log)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


# The scalars dashboard's group of tag-filter results ("Tags matching /…/"): its header, and per
# chart card its title, the points of each drawn line and whether each line stays inside its plot
# (with "Ignore outliers in chart scaling" on, a line runs out of the plot's clipped box). The
# dashboard is Polymer: cards sit in shadow roots, hence the deep walk.
SCALAR_CARDS = r"""
() => {
  const deep = (root, sel, out = []) => {
    if (root.shadowRoot) deep(root.shadowRoot, sel, out);
    root.querySelectorAll(sel).forEach(e => out.push(e));
    root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) deep(e.shadowRoot, sel, out); });
    return out;
  };
  const text = (node) => {
    let s = '';
    const walk = (x) => {
      if (x.nodeName === 'STYLE' || x.nodeName === 'SCRIPT') return;
      if (x.nodeType === 3) s += x.textContent + ' ';
      if (x.shadowRoot) walk(x.shadowRoot);
      x.childNodes.forEach(walk);
    };
    walk(node);
    return s.replace(/\s+/g, ' ').trim();
  };
  const box = (e) => { const r = e.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const view = deep(document, 'tf-category-paginated-view').find(v => text(v).startsWith('Tags matching'));
  if (!view) return null;
  return {
    box: box(view),
    header: text(view).slice(0, 300),
    cards: [...new Set(deep(view, 'tf-scalar-card'))].map(card => {
      const plot = deep(card, 'svg.content')[0];
      const p = plot ? box(plot) : null;
      return {
        title: text(deep(card, 'tf-card-heading')[0] || card).split(' ')[0],
        box: box(card),
        ticks: deep(card, '.tick-label').map(t => t.textContent).filter(Boolean).length,
        lines: deep(card, 'path.line').map(path => {
          const b = box(path);
          const inside = !!p && b.y >= p.y - 1 && b.y + b.h <= p.y + p.h + 1
                         && b.x >= p.x - 1 && b.x + b.w <= p.x + p.w + 1;
          return {points: (path.getAttribute('d') || '').split(/[ML]/).filter(Boolean).length, inside};
        }),
      };
    }),
  };
}
"""
