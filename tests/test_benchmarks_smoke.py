"""The benchmark suite at tiny sizes: it runs, prints a table with every row, and its side checks
(lily_lab against PEFT, spectra against a dense SVD, files that reload) hold — and fail when broken.
No timing is asserted: timings belong to ``python -m benchmarks``, not to unit tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `benchmarks` is a top-level folder, not an installed package

from benchmarks import bench_adapter_file, bench_llm, bench_record, bench_spectra, bench_training  # noqa: E402
from benchmarks._common import Settings  # noqa: E402

ROWS = [  # the start of each row's first cell, in order
    "training step (forward, backward, AdamW)",
    "same, sequence routing",
    "same, token routing",
    "same (batch routing), against LoRA with equal trainable parameters",
    "peak memory of a training step, token routing",
    "the adapter alone: 6 stacked",
    "eval forward under `record_routing`",
    "training step (forward, backward, AdamW), tiny random Llama, Lily on q_proj,v_proj",
    "same tiny random Llama step, causal routing",
    "same tiny random Llama step, token routing",
    "greedy `generate` under `record_routing` (tiny random Llama",
    "memory held by `record_routing` over",
    "`delta_spectra`, one",
    "adapter file, 12 layers, stride 4, num_B 4",
    "widget control update",
    "`make demo`, end to end",
]
SMOKE = Settings(smoke=True, repeats=2, warmup=1, threads=1)


def test_smoke_suite_prints_a_table_with_every_row():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "machine: " in out and "load average" in out and "SMOKE RUN" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    header, rows = table[0], table[1:]
    assert "ratio" in header and "target" in header and "met" in header and "load" in header
    assert len(rows) == len(ROWS), "\n".join(rows)
    for want, row in zip(ROWS, rows):
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[0].startswith(want), (want, row)
        assert len(cells) == len(header.strip("|").split(" | "))
    measured = rows[:14]  # the widget placeholder and the demo are not run by --smoke
    for row in measured:
        assert "×" in row, row  # every measured row has a ratio


def test_only_selects_sections_and_unknown_ones_are_refused():
    run = lambda *a: subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    done = run("--only", "spectra,adapter_file")
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 and rows[0].startswith("| `delta_spectra`") and rows[1].startswith("| adapter file")
    bad = run("--only", "trainig")
    assert bad.returncode == 2 and "unknown section" in bad.stderr and "training" in bad.stderr


def test_training_side_check_catches_different_weights(monkeypatch):
    """Without copying PEFT's weights over, the two sides differ and the benchmark refuses to time."""
    monkeypatch.setattr(bench_training, "copy_adapter", lambda source, dest: None)
    with pytest.raises(AssertionError, match="differs from PEFT"):
        bench_training.run(SMOKE)


def test_adapter_alone_side_check_catches_different_weights(monkeypatch):
    monkeypatch.setattr(bench_training, "copy_adapter", lambda source, dest: None)
    with pytest.raises(AssertionError, match="stack differs from PEFT"):
        bench_training.layers_row(SMOKE)


def test_spectra_side_check_catches_wrong_singular_values(monkeypatch):
    real = bench_spectra.delta_spectra

    def off(*args, **kwargs):
        frame = real(*args, **kwargs)
        frame["sigma"] = frame["sigma"] * 1.001
        return frame

    monkeypatch.setattr(bench_spectra, "delta_spectra", off)
    with pytest.raises(AssertionError, match="dense SVD"):
        bench_spectra.run(SMOKE)


def test_adapter_file_side_check_catches_a_load_that_changes_nothing(monkeypatch):
    monkeypatch.setattr(bench_adapter_file.ll, "load_adapter", lambda model, directory: model)
    with pytest.raises(AssertionError, match="other outputs than PEFT"):
        bench_adapter_file.run(SMOKE)


def test_record_side_check_catches_missing_tokens():
    import torch

    import lily_lab as ll
    from benchmarks._models import base_model, batch_for, with_lily

    model = with_lily(base_model(SMOKE)[0], SMOKE, "batch").eval()
    batch = batch_for(model, SMOKE)
    labels = batch.pop("labels")
    with torch.no_grad(), ll.record_routing(model) as rec:
        for _ in range(bench_record.CALLS - 1):  # one call short
            model(**batch)
            rec.annotate(labels=labels)
    with pytest.raises(AssertionError, match="recorded"):
        bench_record.check(model, batch, labels, rec.routing)


def test_llm_side_check_catches_different_weights(monkeypatch):
    """Without copying PEFT's weights over, lily_lab's LM loss differs and nothing is timed."""
    monkeypatch.setattr(bench_llm, "copy_adapter", lambda source, dest: None)
    with pytest.raises(AssertionError, match="differs from PEFT"):
        bench_llm.run(SMOKE)


def test_llm_record_check_catches_missing_tokens(monkeypatch):
    """A recording that holds other tokens than the generation should (here: fewer) is refused."""
    import lily_lab as ll

    model = ll.add_lily(bench_llm.tiny_llama(), ll.LilyConfig(bench_llm.TARGETS, routing="causal",
                                                               **bench_llm.ADAPTER)).eval()
    real = bench_llm.generate
    monkeypatch.setattr(bench_llm, "generate", lambda m, p, n: real(m, p, 1))  # one new token, not SMOKE's 4
    with pytest.raises(AssertionError, match="recorded"):
        bench_llm.record_row(model, "tiny", SMOKE)


@pytest.mark.full  # make test-full; tests/test_browser.py changes every control in make test
def test_browser_benchmark_smoke_times_every_control():
    """`--smoke --only browser`: JupyterLab + Chromium on a tiny model; both rows, and a time for
    each control (no target judged at smoke size)."""
    if not Path("/usr/bin/chromium").exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing in CI: `make test` should have installed Debian's chromium")
        pytest.skip("/usr/bin/chromium is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--only", "browser"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2, "\n".join(rows)
    assert rows[0].startswith("| dashboard control changed in the page") and rows[1].startswith("| `LilyDashboard(")
    assert "median" in rows[0] and "p90" in rows[0] and " s" in rows[1]
    timed = [line for line in done.stdout.splitlines() if line.startswith("- browser: ") and "median" in line]
    assert {"Routers", "Experts", "Spectra", "Diagnosis", "Budget"} <= {t.split()[2] for t in timed}


@pytest.mark.full  # make test-full: five MiniLM runs
def test_measure_remedies_prints_one_row_per_run(capsys):
    """The measurement behind diagnose's remedy text, at 64 tweets and 2 steps: every run trains
    and prints its two cosines and an accuracy (numbers at this size mean nothing)."""
    from benchmarks import measure_remedies

    measure_remedies.main(["--n-train", "64", "--epochs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line[:20].strip(): line[20:].split() for line in lines[2:]}
    assert list(rows) == list(measure_remedies.RUNS)
    for name, cells in rows.items():
        query, value, accuracy = (float(c) for c in cells[:3])
        assert -1 <= query <= 1 and -1 <= value <= 1 and 0 <= accuracy <= 1, name
