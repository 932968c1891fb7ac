"""Text from the data shows in figures as itself: quotes as quotes, a token ``<b>x</b>`` as those
seven characters (never bold, never a tag), ``&amp;`` as those five.

``plots.escape`` writes ``&amp; &lt; &gt;``, ``&#x27;`` and — not ``&quot;``, which plotly.js does
not decode — ``&#34;``. Plotly.js turns text into SVG by splitting off its few tags and decoding,
in the text between them, numeric entities and eight named ones (``convertEntities``); the tests
check that table in the bundled plotly.min.js, emulate the decoding on figure JSON, and draw the
figures in headless Chromium (Debian's, as tests/test_browser.py does) to read the SVG back,
hovers included. The same escaped text is real-HTML safe, inside quoted attributes too.
"""

from __future__ import annotations

import html
import html.parser
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import plotly
import plotly.io as pio
import pytest

import _lab
from _figures import strings as figure_strings
from lily_lab import plots

TOKENS = ['"', "'", "<b>x</b>", "&amp;", 'say "hi"', "it's", "&quot;"]
LABEL = "\"quoted\" & 'single'"

# plotly.js's convertEntities (src/lib/svg_text_utils.js), as bundled: the named entities it knows
ENTITIES = {"mu": "\u03bc", "amp": "&", "lt": "<", "gt": ">", "nbsp": "\xa0", "times": "\xd7", "plusmn": "\xb1",
            "deg": "\xb0"}
ENTITY = re.compile(r"&(#\d+|#x[\da-fA-F]+|[a-z]+);")


def plotly_text(text: str) -> str:
    """What plotly.js draws of ``text`` that holds no tags: its entities decoded as convertEntities
    does (an entity it does not know stays as written)."""
    def one(m):
        e = m.group(1)
        if e.startswith("#"):
            code = int(e[2:], 16) if e[1] == "x" else int(e[1:])
            return chr(code) if code <= 0x10FFFF else m.group(0)
        return ENTITIES.get(e, m.group(0))
    return ENTITY.sub(one, text)


# ... and as it reads in plotly.min.js
JS_TABLE = '{mu:"\\u03BC",amp:"&",lt:"<",gt:">",nbsp:"\\xA0",times:"\\xD7",plusmn:"\\xB1",deg:"\\xB0"}'
JS_PATTERN = "/&(#\\d+|#x[\\da-fA-F]+|[a-z]+);/g"


def test_the_bundled_plotly_decodes_the_entities_assumed_here():
    bundle = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text(encoding="utf-8")
    assert JS_TABLE in bundle and JS_PATTERN in bundle, "plotly.js's convertEntities changed: check plots.escape"
    assert JS_TABLE.encode().decode("unicode_escape") == "{" + ",".join(f'{k}:"{v}"' for k, v in ENTITIES.items()) + "}"
    assert ENTITY.pattern == JS_PATTERN[1:-2]


ESCAPES = {  # value → what escape writes (and plotly draws it back as the value)
    '"': "&#34;",
    "'": "&#x27;",
    "<b>x</b>": "&lt;b&gt;x&lt;/b&gt;",
    "&amp;": "&amp;amp;",
    "&quot;": "&amp;quot;",
    "&#34;": "&amp;#34;",
    'say "hi" <i>now</i>': "say &#34;hi&#34; &lt;i&gt;now&lt;/i&gt;",
    "%{x} <br>": "%{x} &lt;br&gt;",
    None: "",
    3: "3",
}


@pytest.mark.parametrize("value", list(ESCAPES), ids=[repr(v) for v in ESCAPES])
def test_escape_keeps_tags_out_and_plotly_draws_the_value_back(value):
    out = plots.escape(value)
    assert out == ESCAPES[value]
    assert "<" not in out and ">" not in out and '"' not in out and "'" not in out
    assert plotly_text(out) == ("" if value is None else str(value))  # what the figure shows
    assert html.unescape(out) == ("" if value is None else str(value))  # what a browser's HTML shows


def route_table() -> pd.DataFrame:
    """A token table of one sequence (label LABEL) of the TOKENS at two sites of one bank."""
    sites = [("enc.layer.0.attn.query", 0), ("enc.layer.1.attn.query", 1)]
    rng = np.random.default_rng(0)
    rows = []
    for name, index in sites:
        for pos, word in enumerate(TOKENS):
            p = rng.dirichlet(np.ones(2))
            rows.append(dict(site=name, module="query", group="query:8x8", index=index, call=0, sequence=0,
                             position=pos, token_id=10 + pos, label=LABEL, token=word, p0=p[0], p1=p[1],
                             top_expert=int(p.argmax())))
    return pd.DataFrame(rows)


def figures():
    table = route_table()
    return {"text": plots.plot_token_text(table, "enc.layer.0.attn.query", 0),
            "routes": plots.plot_token_routes(table, 0)}


def test_figure_json_holds_the_tokens_escaped_and_no_quot():
    for name, fig in figures().items():
        strings = list(figure_strings(fig.to_plotly_json()))
        assert not [s for s in strings if "&quot;" in s and "&amp;quot;" not in s], name
        assert not [s for s in strings if "<b>x" in s], name  # no data text as a tag
        shown = [plotly_text(re.sub(r"<[^<>]*>", "", s)) for s in strings]  # lily_lab's own tags dropped
        for token in TOKENS:
            assert any(token in s for s in shown), (name, token)
        assert any(f"label {LABEL}" in s for s in shown), name


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_quotes_in_real_html_attributes_stay_inside_them():
    """finding_html and evidence_html put the escaped site name in a title="…" attribute."""
    site = 'layers.0." onmouseover="alert(1)" x=\''
    finding = SimpleNamespace(kind="odd_kind", severity="warning", summary="s", sites=[site],
                              evidence={"max_usage": {site: 0.9}}, remedy="r", scope="site")
    parser = _Tags()
    parser.feed(plots.finding_html(finding))
    titled = [attrs for tag, attrs in parser.tags if "title" in attrs]
    assert titled and all(a["title"] == site for a in titled)
    assert not [a for _, a in parser.tags if "onmouseover" in a or "x" in a]


# --------------------------------------------------------------------------- in a browser
FIGURE_TEXT = "(id) => [...document.querySelectorAll(`#${id} svg text`)].map(t => t.textContent)"
BOLD = ("(sel) => [...document.querySelectorAll(sel + ' tspan')].filter(t => /bold/.test(t.getAttribute('style')"
        " || '')).map(t => t.textContent)")
HOVER = "(id) => [...document.querySelectorAll(`#${id} .hoverlayer text`)].map(t => t.textContent).join(' | ')"
CELL = """([id, row, col]) => { const gd = document.getElementById(id), xa = gd._fullLayout.xaxis,
    ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
    return [r.left + xa._offset + xa.c2p(col), r.top + ya._offset + ya.c2p(row)]; }"""


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The two figures drawn in headless Chromium, every request but the file blocked."""
    _lab.require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    path = tmp_path_factory.mktemp("figures") / "figures.html"
    divs = "".join(pio.to_html(fig, full_html=False, include_plotlyjs=i == 0, div_id=name)
                   for i, (name, fig) in enumerate(figures().items()))
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{divs}</body></html>",
                    encoding="utf-8")
    errors, dialogs = [], []
    with sync_api.sync_playwright() as p:
        browser = _lab.launch(p)
        try:
            pg = browser.new_page(viewport={"width": 1200, "height": 1600})
            pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            pg.goto(path.as_uri())
            pg.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 4",
                                 timeout=30_000)
            yield pg
        finally:
            browser.close()
    assert not errors and not dialogs, (errors, dialogs)


@pytest.mark.parametrize("name", ["text", "routes"])
def test_the_drawn_figure_shows_the_tokens_and_label_literally(page, name):
    drawn = page.evaluate(FIGURE_TEXT, name)
    for token in TOKENS:
        assert token in drawn, (token, drawn)  # a bar's text or a tick label: the token whole
    assert any(f"label {LABEL}" in t for t in drawn), drawn  # the title
    assert not [t for t in drawn if "&quot;" in t and t != "&quot;"], drawn
    assert not page.evaluate(BOLD, f"#{name} .main-svg"), "data text turned bold"
    assert page.evaluate(f"document.querySelectorAll('#{name} :is(b, i, img, script)').length") == 0


BARS = """(id) => [...document.querySelectorAll(`#${id} .trace.bars .point path`)].map(b => {
    const r = b.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })"""


def _hover_at(page, name: str, xy, says: str) -> tuple[str, list[str]]:
    """The hover text of figure ``name`` once the mouse is at ``xy`` and the hover ``says`` it,
    and the texts of its bold parts."""
    page.mouse.move(*xy)
    page.wait_for_function(f"() => (document.querySelector('#{name} .hoverlayer text') || {{}}).textContent"
                           f"?.includes({says!r})", timeout=5_000)
    hover, bold = page.evaluate(HOVER, name), page.evaluate(BOLD, f"#{name} .hoverlayer")
    page.mouse.move(0, 0)
    return hover, bold


def test_hovers_show_the_tokens_literally(page):
    bars = page.evaluate(BARS, "text")  # plot_token_text: a bar per token, in its top expert's trace
    assert len(bars) == len(TOKENS)
    seen = sorted(_hover_at(page, "text", xy, " · position")[0].split(" · position")[0] for xy in bars)
    assert seen == sorted(f"token {t}" for t in TOKENS), seen
    for col, token in enumerate(TOKENS):  # plot_token_routes: a heatmap's cell, by the mouse
        hover, bold = _hover_at(page, "routes", page.evaluate(CELL, ["routes", 0, col]), f"position {col}")
        assert hover.startswith(f"token {token} · position {col}"), hover
        assert bold == [token], bold  # lily_lab's own <b> around the token, the token as text
