"""Multi-process checks under DDP and FSDP, one run of every scenario (process start-up dominates).

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \
        tests/dist_scripts/ddp_worker.py OUT_DIR

Each rank writes ``OUT_DIR/rank{r}.pt`` (adapter weights, messages) and ``OUT_DIR/*.npz``
(routing recordings); tests/test_distributed.py compares them with single-process references.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

import common  # noqa: E402
from common import adapter_state, build_model, make_batches, shard, train_step  # noqa: E402

import lily_lab  # noqa: E402
from lily_lab.core import fsdp  # noqa: E402


def ddp_training(routing: str, rank: int) -> dict:
    """DDP over the adapter (shared A and B included) without find_unused_parameters: a parameter
    that got no gradient, or got reduced twice, would fail or show in the weights."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(routing).train()
    ddp = DDP(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=common.LR)
    for batch in make_batches():
        train_step(ddp, optimizer, shard(batch, rank))
    return adapter_state(ddp.module)


def recordings(rank: int, out: Path) -> dict:
    """Each rank records its own calls; gathered on exit (default), on demand, on every rank."""
    model = build_model("sequence", seed=3).eval()
    calls = common.recording_calls(rank)
    notes = {}

    def run(rec):
        with torch.no_grad():
            for call in calls:
                model(input_ids=call["input_ids"], attention_mask=call["attention_mask"])
                rec.annotate(labels=call["labels"])

    with lily_lab.record_routing(model) as rec:  # gather=None: a process group is up, so gather
        run(rec)
    rec.routing.save(out / f"auto_rank{rank}.npz")
    with lily_lab.record_routing(model, gather=False) as rec:
        run(rec)
    rec.routing.save(out / f"local_rank{rank}.npz")
    rec.routing.gather(all_ranks=True).save(out / f"all_rank{rank}.npz")
    with lily_lab.record_routing(model, max_tokens=10) as rec:  # samples merged, sums still exact
        run(rec)
    rec.routing.save(out / f"small_rank{rank}.npz")
    loader = [{"input_ids": c["input_ids"], "attention_mask": c["attention_mask"], "labels": c["labels"]} for c in calls]
    lily_lab.record_dataset(model, loader, progress=False).save(out / f"dataset_rank{rank}.npz")

    # A rank that cannot send (a label that is not a JSON value) must not leave the other waiting.
    with lily_lab.record_routing(model, gather=False) as rec:
        model(input_ids=calls[0]["input_ids"])
        rec.annotate(labels=[object()] * 4 if rank == 1 else ["a"] * 4)
    try:
        rec.routing.gather()
        notes["bad_label"] = "no error"
    except lily_lab.RoutingError as err:
        notes["bad_label"] = str(err)
    return notes


def fsdp_runs(rank: int, out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    result = {}
    batches = make_batches()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    # FSDP2 along lily_fsdp_units (one unit per group's sites, one per BertLayer, the root).
    model = build_model("sequence").train()
    fsdp.lily_fully_shard(model, mesh=mesh)
    fsdp.check_fsdp_wrapping(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=common.LR)
    for batch in batches:
        train_step(model, optimizer, shard(batch, rank))
    result["fsdp2"] = adapter_state(model)  # full_tensor(): a collective, every rank takes part
    timeline = lily_lab.Timeline(probe={k: v for k, v in batches[0].items()})
    timeline.observe(model, step=len(batches))  # every rank runs it: the forward is collective
    if rank == 0:
        timeline.routings[0].save(out / "fsdp2_timeline.npz")
        result["fsdp2_banks"] = {g: torch.from_numpy(b) for g, b in timeline.banks[0].items()}

    # FSDP1 with lily_auto_wrap_policy (use_orig_params: a unit mixes frozen and trainable tensors).
    model = build_model("sequence").train()
    wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"),
                   auto_wrap_policy=fsdp.lily_auto_wrap_policy(model))
    fsdp.check_fsdp_wrapping(wrapped)
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=common.LR)
    for batch in batches:
        train_step(wrapped, optimizer, shard(batch, rank))
    with FSDP.summon_full_params(wrapped):
        result["fsdp1"] = adapter_state(wrapped)

    # The usual per-layer wrapping splits the banks: a clear error before the first forward.
    naive = FSDP(build_model("sequence"), use_orig_params=True, device_id=torch.device("cpu"),
                 auto_wrap_policy=ModuleWrapPolicy({BertLayer}))
    result["fsdp1_split"] = _split_message(naive)
    naive = build_model("sequence")
    for layer in naive.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(naive, mesh=mesh)
    result["fsdp2_split"] = _split_message(naive)
    return result


def _split_message(model) -> str:
    try:
        fsdp.check_fsdp_wrapping(model)
    except fsdp.FSDPSplitError as err:
        return str(err)
    return "no error"


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", timeout=common.TIMEOUT)
    try:
        rank = dist.get_rank()
        result = {"world": dist.get_world_size()}
        result["ddp_sequence"] = ddp_training("sequence", rank)
        result["ddp_token"] = ddp_training("token", rank)
        result["ddp_batch"] = ddp_training("batch", rank)
        result.update(recordings(rank, out))
        result.update(fsdp_runs(rank, out))
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
