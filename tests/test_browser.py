"""The dashboard in a real browser, as a person sees it: JupyterLab on 127.0.0.1, headless Chromium.

A notebook builds ``LilyDashboard`` on a 6-layer BERT with Lily on query and value, a labelled
recording, a tokenizer and a training ``Timeline``. Then, without knowing the controls by name:

* every tab is opened by its title, and in it every control is changed through the page — each
  option of every ``<select>``, every toggle button, every checkbox (on and off), sliders by the
  keyboard (a step, End, Home), the play button, text boxes and buttons — and after each change,
  once the kernel has answered and the page is quiet, every visible plotly figure is read back:
  a drawn title, a drawn title on every visible axis, tick labels on every axis, an axis type
  that fits the values (text on a linear axis draws nothing), marks in the SVG, shapes drawn as
  the layout lists them, nothing of it (legend, colour bar, titles) sticking out of the visible
  figure, the log-scale checkbox making an axis logarithmic — and compared with the kernel's own
  figure (a title or axis type the kernel set that never reached the page is reported as such);
* after each change no element of the dashboard (nor the notebook around it) overflows
  horizontally, no figure's SVG is wider than its box, no button or label text is cut, and no
  dropdown shows a blank selection; disabled controls are skipped and counted;
* hostile text from the data (a label and a token that are HTML) shows literally and runs nothing.

At 1280×720 with JupyterLab's left side panel open (its default) every control is exercised; then
with the panel closed (Ctrl+B) and at 1920×1080 every tab and every toggle view is checked.
Screenshots go to ``test-output/`` (``dashboard_<tab>.png``, ``dashboard_<tab>_<view>.png``,
``dashboard_panel_closed_<tab>.png``, ``dashboard_1920_<tab>.png``); on failure also
``failure.png`` and ``failure.html``. Every failed check of a pass is collected and reported in
one assertion: pass, tab, control and value, figure title, what is wrong.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import _lab
from _lab import DASH, OUT, VISIBLE_TAB

XSS_LABEL = "<img src=x onerror=window.__xss=1>"
XSS_TOKEN = "<script>window.__xss=2</script>"
SCOPE = f"{DASH} {VISIBLE_TAB}"

SETUP = f"""import json, re, torch, transformers, plotly.graph_objects as go, lily_lab as ll
from lily_lab.widgets import LilyDashboard
torch.manual_seed(0)
model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6,
                                                       num_attention_heads=4, intermediate_size=64)).eval()
ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="token", init_weights=False))

class Tok:  # a tokenizer whose tokens include hostile HTML
    def __call__(self, texts, return_tensors="pt", **kwargs):
        ids = torch.tensor([[7 + i for i in range(len(t.split()) + 2)] for t in texts[:1]])
        return {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    def convert_ids_to_tokens(self, ids):
        return [{XSS_TOKEN!r} if int(i) % 2 else f"tok{{int(i)}}" for i in ids]

g = torch.Generator().manual_seed(0)
with ll.record_routing(model) as rec, torch.no_grad():
    for _ in range(4):
        model(input_ids=torch.randint(0, 100, (4, 10), generator=g), attention_mask=torch.ones(4, 10, dtype=torch.long))
        rec.annotate(labels=["pos", {XSS_LABEL!r}, "neg", "pos"])
tl = ll.Timeline(probe={{"input_ids": torch.randint(0, 100, (4, 10), generator=g)}})
for step in range(0, 50, 10):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    tl.observe(model, step)

def _lab_probe():
    '''Each plotly FigureWidget of the dashboard as the kernel holds it: trace uids, titles,
    axis types, shape count (compared with what the page drew).'''
    seen, out = set(), []
    def text(t):
        return ((t.get("text") if isinstance(t, dict) else t) or "") if t is not None else ""
    def walk(w):
        if id(w) in seen:
            return
        seen.add(id(w))
        if isinstance(w, go.FigureWidget):
            lay = w.layout.to_plotly_json()
            lay.pop("template", None)
            axes = {{k: {{"title": text(v.get("title")), "type": v.get("type"), "visible": v.get("visible")}}
                    for k, v in lay.items() if re.match(r"^[xy]axis\\d*$", k)}}
            out.append({{"uids": [d.uid for d in w.data], "title": text(lay.get("title")), "axes": axes,
                        "shapes": len(lay.get("shapes") or [])}})
        for c in getattr(w, "children", None) or ():
            walk(c)
    walk(dash)
    print(json.dumps(out, default=str))
"""

DASHBOARD = """dash = LilyDashboard(model, rec.routing, tokenizer=Tok(), timeline=tl)
print("TRACES", len(dash.router.pane.figure.data) if hasattr(dash, "router") else 0)
dash"""

PROBE = """async (code) => {
  const k = window.__lab && window.__lab.kernel;
  if (!k) return null;
  let text = '';
  const f = k.requestExecute({code, silent: false, store_history: false});
  f.onIOPub = m => { if (m.header.msg_type === 'stream') text += m.content.text;
                     if (m.header.msg_type === 'error') text += 'ERROR ' + m.content.ename + ': ' + m.content.evalue; };
  await f.done;
  return text;
}"""


# ------------------------------------------------------------------------------------------ fixture


class Lab:
    """JupyterLab and Chromium for this module; ``page`` shows the dashboard notebook, run."""

    def __init__(self, browser, url: str):
        self.browser, self.url, self.page, self.traces = browser, url, None, 0

    def open(self, width: int, height: int):
        """A fresh page at ``width``×``height`` that runs the notebook (in the same kernel)."""
        if self.page is not None:
            self.page.close()
        self.page = page = self.browser.new_page(viewport={"width": width, "height": height})
        try:
            printed = _lab.open_notebook(page, self.url, "dashboard.ipynb", "TRACES", timeout_ms=300_000)
            page.wait_for_selector(f"{SCOPE} .js-plotly-plot .main-svg", timeout=90_000)
            self.traces = int(printed.split()[-1])
            state = _lab.install(page)
            assert state["ok"] and state["kernel"], f"could not follow the page's kernel: {state}"
            _lab.quiet(page, 500)
        except Exception:
            _save_failure(page, "open")
            raise
        return page


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on 127.0.0.1 and headless Chromium, with the dashboard open at 1280×720."""
    _lab.require_chromium()
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("lab")
    _lab.write_notebook(root / "dashboard.ipynb", [SETUP, DASHBOARD], hide_sources=True)
    OUT.mkdir(exist_ok=True)
    with _lab.jupyterlab_server(root) as url, sync_playwright() as p:
        browser = _lab.launch(p)
        try:
            lab = Lab(browser, url)
            lab.open(1280, 720)
            yield lab
        finally:
            browser.close()


def _save_failure(page, name: str = "") -> None:
    try:
        page.screenshot(path=str(OUT / "failure.png"))
        (OUT / "failure.html").write_text(page.content())
        if name:
            page.screenshot(path=str(OUT / f"failure_{name}.png"))
    except Exception:  # noqa: BLE001 — the page may be gone; the failure itself is what matters
        pass


# ------------------------------------------------------------------------------------------ checks


@dataclass
class Report:
    """The failed checks of one pass, deduplicated: the same problem after many changes is one line."""

    name: str
    problems: dict = field(default_factory=dict)  # key → [first line, count]
    changes: int = 0
    disabled: list = field(default_factory=list)

    def add(self, tab: str, when: str, figure: str, problem: str) -> None:
        key = re.sub(r"\d+(\.\d+)?", "#", f"{tab}|{figure}|{problem}")
        line = f"[{self.name}] tab {tab} · {when}" + (f" · figure {figure!r}" if figure else "") + f": {problem}"
        if key in self.problems:
            self.problems[key][1] += 1
        else:
            self.problems[key] = [line, 1]

    def lines(self) -> list[str]:
        return [line + (f"  (and after {n - 1} more change(s))" if n > 1 else "") for line, n in self.problems.values()]

    def assert_clean(self) -> None:
        summary = (f"{self.changes} changes made; {len(self.disabled)} disabled control(s) skipped"
                   + (f" ({', '.join(self.disabled)})" if self.disabled else ""))
        print(f"\n[{self.name}] {summary}")
        for line in self.lines():
            print(line)
        assert not self.problems, f"{len(self.problems)} problem(s) seen in the browser ({summary}):\n" + "\n".join(
            self.lines())


def _plain(markup: str) -> str:
    """A plotly title (markup) as plotly draws it: tags dropped, entities decoded, spaces collapsed."""
    text = re.sub(r"<br\s*/?>", " ", markup or "", flags=re.I)
    return _words(html.unescape(re.sub(r"<[^>]+>", "", text)))


def _words(text: str) -> str:
    """Drawn text, spaces collapsed."""
    return re.sub(r"[\s\u200b]+", " ", text or "").strip()


def _kernel(page) -> list[dict] | None:
    out = page.evaluate(PROBE, "_lab_probe()")
    if not out or out.startswith("ERROR"):
        return None
    return json.loads(out.strip().splitlines()[-1])


def check_figures(figs: list[dict], kernel: list[dict] | None, report: Report, tab: str, when: str,
                  log_state: dict | None = None) -> None:
    by_uid = {}
    for k in kernel or []:
        for uid in k["uids"]:
            by_uid[uid] = k
    for f in figs:
        name = _words(f["drawnTitle"]) or _plain(f["title"]) or "(no title)"
        add = lambda problem: report.add(tab, when, name, problem)  # noqa: E731
        k = next((by_uid[u] for u in f["uids"] if u in by_uid), None)
        has_data = any(t["x"]["n"] or t["y"]["n"] or t["z"] for t in f["traces"])
        if not f["drawnTitle"]:
            extra = (f" (the kernel's figure has title {_plain(k['title'])!r})" if k and k["title"] else
                     " (nor has the kernel's figure)" if k else "")
            add("no title drawn" + extra)
        elif k and k["title"] and _plain(k["title"]) != _words(f["drawnTitle"]):
            add(f"the drawn title is stale: the kernel's figure says {_plain(k['title'])!r}")
        axes = {a["id"]: a for a in f["axes"]}
        for a in f["axes"]:
            if not a["visible"]:
                continue
            ka = (k or {}).get("axes", {}).get(a["name"], {})
            if not a["title"]:
                extra = (f" (the kernel's figure has {_plain(ka['title'])!r})" if ka.get("title") else
                         " (nor has the kernel's figure)" if k else "")
                add(f"visible {a['name']} has no title" + extra)
            if has_data and a["showticklabels"] and a["ticks"] == 0:
                add(f"visible {a['name']} ({a['type']}) draws no tick labels")
            if has_data and a["type"] == "category" and a["categories"] == 0:
                add(f"{a['name']} is categorical but has no categories (an empty axis)")
            if ka.get("type") not in (None, "", "-") and ka["type"] != a["type"]:  # "-": plotly.js chooses
                add(f"{a['name']} is {a['type']!r} in the page but {ka['type']!r} in the kernel's figure")
        for t in f["traces"]:
            if not t["cartesian"]:
                continue
            for letter in "xy":
                a = axes.get(t[letter + "axis"])
                v = t[letter]
                # An axis the figure does not range must show its data (a stale range from the
                # previous figure drew bars of 0.3 on a -1…4 axis).
                if (a and a["type"] == "linear" and not a["userRange"] and a["range"] and v["min"] is not None
                        and t["type"] in ("bar", "scatter", "box", "violin") and not v["text"]):
                    lo, hi = sorted(a["range"])
                    pad = 0.02 * (hi - lo)
                    scale = max(v["max"] - v["min"], abs(v["max"]), abs(v["min"]), 1e-9)
                    if v["min"] < lo - pad or v["max"] > hi + pad or (hi - lo) > 8 * scale:
                        add(f"{a['name']} shows {lo:.3g}…{hi:.3g} but {t['type']} trace {t['name'][:40]!r} spans "
                            f"{v['min']:.3g}…{v['max']:.3g} (a stale range, not autoranged)")
                if a and t[letter]["text"] and a["type"] not in ("category", "multicategory", "date"):
                    add(f"{t['type']} trace {t['name'][:40]!r} has text {letter} values ({t[letter]['sample']}) "
                        f"but its {a['name']} is {a['type']!r} (nothing to place them on)")
        if has_data and f["marks"] == 0:
            add(f"the figure has {len(f['traces'])} trace(s) with data but no mark is drawn in its SVG")
        if f["shapesDrawn"] < f["shapesFull"]:
            add(f"{f['shapesFull']} shape(s) in the layout but {f['shapesDrawn']} drawn")
        if k is not None and k["shapes"] != f["shapesLayout"]:
            add(f"the kernel's figure has {k['shapes']} shape(s), the page's {f['shapesLayout']}")
        for s in f["sticking"]:
            add(f"{s['what']} {s['text']!r} sticks out of the visible figure (spans x {s['left']}–{s['right']}, "
                f"y {s['top']}–{s['bottom']}; visible x {s['visibleLeft']}–{s['visibleRight']})")
    if log_state is not None:
        logs = sum(a["type"] == "log" for f in figs for a in f["axes"] if a["visible"])
        if log_state["checked"]:
            log_state["on"] = logs
            if logs == 0:
                types = ", ".join(f"{a['name']}={a['type']}" for f in figs for a in f["axes"] if a["visible"])
                report.add(tab, when, "", f"the {log_state['label']!r} box is ticked but no visible axis is "
                                          f"logarithmic ({types})")
        elif "on" in log_state and logs >= log_state["on"] > 0:
            report.add(tab, when, "", f"the {log_state['label']!r} box is unticked but {logs} axis/axes stay "
                                      "logarithmic")


def check_layout(lay: dict, report: Report, tab: str, when: str) -> None:
    if lay.get("missing"):
        report.add(tab, when, "", "the dashboard is gone from the page")
        return
    for o in lay["overflow"]:
        report.add(tab, when, "", f"{o['el']} overflows horizontally: scrollWidth {o['scrollWidth']} > clientWidth "
                                  f"{o['clientWidth']} (overflow-x {o['overflowX']}; {o['text'][:40]!r})")
    for c in lay["cut"]:
        report.add(tab, when, "", f"text cut: {c['el']} {c['text']!r} needs {c['scrollWidth']} px, has "
                                  f"{c['clientWidth']} px")
    for b in lay["blank"]:
        report.add(tab, when, "", f"dropdown {b['label']!r} shows a blank selection ({b['options']} options, "
                                  f"selectedIndex {b['selectedIndex']})")
    for s in lay["svgs"]:
        report.add(tab, when, _plain(s["title"]), f"main-svg {s['svgWidth']} px wide in a {s['containerWidth']} px "
                                                  f"box ({s['container']})")
    if lay["right"] > lay["viewport"]:
        report.add(tab, when, "", f"the dashboard's right edge {lay['right']} px is past the viewport "
                                  f"({lay['viewport']} px)")


def look(page, report: Report, tab: str, when: str, *, kernel: bool = True, log_state: dict | None = None) -> None:
    figs = page.evaluate(_lab.FIGURES, SCOPE)
    check_figures(figs, _kernel(page) if kernel else None, report, tab, when, log_state)
    check_layout(page.evaluate(_lab.LAYOUT, DASH), report, tab, when)


def screenshot(page, name: str) -> None:
    """The whole dashboard (``screenshot_of`` the dashboard)."""
    screenshot_of(page, DASH, name)


def screenshot_of(page, sel: str, name: str) -> None:
    """The first widget under ``sel``: the viewport made as tall as it for the shot (the notebook
    clips what is scrolled out of it), then put back."""
    size = page.viewport_size
    height = page.evaluate("s => Math.ceil(document.querySelector(s).getBoundingClientRect().height)", sel)
    tall = min(max(size["height"], height + 240), 4000)
    if tall > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": tall})
        _lab.quiet(page, 200)
    try:
        page.locator(sel).first.screenshot(path=str(OUT / f"{name}.png"))
    finally:
        if tall > size["height"]:
            page.set_viewport_size(size)
            _lab.quiet(page, 200)


# ------------------------------------------------------------------------------------------ actions


def open_tab(page, i: int) -> str:
    tab = _lab.tab_titles(page).nth(i)
    title = tab.inner_text().strip()
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        _lab.arm(page)
        tab.click()
        _lab.settle(page, noop_ms=300)
        _lab.fitted(page)  # a tab shown for the first time sizes its figures through the kernel
    page.mouse.move(0, 0)
    return title


def _change(page, report: Report, action, *, quiet_ms: int = 250) -> dict:
    _lab.arm(page)
    action()
    page.mouse.move(0, 0)  # no hover label over a figure
    stamps = _lab.settle(page, quiet_ms=quiet_ms)
    report.changes += 1
    return stamps


def sweep_tab(page, report: Report, tab: str, *, full: bool, shots: str | None) -> None:
    """Change every control of the visible tab (``full``) or only its toggle buttons, and look."""
    done: set = set()
    depth = {"n": 0}

    def key(c):
        return (c["kind"], c["label"] or c["index"])

    def sweep_new(prefix: str):
        depth["n"] += 1
        try:
            while True:
                todo = [c for c in page.evaluate(_lab.CONTROLS, SCOPE) if key(c) not in done]
                if not todo:
                    return
                c = todo[0]
                done.add(key(c))
                if c.get("disabled"):
                    report.disabled.append(f"{tab}: {c['kind']} {c['label']!r}")
                    continue
                if c["kind"] == "toggles":
                    sweep_toggles(c, prefix)
                elif full:
                    sweep_control(c, prefix)
        finally:
            depth["n"] -= 1

    def sweep_toggles(c, prefix):
        original = c["selected"]
        order = [i for i in range(len(c["options"])) if i != original and c["enabled"][i]]
        for i in order + ([original] if original >= 0 else []):
            value = c["options"][i]
            when = f"{prefix}toggle buttons {c['label'] or ''}{' ' if c['label'] else ''}→ {value!r}"
            button = _lab.control(page, SCOPE, c).locator("button").nth(i)
            stamps = _change(page, report, button.click)
            if not stamps["changed"]:
                report.add(tab, when, "", "the page did not change at all")
            look(page, report, tab, when)
            if shots:
                screenshot(page, f"{shots}_{_lab.slug(tab)}_{_lab.slug(value)}")
            if full and depth["n"] < 2:  # controls only this view shows
                sweep_new(f"{prefix}{value!r} view · ")

    def sweep_control(c, prefix):
        loc = _lab.control(page, SCOPE, c)
        label = c["label"] or f"{c['kind']} #{c['index']}"
        steps = []
        if c["kind"] == "select":
            original = c["selected"]
            order = [i for i in range(len(c["options"])) if i != original] + ([original] if original >= 0 else [])
            steps = [(repr(c["options"][i]), (lambda i=i: loc.select_option(index=i))) for i in order]
        elif c["kind"] == "checkbox":
            steps = [("on" if not c["checked"] else "off", loc.click), ("off" if not c["checked"] else "on", loc.click)]
        elif c["kind"] == "slider":
            first = "ArrowLeft" if c["value"] >= c["max"] else "ArrowRight"
            steps = [(key_name, (lambda k=key_name: (loc.focus(), page.keyboard.press(k))))
                     for key_name in (first, "End", "Home")]
        elif c["kind"] == "play":
            steps = [("play", loc.locator("button").first.click)]
        elif c["kind"] == "text":
            # Not the sentence the hostile-text test routed: routing that one again draws the same
            # figure, so the button after this box would have nothing to change.
            steps = [("'what a lovely evening'", lambda: loc.fill("what a lovely evening"))]
        elif c["kind"] == "button":
            steps = [("click", loc.click)]
        log_state = {"label": c["label"], "checked": c.get("checked")} if (
            c["kind"] == "checkbox" and "log" in c["label"].lower()) else None
        for value, act in steps:
            when = f"{prefix}{c['kind']} {label!r} → {value}"
            before = loc.get_attribute("aria-valuenow") if c["kind"] == "slider" else None
            stamps = _change(page, report, act, quiet_ms=1200 if c["kind"] == "play" else 250)
            if c["kind"] == "slider" and loc.get_attribute("aria-valuenow") == before and not (
                    (value == "Home" and c["value"] == c["min"]) or (value == "End" and c["value"] == c["max"])):
                report.add(tab, when, "", f"the slider did not move (value {before})")
            elif c["kind"] not in ("text",) and not stamps["changed"]:
                report.add(tab, when, "", "the page did not change at all")
            if log_state is not None:
                log_state["checked"] = loc.is_checked()
            look(page, report, tab, when, log_state=log_state)
            if c["kind"] == "slider":
                c["value"] = float(loc.get_attribute("aria-valuenow") or 0)

    sweep_new("")


def run_pass(page, report: Report, *, full: bool, shots: str) -> None:
    page.mouse.move(0, 0)
    titles = _lab.tab_titles(page)
    n = titles.count()
    assert n >= 5, f"the dashboard shows {n} tabs: {titles.all_inner_texts()}"
    for i in range(n):
        tab = open_tab(page, i)
        look(page, report, tab, "tab opened")
        screenshot(page, f"{shots}_{_lab.slug(tab)}")
        sweep_tab(page, report, tab, full=full, shots=shots)
    open_tab(page, 0)


# ------------------------------------------------------------------------------------------ tests


def test_dashboard_renders_with_the_kernels_traces(lab):
    """The first figure arrives with the traces the kernel built (they follow the empty figure)."""
    page = lab.page
    assert lab.traces > 0
    page.wait_for_function("([sel, n]) => { const el = document.querySelector(sel); "
                           "return !!el && !!el.data && el.data.length === n; }",
                           arg=[f"{SCOPE} .js-plotly-plot", lab.traces], timeout=90_000)
    assert page.locator(f"{SCOPE} .js-plotly-plot g.trace").count() >= 1
    titles = _lab.tab_titles(page).all_inner_texts()
    for want in ("Routers", "Experts", "Spectra", "Diagnosis", "Timeline", "Budget"):
        assert any(want in t for t in titles), titles
    # The README's picture (docs/dashboard.png is copied from it): the dashboard as first drawn.
    screenshot(page, "dashboard")
    shot = OUT / "dashboard.png"
    assert shot.stat().st_size < 300_000 or _shrink(shot) < 300_000


def _shrink(path: Path) -> int:
    """Re-save a screenshot smaller when it is over budget (README images stay under 300 KB)."""
    if shutil.which("convert"):
        subprocess.run(["convert", str(path), "-resize", "75%", str(path)], check=False)
    return path.stat().st_size


# What of the hostile texts must show as text (tick labels may shorten a token with an ellipsis).
HOSTILE_SHOWN = {"label": "<img src=x onerror", "token": "<script"}


def _hostile_seen(page) -> set[str]:
    text = page.evaluate("s => document.querySelector(s).textContent", DASH)
    return {k for k, v in HOSTILE_SHOWN.items() if v in text}


def test_hostile_text_is_shown_literally_and_runs_nothing(lab):
    """A label and a token that are HTML show as text in the views of the Routers tab and in the
    live routing of a typed sentence; nothing of them runs, no element is made of them."""
    page = lab.page
    seen: set[str] = set()
    try:
        open_tab(page, 0)
        report = Report("hostile text")
        for c in page.evaluate(_lab.CONTROLS, SCOPE):
            if c["kind"] == "text":
                _change(page, report, lambda c=c: _lab.control(page, SCOPE, c).fill("a lovely day"))
            elif c["kind"] == "button" and not c["disabled"]:
                _change(page, report, _lab.control(page, SCOPE, c).click)
            elif c["kind"] == "toggles":
                for i, ok in enumerate(c["enabled"]):
                    if ok:
                        _change(page, report, _lab.control(page, SCOPE, c).locator("button").nth(i).click)
                        seen |= _hostile_seen(page)
                        assert page.evaluate("window.__xss") is None
                _change(page, report, _lab.control(page, SCOPE, c).locator("button").nth(max(c["selected"], 0)).click)
            seen |= _hostile_seen(page)
        assert page.evaluate("window.__xss") is None, "hostile text from the data ran as script"
        assert page.locator("img[src='x']").count() == 0, "a label became an <img> element"
        assert page.locator(f"{DASH} script").count() == 0, "a token became a <script> element"
        assert "label" in seen, "the hostile label never showed as text in the Routers tab"
        assert "token" in seen, "the hostile token never showed as text in the Routers tab (views and live routing)"
        page.screenshot(path=str(OUT / "dashboard_live.png"))
    except Exception:
        _save_failure(page, "hostile_text")
        raise


def _pass(page, name: str, *, full: bool, shots: str) -> Report:
    report = Report(name)
    started = time.perf_counter()
    try:
        run_pass(page, report, full=full, shots=shots)
    except Exception:
        _save_failure(page, shots)
        raise
    finally:
        print(f"\n[{name}] {time.perf_counter() - started:.0f} s")
    assert page.evaluate("window.__xss") is None, "hostile text from the data ran as script"
    if report.problems:
        _save_failure(page, shots)
    return report


def test_every_control_1280x720_side_panel_open(lab):
    """JupyterLab's default at 1280×720: the file browser open beside the notebook."""
    page = lab.page
    _lab.set_left_sidebar(page, True)
    _pass(page, "1280×720, side panel open, every control", full=True, shots="dashboard").assert_clean()


@pytest.mark.full  # make test-full: the sweep above at 1280×720 is the one `make test` runs
def test_every_tab_1280x720_side_panel_closed(lab):
    """The same page after Ctrl+B closed the side panel: the notebook (and the dashboard) widen."""
    page = lab.page
    _lab.set_left_sidebar(page, False)
    _lab.quiet(page, 300)
    _lab.fitted(page)
    try:
        report = _pass(page, "1280×720, side panel closed, then open again", full=False,
                       shots="dashboard_panel_closed")
    finally:
        _lab.set_left_sidebar(page, True)
        _lab.quiet(page, 300)
    # The panel open again: the notebook narrows under figures drawn for the wider one.
    for i in range(_lab.tab_titles(page).count()):
        tab = open_tab(page, i)
        _lab.fitted(page)
        look(page, report, tab, "side panel opened again")
    report.assert_clean()


@pytest.mark.full
def test_every_tab_1920x1080(lab):
    """A fresh page at 1920×1080 (the notebook run again in the same kernel)."""
    page = lab.open(1920, 1080)
    _pass(page, "1920×1080, side panel open", full=False, shots="dashboard_1920").assert_clean()


# ------------------------------------------------------------------------- the experts over training
# TimelinePlayer's experts view: the dashboard's Timeline tab (one run), then a player of two
# named runs in a notebook of its own (its own kernel, a fresh JupyterLab workspace).

PLAYER_SCOPE = ".lab-player"
PLAYER_RUNS = ["run A", "<b>run</b>"]  # the second run's name is HTML: its panel title shows it as text

PLAYER = f"""import json, torch, transformers, lily_lab as ll
from lily_lab.widgets import TimelinePlayer
g = torch.Generator().manual_seed(0)
probe = {{"input_ids": torch.randint(0, 100, (4, 10), generator=g)}}
tls = {{}}
for seed, run in enumerate({PLAYER_RUNS!r}):
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                           num_attention_heads=4, intermediate_size=64)).eval()
    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="token", init_weights=False))
    tls[run] = ll.Timeline(probe)
    for step in range(0, 50, 10):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_((0.02 + 0.05 * seed) * torch.randn(p.shape, generator=g))
        tls[run].observe(model, step)
player = TimelinePlayer(tls)
player.add_class({PLAYER_SCOPE[1:]!r})
print("PLAYER", len(player.trajectories.figure.data))
player"""

# The experts figure as the page holds it: its traces by legend group, the now markers' x, the
# drawn panel titles (annotations) and axis titles.
EXPERTS_FIGURE = """
(sel) => {
  for (const el of document.querySelectorAll(sel + ' .js-plotly-plot')) {
    const title = (el.layout && el.layout.title && el.layout.title.text) || '';
    if (!title.includes('the experts over training')) continue;
    const words = e => (e.textContent || '').replace(/[\\s\\u200b]+/g, ' ').trim();
    const data = el.data || [];
    return {title, drawnTitle: Array.from(el.querySelectorAll('.infolayer .gtitle')).map(words).join(' '),
            lines: data.filter(t => String(t.legendgroup || '').startsWith('expert ')).length,
            now: data.filter(t => t.legendgroup === 'now').map(t => Array.from(t.x || []).map(Number)),
            panels: Array.from(el.querySelectorAll('.infolayer .annotation-text')).map(words),
            boldInPanels: el.querySelectorAll('.infolayer .annotation b, .infolayer .annotation [style*="bold"]').length,
            axisTitles: Array.from(el.querySelectorAll('.infolayer [class^="g-x"][class$="title"], '
                                                       + '.infolayer [class^="g-y"][class$="title"]')).map(words)};
  }
  return null;
}
"""


def _kernel_json(page, code: str):
    out = page.evaluate(PROBE, f"import json; print(json.dumps({code}))")
    assert out and not out.startswith("ERROR"), out
    return json.loads(out.strip().splitlines()[-1])


def _near(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b))


def _experts_checks(page, report: Report, scope: str, where: str, *, runs: int, experts: int, now_of: str,
                    shots: str, dash: str) -> None:
    """The experts figure under ``scope``: drawn title and PC axis titles, one line per expert
    per run and a now marker per run, everything inside the figure (``look``); the step slider
    (Home, End) moves the markers to the kernel's values; the bank dropdown redraws it."""
    def figure_checks(when: str) -> dict:
        figs = page.evaluate(_lab.FIGURES, scope)
        check_figures(figs, _kernel(page) if dash == DASH else None, report, where, when)
        check_layout(page.evaluate(_lab.LAYOUT, dash), report, where, when)
        fig = page.evaluate(EXPERTS_FIGURE, scope)
        if fig is None:
            report.add(where, when, "", "no experts figure ('… the experts over training') is shown")
            return {}
        if "the experts over training" not in fig["drawnTitle"]:
            report.add(where, when, fig["title"], f"the drawn title is {fig['drawnTitle']!r}")
        titles = fig["axisTitles"]
        if len(titles) != 2 * runs or not all(re.fullmatch(r"PC[12] \((<1|>99|\d+) % of the spread\)", t)
                                              for t in titles):
            report.add(where, when, fig["title"], f"axis titles {titles} (want PC1/PC2 with their share, "
                                                  f"{2 * runs} of them)")
        if fig["lines"] != runs * experts or len(fig["now"]) != runs:
            report.add(where, when, fig["title"], f"{fig['lines']} expert lines and {len(fig['now'])} now markers "
                                                  f"(want {runs * experts} and {runs})")
        return fig

    fig = figure_checks("view opened")
    sliders = [c for c in page.evaluate(_lab.CONTROLS, scope) if c["kind"] == "slider" and c["label"] == "step"]
    assert sliders, "no step slider"
    handle = _lab.control(page, scope, sliders[0])
    bank = _kernel_json(page, f"{now_of}.bank.value")
    for key, step in (("Home", "min"), ("End", "max")):
        _change(page, report, lambda k=key: (handle.focus(), page.keyboard.press(k)))
        fig = figure_checks(f"slider → {key}")
        want = _kernel_json(page, f"[ll.plots.experts.trajectory_now(ll.timeline_expert_trajectories("
                                  f"{now_of}.banked if {now_of}.multi else {now_of}.timeline, group={bank!r}), "
                                  f"{step}({now_of}.step.options))[i]['x'] for i in range({runs})]")
        if fig and not all(_near(a, b) for a, b in zip(fig["now"], want)):
            report.add(where, f"slider → {key}", fig["title"], f"the now markers are at x {fig['now']}, the kernel's "
                                                                f"at {want}")
        if key == "Home":
            screenshot_of(page, dash, f"{shots}_first_step")
    selects = [c for c in page.evaluate(_lab.CONTROLS, scope) if c["kind"] == "select" and c["label"] == "bank"]
    assert selects and len(selects[0]["options"]) == 2, selects
    other = selects[0]["options"][1 - selects[0]["selected"]]
    _change(page, report, lambda: _lab.control(page, scope, selects[0]).select_option(index=1 - selects[0]["selected"]))
    fig = figure_checks(f"bank → {other!r}")
    if fig and not _plain(fig["title"]).startswith(other):
        report.add(where, f"bank → {other!r}", fig["title"], f"the figure is not of the chosen bank {other!r}")
    screenshot_of(page, dash, shots)
    _change(page, report, lambda: _lab.control(page, scope, selects[0]).select_option(index=selects[0]["selected"]))


def test_timeline_player_experts_view(lab):
    """The experts' trajectories in the player: in the dashboard's Timeline tab (one run, 3
    experts), then in a player of two named runs (a panel each). Screenshots:
    ``timeline_experts.png`` and ``timeline_experts_first_step.png`` (the dashboard),
    ``timeline_player_runs.png`` and ``timeline_player_runs_first_step.png`` (two runs)."""
    page = lab.page
    report = Report("timeline experts")
    try:
        titles = _lab.tab_titles(page).all_inner_texts()
        open_tab(page, next(i for i, t in enumerate(titles) if "Timeline" in t))
        _experts_checks(page, report, SCOPE, "Timeline", runs=1, experts=3, now_of="dash.timeline",
                        shots="timeline_experts", dash=DASH)
        open_tab(page, 0)
    except Exception:
        _save_failure(page, "timeline_experts")
        raise
    # Two runs: a notebook of their own.
    player = _own_notebook(lab, "player", PLAYER)
    try:
        _run_all(player)
        printed = player.wait_for_selector(".jp-OutputArea-output:has-text('PLAYER')", timeout=300_000).inner_text()
        assert printed.split()[-1] == str(2 * 3 + 2), printed
        player.wait_for_selector(f"{PLAYER_SCOPE} .js-plotly-plot .main-svg", timeout=90_000)
        state = _lab.install(player, PLAYER_SCOPE)
        assert state["ok"] and state["kernel"], state
        _lab.quiet(player, 500)
        _lab.fitted(player, PLAYER_SCOPE)
        _experts_checks(player, report, PLAYER_SCOPE, "player of two runs", runs=2, experts=3, now_of="player",
                        shots="timeline_player_runs", dash=PLAYER_SCOPE)
        fig = player.evaluate(EXPERTS_FIGURE, PLAYER_SCOPE)
        assert fig["panels"] == PLAYER_RUNS, fig["panels"]  # the HTML run name as its characters
        assert fig["boldInPanels"] == 0
        assert player.evaluate("window.__xss") is None
    except Exception:
        _save_failure(player, "timeline_player")
        raise
    finally:
        player.close()
    report.assert_clean()


def _own_notebook(lab, name: str, source: str):
    """A page of its own showing ``<name>.ipynb``, one cell of ``source`` written through the
    server's contents API, in a workspace of its own (JupyterLab would otherwise reopen the
    dashboard beside it), its kernel idle."""
    import urllib.request

    nb = OUT / f"_{name}.ipynb"
    _lab.write_notebook(nb, [source], hide_sources=True)
    body = json.dumps({"type": "notebook", "format": "json", "content": json.loads(nb.read_text())}).encode()
    nb.unlink()
    urllib.request.urlopen(urllib.request.Request(f"{lab.url}/api/contents/{name}.ipynb", data=body, method="PUT",
                                                  headers={"Content-Type": "application/json"}), timeout=30)
    page = lab.browser.new_page(viewport={"width": 1280, "height": 720})
    try:
        page.goto(f"{lab.url}/lab/workspaces/{name}/tree/{name}.ipynb?reset")
        page.wait_for_selector(".jp-Notebook", timeout=90_000)
        page.wait_for_selector(_lab.IDLE, timeout=90_000)
    except Exception:
        page.close()
        raise
    return page


def _run_all(page) -> None:
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item:has-text('Run All Cells')")


# ------------------------------------------------------------------------- a mixture-of-experts model
# RoutingDashboard on a tiny random Mixtral (4 layers, top-2 of 4 experts; layer 2's router steered
# to send every token to expert 2): no adapter, so only the Routers and Diagnosis tabs. A notebook
# of its own (its own kernel, a fresh JupyterLab workspace), as the player's above.

MOE = """import json, re, torch, transformers, plotly.graph_objects as go, lily_lab as ll
from lily_lab.widgets import RoutingDashboard
cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                 num_experts_per_tok=2)
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, 64, (3, 7), generator=g)
with torch.no_grad():
    for s in ll.router_sites(model):
        s.layer.weight.normal_(0, 0.5)
    seen = []
    gate = model.model.layers[2].mlp.gate
    hook = gate.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    model(input_ids=ids)
    hook.remove()
    gate.weight[2] = 100 * torch.linalg.lstsq(seen[0], torch.ones(len(seen[0]), 1)).solution[:, 0]
with ll.record_routing(model) as rec, torch.no_grad():
    model(input_ids=ids)
    rec.annotate(labels=["pos", %r, "neg"])
dash = RoutingDashboard(model, rec.routing)
""" % XSS_LABEL + SETUP[SETUP.index("def _lab_probe"):] + """
print("MOE", len(dash.children))
dash"""


def test_moe_dashboard_routers_and_diagnosis(lab):
    """Both tabs of a mixture-of-experts model's dashboard, every toggle view of Routers (the
    "tokens sent" view first), read back as the Lily dashboard's are. Screenshots:
    ``moe_dashboard_<tab>.png`` and ``moe_dashboard_<tab>_<view>.png``."""
    page = _own_notebook(lab, "moe", MOE)
    report = Report("mixture of experts")
    try:
        _run_all(page)
        printed = page.wait_for_selector(".jp-OutputArea-output:has-text('MOE')", timeout=300_000).inner_text()
        assert printed.split()[-1] == "2", printed
        page.wait_for_selector(f"{SCOPE} .js-plotly-plot .main-svg", timeout=90_000)
        state = _lab.install(page)
        assert state["ok"] and state["kernel"], state
        _lab.quiet(page, 500)
        _lab.fitted(page)
        assert [t.strip() for t in _lab.tab_titles(page).all_inner_texts()] == ["Routers", "Diagnosis"]
        assert "No low-rank update in this model" in page.locator(DASH).first.inner_text()
        for i in range(2):
            tab = open_tab(page, i)
            look(page, report, tab, "tab opened")
            screenshot(page, f"moe_dashboard_{_lab.slug(tab)}")
            sweep_tab(page, report, tab, full=False, shots="moe_dashboard")
        drawn = page.locator(DASH).first.inner_text()
        assert "layer 2 of 4: expert 2 takes 100% of the tokens" in drawn
        assert page.evaluate("window.__xss") is None
    except Exception:
        _save_failure(page, "moe_dashboard")
        raise
    finally:
        page.close()
    report.assert_clean()
