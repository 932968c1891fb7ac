"""``report``: one self-contained HTML file with every plot, the metrics tables and the diagnosis.

Analysis and plots meet here (DESIGN §3). By default plotly.js is inlined, so the file opens
offline, anywhere; ``include_plotlyjs="cdn"`` (plotly's own choice of host) or a path/URL of
your own copy of plotly.js makes the file ~5 MB smaller. Every text from the model or the data
(site names, labels, tokens) is HTML-escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from . import plots
from .analysis import (bank_summary, delta_spectra, diagnose, expert_layer_profile, expert_similarity, rank_summary,
                       router_metrics, specialization, top_tokens)
from .analysis.layout import sharing_layout
from .core import adapter_sites, adapter_summary, count_parameters
from .observe.routing import Routing, RoutingError

_CSS = """
body { font-family: Inter, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1.5em 2em 4em; color: #222; line-height: 1.45; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 2px solid #e4e4e4; padding-bottom: .2em; margin-top: 2.2em; }
nav a { margin-right: 1.2em; } pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
.meta { color: #666; } .note { color: #666; font-style: italic; }
.table-wrap { overflow-x: auto; max-height: 480px; overflow-y: auto; margin: .5em 0 1.5em; }
table.metrics { border-collapse: collapse; font-size: 12px; white-space: nowrap; }
table.metrics th, table.metrics td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: right; }
table.metrics th { position: sticky; top: 0; background: #fafafa; }
table.metrics td:first-child, table.metrics th:first-child { text-align: left; }
.finding { border-left: 5px solid #999; padding: .4em .9em; margin: .8em 0; background: #fbfbfb; }
.finding.critical { border-color: #c0392b; } .finding.warning { border-color: #d68910; }
.ok { color: #1e8449; font-weight: bold; } code { font-size: 12px; }
"""

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
            raise ValueError(f"include_plotlyjs must be {_PLOTLYJS_CHOICES}; got {include_plotlyjs!r}")
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

    def table(self, frame: pd.DataFrame, caption: str) -> None:
        frame = frame.copy()
        for c in frame.columns:  # lists (a finding's sites) as plain text
            frame[c] = frame[c].map(lambda v: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
        body = frame.to_html(index=False, escape=True, border=0, classes="metrics", na_rep="–",
                             float_format=lambda x: f"{x:.4g}")
        self.parts.append(f"<h3>{html.escape(caption)}</h3><div class='table-wrap'>{body}</div>")

    def text(self, text: str, cls: str = "note") -> None:
        self.parts.append(f"<p class='{cls}'>{html.escape(text)}</p>")

    def raw(self, markup: str) -> None:  # markup built here, from escaped pieces only
        self.parts.append(markup)


def _focus_sites(metrics: pd.DataFrame) -> list[str]:
    """Per group, the site whose router depends most on its input (highest routing_mi)."""
    m = metrics.dropna(subset=["routing_mi"])
    return [part.sort_values("routing_mi", ascending=False)["site"].iloc[0] for _, part in m.groupby("group", sort=False)]


def _router_sections(page: _Page, routing: Routing, tokenizer) -> None:
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
    page.table(metrics, "Router metrics (one row per routed site)")
    profile = expert_layer_profile(routing)
    for group in dict.fromkeys(profile["group"]):
        page.figure(plots.plot_expert_profile(profile, group))
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
    if len(top) or len(tokens):
        page.section("tokens", "Tokens", "The tokens each expert prefers and one recorded sequence tinted by "
                     "each token's top expert, at the same sites.")
    for site in focus:
        if len(top) and site in set(top["site"]):
            page.figure(plots.plot_top_tokens(top, site))
    if len(tokens):
        at = tokens[tokens["site"] == focus[0]]
        if len(at):
            page.figure(plots.plot_token_text(tokens, focus[0], int(at["sequence"].iloc[0])))


def _diagnosis_section(page: _Page, model, routing: Routing | None) -> None:
    d = diagnose(model, routing)
    page.section("diagnosis", "Diagnosis")
    page.figure(plots.plot_diagnosis(d.to_frame()))
    if d.ok:
        page.raw(f"<p class='ok'>No collapse found (checked: {html.escape(', '.join(d.checked))}).</p>")
    for f in d.findings:
        where = ", ".join(f.sites[:12]) + (f" (+{len(f.sites) - 12} more)" if len(f.sites) > 12 else "")
        page.raw(f"<div class='finding {html.escape(f.severity)}'><b>{html.escape(f.severity)}</b> · "
                 f"<b>{html.escape(f.kind)}</b> — {html.escape(f.summary)}<br>where: {html.escape(where)}<br>"
                 f"evidence: <code>{html.escape(str(f.evidence))}</code><br>try: {html.escape(f.remedy)}</div>")
    for note in d.notes:
        page.text(note)


def report(model, routing: Routing | None = None, path: str | os.PathLike = "lily_lab_report.html", *,
           title: str = "lily_lab report", include_plotlyjs: Any = "inline", tokenizer=None,
           baseline=None) -> Path:
    """Write one HTML report of ``model``'s adapter (lily_lab Lily, PEFT Lily or PEFT LoRA) and,
    when given, of ``routing`` (a recording from ``record_routing``); return its path.

    Sections: the adapter's layout and sharing diagram; routers (usage heatmap, metrics table,
    experts across layers, usage by label when the recording has labels, top tokens and a tinted
    sequence — token text needs ``tokenizer``); experts (similarity per bank, bank table); spectra of
    ΔW (uniform and routed mixtures, ``baseline``: a model or ``delta_spectra`` frame drawn dashed)
    and rank by layer; the diagnosis. ``routing=None`` leaves the router sections out.

    ``include_plotlyjs``: ``"inline"`` (default: plotly.js inside the file, which opens offline),
    ``"cdn"`` (plotly's hosted copy), a path or URL of a plotly.js file, or ``False`` (the page
    that embeds the report provides plotly.js). The file is written atomically.
    """
    if not adapter_sites(model):
        raise ValueError("report needs a model with a Lily (or LoRA) adapter; this one has no adapter sites")
    if routing is not None and not isinstance(routing, Routing):
        raise TypeError(f"routing must be a lily_lab.Routing (recorder.routing) or None, got {type(routing).__name__}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"report: the directory {str(path.parent)!r} does not exist; create it first")
    page = _Page(include_plotlyjs)
    counts = count_parameters(model)
    page.section("adapter", "Adapter", f"{counts['adapter']:,} adapter parameters; {counts['trainable']:,} trainable "
                 f"of {counts['total']:,} in the model.")
    page.raw(f"<pre>{html.escape(adapter_summary(model))}</pre>")
    page.figure(plots.plot_sharing_diagram(sharing_layout(model)))
    if routing is not None:
        _router_sections(page, routing, tokenizer)
    similarity = expert_similarity(model)
    page.section("experts", "Experts", "How alike the B experts of each bank are: near copies (cosine ≈ 1) add "
                 "parameters without adding capacity.")
    for group in dict.fromkeys(similarity["group"]):
        page.figure(plots.plot_expert_similarity(similarity, group))
    if similarity.empty:
        page.text("No bank has two or more experts, so there is no expert similarity to show.")
    page.table(bank_summary(model), "Banks")
    spectra = delta_spectra(model) if routing is None else pd.concat([delta_spectra(model), delta_spectra(model, routing)],
                                                                      ignore_index=True)
    if baseline is not None and not isinstance(baseline, pd.DataFrame):
        baseline = delta_spectra(baseline)
    ranks = rank_summary(spectra)
    page.section("spectra", "Spectra of ΔW", "Singular values of each site's update, exact from the factors; "
                 + ("uniform mixture and each site's mean routed mixture." if routing is not None else "uniform mixture."))
    page.figure(plots.plot_spectra(spectra, baseline=baseline))
    page.figure(plots.plot_rank_by_layer(ranks))
    page.table(ranks, "Rank summary (one row per site and mixture)")
    _diagnosis_section(page, model, routing)
    if routing is None:
        page.text("Router sections left out: pass routing= a recording from lily_lab.record_routing on your data.")
    return _write(path, _document(page, title, routing))


def _document(page: _Page, title: str, routing: Routing | None) -> str:
    from . import __version__

    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    nav = " ".join(f'<a href="#{a}">{html.escape(h)}</a>' for a, h in page.nav)
    rec = f" · recording: {len(routing.sites)} routed sites, {routing.n_calls} calls" if routing is not None else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n{page.head_script}\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n<p class='meta'>lily_lab {html.escape(__version__)} · {when}{html.escape(rec)}</p>\n"
            f"<nav>{nav}</nav>\n" + "\n".join(page.parts) + "\n</body>\n</html>\n")


def _write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temporary file beside it, then ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


__all__ = ["report"]
