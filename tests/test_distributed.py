"""Scaling out: DDP, FSDP and ``Trainer`` on 2 CPU processes (gloo), routing gathered across ranks,
FSDP unit planning, and dtype/device readiness (bf16 on CPU; CUDA when present).

The multi-process runs are two launches — ``torchrun`` (tests/dist_scripts/ddp_worker.py) and
``accelerate launch`` (tests/dist_scripts/trainer_worker.py) — each running every scenario once,
since process start-up (importing torch and transformers) costs more than the scenarios. The
tests compare what the ranks wrote with single-process references computed here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import lily_lab
from lily_lab.core import fsdp
from lily_lab.observe.routing_file import routing_bytes

from _scripts import SCRIPTS, load_script


common, launch = load_script("common"), load_script("launch")


# --------------------------------------------------------------------------- the two launches


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ranks = launch.launch(launch.torchrun_command, SCRIPTS / "ddp_worker.py", out)
    return out, ranks


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    ranks = launch.launch(launch.accelerate_command, SCRIPTS / "trainer_worker.py", out)
    return out, ranks


@pytest.fixture(scope="module")
def reference():
    """Single-process training on the same global batches (cached: several tests compare to it)."""
    batches = common.make_batches()
    return {
        "initial": common.adapter_state(common.build_model("sequence")),
        "sequence": common.train_reference("sequence", batches),
        "token": common.train_reference("token", batches),
        "batch": common.train_reference("batch", batches),
        "batch_per_shard": common.train_reference("batch", batches, shards=common.WORLD),
    }


def _ranks_agree_and_match(ranks, key, ref, initial):
    a, b = ranks[0][key], ranks[1][key]
    assert common.max_difference(a, b) == 0.0, f"{key}: the ranks' adapters differ"
    assert common.max_difference(a, ref) <= 1e-5, f"{key}: differs from the single-process run"
    assert common.max_difference(ref, initial) > 1e-3, "the adapter barely moved: the comparison proves nothing"


# --------------------------------------------------------------------------- DDP and Trainer


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_ddp_equals_one_process_on_the_global_batch(ddp_run, reference, routing):
    # Shared A (stride_A=2) and B (every layer) are one nn.Parameter each: DDP reduces each once,
    # and find_unused_parameters=False would have failed on a parameter left without gradient.
    _, ranks = ddp_run
    assert ranks[0]["world"] == 2
    _ranks_agree_and_match(ranks, f"ddp_{routing}", reference[routing], reference["initial"])


def test_ddp_batch_routing_averages_the_router_per_shard(ddp_run, reference):
    # Documented: under DDP, batch routing's mixture is the mean over the rank's own shard, so the
    # run equals one process taking each shard as its own forward call (losses averaged) ...
    _, ranks = ddp_run
    got = ranks[0]["ddp_batch"]
    assert common.max_difference(got, ranks[1]["ddp_batch"]) == 0.0
    assert common.max_difference(got, reference["batch_per_shard"]) <= 1e-5
    # ... and not one process routing the whole global batch together.
    assert common.max_difference(got, reference["batch"]) > 1e-4


def test_trainer_on_two_processes_equals_one_process(trainer_run, reference):
    _, ranks = trainer_run
    assert ranks[0]["world"] == 2 and ranks[0]["wrapper"] == "DistributedDataParallel"
    a, b = ranks[0]["adapter"], ranks[1]["adapter"]
    assert common.max_difference(a, b) == 0.0
    assert common.max_difference(a, reference["sequence"]) <= 1e-5


def test_routing_callback_keeps_observations_on_rank_zero_only(trainer_run, reference):
    out, ranks = trainer_run
    assert ranks[0]["observed_steps"] == [0, 2, 4]
    assert ranks[1]["observed_steps"] == []
    assert not (out / "timeline_last_rank1.npz").exists()
    # Rank 0's last observation is what one process observes with the same weights.
    model = _model_with(reference["sequence"])
    timeline = lily_lab.Timeline(probe=dict(common.make_batches()[0]))
    timeline.observe(model, step=common.STEPS)
    _same_metrics(lily_lab.Routing.load(out / "timeline_last_rank0.npz"), timeline.routings[0], atol=1e-6)


# --------------------------------------------------------------------------- routing across ranks


def _single_process_recording():
    model = common.build_model("sequence", seed=3).eval()
    with lily_lab.record_routing(model) as rec, torch.no_grad():
        for call in common.recording_calls(None):
            model(input_ids=call["input_ids"], attention_mask=call["attention_mask"])
            rec.annotate(labels=call["labels"])
    return rec.routing


def _same_metrics(got, want, atol=1e-9):
    a, b = lily_lab.router_metrics(got), lily_lab.router_metrics(want)
    assert list(a.columns) == list(b.columns) and list(a["site"]) == list(b["site"])
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=0, atol=atol)


def test_record_routing_gathers_on_exit_into_rank_zero(ddp_run):
    out, _ = ddp_run
    whole = _single_process_recording()
    got = lily_lab.Routing.load(out / "auto_rank0.npz")
    _same_metrics(got, whole)
    a, b = lily_lab.specialization(got, by="label"), lily_lab.specialization(whole, by="label")
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=0, atol=1e-9)
    assert (got.n_calls, got.n_sequences, sorted(got.labels)) == (whole.n_calls, whole.n_sequences, sorted(whole.labels))
    for site in whole.sites:  # every token fits the sample: rank 0's then rank 1's, as one process saw them
        np.testing.assert_array_equal(got.probs(site), whole.probs(site))
        np.testing.assert_array_equal(got.record(site).tokens.columns["sequence"], whole.record(site).tokens.columns["sequence"])
    # Rank 1 keeps its own shard.
    mine = lily_lab.Routing.load(out / "auto_rank1.npz")
    local = lily_lab.Routing.load(out / "local_rank1.npz")
    _same_metrics(mine, local, atol=0)
    assert mine.n_sequences == whole.n_sequences // 2


def test_gather_on_every_rank_by_record_dataset_and_with_a_bounded_sample(ddp_run):
    out, _ = ddp_run
    whole = _single_process_recording()
    for rank in range(common.WORLD):
        _same_metrics(lily_lab.Routing.load(out / f"all_rank{rank}.npz"), whole)
    _same_metrics(lily_lab.Routing.load(out / "dataset_rank0.npz"), whole)  # record_dataset gathers too
    small = lily_lab.Routing.load(out / "small_rank0.npz")
    _same_metrics(small, whole)  # the sums are exact whatever the sample size
    assert all(len(small.probs(s)) == 10 for s in small.sites)
    assert small.record(small.sites[0]).tokens.seen == whole.record(whole.sites[0]).n_tokens


def test_gather_error_on_one_rank_reaches_every_rank_without_a_hang(ddp_run):
    _, ranks = ddp_run
    assert "rank 1" in ranks[0]["bad_label"] and "JSON" in ranks[0]["bad_label"]
    assert "JSON" in ranks[1]["bad_label"]


def test_gather_without_a_process_group_returns_the_recording():
    model = common.build_model("token").eval()
    batch = common.make_batches(1)[0]
    with lily_lab.record_routing(model, gather=True) as rec, torch.no_grad():  # one process: nothing to do
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert rec.routing.gather() is rec.routing
    assert rec.routing.gather(all_ranks=True) is rec.routing
    with pytest.raises(lily_lab.RoutingError, match="gather must be True, False or None"):
        with lily_lab.record_routing(model, gather="yes"):
            pass


def test_gather_sends_the_saved_format(tmp_path):
    # What travels between ranks is Routing.save's file, read back with every check load makes.
    from lily_lab.observe.distributed import _routing_from_bytes

    routing = _single_process_recording()
    back = _routing_from_bytes(routing_bytes(routing), "rank 0's recording")
    loaded = lily_lab.Routing.load(routing.save(tmp_path / "r.npz"))
    _same_metrics(back, loaded, atol=0)
    assert back.labels == loaded.labels and back.n_calls == loaded.n_calls
    with pytest.raises(lily_lab.RoutingError, match="rank 1's recording"):
        _routing_from_bytes(b"not an npz", "rank 1's recording")


# --------------------------------------------------------------------------- FSDP


def test_fsdp2_lily_fully_shard_equals_one_process(ddp_run, reference):
    _, ranks = ddp_run
    _ranks_agree_and_match(ranks, "fsdp2", reference["sequence"], reference["initial"])


def test_fsdp1_lily_auto_wrap_policy_equals_one_process(ddp_run, reference):
    _, ranks = ddp_run
    _ranks_agree_and_match(ranks, "fsdp1", reference["sequence"], reference["initial"])


def test_timeline_of_an_fsdp2_model_sees_full_banks(ddp_run, reference):
    out, ranks = ddp_run
    model = _model_with(reference["sequence"])
    timeline = lily_lab.Timeline(probe=dict(common.make_batches()[0]))
    timeline.observe(model, step=common.STEPS)
    _same_metrics(lily_lab.Routing.load(out / "fsdp2_timeline.npz"), timeline.routings[0], atol=1e-6)
    for group, bank in timeline.banks[0].items():
        np.testing.assert_allclose(ranks[0]["fsdp2_banks"][group].numpy(), bank, atol=1e-5)


def test_per_layer_fsdp_wrapping_is_refused_with_a_clear_error(ddp_run):
    _, ranks = ddp_run
    for key in ("fsdp1_split", "fsdp2_split"):
        message = ranks[0][key]
        assert "splits the bank B of group 'query:32x32' across 4 units" in message, message
        assert "'bert.encoder'" in message and "lily_fully_shard" in message
        assert "_fsdp_wrapped_module" not in message


UNIT_CASES = [
    # (targets, layer_cls, FSDP2 units, modules the FSDP1 policy wraps)
    (["query", "value"], None,
     [[f"bert.encoder.layer.{i}.attention.self.query" for i in range(4)],
      [f"bert.encoder.layer.{i}.attention.self.value" for i in range(4)],
      "bert.embeddings", *[f"bert.encoder.layer.{i}" for i in range(4)]],
     {"bert.encoder", "bert.embeddings"}),
    # Sites in layers 0–1 only: the group's unit for FSDP1 is the encoder (the ModuleList is never
    # called); layers 2–3 hold no site and keep units of their own.
    (r".*layer\.[01]\.attention\.self\.query", ("BertLayer",),
     [[f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)],
      *[f"bert.encoder.layer.{i}" for i in range(4)]],
     {"bert.encoder", "bert.encoder.layer.2", "bert.encoder.layer.3"}),
    # A group of one site: that site's layer may be a unit.
    (r".*layer\.1\.attention\.self\.query", "BertLayer",
     [["bert.encoder.layer.1.attention.self.query"], *[f"bert.encoder.layer.{i}" for i in range(4)]],
     {"bert.encoder.layer.1.attention.self.query", *[f"bert.encoder.layer.{i}" for i in range(4)]}),
]


@pytest.mark.parametrize("targets, layer_cls, units, fsdp1", UNIT_CASES)
def test_fsdp_units_keep_shared_tensors_whole(targets, layer_cls, units, fsdp1):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**common.TINY_BERT))
    lily_lab.add_lily(model, lily_lab.LilyConfig(targets, r=2, stride_A=2, num_B=2))
    got = fsdp.lily_fsdp_units(model, layer_cls)
    assert sorted(map(sorted, got)) == sorted(sorted([u] if isinstance(u, str) else u) for u in units)
    fsdp.check_fsdp_units(model, got)
    policy = fsdp.lily_auto_wrap_policy(model, layer_cls)
    wrapped = {n for n, m in model.named_modules() if policy._lambda_fn(m)}
    assert wrapped == fsdp1


@pytest.mark.parametrize("units, split", [
    (["bert.encoder.layer.0"], "bank B of group 'query:32x32'"),
    ([["bert.encoder.layer.0", "bert.encoder.layer.1"], ["bert.encoder.layer.2", "bert.encoder.layer.3"]],
     "bank B of group 'query:32x32' across 2 units"),
    (["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"],
     "across 3 units"),  # two sites in units of their own, the other two at the root
])
def test_check_fsdp_units_names_the_split_bank(units, split):
    model = common.build_model("sequence")
    with pytest.raises(fsdp.FSDPSplitError, match=split) as err:
        fsdp.check_fsdp_units(model, units)
    assert isinstance(err.value, lily_lab.LilyLabError) and isinstance(err.value, ValueError)
    fsdp.check_fsdp_units(model, ["bert.encoder", "bert.embeddings", "bert.encoder.layer.0.intermediate"])


@pytest.mark.parametrize("call, message", [
    (lambda m: fsdp.check_fsdp_units(m, ["bert.nope"]), "no module named 'bert.nope'"),
    (lambda m: fsdp.lily_fsdp_units(torch.nn.Sequential(torch.nn.Linear(2, 2))), "add_lily"),
    (lambda m: fsdp.lily_auto_wrap_policy(torch.nn.Sequential(torch.nn.Linear(2, 2))), "add_lily"),
    (lambda m: fsdp.lily_fsdp_units(m, "LlamaDecoderLayer"), "matched no module; module classes here: .*BertLayer"),
    (lambda m: fsdp.lily_fsdp_units(m, [3]), "layer_cls takes module classes or class names, got 3"),
])
def test_fsdp_planning_errors(call, message):
    with pytest.raises(fsdp.FSDPLayoutError, match=message) as err:
        call(common.build_model("sequence"))
    assert not isinstance(err.value, fsdp.FSDPSplitError) and isinstance(err.value, lily_lab.LilyLabError)


# --------------------------------------------------------------------------- dtypes and devices


def _model_with(state: dict):
    model = common.build_model("sequence")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    return model.eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm())


def _outputs_and_grads(model, batch):
    out = model(**batch)
    out.loss.backward()
    return out.logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_shared(model):
    sites = [s for s in lily_lab.adapter_sites(model)]
    for s in sites:
        first = next(t for t in sites if t.group == s.group)
        assert s.B is first.B
        same_a = next(t for t in sites if t.group == s.group and t.a_index == s.a_index)
        assert s.A is same_a.A
    assert len({id(s.A) for s in sites}) == 4  # 2 groups × ⌈4 / stride_A 2⌉


# The whole model runs in bf16 (frozen base included): unit roundoff 2⁻⁸ ≈ 4e-3, compounded over
# four layers. Measured here: outputs ≤ 9e-3, each adapter gradient ≤ 3e-2 (relative, L2).
BF16_OUTPUT, BF16_GRAD = 2e-2, 5e-2


@pytest.mark.parametrize("routing", ["batch", "sequence", "token"])
def test_bf16_forward_and_backward_agree_with_fp32(routing):
    model = common.build_model(routing).train()
    half = copy.deepcopy(model).to(torch.bfloat16)
    _assert_shared(half)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    batch = common.make_batches(1)[0]
    out32, g32 = _outputs_and_grads(model, batch)
    out16, g16 = _outputs_and_grads(half, batch)
    assert out16.dtype == torch.bfloat16
    assert _relative(out16, out32) < BF16_OUTPUT
    for name, g in g32.items():
        assert g16[name].dtype == torch.bfloat16
        assert _relative(g16[name], g) < BF16_GRAD, name


def test_bf16_autocast_on_cpu_agrees_with_fp32():
    # Mixed precision (Trainer's bf16=True): fp32 weights and gradients, bf16 matmuls.
    model = common.build_model("sequence").train()
    mixed = copy.deepcopy(model)
    batch = common.make_batches(1)[0]
    out32, g32 = _outputs_and_grads(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, g16 = _outputs_and_grads(mixed, batch)
    assert _relative(out16, out32) < BF16_OUTPUT
    for name, g in g32.items():
        assert g16[name].dtype == torch.float32 and _relative(g16[name], g) < BF16_GRAD, name


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_model_keeps_sharing_and_trains_in_bf16():
    model = common.build_model("sequence").train()
    gpu = copy.deepcopy(model).to("cuda")
    _assert_shared(gpu)
    assert all(p.is_cuda for p in gpu.parameters())
    gpu = gpu.to(torch.bfloat16)
    _assert_shared(gpu)
    batch = common.make_batches(1)[0]
    out32, g32 = _outputs_and_grads(model, batch)
    out16, g16 = _outputs_and_grads(gpu, {k: v.cuda() for k, v in batch.items()})
    assert out16.is_cuda and out16.dtype == torch.bfloat16
    assert _relative(out16, out32) < BF16_OUTPUT
    for name, g in g32.items():
        assert g16[name].is_cuda and torch.isfinite(g16[name]).all()
        assert _relative(g16[name], g) < BF16_GRAD, name


@cuda
def test_cuda_recording_equals_cpu_recording():
    model = common.build_model("sequence", seed=3).eval()
    gpu = copy.deepcopy(model).to("cuda")
    recordings = []
    for m, device in ((model, "cpu"), (gpu, "cuda")):
        with lily_lab.record_routing(m) as rec, torch.no_grad():
            for call in common.recording_calls(None):
                m(input_ids=call["input_ids"].to(device), attention_mask=call["attention_mask"].to(device))
                rec.annotate(labels=call["labels"])
        recordings.append(rec.routing)
    _same_metrics(recordings[1], recordings[0], atol=1e-4)


# --------------------------------------------------------------------------- the README


def test_readme_shows_the_launch_commands_the_tests_run():
    readme = (launch.ROOT / "README.md").read_text()
    if "## Scaling out" not in readme:
        pytest.skip("README.md has no 'Scaling out' section yet")
    section = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    for build, tool, script in ((launch.torchrun_command, "torchrun", "ddp_worker.py"),
                                (launch.accelerate_command, "accelerate", "trainer_worker.py")):
        command = build(Path("tests/dist_scripts") / script, Path("OUT_DIR"), 29500)
        start = command.index("launch") if tool == "accelerate" else command.index("--nproc_per_node")
        assert " ".join([tool, *command[start:]]) in section, f"README lacks the {tool} command the tests run"
