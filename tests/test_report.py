"""lily_lab.report (lily_lab/app/report.py): one self-contained HTML file, plotly.js inlined (or
referenced on request), every section that applies, text from the data escaped, written atomically."""

from __future__ import annotations

import html
import json
import os
import re
import shutil

import pytest
import torch
from plotly.offline import get_plotlyjs

import lily_lab as ll
from lily_lab import plots
from lily_lab.app.report import report

EVIL_LABEL = "<script>alert(1)</script>"
EVIL_TOKEN = "<img src=x onerror=alert(1)>"
PLOTLYJS_SIGNATURE = "* plotly.js v"  # the bundle's licence header


class Tokenizer:
    def convert_ids_to_tokens(self, ids):
        return [EVIL_TOKEN if i % 7 == 0 else f"tok{i}" for i in ids]


def record(model, ids, labels):
    with torch.no_grad(), ll.record_routing(model) as rec:
        for _ in range(3):
            model(input_ids=ids)
            rec.annotate(labels=labels)
    return rec.routing


@pytest.fixture(scope="module")
def lily(tiny_bert):
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=3, stride_A=2, init_weights=False))
    ids = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 1] = 14  # a hostile token in every sequence
    return model, record(model, ids, ["pos", "neg", "pos", EVIL_LABEL])


@pytest.fixture(scope="module")
def inline_html(lily, tmp_path_factory):
    model, routing = lily
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert report(model, routing, path, title="Lab <b>report</b> " + EVIL_TOKEN, tokenizer=Tokenizer()) == path
    return path.read_text(encoding="utf-8")


def figures(text: str) -> list[dict]:
    """Every figure of a report, in page order, as plotly JSON: ``{"data": [...], "layout": {...}}``."""
    out, decoder = [], json.JSONDecoder()
    for m in re.finditer(r'Plotly\.newPlot\(\s*"lily-fig-\d+",\s*', text):
        data, end = decoder.raw_decode(text, m.end())
        layout, _ = decoder.raw_decode(text, re.compile(r",\s*").match(text, end).end())
        out.append({"data": data, "layout": layout})
    return out


def title(fig: dict) -> str:
    return fig["layout"].get("title", {}).get("text", "")


def captions(text: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<p class='caption'>(.*?)</p>", text, flags=re.S)]


def without_plotlyjs(text: str) -> str:
    bundle = get_plotlyjs()
    assert text.count(bundle) == 1
    return text.replace(bundle, "")


def test_the_report_is_one_complete_page_that_opens_offline(inline_html):
    assert inline_html.startswith("<!DOCTYPE html>") and inline_html.rstrip().endswith("</html>")
    assert inline_html.count(PLOTLYJS_SIGNATURE) == 1  # plotly.js inside, once
    rest = without_plotlyjs(inline_html)
    assert not re.search(r"<script[^>]*\ssrc=", rest)  # nothing fetched: no script from anywhere
    assert not re.search(r"<link[^>]*href=|<img[^>]*src=|@import|url\(", rest)
    assert "<title>Lab &lt;b&gt;report&lt;/b&gt; &lt;img src=x onerror=alert(1)&gt;</title>" in rest


def test_every_section_and_table_is_there(inline_html):
    for anchor in ("adapter", "routers", "labels", "tokens", "experts", "spectra", "diagnosis"):
        assert f'id="{anchor}"' in inline_html
    # sharing, heatmap, 2 profiles, 2 label usages, 2 top tokens, 4 token routes, 2 similarities, spectra (one
    # figure, a panel per bank), rank, diagnosis
    assert inline_html.count('class="plotly-graph-div"') == 17 == len(figures(inline_html))
    for caption in ("Router metrics", "Banks", "Rank summary"):
        assert f"<h3>{caption}" in inline_html
    # the three tables with the columns that matter, and every column of the two that leave some out
    assert inline_html.count('<table class="metrics">') == 3
    assert inline_html.count("<details class='all-columns'>") == inline_html.count('<table class="dataframe metrics">') == 2
    assert "routing MI" in inline_html and "mean cosine" in inline_html and "effective rank" in inline_html
    assert "routing_mi" in inline_html and "effective_rank" in inline_html  # the full tables keep the names
    assert "How Lily shares its parts" in inline_html and "Top tokens per expert" in inline_html


def test_text_from_the_data_is_escaped_everywhere(inline_html):
    rest = without_plotlyjs(inline_html)
    assert EVIL_LABEL not in rest and "<img" not in rest.lower()
    assert set(re.findall(r"<script[^>]*>", rest)) == {"<script>"}  # only plotly's own, attribute-free
    # the hostile label and token are shown, as text: HTML-escaped (plotly's JSON also escapes '/')
    assert "&lt;script&gt;alert(1)&lt;" in rest
    assert "&lt;img src=x onerror=alert(1)&gt;" in rest


def test_the_token_view_shows_a_few_sequences_one_per_label_first(inline_html):
    routes = [f for f in figures(inline_html) if title(f).startswith("Sequence ")]
    assert len(routes) == 4
    labels = [re.fullmatch(r"Sequence \d+ — label (.*?)", title(f)).group(1) for f in routes]
    assert labels == ["pos", "neg", "&lt;script&gt;alert(1)&lt;/script&gt;", "pos"]  # every label, then more
    assert len({title(f) for f in routes}) == 4 and all("at all 8 sites" in f["layout"]["title"]["subtitle"]["text"] for f in routes)
    for f in routes:
        y, x = f["layout"]["yaxis"], f["layout"]["xaxis"]
        assert y["ticktext"] == [f"{m} · layer {i}" for m in ("query", "value") for i in range(4)]
        assert x["type"] == "category" and x["tickangle"] == 0 and len(x["ticktext"]) == 10
        assert "&lt;img sr…" in x["ticktext"]  # the hostile token (position 1), cut and escaped
        heat = [t for t in f["data"] if t["type"] == "heatmap"]
        assert [t["name"] for t in heat] == ["expert 0", "expert 1", "expert 2"]
    assert any("How to read the sequences below" in c for c in captions(inline_html))


def test_predictions_go_beside_each_example_label(lily, tmp_path):
    model, routing = lily
    predicted = {s: f"guess{s}" for s in range(12)}
    text = report(model, routing, tmp_path / "r.html", predictions=predicted).read_text(encoding="utf-8")
    routes = [title(f) for f in figures(text) if title(f).startswith("Sequence ")]
    assert routes and all(re.fullmatch(r"Sequence (\d+) — label .*? · predicted guess\1", t) for t in routes)


@pytest.mark.parametrize("predictions, sequence, want", [
    (None, 0, None), (["a", "b"], 1, "b"), (["a", "b"], 2, None), ({3: "x"}, 3, "x"), ({3: "x"}, 0, None)])
def test_prediction_for_reads_lists_and_mappings(predictions, sequence, want):
    assert plots.prediction_for(predictions, sequence) == want


def test_spectra_are_small_multiples_with_a_caption(inline_html):
    (fig,) = [f for f in figures(inline_html) if title(f).startswith("Singular values of ΔW")]
    assert "one panel per bank" in title(fig)
    assert [a["text"] for a in fig["layout"]["annotations"]] == ["query bank (32×32)", "value bank (32×32)"]
    lines = [t for t in fig["data"] if t["x"][0] is not None]
    assert len(lines) == 8 * 2 and {t["xaxis"] for t in lines} == {"x", "x2"}  # 8 sites × (uniform, routed mean)
    assert [t["name"] for t in fig["data"] if t["x"][0] is None] == [f"layer {i}" for i in range(4)] + [
        "line: uniform", "line: routed mean"]
    (caption,) = [c for c in captions(inline_html) if "Mixtures:" in c]
    for meaning in ('"uniform" = every expert weighted 1/E', "\"routed mean\" = each site's mean applied mixture "
                    "over the recording", '"expert k" = only expert k', '"label=X" = the mean mixture over tokens of '
                    "label X", "Drawn here: uniform, routed mean"):
        assert meaning in caption
    assert inline_html.index("Mixtures:") > inline_html.index('id="spectra"')


def test_expert_similarity_figures_say_how_to_read_them(inline_html):
    sims = [f for f in figures(inline_html) if "cosine of the B experts" in title(f)]
    assert [title(f).split(":")[0] for f in sims] == ["query bank (32×32)", "value bank (32×32)"]
    assert all(f["layout"]["title"]["subtitle"]["text"].startswith("mean over the 3 pairs of experts: ") for f in sims)
    read = [c for c in captions(inline_html) if "cosine of two experts' B matrices" in c]
    assert len(read) == 2
    for c, bank in zip(read, ["query bank (32×32)", "value bank (32×32)"]):
        assert "1 = the same direction" in c and "redundant copies that add parameters but no capacity" in c
        assert "around 0 = unrelated" in c and "a mean cosine of 0.94 means the experts are near copies" in c
        assert f"{bank}: mean over pairs " in c and "unrelated directions" in c  # random B: far from copies


def _tables(text: str) -> list[str]:
    """The report's own tables (not the full ones in <details>)."""
    outside = re.sub(r"<details.*?</details>", "", text, flags=re.S)
    return re.findall(r'<table class="metrics">.*?</table>', outside, flags=re.S)


def _cells(table: str, tag: str) -> list[tuple[str, str]]:
    """(title attribute, text) of every ``tag`` cell."""
    return [(html.unescape(t or ""), html.unescape(v)) for t, v in
            re.findall(rf'<{tag}(?: title="([^"]*)")?(?: class="text")?>(.*?)</{tag}>', table)]


def test_tables_show_display_names_and_rounded_numbers_and_fit_the_page(inline_html):
    metrics, banks, ranks = _tables(inline_html)
    heads = [v for _, v in _cells(metrics, "th")]
    assert heads[:5] == ["site", "bank", "routing", "experts", "tokens"] and "routing MI" in heads
    assert not [h for t in (metrics, banks, ranks) for _, h in _cells(t, "th") if "_" in h]  # words, not columns
    sites = [c for c in _cells(metrics, "td") if c[1].endswith(tuple(f"· layer {i}" for i in range(4)))]
    assert len(sites) == 8 and ("encoder.layer.2.attention.self.value", "value · layer 2") in sites  # path: tooltip
    assert ("query:32x32", "query bank (32×32)") in _cells(banks, "td")
    assert ("value:32x32", "value bank (32×32)") in _cells(ranks, "td")
    numbers = [v for t in (metrics, banks, ranks) for _, v in _cells(t, "td") if re.fullmatch(r"-?[\d,]+\.\d+", v)]
    assert numbers and all(len(v.split(".")[1]) <= 3 for v in numbers)  # rounded
    # Fits the 1200 px column of a 1280 px window without scrolling: 12 px text is under 7 px a
    # character, a header wraps at its spaces, a cell has 16 px of padding.
    for table in (metrics, banks, ranks):
        heads = [v for _, v in _cells(table, "th")]
        rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
        cols = list(zip(*[[v for _, v in _cells(r, "td")] for r in rows]))
        width = sum(16 + 7 * max(max(map(len, h.split())), *map(len, col)) for h, col in zip(heads, cols))
        assert width <= 1200, (heads, width)


def test_findings_are_cards_with_evidence_tables_and_banks_are_counted_as_banks(tiny_bert, tmp_path):
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=3, init_weights=False))
    with torch.no_grad():
        for site in ll.adapter_sites(model):
            site.B.copy_(site.B[0].expand_as(site.B))  # every bank's experts: one copied three times
            site.router.zero_()  # uniform routing whatever the input: input-blind routers
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    text = report(model, record(model, ids, ["a", "b"]), tmp_path / "r.html", include_plotlyjs="cdn").read_text()
    diagnosis = text[text.index('id="diagnosis"'):]
    cards = re.findall(r"<div class='lily-finding (\w+)'>(.*?)</div></div>", diagnosis, flags=re.S)
    kinds = {re.search(r"</b> <code>(\w+)</code>", body).group(1): (sev, body) for sev, body in cards}
    assert set(kinds) == {"redundant_experts", "input_blind_router"}
    sev, body = kinds["redundant_experts"]
    assert sev == "critical" and "<span class='severity critical'>critical</span>" in body
    assert "<b>Experts that are near copies of each other</b>" in body  # the kind in plain words
    assert "<b>where</b> (2 banks): " in body and '<span title="query:32x32">query bank (32×32)</span>' in body
    evidence = re.search(r"<table class='evidence'>(.*?)</table>", body).group(1)
    assert re.findall(r"<th>(.*?)</th>", evidence) == ["bank", "mean cosine", "distinct experts"]
    assert '<td title="value:32x32">value bank (32×32)</td><td class=\'num\'>1.0000</td>' in evidence
    assert "<tr><th>routing</th><td>batch</td></tr>" in body  # a plain value: key → value
    assert "<b>try:</b> " in body and "Start B random (LilyConfig(init_weights=False))" in body  # the remedy
    sev, body = kinds["input_blind_router"]
    assert "(8 sites): " in body and '<span title="encoder.layer.1.attention.self.value">value · layer 1</span>' in body
    assert re.findall(r"<th>(.*?)</th>", body)[:2] == ["site", "routing MI"]
    assert "{" not in re.sub(r"<script.*?</script>|<style>.*?</style>", "", diagnosis, flags=re.S)  # no Python dict
    assert ll.plots.FINDING_CSS in text.split("</style>")[0]  # the cards' style, the widget's too
    bars = [t for f in figures(text) if title(f).startswith("Diagnosis") for t in f["data"]]
    assert sorted(x for t in bars for x in t["text"]) == ["2 banks", "8 sites"]


def test_cdn_or_a_path_references_plotlyjs_instead(lily, tmp_path):
    model, routing = lily
    cdn = report(model, routing, tmp_path / "cdn.html", include_plotlyjs="cdn").read_text()
    assert PLOTLYJS_SIGNATURE not in cdn and len(re.findall(r'<script[^>]*src="[^"]*plotly[^"]*\.js"', cdn)) == 1
    local = report(model, routing, tmp_path / "local.html", include_plotlyjs="js/plotly.min.js").read_text()
    assert PLOTLYJS_SIGNATURE not in local
    assert re.findall(r'<script[^>]*src="([^"]*)"', local) == ["js/plotly.min.js"]
    assert local.index("js/plotly.min.js") < local.index("</head>")
    for bad in ("", 3, None):
        with pytest.raises(ValueError, match="include_plotlyjs"):
            report(model, routing, tmp_path / "bad.html", include_plotlyjs=bad)
    assert not (tmp_path / "bad.html").exists()


def test_without_a_recording_the_router_sections_are_left_out(lily, tmp_path):
    model, _ = lily
    text = report(model, None, tmp_path / "r.html").read_text()
    assert 'id="routers"' not in text and 'id="labels"' not in text and "Router metrics" not in text
    assert 'id="spectra"' in text and 'id="diagnosis"' in text and "pass routing=" in text
    assert text.count('class="plotly-graph-div"') == 6  # sharing, 2 similarities, spectra, rank, diagnosis


def test_an_empty_recording_says_so(lily, tmp_path):
    model, _ = lily
    with ll.record_routing(model) as rec:
        pass  # no forward call
    text = report(model, rec.routing, tmp_path / "r.html", include_plotlyjs="cdn").read_text()
    assert 'id="routers"' in text and "No routed site has seen a token" in text
    assert text.count('class="plotly-graph-div"') == 6  # the model's sections only


def test_peft_lily_and_lora_models(tiny_bert, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_bert(), peft.LilyConfig(target_modules=["query"], r=4, num_B=2, init_weights=False))
    ids = torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    text = report(pm, record(pm, ids, ["a", "b"]), tmp_path / "peft.html").read_text()
    assert 'id="routers"' in text and "base_model.model.encoder.layer.0.attention.self.query" in text
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query"], r=2))
    text = report(lora, None, tmp_path / "lora.html").read_text()
    assert "No bank has two or more experts" in text and 'id="diagnosis"' in text


def test_a_lora_baseline_is_overlaid_on_the_spectra(lily, tiny_bert, tmp_path):
    peft = pytest.importorskip("peft")
    model, routing = lily
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query", "value"], r=4,
                                                            init_lora_weights=False))
    text = report(model, None, tmp_path / "b.html", baseline=lora, include_plotlyjs="cdn").read_text()
    assert len(re.findall(r'"name":"[^"]*peft-lora \(baseline\)"', text)) == 8  # one dashed trace per site


def test_the_write_is_atomic(lily, tmp_path, monkeypatch):
    model, _ = lily
    path = tmp_path / "r.html"
    path.write_text("old report")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        report(model, None, path, include_plotlyjs="cdn")
    assert path.read_text() == "old report" and os.listdir(tmp_path) == ["r.html"]  # no temp file left
    monkeypatch.undo()
    report(model, None, path, include_plotlyjs="cdn")
    assert path.read_text().startswith("<!DOCTYPE html>") and os.listdir(tmp_path) == ["r.html"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report(model, None, tmp_path / "missing" / "r.html")


def test_bad_arguments_are_named(lily, tiny_bert, tmp_path):
    model, routing = lily
    with pytest.raises(ValueError, match="no adapter sites"):
        report(tiny_bert(), None, tmp_path / "r.html")
    with pytest.raises(TypeError, match="routing must be"):
        report(model, routing.usage(), tmp_path / "r.html")


def test_the_report_renders_in_a_browser_and_runs_nothing_from_the_data(inline_html, tmp_path):
    """Chromium opens the file with every network request blocked: all figures draw, no dialog
    opens (an unescaped <img onerror=alert(1)> or <script> would open one), no script fails."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("chromium is not installed")
    path = tmp_path / "report.html"
    path.write_text(inline_html, encoding="utf-8")
    requests, dialogs, errors = [], [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.route("**/*", lambda route: (requests.append(route.request.url), route.abort())
                       if not route.request.url.startswith("file:") else route.continue_())
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 17",
                                   timeout=30_000)
            drawn = page.evaluate("[...document.querySelectorAll('.plotly-graph-div')].filter(d => d.data).length")
            ticks = page.evaluate("[...document.querySelectorAll('.xtick text, .ytick text')].map(t => t.textContent)")
        finally:
            browser.close()
    assert drawn == 17 and not dialogs and not errors and not requests
    assert EVIL_LABEL in ticks and EVIL_TOKEN in ticks  # shown as the text it is
