"""RoutingMonitor and RoutingCallback: router metrics of the training batches themselves, the keys
they log, the early warning and stopping — against metrics recomputed from an independent
recording of the same batches."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

import lily_lab as ll
from lily_lab.monitor import WATCHED, bank_labels

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
           num_labels=2)


def classifier(routing="token", healthy=True, seed=0, **lily):
    """A tiny BERT classifier with Lily on query/value. ``healthy``: random B and a router sharp
    enough that routing depends on the input; else every bank's experts are one and the same."""
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**CFG))
    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing=routing, init_weights=False, **lily))
    with torch.no_grad():
        for site in ll.adapter_sites(model):
            if healthy:
                site.router.mul_(5.0)
            else:
                site.B.copy_(site.B[:1].expand_as(site.B))
    return model


def hook_count(model) -> int:
    """Forward hooks, pre-hooks and routing observers on the model's modules."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(getattr(m, "_observers", ()))
               for m in model.modules())


def batches(n, b=4, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": torch.randint(0, 100, (b, t), generator=g), "attention_mask": mask,
                    "labels": torch.randint(0, 2, (b,), generator=g)})
    return out


def train(model, data, monitor=None, every=2, extra=None):
    """A plain loop; ``monitor.observe`` every ``every`` steps; ``extra`` a context open around it."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logs = {}
    model.train()
    for step, batch in enumerate(data, 1):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if monitor is not None and step % every == 0:
            logs[step] = monitor.observe(step)
    return logs


def test_traffic_metrics_equal_an_independent_recording_of_the_same_batches():
    model = classifier()
    data = batches(4)
    monitor = ll.RoutingMonitor(model, per="both")
    with ll.record_routing(model, training_only=True) as rec:  # a second recorder on the same forwards
        train(model, data[:2], monitor, every=2)
    logs = monitor.log_dict()
    want = ll.router_metrics(rec.routing)
    assert monitor.per == "both" and len(want) == 6
    for row in want.itertuples():  # per site: exactly the recording's metrics
        for metric in ("load_entropy", "routing_mi", "max_usage", "z_loss"):
            assert logs[f"lily/{row.site}/{metric}"] == pytest.approx(getattr(row, metric), rel=1e-9, abs=1e-12)
    for module, rows in want.groupby("module"):  # per module: min / median / max across layers
        for metric in ("load_entropy", "routing_mi", "max_usage", "z_loss"):
            values = rows[metric].to_numpy()
            assert logs[f"lily/{module}/{metric}/min"] == pytest.approx(values.min(), rel=1e-9)
            assert logs[f"lily/{module}/{metric}/median"] == pytest.approx(np.median(values), rel=1e-9)
            assert logs[f"lily/{module}/{metric}/max"] == pytest.approx(values.max(), rel=1e-9)
    banks = ll.bank_summary(model)
    for group, label in bank_labels(banks.group).items():
        assert logs[f"lily/{label}/expert_cosine"] == pytest.approx(banks.set_index("group").mean_cosine[group])
    assert {f"lily/findings/{k}" for k in WATCHED} <= set(logs)
    # real tokens only (the padding is left out): the recording counted every masked-in token once
    n_real = sum(int(b["attention_mask"].sum()) for b in data[:2])
    assert monitor.timeline.routings[-1].record(want.site[0]).n_tokens == n_real
    monitor.close()


def test_traffic_is_reset_at_each_observation_and_leaves_evaluation_out():
    model = classifier()
    data = batches(6)
    hooks_before = hook_count(model)
    monitor = ll.RoutingMonitor(model)
    assert hook_count(model) > hooks_before
    train(model, data[:2])
    monitor.observe(2)
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in data[5].items() if k != "labels"})  # an evaluation forward: not training traffic
    train(model, data[2:5])
    monitor.observe(5)
    site = ll.adapter_sites(model)[0].name
    counts = [r.record(site).n_tokens for r in monitor.timeline.routings]
    assert counts == [sum(int(b["attention_mask"].sum()) for b in data[:2]),
                      sum(int(b["attention_mask"].sum()) for b in data[2:5])]
    assert monitor.timeline.steps == [2, 5] and len(monitor.timeline.banks) == 2
    monitor.close()
    assert hook_count(model) == hooks_before  # closed: its hooks are gone
    with pytest.raises(ll.InputError, match="closed"):
        monitor.observe(6)


def test_module_keys_for_a_deep_model_and_stable_names():
    model = classifier()
    monitor = ll.RoutingMonitor(model, per="module")
    train(model, batches(2), monitor, every=2)
    keys = set(monitor.log_dict())
    assert {"lily/query/load_entropy/min", "lily/value/z_loss/max", "lily/query/expert_cosine",
            "lily/findings/redundant_experts"} <= keys
    assert not any(k.startswith("lily/bert.") for k in keys)  # no per-site keys
    assert all(":" not in k for k in keys)  # MLflow refuses ':' in a metric name
    assert bank_labels(["q_proj:64x64", "q_proj:64x32", "v_proj:64x64"]) == {
        "q_proj:64x64": "q_proj_64x64", "q_proj:64x32": "q_proj_64x32", "v_proj:64x64": "v_proj"}


def test_early_warning_fires_once_on_identical_experts_and_stays_silent_on_a_healthy_model(caplog):
    collapsed = classifier(healthy=False)
    monitor = ll.RoutingMonitor(collapsed, warn_after=2)
    with caplog.at_level(logging.WARNING, logger="transformers.trainer"):
        logs = train(collapsed, batches(8), monitor, every=2)
    assert [logs[s]["lily/findings/redundant_experts"] for s in (2, 4, 6, 8)] == [2.0] * 4  # both banks, each time
    assert [s for s in logs if "lily/warning/redundant_experts" in logs[s]] == [4]  # the 2nd in a row, once
    (warning,) = [w for w in monitor.warnings if w.kind == "redundant_experts"]
    assert warning.severity == "critical" and warning.step == 4 and warning.observations == 2
    assert sum("redundant_experts" in r.getMessage() for r in caplog.records) == 1
    assert "init_weights=False" in warning.remedy or "random" in warning.remedy.lower()
    assert not monitor.should_stop  # stop_on=None
    assert [h["step"] for h in monitor.history] == [2, 4, 6, 8]  # every observation's dict, kept
    assert [{**h, "step": None} for h in monitor.history] == [{**logs[s], "step": None} for s in (2, 4, 6, 8)]
    monitor.close()

    healthy = classifier(healthy=True)
    monitor = ll.RoutingMonitor(healthy, warn_after=2)
    logs = train(healthy, batches(8), monitor, every=2)
    assert monitor.warnings == []
    assert all(logs[s][f"lily/findings/{k}"] == 0.0 for s in logs for k in WATCHED)
    monitor.close()


def test_stop_on_critical():
    model = classifier(healthy=False)
    monitor = ll.RoutingMonitor(model, warn_after=1, stop_on="critical")
    train(model, batches(2), monitor, every=2)
    assert monitor.should_stop
    monitor.close()


def test_probe_mode_and_bad_options():
    model = classifier()
    probe = {k: v for k, v in batches(1, seed=9)[0].items()}
    monitor = ll.RoutingMonitor(model, probe=probe)
    assert not monitor.traffic
    logs = train(model, batches(2), monitor, every=2)
    assert monitor.timeline.steps == [2] and "lily/findings/dead_expert" in logs[2]
    monitor.close()
    with pytest.raises(ll.InputError, match="per must be"):
        ll.RoutingMonitor(model, per="layer")
    with pytest.raises(ll.InputError, match="warn_after"):
        ll.RoutingMonitor(model, warn_after=0)
    with pytest.raises(ll.InputError, match="stop_on"):
        ll.RoutingMonitor(model, stop_on="always")
    with pytest.raises(ll.InputError, match="probe"):
        ll.RoutingMonitor(model, traffic=False)
    with pytest.raises(ll.InputError, match="unknown thresholds"):
        ll.RoutingMonitor(model, thresholds={"dominant": 0.5})
    with pytest.raises(ll.InputError, match="no routed"):
        ll.RoutingMonitor(transformers.BertModel(transformers.BertConfig(**CFG)))


# ----------------------------------------------------------------------------- the Trainer


def rows(n=32, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 100, (t,), generator=g), "attention_mask": torch.ones(t, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(n)]


def trainer_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], save_strategy="no", logging_steps=2, use_cpu=True, disable_tqdm=True)
    return transformers.TrainingArguments(**{**base, **kw})


def test_trainer_logs_the_metrics_at_each_logging_step_and_saves_the_timeline(tmp_path):
    model = classifier()
    hooks_before = hook_count(model)
    cb = ll.RoutingCallback()
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path), train_dataset=rows(), callbacks=[cb])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    for h in logged:  # the Trainer's own history (trainer_state.json) holds them too
        assert "lily/bert.encoder.layer.0.attention.self.query/load_entropy" in h
        assert h["lily/findings/redundant_experts"] == 0.0
    assert cb.timeline.steps == [2, 4, 6]  # traffic, one recording per logging step
    saved = ll.Timeline.load(tmp_path / "lily_timeline.npz")
    assert saved.steps == [2, 4, 6]
    assert cb.monitor.closed and hook_count(model) == hooks_before  # closed at the end of training


def test_trainer_stops_on_a_critical_warning(tmp_path):
    model = classifier(healthy=False)
    cb = ll.RoutingCallback(warn_after=2, stop_on="critical")
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, max_steps=20), train_dataset=rows(80),
                                   callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 4  # the 2nd observation in a row: stopped there, not at 20
    assert [w.kind for w in cb.warnings] == ["redundant_experts"]
    (h,) = [h for h in trainer.state.log_history if "lily/warning/redundant_experts" in h]
    assert h["step"] == 4 and h["lily/warning/redundant_experts"].startswith("critical")


def test_the_callback_goes_in_front_of_the_reporting_integrations(tmp_path):
    from transformers.integrations import TensorBoardCallback

    model = classifier()
    cb = ll.RoutingCallback()
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, report_to=["tensorboard"]),
                                   train_dataset=rows(), callbacks=[cb])
    order = [type(c) for c in trainer.callback_handler.callbacks]
    assert order.index(type(cb)) < order.index(TensorBoardCallback)


def test_trainer_checkpoints_keep_one_copy_of_each_shared_tensor_and_resume(tmp_path):
    """A Trainer checkpoint of a lily_lab model (save_pretrained refuses tensors shared under
    several names unless declared tied: LilyLayer declares lily_A / lily_B), loaded back, and a run
    resumed from it; the callback's timeline is saved beside the checkpoints."""
    from safetensors.torch import load_file

    model = classifier()
    args = trainer_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    transformers.Trainer(model=model, args=args, train_dataset=rows(), callbacks=[ll.RoutingCallback()]).train()
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    banks = [k for k in saved if k.endswith("lily_B")]
    assert len(banks) == 2  # one name per bank (query, value), not one per site
    fresh = classifier(seed=1)  # other weights, the same lily_lab layout
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert not unexpected and all(k.endswith(("lily_A", "lily_B")) for k in missing)
    for (name, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), name  # every site, shared tensors included
    assert ll.Timeline.load(tmp_path / "lily_timeline.npz").steps == [2, 4]

    resumed = classifier(seed=2)
    trainer = transformers.Trainer(model=resumed, args=trainer_args(tmp_path, max_steps=6), train_dataset=rows(),
                                   callbacks=[ll.RoutingCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert trainer.state.global_step == 6
    assert [h["step"] for h in trainer.state.log_history if "lily/findings/dead_expert" in h] == [2, 4, 6]


def test_a_peft_lily_model_in_a_trainer_logs_under_the_same_site_keys(tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_B=3, init_weights=False))
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": torch.randint(0, 64, (8,), generator=g)}
            for _ in range(16)]
    cb = ll.RoutingCallback()
    trainer = transformers.Trainer(model=model, args=trainer_args(tmp_path, max_steps=4), train_dataset=data,
                                   callbacks=[cb])
    trainer.train()
    (first, second) = [h for h in trainer.state.log_history if "loss" in h]
    assert "lily/model.layers.1.self_attn.v_proj/load_entropy" in first  # no base_model.model. prefix
    assert not any(k.startswith("lily/base_model") for k in first)
    assert {"lily/q_proj/expert_cosine", "lily/v_proj/expert_cosine"} <= set(second)
    # the recording behind them: PEFT's layers, recomputed from their inputs, every token of the 2 steps
    site = "base_model.model.model.layers.0.self_attn.q_proj"
    assert cb.timeline.routings[-1].record(site).n_tokens == 2 * 4 * 8
