"""``Routing``: what the routers of a model did over some forward calls, kept in bounded memory.

Per site it keeps exact running sums of everything docs/metrics.md needs (so metrics are exact however
many tokens went by), and a uniform reservoir sample of tokens for token-level views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..core.errors import LilyLabTypeError, RoutingError
from .tokens import token_texts

_NO_LABEL = -1  # label code of an unlabelled token

#: The phases of a token, by code: ``None`` (-1) a forward call given no KV cache (an encoder, a
#: training step, a plain forward), ``"prefill"`` (0) a call given an empty KV cache (``generate``'s
#: first call: the prompt), ``"decode"`` (1) a call continuing a KV cache (a generated token).
PHASES = (None, "prefill", "decode")
_PHASE_CODES = {None: -1, "prefill": 0, "decode": 1}
_PHASE_NAMES = {-1: None, 0: "prefill", 1: "decode"}


def _is_missing(value) -> bool:
    """Whether a label is missing: ``None``, a NaN (Python's, numpy's, ``Decimal``'s: a value
    unequal to itself), or pandas' ``NA`` / ``NaT`` (told by type, without importing pandas)."""
    if value is None:
        return True
    kind = type(value)
    if kind.__name__ in ("NAType", "NaTType") and kind.__module__.startswith("pandas"):
        return True
    try:
        return bool(value != value)
    except Exception:  # a label whose != is not a truth value (an array, say) is not NaN
        return False


def check_labels(labels: list, where: str = "annotate") -> None:
    """Refuse labels with missing values (:func:`_is_missing`): coded by equality, every NaN
    would become a class of its own (NaN != NaN), and None would read as "unlabelled" in frames;
    either way a metric by label would silently count a made-up class."""
    missing = [i for i, v in enumerate(labels) if _is_missing(v)]
    if missing:
        first = labels[missing[0]]
        raise RoutingError(
            f"{where} got {len(missing)} missing label{'s' if len(missing) != 1 else ''} (None, NaN or pandas NA) "
            f"among {len(labels)}, the first at position {missing[0]} ({first!r}); a missing label is no class: "
            "drop those sequences, or fill the labels with a class of their own (e.g. "
            "series.fillna('unknown')) before annotating")


def entropy(p: np.ndarray) -> np.ndarray:
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


@dataclass(slots=True)
class LabelSums:
    """Exact sums over the tokens of one label, at one site (and phase)."""

    count: int  # tokens
    probs: np.ndarray  # (E,)  Σ_t p_t
    argmax: np.ndarray  # (E,)  tokens whose top expert is e (int64)
    entropy: float  # Σ_t H(p_t), nats

    @classmethod
    def zeros(cls, E: int) -> "LabelSums":
        return cls(0, np.zeros(E), np.zeros(E, dtype=np.int64), 0.0)

    def add(self, other: "LabelSums") -> None:
        self.count += other.count
        self.probs = self.probs + other.probs
        self.argmax = self.argmax + other.argmax
        self.entropy += other.entropy

    def copy(self) -> "LabelSums":
        return LabelSums(self.count, self.probs.copy(), self.argmax.copy(), self.entropy)


@dataclass(slots=True)
class TokenSums:
    """Exact sums over the occurrences of one token id, at one site (and phase)."""

    count: int  # occurrences
    probs: np.ndarray  # (E,)  Σ p_t over them

    @classmethod
    def zeros(cls, E: int) -> "TokenSums":
        return cls(0, np.zeros(E))

    def add(self, other: "TokenSums") -> None:
        self.count += other.count
        self.probs = self.probs + other.probs

    def copy(self) -> "TokenSums":
        return TokenSums(self.count, self.probs.copy())


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
    label_sums: dict = field(default_factory=dict)  # label code → LabelSums
    token_sums: dict = field(default_factory=dict)  # token id → TokenSums
    tokens: Reservoir = None  # sampled tokens: probs, logits, call, sequence, position, token_id, label, phase
    mixtures: Reservoir = None  # sampled applied mixtures: mixture, call, sequence, phase
    # Phase code (see PHASES) → a SiteRecord of that phase's sums alone (its tokens and mixtures are
    # empty samples whose ``seen`` counts the phase's offered rows). When not empty, the sums above
    # are exactly the phases' sums added in code order.
    phases: dict = field(default_factory=dict)
    # A top-k router (a mixture-of-experts layer, docs/beyond_lily.md): the experts each token is
    # sent to, and how many tokens each expert was sent (Σ = top_k · n_tokens). 0 and zeros for a
    # site that mixes every expert (Lily).
    top_k: int = 0
    dispatch_counts: np.ndarray = None  # (E,) int64

    def __post_init__(self) -> None:
        E = self.num_B
        for name in ("sum_probs", "sum_mixture"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(E))
        for name in ("argmax_counts", "dispatch_counts"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(E, dtype=np.int64))

    def empty_like(self) -> "SiteRecord":
        """A record of the same site with no sums and no samples."""
        return SiteRecord(self.name, self.module, self.group, self.index, self.kind, self.routing, self.num_B,
                          top_k=self.top_k)

    def phase_record(self, code: int) -> "SiteRecord":
        """The record of phase ``code``'s sums, created empty on first use."""
        rec = self.phases.get(code)
        if rec is None:
            rec = self.phases[code] = self.empty_like()
            rec.tokens, rec.mixtures = _counter(self.tokens), _counter(self.mixtures)
        return rec

    def phase_records(self) -> dict:
        """Phase code → record of that phase's sums; a record kept without phases (an old file)
        is all of phase ``None``."""
        return self.phases if self.phases else {-1: self}

    def sum_phases(self, token_ids=None) -> None:
        """Set the sums to those of the phases added in code order (so they add up exactly);
        ``token_ids``: only these entries of ``token_sums`` (None: all)."""
        if not self.phases:
            return
        parts = [self.phases[c] for c in sorted(self.phases)]
        E = self.num_B
        self.n_tokens = sum(p.n_tokens for p in parts)
        self.nonfinite = sum(p.nonfinite for p in parts)
        self.n_calls = sum(p.n_calls for p in parts)
        self.sum_probs, self.sum_mixture = np.zeros(E), np.zeros(E)
        self.argmax_counts = np.zeros(E, dtype=np.int64)
        self.dispatch_counts = np.zeros(E, dtype=np.int64)
        self.sum_token_entropy = self.sum_z = 0.0
        for p in parts:
            self.sum_probs = self.sum_probs + p.sum_probs
            self.sum_mixture = self.sum_mixture + p.sum_mixture
            self.argmax_counts = self.argmax_counts + p.argmax_counts
            self.dispatch_counts = self.dispatch_counts + p.dispatch_counts
            self.sum_token_entropy += p.sum_token_entropy
            self.sum_z += p.sum_z
        self.label_sums = {}
        for p in parts:
            for code, sums in p.label_sums.items():
                self.label_sums.setdefault(code, LabelSums.zeros(E)).add(sums)
        if token_ids is None:
            self.token_sums = {}
            token_ids = {t for p in parts for t in p.token_sums}
        for t in token_ids:
            total = TokenSums.zeros(E)
            for p in parts:
                sums = p.token_sums.get(t)
                if sums is not None:
                    total.add(sums)
            self.token_sums[t] = total

    def copy_sums(self) -> "SiteRecord":
        """A new record holding copies of this one's sums (not its samples or phases)."""
        rec = SiteRecord(self.name, self.module, self.group, self.index, self.kind, self.routing, self.num_B,
                         self.n_tokens, self.sum_probs.copy(), self.sum_token_entropy, self.argmax_counts.copy(),
                         self.sum_z, self.nonfinite, self.sum_mixture.copy(), self.n_calls, top_k=self.top_k,
                         dispatch_counts=self.dispatch_counts.copy())
        rec.label_sums = {c: v.copy() for c, v in self.label_sums.items()}
        rec.token_sums = {t: v.copy() for t, v in self.token_sums.items()}
        return rec


def _counter(template: Reservoir | None) -> Reservoir:
    """An empty sample (size 0) with ``template``'s columns: it only counts the rows it is offered."""
    spec = {} if template is None else {k: (v.shape[1:], v.dtype) for k, v in template.columns.items()}
    return Reservoir(0, spec)


def _phase_column(res: Reservoir) -> np.ndarray:
    """The sample's ``phase`` codes (all -1 for a sample kept without them)."""
    col = res.columns.get("phase")
    if col is None:
        return np.full(len(next(iter(res.columns.values()))) if res.columns else 0, -1, dtype=np.int8)
    return col


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

    @property
    def phases(self) -> list:
        """The phases this recording holds tokens or calls of, in the order of :data:`PHASES`:
        ``None`` (calls without a KV cache), ``"prefill"`` (the prompt of a cached generation),
        ``"decode"`` (its generated tokens)."""
        codes = {c for rec in self._records.values() for c, p in rec.phase_records().items()
                 if p.n_tokens or p.n_calls or p.nonfinite}
        return [_PHASE_NAMES[c] for c in sorted(codes)]

    def phase(self, name) -> "Routing":
        """A recording of phase ``name``'s tokens alone (``"prefill"``, ``"decode"`` or ``None``, see
        :data:`PHASES`): its sums are that phase's exact sums, its samples the sampled tokens and
        mixtures of that phase (a uniform sample of them), so every analysis works on it unchanged.
        The phases' sums add up exactly to this recording's. ``n_calls`` and ``n_sequences`` stay
        this recording's (call and sequence numbers keep their meaning)."""
        present = self.phases
        if name not in _PHASE_CODES or name not in present:
            shown = ", ".join(repr(p) for p in present) or "none (nothing was recorded)"
            raise RoutingError(f"no phase {name!r} in this recording; its phases: {shown}")
        code = _PHASE_CODES[name]
        records = {}
        for key, rec in self._records.items():
            src = rec.phase_records().get(code)
            out = src.copy_sums() if src is not None else rec.empty_like()
            for attr in ("tokens", "mixtures"):
                res = getattr(rec, attr)
                keep = _phase_column(res) == code
                view = Reservoir(res.size, {k: (v.shape[1:], v.dtype) for k, v in res.columns.items()})
                view.columns = {k: v[keep] for k, v in res.columns.items()}
                view.seen = 0 if src is None else res.seen if src is rec else getattr(src, attr).seen
                setattr(out, attr, view)
            ph = out.copy_sums()
            ph.tokens, ph.mixtures = _counter(out.tokens), _counter(out.mixtures)
            ph.tokens.seen, ph.mixtures.seen = out.tokens.seen, out.mixtures.seen
            out.phases = {code: ph}
            records[key] = out
        view = Routing(records, self.labels, self.max_tokens)
        view.n_calls, view.n_sequences = self.n_calls, self.n_sequences
        return view

    def mean_mixture(self, site: str) -> np.ndarray:
        """The applied mixture averaged over the recorded (non-padding) tokens, each token weighted
        once (exact): under batch routing, the calls' mixtures weighted by their real tokens. The
        layer's own batch mixture also averages over padding positions; this mean does not."""
        rec = self.record(site)
        return rec.sum_mixture / max(rec.n_tokens, 1)

    def usage(self):
        """DataFrame ``site, module, group, index, expert, usage`` — the exact usage ``u_e`` (docs/metrics.md)."""
        import pandas as pd

        rows = []
        for rec in self._records.values():
            u = rec.sum_probs / max(rec.n_tokens, 1)
            for e in range(rec.num_B):
                rows.append({"site": rec.name, "module": rec.module, "group": rec.group, "index": rec.index,
                             "expert": e, "usage": float(u[e]), "n_tokens": rec.n_tokens})
        return pd.DataFrame(rows)

    def token_table(self, tokenizer=None):
        """DataFrame of the sampled tokens: ``site, call, sequence, position, phase, token_id, token,
        label, p0 … p{E-1}, top_expert``. ``token`` is filled when a tokenizer is given, as readable
        text (``lily_lab.observe.tokens.token_texts``: a byte-level BPE's ``Ġthe`` reads `` the``, its
        newline ``⏎``; WordPiece ``##ing`` stays as it is); ``phase`` is
        ``"prefill"``, ``"decode"`` or ``None`` (see :data:`PHASES`). ``position`` is the token's
        column in its sequence's padded text: in a cached generation the prompt's padded columns
        (left padding included, so a left-padded prompt's first real token is not at 0), then one
        per generated token, continuing across the decode calls."""
        import pandas as pd

        frames = []
        for rec in self._records.values():
            cols = rec.tokens.columns
            n = len(cols["probs"])
            frame = pd.DataFrame({
                "site": [rec.name] * n, "module": rec.module, "group": rec.group, "index": rec.index,
                "call": cols["call"], "sequence": cols["sequence"], "position": cols["position"],
                "phase": [_PHASE_NAMES[int(c)] for c in _phase_column(rec.tokens)] if n else [],
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
            uniq = np.unique(ids[ids >= 0]).tolist()
            text = dict(zip(uniq, token_texts(tokenizer, uniq)))
            table["token"] = [text.get(int(i)) for i in ids]
        elif len(table):
            table["token"] = None
        return table

    # ------------------------------------------------------------------ merge, save, load
    @classmethod
    def merge(cls, recordings: Iterable["Routing"], seed: int = 0) -> "Routing":
        """One recording from several (other loaders, other processes): sums add up exactly;
        token samples are drawn from the union, each source in proportion to what it saw."""
        try:
            recordings = list(recordings)
        except TypeError:
            raise LilyLabTypeError(f"Routing.merge: recordings must be a list of lily_lab.Routing, got "
                                   f"{type(recordings).__name__}") from None
        wrong = [type(r).__name__ for r in recordings if not isinstance(r, Routing)]
        if wrong:
            raise LilyLabTypeError(f"Routing.merge: recordings must be lily_lab.Routing objects (rec.routing), got "
                                   f"{', '.join(dict.fromkeys(wrong))}")
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
            rec = first.empty_like()
            rec.tokens, rec.mixtures = first.tokens, first.mixtures  # the column layout, for the phases' counters
            call_offset = seq_offset = 0
            token_parts, mixture_parts = [], []
            for src, r, remap in zip(recs, recordings, remaps):
                for code, ph in src.phase_records().items():
                    _add_sums(rec.phase_record(code), ph, remap)
                rec.n_tokens += src.n_tokens
                rec.sum_probs += src.sum_probs
                rec.sum_token_entropy += src.sum_token_entropy
                rec.argmax_counts += src.argmax_counts
                rec.dispatch_counts += src.dispatch_counts
                rec.sum_z += src.sum_z
                rec.nonfinite += src.nonfinite
                rec.sum_mixture += src.sum_mixture
                rec.n_calls += src.n_calls
                for code, sums in src.label_sums.items():
                    rec.label_sums.setdefault(int(remap[code]), LabelSums.zeros(rec.num_B)).add(sums)
                for tok, sums in src.token_sums.items():
                    rec.token_sums.setdefault(tok, TokenSums.zeros(rec.num_B)).add(sums)
                cols = {k: v.copy() for k, v in src.tokens.columns.items()}
                cols["phase"] = _phase_column(src.tokens).copy()
                cols["call"] += call_offset
                cols["sequence"] += seq_offset
                cols["label"] = remap[cols["label"]]
                token_parts.append((src.tokens.seen, cols))
                mcols = {k: v.copy() for k, v in src.mixtures.columns.items()}
                mcols["phase"] = _phase_column(src.mixtures).copy()
                mcols["call"] += call_offset
                mcols["sequence"] += seq_offset
                mixture_parts.append((src.mixtures.seen, mcols))
                call_offset += r.n_calls
                seq_offset += r.n_sequences
            rec.tokens = _merge_reservoirs(token_parts, max_tokens, rng, token_parts[0][1])
            rec.mixtures = _merge_reservoirs(mixture_parts, max_tokens, rng, mixture_parts[0][1])
            rec.sum_phases()  # the phases were summed like the totals; the totals now add them up exactly
            out[name] = rec
        merged = cls(out, labels, max_tokens)
        merged.n_calls = sum(r.n_calls for r in recordings)
        merged.n_sequences = sum(r.n_sequences for r in recordings)
        return merged

    def save(self, path: str | Path) -> Path:
        """Write the recording to one ``.npz`` file (arrays + a JSON header; no pickle), atomically:
        a reader sees the old file or the new one, never part of it. Returns the path written (with
        ``.npz`` added when ``path`` has another suffix or none)."""
        from .routing_file import save_routing

        return save_routing(self, path)

    def gather(self, dst: int = 0, *, all_ranks: bool = False, seed: int = 0) -> "Routing":
        """Combine every rank's recording of a ``torch.distributed`` job: the merge (rank order, as
        :meth:`merge`) on rank ``dst``, or on every rank with ``all_ranks=True``; other ranks get
        this recording back. A collective: every rank must call it. Without an initialised process
        group it returns ``self``. ``record_routing`` does this on exit (see its ``gather=``)."""
        from .distributed import gather_routing

        return gather_routing(self, dst, all_ranks=all_ranks, seed=seed)

    @classmethod
    def load(cls, path: str | Path) -> "Routing":
        """Read a recording written by :meth:`save`; every field is checked before it is trusted
        (docs/architecture.md, "Routing recordings")."""
        from .routing_file import load_routing

        return load_routing(cls, Path(path))

    def __repr__(self) -> str:
        n = max((r.n_tokens for r in self._records.values()), default=0)
        return f"Routing({len(self._records)} sites, {n:,} tokens, {self.n_calls} calls)"


def _merge_reservoirs(parts, size, rng, template: dict) -> Reservoir:
    """A uniform sample of the union of several reservoirs' streams (``template``: a part's columns)."""
    res = Reservoir(size, {k: (v.shape[1:], v.dtype) for k, v in template.items()})
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


def _add_sums(acc: SiteRecord, src: SiteRecord, remap: np.ndarray) -> None:
    """Add ``src``'s sums (label codes through ``remap``) and sample counts into ``acc``."""
    E = acc.num_B
    acc.n_tokens += src.n_tokens
    acc.sum_probs = acc.sum_probs + src.sum_probs
    acc.sum_token_entropy += src.sum_token_entropy
    acc.argmax_counts = acc.argmax_counts + src.argmax_counts
    acc.dispatch_counts = acc.dispatch_counts + src.dispatch_counts
    acc.sum_z += src.sum_z
    acc.nonfinite += src.nonfinite
    acc.sum_mixture = acc.sum_mixture + src.sum_mixture
    acc.n_calls += src.n_calls
    for code, sums in src.label_sums.items():
        acc.label_sums.setdefault(int(remap[code]), LabelSums.zeros(E)).add(sums)
    for tok, sums in src.token_sums.items():
        acc.token_sums.setdefault(tok, TokenSums.zeros(E)).add(sums)
    acc.tokens.seen += src.tokens.seen if src.tokens is not None else 0
    acc.mixtures.seen += src.mixtures.seen if src.mixtures is not None else 0
