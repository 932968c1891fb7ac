"""lily_lab.report: one self-contained HTML file, plotly.js inlined (or referenced on request),
every section that applies, text from the data escaped, written atomically."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from plotly.offline import get_plotlyjs

import lily_lab as ll
from lily_lab.report import report

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
    # sharing, heatmap, 2 profiles, 2 label usages, 2 top tokens, token text, 2 similarities, spectra, rank, diagnosis
    assert inline_html.count('class="plotly-graph-div"') == 14
    for caption in ("Router metrics", "Banks", "Rank summary"):
        assert f"<h3>{caption}" in inline_html
    assert inline_html.count('<table class="dataframe metrics">') == 3
    assert "routing_mi" in inline_html and "mean_cosine" in inline_html and "effective_rank" in inline_html
    assert "How Lily shares its parts" in inline_html and "Top tokens per expert" in inline_html


def test_text_from_the_data_is_escaped_everywhere(inline_html):
    rest = without_plotlyjs(inline_html)
    assert EVIL_LABEL not in rest and "<img" not in rest.lower()
    assert set(re.findall(r"<script[^>]*>", rest)) == {"<script>"}  # only plotly's own, attribute-free
    # the hostile label and token are shown, as text: HTML-escaped (plotly's JSON also escapes '/')
    assert "&lt;script&gt;alert(1)&lt;" in rest
    assert "&lt;img src=x onerror=alert(1)&gt;" in rest


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
            page.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 14",
                                   timeout=30_000)
            drawn = page.evaluate("[...document.querySelectorAll('.plotly-graph-div')].filter(d => d.data).length")
            ticks = page.evaluate("[...document.querySelectorAll('.xtick text, .ytick text')].map(t => t.textContent)")
        finally:
            browser.close()
    assert drawn == 14 and not dialogs and not errors and not requests
    assert EVIL_LABEL in ticks and EVIL_TOKEN in ticks  # shown as the text it is
