"""``Routing``: what the routers of a model did over some forward calls, kept in bounded memory.

Per site it keeps exact running sums of everything DESIGN §5 needs (so metrics are exact however
many tokens went by), and a uniform reservoir sample of tokens for token-level views.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.errors import LilyLabError

FORMAT = "lily_lab-routing"
FORMAT_VERSION = 1
_NO_LABEL = -1  # label code of an unlabelled token


class RoutingError(LilyLabError, ValueError):
    """A recording was asked for something it does not hold, or a routing file is unreadable."""


def _entropy(p: np.ndarray) -> np.ndarray:
    """Natural-log entropy along the last axis; 0·log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)


class Reservoir:
    """A uniform sample of at most ``size`` rows of a stream (Vitter's algorithm R), per column.

    ``add`` is vectorised: one random draw per offered row past the first ``size`` (in stream
    order, so the sample is the one the row-by-row algorithm keeps), no Python loop over rows.
    Columns grow into buffers of doubling capacity (views of them) rather than being copied on
    every call until the sample is full.
    """

    def __init__(self, size: int, columns: dict[str, tuple[tuple[int, ...], Any]], seed: int = 0):
        self.size, self.seen = int(size), 0
        self.columns = {name: np.empty((0, *shape), dtype=dtype) for name, (shape, dtype) in columns.items()}
        self._rng = np.random.default_rng(seed)
        self._buffers: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def add(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Offer ``n`` rows; return, for each, its slot in the sample or -1 if not kept."""
        n = len(next(iter(rows.values())))
        slots = np.full(n, -1, dtype=np.int64)
        if n == 0 or self.size == 0:
            self.seen += n
            return slots
        if self.seen + n <= self.size:  # every row fills the next slot, in order (and no draw is made)
            slots = np.arange(self.seen, self.seen + n)
            for name in self.columns:
                self._grown(name, self.seen + n)[self.seen:] = rows[name]
            self.seen += n
            return slots
        index = self.seen + np.arange(n)  # each row's position in the stream
        fill = index < self.size
        slots[fill] = index[fill]  # the first `size` rows fill the sample in order
        rest = ~fill
        j = (self._rng.random(rest.sum()) * (index[rest] + 1)).astype(np.int64)  # uniform in [0, index]
        slots[np.flatnonzero(rest)[j < self.size]] = j[j < self.size]
        # Several rows may pick one slot: the last one wins, as in the sequential algorithm.
        kept = np.flatnonzero(slots >= 0)
        keep_slots, from_end = np.unique(slots[kept][::-1], return_index=True)
        keep_rows = kept[::-1][from_end]
        if len(keep_rows) < len(kept):
            slots[np.setdiff1d(kept, keep_rows)] = -1
        length = max(int(keep_slots.max(initial=-1)) + 1, len(self))
        for name in self.columns:
            self._grown(name, length)[keep_slots] = rows[name][keep_rows]
        self.seen += n
        return slots

    def _grown(self, name: str, length: int) -> np.ndarray:
        """Column ``name`` with ``length`` rows (new rows zero), a view of a buffer that grows by
        doubling up to ``size``."""
        col = self.columns[name]
        if len(col) == length:
            return col
        buf = self._buffers.get(name)
        if buf is None or col.base is not buf or len(buf) < length:  # no buffer, or it is not col's
            buf = np.zeros((min(max(2 * len(col), length, 1024), max(self.size, length)), *col.shape[1:]),
                           dtype=col.dtype)
            buf[: len(col)] = col
            self._buffers[name] = buf
        col = self.columns[name] = buf[:length]
        return col


@dataclass
class SiteRecord:
    """Everything recorded for one site. Sums run over real (non-padding) tokens."""

    name: str
    module: str
    group: str
    index: int
    kind: str
    routing: str  # the site's routing mode ("batch" for PEFT Lily)
    num_B: int
    n_tokens: int = 0
    sum_probs: np.ndarray = None  # (E,)  Σ_t p_t
    sum_token_entropy: float = 0.0  # Σ_t H(p_t), nats
    argmax_counts: np.ndarray = None  # (E,)
    sum_z: float = 0.0  # Σ_t logsumexp(logits_t)²
    nonfinite: int = 0  # tokens whose logits held NaN or ±inf (kept out of every sum)
    sum_mixture: np.ndarray = None  # (E,)  Σ_t π applied to token t
    n_calls: int = 0
    label_sums: dict = field(default_factory=dict)  # label → [count, Σp (E,), argmax counts (E,), ΣH]
    token_sums: dict = field(default_factory=dict)  # token id → [count, Σp (E,)]
    tokens: Reservoir = None  # sampled tokens: probs, logits, call, sequence, position, token_id, label
    mixtures: Reservoir = None  # sampled applied mixtures: mixture, call, sequence

    def __post_init__(self) -> None:
        E = self.num_B
        for name in ("sum_probs", "sum_mixture"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(E))
        if self.argmax_counts is None:
            self.argmax_counts = np.zeros(E, dtype=np.int64)


class Routing:
    """A recording of router behaviour: per site, per-token distributions and their aggregates.

    ``sites`` lists the routed sites' names. ``probs(site)`` gives the sampled per-token router
    distributions (``n_tokens × E``, before any averaging; every token when fewer than
    ``max_tokens`` were seen), ``mixtures(site)`` the mixtures the layer actually applied, and
    ``usage()`` the exact mean distribution per site and expert.
    """

    def __init__(self, records: dict[str, SiteRecord], labels: list | None = None, max_tokens: int = 0):
        self._records = records
        self.labels: list = list(labels or [])  # label values; codes index this list
        self.max_tokens = max_tokens
        self.n_calls = 0
        self.n_sequences = 0

    # ------------------------------------------------------------------ access
    @property
    def sites(self) -> list[str]:
        return list(self._records)

    def record(self, site: str) -> SiteRecord:
        """The raw aggregates of ``site`` (a name from ``sites``)."""
        try:
            return self._records[site]
        except KeyError:
            names = ", ".join(self._records) or "none"
            raise RoutingError(f"no routed site named {site!r} in this recording; sites: {names}") from None

    def probs(self, site: str) -> np.ndarray:
        """Sampled per-token router distributions of ``site``: ``n × E`` (padding excluded)."""
        return self.record(site).tokens.columns["probs"].copy()

    def logits(self, site: str) -> np.ndarray:
        return self.record(site).tokens.columns["logits"].copy()

    def mixtures(self, site: str) -> np.ndarray:
        """Sampled mixtures the layer applied: one row per call (batch routing), per sequence
        (sequence routing) or per token (token routing)."""
        return self.record(site).mixtures.columns["mixture"].copy()

    def mean_mixture(self, site: str) -> np.ndarray:
        """The applied mixture averaged over the real tokens it was applied to (exact)."""
        rec = self.record(site)
        return rec.sum_mixture / max(rec.n_tokens, 1)

    def usage(self):
        """DataFrame ``site, module, group, index, expert, usage`` — exact ``u_e`` of §5."""
        import pandas as pd

        rows = []
        for rec in self._records.values():
            u = rec.sum_probs / max(rec.n_tokens, 1)
            for e in range(rec.num_B):
                rows.append({"site": rec.name, "module": rec.module, "group": rec.group, "index": rec.index,
                             "expert": e, "usage": float(u[e]), "n_tokens": rec.n_tokens})
        return pd.DataFrame(rows)

    def token_table(self, tokenizer=None):
        """DataFrame of the sampled tokens: ``site, call, sequence, position, token_id, token,
        label, p0 … p{E-1}, top_expert``. ``token`` is filled when a tokenizer is given."""
        import pandas as pd

        frames = []
        for rec in self._records.values():
            cols = rec.tokens.columns
            n = len(cols["probs"])
            frame = pd.DataFrame({
                "site": [rec.name] * n, "module": rec.module, "group": rec.group, "index": rec.index,
                "call": cols["call"], "sequence": cols["sequence"], "position": cols["position"],
                "token_id": cols["token_id"],
                "label": [self.labels[c] if c >= 0 else None for c in cols["label"]],
            })
            for e in range(rec.num_B):
                frame[f"p{e}"] = cols["probs"][:, e]
            frame["top_expert"] = cols["probs"].argmax(axis=1) if n else np.zeros(0, dtype=int)
            frames.append(frame)
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        if tokenizer is not None and len(table):
            ids = table["token_id"].to_numpy()
            uniq = np.unique(ids[ids >= 0])
            text = dict(zip(uniq.tolist(), tokenizer.convert_ids_to_tokens(uniq.tolist())))
            table["token"] = [text.get(int(i)) for i in ids]
        elif len(table):
            table["token"] = None
        return table

    # ------------------------------------------------------------------ merge, save, load
    @classmethod
    def merge(cls, recordings: Iterable["Routing"], seed: int = 0) -> "Routing":
        """One recording from several (other loaders, other processes): sums add up exactly;
        token samples are drawn from the union, each source in proportion to what it saw."""
        recordings = list(recordings)
        if not recordings:
            raise RoutingError("merge needs at least one recording")
        names = recordings[0].sites
        for other in recordings[1:]:
            if other.sites != names:
                raise RoutingError(f"cannot merge recordings of different sites: {names[:3]}… vs {other.sites[:3]}…")
        labels: list = []
        for r in recordings:
            labels += [v for v in r.labels if v not in labels]
        max_tokens = max(r.max_tokens for r in recordings)
        rng = np.random.default_rng(seed)
        out: dict[str, SiteRecord] = {}
        for name in names:
            recs = [r.record(name) for r in recordings]
            remaps = [np.array([labels.index(v) for v in r.labels] + [_NO_LABEL], dtype=np.int64) for r in recordings]
            first = recs[0]
            rec = SiteRecord(first.name, first.module, first.group, first.index, first.kind, first.routing, first.num_B)
            call_offset = seq_offset = 0
            token_parts, mixture_parts = [], []
            for src, r, remap in zip(recs, recordings, remaps):
                rec.n_tokens += src.n_tokens
                rec.sum_probs += src.sum_probs
                rec.sum_token_entropy += src.sum_token_entropy
                rec.argmax_counts += src.argmax_counts
                rec.sum_z += src.sum_z
                rec.nonfinite += src.nonfinite
                rec.sum_mixture += src.sum_mixture
                rec.n_calls += src.n_calls
                for code, (cnt, sp, am, sh) in src.label_sums.items():
                    new = int(remap[code])
                    acc = rec.label_sums.setdefault(new, [0, np.zeros(rec.num_B), np.zeros(rec.num_B, dtype=np.int64), 0.0])
                    acc[0] += cnt; acc[1] = acc[1] + sp; acc[2] = acc[2] + am; acc[3] += sh  # noqa: E702
                for tok, (cnt, sp) in src.token_sums.items():
                    acc = rec.token_sums.setdefault(tok, [0, np.zeros(rec.num_B)])
                    acc[0] += cnt; acc[1] = acc[1] + sp  # noqa: E702
                cols = {k: v.copy() for k, v in src.tokens.columns.items()}
                cols["call"] += call_offset
                cols["sequence"] += seq_offset
                cols["label"] = remap[cols["label"]]
                token_parts.append((src.tokens.seen, cols))
                mcols = {k: v.copy() for k, v in src.mixtures.columns.items()}
                mcols["call"] += call_offset
                mcols["sequence"] += seq_offset
                mixture_parts.append((src.mixtures.seen, mcols))
                call_offset += r.n_calls
                seq_offset += r.n_sequences
            rec.tokens = _merge_reservoirs(token_parts, max_tokens, rng, recs[0].tokens)
            rec.mixtures = _merge_reservoirs(mixture_parts, max_tokens, rng, recs[0].mixtures)
            out[name] = rec
        merged = cls(out, labels, max_tokens)
        merged.n_calls = sum(r.n_calls for r in recordings)
        merged.n_sequences = sum(r.n_sequences for r in recordings)
        return merged

    def save(self, path: str | Path) -> Path:
        """Write the recording to one ``.npz`` file (arrays + a JSON header; no pickle)."""
        from ..core.checkpoint import _atomic_write

        data = self._npz_bytes()
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz") if path.suffix else path.with_suffix(".npz")
        _atomic_write(path, data)
        return path

    def gather(self, dst: int = 0, *, all_ranks: bool = False, seed: int = 0) -> "Routing":
        """Combine every rank's recording of a ``torch.distributed`` job: the merge (rank order, as
        :meth:`merge`) on rank ``dst``, or on every rank with ``all_ranks=True``; other ranks get
        this recording back. A collective: every rank must call it. Without an initialised process
        group it returns ``self``. ``record_routing`` does this on exit (see its ``gather=``)."""
        from .distributed import gather_routing

        return gather_routing(self, dst, all_ranks=all_ranks, seed=seed)

    def _npz_bytes(self) -> bytes:
        """The ``.npz`` file :meth:`save` writes, in memory (also what :meth:`gather` sends)."""
        import io

        arrays: dict[str, np.ndarray] = {}
        sites = []
        for k, rec in enumerate(self._records.values()):
            p = f"s{k}."
            for col, arr in rec.tokens.columns.items():
                arrays[p + "tokens." + col] = arr
            for col, arr in rec.mixtures.columns.items():
                arrays[p + "mixtures." + col] = arr
            arrays[p + "sum_probs"], arrays[p + "argmax_counts"] = rec.sum_probs, rec.argmax_counts
            arrays[p + "sum_mixture"] = rec.sum_mixture
            codes = sorted(rec.label_sums)
            arrays[p + "label_codes"] = np.array(codes, dtype=np.int64)
            arrays[p + "label_counts"] = np.array([rec.label_sums[c][0] for c in codes], dtype=np.int64)
            arrays[p + "label_probs"] = np.array([rec.label_sums[c][1] for c in codes]).reshape(len(codes), rec.num_B)
            arrays[p + "label_argmax"] = np.array([rec.label_sums[c][2] for c in codes], dtype=np.int64).reshape(len(codes), rec.num_B)
            arrays[p + "label_entropy"] = np.array([rec.label_sums[c][3] for c in codes], dtype=np.float64)
            toks = sorted(rec.token_sums)
            arrays[p + "token_ids"] = np.array(toks, dtype=np.int64)
            arrays[p + "token_counts"] = np.array([rec.token_sums[t][0] for t in toks], dtype=np.int64)
            arrays[p + "token_probs"] = np.array([rec.token_sums[t][1] for t in toks]).reshape(len(toks), rec.num_B)
            sites.append({
                "name": rec.name, "module": rec.module, "group": rec.group, "index": rec.index, "kind": rec.kind,
                "routing": rec.routing, "num_B": rec.num_B, "n_tokens": rec.n_tokens,
                "sum_token_entropy": rec.sum_token_entropy, "sum_z": rec.sum_z, "nonfinite": rec.nonfinite,
                "n_calls": rec.n_calls, "tokens_seen": rec.tokens.seen, "mixtures_seen": rec.mixtures.seen,
            })
        header = {"format": FORMAT, "format_version": FORMAT_VERSION, "labels": self.labels,
                  "max_tokens": self.max_tokens, "n_calls": self.n_calls, "n_sequences": self.n_sequences,
                  "sites": sites}
        try:
            arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        except TypeError as err:
            raise RoutingError(f"labels must be JSON values (int, str, float, bool) to save: {err}") from None
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> "Routing":
        """Read a recording written by :meth:`save`."""
        from ._routing_io import load_routing

        return load_routing(cls, Path(path))

    def __repr__(self) -> str:
        n = max((r.n_tokens for r in self._records.values()), default=0)
        return f"Routing({len(self._records)} sites, {n:,} tokens, {self.n_calls} calls)"


def _merge_reservoirs(parts, size, rng, template: Reservoir) -> Reservoir:
    """A uniform sample of the union of several reservoirs' streams."""
    res = Reservoir(size, {k: (v.shape[1:], v.dtype) for k, v in template.columns.items()})
    res.seen = sum(seen for seen, _ in parts)
    if res.seen == 0 or size == 0:
        return res
    # How many of a uniform K-sample of the union fall in each stream is multivariate
    # hypergeometric; each source's own sample is uniform and at least that large.
    seen = np.array([n for n, _ in parts], dtype=np.int64)
    take = rng.multivariate_hypergeometric(seen, min(size, int(seen.sum())))
    chosen = []
    for (_, cols), k in zip(parts, take):
        idx = np.sort(rng.choice(len(next(iter(cols.values()))), size=k, replace=False))
        chosen.append({c: v[idx] for c, v in cols.items()})
    res.columns = {c: np.concatenate([part[c] for part in chosen]) for c in res.columns}
    return res
