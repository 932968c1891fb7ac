"""``RoutingCallback`` on training traffic under a 2-process (gloo, CPU) ``Trainer``: the router
metrics logged once, by rank 0, equal to one process's on the same global batches; rank 0's
timeline holds the whole global batch; a critical warning stops both ranks at the same step.

One ``accelerate launch`` (tests/dist_scripts/monitor_worker.py) runs every scenario, per-device
batch 4; the reference is the same worker's :func:`run` in this process, batch 8 — the same 8 rows
per optimizer step (the sequential sampler; test_each_global_batch_is_the_same_rows checks it).
Routing metrics are sums over tokens, so the union of the two ranks' halves must give exactly
what one process gives on the whole batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import lily_lab

from _scripts import SCRIPTS, load_script

pytest.importorskip("transformers")
pytest.importorskip("accelerate")



launch = load_script("launch")
worker = load_script("monitor_worker")

SITES = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(4) for m in ("query", "value")]
METRICS = ("load_entropy", "routing_mi", "max_usage", "z_loss")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Every scenario on 2 processes: ``(out, {rank: {scenario: result}})``."""
    out = tmp_path_factory.mktemp("monitor")
    return out, launch.launch(launch.accelerate_command, SCRIPTS / "monitor_worker.py", out)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """Every scenario in this process, the whole global batch per step: ``(out, {scenario: result})``."""
    out = tmp_path_factory.mktemp("monitor_one")
    return out, {name: worker.run(name, out / name, per_device_batch=worker.GLOBAL_BATCH) for name in worker.SCENARIOS}


def lily(log: dict) -> dict:
    return {k: v for k, v in log.items() if k.startswith("lily/")}


def lily_logs(result: dict, where: str = "logs") -> dict[int, dict]:
    """step → the lily keys of that step's log, for the logs that have any (asserting one per step)."""
    found = [(log["step"], lily(log)) for log in result[where] if lily(log)]
    steps = [s for s, _ in found]
    assert len(steps) == len(set(steps)), f"{where}: a step's metrics were logged more than once: {steps}"
    return dict(found)


def max_relative_difference(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want)
    worst = 0.0
    for k, w in want.items():
        if isinstance(w, str):
            assert got[k] == w, k
        else:
            worst = max(worst, abs(got[k] - w) / max(abs(w), 1e-12))
    return worst


# --------------------------------------------------------------------------- the runs compared


def test_each_global_batch_is_the_same_rows(two, one):
    # What makes the comparison fair: step k's rows on rank 0 and rank 1 together are exactly
    # one process's step-k batch (and the ranks' halves do not overlap).
    _, ranks = two
    _, ref = one
    for name in ("exact", "trained"):
        r0, r1, single = ranks[0][name]["rows_seen"], ranks[1][name]["rows_seen"], ref[name]["rows_seen"]
        assert len(r0) == len(r1) == len(single) == 4
        for a, b, whole in zip(r0, r1, single):
            assert len(a) == len(b) == 4 and len(whole) == 8
            assert sorted(a + b) == sorted(whole)
    assert ranks[0]["exact"]["world"] == 2 and ref["exact"]["world"] == 1


def test_metrics_are_logged_once_by_rank_zero_and_equal_one_process(two, one):
    _, ranks = two
    _, ref = one
    r0, r1, single = ranks[0]["exact"], ranks[1]["exact"], ref["exact"]
    # The callback sits before the capturing callback, so the capture sees what reporters see.
    assert r0["callback_order"].index("RoutingCallback") < r0["callback_order"].index("Capture")
    # Rank 1: not one lily key in any log, nor in its log_history.
    assert not any(lily(log) for log in r1["logs"] + r1["log_history"])
    want = lily_logs(single)
    assert sorted(want) == [2, 4]
    for where in ("logs", "log_history"):  # what the callbacks were handed, and trainer_state.json's history
        got = lily_logs(r0, where)
        assert sorted(got) == [2, 4], where
        for step in (2, 4):
            keys = got[step]
            for site in SITES:
                for metric in METRICS:
                    assert f"lily/{site}/{metric}" in keys
            assert "lily/query/expert_cosine" in keys and "lily/value/expert_cosine" in keys
            assert keys["lily/findings/redundant_experts"] == 0.0
            diff = max_relative_difference(keys, want[step])
            assert diff <= 1e-6, f"{where}, step {step}: rank 0's metrics differ from one process's by {diff:.2e}"
    # The two observations are different recordings (steps 1–2, then 3–4), not one logged twice.
    assert got[2]["lily/bert.encoder.layer.0.attention.self.query/load_entropy"] != \
        got[4]["lily/bert.encoder.layer.0.attention.self.query/load_entropy"]


def test_with_a_learning_rate_the_metrics_still_agree(two, one):
    # lr > 0: DDP averages the two halves' gradients, which equals one process's gradient on the
    # whole batch up to rounding, so the routing of later steps agrees too (not bit for bit).
    _, ranks = two
    _, ref = one
    got, want, frozen = lily_logs(ranks[0]["trained"]), lily_logs(ref["trained"]), lily_logs(ref["exact"])
    assert sorted(got) == sorted(want) == [2, 4]
    assert not any(lily(log) for log in ranks[1]["trained"]["logs"])
    for step in (2, 4):
        diff = max_relative_difference(got[step], want[step])
        assert diff <= 1e-5, f"step {step}: {diff:.2e}"  # measured: 2e-8
    # ... and training did move the routing, far more than that tolerance.
    assert max_relative_difference(want[4], frozen[4]) > 1e-2


def test_rank_zero_saves_a_timeline_of_the_whole_global_batch(two, one):
    out, ranks = two
    ref_out, ref = one
    r0, r1, single = ranks[0]["exact"], ranks[1]["exact"], ref["exact"]
    assert (r0["timeline_saves"], r1["timeline_saves"]) == (1, 0)  # written once, by rank 0
    assert (r0["timeline_steps"], r1["timeline_steps"]) == ([2, 4], [])
    saved = lily_lab.Timeline.load(out / "exact" / "lily_timeline.npz")
    assert saved.steps == [2, 4]
    # Token counts: the whole global batch (both ranks' halves), as one process counts them ...
    assert r0["timeline_tokens"] == single["timeline_tokens"]
    assert [{s: r.record(s).n_tokens for s in r.sites} for r in saved.routings] == single["timeline_tokens"]
    # ... which is every real token of the 16 rows of steps 1–2, then of steps 3–4.
    masks = [int(row["attention_mask"].sum()) for row in worker.make_rows()]
    for i, counts in enumerate(r0["timeline_tokens"]):
        assert set(counts) == set(SITES)
        assert set(counts.values()) == {sum(masks[16 * i:16 * (i + 1)])}
    # The saved routings give one process's metrics.
    reference = lily_lab.Timeline.load(ref_out / "exact" / "lily_timeline.npz")
    for a, b in zip(saved.routings, reference.routings):
        ma, mb = lily_lab.router_metrics(a), lily_lab.router_metrics(b)
        assert list(ma["site"]) == list(mb["site"])
        numeric = mb.select_dtypes("number").columns
        np.testing.assert_allclose(ma[numeric].to_numpy(float), mb[numeric].to_numpy(float), rtol=1e-6, atol=1e-9)


def test_a_critical_warning_stops_both_ranks_at_the_same_step(two, one):
    # Identical experts, warn_after=1, stop_on="critical", max_steps=10: rank 0 finds it at the
    # first observation (step 2) and the decision reaches rank 1 (a rank running on alone would
    # hang in its next collective; the launch's timeout would fail the test).
    _, ranks = two
    _, ref = one
    r0, r1 = ranks[0]["stop"], ranks[1]["stop"]
    assert ref["stop"]["global_step"] == 2
    assert (r0["global_step"], r1["global_step"]) == (2, 2)
    assert ("redundant_experts", "critical", 2) in r0["warnings"]
    assert r1["warnings"] == []  # findings are computed on rank 0 alone
    logged = lily_logs(r0)
    assert sorted(logged) == [2]
    assert logged[2]["lily/warning/redundant_experts"].startswith("critical")
    assert logged[2]["lily/findings/redundant_experts"] == 2.0  # both banks
    assert not any(lily(log) for log in r1["logs"] + r1["log_history"])
    assert math.isclose(logged[2]["lily/query/expert_cosine"], 1.0, rel_tol=1e-6)
