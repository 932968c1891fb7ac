"""``diagnose``: is this routed adapter collapsed, where, and what to try (docs/diagnosis.md).

Each finding says what is wrong (``kind``, ``severity``), where (``sites``: site names, or group
keys for bank-level findings), the numbers that triggered it (``evidence``) and a ``remedy`` in
plain words. Remedies name only options lily_lab has, and only ones measured to help.

The routers of a mixture-of-experts LLM (``core.routers.router_sites``: Mixtral, Qwen2-MoE, OLMoE,
DeepSeek-V3, GPT-OSS) are diagnosed too, per layer: their ``dominant_expert`` and ``dead_expert``
read the dispatch (the tokens each expert was actually sent), and their findings name the layers,
since an average over layers hides one collapsed layer among healthy ones. Such a model has no
bank of B experts: the bank checks are skipped, with a note.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from ..core import LilyLayer, adapter_sites
from ..core.errors import InputError, LilyLabError, LilyLabTypeError
from ..core.inject import get_state
from ..core.palette import SEVERITY_COLORS
from ..core.layer import require_module
from ..core.sites import sites_or_routers
from ..observe.routing import Routing
from .causal import CausalConsistencyError, batch_of, causal_consistency, is_causal_lm, pad_token_id, \
    recorded_sequences, vocab_size
from .experts import bank_summary
from .finite import DIVERGED_REMEDY, TENSORS, nonfinite_counts
from .routing import require_routing, router_metrics

KINDS = ("dominant_expert", "dead_expert", "input_blind_router", "redundant_experts", "inactive_adapter",
         "future_leak", "nonfinite_weights")


@dataclass
class Thresholds:
    """When each finding fires (the defaults, and what each means: docs/diagnosis.md)."""

    dominant_usage: float = 0.9  # max_usage ≥ this → dominant_expert
    dominant_critical: float = 0.99
    dead_fraction: float = 0.1  # u_e < dead_fraction / E → dead_expert
    blind_mi: float = 0.01  # routing_mi < this → input_blind_router
    redundant_cosine: float = 0.9  # mean pairwise B cosine ≥ this → redundant_experts
    redundant_critical: float = 0.99
    inactive_norm: float = 1e-6  # every ‖B_e‖ below this → inactive_adapter
    future_leak: float = 1e-4  # future_leak or generation_drift (|Δ logit|) above this → future_leak
    # Top-k routers (mixture-of-experts layers) are judged by their dispatch: dominant_expert when
    # one expert is sent ≥ dominant_usage of the layer's tokens (dispatch share ≥ dominant_usage /
    # top_k), dead_expert when an expert is sent < dead_fraction of its fair k·N/E tokens — checked
    # only where that fair share is at least dead_min_tokens tokens (fewer: a note, not a finding).
    dead_min_tokens: float = 10.0


def as_thresholds(thresholds: Thresholds | dict | None) -> Thresholds:
    """``thresholds`` as a :class:`Thresholds` (None: the defaults; a dict: those fields changed), checked."""
    if thresholds is None:
        return Thresholds()
    if isinstance(thresholds, Thresholds):
        return thresholds
    if isinstance(thresholds, dict):
        unknown = set(thresholds) - set(Thresholds.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown thresholds {sorted(unknown)}; known: {sorted(Thresholds.__dataclass_fields__)}")
        return Thresholds(**thresholds)
    raise LilyLabTypeError(f"thresholds must be a lily_lab.analysis.Thresholds, a dict of its fields or None, got "
                           f"{type(thresholds).__name__}")


def _plural(n: int, what: str) -> str:
    """``1 site``, ``2 sites``."""
    return f"{n} {what}{'s' * (n != 1)}"


#: future_leak replays at most this many recorded sequences, each cut to its first LEAK_LENGTH tokens.
LEAK_SEQUENCES, LEAK_LENGTH = 4, 64

#: Findings about a whole bank: their ``sites`` are group keys (``query:384x384``), not site names.
BANK_KINDS = frozenset({"redundant_experts", "inactive_adapter", "nonfinite_weights"})

#: The checks a recording feeds.
ROUTER_CHECKS = ("dominant_expert", "dead_expert", "input_blind_router")


@dataclass
class Finding:
    kind: str
    severity: str  # "warning" or "critical"
    sites: list[str]
    evidence: dict[str, Any]
    remedy: str
    summary: str = ""

    @property
    def scope(self) -> str:
        """``"bank"`` when ``sites`` names banks (group keys), ``"site"`` when it names sites."""
        return "bank" if self.kind in BANK_KINDS else "site"

    def __str__(self) -> str:
        where = ", ".join(self.sites[:4]) + (f" (+{len(self.sites) - 4} more)" if len(self.sites) > 4 else "")
        return f"[{self.severity}] {self.kind}: {self.summary}\n    where: {where}\n    try: {self.remedy}"


@dataclass
class Diagnosis:
    """The findings of :func:`diagnose`. ``ok`` is True when there are none; ``headline``, when
    set, says why "no collapse found" would claim too much (nothing was recorded)."""

    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    headline: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_frame(self) -> pd.DataFrame:
        rows = [{**asdict(f), "n_sites": len(f.sites), "scope": f.scope} for f in self.findings]
        return pd.DataFrame(rows, columns=["kind", "severity", "summary", "sites", "n_sites", "scope", "evidence",
                                           "remedy"])

    def __str__(self) -> str:
        head = _plural(len(self.findings), "finding") if not self.ok else self.headline or "no collapse found"
        lines = [f"Diagnosis: {head} (checked: {', '.join(self.checked) or 'nothing'})"]
        lines += [str(f) for f in self.findings]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        colour = SEVERITY_COLORS
        rows = "".join(
            f"<tr><td style='color:{colour[f.severity]};font-weight:bold'>{f.severity}</td><td>{f.kind}</td>"
            f"<td>{html.escape(f.summary)}</td><td>{html.escape(', '.join(f.sites[:6]))}"
            f"{' …' if len(f.sites) > 6 else ''}</td><td>{html.escape(f.remedy)}</td></tr>"
            for f in self.findings)
        status = ("" if not self.ok else f"<p><b>{html.escape(self.headline)}</b></p>" if self.headline
                  else f"<p style='color:{SEVERITY_COLORS['ok']}'><b>No collapse found.</b></p>")
        notes = "".join(f"<p><i>{html.escape(n)}</i></p>" for n in self.notes)
        return (f"<div><b>lily_lab diagnosis</b> — checked: {', '.join(self.checked) or 'nothing'}{status}"
                + (f"<table><tr><th>severity</th><th>kind</th><th>what</th><th>where</th><th>try</th></tr>{rows}</table>"
                   if rows else "") + notes + "</div>")


def _routing_mode(model: nn.Module) -> str:
    state = get_state(model)
    return state.config.routing if state is not None else "batch"


def _remedy_redundant(mode: str) -> str:
    why = ("Under batch routing every expert of a bank receives the same gradient direction, scaled: "
           "∂L/∂B_e = Σ_sites π_e·G_site with one π per site for the whole batch — exactly parallel for a "
           "bank with one site, nearly so while its sites' mixtures are alike — so experts that start at "
           "zero grow as near copies (sequence routing weights each sequence differently, but only mildly).")
    measured = ("Measured with lily_lab on MiniLM / tweet sentiment (1,024 tweets, query and value, r=16, "
                "2 epochs; python -m benchmarks.measure_remedies), mean expert cosine query / value: batch "
                "routing 0.90 / 0.89, sequence 0.95 / 0.81, token 0.70 / 0.75, batch with random B "
                "0.52 / 0.56, token with random B 0.42 / 0.52; held-out accuracy 0.82–0.85 for all.")
    if mode == "token":
        return ("Experts are alike although routing is per token: start B random "
                "(LilyConfig(init_weights=False)), train longer, or raise router_entropy_weight together "
                f"with balance_loss_weight so tokens pick experts decisively. {measured}")
    if mode == "causal":
        return ("Experts are alike under causal routing, whose mixtures are running means of p: they vary "
                "along a sequence but average the router's choices, as batch and sequence routing do (not "
                "measured on MiniLM: it is an encoder). Start B random (LilyConfig(init_weights=False)), or "
                f"compare routing='token'. {measured}")
    return (f"{why} Start B random (LilyConfig(init_weights=False)), the strongest single change measured, "
            f"and/or route per token (routing='token'); sequence routing did not help. {measured}")


def _balance_caveat(modes: set) -> str:
    if not modes & {"batch", "sequence"}:
        return ""
    return (" Under batch or sequence routing a balance loss spreads the load more evenly (higher "
            "load_entropy) — it trains the routers and, through the router logits x·Aᵀ·Rᵀ, the shared A — "
            "but does not make the experts differ (notebook 03: with balance_loss_weight=0.05 and batch "
            "routing the experts stayed near copies): pair it with init_weights=False or routing='token'.")


def diagnose(model: nn.Module, routing: Routing | None = None, thresholds: Thresholds | dict | None = None, *,
             checks=None) -> Diagnosis:
    """Look for expert collapse in ``model``'s adapter, and in ``routing`` when given.

    Bank-level checks (``redundant_experts``, ``inactive_adapter``) need only the model; router
    checks (``dominant_expert``, ``dead_expert``, ``input_blind_router``) need a recording from
    :func:`record_routing` on representative data. On a causal LM whose Lily sites route under
    ``batch`` or ``sequence`` (or PEFT's Lily, which mixes over the call), ``future_leak`` replays
    up to 4 recorded sequences (64 tokens each, rebuilt from the recording's sampled token ids)
    through :func:`causal_consistency` in the model's own mode, and fires when later tokens change
    earlier logits, or cached generation drifts from one forward pass, by more than
    ``Thresholds.future_leak``. ``thresholds``: a :class:`Thresholds` or a
    dict of its fields.

    First of all, ``nonfinite_weights`` (critical) names the banks whose ``A``, ``B`` or routers
    hold NaN or inf — a diverged run; the other checks skip those banks and their sites (a note
    says so), and ``future_leak`` is not replayed. A recording without a single token gives a
    "nothing recorded" note and headline, never "no collapse found".

    ``checks``: the finding kinds to look for (``KINDS``; None: all). ``nonfinite_weights`` is
    always checked, since the other checks skip the banks it names. ``RoutingMonitor`` passes the
    bank and router checks only, which are cheap enough to run at every logging step.

    ``model`` may also be a mixture-of-experts LLM without an adapter (its top-k routers:
    ``router_sites``). Its bank checks are skipped with a note; its router checks run per layer,
    ``dominant_expert`` and ``dead_expert`` on the dispatch (the tokens each expert was sent:
    ``expert_load``), and every finding names its layers ("layer 2 of 4: expert 2 takes 100% of
    the tokens"). ``dead_expert`` needs a fair share of ``Thresholds.dead_min_tokens`` tokens per
    expert; fewer, and a note says which layers it did not check. A model with neither adapter
    sites nor routers raises :class:`~lily_lab.InputError`.
    """
    wanted = _wanted_checks(checks)
    t = as_thresholds(thresholds)
    require_module(model, "diagnose")
    if routing is not None:
        require_routing(routing, "diagnose")
    sites, routers = sites_or_routers(model, "diagnose")
    d = Diagnosis()
    bad: dict = {}
    if sites:
        mode = _routing_mode(model)
        d.checked = [k for k in ("nonfinite_weights", "inactive_adapter", "redundant_experts") if k in wanted]
        bad = nonfinite_counts(sites)
        if bad:
            _report_nonfinite(bad, d, routing is not None)
        banks = bank_summary(model)
        banks = banks[~banks.group.isin(list(bad))]
        for kind, check in (("inactive_adapter", _check_inactive_adapter),
                            ("redundant_experts", _check_redundant_experts)):
            if kind in wanted and (finding := check(banks, t, mode)) is not None:
                d.findings.append(finding)
    else:
        d.notes.append(f"bank checks ({', '.join(sorted(BANK_KINDS))}) skipped: this model has no low-rank adapter "
                       f"(no Lily or LoRA site), only the {_plural(len(routers), 'top-k router')} of its "
                       "mixture-of-experts layers, so there is no bank of B experts to check")
    bad_sites = {name for entry in bad.values() for name in entry["sites"]}
    leaky = _leaky_sites(model) if "future_leak" in wanted else []
    if routing is None:
        d.notes.append("router checks skipped: pass routing= a recording from record_routing on your data")
        if leaky:
            d.notes.append("future_leak not checked: it replays sequences of a recording (pass routing=)")
        if not sites:
            d.headline = "nothing checked: a mixture-of-experts model has router checks only, and they need routing="
        return d
    if not _recorded_anything(routing, d, bool(leaky)):
        if not sites:
            d.headline = "nothing recorded: router checks not run (the model has no adapter for bank checks)"
        return d
    d.checked += [k for k in ROUTER_CHECKS if k in wanted]
    m = router_metrics(routing).dropna(subset=["max_usage"])
    m = m[~m.group.isin(list(bad)) & ~m.site.isin(bad_sites)]
    lily, moe = m[m.top_k == 0], m[m.top_k > 0]
    router_checks = ((_check_dominant_expert, _check_dominant_dispatch), (_check_dead_expert, _check_dead_dispatch),
                     (_check_input_blind_router, _check_input_blind_topk))
    for kind, (check, check_topk) in zip(ROUTER_CHECKS, router_checks):
        if kind not in wanted:
            continue
        for part, fn in ((lily, check), (moe, check_topk)):
            if len(part) and (finding := fn(part, routing, t)) is not None:
                d.findings.append(finding)
    if "dead_expert" in wanted:
        _note_small_dispatch(moe, t, d)
    if leaky and bad:
        d.notes.append("future_leak not checked: the adapter has non-finite weights, so the model's outputs are "
                       "not finite either")
    elif leaky:
        _check_future_leak(model, routing, leaky, t, d)
    return d


def _wanted_checks(checks) -> set[str]:
    """The finding kinds ``diagnose(checks=…)`` asks for, checked (``nonfinite_weights`` always)."""
    if checks is None:
        return set(KINDS)
    if isinstance(checks, str) or not hasattr(checks, "__iter__"):
        raise LilyLabTypeError(f"diagnose: checks must be a list of finding kinds (or None for all), got {checks!r}")
    checks = list(checks)
    unknown = sorted({str(c) for c in checks} - set(KINDS))
    if unknown or not all(isinstance(c, str) for c in checks):
        raise InputError(f"diagnose: unknown checks {unknown or checks}; the kinds are {list(KINDS)}")
    return set(checks) | {"nonfinite_weights"}


# --------------------------------------------------------------------------- the checks
# One function per finding kind: what it looks at, its thresholds (``Thresholds``) and its remedy
# side by side (docs/diagnosis.md describes each). Bank checks take ``bank_summary`` rows, router
# checks ``router_metrics`` rows of a recording; each returns its Finding, or None.


def _check_inactive_adapter(banks: pd.DataFrame, t: Thresholds, mode: str) -> Finding | None:
    inactive = banks[banks.max_norm < t.inactive_norm]
    if not len(inactive):
        return None
    return Finding(
        "inactive_adapter", "warning", list(inactive.group),
        {"max_norm": dict(zip(inactive.group, inactive.max_norm))},
        "Train the adapter: B starts at zero (init_weights=True), so a fresh adapter changes nothing. If it "
        "stays at zero after training, check that the adapter's parameters are in the optimizer "
        "(count_parameters(model)['trainable']) and that the learning rate is not 0.",
        f"{_plural(len(inactive), 'bank')} whose every expert is zero: the adapter has learned nothing yet")


def _check_redundant_experts(banks: pd.DataFrame, t: Thresholds, mode: str) -> Finding | None:
    active = banks[(banks.max_norm >= t.inactive_norm) & (banks.num_B >= 2)]
    redundant = active[active.mean_cosine >= t.redundant_cosine]
    if not len(redundant):
        return None
    critical = bool((redundant.mean_cosine >= t.redundant_critical).any())
    return Finding(
        "redundant_experts", "critical" if critical else "warning", list(redundant.group),
        {"mean_cosine": dict(zip(redundant.group, redundant.mean_cosine.round(4))),
         "distinct_experts": dict(zip(redundant.group, redundant.distinct_experts.round(3))),
         "routing": mode},
        _remedy_redundant(mode),
        f"{_plural(len(redundant), 'bank')} whose B experts are near copies (mean pairwise cosine ≥ "
        f"{t.redundant_critical if critical else t.redundant_cosine})")


def _check_dominant_expert(m: pd.DataFrame, routing: Routing, t: Thresholds) -> Finding | None:
    dom = m[m.max_usage >= t.dominant_usage]
    if not len(dom):
        return None
    usage = routing.usage()
    top = {s: int(usage[usage.site == s].sort_values("usage").expert.iloc[-1]) for s in dom.site}
    return Finding(
        "dominant_expert", "critical" if (dom.max_usage >= t.dominant_critical).any() else "warning",
        list(dom.site), {"max_usage": dict(zip(dom.site, dom.max_usage.round(4))), "top_expert": top},
        "Add a load-balancing loss: LilyConfig(balance_loss_weight=0.01 … 0.1) and add "
        "lily_aux_loss(model) to the training loss (measured in tests/test_diagnose.py: it turns a "
        "router stuck on one expert back to balanced use). A higher router_temperature early in "
        "training also spreads the load." + _balance_caveat(set(dom.routing)),
        f"{_plural(len(dom), 'site')} sending ≥ {t.dominant_usage:.0%} of the router mass to one expert")


def _check_dead_expert(m: pd.DataFrame, routing: Routing, t: Thresholds) -> Finding | None:
    rows = []
    for site in m.itertuples():
        u = routing.record(site.site).sum_probs / max(routing.record(site.site).n_tokens, 1)
        dead = np.flatnonzero(u < t.dead_fraction / len(u))
        if len(dead):
            rows.append((site.site, dead.tolist(), u[dead].round(5).tolist()))
    if not rows:
        return None
    return Finding(
        "dead_expert", "warning", [r[0] for r in rows],
        {"dead_experts": {r[0]: r[1] for r in rows}, "usage": {r[0]: r[2] for r in rows}},
        "Add a load-balancing loss (LilyConfig(balance_loss_weight=0.01 … 0.1), plus "
        "lily_aux_loss(model) in the loss) so unused experts receive tokens again; or lower num_B."
        + _balance_caveat(set(m.set_index("site").loc[[r[0] for r in rows], "routing"])),
        f"{_plural(len(rows), 'site')} with experts that get under {t.dead_fraction:.0%} of a fair share")


def _check_input_blind_router(m: pd.DataFrame, routing: Routing, t: Thresholds) -> Finding | None:
    blind = m[m.routing_mi < t.blind_mi]
    if not len(blind):
        return None
    modes = sorted(set(blind.routing))
    return Finding(
        "input_blind_router", "warning", list(blind.site),
        {"routing_mi": dict(zip(blind.site, blind.routing_mi.round(5))), "routing": modes},
        ("A router that ignores its input sits at a symmetric point gradients cannot leave while "
         "the experts are equal too (zeroed routers with zero-initialised B: routing_mi stays 0, "
         "measured in tests/test_diagnose.py). Re-initialise the routers or start B random "
         "(LilyConfig(init_weights=False)) to break the symmetry, and use routing='token' so "
         "input-dependent routing is actually applied: on a task that needs routing "
         "(tests/test_diagnose.py) token routing solved it and batch routing did not, because batch "
         "routing averages every token's choice away.") if "batch" in modes or "sequence" in modes else
        ("Routing is per token yet barely depends on the input: break the symmetry (re-initialise "
         "the routers, or init_weights=False), then train; router_entropy_weight > 0 with "
         "balance_loss_weight makes tokens choose experts decisively."),
        f"{_plural(len(blind), 'site')} whose routing barely depends on the input (routing_mi < {t.blind_mi})")


# ---- top-k routers (mixture-of-experts layers): per layer, from the dispatch

#: What a top-k router's collapse costs and the levers transformers' MoE models have, shared by
#: the dominant and dead findings (docs/diagnosis.md, "Mixture-of-experts routers").
MOE_BALANCE_REMEDY = (
    "Train with the load-balancing loss: in transformers, set output_router_logits=True (in the config or the "
    "forward call) and the model adds router_aux_loss_coef × its auxiliary loss to the loss it returns when given "
    "labels; raise router_aux_loss_coef if it is on already. router_metrics' aux_loss column is that loss for "
    "each layer alone (top_k when dispatch and router probabilities are uniform): the model's own loss averages "
    "the layers, so one collapsed layer moves it little. A router z-loss (the mean of logsumexp(logits)², "
    "router_metrics' z_loss) keeps the router logits small, so that the choice can still change; "
    "transformers' Mixtral, Qwen2-MoE, OLMoE and GPT-OSS do not add one — add it to the loss yourself. A "
    "DeepSeek-V3-style router (sigmoid scores with an e_score_correction_bias) is balanced through that bias "
    "instead: after each step lower the bias of the experts above their fair load and raise it for those "
    "below by a small fixed step — transformers keeps the bias as a buffer and never updates it. "
    "These are the levers of the models' authors; lily_lab has not measured how much each helps.")


def _layer_of(row) -> str:
    layer = row.layer
    return str(row.index) if layer is None or (isinstance(layer, float) and np.isnan(layer)) else str(layer)


def _layers(layers: list[str], total: int | None = None) -> str:
    """``layer 3``, ``layers 3, 5``; with ``total``: ``layers 3, 5 of 8``."""
    return f"layer{'s' * (len(layers) != 1)} {', '.join(layers)}" + (f" of {total}" if total else "")


def _percent(lo: float, hi: float) -> str:
    return f"{lo:.0%}" if f"{lo:.0%}" == f"{hi:.0%}" else f"{lo:.0%}–{hi:.0%}"


def _check_dominant_dispatch(m: pd.DataFrame, routing: Routing, t: Thresholds) -> Finding | None:
    """Top-k routers that send ≥ ``dominant_usage`` of their layer's tokens to one expert (the
    dispatch: what the layer computed), named by layer."""
    rows = []
    for s in m.itertuples():
        rec = routing.record(s.site)
        if rec.top_k >= rec.num_B or not rec.n_tokens:  # every expert gets every token: nothing to dominate
            continue
        e = int(np.argmax(rec.dispatch_counts))
        frac = float(rec.dispatch_counts[e] / rec.n_tokens)
        if frac >= t.dominant_usage:
            rows.append((s, e, frac, float(rec.dispatch_counts[e] / (rec.top_k * rec.n_tokens))))
    if not rows:
        return None
    by_expert: dict[int, list] = {}
    for r in rows:
        by_expert.setdefault(r[1], []).append(r)
    parts = [f"{_layers([_layer_of(r[0]) for r in rs], len(m))}: expert {e} takes "
             f"{_percent(min(r[2] for r in rs), max(r[2] for r in rs))} of the tokens" for e, rs in by_expert.items()]
    names = [r[0].site for r in rows]
    return Finding(
        "dominant_expert", "critical" if any(r[2] >= t.dominant_critical for r in rows) else "warning", names,
        {"layer": {r[0].site: _layer_of(r[0]) for r in rows}, "top_expert": {r[0].site: r[1] for r in rows},
         "tokens_share": {r[0].site: round(r[2], 4) for r in rows},
         "dispatch_share": {r[0].site: round(r[3], 4) for r in rows},
         "top_k": {r[0].site: int(r[0].top_k) for r in rows}, "moe_layers": len(m)},
        "One expert does this layer's work for almost every token, so the layer's other experts learn almost "
        "nothing. " + MOE_BALANCE_REMEDY,
        f"{'; '.join(parts)} (≥ {t.dominant_usage:.0%} of a layer's tokens sent to one expert)")


def _fair_tokens(rec) -> float:
    """The tokens each expert of a top-k router would be sent under a perfectly balanced dispatch
    (``rec``: a SiteRecord or a ``router_metrics`` row: ``top_k``, ``n_tokens``, ``num_B``)."""
    return rec.top_k * rec.n_tokens / rec.num_B


def _check_dead_dispatch(m: pd.DataFrame, routing: Routing, t: Thresholds) -> Finding | None:
    """Top-k routers with experts sent fewer than ``dead_fraction`` of their fair ``k·N/E`` tokens,
    where that fair share is at least ``dead_min_tokens`` tokens; named by layer."""
    rows = []
    for s in m.itertuples():
        rec = routing.record(s.site)
        fair = _fair_tokens(rec)
        if rec.top_k >= rec.num_B or fair < t.dead_min_tokens:
            continue
        dead = np.flatnonzero(rec.dispatch_counts < t.dead_fraction * fair)
        if len(dead):
            rows.append((s, dead.tolist(), rec.dispatch_counts[dead].astype(int).tolist(), fair))
    if not rows:
        return None
    parts = [f"layer {_layer_of(r[0])} of {len(m)}: expert{'s' * (len(r[1]) != 1)} {', '.join(map(str, r[1]))} "
             f"({'/'.join(map(str, r[2]))} of a fair {r[3]:.0f} tokens)" for r in rows]
    return Finding(
        "dead_expert", "warning", [r[0].site for r in rows],
        {"layer": {r[0].site: _layer_of(r[0]) for r in rows}, "dead_experts": {r[0].site: r[1] for r in rows},
         "tokens": {r[0].site: r[2] for r in rows}, "fair_tokens": {r[0].site: round(r[3], 1) for r in rows},
         "moe_layers": len(m)},
        "Experts that are sent almost no token neither contribute nor learn. " + MOE_BALANCE_REMEDY,
        f"{'; '.join(parts)} (under {t.dead_fraction:.0%} of a fair share of the tokens)")


def _note_small_dispatch(m: pd.DataFrame, t: Thresholds, d: Diagnosis) -> None:
    """A note naming the top-k routers whose recording is too small for ``dead_expert``."""
    small = [s for s in m.itertuples() if 0 < s.top_k < s.num_B and _fair_tokens(s) < t.dead_min_tokens]
    if small:
        d.notes.append(f"dead_expert not checked at {_layers([_layer_of(s) for s in small])}: a fair share there is "
                       f"under {t.dead_min_tokens:g} tokens per expert (top_k · tokens / experts), too few to call "
                       "an expert dead; record more tokens")


def _check_input_blind_topk(m: pd.DataFrame, routing: Routing, t: Thresholds) -> Finding | None:
    """Top-k routers whose distribution barely depends on the token (``routing_mi`` below
    ``blind_mi``), named by layer."""
    blind = m[m.routing_mi < t.blind_mi]
    if not len(blind):
        return None
    layers = [_layer_of(r) for r in blind.itertuples()]
    return Finding(
        "input_blind_router", "warning", list(blind.site),
        {"layer": dict(zip(blind.site, layers)), "routing_mi": dict(zip(blind.site, blind.routing_mi.round(5))),
         "moe_layers": len(m)},
        "The router gives nearly the same distribution to every token, so which experts a token reaches does not "
        "depend on the token. A router freshly initialised by transformers (normal weights, std "
        "initializer_range) routes this way — routing_mi ≈ 0.004 on tests/test_moe_views.py's tiny Mixtral — so "
        "first check that the router (gate) weights were loaded from the checkpoint (transformers warns about "
        "newly initialised weights) and, when training, that they are trained (requires_grad, in the optimizer). "
        "A layer that is also named by dominant_expert ignores its input because it sends every token to one "
        "expert: balance that one first (see dominant_expert).",
        f"{_layers(layers, len(m))}: routing barely depends on the token (routing_mi < {t.blind_mi})")


def _report_nonfinite(bad: dict[str, dict], d: Diagnosis, with_routing: bool) -> None:
    """The ``nonfinite_weights`` finding for the banks in ``bad`` (see ``nonfinite_counts``), and a
    note on the checks skipped there."""
    groups = list(bad)
    names = [name for entry in bad.values() for name in entry["sites"]]
    evidence: dict[str, Any] = {f"nonfinite_{k}": {g: e[k] for g, e in bad.items()} for k in TENSORS
                                if any(e[k] for e in bad.values())}
    evidence["sites_affected"] = {g: len(e["sites"]) for g, e in bad.items()}
    tensors = sorted({k for e in bad.values() for k in TENSORS if e[k]}, key=TENSORS.index)
    d.findings.append(Finding(
        "nonfinite_weights", "critical", groups, evidence, DIVERGED_REMEDY,
        f"non-finite weights (NaN or inf) in {_plural(len(groups), 'bank')} ({' / '.join(tensors)}; "
        f"{_plural(len(names), 'site')}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}): the training "
        "run diverged, and every other measure of these banks would be meaningless"))
    skipped = ["inactive_adapter", "redundant_experts"] + (list(ROUTER_CHECKS) if with_routing else [])
    d.notes.append(f"{', '.join(skipped)} skipped on the {_plural(len(groups), 'bank')} with non-finite weights "
                   f"({', '.join(groups[:4])}{' …' if len(groups) > 4 else ''}); fix the divergence first")


def _recorded_anything(routing: Routing, d: Diagnosis, leaky: bool) -> bool:
    """False (with a note and a headline) when ``routing`` holds no token at any site."""
    recs = [routing.record(name) for name in routing.sites]
    if any(rec.n_tokens for rec in recs):
        return True
    nonfinite = sum(rec.nonfinite for rec in recs)
    if nonfinite:
        why = (f"every one of the {nonfinite:,} recorded tokens had NaN or infinite router logits (kept out of "
               "the sums): the model diverged")
    elif not recs:
        why = "the recording has no site (was it made on this model?)"
    else:
        why = ("the recording holds no token: call the model inside `with record_routing(model) as rec:` on "
               "a batch with at least one token")
    d.notes.append(f"nothing recorded: {why}; the router checks ({', '.join(ROUTER_CHECKS)})"
                   f"{' and future_leak' if leaky else ''} did not run")
    d.headline = "nothing recorded: router checks not run; the bank checks found nothing"
    return False


def _leaky_sites(model: nn.Module) -> list[str]:
    """Names of the Lily sites of a causal LM whose mixture spans later tokens: lily_lab sites under
    batch or sequence routing, and every PEFT Lily site (PEFT mixes over the whole call). Empty
    for any other model (encoders such as BERT, causal or token routing)."""
    if not is_causal_lm(model):
        return []
    return [s.name for s in adapter_sites(model)
            if s.kind == "peft-lily" or (s.kind == "lily" and s.layer.routing in ("batch", "sequence"))]


def _check_future_leak(model: nn.Module, routing: Routing, sites: list[str], t: Thresholds, d: Diagnosis) -> None:
    """Replay up to ``LEAK_SEQUENCES`` recorded sequences through :func:`causal_consistency` in
    the model's own routing mode; a finding when the leak or the drift exceeds ``t.future_leak``."""
    sequences = recorded_sequences(routing, LEAK_SEQUENCES, LEAK_LENGTH)
    if not sequences:
        d.notes.append(
            "future_leak not checked: no recorded sequence could be rebuilt from the recording's sampled tokens "
            "(each needs every position and its token id). Record with record_routing(model, max_tokens=...) "
            "at least the number of tokens of the calls inside the block, and call the model with input_ids.")
        return
    layer = model.get_submodule(sites[0])
    peft = not isinstance(layer, LilyLayer)
    mode = "batch" if peft else layer.routing
    try:
        vocab = vocab_size(model)
        sequences = [q for q in sequences if q.max() < vocab]  # a recording of another model's tokens
        if not sequences:
            raise CausalConsistencyError(f"the recorded token ids are not below this model's vocabulary ({vocab})")
        ids, mask = batch_of(sequences, pad_token_id(model))
        row = causal_consistency(model, ids, mask, modes=None if peft else [mode]).iloc[0]
    except LilyLabError as e:
        d.notes.append(f"future_leak not checked: {e}")
        return
    d.checked.append("future_leak")
    leak, drift = float(row.future_leak), float(row.generation_drift)
    # Above the threshold and clearly above the base model's own rounding (the adapter switched off).
    if (leak <= max(t.future_leak, 10 * row.future_leak_base)
            and drift <= max(t.future_leak, 10 * row.generation_drift_base)):
        return
    if peft:
        remedy = ("PEFT's Lily mixes the experts over every token of a call and cannot route causally. Load the "
                  "adapter into lily_lab — model = lily_lab.load_adapter(base_model, folder), base_model without "
                  "the adapter — then set_lily_options(model, routing='causal') (or 'token'): position t then "
                  "mixes positions ≤ t only, so nothing leaks and generate equals one forward pass up to the "
                  "base model's own rounding (notebook 05; ≤ 1e-5 on tests/test_causal.py's tiny models). The adapter was trained with the batch mixture it saw: fine-tune it "
                  "after switching, and compare the two before relying on the switch.")
    else:
        remedy = ("Route causally: set_lily_options(model, routing='causal') (or routing='token'). Position t "
                  "then mixes the router's choices at positions ≤ t only, so nothing leaks and cached "
                  "generation equals one forward pass up to the base model's own rounding (measured on SmolLM2 in "
                  "notebook 05; ≤ 1e-5 on the tiny models of tests/test_causal.py). The adapter was trained "
                  f"with the {mode} mixture it saw, so fine-tune (or retrain) it under the new mode; compare "
                  "the two before relying on the switch.")
    d.findings.append(Finding(
        "future_leak", "warning", list(sites),
        {"routing": mode, "future_leak": leak, "generation_drift": drift,
         "generation_drift_base": float(row.generation_drift_base), "sequences": int(row.sequences)},
        remedy,
        f"later tokens change earlier outputs by up to {leak:.3g} in the logits, and cached generation drifts "
        f"{drift:.3g} from one forward pass: {mode} routing mixes the experts over "
        f"{'the whole call' if mode == 'batch' else 'the whole sequence'}, future tokens included"))
