"""``RouterExplorer``: what one site's router does — usage, per-token distributions, labels,
routing modes compared, and a sentence routed live."""

from __future__ import annotations

import ipywidgets as W

from .. import plots
from ..analysis import expert_layer_profile, mixture_modes, router_metrics, specialization
from ..observe import Routing, record_routing
from ._common import FigurePane, empty_notice, escape, guarded

VIEWS = {
    "usage": "expert usage",
    "tokens": "per-token distributions",
    "labels": "usage by label",
    "modes": "batch / sequence / token mixtures",
    "profile": "experts across layers",
}


class RouterExplorer(W.VBox):
    """Pick a site by module and layer, switch views, filter by label; with ``model`` and
    ``tokenizer``, type a sentence and see each token tinted by its top expert.

    All analysis happens once, here; controls only pick rows of the cached frames.
    """

    def __init__(self, routing: Routing, model=None, tokenizer=None, *, height: int = 420):
        super().__init__()
        self.routing, self.model, self.tokenizer = routing, model, tokenizer
        self.metrics = router_metrics(routing) if routing is not None else None
        if self.metrics is None or self.metrics.empty or not (self.metrics.n_tokens > 0).any():
            self.children = [empty_notice("RouterExplorer: this recording has no routed tokens yet — run the "
                                          "model inside `with record_routing(model) as rec:` first.")]
            return
        self.usage = routing.usage()
        self.tokens = routing.token_table(tokenizer)
        try:
            self.by_label = specialization(routing, by="label")
        except ValueError:
            self.by_label = None
        self.profile = expert_layer_profile(routing)
        self.modes = mixture_modes(routing)
        modules = list(dict.fromkeys(self.metrics.module))
        self.module = W.Dropdown(options=modules, description="module")
        self.layer = W.Dropdown(description="layer")
        self.view = W.ToggleButtons(options=[(v, k) for k, v in VIEWS.items()], value="usage")
        labels = [] if self.by_label is None else list(dict.fromkeys(self.by_label.value))
        self.label = W.Dropdown(options=[("all", None)] + [(str(v), v) for v in labels], description="label",
                                disabled=not labels)
        self.pane = FigurePane(height)
        self.summary = W.HTML()
        rows = [W.HBox([self.module, self.layer, self.label]), self.view, self.summary, self.pane.box]
        if model is not None and tokenizer is not None:
            self.text = W.Text(placeholder="type a sentence and press Route", layout={"width": "60%"})
            self.route = W.Button(description="Route", icon="play")
            self.live = FigurePane(180, hidden=True)
            self.route.on_click(lambda _: self.route_text())
            self.text.on_submit(lambda _: self.route_text())
            rows += [W.HBox([self.text, self.route]), self.live.box]
        self.children = rows
        self.module.observe(self._module_changed, "value")
        for control in (self.layer, self.view, self.label):
            control.observe(lambda _: self.redraw(), "value")
        self._module_changed()

    # ------------------------------------------------------------------ state
    @property
    def site(self) -> str | None:
        rows = self.metrics[(self.metrics.module == self.module.value) & (self.metrics.layer == self.layer.value)]
        return rows.site.iloc[0] if len(rows) else None

    def _module_changed(self, *_):
        layers = sorted(self.metrics[self.metrics.module == self.module.value].layer.unique().tolist())
        self._quiet = True  # setting options also sets value: draw once, below
        try:
            self.layer.options = layers
            self.layer.value = layers[0]
        finally:
            self._quiet = False
        self.redraw()

    def redraw(self) -> None:
        site = self.site
        if site is None or getattr(self, "_quiet", False):
            return
        m = self.metrics[self.metrics.site == site].iloc[0]
        self.summary.value = (
            f"<b>{escape(site)}</b> — {int(m.n_tokens):,} tokens · load entropy {m.load_entropy:.3f} · "
            f"routing MI {m.routing_mi:.3f} · max usage {m.max_usage:.3f} · routing {escape(m.routing)}")
        guarded(self.pane, lambda: self._figure(site))

    def _figure(self, site):
        view, label = self.view.value, self.label.value
        if view == "usage":
            if label is not None:
                rows = self.by_label[(self.by_label.value == label)][["site", "module", "group", "index", "expert", "usage", "n_tokens"]]
                return plots.plot_usage_bars(rows, site)
            return plots.plot_usage_bars(self.usage, site)
        if view == "tokens":
            rows = self.tokens if label is None else self.tokens[self.tokens.label == label]
            if rows[rows.site == site].empty:
                raise ValueError("no sampled tokens for this site and label")
            return plots.plot_token_probs(rows, site)
        if view == "labels":
            if self.by_label is None:
                raise ValueError("no labels in this recording: call recorder.annotate(labels=…) after each call")
            return plots.plot_label_usage(self.by_label, site)
        if view == "modes":
            return plots.plot_mixture_modes(self.modes, site)
        group = self.metrics[self.metrics.site == site].group.iloc[0]
        return plots.plot_expert_profile(self.profile, group)

    # ------------------------------------------------------------------ live routing
    def route_text(self) -> None:
        """Run the typed sentence through the model (a new computation the user asked for)."""
        import torch

        text = self.text.value.strip()
        if not text:
            self.live.say("type a sentence first")
            return
        try:
            batch = self.tokenizer([text], return_tensors="pt")
            device = next(self.model.parameters()).device
            with record_routing(self.model, max_tokens=512) as rec, torch.no_grad():
                self.model(**{k: v.to(device) for k, v in batch.items()})
            table = rec.routing.token_table(self.tokenizer)
            site = self.site if self.site in rec.routing.sites else rec.routing.sites[0]
            self.live.show(plots.plot_token_text(table, site, int(table.sequence.min())))
        except Exception as err:  # noqa: BLE001 — shown in the widget
            self.live.say(f"{type(err).__name__}: {err}", "error")
