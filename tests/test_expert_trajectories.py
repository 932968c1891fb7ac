"""The experts' trajectories over training: ``timeline_expert_trajectories`` against hand cases and
plain numpy SVD (both of its paths), its refusals; ``plots.plot_expert_trajectories`` (marks,
titles, hover, the "now" marker, equal units, escaping); the experts view of ``TimelinePlayer``
(the slider moves the marker in place, the bank dropdown redraws, several runs, no banks)."""

from __future__ import annotations

import typing

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import lily_lab as ll
from lily_lab import plots

from _figures import strings

EVIL_RUN = "<b>run</b>"


def toy_timeline(positions, group="query:2x2") -> ll.Timeline:
    """A Timeline of banks only: ``positions[step]`` is the (E, r, d_out) bank at that step."""
    t = ll.Timeline()
    for step, bank in positions.items():
        t.steps.append(step)
        t.banks.append({group: np.asarray(bank, dtype=np.float32)})
    return t


def random_timelines(runs=("a", "b"), steps=range(0, 40, 10), E=3, r=2, d_out=5, seed=0, groups=("query:5x5",)):
    rng = np.random.default_rng(seed)
    out = {}
    for run in runs:
        t = ll.Timeline()
        banks = {g: rng.normal(size=(E, r, d_out)) for g in groups}
        for step in steps:
            banks = {g: B + 0.5 * rng.normal(size=B.shape) for g, B in banks.items()}
            t.steps.append(step)
            t.banks.append({g: B.astype(np.float32) for g, B in banks.items()})
        out[run] = t
    return out


def notebook_pca(timelines: dict, group: str):
    """Notebook 03's inline maths, as it was: the reference."""
    points, vectors = [], []
    for run, t in timelines.items():
        for step, banks in zip(t.steps, t.banks):
            for e, expert in enumerate(banks[group]):
                points.append({"run": run, "step": step, "expert": e})
                vectors.append(expert.ravel().astype(np.float64))
    X = np.stack(vectors)
    X = X - X.mean(axis=0)
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    share = S**2 / (S**2).sum()
    return pd.DataFrame(points).assign(PC1=X @ Vt[0], PC2=X @ Vt[1]), share, X


def assert_same_up_to_sign(a, b, atol=1e-9):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.allclose(a, b, atol=atol) or np.allclose(a, -b, atol=atol), np.abs(np.abs(a) - np.abs(b)).max()


# ------------------------------------------------------------------------------------- the analysis


def test_two_experts_moving_apart_on_one_axis():
    # 2-D toy (r=1, d_out=2): the experts at x = 3 ∓ s, both at y = 5 (an offset the centring removes).
    t = toy_timeline({s: [[[3 - s, 5.0]], [[3 + s, 5.0]]] for s in range(5)})
    df = ll.timeline_expert_trajectories(t)
    assert list(df.columns) == ["run", "step", "expert", "PC1", "PC2"]
    assert df["run"].unique().tolist() == ["timeline"] and len(df) == 10
    assert df.attrs["group"] == "query:2x2"
    assert df.attrs["explained"] == pytest.approx([1.0, 0.0])
    x = np.array([3 - s if e == 0 else 3 + s for s in range(5) for e in range(2)], float)
    # The sign convention: the direction's largest entry (the x axis) positive, so PC1 = x − mean(x).
    assert np.allclose(df["PC1"], x - x.mean())
    assert np.all(df["PC2"] == 0.0)  # no spread left: exactly 0, not rounding noise
    assert df.query("step == 4").set_index("expert")["PC1"].tolist() == pytest.approx([-4.0, 4.0])


def test_the_sign_makes_the_largest_loading_positive():
    timelines = random_timelines(seed=3)
    df = ll.timeline_expert_trajectories(timelines, components=3)
    _, _, X = notebook_pca(timelines, "query:5x5")
    for k in range(3):
        loading = X.T @ df[f"PC{k + 1}"].to_numpy()  # ∝ the direction (scores = X v)
        assert loading[np.argmax(np.abs(loading))] > 0
    flipped = {run: toy_timeline({s: -b["query:5x5"] for s, b in zip(t.steps, t.banks)}, "query:5x5")
               for run, t in timelines.items()}
    again = ll.timeline_expert_trajectories(flipped, components=3)  # mirrored data: a mirrored picture
    assert np.allclose(again[["PC1", "PC2", "PC3"]], -df[["PC1", "PC2", "PC3"]], atol=1e-5)


@pytest.mark.parametrize("d_out", [5, 200], ids=["more rows than columns (SVD)", "fewer rows (Gram)"])
def test_matches_numpy_svd_of_the_same_matrix(d_out):
    timelines = random_timelines(E=3, r=2, d_out=d_out, groups=(f"query:{d_out}x{d_out}", "value:4x4"))
    group = f"query:{d_out}x{d_out}"
    df = ll.timeline_expert_trajectories(timelines)  # the first bank
    ref, share, X = notebook_pca(timelines, group)
    assert (X.shape[0] <= X.shape[1]) == (d_out == 200)
    assert df[["run", "step", "expert"]].equals(ref[["run", "step", "expert"]])
    for k in ("PC1", "PC2"):
        assert_same_up_to_sign(df[k], ref[k], atol=1e-6 * np.abs(ref[k]).max())
    assert df.attrs["explained"] == pytest.approx(share[:2].tolist(), rel=1e-9)
    other = ll.timeline_expert_trajectories(timelines, group="value:4x4", components=3)
    ref_v, share_v, _ = notebook_pca(timelines, "value:4x4")
    assert_same_up_to_sign(other["PC1"], ref_v["PC1"], atol=1e-6)
    assert other.attrs["explained"] == pytest.approx(share_v[:3].tolist(), rel=1e-9)


def rows_timeline(X, E, r):
    """A one-run Timeline whose points are the rows of ``X`` (step-major, ``E`` experts a step), in
    float64: the matrix ``timeline_expert_trajectories`` builds is ``X`` itself."""
    t = ll.Timeline()
    for step, chunk in enumerate(np.split(X, len(X) // E)):
        t.steps.append(step)
        t.banks.append({"query:5x5": chunk.reshape(E, r, -1)})
    return t


def signed_pca(X, k):
    """numpy's SVD of the centred rows, each direction turned so its largest |entry| is positive."""
    X = X - X.mean(axis=0)
    _, S, Vt = np.linalg.svd(X, full_matrices=False)
    V = Vt[:k].T * np.sign(Vt[:k][np.arange(k), np.argmax(np.abs(Vt[:k]), axis=1)])
    return X @ V, (S[:k] ** 2 / (S**2).sum()).tolist()


# (points, experts a step, r): n ≤ d = r·d_out takes the Gram path, n > d the SVD path.
@pytest.mark.parametrize("shape, E, r", [((12, 40), 3, 2), ((40, 12), 4, 2), ((6, 6), 3, 2), ((8, 6), 4, 2)])
def test_the_gram_and_the_svd_paths_agree(shape, E, r):
    rng = np.random.default_rng(1)
    X = rng.normal(size=shape) @ np.diag(np.geomspace(5, 0.05, shape[1]))
    k = min(shape[0] - 1, shape[1])  # every component centring leaves
    cols = [f"PC{i + 1}" for i in range(k)]
    df = ll.timeline_expert_trajectories(rows_timeline(X, E, r), components=k)
    ref, share = signed_pca(X, k)
    assert np.allclose(df[cols], ref, atol=1e-8 * np.abs(ref).max())  # the same signs too: the convention is the data's
    assert df.attrs["explained"] == pytest.approx(share, rel=1e-8, abs=1e-14)
    assert sum(df.attrs["explained"]) == pytest.approx(1.0)  # min(n, d) − 1 components hold the whole spread
    if shape[0] > shape[1]:  # the SVD path: zero columns (a wider d_out) send the same points down the Gram path
        d_out = shape[1] // r
        wide = np.zeros((shape[0], r, -(-shape[0] // r)))
        wide[:, :, :d_out] = X.reshape(shape[0], r, d_out)
        gram = ll.timeline_expert_trajectories(rows_timeline(wide.reshape(shape[0], -1), E, r), components=k)
        assert np.allclose(gram[cols], df[cols], atol=1e-8 * np.abs(ref).max())
        assert gram.attrs["explained"] == pytest.approx(df.attrs["explained"], rel=1e-8, abs=1e-14)


def test_a_bank_that_never_spreads_has_nan_shares():
    t = toy_timeline({0: np.zeros((3, 1, 2)), 1: np.zeros((3, 1, 2))})  # init_weights=True, never trained
    df = ll.timeline_expert_trajectories(t)
    assert np.all(df[["PC1", "PC2"]] == 0) and all(np.isnan(df.attrs["explained"]))
    fig = plots.plot_expert_trajectories(df)
    assert fig.layout.xaxis.title.text == "PC1 (no spread)"


def test_on_a_real_timeline(tiny_bert):
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=2, num_B=3, init_weights=False))
    tl = ll.Timeline({"input_ids": torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))})
    g = torch.Generator().manual_seed(0)
    for step in (0, 5, 10):
        with torch.no_grad():
            for s in ll.adapter_sites(model):
                s.B.add_(0.1 * torch.randn(s.B.shape, generator=g))
        tl.observe(model, step)
    groups = list(tl.banks[0])
    df = ll.timeline_expert_trajectories(tl)
    assert df.attrs["group"] == groups[0] and len(df) == 3 * 3
    assert df.groupby("step")["expert"].apply(list).tolist() == [[0, 1, 2]] * 3
    assert 0 < df.attrs["explained"][1] <= df.attrs["explained"][0] < 1
    ref, share, _ = notebook_pca({"timeline": tl}, groups[1])
    df1 = ll.timeline_expert_trajectories({"timeline": tl}, group=groups[1])
    assert_same_up_to_sign(df1["PC2"], ref["PC2"], atol=1e-6)


def test_bad_input_names_the_argument():
    fn = ll.timeline_expert_trajectories
    good = random_timelines()
    with pytest.raises(ll.LilyLabTypeError, match="timelines must be a lily_lab.Timeline or a dict"):
        fn([good["a"]])
    with pytest.raises(ll.LilyLabTypeError, match=r"timelines\['b'\] must be a lily_lab.Timeline, got DataFrame"):
        fn({"a": good["a"], "b": pd.DataFrame()})
    with pytest.raises(ll.InputError, match="empty dict"):
        fn({})
    with pytest.raises(ll.InputError, match=r"no observations yet.*observe"):
        fn(ll.Timeline())
    bare = ll.Timeline(track_experts=False)
    bare.steps.append(0)  # observed, but no copies of the banks
    bare.routings.append(None)
    with pytest.raises(ll.InputError, match=r"timelines\['timeline'\] recorded no expert banks.*track_experts=True"):
        fn(bare)
    with pytest.raises(ll.InputError, match=r"group='keys:5x5'.*its banks are: 'query:5x5'"):
        fn(good, group="keys:5x5")
    with pytest.raises(ll.LilyLabTypeError, match="group must be"):
        fn(good, group=0)
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ll.InputError, match="components must be an integer"):
            fn(good, components=bad)
    with pytest.raises(ll.InputError, match="components=11 is more than the collection has: 24 points of 10"):
        fn(good, components=11)
    other = random_timelines(runs=("c",), d_out=6, groups=("query:5x5",))
    with pytest.raises(ll.InputError, match=r"3×2×6 \(E×r×d_out\) in timelines\['c'\] at step 0 but 3×2×5 in "
                                            r"timelines\['a'\]"):
        fn({**good, **other})


def test_a_diverged_bank_names_the_run_and_the_step():
    timelines = random_timelines()
    timelines["b"].banks[2]["query:5x5"][1, 0, 3] = np.nan
    timelines["b"].banks[3]["query:5x5"][0, 0, 0] = np.inf
    with pytest.raises(ll.NonFiniteWeightsError) as err:
        ll.timeline_expert_trajectories(timelines)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert "bank 'query:5x5' of timelines['b'] at step 20 (1 value)" in msg and "NaN or inf" in msg
    assert "Lower the learning rate" in msg  # the remedy every non-finite refusal gives


# ------------------------------------------------------------------------------------------ the plot


@pytest.fixture(scope="module")
def traj():
    return ll.timeline_expert_trajectories(random_timelines(runs=("a", EVIL_RUN, "c"), E=3))


def test_one_panel_per_run_one_line_per_expert(traj, monkeypatch):
    shown = []
    monkeypatch.setattr(go.Figure, "show", lambda *a, **k: shown.append(a))
    monkeypatch.setattr(pio, "show", lambda *a, **k: shown.append(a))
    assert typing.get_type_hints(plots.plot_expert_trajectories)["return"] is go.Figure
    fig = plots.plot_expert_trajectories(traj)
    assert not shown and len(fig.data) == 3 * 3 and all(isinstance(t, go.Scatter) for t in fig.data)
    assert fig.layout.template.layout.colorway == tuple(plots.EXPERT_COLORS[:10])
    assert fig.layout.title.text == "query bank (5×5): the experts over training"
    kept = round(100 * sum(traj.attrs["explained"][:2]))
    assert f"PC1–PC2 ({kept} % of the spread)" in fig.layout.title.subtitle.text
    assert "run together" in fig.layout.title.subtitle.text
    shares = [round(100 * s) for s in traj.attrs["explained"]]
    for i, t in enumerate(fig.data):
        run, e = divmod(i, 3)
        sub = traj[(traj.run == ["a", EVIL_RUN, "c"][run]) & (traj.expert == e)].sort_values("step")
        assert t.mode == "lines+markers" and t.line.color == plots.expert_color(e) and t.name == f"expert {e}"
        assert list(t.x) == sub.PC1.tolist() and list(t.y) == sub.PC2.tolist()  # in step order
        assert t.marker.symbol[0] == "circle-open" and set(t.marker.symbol[1:]) == {"circle"}
        assert t.showlegend == (run == 0) and t.legendgroup == f"expert {e}"
        sx = str(run + 1) if run else ""
        assert (t.xaxis, t.yaxis) == (f"x{sx}", f"y{sx}")
        assert fig.layout[f"xaxis{sx}"].title.text == f"PC1 ({shares[0]} % of the spread)"
        assert fig.layout[f"yaxis{sx}"].title.text == f"PC2 ({shares[1]} % of the spread)"
        # equal units on both axes, the same range on every panel: distances read true and compare
        assert fig.layout[f"yaxis{sx}"].scaleanchor == f"x{sx}"
        assert fig.layout[f"xaxis{sx}"].range == fig.layout.xaxis.range == fig.layout[f"yaxis{sx}"].range
        step, x, y = sub.step.iloc[1], sub.PC1.iloc[1], sub.PC2.iloc[1]
        hover = t.hovertext[1]
        assert f"expert {e}" in hover and f"step {step}" in hover
        assert f"PC1 {x:.3f}" in hover and f"PC2 {y:.3f}" in hover and "run: " in hover
    lo, hi = fig.layout.xaxis.range
    assert lo < traj[["PC1", "PC2"]].min().min() and hi > traj[["PC1", "PC2"]].max().max()
    assert [a.text for a in fig.layout.annotations] == ["a", "&lt;b&gt;run&lt;/b&gt;", "c"]  # panel titles


def test_run_names_are_escaped(traj):
    fig = plots.plot_expert_trajectories(traj, step=10)
    texts = list(strings(fig.to_plotly_json()))
    assert not [t for t in texts if "<b>run" in t]
    assert sum("run: &lt;b&gt;run&lt;/b&gt;" in t for t in texts) >= 2 * 3  # lines and now markers
    fig = plots.plot_expert_trajectories(traj, title="<i>mine</i>")
    assert fig.layout.title.text == "&lt;i&gt;mine&lt;/i&gt;"


def test_the_now_marker(traj):
    fig = plots.plot_expert_trajectories(traj, step=20)
    assert len(fig.data) == 3 * 3 + 3
    now = fig.data[9:]
    for i, (t, run) in enumerate(zip(now, ["a", EVIL_RUN, "c"])):
        at = traj[(traj.run == run) & (traj.step == 20)].sort_values("expert")
        assert t.mode == "markers" and t.legendgroup == "now" and t.showlegend == (i == 0)
        assert list(t.x) == at.PC1.tolist() and list(t.y) == at.PC2.tolist()
        assert t.marker.size > fig.data[0].marker.size
        assert list(t.marker.color) == [plots.expert_color(e) for e in range(3)]
        assert "now: step 20" in t.hovertext[0] and t.name == "now: step 20"
    # A run observed on another schedule: its latest step before; none for a run that starts later.
    other = traj[~((traj.run == "c") & (traj.step == 20))]
    fig = plots.plot_expert_trajectories(other.assign(step=other.step.where(other.run != "a", other.step + 5)),
                                         step=20)
    a, _, c = fig.data[9:]
    assert "now: step 15 (the run's last before step 20)" in a.hovertext[0]
    assert list(c.x) == traj[(traj.run == "c") & (traj.step == 10)].sort_values("expert").PC1.tolist()
    assert len(plots.plot_expert_trajectories(other.assign(step=other.step + 100), step=20).data[9].x) == 0


def test_one_run_has_one_panel_and_no_panel_title():
    df = ll.timeline_expert_trajectories(random_timelines(runs=("only",))["only"])
    fig = plots.plot_expert_trajectories(df, step=0)
    assert len(fig.data) == 3 + 1 and not fig.layout.annotations
    assert "xaxis2" not in fig.layout.to_plotly_json()
    assert "run: timeline" in fig.data[0].hovertext[0]


def test_plot_bad_input(traj):
    fn = plots.plot_expert_trajectories
    for col in ["run", "step", "expert", "PC1", "PC2"]:
        with pytest.raises(ll.InputError, match=rf"plot_expert_trajectories needs columns \['{col}'\]"):
            fn(traj.drop(columns=col))
    with pytest.raises(ll.LilyLabTypeError, match="plot_expert_trajectories takes a pandas DataFrame"):
        fn(traj.to_dict("records"))
    with pytest.raises(ll.InputError, match="step must be an integer"):
        fn(traj, step="last")
    empty = fn(traj.iloc[:0])
    assert len(empty.data) == 0 and "no observed steps" in empty.layout.annotations[0].text
    plain = traj.copy()
    plain.attrs = {}  # a frame rebuilt by hand: no shares to quote, no bank to name
    fig = fn(plain)
    assert fig.layout.xaxis.title.text == "PC1" and fig.layout.title.text == "The experts over training"


# ---------------------------------------------------------------------------------------- the player

widgets = pytest.importorskip("lily_lab.widgets")


@pytest.fixture(scope="module")
def trained(tiny_bert):
    """Two short "runs" of a tiny BERT (query and value banks, 3 experts), observed at 0, 5, 10."""
    ids = {"input_ids": torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))}
    out = {}
    for run, seed in (("run A", 0), (EVIL_RUN, 1)):
        model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=2, num_B=3, routing="token",
                                                        init_weights=False))
        tl = ll.Timeline(ids)
        g = torch.Generator().manual_seed(seed)
        for step in (0, 5, 10):
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
            tl.observe(model, step)
        out[run] = tl
    return out


def test_the_player_marks_the_step_and_moves_the_marker_in_place(trained):
    tl = trained["run A"]
    w = widgets.TimelinePlayer(tl)
    groups = list(tl.banks[0])
    assert w.bank.options == tuple((plots.bank_label(g), g) for g in groups) and w.bank.value == groups[0]
    fig = w.trajectories.figure
    assert len(fig.data) == 3 + 1 and w.trajectories.message.value == ""
    assert fig.layout.title.text == f"{plots.bank_label(groups[0])}: the experts over training"
    assert fig.layout.xaxis.title.text.startswith("PC1 (") and fig.layout.yaxis.title.text.startswith("PC2 (")
    traj = ll.timeline_expert_trajectories(tl, group=groups[0])
    now, lines = fig.data[-1], fig.data[:3]
    assert list(now.x) == traj[traj.step == 10].PC1.tolist()  # the slider starts at the last step
    before = [(t.uid, tuple(t.x)) for t in lines]
    w.step.value = 0
    assert fig.data[-1] is now and list(now.x) == traj[traj.step == 0].PC1.tolist()  # moved, not redrawn
    assert list(now.y) == traj[traj.step == 0].PC2.tolist() and "now: step 0" in now.hovertext[0]
    assert [(t.uid, tuple(t.x)) for t in fig.data[:3]] == before
    assert w.curves.figure.layout.shapes[0].x0 == 0 and "step 0" in w.heat.figure.layout.title.text
    w.bank.value = groups[1]  # another bank: the figure is drawn afresh, the marker at the same step
    traj1 = ll.timeline_expert_trajectories(tl, group=groups[1])
    assert fig.layout.title.text == f"{plots.bank_label(groups[1])}: the experts over training"
    assert list(fig.data[0].x) == traj1[traj1.expert == 0].PC1.tolist()
    assert list(fig.data[-1].x) == traj1[traj1.step == 0].PC1.tolist()
    w.step.value = 5
    assert list(fig.data[-1].x) == traj1[traj1.step == 5].PC1.tolist()
    assert "collapsed" in w.experts_note.value


def test_the_player_of_several_runs(trained):
    w = widgets.TimelinePlayer(trained)
    assert w.run.options == (("run A", "run A"), (EVIL_RUN, EVIL_RUN)) and w.timeline is trained["run A"]
    fig = w.trajectories.figure
    assert len(fig.data) == 2 * 3 + 2 and len(fig.layout.annotations) == 2  # a panel per run
    assert fig.layout.annotations[1].text == "&lt;b&gt;run&lt;/b&gt;"
    heat = w.heat.figure.layout.title.text
    assert "run A" in heat and "run A" in w.curves.figure.layout.title.text
    w.run.value = EVIL_RUN  # the router views follow the run; the experts view shows every run anyway
    assert w.timeline is trained[EVIL_RUN] and "&lt;b&gt;run&lt;/b&gt;" in w.heat.figure.layout.title.text
    assert "<b>run" not in w.heat.figure.layout.title.text and len(fig.data) == 8
    w.step.value = 5
    traj = ll.timeline_expert_trajectories(trained, group=w.bank.value)
    for t, run in zip(fig.data[6:], trained):
        assert list(t.x) == traj[(traj.run == run) & (traj.step == 5)].PC1.tolist()
    with pytest.raises(ll.LilyLabTypeError, match=r"TimelinePlayer: timeline\['x'\] must be a lily_lab.Timeline"):
        widgets.TimelinePlayer({"x": 1})
    with pytest.raises(ll.InputError, match="empty dict"):
        widgets.TimelinePlayer({})


def test_the_player_without_banks_or_with_a_diverged_one(trained, tiny_bert):
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query"], r=2, num_B=3, init_weights=False))
    tl = ll.Timeline(trained["run A"].probe, track_experts=False)
    for step in (0, 1):
        tl.observe(model, step)
    w = widgets.TimelinePlayer(tl)  # no banks: the router views, and a note instead of the experts view
    assert w.bank is None and "track_experts=True" in w.experts_note.value and len(w.curves.figure.data)
    w.step.value = 0  # the slider still works
    src = trained["run A"]
    broken = ll.Timeline(src.probe)
    broken.steps, broken.routings = list(src.steps), list(src.routings)
    broken.banks = [{g: B.copy() for g, B in b.items()} for b in src.banks]
    group = next(iter(broken.banks[0]))
    broken.banks[1][group][0, 0, 0] = np.nan
    w = widgets.TimelinePlayer(broken)  # a diverged bank: said in the pane, not raised
    assert "NonFiniteWeightsError" in w.trajectories.message.value and "step 5" in w.trajectories.message.value
    w.step.value = 0
    assert "NonFiniteWeightsError" in w.trajectories.message.value
