"""``report``: one self-contained HTML file with every plot, the metrics tables and the diagnosis.

Analysis and plots meet here (docs/architecture.md). By default plotly.js is inlined, so the file opens
offline, anywhere; ``include_plotlyjs="cdn"`` (plotly's own choice of host) or a path/URL of
your own copy of plotly.js makes the file ~5 MB smaller. Every text from the model or the data
(site names, labels, tokens) is HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from .. import plots
from ..plots import FINDING_CSS, SEVERITY_COLORS, finding_html, message_figure, number_label
from ..plots.experts import RANK_TITLES
from ..plots.routing import METRIC_TITLES
from ..analysis import (bank_summary, delta_spectra, diagnose, expert_layer_profile, expert_load, expert_similarity,
                       rank_summary, router_metrics, specialization, top_tokens)
from ..analysis.finite import describe, nonfinite_counts
from ..analysis.layout import sharing_layout
from ..core import adapter_summary, count_parameters
from ..core.errors import InputError, LilyLabFileError, LilyLabFileNotFoundError, LilyLabTypeError
from ..core.layer import require_module
from ..core.sites import sites_or_routers
from ..observe.routing import Routing, RoutingError

_CSS = """
body { font-family: Inter, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1.5em 2em 4em; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 2px solid #e4e4e4; padding-bottom: .2em; margin-top: 2.2em; }
nav a { margin-right: 1.2em; } pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
.meta { color: #666; } .note { color: #666; font-style: italic; }
.table-wrap { overflow-x: auto; max-height: 480px; overflow-y: auto; margin: .5em 0 1.5em; }
table.metrics { border-collapse: collapse; font-size: 12px; white-space: nowrap; }
table.metrics th, table.metrics td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: right; }
table.metrics th { position: sticky; top: 0; background: #fafafa; white-space: normal; vertical-align: bottom; }
table.metrics td:first-child, table.metrics th:first-child, table.metrics td.text, table.metrics th.text {
  text-align: left; }
table.metrics [title] { cursor: help; }
details.all-columns { margin: -1em 0 1.5em; font-size: 12px; } details.all-columns summary { color: #555; cursor: pointer; }
p.caption { color: #444; font-size: 13px; margin: -.2em 0 1.6em; max-width: 60em; }
.ok { color: """ + SEVERITY_COLORS["ok"] + """; font-weight: bold; } code { font-size: 12px; }
""" + FINDING_CSS  # the diagnosis cards: the same look as in the Diagnosis widget

_PLOTLYJS_CHOICES = "'inline' (default, opens offline), 'cdn', a path or URL of plotly.js, or False"


class _Page:
    """Collects sections; renders figures with plotly.js where ``include_plotlyjs`` says."""

    def __init__(self, include_plotlyjs: Any):
        if include_plotlyjs is True or include_plotlyjs == "inline":
            self._first, self.head_script = True, ""
        elif include_plotlyjs == "cdn":
            self._first, self.head_script = "cdn", ""
        elif include_plotlyjs is False:
            self._first, self.head_script = False, ""
        elif isinstance(include_plotlyjs, (str, os.PathLike)) and str(include_plotlyjs).strip():
            self._first = False
            self.head_script = f'<script charset="utf-8" src="{html.escape(os.fspath(include_plotlyjs))}"></script>'
        else:
            raise InputError(f"include_plotlyjs must be {_PLOTLYJS_CHOICES}; got {include_plotlyjs!r}")
        self.parts: list[str] = []
        self.nav: list[tuple[str, str]] = []
        self._n = 0

    def section(self, anchor: str, heading: str, intro: str = "") -> None:
        self.nav.append((anchor, heading))
        self.parts.append(f'<h2 id="{anchor}">{html.escape(heading)}</h2>')
        if intro:
            self.parts.append(f"<p>{html.escape(intro)}</p>")

    def figure(self, fig: go.Figure) -> None:
        self._n += 1
        self.parts.append(pio.to_html(fig, include_plotlyjs=self._first, full_html=False, div_id=f"lily-fig-{self._n}",
                                      config={"displaylogo": False, "responsive": True}))
        self._first = False  # plotly.js goes in once, with the first figure

    def table(self, frame: pd.DataFrame, caption: str, columns: list["_Column"] | None = None) -> None:
        """``frame`` under the heading ``caption``: the ``columns`` that matter, with readable names
        and rounded numbers (default: every column as it is); when ``columns`` leave some out, every
        column of ``frame`` is one click away below the table."""
        if columns is None:
            self.parts.append(f"<h3>{html.escape(caption)}</h3><div class='table-wrap'>{_frame_html(frame)}</div>")
            return
        head = "".join(c.th() for c in columns)
        rows = "".join("<tr>" + "".join(c.td(row) for c in columns) + "</tr>" for _, row in frame.iterrows())
        body = f'<table class="metrics"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
        self.parts.append(f"<h3>{html.escape(caption)}</h3><div class='table-wrap'>{body}</div>")
        shown = {c.source for c in columns}
        if set(frame.columns) - shown:
            self.parts.append(f"<details class='all-columns'><summary>all {len(frame.columns)} columns "
                              f"(full names)</summary><div class='table-wrap'>{_frame_html(frame)}</div></details>")

    def text(self, text: str, cls: str = "note") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def caption(self, text: str) -> None:
        """How to read the figure above."""
        self.text(text, "caption")

    def raw(self, markup: str) -> None:  # markup built here, from escaped pieces only
        self.parts.append(markup)


def _frame_html(frame: pd.DataFrame) -> str:
    frame = frame.copy()
    for c in frame.columns:  # lists (a finding's sites) as plain text
        frame[c] = frame[c].map(lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
    return frame.to_html(index=False, escape=True, border=0, classes="metrics", na_rep="–",
                         float_format=lambda x: f"{x:.4g}")


def _plain(label: str) -> str:
    """A display name from ``plots`` (``site_label``, ``bank_label``: escaped markup) as plain text,
    for the places that escape what they are given — ``_Page.text``/``caption``, ``_Column`` cells and
    the plots' ``title=`` — so that a name is escaped once, not twice."""
    return html.unescape(label)


class _Column:
    """One column of a report table: ``header`` over ``source`` shown by ``show`` (default: the
    value, numbers rounded), the ``tip`` column (e.g. the full module path) as a tooltip."""

    def __init__(self, header: str, source: str, show=None, tip: str | None = None, about: str = "",
                 text: bool = False):
        self.header, self.source, self.show, self.tip, self.about, self.text = header, source, show, tip, about, text

    def _attrs(self, tip: str) -> str:
        return (f' title="{html.escape(tip)}"' if tip else "") + (' class="text"' if self.text else "")

    def th(self) -> str:
        return f"<th{self._attrs(self.about)}>{html.escape(self.header)}</th>"

    def td(self, row: pd.Series) -> str:
        value = row[self.source]
        shown = self.show(row) if self.show is not None else value if self.text else number_label(value)
        return f"<td{self._attrs(str(row[self.tip]) if self.tip else '')}>{html.escape(str(shown))}</td>"


def _site_columns(frame: pd.DataFrame) -> list[_Column]:
    """The site (``module · layer``, full path as tooltip) and its bank (group key as tooltip)."""
    layer = "layer" if "layer" in frame.columns else "index"
    return [_Column("site", "site", lambda r: _plain(plots.site_label(r["module"], r[layer])), tip="site", text=True),
            _Column("bank", "group", lambda r: _plain(plots.bank_label(r["group"])), tip="group", text=True)]


def _metrics_columns(metrics: pd.DataFrame) -> list[_Column]:
    shown = [("routing MI", "routing_mi"), ("load entropy", "load_entropy"), ("token entropy", "token_entropy"),
             ("effective experts", "effective_experts"), ("max usage", "max_usage")]
    return _site_columns(metrics) + [
        _Column("routing", "routing", text=True, about="the mixture a site applies: per batch, sequence or token"),
        _Column("experts", "num_B", about="experts in the site's bank (E)"),
        _Column("tokens", "n_tokens", about="real tokens recorded"),
    ] + [_Column(h, c, about=METRIC_TITLES.get(c, c)) for h, c in shown if c in metrics.columns] + (
        _dispatch_columns() if "top_k" in metrics.columns and (metrics["top_k"] > 0).any() else [])


def _dispatch_columns() -> list[_Column]:
    """The dispatch of top-k routers (mixture-of-experts layers): ``router_metrics``' DISPATCH_COLUMNS."""
    return [_Column("top-k", "top_k", about="experts each token is sent to (0: Lily, which mixes every expert)"),
            _Column("fewest tokens", "tokens_min", about="tokens sent to the least loaded expert"),
            _Column("most tokens", "tokens_max", about="tokens sent to the most loaded expert"),
            _Column("aux loss", "aux_loss", about="this layer's auxiliary load-balancing loss, as transformers' "
                                                 "load_balancing_loss_func computes it (top_k when balanced)")]


def _rank_columns(ranks: pd.DataFrame) -> list[_Column]:
    titles = RANK_TITLES
    shown = [("effective rank", "effective_rank"), ("stable rank", "stable_rank"),
             ("numerical rank", "numerical_rank"), ("top-1 energy", "energy_top1"), ("top-4 energy", "energy_top4")]
    return _site_columns(ranks) + [
        _Column("mixture", "mixture", text=True, about="the mixture of experts the spectrum is of (see Spectra)"),
        _Column("r", "r", about="rank of the factors: the bound of every rank"),
    ] + [_Column(h, c, about=titles.get(c, c)) for h, c in shown if c in ranks.columns]


def _bank_columns(banks: pd.DataFrame) -> list[_Column]:
    shown = [("experts", "num_B", "experts in the bank (E)"),
             ("mean cosine", "mean_cosine", "mean pairwise cosine of the flattened B experts (1: copies)"),
             ("max cosine", "max_cosine", "the most alike pair of experts"),
             ("distinct experts", "distinct_experts", "how many really different experts the bank holds"),
             ("mean ‖B‖", "mean_norm", "mean Frobenius norm of an expert"),
             ("max ‖B‖", "max_norm", "largest Frobenius norm of an expert (0: the adapter is inactive)"),
             ("non-finite", "nonfinite_B", "NaN or infinite entries of the bank (a diverged run)")]
    return [_Column("bank", "group", lambda r: _plain(plots.bank_label(r["group"])), tip="group", text=True)] + [
        _Column(h, c, about=a) for h, c, a in shown if c in banks.columns]


def _focus_sites(metrics: pd.DataFrame) -> list[str]:
    """Per group, the site whose router depends most on its input (highest routing_mi)."""
    m = metrics.dropna(subset=["routing_mi"])
    return [part.sort_values("routing_mi", ascending=False)["site"].iloc[0] for _, part in m.groupby("group", sort=False)]


def _router_sections(page: _Page, routing: Routing, tokenizer, predictions=None) -> None:
    usage = routing.usage()
    metrics = router_metrics(routing)
    focus = _focus_sites(metrics)
    page.section("routers", "Routers", "How the routers spread each site's tokens over the bank's experts, "
                 f"over {routing.n_calls} recorded forward call(s).")
    if metrics.empty or usage.empty:
        page.text("This recording has no routed site (a bank needs two or more experts to route).")
        return
    if not focus:
        page.text("No routed site has seen a token: run forward calls inside record_routing to fill this section.")
        return
    page.figure(plots.plot_usage_heatmap(usage[usage["site"].isin(metrics["site"])]))
    page.table(metrics, "Router metrics (one row per routed site)", _metrics_columns(metrics))
    if (metrics["top_k"] > 0).any():
        page.section("dispatch", "Tokens sent to each expert", "The tokens each mixture-of-experts layer actually "
                     "sent to each of its experts (its top-k choice), layer by layer: a collapsed layer shows here "
                     "however healthy the average over layers is.")
        page.figure(plots.plot_expert_load(expert_load(routing)))
        page.caption("How to read: each row is a layer's router, each column one of its experts; the colour is the "
                     "share of the layer's tokens sent to the expert (white: the fair share 1/E; red: every token; "
                     "blue: fewer than fair). The bars beside it: each layer's auxiliary load-balancing loss (top_k "
                     "when balanced, dashed), labelled with the fewest and most tokens an expert was sent.")
    # Lily's cross-layer view: one bank shared by a group's layers (a mixture-of-experts layer's
    # experts are its own, so its routers are left out).
    lily_groups = set(metrics.loc[metrics["top_k"] == 0, "group"])
    profile = expert_layer_profile(routing)
    for group in [g for g in dict.fromkeys(profile["group"]) if g in lily_groups]:
        page.figure(plots.plot_expert_profile(profile, group,
                                              title=f"{_plain(plots.bank_label(group))}: each expert across the group's layers"))
    if routing.labels:
        spec = specialization(routing, by="label")
        page.section("labels", "Routing by label", "For each group, the site whose router depends most on its "
                     "input: how each label's tokens use the experts.")
        for site in focus:
            if site in set(spec["site"]):
                page.figure(plots.plot_label_usage(spec, site))
    try:
        top = top_tokens(routing, k=8, tokenizer=tokenizer)
    except RoutingError:
        top = pd.DataFrame()
    tokens = routing.token_table(tokenizer)
    examples = _example_sequences(tokens, routing.labels)
    if len(top) or examples:
        page.section("tokens", "Tokens", "The tokens each expert prefers at the same sites, then a few recorded "
                     "sequences through every routed site at once.")
    for site in focus:
        if len(top) and site in set(top["site"]):
            page.figure(plots.plot_top_tokens(top, site))
    if examples:
        page.caption("How to read the sequences below: each row is a routed site, each column a token of the "
                     "sequence; a cell is coloured by the expert the router there gave that token most weight, "
                     "paler where the router was less decisive (near-uniform over the experts), blank where the "
                     "token was not sampled. Hover a cell for the whole distribution."
                     + ("" if tokenizer is not None else " Pass tokenizer= to show token text instead of ids."))
    for sequence in examples:
        page.figure(plots.plot_token_routes(tokens, sequence,
                                            prediction=plots.prediction_for(predictions, int(sequence))))


def _same(a: Any, b: Any) -> bool:
    missing = lambda v: v is None or (isinstance(v, float) and np.isnan(v))  # noqa: E731
    return (missing(a) and missing(b)) or (not missing(a) and not missing(b) and a == b)


def _example_sequences(tokens: pd.DataFrame, labels: list, k: int = 4) -> list:
    """Up to ``k`` recorded sequences for the token view: first the best-sampled sequence of each
    label (in the recording's label order), then the best-sampled others."""
    if tokens.empty:
        return []
    counts = tokens.groupby("sequence").size()
    label_of = tokens.drop_duplicates("sequence").set_index("sequence")["label"]
    ranked = sorted(counts.index, key=lambda q: (-counts[q], q))
    chosen: list = []
    for value in list(labels) + [None]:
        hit = next((q for q in ranked if _same(label_of[q], value)), None)
        if hit is not None and len(chosen) < k:
            chosen.append(hit)
    chosen += [q for q in ranked if q not in chosen][: k - len(chosen)]
    return [int(q) for q in chosen]


def _diagnosis_section(page: _Page, model, routing: Routing | None) -> None:
    d = diagnose(model, routing)
    page.section("diagnosis", "Diagnosis", "Each finding: what is wrong and how badly, where, the numbers that "
                 "triggered it and what to try.")
    frame = d.to_frame()
    if d.ok and d.headline:  # e.g. nothing recorded: "no collapse found" would claim too much
        page.figure(message_figure("Diagnosis", d.headline))
        page.raw(f"<p><b>{html.escape(d.headline)}</b> (checked: {html.escape(', '.join(d.checked))}).</p>")
    else:
        page.figure(plots.plot_diagnosis(frame))
    if d.ok and not d.headline:
        page.raw(f"<p class='ok'>No collapse found (checked: {html.escape(', '.join(d.checked))}).</p>")
    for f in d.findings:
        page.raw(finding_html(f))
    for note in d.notes:
        page.text(note)


def _similarity_caption(part: pd.DataFrame, group: Any) -> str:
    off = part[part["expert_i"] != part["expert_j"]]["cosine"]
    mean = float(off.mean()) if len(off) else float("nan")
    if np.isnan(mean):
        verdict = "no pair of experts to compare"
    elif mean >= 0.9:
        verdict = "the experts are near copies: the bank adds parameters but little capacity"
    elif mean >= 0.5:
        verdict = "the experts are partly alike: some of the bank's capacity is duplicated"
    elif mean > -0.5:
        verdict = "the experts point in unrelated directions: each adds capacity of its own"
    else:
        verdict = "the experts point in largely opposite directions"
    return ("How to read: each cell is the cosine of two experts' B matrices, flattened to vectors. 1 = the same "
            "direction, i.e. redundant copies that add parameters but no capacity (a mean cosine of 0.94 means "
            "the experts are near copies); around 0 = unrelated; −1 = opposite. "
            f"{_plain(plots.bank_label(group))}: mean over pairs {number_label(mean, 2)} — {verdict}.")


def _spectra_caption(spectra: pd.DataFrame, baseline) -> str:
    present = list(dict.fromkeys(spectra["mixture"])) if "mixture" in spectra.columns else []
    return ("How to read: each line is the singular values σ_k of one site's update ΔW (largest first) under one "
            "mixture of its bank's experts, one panel per bank, colour the layer. Mixtures: \"uniform\" = every "
            "expert weighted 1/E; \"routed mean\" = each site's mean applied mixture over the recording; "
            "\"expert k\" = only expert k; \"label=X\" = the mean mixture over tokens of label X. "
            + (f"Drawn here: {', '.join(map(str, present))}. " if present else "")
            + ("Dashed: the baseline's spectrum of the same site. " if baseline is not None else "")
            + "A spectrum that falls off fast uses few directions (see the effective rank below).")


def report(model, routing: Routing | None = None, path: str | os.PathLike = "lily_lab_report.html", *,
           title: str = "lily_lab report", include_plotlyjs: Any = "inline", tokenizer=None,
           baseline=None, predictions=None) -> Path:
    """Write one HTML report of ``model``'s adapter (lily_lab Lily, PEFT Lily or PEFT LoRA) and,
    when given, of ``routing`` (a recording from ``record_routing``); return its path.

    Sections: the adapter's layout and sharing diagram; routers (usage heatmap, metrics table,
    experts across layers, usage by label when the recording has labels, top tokens and up to four
    recorded sequences through every routed site, one per label first — token text needs
    ``tokenizer``); experts (similarity per bank with how to read it, bank table); spectra of ΔW,
    one panel per bank (uniform and routed mixtures, ``baseline``: a model or ``delta_spectra``
    frame drawn dashed), and rank by layer; the diagnosis, a card per finding. Sites and banks go
    by their display names (``query · layer 3``, ``query bank (384×384)``), full names in tooltips;
    tables show the columns that matter, every column one click away. ``routing=None`` leaves the
    router sections out. ``predictions``: the model's prediction for each recorded sequence (a list
    by the recording's sequence number, or a mapping), shown beside each example's label.

    A mixture-of-experts model without an adapter (its top-k routers: ``router_sites``) gets a
    model line, the router sections with "Tokens sent to each expert" (each layer's dispatch,
    ``plot_expert_load``) and the diagnosis, per layer; with no low-rank update, the adapter,
    experts and spectra sections are left out, and the report says so. A recording with top-k
    routers gets the dispatch section and columns for any model.

    ``include_plotlyjs``: ``"inline"`` (default: plotly.js inside the file, which opens offline),
    ``"cdn"`` (plotly's hosted copy), a path or URL of a plotly.js file, or ``False`` (the page
    that embeds the report provides plotly.js). The file is written atomically.
    """
    require_module(model, "report")
    sites, routers = sites_or_routers(model, "report")
    if routing is not None and not isinstance(routing, Routing):
        raise LilyLabTypeError(f"routing must be a lily_lab.Routing (recorder.routing) or None, got "
                               f"{type(routing).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise LilyLabTypeError(f"report: path must be a file path (str or pathlib.Path), got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise LilyLabFileError(f"report: path {str(path)!r} is a folder; give the report a file name, e.g. "
                         f"{str(path / 'lily_lab_report.html')!r}")
    if not path.parent.is_dir():
        raise LilyLabFileNotFoundError(f"report: the directory {str(path.parent)!r} does not exist; create it first")
    page = _Page(include_plotlyjs)
    if not sites:
        return _moe_report(page, model, routers, routing, path, title, tokenizer, predictions)
    counts = count_parameters(model)
    page.section("adapter", "Adapter", f"{counts['adapter']:,} adapter parameters; {counts['trainable']:,} trainable "
                 f"of {counts['total']:,} in the model.")
    page.raw(f"<pre>{html.escape(adapter_summary(model))}</pre>")
    page.figure(plots.plot_sharing_diagram(sharing_layout(model)))
    if routing is not None:
        _router_sections(page, routing, tokenizer, predictions)
    bad = nonfinite_counts(sites)  # a diverged run: these banks are left out, the diagnosis says why
    skipped = (f"Left out: non-finite weights (NaN or inf) in {describe(bad)} — see the diagnosis below."
               if bad else "")
    similarity = expert_similarity(model) if not bad else pd.DataFrame(columns=["group"])
    page.section("experts", "Experts", "How alike the B experts of each bank are: near copies (cosine ≈ 1) add "
                 "parameters without adding capacity.")
    if bad:
        page.text("Expert similarity not shown: the adapter has non-finite weights. " + skipped)
    for group in dict.fromkeys(similarity["group"]):
        page.figure(plots.plot_expert_similarity(similarity, group))
        page.caption(_similarity_caption(similarity[similarity["group"] == group], group))
    if similarity.empty and not bad:
        page.text("No bank has two or more experts, so there is no expert similarity to show.")
    banks = bank_summary(model)
    if not banks["nonfinite_B"].any():  # the column only matters for a diverged run
        banks = banks.drop(columns="nonfinite_B")
    page.table(banks, "Banks", _bank_columns(banks))
    good = [s for s in sites if s.group not in bad]
    if bad and not good:
        page.section("spectra", "Spectra of ΔW", skipped)
        _diagnosis_section(page, model, routing)
        return _write(path, _document(page, title, routing))
    spectra = delta_spectra(good) if routing is None else pd.concat([delta_spectra(good), delta_spectra(good, routing)],
                                                                     ignore_index=True)
    if baseline is not None and not isinstance(baseline, pd.DataFrame):
        baseline = delta_spectra(baseline)
    ranks = rank_summary(spectra)
    page.section("spectra", "Spectra of ΔW", "Singular values of each site's update, exact from the factors; "
                 + ("uniform mixture and each site's mean routed mixture." if routing is not None else "uniform mixture."))
    if bad:
        page.text(skipped)
    page.figure(plots.plot_spectra(spectra, baseline=baseline, facet="group"))
    page.caption(_spectra_caption(spectra, baseline))
    page.figure(plots.plot_rank_by_layer(ranks))
    page.table(ranks, "Rank summary (one row per site and mixture)", _rank_columns(ranks))
    _diagnosis_section(page, model, routing)
    if routing is None:
        page.text("Router sections left out: pass routing= a recording from lily_lab.record_routing on your data.")
    return _write(path, _document(page, title, routing))


def _moe_report(page: _Page, model, routers: list, routing: Routing | None, path: Path, title: str, tokenizer,
                predictions) -> Path:
    """The report of a mixture-of-experts model without a low-rank adapter: its routers, the
    dispatch, the diagnosis; no adapter, bank or spectrum section (there is no ΔW)."""
    layers = {(r.group, r.top_k) for r in routers}
    shape = ", ".join(f"top-{k} of {g.rsplit(':E', 1)[-1]} experts ({g.split(':', 1)[0]})" for g, k in sorted(layers))
    page.section("model", "Model", f"A mixture-of-experts model: {len(routers)} top-k router(s), {shape}; "
                 f"{count_parameters(model)['total']:,} parameters.")
    page.text("No low-rank update in this model (no Lily or LoRA adapter): the adapter, expert-similarity and "
              "ΔW-spectrum sections are left out.")
    if routing is not None:
        _router_sections(page, routing, tokenizer, predictions)
    _diagnosis_section(page, model, routing)
    if routing is None:
        page.text("Router sections left out: pass routing= a recording from lily_lab.record_routing on your data.")
    return _write(path, _document(page, title, routing))


def _document(page: _Page, title: str, routing: Routing | None) -> str:
    from .. import __version__

    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h in page.nav)
    rec = f" · recording: {len(routing.sites)} routed sites, {routing.n_calls} calls" if routing is not None else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n{page.head_script}\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class='meta'>lily_lab {html.escape(__version__)} · {when}{html.escape(rec)}</p>\n"
            f"<nav>{nav}</nav>\n" + "\n".join(page.parts) + "\n</body>\n</html>\n")


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (``core.files.atomic_write``): a reader or a crash never
    leaves half a report, and the file gets the usual permissions (0o666 less the umask)."""
    from ..core.files import atomic_write

    atomic_write(path, text.encode("utf-8"))
    return path


__all__ = ["report"]
