"""``RoutingDashboard`` (also ``LilyDashboard``, its first name): every view of one routed model in tabs."""

from __future__ import annotations

import ipywidgets as W

from ..core.sites import sites_or_routers
from ..observe import Routing, Timeline
from ._common import check_inputs, empty_notice
from .budget import BudgetCalculator
from .collapse import CollapseDashboard
from .experts import ExpertMap, SpectrumExplorer
from .router import RouterExplorer
from .timeline import TimelinePlayer

#: What a model without a low-rank adapter (a mixture-of-experts LLM) is told instead of the
#: Experts, Spectra and Budget tabs.
NO_LOW_RANK = ("No low-rank update in this model (no Lily or LoRA adapter): the bank, ΔW-spectrum and parameter-"
               "budget views are left out. Its mixture-of-experts routers are in the Routers and Diagnosis tabs.")


class RoutingDashboard(W.Tab):
    """Routers, experts, spectra, diagnosis (and the timeline, when given) of ``model``: a model
    with a Lily (or LoRA) adapter, or a mixture-of-experts LLM (Mixtral, Qwen2-MoE, OLMoE,
    DeepSeek-V3, GPT-OSS: ``router_sites``).

    ``routing`` is a recording on representative data (``record_routing``); ``tokenizer`` enables
    live routing of typed sentences; ``baseline`` (a model or spectra frame) is overlaid on the
    spectra; ``timeline`` adds a training-timeline tab; ``predictions`` (the model's prediction per
    recorded sequence, a list by sequence number or a mapping) is shown beside each sequence's
    label in the Routers tab's sentence view.

    A model without adapter sites has no low-rank update: its tabs are Routers (with the "tokens
    sent" view of each layer's dispatch) and Diagnosis (per-layer findings), and ``low_rank`` is
    False; the Experts, Spectra and Budget tabs are left out, and a line at the top of the
    Routers tab says so (``NO_LOW_RANK``).
    """

    def __init__(self, model, routing: Routing | None = None, *, tokenizer=None, timeline: Timeline | None = None,
                 baseline=None, predictions=None):
        name = type(self).__name__
        check_inputs(name, model, routing)
        if timeline is not None and not isinstance(timeline, Timeline):
            from ..core.errors import LilyLabTypeError

            raise LilyLabTypeError(f"{name}: timeline must be a lily_lab.Timeline or None, got "
                                   f"{type(timeline).__name__}")
        sites = sites_or_routers(model, name)[0]
        self.low_rank = bool(sites)
        super().__init__()
        tabs = []
        if routing is not None:
            self.router = RouterExplorer(routing, model, tokenizer, predictions=predictions)
            routers = self.router
        else:
            routers = empty_notice("No recording: pass routing=rec.routing from record_routing.")
        if not self.low_rank:
            routers = W.VBox([empty_notice(NO_LOW_RANK), routers])
        tabs.append(("Routers", routers))
        if self.low_rank:
            self.experts = ExpertMap(model, routing)
            self.spectra = SpectrumExplorer(model, routing, baseline)
        self.collapse = CollapseDashboard(model, routing)
        tabs += ([("Experts", self.experts), ("Spectra", self.spectra)] if self.low_rank else []) + [
            ("Diagnosis", self.collapse)]
        if timeline is not None:
            self.timeline = TimelinePlayer(timeline)
            tabs.append(("Timeline", self.timeline))
        if self.low_rank:
            tabs.append(("Budget", BudgetCalculator(**_budget_of(sites))))
        self.children = [w for _, w in tabs]
        for i, (title, _) in enumerate(tabs):
            self.set_title(i, title)


class LilyDashboard(RoutingDashboard):
    """:class:`RoutingDashboard` under its first name (the same dashboard)."""


def _budget_of(sites) -> dict:
    """The BudgetCalculator's starting point: the first group of the model's adapter ``sites``."""
    if not sites:
        return {}
    s0 = sites[0]
    members = [s for s in sites if s.group == s0.group]
    stride = next((s.index for s in members if s.a_index != s0.a_index), len(members))
    return {"d_in": s0.d_in, "d_out": s0.d_out, "layers": len(members), "r": s0.r, "stride_A": max(stride, 1),
            "num_B": s0.num_B}
