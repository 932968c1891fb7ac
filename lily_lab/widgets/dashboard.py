"""``LilyDashboard``: every view of one adapted model in tabs."""

from __future__ import annotations

import ipywidgets as W

from ..observe import Routing, Timeline
from ._common import check_inputs, empty_notice
from .budget import BudgetCalculator
from .collapse import CollapseDashboard
from .experts import ExpertMap, SpectrumExplorer
from .router import RouterExplorer
from .timeline import TimelinePlayer


class LilyDashboard(W.Tab):
    """Routers, experts, spectra, diagnosis (and the timeline, when given) of ``model``.

    ``routing`` is a recording on representative data (``record_routing``); ``tokenizer`` enables
    live routing of typed sentences; ``baseline`` (a model or spectra frame) is overlaid on the
    spectra; ``timeline`` adds a training-timeline tab; ``predictions`` (the model's prediction per
    recorded sequence, a list by sequence number or a mapping) is shown beside each sequence's
    label in the Routers tab's sentence view.
    """

    def __init__(self, model, routing: Routing | None = None, *, tokenizer=None, timeline: Timeline | None = None,
                 baseline=None, predictions=None):
        check_inputs("LilyDashboard", model, routing)
        if timeline is not None and not isinstance(timeline, Timeline):
            from ..core.errors import LilyLabTypeError

            raise LilyLabTypeError(f"LilyDashboard: timeline must be a lily_lab.Timeline or None, got "
                                   f"{type(timeline).__name__}")
        super().__init__()
        tabs = []
        if routing is not None:
            self.router = RouterExplorer(routing, model, tokenizer, predictions=predictions)
            tabs.append(("Routers", self.router))
        else:
            tabs.append(("Routers", empty_notice("No recording: pass routing=rec.routing from record_routing.")))
        self.experts = ExpertMap(model, routing)
        self.spectra = SpectrumExplorer(model, routing, baseline)
        self.collapse = CollapseDashboard(model, routing)
        tabs += [("Experts", self.experts), ("Spectra", self.spectra), ("Diagnosis", self.collapse)]
        if timeline is not None:
            self.timeline = TimelinePlayer(timeline)
            tabs.append(("Timeline", self.timeline))
        tabs.append(("Budget", BudgetCalculator(**_budget_of(model))))
        self.children = [w for _, w in tabs]
        for i, (title, _) in enumerate(tabs):
            self.set_title(i, title)


def _budget_of(model) -> dict:
    """The BudgetCalculator's starting point: the model's first group."""
    from ..core import adapter_sites

    sites = adapter_sites(model)
    if not sites:
        return {}
    s0 = sites[0]
    members = [s for s in sites if s.group == s0.group]
    stride = next((s.index for s in members if s.a_index != s0.a_index), len(members))
    return {"d_in": s0.d_in, "d_out": s0.d_out, "layers": len(members), "r": s0.r, "stride_A": max(stride, 1),
            "num_B": s0.num_B}
