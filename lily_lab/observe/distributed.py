"""Routing recordings in a multi-process job (``torch.distributed``: torchrun, accelerate, DDP).

Each rank records the forward calls it runs — its shard of the data. :func:`gather_routing`
(``Routing.gather()``; ``record_routing`` calls it when its block exits, see ``gather=``) sends
every rank's recording to one rank and merges them there with ``Routing.merge``: the exact sums
add up, so ``router_metrics`` of the result equal those of one process that ran every rank's
calls, and the token samples are drawn from the union.

What travels is the recording's ``.npz`` bytes (``Routing.save``'s format: arrays and a JSON
header, read back with ``allow_pickle=False``) inside an object collective; nothing touches disk.
Gathering is a collective: every rank must call it, with the same ``dst`` and ``all_ranks``.
"""

from __future__ import annotations

import io

from .routing import Routing, RoutingError
from .routing_file import load_routing, routing_bytes


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when there is none."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch built without distributed
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def should_gather(gather: bool | None) -> bool:
    """``record_routing``'s ``gather=`` option: ``None`` gathers when a process group of more than
    one process is initialised, ``True`` likewise (a no-op in one process), ``False`` never."""
    if gather is not None and not isinstance(gather, bool):
        raise RoutingError(f"gather must be True, False or None (gather when torch.distributed is initialised), got {gather!r}")
    return gather is not False and distributed_rank_world()[1] > 1


def gather_routing(routing: Routing, dst: int = 0, *, all_ranks: bool = False, seed: int = 0) -> Routing:
    """Every rank's ``routing`` merged (rank order) on rank ``dst``, or on every rank with
    ``all_ranks=True``; the other ranks get their own ``routing`` back. Without a process group
    (or with one process) returns ``routing``.

    A rank whose recording cannot be sent (labels that are not JSON values) still takes part, so
    no rank is left waiting: the error is raised on that rank and, naming it, on ``dst``.
    """
    if not isinstance(dst, int) or isinstance(dst, bool) or dst < 0:
        raise RoutingError(f"dst must be a rank (an integer ≥ 0), got {dst!r}")
    rank, world = distributed_rank_world()
    if world == 1:
        return routing
    import torch.distributed as dist

    if not isinstance(dst, int) or isinstance(dst, bool) or not 0 <= dst < world:
        raise RoutingError(f"dst must be a rank in 0..{world - 1}, got {dst!r}")
    try:
        payload, error = ("npz", routing_bytes(routing)), None
    except RoutingError as err:
        payload, error = ("error", str(err)), err
    if all_ranks:
        parts = [None] * world
        dist.all_gather_object(parts, payload)
    else:
        parts = [None] * world if rank == dst else None
        dist.gather_object(payload, parts, dst=dst)
    if error is not None:
        raise error
    if parts is None:
        return routing
    failed = [f"rank {i}: {msg}" for i, (kind, msg) in enumerate(parts) if kind == "error"]
    if failed:
        raise RoutingError("cannot gather routing: " + "; ".join(failed))
    shards = [_routing_from_bytes(data, f"rank {i}'s recording") for i, (_, data) in enumerate(parts)]
    return Routing.merge(shards, seed=seed)


def _routing_from_bytes(data: bytes, name: str) -> Routing:
    """Read ``routing_bytes`` output back, with every check ``Routing.load`` makes."""

    return load_routing(Routing, _NamedBytes(data, name))


class _NamedBytes(io.BytesIO):
    """In-memory ``.npz`` bytes that the routing reader takes for a file (``name``, ``is_file``)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def is_file(self) -> bool:
        return True
