"""RoutingCallback's keys in real experiment trackers, no mocks: a Trainer run (the tiny BERT of
test_monitor.py, a few CPU steps) with ``report_to`` TensorBoard, MLflow or W&B, and what the
backend wrote read back with its own reader — TensorBoard's ``EventAccumulator``, MLflow's
``MlflowClient`` over a local file store, the protobuf records of an offline W&B run — against
``trainer.state.log_history`` (the callback copies its keys there as well).

Last, the README's TensorBoard picture: TensorBoard's own server over a longer run, its scalars
dashboard filtered to a few lily tags in headless Chromium, the page read back (the cards shown, their
lines and that none runs out of its plot) and saved as ``test-output/tensorboard_lily.png``
(``docs/tensorboard_lily.png`` is a copy of it). Without Chromium only that part skips.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

import _lab
import _trackers
import lily_lab as ll
from test_monitor import classifier, rows, trainer_args, transformers  # transformers: importorskip'd there

STEPS = [2, 4, 6]  # logging_steps=2, max_steps=6
WARNING = "lily/warning/redundant_experts"
# per="both" gives both key shapes: per site and per module (min / median / max across layers)
SOME_KEYS = {"lily/bert.encoder.layer.0.attention.self.query/load_entropy", "lily/query/load_entropy/min",
             "lily/query/load_entropy/median", "lily/value/load_entropy/max", "lily/query/expert_cosine",
             "lily/findings/redundant_experts"}


def train(tmp_path: Path, report_to: list[str], *, healthy: bool = True, n: int = 32, args: dict | None = None,
          **callback) -> dict[int, dict]:
    """A Trainer run reporting to ``report_to`` with a ``RoutingCallback(**callback)``; its logs of
    the logging steps, by step."""
    cb = ll.RoutingCallback(**callback)
    trainer = transformers.Trainer(model=classifier(healthy=healthy), train_dataset=rows(n), callbacks=[cb],
                                   args=trainer_args(tmp_path / "out", report_to=report_to, **(args or {})))
    order = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    reporter = {"tensorboard": "TensorBoardCallback", "mlflow": "MLflowCallback", "wandb": "WandbCallback"}
    assert all(order.index("RoutingCallback") < order.index(reporter[r]) for r in report_to)  # it sees the keys
    trainer.train()
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


def numbers(log: dict) -> dict:
    """The lily keys of a log whose values are numbers (``lily/warning/*`` is text)."""
    return {k: v for k, v in log.items() if k.startswith("lily/") and isinstance(v, (int, float))}


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard keeps scalars as float32


# ------------------------------------------------------------------------------------ TensorBoard


def accumulate(logdir: Path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})  # 0: keep every event
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_every_number_at_each_logging_step(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # TrainingArguments has no logging_dir now
    logged = train(tmp_path, ["tensorboard"], per="both")
    assert sorted(logged) == STEPS
    acc = accumulate(tmp_path / "tb")
    keys = set(numbers(logged[2]))
    assert SOME_KEYS <= keys and all(set(numbers(logged[s])) == keys for s in STEPS)
    # the TensorBoard callback writes every key of a log as "train/<key>"
    assert {t for t in acc.Tags()["scalars"] if t.startswith("train/lily/")} == {f"train/{k}" for k in keys}
    for key in keys:
        events = acc.Scalars(f"train/{key}")
        assert [(e.step, e.value) for e in events] == [(s, f32(logged[s][key])) for s in STEPS], key
    assert not [t for t in acc.Tags()["tensors"] if "lily" in t]  # a healthy model: no warning text


def test_tensorboard_gets_the_early_warning_as_a_text_summary_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.util import tensor_util

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    logged = train(tmp_path, ["tensorboard"], healthy=False, warn_after=2)
    acc = accumulate(tmp_path / "tb")
    assert [e.value for e in acc.Scalars("train/lily/findings/redundant_experts")] == [2.0] * 3  # both banks
    # a str value goes through SummaryWriter.add_text: a tensor "<tag>/text_summary" of the text plugin
    tag = f"train/{WARNING}/text_summary"
    assert [t for t in acc.Tags()["tensors"] if "lily" in t] == [tag]
    assert acc.SummaryMetadata(tag).plugin_data.plugin_name == "text"
    (event,) = acc.Tensors(tag)  # once: at the 2nd observation in a row
    assert event.step == 4
    text = tensor_util.make_ndarray(event.tensor_proto).item().decode()
    assert text == logged[4][WARNING] and text.startswith("critical: 2 banks")


# ----------------------------------------------------------------------------------------- MLflow


def test_mlflow_file_store_holds_every_number_under_its_own_name(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = f"file://{tmp_path}/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store without it
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_NESTED_RUN"):
        monkeypatch.delenv(name, raising=False)
    assert mlflow.active_run() is None
    try:
        logged = train(tmp_path, ["mlflow"], healthy=False, per="both", warn_after=2)
        assert mlflow.active_run() is None  # the MLflow callback ended the run it started
    finally:
        while mlflow.active_run() is not None:  # nothing left open for the tests that follow
            mlflow.end_run()
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    keys = set(numbers(logged[2]))
    assert SOME_KEYS <= keys
    # the MLflow callback replaces any character outside [0-9A-Za-z_-. :/] with "_": lily's keys
    # have none, so every one arrives under its own name, none dropped or renamed
    assert all(re.fullmatch(r"[0-9A-Za-z_\-. :/]+", k) for k in keys)
    assert {k for k in run.data.metrics if k.startswith("lily/")} == keys
    # the warning is text and MLflow metrics are numbers: the callback drops it (with a warning)
    assert WARNING in logged[4] and not any(k.startswith("lily/warning/") for k in run.data.metrics)
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(s, logged[s][key]) for s in STEPS], key


# -------------------------------------------------------------------------------------------- W&B


def test_wandb_offline_run_records_hold_the_numbers_and_the_warning(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_SILENT": "true", "WANDB_PROJECT": "lily_lab_tests",
           # no stdout capture, git, code, system metrics or metadata: less to start, nothing of the repo read
           "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
           "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true",
           "WANDB_CONFIG_DIR": tmp_path / "config", "WANDB_CACHE_DIR": tmp_path / "cache",
           "WANDB_DATA_DIR": tmp_path / "data", "WANDB_ARTIFACT_DIR": tmp_path / "artifacts"}
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    assert wandb.run is None
    try:
        logged = train(tmp_path, ["wandb"], healthy=False, per="both", warn_after=2)
        run = wandb.run
        assert run is not None  # transformers' WandbCallback leaves its run open when training ends
        run_id, run_file = run.id, Path(run.dir).parent / f"run-{run.id}.wandb"
        assert _trackers.child_processes("wandb-core")  # the service wandb.init started
    finally:
        wandb.finish()
        wandb.teardown()  # and stop that service: nothing of W&B outlives the test
    assert wandb.run is None and not _trackers.child_processes("wandb-core")
    records = _trackers.wandb_records(run_file)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.run_id == run_id
    assert records[-1].WhichOneof("record_type") == "exit"  # finished, all written
    # one history row per wandb.log: the three logging steps, then the end of training's
    history = [row for row in _trackers.wandb_history(run_file) if "train/loss" in row]
    assert [row["train/global_step"] for row in history] == STEPS
    for row in history:
        step = row["train/global_step"]
        got = {k[len("train/"):]: v for k, v in row.items() if k.startswith("train/lily/")}
        text = got.pop(WARNING, None)
        assert got == numbers(logged[step]), step  # every key, exactly (JSON round-trips float64)
        assert text == logged[step].get(WARNING)  # the text too, at step 4 only
    assert SOME_KEYS <= set(numbers(logged[2]))
    assert [row["train/global_step"] for row in history if f"train/{WARNING}" in row] == [4]


# ---------------------------------------------------------------------- the README's TensorBoard picture

SHOWN = ("lily/findings/redundant_experts", "lily/query/expert_cosine", "lily/query/load_entropy/max",
         "lily/query/load_entropy/median", "lily/query/load_entropy/min", "lily/value/expert_cosine")
TAG_FILTER = "lily/(findings/redundant|query/load_entropy|.*expert_cosine)"  # a regex over the tags
VIEWPORT = {"width": 1480, "height": 780}  # three cards a row: the six in two rows
RUN = "collapsed_experts"


def test_tensorboard_dashboard_shows_the_lily_scalars_and_a_screenshot_for_the_readme(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "runs"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir / RUN))
    # Every bank's experts start as one and the same, at a high learning rate: they drift apart,
    # the expert cosine falls through diagnose's 0.9 and redundant_experts clears.
    logged = train(tmp_path, ["tensorboard"], healthy=False, n=80, per="module", warn_after=2,
                   args=dict(max_steps=20, learning_rate=5e-2))
    steps = list(range(2, 21, 2))
    assert sorted(logged) == steps
    tags = [f"train/{k}" for k in SHOWN]
    with _trackers.tensorboard_server(logdir, ready_tag=tags[0]) as url:
        # what the server hands the charts: every logged value at its step
        assert set(tags) <= set(_trackers.get_json(f"{url}/data/plugin/scalars/tags")[RUN])
        for tag, key in zip(tags, SHOWN):
            q = urllib.parse.urlencode({"run": RUN, "tag": tag})
            points = _trackers.get_json(f"{url}/data/plugin/scalars/scalars?{q}")  # [wall_time, step, value]
            assert [(p[1], p[2]) for p in points] == [(s, f32(logged[s][key])) for s in steps], tag

        _lab.require_chromium()
        pytest.importorskip("playwright")
        from playwright.sync_api import sync_playwright

        _lab.OUT.mkdir(exist_ok=True)
        shot = _lab.OUT / "tensorboard_lily.png"
        # drawn: every card, one line each (one run, no smoothed copy), a point per logging step, inside its plot
        done = (f"() => {{ const v = ({_trackers.SCALAR_CARDS})(); return !!v && v.cards.length === {len(tags)} && "
                f"v.cards.every(c => c.lines.length === 1 && c.lines[0].points === {len(steps)} "
                f"&& c.lines[0].inside); }}")
        with sync_playwright() as p:
            browser = _lab.launch(p)
            page = browser.new_page(viewport=VIEWPORT)
            try:
                # the legacy scalars dashboard reads its tag filter and smoothing from the URL
                page.goto(f"{url}/#scalars&_smoothingWeight=0&tagFilter={urllib.parse.quote(TAG_FILTER, safe='')}")
                page.wait_for_selector("tf-scalar-card", timeout=60_000)
                # "Ignore outliers in chart scaling" (on by default, kept in localStorage, not in the
                # URL) cuts the collapsed start off the top of the plots
                outliers = page.locator("#ignore-y-outlier")
                if outliers.get_attribute("aria-checked") == "true":
                    outliers.click()
                page.wait_for_function(done, timeout=30_000)
                view = page.evaluate(_trackers.SCALAR_CARDS)
                assert view["header"].startswith(f"Tags matching / {TAG_FILTER} / {len(tags)}")
                assert sorted(c["title"] for c in view["cards"]) == sorted(tags)  # the charts shown, by title
                bottom = view["box"]["y"] + view["box"]["h"] + 12
                assert bottom <= VIEWPORT["height"]
                for card in view["cards"]:  # whole cards, axes labelled, each line inside its plot
                    b = card["box"]
                    assert b["x"] >= 0 and b["x"] + b["w"] <= VIEWPORT["width"] and b["y"] + b["h"] <= bottom, card
                    assert card["ticks"] >= 4, card
                page.screenshot(path=str(shot), clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": bottom})
            except Exception:
                page.screenshot(path=str(_lab.OUT / "tensorboard_failure.png"))
                raise
            finally:
                browser.close()
    assert shot.stat().st_size < 300_000  # a README image
