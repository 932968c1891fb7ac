"""``CollapseDashboard``: the diagnosis as findings cards, each linked to the figure of the sites or
the bank it concerns."""

from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import plots
from ..analysis import diagnose, expert_load, expert_similarity
from ..core import adapter_sites
from ..core.errors import NonFiniteWeightsError
from ..observe import Routing
from ..plots import FINDING_CSS, SEVERITY_COLORS, count_label, finding_html
from ._common import ALL, FigurePane, caption, check_inputs, dropdown, escape, guarded, row

HEATMAP_NOTE = ("Each cell: an expert's usage at a site; white is the fair share 1/E, red an expert used more, "
                "blue less. A red outline marks the sites of the selected finding.")
DISPATCH_NOTE = ("Each cell: the share of a mixture-of-experts layer's tokens actually sent to an expert; white is "
                 "the fair share 1/E, red every token, blue fewer. A red outline marks the layers of the selected "
                 "finding; the bars give each layer's aux loss.")
SIMILARITY_NOTE = ("The bank of the selected finding: the cosine of each pair of its B experts. 1 means copies "
                   "(the second expert adds parameters but no capacity), 0 unrelated.")


class CollapseDashboard(W.VBox):
    """One card per finding (severity, where, the evidence as a table, what to try); its "show"
    button draws the sites it concerns outlined in the usage heatmap, or its bank's expert
    similarity, below the cards."""

    def __init__(self, model, routing: Routing | None = None, thresholds=None, *, height: int = 420):
        check_inputs("CollapseDashboard", model, routing)
        super().__init__()
        self.diagnosis = diagnose(model, routing, thresholds)
        self.findings = self.diagnosis.to_frame()
        self.usage = routing.usage() if routing is not None else None
        # The dispatch of mixture-of-experts layers (top-k routers), for their findings.
        self.load = None
        if routing is not None and any(routing.record(s).top_k for s in routing.sites):
            self.load = expert_load(routing)
        try:
            self.similarity = expert_similarity(model) if adapter_sites(model) else None
        except NonFiniteWeightsError:  # a diverged run: the nonfinite_weights card says where
            self.similarity = None
        if self.similarity is None:
            self.similarity = pd.DataFrame(columns=["group", "expert_i", "expert_j", "cosine"])
        findings = self.diagnosis.findings
        options = [("no finding (plain heatmap)", ALL)] + [
            (f"{i + 1}. {f.severity}: {f.kind} ({count_label(len(f.sites), f.scope)})", i)
            for i, f in enumerate(findings)]
        self.finding = dropdown(options, description="show on the figure", width="min(560px, 100%)",
                                tooltip="Draw the sites or the bank of one finding below")
        self.detail = W.HTML()
        self.heat = FigurePane(height)
        self.cards = [self._card(i, f) for i, f in enumerate(findings)]
        self.caption = caption("")
        self.children = [self._header(), *self.cards, W.HTML(self._notes()), row(self.finding), self.detail,
                         self.heat.box, self.caption]
        self.finding.observe(lambda _: self.redraw(), "value")
        self.redraw()

    def _header(self) -> W.HTML:
        """The verdict line; it also carries the cards' ``FINDING_CSS``, once for the whole dashboard."""
        return W.HTML(f"<style>{FINDING_CSS}</style>{self._verdict()}")

    def _verdict(self) -> str:
        d = self.diagnosis
        checked = escape(", ".join(d.checked))
        if d.ok and d.headline:  # e.g. nothing recorded: "no collapse found" would claim too much
            return (f"<div style='padding:6px 10px'><b>{escape(d.headline)}</b>. Checked: {checked}.</div>")
        if d.ok:
            return (f"<div style='border-left:5px solid {SEVERITY_COLORS['ok']};padding:6px 10px;"
                    f"background:#f4fbf6'><b style='color:{SEVERITY_COLORS['ok']}'>No collapse found.</b> "
                    f"Checked: {checked}.</div>")
        by = {s: sum(f.severity == s for f in d.findings) for s in ("critical", "warning")}
        parts = ", ".join(f"{n} {s}" for s, n in by.items() if n)
        return (f"<div style='padding:4px 0'><b>{len(d.findings)} finding{'s' * (len(d.findings) != 1)}</b> "
                f"({parts}) — checked: {checked}.</div>")

    def _notes(self) -> str:
        return "".join(f"<div style='color:#555;font-style:italic'>{escape(n)}</div>" for n in self.diagnosis.notes)

    def _card(self, i: int, f) -> W.VBox:
        """The finding's card (``plots.finding_html``) with its "show below" button."""
        show = W.Button(description="show below", icon="crosshairs", tooltip="Draw this finding's sites or bank below",
                        layout=W.Layout(width="auto", align_self="flex-start"))
        show.on_click(lambda _, i=i: setattr(self.finding, "value", i))
        return W.VBox([W.HTML(finding_html(f)), show], layout=W.Layout(margin="0 0 6px 0", width="auto"))

    @property
    def selected_sites(self) -> list[str]:
        i = self.finding.value
        return [] if i is ALL else list(self.diagnosis.findings[i].sites)

    def redraw(self) -> None:
        i = self.finding.value
        f = None if i is ALL else self.diagnosis.findings[i]
        self.detail.value = "" if f is None else (
            f"<div style='color:#444'>Showing finding {i + 1}: <b>{escape(f.kind)}</b> ({escape(f.severity)}) — "
            f"{escape(f.summary)}</div>")
        if f is not None and f.scope == "bank" and not self.similarity.empty:
            bank = next((g for g in f.sites if g in set(self.similarity.group)), None)
            if bank is not None:
                self.caption.value = caption(SIMILARITY_NOTE).value
                guarded(self.heat, lambda: plots.plot_expert_similarity(self.similarity, bank))
                return
        if self.load is not None and (set(self.selected_sites) & set(self.load.site)
                                      or (f is None and self.usage is not None
                                          and set(self.usage.site) <= set(self.load.site))):
            self.caption.value = caption(DISPATCH_NOTE).value
            guarded(self.heat, lambda: plots.plot_expert_load(self.load, highlight=self.selected_sites))
            return
        self.caption.value = caption(HEATMAP_NOTE).value
        if self.usage is not None and not self.usage.empty:
            guarded(self.heat, lambda: plots.plot_usage_heatmap(self.usage, highlight=self.selected_sites))
        else:
            self.heat.say("no recording given: pass routing= to see router usage")
