"""The dashboard in a real browser: JupyterLab on 127.0.0.1, headless Chromium driven by Playwright.

Runs a notebook that builds ``LilyDashboard`` on a tiny model, checks the plotly figures render,
changes controls through the page and checks the figures change in the DOM, checks that data
text (labels, tokens) containing HTML runs nothing, and saves screenshots to ``test-output/``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUT = Path(__file__).resolve().parents[1] / "test-output"
XSS_LABEL = "<img src=x onerror=window.__xss=1>"
XSS_TOKEN = "<script>window.__xss=2</script>"

NOTEBOOK_CELLS = [
    """import torch, transformers, lily_lab as ll
from lily_lab.widgets import LilyDashboard
torch.manual_seed(0)
model = transformers.BertModel(transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=6,
                                                       num_attention_heads=4, intermediate_size=64)).eval()
ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="token", init_weights=False))""",
    f"""class Tok:  # a tokenizer whose tokens are hostile HTML
    def __call__(self, texts, return_tensors="pt"):
        ids = torch.tensor([[7, 8, 9]])
        return {{"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    def convert_ids_to_tokens(self, ids):
        return [{XSS_TOKEN!r} if i % 2 else f"tok{{i}}" for i in ids]
g = torch.Generator().manual_seed(0)
with ll.record_routing(model) as rec:
    for _ in range(4):
        model(input_ids=torch.randint(0, 100, (4, 10), generator=g), attention_mask=torch.ones(4, 10, dtype=torch.long))
        rec.annotate(labels=["pos", {XSS_LABEL!r}, "neg", "pos"])
dash = LilyDashboard(model, rec.routing, tokenizer=Tok())
print("TRACES", len(dash.router.pane.figure.data))
dash""",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path: Path) -> None:
    cells = [{"cell_type": "code", "metadata": {}, "source": src, "outputs": [], "execution_count": None}
             for src in NOTEBOOK_CELLS]
    path.write_text(json.dumps({"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}}))


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1, stopped by its PID at the end, also on failure."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing in CI: `make test` should have installed Debian's chromium")
        pytest.skip(f"{CHROMIUM} is not installed (make test installs it when run as root)")
    pytest.importorskip("playwright")
    lab = Path(sys.executable).parent / "jupyter-lab"
    port = _free_port()
    _notebook(tmp_path / "dashboard.ipynb")
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(lab), "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.token=",
         "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}", "--ServerApp.disable_check_xsrf=True",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")})
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"JupyterLab did not start:\n{(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _paths(page, selector: str) -> str:
    return page.eval_on_selector_all(selector, "els => els.map(e => e.getAttribute('d') || '').join('|')")


def test_dashboard_renders_and_reacts_in_jupyterlab(jupyterlab):
    from playwright.sync_api import sync_playwright

    OUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{jupyterlab}/lab/tree/dashboard.ipynb")
            page.wait_for_selector(".jp-Notebook", timeout=90_000)
            page.wait_for_selector("text=Python 3 (ipykernel) | Idle", timeout=90_000)
            page.click("li.lm-MenuBar-item:has-text('Run')")
            page.click("li.lm-Menu-item:has-text('Run All Cells')")
            printed = ".jp-OutputArea-output:has-text('TRACES')"
            page.wait_for_selector(printed, timeout=400_000)
            expected = int(page.inner_text(printed).split()[-1])
            router_plot = ".widget-tab-contents > :not(.lm-mod-hidden) .js-plotly-plot"
            page.wait_for_selector(f"{router_plot} .main-svg", timeout=90_000)

            # The figure rendered with the traces the kernel built (they arrive after the empty
            # figure widget itself).
            assert expected > 0
            page.wait_for_function("([sel, n]) => { const el = document.querySelector(sel); "
                                   "return !!el && !!el.data && el.data.length === n; }",
                                   arg=[router_plot, expected], timeout=90_000)
            assert page.locator(f"{router_plot} g.trace").count() >= 1
            dashboard = page.locator(".widget-tab").first
            dashboard.scroll_into_view_if_needed()
            dashboard.screenshot(path=str(OUT / "dashboard.png"))

            # A dropdown changed through the page changes the figure in the DOM.
            bars = f"{router_plot} g.trace path"
            before = _paths(page, bars)
            page.select_option(".widget-dropdown:has(label:text-is('layer')) select", label="4")
            page.wait_for_function(
                "([sel, old]) => Array.from(document.querySelectorAll(sel)).map(e => e.getAttribute('d') || '')"
                ".join('|') !== old", arg=[bars, before], timeout=90_000)
            assert "layer.4.attention.self.query" in page.inner_text(".widget-html:has-text('tokens ·')")

            # A view switch rebuilds the traces.
            page.click("button:has-text('usage by label')")
            page.wait_for_function("sel => document.querySelector(sel).data.some(t => t.type === 'bar' && "
                                   "(t.x || []).some(v => String(v).includes('onerror')))", arg=router_plot,
                                   timeout=90_000)

            # Hostile text from the data shows as text and runs nothing.
            page.fill("input[placeholder^='type a sentence']", "a lovely day")
            page.click("button:has-text('Route')")
            page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 2", timeout=90_000)
            time.sleep(1.0)
            assert page.evaluate("window.__xss") is None
            assert page.locator("img[src='x']").count() == 0
            body = page.inner_text("body")
            assert XSS_LABEL in body or XSS_LABEL in page.content().replace("&lt;", "<").replace("&gt;", ">")
            page.screenshot(path=str(OUT / "dashboard_live.png"), full_page=False)
        except Exception:
            page.screenshot(path=str(OUT / "failure.png"))
            (OUT / "failure.html").write_text(page.content())
            raise
        finally:
            browser.close()
    shot = OUT / "dashboard.png"
    assert shot.stat().st_size < 300_000 or _shrink(shot) < 300_000


def _shrink(path: Path) -> int:
    """Re-save a screenshot smaller when it is over budget (README images stay under 300 KB)."""
    if shutil.which("convert"):
        subprocess.run(["convert", str(path), "-resize", "75%", str(path)], check=False)
    return path.stat().st_size
