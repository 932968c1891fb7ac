"""record_routing, Routing and the routing metrics: hand-computed cases and independent recomputation."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import lily_lab as ll
from lily_lab.observe import Routing, RoutingError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


class Holder(nn.Module):
    """One linear layer with a model-style signature: ``forward(x, attention_mask=None)``."""

    def __init__(self, d=3, d_out=4):
        super().__init__()
        self.proj = nn.Linear(d, d_out)

    def forward(self, x, attention_mask=None):
        return self.proj(x)


def holder(E=3, r=3, d=3, routing="batch", **kw):
    torch.manual_seed(0)
    return ll.add_lily(Holder(d), ll.LilyConfig(["proj"], r=r, num_B=E, routing=routing, init_weights=False, **kw))


def set_site(model, A=None, router=None):
    (site,) = ll.adapter_sites(model)
    with torch.no_grad():
        if A is not None:
            site.A.copy_(A)
        if router is not None:
            site.router.copy_(router)
    return site


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64)).eval()


def metrics_of(model, *calls, **kw):
    with ll.record_routing(model, **kw) as rec:
        for args in calls:
            model(*args)
    return ll.router_metrics(rec.routing), rec.routing


# ----------------------------------------------------------------------------- hand-computed cases


def test_zero_router_is_balanced_and_input_blind():
    model = holder()
    set_site(model, router=torch.zeros(3, 3))
    m, _ = metrics_of(model, (torch.randn(4, 5, 3),))
    row = m.iloc[0]
    assert row.load_entropy == pytest.approx(1) and row.token_entropy == pytest.approx(1)
    assert row.routing_mi == pytest.approx(0, abs=1e-12)
    assert row.effective_experts == pytest.approx(3) and row.max_usage == pytest.approx(1 / 3)
    assert row.cv2 == pytest.approx(0, abs=1e-12)
    assert row.z_loss == pytest.approx(math.log(3) ** 2)  # logits 0: logsumexp = ln E


def test_every_token_on_one_expert_is_collapsed():
    model = holder()
    set_site(model, A=torch.eye(3), router=torch.tensor([[1e4] * 3, [0.0] * 3, [0.0] * 3]))
    m, _ = metrics_of(model, (torch.rand(4, 5, 3) + 0.1,))  # h > 0, so expert 0's logit dominates
    row = m.iloc[0]
    assert row.max_usage == pytest.approx(1) and row.load_entropy == pytest.approx(0, abs=1e-9)
    assert row.switch_balance == pytest.approx(3) and row.effective_experts == pytest.approx(1)
    assert row.cv2 == pytest.approx(2)  # u = (1, 0, 0): variance 2/9 over mean² 1/9


def test_each_sequence_wholly_on_its_own_expert():
    model = holder(routing="sequence")
    set_site(model, A=torch.eye(3), router=torch.eye(3) * 100)
    x = torch.eye(3)[:, None, :].repeat(1, 4, 1) * 10  # sequence b: every token along axis b
    with ll.record_routing(model) as rec:
        model(x)
        rec.annotate(labels=["a", "b", "c"])
    row = ll.router_metrics(rec.routing).iloc[0]
    assert row.load_entropy == pytest.approx(1) and row.routing_mi == pytest.approx(1)
    assert row.token_entropy == pytest.approx(0, abs=1e-9) and row.switch_balance == pytest.approx(1)
    spec = ll.specialization(rec.routing, by="label")
    assert spec["normalized_mi"].iloc[0] == pytest.approx(1) and spec["js_divergence"].iloc[0] == pytest.approx(1)
    wide = spec.pivot(index="value", columns="expert", values="usage")
    assert np.allclose(wide.loc[["a", "b", "c"]].to_numpy(), np.eye(3), atol=1e-9)
    assert np.allclose(rec.routing.mixtures(rec.routing.sites[0]), np.eye(3), atol=1e-9)


def test_metrics_equal_numpy_formulas_on_recorded_probs():
    model = holder(E=4, r=3)
    x = torch.randn(6, 7, 3)
    m, routing = metrics_of(model, (x,))
    p = routing.probs(routing.sites[0]).astype(np.float64)
    lg = routing.logits(routing.sites[0]).astype(np.float64)
    u = p.mean(0)
    H = lambda q: -(q * np.log(q)).sum(-1)  # noqa: E731
    f = np.bincount(p.argmax(1), minlength=4) / len(p)
    want = {"load_entropy": H(u) / np.log(4), "token_entropy": H(p).mean() / np.log(4),
            "routing_mi": (H(u) - H(p).mean()) / np.log(4), "effective_experts": np.exp(H(u)),
            "max_usage": u.max(), "cv2": u.var() / u.mean() ** 2, "switch_balance": 4 * (f * u).sum(),
            "z_loss": (np.log(np.exp(lg).sum(1)) ** 2).mean()}
    for k, v in want.items():
        assert m.iloc[0][k] == pytest.approx(v, rel=1e-5), k


# ----------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize("routing", ["batch", "sequence", "token"])
def test_recorded_probs_equal_recomputation_and_skip_padding(routing):
    model = holder(E=3, r=2, routing=routing, router_temperature=0.7)
    site = ll.adapter_sites(model)[0]
    x = torch.randn(3, 6, 3)
    mask = torch.ones(3, 6)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    with ll.record_routing(model) as rec:
        model(x, mask)
    got = rec.routing.probs(site.name)
    with torch.no_grad():
        want = torch.softmax(x @ site.A.T @ site.router.T / 0.7, dim=-1)[mask.bool()].numpy()
    assert got.shape == (int(mask.sum()), 3)
    assert np.abs(got - want).max() <= 1e-6
    tab = rec.routing.token_table()
    assert sorted(zip(tab.sequence, tab.position)) == [tuple(i) for i in mask.nonzero().tolist()]


def test_padded_batch_records_exactly_its_real_tokens_on_bert():
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="sequence",
                                                   init_weights=False))
    ids = torch.randint(0, 100, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 3:] = 0
    with ll.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    with ll.record_routing(model) as alone:
        model(input_ids=ids[1:2, :3])
    for name in rec.routing.sites:
        assert rec.routing.record(name).n_tokens == 19
        tab = rec.routing.token_table()
        rows = (tab.site == name) & (tab.sequence == 1)
        assert rows.sum() == 3
        p_padded = tab.loc[rows, ["p0", "p1", "p2"]].to_numpy()
        assert np.abs(p_padded - alone.routing.probs(name)).max() <= 1e-5
        assert (tab.loc[tab.site == name, "token_id"].to_numpy() >= 0).all()  # ids captured from the call


def test_peft_lily_records_the_same_as_lily_lab():
    peft = pytest.importorskip("peft")
    base = tiny_bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(target_modules=["query", "value"], r=4,
                                                                       num_B=3, stride_A=2, init_weights=False))
    ours = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(["query", "value"], r=4, num_B=3, stride_A=2))
    with torch.no_grad():
        for t, m in zip(ll.adapter_sites(theirs), ll.adapter_sites(ours)):
            m.A.copy_(t.A)
            m.B.copy_(t.B)
            m.router.copy_(t.router)
    ids = torch.randint(0, 100, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 5:] = 0
    recs = {}
    for key, model in (("theirs", theirs), ("ours", ours)):
        with ll.record_routing(model) as rec:
            model(input_ids=ids, attention_mask=mask)
            rec.annotate(labels=[0, 1, 1])
        recs[key] = rec.routing
    mt, mo = ll.router_metrics(recs["theirs"]), ll.router_metrics(recs["ours"])
    assert list(mt.site.str.removeprefix("base_model.model.")) == list(mo.site)
    assert (mt.kind == "peft-lily").all() and (mo.kind == "lily").all()
    cols = ll.analysis.METRIC_COLUMNS
    assert np.allclose(mt[cols].to_numpy(), mo[cols].to_numpy(), atol=1e-6)
    for nt, no in zip(recs["theirs"].sites, recs["ours"].sites):
        assert np.abs(recs["theirs"].probs(nt) - recs["ours"].probs(no)).max() <= 1e-6
        assert np.abs(recs["theirs"].mixtures(nt) - recs["ours"].mixtures(no)).max() <= 1e-6


def test_metrics_are_exact_whatever_the_sample_size():
    model = holder(E=4, r=3, routing="token")
    xs = [torch.randn(4, 9, 3) for _ in range(6)]
    with ll.record_routing(model, max_tokens=5) as small, ll.record_routing(model, max_tokens=10_000) as large:
        for i, x in enumerate(xs):
            model(x, torch.ones(4, 9))
            small.annotate(labels=[i % 2] * 4, input_ids=torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(i)))
            large.annotate(labels=[i % 2] * 4, input_ids=torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(i)))
    a, b = ll.router_metrics(small.routing), ll.router_metrics(large.routing)
    cols = ll.analysis.METRIC_COLUMNS
    assert np.allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-12)
    assert len(small.routing.probs(small.routing.sites[0])) == 5
    assert len(large.routing.probs(large.routing.sites[0])) == 216
    for by in ("label", "token"):
        sa, sb = ll.specialization(small.routing, by=by), ll.specialization(large.routing, by=by)
        assert np.allclose(sa["usage"], sb["usage"]) and np.allclose(sa["mutual_information"], sb["mutual_information"])


def _algorithm_r(size, seed, stream_chunks):
    """Vitter's algorithm R row by row, drawing one uniform per row past the first ``size`` from
    the same generator: the reference the vectorised ``Reservoir.add`` must match."""
    rng, sample, seen, out = np.random.default_rng(seed), [], 0, []
    for chunk in stream_chunks:
        slots = []
        for row in chunk:
            if size == 0:
                slot = -1
            elif seen < size:
                slot = seen
                sample.append(row)
            else:
                j = int(rng.random() * (seen + 1))
                slot = j if j < size else -1
                if slot >= 0:
                    sample[slot] = row
                    slots = [-1 if s == slot else s for s in slots]  # evicted within this chunk
            slots.append(slot)
            seen += 1
        out.append(np.array(slots, dtype=np.int64))
    return out, np.array(sample, dtype=np.int64)


@pytest.mark.parametrize("size", [0, 1, 7, 50, 200])
def test_reservoir_keeps_the_sample_of_row_by_row_algorithm_r(size):
    from lily_lab.observe.routing import Reservoir

    for seed in range(4):
        rng, start, chunks = np.random.default_rng(100 + seed), 0, []
        for n in rng.integers(0, 60, 25):
            chunks.append(np.arange(start, start + n))
            start += n
        slots, sample = _algorithm_r(size, seed, chunks)
        res = Reservoir(size, {"v": ((), np.int64), "w": ((2,), np.float32)}, seed=seed)
        for chunk, expected in zip(chunks, slots):
            got = res.add({"v": chunk, "w": np.stack([chunk, -chunk], axis=1).astype(np.float32)})
            assert np.array_equal(got, expected)
        assert np.array_equal(res.columns["v"], sample)
        assert np.array_equal(res.columns["w"][:, 1], -sample.astype(np.float32))
        assert res.seen == start


def test_reservoir_sample_is_uniform_over_the_stream():
    from lily_lab.observe.routing import Reservoir

    hits = np.zeros(200)
    for seed in range(300):
        res = Reservoir(20, {"v": ((), np.int64)}, seed=seed)
        for start in range(0, 200, 17):
            res.add({"v": np.arange(start, min(start + 17, 200))})
        assert len(res) == 20 and len(set(res.columns["v"])) == 20
        hits[res.columns["v"]] += 1
    # each item kept with probability 20/200: expected 30 hits in 300 runs
    assert abs(hits[:100].mean() - 30) < 3 and abs(hits[100:].mean() - 30) < 3


# ----------------------------------------------------------------------------- lifecycle


def test_hooks_are_removed_on_exit_and_on_error():
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query"], r=2, num_B=2))
    layer = model.encoder.layer[0].attention.self.query
    before = (len(model._forward_pre_hooks), len(model._forward_hooks))
    with pytest.raises(RuntimeError):
        with ll.record_routing(model):
            model(input_ids=torch.randint(0, 100, (1, 4)))
            raise RuntimeError("user code failed")
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == before and not layer._observers
    with pytest.raises(Exception):
        with ll.record_routing(model):
            model(input_ids=torch.full((1, 4), 10_000))  # an index error inside the forward
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == before and not layer._observers


def test_two_recorders_on_one_model_both_record():
    model = holder()
    x = torch.randn(2, 3, 3)
    with ll.record_routing(model) as outer:
        model(x)
        with ll.record_routing(model) as inner:
            model(x)
    name = outer.routing.sites[0]
    assert outer.routing.record(name).n_tokens == 12 and inner.routing.record(name).n_tokens == 6


def test_training_mode_gradients_flow_and_nothing_is_kept_from_the_graph():
    model = holder()
    model.train()
    x = torch.randn(2, 3, 3)
    with ll.record_routing(model) as rec:
        model(x).sum().backward()
    assert ll.adapter_sites(model)[0].router.grad is not None
    rec_ = rec.routing.record(rec.routing.sites[0])
    assert isinstance(rec_.tokens.columns["probs"], np.ndarray)


def _nbytes(routing: Routing) -> int:
    total = 0
    for name in routing.sites:
        rec = routing.record(name)
        for res in (rec.tokens, rec.mixtures):
            total += sum(a.nbytes for a in res.columns.values())
        total += len(rec.token_sums) + len(rec.label_sums)
    return total


def test_memory_does_not_grow_across_1000_calls():
    model = holder(routing="sequence")
    with ll.record_routing(model, max_tokens=256) as rec:
        for i in range(1000):
            x = torch.randn(4, 8, 3)
            model(x, torch.ones(4, 8))
            rec.annotate(labels=[i % 3] * 4, input_ids=torch.randint(0, 50, (4, 8)))
            if i == 99:
                at_100 = _nbytes(rec.routing)
    assert _nbytes(rec.routing) == at_100
    assert rec.routing.record(rec.routing.sites[0]).n_tokens == 32_000


def test_nonfinite_router_outputs_are_counted_not_crashing():
    model = holder()
    x = torch.randn(2, 3, 3)
    x[0, 1, 0] = float("nan")
    m, _ = metrics_of(model, (x,))
    assert m.iloc[0].nonfinite == 1 and m.iloc[0].n_tokens == 5 and np.isfinite(m.iloc[0].load_entropy)


# ----------------------------------------------------------------------------- Routing object


def test_save_load_merge_and_token_table(tmp_path):
    model = holder(routing="token")
    with ll.record_routing(model, max_tokens=50) as a:
        for i in range(4):
            model(torch.randn(2, 5, 3))
            a.annotate(labels=["neg", "pos"], input_ids=torch.arange(10).reshape(2, 5))
    with ll.record_routing(model, max_tokens=50) as b:
        model(torch.randn(3, 5, 3))
        b.annotate(labels=["pos", "pos", "neutral"])
    path = a.routing.save(tmp_path / "rec.npz")
    loaded = Routing.load(path)
    assert ll.router_metrics(loaded).equals(ll.router_metrics(a.routing))
    assert np.array_equal(loaded.probs(loaded.sites[0]), a.routing.probs(a.routing.sites[0]))
    merged = Routing.merge([a.routing, b.routing])
    name = merged.sites[0]
    assert merged.record(name).n_tokens == 40 + 15
    assert len(merged.probs(name)) == 50
    spec = ll.specialization(merged, by="label")
    counts = spec.drop_duplicates("value").set_index("value")["n_tokens"].to_dict()
    assert counts == {"neg": 20, "pos": 20 + 10, "neutral": 5}

    class Tok:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}" for i in ids]

    table = a.routing.token_table(tokenizer=Tok())
    assert set(table.columns) >= {"site", "sequence", "position", "token_id", "token", "label", "p0", "p1", "p2"}
    assert (table.token == "t" + table.token_id.astype(str)).all()
    assert set(table.label) == {"neg", "pos"}


def test_record_dataset_with_labels_and_progress(capsys):
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=2, init_weights=False))
    data = [{"input_ids": torch.randint(0, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1])} for _ in range(3)]
    routing = ll.record_dataset(model, data, desc="probe")
    assert routing.n_calls == 3 and routing.record(routing.sites[0]).n_tokens == 36
    assert set(ll.specialization(routing).value) == {0, 1}
    assert "probe" in capsys.readouterr().err


def test_sites_summed_in_slices_record_exactly_what_one_slice_records(monkeypatch):
    from lily_lab.observe import record

    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=3, init_weights=False,
                                                   routing="token"))
    x = {"input_ids": torch.randint(0, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    x["attention_mask"][1, 5:] = 0

    def recording():
        with ll.record_routing(model, max_tokens=10) as rec, torch.no_grad():
            for _ in range(4):
                model(**x)
                rec.annotate(labels=[0, 1, 1])
        return rec.routing

    whole = recording()
    monkeypatch.setattr(record, "_SUM_BYTES", 1)  # one site per slice
    sliced = recording()
    assert whole.sites == sliced.sites and len(whole.sites) > 2
    for site in whole.sites:
        a, b = whole.record(site), sliced.record(site)
        assert a.n_tokens == b.n_tokens == 4 * 23
        for field in ("sum_probs", "argmax_counts", "sum_mixture"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
        assert a.sum_z == b.sum_z and a.sum_token_entropy == b.sum_token_entropy
        assert np.array_equal(whole.probs(site), sliced.probs(site))  # the same reservoir sample
        assert a.label_sums.keys() == b.label_sums.keys()


def test_record_dataset_runs_in_eval_mode_and_restores_each_module():
    torch.manual_seed(0)
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=2, init_weights=False))
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5  # heavy dropout: a recording in training mode would differ run to run
    model.train()
    model.pooler.eval()  # a mixed state, to be restored as it was
    before = {name: m.training for name, m in model.named_modules()}
    data = [{"input_ids": torch.randint(0, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long)}]
    a = ll.record_dataset(model, data, progress=False)
    b = ll.record_dataset(model, data, progress=False)
    site = a.sites[-1]  # the last layer: its input went through every dropout before it
    assert np.array_equal(a.record(site).sum_probs, b.record(site).sum_probs)  # no dropout noise
    model.eval()
    in_eval = ll.record_dataset(model, data, progress=False)
    assert np.allclose(in_eval.record(site).sum_probs, a.record(site).sum_probs, rtol=0, atol=1e-12)
    model.train()
    model.pooler.eval()
    with pytest.raises(Exception):
        ll.record_dataset(model, data + [{"input_ids": torch.full((1, 4), 10_000)}], progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors_are_clear(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(target_modules=["query"], r=2))
    with pytest.raises(RoutingError, match="3 PEFT LoRA sites, no router"):
        ll.record_routing(lora).__enter__()
    model = holder()
    with ll.record_routing(model) as rec:
        model(torch.randn(2, 3, 3))
        with pytest.raises(RoutingError, match="3 labels, but the last call had 2 sequences"):
            rec.annotate(labels=[0, 1, 2])
    with pytest.raises(RoutingError, match="sites: proj"):
        rec.routing.probs("nope")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(RoutingError, match="not a lily_lab routing file"):
        Routing.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "foreign.npz", a=np.arange(3))
    with pytest.raises(RoutingError, match="header"):
        Routing.load(tmp_path / "foreign.npz")
    with pytest.raises(RoutingError, match="no routing file"):
        Routing.load(tmp_path / "missing.npz")


# ----------------------------------------------------------------------------- timeline


def test_routing_callback_with_trainer(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3))
    model.classifier.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 100, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(32)]
    probe = {"input_ids": torch.randint(0, 100, (4, 6), generator=g), "labels": torch.tensor([0, 1, 0, 1])}
    cb = ll.RoutingCallback(probe=probe, every=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[cb]).train()
    assert cb.timeline.steps == [0, 2, 4, 6]
    tm = ll.timeline_metrics(cb.timeline)
    assert set(tm.step) == {0, 2, 4, 6} and set(tm.metric) == set(ll.analysis.METRIC_COLUMNS)
    assert len(tm) == 4 * 4 * len(ll.analysis.METRIC_COLUMNS)  # steps × sites × metrics
    sim = ll.timeline_expert_similarity(cb.timeline)
    first, last = sim[sim.step == 0], sim[sim.step == 6]
    assert (first.mean_norm == 0).all() and (last.mean_norm > 0).all()  # zero-initialised B, then trained
    assert model.training  # the callback put the mode back


def test_timeline_in_a_plain_loop():
    model = holder()
    tl = ll.Timeline(probe=torch.randn(2, 4, 3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        tl.observe(model, step)
        model(torch.randn(2, 4, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    tm = ll.timeline_metrics(tl)
    assert list(tm.step.unique()) == [0, 1, 2]
    with pytest.raises(RoutingError, match="probe"):
        ll.Timeline().observe(model, 0)


def test_every_site_samples_the_same_tokens():
    """A sampled sentence can be shown across all sites: each site's token sample (smaller than
    the stream) keeps the same (call, sequence, position) triples."""
    model = tiny_bert()
    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="token", init_weights=False))
    g = torch.Generator().manual_seed(0)
    with ll.record_routing(model, max_tokens=50) as rec:
        for _ in range(5):
            model(input_ids=torch.randint(0, 100, (4, 10), generator=g), attention_mask=torch.ones(4, 10, dtype=torch.long))
    table = rec.routing.token_table()
    kept = {site: set(map(tuple, part[["call", "sequence", "position"]].to_numpy().tolist()))
            for site, part in table.groupby("site")}
    first = next(iter(kept.values()))
    assert len(kept) == 6 and len(first) == 50
    assert all(k == first for k in kept.values())


def test_specialization_gives_each_label_its_own_load_entropy():
    """Hand-computed: H(u_v) / ln E of the label's usage vector, as router_metrics does for a site."""
    model = holder(E=3, r=3, routing="token")
    with ll.record_routing(model) as rec:
        for i in range(3):
            model(torch.randn(2, 5, 3), torch.ones(2, 5))
            rec.annotate(labels=["a", "b"])
    spec = ll.specialization(rec.routing, by="label")
    for _, part in spec.groupby("value"):
        u = part.sort_values("expert").usage.to_numpy()
        assert part.load_entropy.nunique() == 1
        assert part.load_entropy.iloc[0] == pytest.approx(-(u * np.log(u)).sum() / np.log(3), rel=1e-9)
