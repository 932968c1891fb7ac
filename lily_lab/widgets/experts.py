"""``ExpertMap`` (how alike a bank's experts are, and where they serve) and ``SpectrumExplorer``
(singular values of ΔW per site and mixture, against a baseline)."""

from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .. import plots
from ..core import adapter_sites
from ..analysis import delta_spectra, expert_layer_profile, expert_similarity, rank_summary
from ..observe import Routing
from ._common import FigurePane, empty_notice, guarded

SIMILARITY = {"cosine": "cosine of B experts", "subspace_overlap": "row-space overlap",
              "functional_cosine": "cosine of ΔW_e = B_eᵀA"}


class ExpertMap(W.VBox):
    """Pick a bank: its expert-similarity matrix (three measures) and, with a recording, each
    expert's usage across the bank's layers."""

    def __init__(self, model, routing: Routing | None = None, *, height: int = 400):
        super().__init__()
        self.similarity = expert_similarity(model)
        self.profile = expert_layer_profile(routing) if routing is not None else None
        groups = list(dict.fromkeys(self.similarity.group))
        if not groups:
            self.children = [empty_notice("ExpertMap: no bank with two or more experts in this model.")]
            return
        self.group = W.Dropdown(options=groups, description="bank")
        self.measure = W.ToggleButtons(options=[(v, k) for k, v in SIMILARITY.items()], value="cosine")
        self.matrix, self.layers = FigurePane(height), FigurePane(height)
        panes = [self.matrix.box] + ([self.layers.box] if self.profile is not None else [])
        self.children = [W.HBox([self.group]), self.measure, W.HBox(panes)]
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
        super().__init__()
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
        self.site = W.Dropdown(options=[("all sites", None)] + [(s, s) for s in sites], description="site")
        self.mixture = W.Dropdown(options=list(dict.fromkeys(self.spectra.mixture)), description="mixture")
        self.log_scale = W.Checkbox(value=True, description="log scale")
        self.compare = W.Checkbox(value=self.baseline is not None, description="baseline",
                                  disabled=self.baseline is None)
        self.rank_metric = W.Dropdown(options=["effective_rank", "stable_rank", "numerical_rank"], description="rank")
        self.pane, self.rank_pane = FigurePane(height), FigurePane(height)
        self.children = [W.HBox([self.site, self.mixture, self.log_scale, self.compare]), self.pane.box,
                         self.rank_metric, self.rank_pane.box]
        for control in (self.site, self.mixture, self.log_scale, self.compare):
            control.observe(lambda _: self.redraw(), "value")
        self.rank_metric.observe(lambda _: self.redraw_ranks(), "value")
        self.redraw()
        self.redraw_ranks()

    def redraw(self) -> None:
        rows = self.spectra[self.spectra.mixture == self.mixture.value]
        sites = None if self.site.value is None else [self.site.value]
        base = self.baseline if self.compare.value else None
        if base is not None and sites is not None:
            key = sites[0].removeprefix("base_model.model.")
            base = base[base.site.str.removeprefix("base_model.model.") == key]
        guarded(self.pane, lambda: plots.plot_spectra(rows, log=self.log_scale.value, sites=sites, baseline=base))

    def redraw_ranks(self) -> None:
        rows = self.ranks[self.ranks.mixture == self.ranks.mixture.iloc[0]]
        guarded(self.rank_pane, lambda: plots.plot_rank_by_layer(rows, metric=self.rank_metric.value))

