"""``RouterExplorer``: what the routers do — one site's usage, per-token distributions, labels,
routing modes compared, the bank across layers, and whole sentences routed across every site."""

from __future__ import annotations

import ipywidgets as W

from .. import plots
from ..analysis import expert_layer_profile, expert_load, mixture_modes, router_metrics, specialization
from ..observe import Routing, record_routing
from ..plots import bank_label, site_label
from ..core.errors import InputError
from ._common import ALL, FigurePane, caption, check_inputs, dropdown, empty_notice, escape, guarded, row, toggles

#: view key → (button label, tooltip). ``sentence`` shows every site at once.
VIEWS = {
    "usage": ("expert usage", "Mean router probability of each expert at this site; dashed: the fair share 1/E"),
    "tokens": ("token distributions", "Each expert's router probability over the sampled tokens (box per expert)"),
    "labels": ("by label", "Expert usage of each label's tokens at this site"),
    "modes": ("routing modes", "The mixtures batch, sequence and token routing would apply at this site"),
    "profile": ("across layers", "Each expert of this site's bank, its usage at every layer of the group"),
    "sentence": ("sentence × sites", "One recorded sequence across every routed site: colour = top expert"),
    "dispatch": ("tokens sent", "Mixture-of-experts layers: the share of the tokens each layer actually sent to each "
                                "expert, every layer at once, the selected one outlined"),
}
#: Views of Lily's mixtures (one bank shared across layers, routing modes): left out for a
#: recording of mixture-of-experts routers only, whose layers each have experts of their own.
LILY_VIEWS = ("modes", "profile")
# Which controls a view reads; the others are disabled while it is shown.
USES = {"usage": {"module", "layer", "label"}, "tokens": {"module", "layer", "label"}, "labels": {"module", "layer"},
        "modes": {"module", "layer"}, "profile": {"module"}, "sentence": {"label", "sequence"},
        "dispatch": {"module", "layer"}}
CAPTIONS = {
    "usage": "Bars: how much of the site's routing each expert receives (mean of p over tokens). Equal bars at the "
             "dashed line 1/E: balanced; one tall bar: the router sends everything to one expert.",
    "tokens": "One box per expert: the spread of its router probability over the sampled tokens. Boxes hugging 1/E: "
              "the router barely chooses; boxes reaching 0 and 1: decisive, input-dependent routing.",
    "labels": "Grouped bars: expert usage of each label's tokens. Bars that differ between labels: experts specialise "
              "by label (the title gives the normalised mutual information and the JS divergence).",
    "modes": "The mixture π each routing mode would apply, from the same tokens: batch routing averages a whole call, "
             "sequence routing one sequence, token routing keeps each token's own distribution.",
    "profile": "Lines: each expert of the bank across the group's layers. Lily shares one bank across layers; an expert "
               "with a flat line serves every layer alike, a peaked one serves a few layers.",
    "sentence": "Rows: sites (module · layer); columns: the sequence's tokens. Colour: the token's top expert; a "
                "stronger tint: a more decisive router. Hover a cell for the whole distribution.",
    "dispatch": "Rows: the mixture-of-experts layers; columns: their experts. Colour: the share of the layer's "
                "tokens actually sent to the expert (white: the fair share 1/E, red: every token). Bars: each "
                "layer's auxiliary load-balancing loss (top_k when balanced, dashed), labelled with the fewest and "
                "most tokens an expert was sent. One collapsed layer shows here, however healthy the average.",
}


class RouterExplorer(W.VBox):
    """Pick a site by module and layer, switch views, filter by label, step through recorded
    sequences routed across every site; with ``model`` and ``tokenizer``, route a typed sentence.

    ``predictions`` (optional): the model's prediction for each recorded sequence, a list indexed
    by the recording's sequence number or a mapping ``{sequence: prediction}``, shown beside
    each sequence's label. All analysis happens once, here; controls only pick rows of the
    cached frames.
    """

    def __init__(self, routing: Routing, model=None, tokenizer=None, *, predictions=None, height: int = 420):
        check_inputs("RouterExplorer", model, routing, need_model=False)
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
        self.has_lily = bool((self.metrics.top_k == 0).any())
        self.load = expert_load(routing) if (self.metrics.top_k > 0).any() else None
        self.profile = expert_layer_profile(routing) if self.has_lily else None
        self.modes = mixture_modes(routing) if self.has_lily else None
        self.views = {k: v for k, v in VIEWS.items()
                      if (self.has_lily or k not in LILY_VIEWS) and (k != "dispatch" or self.load is not None)}
        self.predictions = predictions
        modules = list(dict.fromkeys(self.metrics.module))
        self.module = dropdown(modules, description="module", tooltip="The adapted module (target) to look at")
        self.layer = dropdown([], description="layer", tooltip="The layer of the module: together they pick one site")
        self.view = toggles(self.views, "usage" if self.has_lily or self.load is None else "dispatch")
        labels = [] if self.by_label is None else list(dict.fromkeys(self.by_label.value))
        self.label = dropdown([("all labels", ALL)] + [(str(v), v) for v in labels], description="label",
                              tooltip="Only the tokens of sequences with this label (views that use tokens)")
        self._has_labels = bool(labels)
        self.sequence = dropdown([], description="sequence", width="300px",
                                 tooltip="A recorded sequence (with its label): shown across every routed site")
        self.previous = W.Button(icon="chevron-left", tooltip="previous sequence", layout=W.Layout(width="36px"))
        self.next = W.Button(icon="chevron-right", tooltip="next sequence", layout=W.Layout(width="36px"))
        self.previous.on_click(lambda _: self._step(-1))
        self.next.on_click(lambda _: self._step(+1))
        self.pane = FigurePane(height)
        self.summary = W.HTML()
        self.caption = caption("")
        self.stepper = W.HBox([self.sequence, self.previous, self.next], layout=W.Layout(align_items="center"))
        rows = [row(self.module, self.layer, self.label, self.stepper), self.view,
                self.summary, self.pane.box, self.caption]
        if model is not None and tokenizer is not None:
            self.text = W.Text(placeholder="type a sentence and press Route", continuous_update=False,
                               layout=W.Layout(width="min(600px, 70%)"))
            self.route = W.Button(description="Route", icon="play", tooltip="Run this sentence through the model")
            self.live = FigurePane(260, hidden=True)
            self.route.on_click(lambda _: self.route_text())
            self.text.observe(lambda _: self.route_text(), "value")
            rows += [W.HTML("<b>Route your own sentence</b> through the model, across every routed site:"),
                     row(self.text, self.route), self.live.box]
        self.children = rows
        self._quiet = False
        self._fill_sequences()
        self.module.observe(self._module_changed, "value")
        self.label.observe(self._label_changed, "value")
        for control in (self.layer, self.view, self.sequence):
            control.observe(lambda _: self.redraw(), "value")
        self._module_changed()

    # ------------------------------------------------------------------ state
    @property
    def site(self) -> str | None:
        rows = self.metrics[(self.metrics.module == self.module.value) & (self.metrics.layer == self.layer.value)]
        return rows.site.iloc[0] if len(rows) else None

    def _prediction(self, sequence: int):
        return plots.prediction_for(self.predictions, sequence)

    def _fill_sequences(self) -> None:
        """The sequences of the token sample (under the label filter), each with its label."""
        t = self.tokens
        if self.label.value is not ALL and "label" in t.columns:
            t = t[t.label == self.label.value]
        seqs = t.drop_duplicates("sequence").sort_values("sequence")
        options = []
        for s, lab in zip(seqs.sequence.tolist(), seqs.label.tolist() if "label" in seqs else [None] * len(seqs)):
            text = f"#{s}" + (f" · label {lab}" if lab is not None and lab == lab else "")
            pred = self._prediction(int(s))
            options.append((text + (f" · predicted {pred}" if pred is not None else ""), int(s)))
        self._quiet = True
        try:
            self.sequence.options = options[:500]  # a dropdown of thousands is no way to browse: first 500
            self.sequence.value = options[0][1] if options else None
        finally:
            self._quiet = False

    def _step(self, by: int) -> None:
        values = [v for _, v in self.sequence.options]
        if values:
            i = values.index(self.sequence.value) if self.sequence.value in values else 0
            self.sequence.value = values[(i + by) % len(values)]

    def _module_changed(self, *_):
        layers = sorted(self.metrics[self.metrics.module == self.module.value].layer.unique().tolist())
        self._quiet = True  # setting options also sets value: draw once, below
        try:
            self.layer.options = layers
            self.layer.value = layers[0]
        finally:
            self._quiet = False
        self.redraw()

    def _label_changed(self, *_):
        self._fill_sequences()
        self.redraw()

    def _enable(self, view: str) -> None:
        uses = USES[view]
        self.module.disabled = "module" not in uses
        self.layer.disabled = "layer" not in uses
        self.label.disabled = "label" not in uses or not self._has_labels
        for c in (self.sequence, self.previous, self.next):
            c.disabled = "sequence" not in uses or not self.sequence.options
        # The sequence stepper only matters in the sentence view: hidden elsewhere.
        self.stepper.layout.display = "flex" if view == "sentence" else "none"

    def redraw(self) -> None:
        site = self.site
        if site is None or self._quiet:
            return
        view = self.view.value
        self._enable(view)
        self.summary.value = self._summary(site, view)
        self.caption.value = caption(CAPTIONS[view]).value
        guarded(self.pane, lambda: self._figure(site))

    def _summary(self, site: str, view: str) -> str:
        m = self.metrics[self.metrics.site == site].iloc[0]
        where = f"<b title='{escape(site)}'>{site_label(m.module, m.layer)}</b>"
        label = self.label.value if "label" in USES[view] else ALL
        if view == "sentence":
            s = self.sequence.value
            if s is None:
                return "no sampled sequence" + ("" if label is ALL else f" with label {escape(label)}")
            n_sites = self.tokens[self.tokens.sequence == s].site.nunique()
            return f"sequence <b>#{int(s)}</b> across {n_sites} routed sites"
        if view == "profile":
            return f"<b>{bank_label(m.group)}</b> — {int(m.num_B)} experts shared by " \
                   f"{int((self.metrics.group == m.group).sum())} sites"
        if label is not ALL and self.by_label is not None:
            part = self.by_label[(self.by_label.site == site) & (self.by_label.value == label)]
            n = int(part.n_tokens.iloc[0]) if len(part) else 0
            if n == 0:
                return f"{where} — no tokens with label {escape(label)}"
            return (f"{where} · label <b>{escape(label)}</b> — {n:,} tokens · load entropy "
                    f"{part.load_entropy.iloc[0]:.3f} · max usage {part.usage.max():.3f} · routing {escape(m.routing)}")
        if m.top_k:
            return (f"{where} — {int(m.n_tokens):,} tokens · top-{int(m.top_k)} of {int(m.num_B)} experts · tokens "
                    f"per expert {int(m.tokens_min):,}–{int(m.tokens_max):,} · aux loss {m.aux_loss:.3f} · "
                    f"load entropy {m.load_entropy:.3f} · routing MI {m.routing_mi:.3f}")
        return (f"{where} — {int(m.n_tokens):,} tokens · load entropy {m.load_entropy:.3f} · "
                f"routing MI {m.routing_mi:.3f} · max usage {m.max_usage:.3f} · routing {escape(m.routing)}")

    def _figure(self, site):
        view = self.view.value
        label = self.label.value if "label" in USES[view] else ALL
        if view == "usage":
            if label is not ALL:
                rows = self.by_label[(self.by_label.value == label)][
                    ["site", "module", "group", "index", "layer", "expert", "usage", "n_tokens"]]
                where = site_label(*self.metrics[self.metrics.site == site][["module", "layer"]].iloc[0])
                return plots.plot_usage_bars(rows, site, title=f"Expert usage at {where} — label {label}")
            return plots.plot_usage_bars(self.usage, site)
        if view == "tokens":
            rows = self.tokens if label is ALL else self.tokens[self.tokens.label == label]
            if rows[rows.site == site].empty:
                raise InputError("no sampled tokens for this site and label")
            return plots.plot_token_probs(rows, site)
        if view == "labels":
            if self.by_label is None:
                raise InputError("no labels in this recording: call recorder.annotate(labels=…) after each call")
            return plots.plot_label_usage(self.by_label, site)
        if view == "dispatch":
            return plots.plot_expert_load(self.load, highlight=[site])
        if view == "modes":
            return plots.plot_mixture_modes(self.modes, site)
        if view == "sentence":
            s = self.sequence.value
            if s is None:
                raise InputError("no sampled sequence to show" + ("" if label is ALL else f" with label {label}"))
            return plots.plot_token_routes(self.tokens, s, prediction=self._prediction(int(s)))
        group = self.metrics[self.metrics.site == site].group.iloc[0]
        return plots.plot_expert_profile(self.profile, group)

    # ------------------------------------------------------------------ live routing
    def route_text(self) -> None:
        """Run the typed sentence through the model (a new computation the user asked for) and
        show it across every routed site."""
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
            self.live.show(plots.plot_token_routes(table, int(table.sequence.min()),
                                                   title=f"Your sentence across every routed site: {text[:80]}"))
        except Exception as err:  # noqa: BLE001 — shown in the widget
            self.live.say(f"{type(err).__name__}: {err}", "error")
