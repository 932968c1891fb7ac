"""``CollapseDashboard``: the diagnosis, with each finding linked to the plots of its sites."""

from __future__ import annotations

import ipywidgets as W

from .. import plots
from ..analysis import bank_summary, diagnose, router_metrics
from ..observe import Routing
from ._common import FigurePane, escape, guarded

SEVERITY_COLOURS = {"critical": "#c0392b", "warning": "#d68910"}


class CollapseDashboard(W.VBox):
    """Findings listed with severity colours; selecting one highlights its sites in the usage
    heatmap and shows its evidence and remedy."""

    def __init__(self, model, routing: Routing | None = None, thresholds=None, *, height: int = 420):
        super().__init__()
        self.diagnosis = diagnose(model, routing, thresholds)
        self.findings = self.diagnosis.to_frame()
        self.usage = routing.usage() if routing is not None else None
        self.metrics = router_metrics(routing) if routing is not None else None
        self.banks = bank_summary(model)
        options = [("all sites", None)] + [
            (f"{'⛔' if f.severity == 'critical' else '⚠'} {f.kind} ({len(f.sites)})", i)
            for i, f in enumerate(self.diagnosis.findings)]
        self.finding = W.Select(options=options, rows=min(6, len(options)), description="finding",
                                layout={"width": "60%"})
        self.detail = W.HTML()
        self.summary_pane, self.heat = FigurePane(260), FigurePane(height)
        header = W.HTML("<b style='color:#1e8449'>No collapse found.</b>" if self.diagnosis.ok else
                        f"<b>{len(self.diagnosis.findings)} finding(s)</b> — checked: "
                        f"{escape(', '.join(self.diagnosis.checked))}")
        notes = W.HTML("".join(f"<i>{escape(n)}</i><br>" for n in self.diagnosis.notes))
        self.children = [header, notes, self.summary_pane.box, self.finding, self.detail, self.heat.box]
        guarded(self.summary_pane, lambda: plots.plot_diagnosis(self.findings))
        self.finding.observe(lambda _: self.redraw(), "value")
        self.redraw()

    @property
    def selected_sites(self) -> list[str]:
        i = self.finding.value
        return [] if i is None else list(self.diagnosis.findings[i].sites)

    def redraw(self) -> None:
        i = self.finding.value
        if i is None:
            self.detail.value = ""
        else:
            f = self.diagnosis.findings[i]
            evidence = "".join(f"<li><code>{escape(k)}</code>: {escape(v)}</li>" for k, v in f.evidence.items())
            self.detail.value = (
                f"<div style='border-left:4px solid {SEVERITY_COLOURS[f.severity]};padding-left:8px'>"
                f"<b>{escape(f.kind)}</b> ({escape(f.severity)}): {escape(f.summary)}<br>"
                f"<b>where:</b> {escape(', '.join(f.sites))}<ul>{evidence}</ul><b>try:</b> {escape(f.remedy)}</div>")
        if self.usage is not None and not self.usage.empty:
            guarded(self.heat, lambda: plots.plot_usage_heatmap(self.usage, highlight=self.selected_sites))
        else:
            self.heat.say("no recording given: pass routing= to see router usage")
