"""``ExpertMap`` (how alike a bank's experts are, and where they serve) and ``SpectrumExplorer``
(singular values of ΔW per site and mixture, against a baseline)."""

from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import plots
from ..core import adapter_sites
from ..analysis import delta_spectra, expert_layer_profile, expert_similarity, rank_summary
from ..observe import Routing
from ..plots import bank_label, site_label
from ._common import ALL, FigurePane, caption, check_inputs, dropdown, empty_notice, grid, guarded, row, toggles

#: measure → (button label, tooltip)
SIMILARITY = {"cosine": ("cosine of B experts", "Cosine of the flattened B_e matrices (r × d_out)"),
              "subspace_overlap": ("output-space overlap", "How much the experts' output spaces (row spaces of B_e) overlap"),
              "functional_cosine": ("cosine of ΔW_e", "Cosine of each expert's full update ΔW_e = B_eᵀ A through the shared A")}
SIMILARITY_CAPTION = (
    "<b>How to read it.</b> Each cell compares two experts of the bank. A cosine of 1 means the same direction: "
    "the two experts are copies, and the second adds parameters but no capacity; around 0 they are unrelated; "
    "−1 opposite. A mean cosine of 0.94 means the bank's experts are near copies (expert collapse: see the "
    "Diagnosis tab). Output-space overlap is 1 when two experts write into the same r-dimensional subspace "
    "whatever their scale. <b>The second figure</b> (with a recording): each expert's usage at every layer that "
    "shares the bank.")
SPECTRA_CAPTION = (
    "<b>How to read it.</b> The singular values σ of each site's update ΔW = s·(Σ_e π_e B_e)ᵀ A for one mixture π, "
    "largest first (exact, from the factors). A steep drop after a few values: the update has low effective rank. "
    "Mixtures: <b>uniform</b> weighs every expert 1/E; <b>routed mean</b> is each site's mean applied mixture over "
    "the recording; <b>expert k</b> is expert k alone; <b>label=X</b> is the mean mixture over the tokens of "
    "label X. <b>Below:</b> one rank measure per layer.")
MIXTURE_TIPS = "uniform: every expert 1/E · routed mean: each site's mean routed mixture · expert k: one expert alone"


class ExpertMap(W.VBox):
    """Pick a bank: its expert-similarity matrix (three measures) and, with a recording, each
    expert's usage across the bank's layers."""

    def __init__(self, model, routing: Routing | None = None, *, height: int = 400):
        check_inputs("ExpertMap", model, routing)
        super().__init__()
        self.similarity = expert_similarity(model)
        self.profile = expert_layer_profile(routing) if routing is not None else None
        groups = list(dict.fromkeys(self.similarity.group))
        if not groups:
            self.children = [empty_notice("ExpertMap: no bank with two or more experts in this model.")]
            return
        self.group = dropdown([(bank_label(g), g) for g in groups], description="bank",
                              tooltip="A bank of B experts (shared by every site of its group)")
        self.measure = toggles(SIMILARITY, "cosine", "measure")
        self.matrix, self.layers = FigurePane(height), FigurePane(height)
        panes = [self.matrix.box] + ([self.layers.box] if self.profile is not None else [])
        self.children = [row(self.group, self.measure), grid(*panes), caption(SIMILARITY_CAPTION)]
        self.group.observe(lambda _: self.redraw(), "value")
        self.measure.observe(lambda _: self._draw_matrix(), "value")  # the layer profile does not depend on it
        self.redraw()

    def redraw(self) -> None:
        self._draw_matrix()
        if self.profile is not None:
            g = self.group.value
            guarded(self.layers, lambda: plots.plot_expert_profile(self.profile, g))

    def _draw_matrix(self) -> None:
        g = self.group.value
        guarded(self.matrix, lambda: plots.plot_expert_similarity(self.similarity, g, value=self.measure.value))


class SpectrumExplorer(W.VBox):
    """Pick a site and a mixture; log scale; overlay a baseline (e.g. a PEFT LoRA model's
    spectra at equal budget). Every spectrum is computed once, up front."""

    def __init__(self, model, routing: Routing | None = None, baseline=None, *, height: int = 420):
        check_inputs("SpectrumExplorer", model, routing)
        super().__init__()
        if not adapter_sites(model):
            self.children = [empty_notice("SpectrumExplorer: no low-rank update in this model (no Lily or LoRA "
                                          "adapter), so there is no ΔW to take the spectrum of.")]
            return
        parts = [delta_spectra(model)]
        if routing is not None:
            parts.append(delta_spectra(model, routing))
            try:
                parts.append(delta_spectra(model, routing, by="label"))
            except ValueError:
                pass
        E = max((s.num_B for s in adapter_sites(model)), default=1)
        parts += [delta_spectra(model, e) for e in range(E)] if E > 1 else []
        self.spectra = pd.concat(parts, ignore_index=True)
        self.ranks = rank_summary(self.spectra)
        self.baseline = None
        if baseline is not None:
            self.baseline = baseline if isinstance(baseline, pd.DataFrame) else delta_spectra(baseline)
        sites = list(dict.fromkeys(self.spectra.site))
        if not sites:
            self.children = [empty_notice("SpectrumExplorer: no adapter sites.")]
            return
        names = self.spectra.drop_duplicates("site").set_index("site")
        self.site = dropdown([("all sites", ALL)] + [(site_label(names.module[s], names.layer[s]), s) for s in sites],
                             description="site", tooltip="One adapted site (module · layer), or all of them")
        self.mixture = dropdown(list(dict.fromkeys(self.spectra.mixture)), description="mixture",
                                tooltip=MIXTURE_TIPS)
        self.log_scale = W.Checkbox(value=True, description="log scale", indent=False,
                                    tooltip="σ on a logarithmic axis: small singular values become visible")
        self.compare = W.Checkbox(value=self.baseline is not None, indent=False,
                                  description="baseline" if self.baseline is not None else "baseline (none given)",
                                  disabled=self.baseline is None,
                                  tooltip="Overlay a baseline's spectra (LilyDashboard(…, baseline=a LoRA model))")
        self.rank_metric = dropdown([("effective rank", "effective_rank"), ("stable rank", "stable_rank"),
                                     ("numerical rank", "numerical_rank")], description="rank measure",
                                    tooltip="effective: exp of the entropy of σ/Σσ · stable: Σσ²/σ_max² · "
                                            "numerical: σ > 1e-6·σ_max")
        self.pane, self.rank_pane = FigurePane(height), FigurePane(height)
        self.children = [row(self.site, self.mixture, self.log_scale, self.compare), self.pane.box,
                         row(self.rank_metric), self.rank_pane.box, caption(SPECTRA_CAPTION)]
        for control in (self.site, self.mixture, self.log_scale, self.compare):
            control.observe(lambda _: self.redraw(), "value")
        self.rank_metric.observe(lambda _: self.redraw_ranks(), "value")
        self.redraw()
        self.redraw_ranks()

    def redraw(self) -> None:
        rows = self.spectra[self.spectra.mixture == self.mixture.value]
        sites = None if self.site.value is ALL else [self.site.value]
        base = self.baseline if self.compare.value else None
        if base is not None and sites is not None:
            key = sites[0].removeprefix("base_model.model.")
            base = base[base.site.str.removeprefix("base_model.model.") == key]
        guarded(self.pane, lambda: plots.plot_spectra(rows, log=self.log_scale.value, sites=sites, baseline=base))

    def redraw_ranks(self) -> None:
        rows = self.ranks[self.ranks.mixture == self.ranks.mixture.iloc[0]]
        guarded(self.rank_pane, lambda: plots.plot_rank_by_layer(rows, metric=self.rank_metric.value))

