"""JupyterLab + headless Chromium for the browser test and the browser benchmark.

``jupyterlab_server(root)`` starts ``jupyter-lab`` (its own binary, on 127.0.0.1, no token, its
own settings folder) and stops it by its PID; ``launch(playwright)`` starts Debian's Chromium;
``open_notebook(page, url, name)`` opens a notebook, runs all its cells and waits for a printed
line. The JavaScript below reads what a person sees of an ipywidgets dashboard in the page:
every visible plotly figure (titles, axes, drawn marks, shapes), horizontal overflow, cut button
text, blank dropdowns, and the controls that can be changed.

Imported by ``tests/test_browser.py`` (pytest puts ``tests/`` on ``sys.path``) and by
``benchmarks/bench_browser.py`` (which adds ``tests/`` itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output"
# The dashboard in the page: ipywidgets' Tab. Its visible page is the tab contents' shown child.
DASH = ".widget-tab"
VISIBLE_TAB = ".widget-tab-contents > :not(.lm-mod-hidden)"


def require_chromium() -> None:
    """Skip when Debian's Chromium is not installed; fail in CI, where `make test` installs it."""
    import pytest

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: `make test` should have installed Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (make test installs it when run as root)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path, cells: list[str], *, hide_sources: bool = False) -> None:
    """A notebook of code ``cells`` (sources collapsed when ``hide_sources``: the page then
    shows the outputs only, as a person reading a dashboard would have it)."""
    meta = {"jupyter": {"source_hidden": True}} if hide_sources else {}
    nb_cells = [{"cell_type": "code", "metadata": meta, "source": src, "outputs": [], "execution_count": None}
                for src in cells]
    path.write_text(json.dumps({"cells": nb_cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}))


def stop_server(proc: subprocess.Popen, log) -> None:
    """Stop a server started by a test (SIGTERM, then SIGKILL after 15 s) and close its log."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


@contextlib.contextmanager
def jupyterlab_server(root: Path, *, timeout: float = 90) -> Iterator[str]:
    """A JupyterLab server on 127.0.0.1 serving ``root``; yields its base URL. Stopped by its PID
    at the end, also on failure. Its settings (no news, no update checks) live under ``root``."""
    lab = Path(sys.executable).parent / "jupyter-lab"
    port = free_port()
    settings = root / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log_path = root / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(lab), "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.token=",
         "--ServerApp.password=", f"--ServerApp.root_dir={root}", "--ServerApp.disable_check_xsrf=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         # window.jupyterapp: the page can follow the kernel's messages (when a change is done)
         "--LabApp.expose_app_in_browser=True"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTERLAB_SETTINGS_DIR": str(root / "settings")})
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"JupyterLab did not start:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc, log)


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


IDLE = "text=Python 3 (ipykernel) | Idle"


def open_notebook(page, url: str, name: str, printed: str, *, timeout_ms: int = 300_000) -> str:
    """Open ``name``, run all cells, wait for an output containing ``printed``; its text."""
    page.goto(f"{url}/lab/tree/{name}")
    page.wait_for_selector(".jp-Notebook", timeout=90_000)
    page.wait_for_selector(IDLE, timeout=90_000)
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item:has-text('Run All Cells')")
    sel = f".jp-OutputArea-output:has-text('{printed}')"
    page.wait_for_selector(sel, timeout=timeout_ms)
    return page.inner_text(sel)


def left_sidebar_open(page) -> bool:
    return page.evaluate("() => { const p = document.querySelector('#jp-left-stack');"
                         " return !!p && !p.classList.contains('lm-mod-hidden') && p.offsetWidth > 0; }")


def set_left_sidebar(page, want_open: bool) -> None:
    """Open or close JupyterLab's left side panel (the file browser) as a person does: Ctrl+B
    (View → Show Left Sidebar)."""
    want = "true" if want_open else "false"
    for _ in range(2):
        if left_sidebar_open(page) == want_open:
            return
        page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})  # focus the notebook, not an input
        page.keyboard.press("Escape")
        page.keyboard.press("Control+b")
        try:
            page.wait_for_function(f"() => {{ const p = document.querySelector('#jp-left-stack');"
                                   f" return (!!p && !p.classList.contains('lm-mod-hidden') && p.offsetWidth > 0)"
                                   f" === {want}; }}", timeout=5_000)
        except Exception:  # noqa: BLE001 — try the left bar's file browser tab instead
            page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab").first.click()
    if left_sidebar_open(page) != want_open:
        raise RuntimeError(f"could not {'open' if want_open else 'close'} the left side panel")


# ------------------------------------------------------------------------------------- page JS
# Installed once per dashboard: a MutationObserver that stamps the time of the last change under
# the dashboard (and, apart, of the last change inside a plotly figure); a capture listener that
# stamps the first input event after arm() (the moment a person changed a control); and a
# listener on the kernel's messages (window.jupyterapp) that keeps the shell requests not yet
# answered by an "idle" status, so a wait knows the kernel has finished the change.
INSTALL = """
(dash) => {
  const root = document.querySelector(dash);
  if (!root) return {ok: false};
  const L = window.__lab = window.__lab || {pending: new Map(), sentAt: 0, idleAt: 0, t0: null, armed: false};
  if (L.root !== root) {
    L.root = root;
    L.last = L.lastFig = performance.now();
    if (L.observer) L.observer.disconnect();
    L.lastOther = L.last;
    L.observer = new MutationObserver(records => {
      const now = performance.now();
      L.last = now;
      for (const r of records) {
        const t = r.target.nodeType === 1 ? r.target : r.target.parentElement;
        if (!t || !t.closest) continue;
        if (!(L.target && L.target.contains(t))) L.lastOther = now;
        if (t.closest('.js-plotly-plot')) L.lastFig = now;
      }
    });
    L.observer.observe(root, {subtree: true, childList: true, attributes: true, characterData: true});
  }
  if (!L.listening) {
    L.listening = true;
    for (const type of ['pointerdown', 'mousedown', 'keydown', 'input', 'change', 'click'])
      window.addEventListener(type, ev => {
        if (!L.armed) return;
        L.armed = false; L.t0 = performance.now();
        const t = ev.target && ev.target.closest ? ev.target : null;
        // the control itself (its own look changes at once): the widget around the event's target
        L.target = t ? (t.closest('.widget-toggle-buttons, .widget-inline-hbox, .widget-play, button') || t) : null;
      }, true);
  }
  const app = window.jupyterapp;
  let kernel = null;
  if (app) for (const w of app.shell.widgets('main')) {
    const s = w.sessionContext && w.sessionContext.session;
    if (s && s.kernel) { kernel = s.kernel; break; }
  }
  if (kernel && L.kernel !== kernel) {
    L.kernel = kernel;
    kernel.anyMessage.connect((_, args) => {
      const msg = args.msg, now = performance.now();
      if (args.direction === 'send' && msg.channel === 'shell') {
        L.pending.set(msg.header.msg_id, now); L.sentAt = now;
      } else if (args.direction === 'recv' && msg.channel === 'iopub' && msg.header.msg_type === 'status'
                 && msg.content.execution_state === 'idle' && msg.parent_header) {
        L.pending.delete(msg.parent_header.msg_id); L.idleAt = now;
      }
    });
  }
  return {ok: true, kernel: !!kernel};
}
"""

ARM = "() => { const L = window.__lab; L.armed = true; L.t0 = null; }"

# True once the change was made (t0), its message went to the kernel (or `noop` ms passed
# without one), the kernel answered every request, and nothing under the dashboard changed
# for `quiet` ms.
SETTLED = """
([quiet, noop]) => {
  const L = window.__lab;
  if (!L || L.t0 === null) return false;
  const now = performance.now();
  for (const [id, t] of L.pending) if (now - t > 60000) L.pending.delete(id);
  if (!(L.sentAt > L.t0) && now - L.t0 < noop) return false;
  return L.pending.size === 0 && now - L.last >= quiet && now - L.t0 >= quiet;
}
"""

STAMPS = """
() => { const L = window.__lab;
  return {t0: L.t0, sent: L.sentAt > L.t0, changed: L.lastOther > L.t0, figure: L.lastFig > L.t0,
          figure_ms: L.lastFig > L.t0 ? L.lastFig - L.t0 : null, page_ms: L.last > L.t0 ? L.last - L.t0 : null,
          idle_ms: L.idleAt > L.t0 ? L.idleAt - L.t0 : null}; }
"""


def install(page, dash: str = DASH) -> dict:
    return page.evaluate(INSTALL, dash)


def arm(page) -> None:
    """The next input event in the page (a click, a key, a selection) is the change to time."""
    page.evaluate(ARM)


def settle(page, *, quiet_ms: int = 250, noop_ms: int = 1500, timeout_ms: int = 60_000) -> dict:
    """Wait for the change made after ``arm()`` to be done: the kernel answered, the page quiet.
    Returns the stamps (ms after the change): ``figure_ms`` the last change inside a figure,
    ``page_ms`` the last change anywhere under the dashboard, ``idle_ms`` the kernel's last idle."""
    page.wait_for_function(SETTLED, arg=[quiet_ms, noop_ms], timeout=timeout_ms, polling=50)
    return page.evaluate(STAMPS)


QUIET = """
(quiet) => { const L = window.__lab, now = performance.now();
  for (const [id, t] of L.pending) if (now - t > 60000) L.pending.delete(id);
  return L.pending.size === 0 && now - L.last >= quiet; }
"""


FITTED = """
(sel) => Array.from(document.querySelectorAll(sel + ' .js-plotly-plot')).filter(e => e.offsetWidth > 0)
  .every(e => { const svg = e.querySelector('.main-svg');
                return !!svg && Math.abs(svg.getBoundingClientRect().width - e.parentElement.clientWidth) <= 2; })
"""


def fitted(page, sel: str = DASH, timeout_ms: int = 20_000) -> None:
    """Wait until every shown figure under ``sel`` is as wide as its box. A change of the page
    around the dashboard (the side panel) reaches the figures through the kernel, which
    ``quiet`` cannot see coming; a figure that never fits is reported by the checks after this."""
    try:
        page.wait_for_function(FITTED, arg=sel, timeout=timeout_ms, polling=50)
    except Exception:  # noqa: BLE001 — the checks that follow name the figure that does not fit
        pass


def quiet(page, ms: int = 250, timeout_ms: int = 60_000) -> None:
    """Wait until the kernel answered everything and nothing under the dashboard changed for ``ms``."""
    page.wait_for_function(QUIET, arg=ms, timeout=timeout_ms, polling=50)


# What a person sees of every visible plotly figure under `sel`: titles as drawn, each axis in use
# (type, title as drawn, tick labels drawn), the kinds of values each trace carries, the marks in
# the SVG, shapes (layout, full layout, drawn), and the parts of the figure that stick out of the
# SVG or out of the box around it.
FIGURES = """
(sel) => {
  const scope = document.querySelector(sel);
  if (!scope) return [];
  const shown = e => !!e && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
  const words = e => (e.textContent || '').replace(/[\\s\\u200b]+/g, ' ').trim();
  const numeric = v => typeof v === 'number' || (typeof v === 'string' && v.trim() !== '' && !isNaN(Number(v)));
  const out = [];
  for (const el of scope.querySelectorAll('.js-plotly-plot')) {
    if (!shown(el)) continue;
    const fl = el._fullLayout || {}, lay = el.layout || {};
    const title = (lay.title && (typeof lay.title === 'string' ? lay.title : lay.title.text)) || '';
    const drawnTitle = Array.from(el.querySelectorAll('.infolayer .gtitle')).map(words).join(' ').trim();
    const subplots = fl._subplots || {};
    const axes = [];
    for (const letter of ['x', 'y']) {
      for (const id of (subplots[letter + 'axis'] || [])) {
        const name = letter + 'axis' + id.slice(1);
        const ax = fl[name];
        if (!ax) continue;
        axes.push({name, id, visible: ax.visible !== false, type: ax.type,
                   title: Array.from(el.querySelectorAll('.g-' + id + 'title')).map(words).join(' ').trim(),
                   layoutTitle: (lay[name] && lay[name].title && (lay[name].title.text || '')) || '',
                   ticks: el.querySelectorAll('g.' + id + 'tick text').length,
                   showticklabels: ax.showticklabels !== false, categories: (ax._categories || []).length,
                   range: Array.isArray(ax.range) ? ax.range.map(Number) : null,
                   userRange: !!(lay[name] && lay[name].range)});
      }
    }
    const values = (t, k) => {
      let v = t[k];
      if (v === undefined || v === null) return [];
      v = ArrayBuffer.isView(v) ? Array.from(v) : (Array.isArray(v) ? v : [v]);
      return v.flat ? v.flat() : v;
    };
    const kinds = (t, k) => { const v = values(t, k).filter(x => x !== null && x !== undefined && x !== '');
      const nums = v.filter(numeric).map(Number).filter(Number.isFinite);
      return {n: v.length, text: v.filter(x => !numeric(x)).length,
              sample: v.filter(x => !numeric(x)).slice(0, 2).map(String),
              min: nums.length ? Math.min(...nums) : null, max: nums.length ? Math.max(...nums) : null}; };
    const traces = (el._fullData || []).filter(t => t.visible === true).map(t => ({
      type: t.type, name: String(t.name || ''), xaxis: t.xaxis || 'x', yaxis: t.yaxis || 'y',
      x: kinds(t, 'x'), y: kinds(t, 'y'), z: kinds(t, 'z').n, uid: t.uid,
      cartesian: !!(t._module && t._module.basePlotModule && t._module.basePlotModule.name === 'cartesian')}));
    const marks = Array.from(el.querySelectorAll(
      '.cartesianlayer .trace path, .cartesianlayer .trace image, .cartesianlayer .trace text, ' +
      '.heatmaplayer image, .pielayer path, .barlayer path, .boxlayer path')).filter(m => {
        if (m.tagName === 'path') { const d = m.getAttribute('d') || ''; return d && d !== 'M0,0Z' && !/^M[^A-Z]*Z?$/.test(d); }
        if (m.tagName === 'text') return !!words(m);
        return true; }).length;
    const svg = el.querySelector('.main-svg');
    const sb = svg ? svg.getBoundingClientRect() : null;
    // the box the figure sits in, as far as it is shown (the widget box may clip it)
    let clip = el.getBoundingClientRect();
    clip = {left: clip.left, right: clip.right, top: clip.top, bottom: clip.bottom};
    for (let a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      const cs = getComputedStyle(a);
      if (cs.overflowX !== 'visible') { const r = a.getBoundingClientRect();
        clip.left = Math.max(clip.left, r.left); clip.right = Math.min(clip.right, r.left + a.clientWidth); }
      if (a.classList.contains('widget-tab')) break;
    }
    const sticking = [];
    // a legend's box is its background rect (the group also holds entries scrolled out of it)
    const parts = [['title', '.infolayer .gtitle'], ['legend', '.infolayer .legend > rect.bg'],
                   ['colour bar', '.infolayer .colorbar'], ['x axis title', '.infolayer [class^="g-x"][class$="title"]'],
                   ['y axis title', '.infolayer [class^="g-y"][class$="title"]'],
                   ['tick labels', '.xaxislayer-above text, .yaxislayer-above text']];
    for (const [what, q] of parts) {
      for (const p of el.querySelectorAll(q)) {
        const r = p.getBoundingClientRect();
        if (!r.width || !words(p.closest('.legend') || p)) continue;
        const lo = Math.max(sb ? sb.left : -1e9, clip.left), hi = Math.min(sb ? sb.right : 1e9, clip.right);
        const tb = sb ? [sb.top, sb.bottom] : [-1e9, 1e9];
        if (r.left < lo - 2 || r.right > hi + 2 || r.top < tb[0] - 2 || r.bottom > tb[1] + 2) {
          sticking.push({what, text: words(p.closest('.legend') || p).slice(0, 50), left: Math.round(r.left), right: Math.round(r.right),
                         top: Math.round(r.top), bottom: Math.round(r.bottom), visibleLeft: Math.round(lo),
                         visibleRight: Math.round(hi)});
          break;
        }
      }
    }
    out.push({
      title, drawnTitle, axes, traces, marks, uids: (el.data || []).map(t => t.uid),
      traceCount: (el.data || []).length,
      shapesLayout: (lay.shapes || []).length,
      shapesFull: (fl.shapes || []).filter(s => s.visible !== false).length,
      shapesDrawn: el.querySelectorAll('.shapelayer path').length,
      svgWidth: sb ? Math.round(sb.width) : 0, containerWidth: el.parentElement ? el.parentElement.clientWidth : 0,
      width: Math.round(el.getBoundingClientRect().width), sticking,
    });
  }
  return out;
}
"""

# Horizontal overflow under the dashboard (and in its ancestors up to the notebook panel, where a
# too wide output shows a scrollbar), cut button and label text, blank dropdowns.
LAYOUT = """
(dash) => {
  const root = document.querySelector(dash);
  if (!root) return {missing: true};
  const shown = e => e.getClientRects().length > 0;
  const name = e => {
    const cls = (typeof e.className === 'string' ? e.className : '').split(/\\s+/)
      .filter(c => c && !/^(lm-mod|mod-|lm-Widget$|lm-Panel$|jupyter-widgets$)/.test(c)).slice(0, 3).join('.');
    return e.tagName.toLowerCase() + (cls ? '.' + cls : '');
  };
  const text = e => (e.innerText || e.textContent || '').replace(/[\\s\\u200b]+/g, ' ').trim().slice(0, 60);
  const overflow = [], cut = [], blank = [];
  const els = [root, ...root.querySelectorAll('*')];
  for (let a = root.parentElement; a; a = a.parentElement) {
    els.push(a);
    if (a.classList.contains('jp-NotebookPanel')) break;
  }
  for (const e of els) {
    if (e instanceof SVGElement || !shown(e)) continue;
    const cs = getComputedStyle(e);
    if (cs.overflowX !== 'visible' && e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
      overflow.push({el: name(e), scrollWidth: e.scrollWidth, clientWidth: e.clientWidth, overflowX: cs.overflowX,
                     text: text(e)});
  }
  for (const b of root.querySelectorAll('button, .widget-label, .widget-label-basic, label')) {
    if (!shown(b) || b.clientWidth === 0) continue;
    if (b.scrollWidth > b.clientWidth + 1)
      cut.push({el: name(b), text: text(b), scrollWidth: b.scrollWidth, clientWidth: b.clientWidth});
  }
  for (const s of root.querySelectorAll('select')) {
    if (!shown(s)) continue;
    const o = s.options[s.selectedIndex];
    if (!o || !(o.textContent || '').trim()) {
      const box = s.closest('.widget-inline-hbox') || s.parentElement;
      const l = box.querySelector('.widget-label');
      blank.push({label: l ? text(l) : '', options: s.options.length, selectedIndex: s.selectedIndex});
    }
  }
  const svgs = [];
  for (const el of root.querySelectorAll('.js-plotly-plot')) {
    if (!shown(el)) continue;
    const svg = el.querySelector('.main-svg');
    const c = el.parentElement;
    if (svg && c && svg.getBoundingClientRect().width > c.clientWidth + 1)
      svgs.push({title: (el.layout && el.layout.title && el.layout.title.text) || '',
                 svgWidth: Math.round(svg.getBoundingClientRect().width), containerWidth: c.clientWidth,
                 container: name(c)});
  }
  const box = root.getBoundingClientRect();
  return {overflow, cut, blank, svgs, right: Math.round(box.right), viewport: window.innerWidth};
}
"""

# The controls of the visible tab page under `sel`, in page order. `index` counts elements of
# that kind under `sel` (shown or not), for a locator's nth().
CONTROLS = """
(sel) => {
  const scope = document.querySelector(sel);
  if (!scope) return [];
  const shown = e => e.getClientRects().length > 0;
  const words = e => (e.textContent || '').replace(/[\\s\\u200b]+/g, ' ').trim();
  const label = e => {
    const w = e.closest('.widget-inline-hbox, .widget-toggle-buttons, .widget-select-multiple');
    const l = w && w.querySelector('.widget-label');
    return l ? words(l) : '';
  };
  const out = [];
  const all = (q, f) => scope.querySelectorAll(q).forEach((e, i) => { if (shown(e)) { const c = f(e, i); if (c) out.push(c); } });
  all('select', (s, i) => ({kind: 'select', index: i, label: label(s), disabled: s.disabled,
    options: Array.from(s.options).map(words), selected: s.selectedIndex, el: s}));
  all('.widget-toggle-buttons', (g, i) => ({kind: 'toggles', index: i, label: label(g), el: g,
    disabled: Array.from(g.querySelectorAll('button')).every(b => b.disabled),
    options: Array.from(g.querySelectorAll('button')).map(b => words(b) || b.title),
    enabled: Array.from(g.querySelectorAll('button')).map(b => !b.disabled),
    selected: Array.from(g.querySelectorAll('button')).findIndex(b => b.classList.contains('mod-active'))}));
  all('.widget-checkbox input[type=checkbox]', (c, i) => ({kind: 'checkbox', index: i, el: c,
    label: words(c.closest('.widget-checkbox')), disabled: c.disabled, checked: c.checked}));
  all('.widget-slider .noUi-handle', (h, i) => ({kind: 'slider', index: i, label: label(h), el: h,
    disabled: h.hasAttribute('disabled') || !!h.closest('[disabled]'),
    value: Number(h.getAttribute('aria-valuenow')), min: Number(h.getAttribute('aria-valuemin')),
    max: Number(h.getAttribute('aria-valuemax')), text: h.getAttribute('aria-valuetext') || ''}));
  all('.widget-play', (p, i) => ({kind: 'play', index: i, label: 'play', el: p,
    disabled: !!p.querySelector('button[disabled]')}));
  all('input[type=text], textarea', (t, i) => ({kind: 'text', index: i, label: t.placeholder || label(t), el: t,
    disabled: t.disabled}));
  all('button.widget-button', (b, i) => ({kind: 'button', index: i, el: b, label: words(b) || b.title,
    disabled: b.disabled}));
  // page order
  out.sort((a, b) => a.el === b.el ? 0 : (a.el.compareDocumentPosition(b.el) & Node.DOCUMENT_POSITION_FOLLOWING ? -1 : 1));
  return out.map(c => { delete c.el; return c; });
}
"""

# Locators for each kind of control, matching CONTROLS' `index` under a scope selector.
LOCATORS = {
    "select": "select",
    "toggles": ".widget-toggle-buttons",
    "checkbox": ".widget-checkbox input[type=checkbox]",
    "slider": ".widget-slider .noUi-handle",
    "play": ".widget-play",
    "text": "input[type=text], textarea",
    "button": "button.widget-button",
}


def control(page, scope: str, c: dict):
    return page.locator(f"{scope}").locator(LOCATORS[c["kind"]]).nth(c["index"])


def tab_titles(page, dash: str = DASH):
    return page.locator(f"{dash} > .lm-TabBar .lm-TabBar-tab")


def slug(text: str, limit: int = 32) -> str:
    out = "".join(ch.lower() if ch.isascii() and ch.isalnum() else "_" for ch in text)
    while "__" in out:
        out = out.replace("__", "_")
    return out.strip("_")[:limit].strip("_") or "x"
