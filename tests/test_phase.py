"""record_routing around generate: prompt (prefill) and generated (decode) tokens kept apart, with
exact per-phase sums, continuing sequences and positions, labels over a whole generation, phase
data through save/load/merge, and flat memory over thousands of generated tokens."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import lily_lab as ll
from lily_lab.observe.routing import LabelSums
from lily_lab.observe.routing_file import routing_bytes
from lily_lab.observe import Routing, RoutingError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from _tiny_lm import gpt2, llama  # noqa: E402


def lily(build, routing):
    torch.manual_seed(0)
    model, targets = build()
    return ll.add_lily(model, ll.LilyConfig(targets, r=4, num_B=3, routing=routing, init_weights=False))


def peft_lily():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model, targets = llama()
    return peft.get_peft_model(model, peft.LilyConfig(target_modules=targets, r=4, num_B=3, stride_A=2,
                                                      init_weights=False))


def prompts(b=3, t=6, seed=0):
    """Left-padded prompts, as generate batches them: sequence 1 padded by 2, sequence 2 by 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    if b > 2:
        mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def generate(model, ids, mask, new=5):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)


SUMS = ("n_tokens", "n_calls", "nonfinite", "sum_probs", "argmax_counts", "sum_token_entropy", "sum_z", "sum_mixture")


def assert_phases_add_up(routing):
    pre, dec = routing.phase("prefill"), routing.phase("decode")
    for name in routing.sites:
        tot, a, b = routing.record(name), pre.record(name), dec.record(name)
        for field in SUMS:
            assert np.array_equal(getattr(a, field) + getattr(b, field), getattr(tot, field)), field  # exactly
        E = tot.num_B
        for code, want in tot.label_sums.items():
            pa, pb = (x.label_sums.get(code, LabelSums.zeros(E)) for x in (a, b))
            assert pa.count + pb.count == want.count and np.array_equal(pa.probs + pb.probs, want.probs)
            assert np.array_equal(pa.argmax + pb.argmax, want.argmax) and pa.entropy + pb.entropy == want.entropy
        assert set(tot.token_sums) == set(a.token_sums) | set(b.token_sums)
        for tok, want in tot.token_sums.items():
            parts = [s.token_sums[tok] for s in (a, b) if tok in s.token_sums]
            assert want.count == sum(p.count for p in parts)
            assert np.array_equal(want.probs, parts[0].probs if len(parts) == 1 else parts[0].probs + parts[1].probs)


CASES = [("llama", "causal"), ("llama", "batch"), ("gpt2", "causal"), ("gpt2", "batch"), ("llama", "peft")]


def build_case(arch, routing):
    if routing == "peft":
        return peft_lily()
    return lily({"llama": llama, "gpt2": gpt2}[arch], routing)


@pytest.mark.parametrize("arch,routing", CASES, ids=[f"{a}-{r}" for a, r in CASES])
def test_generate_keeps_prompt_and_generated_tokens_apart(arch, routing):
    model = build_case(arch, routing)
    ids, mask = prompts()
    new = 5
    with ll.record_routing(model) as rec:
        out = generate(model, ids, mask, new)
        rec.annotate(labels=["x", "y", "x"])
    routing_ = rec.routing
    b, t = ids.shape
    assert routing_.phases == ["prefill", "decode"]
    assert routing_.n_sequences == b  # decode steps continue the prompt's sequences
    assert routing_.n_calls == new  # generate's calls: the prompt, then one per later token
    pre, dec = routing_.phase("prefill"), routing_.phase("decode")
    for name in routing_.sites:
        assert pre.record(name).n_tokens == int(mask.sum())  # the real prompt tokens
        assert dec.record(name).n_tokens == b * (new - 1)  # the last generated token is never fed back
        assert pre.record(name).n_calls == 1 and dec.record(name).n_calls == new - 1
    assert_phases_add_up(routing_)
    # One sequence's tokens: its real prompt positions, then generated positions continuing them.
    table = routing_.token_table()
    site = routing_.sites[0]
    one = table[(table.site == site) & (table.sequence == 1)].sort_values("position")
    assert one.position.tolist() == list(range(2, t + new - 1))  # positions in the padded text
    assert one.phase.tolist() == ["prefill"] * (t - 2) + ["decode"] * (new - 1)
    assert one.token_id.tolist() == out[1, 2 : t + new - 1].tolist()
    # Labels reach every token of the generation, prompt and generated alike.
    assert set(table.label) == {"x", "y"}
    for view, per_seq in ((pre, mask.sum(1).tolist()), (dec, [new - 1] * b)):
        spec = ll.specialization(view, by="label")
        counts = spec[spec.site == site].drop_duplicates("value").set_index("value").n_tokens.to_dict()
        assert counts == {"x": per_seq[0] + per_seq[2], "y": per_seq[1]}
        metrics = ll.router_metrics(view)
        assert (metrics.n_tokens == view.record(site).n_tokens).all()
        assert len(ll.top_tokens(view, min_count=1))
    # Mixtures of the decode phase are the decode steps' only.
    mix = routing_.record(site).mixtures.columns
    assert set(np.unique(mix["phase"]).tolist()) == {0, 1}
    assert len(dec.mixtures(site)) == int((mix["phase"] == 1).sum())


def test_plain_forward_has_no_phase_and_asking_for_one_is_clear():
    model = lily(llama, "causal")
    ids, mask = prompts()
    with ll.record_routing(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask)
    assert rec.routing.phases == [None]
    assert rec.routing.n_sequences == 6  # two calls without a cache: new sequences each
    assert rec.routing.token_table().phase.isna().all()
    with pytest.raises(RoutingError, match=r"no phase 'decode'.*phases: None"):
        rec.routing.phase("decode")
    with pytest.raises(RoutingError, match="no phase 'prompt'"):
        rec.routing.phase("prompt")
    whole = rec.routing.phase(None)
    name = whole.sites[0]
    assert whole.record(name).n_tokens == rec.routing.record(name).n_tokens == 2 * int(mask.sum())


def test_a_second_generate_starts_new_sequences_and_annotate_refuses_input_ids():
    model = lily(llama, "causal")
    ids, mask = prompts(b=2)
    with ll.record_routing(model) as rec:
        generate(model, ids, mask, 3)
        with pytest.raises(RoutingError, match="cached generation of 3 calls"):
            rec.annotate(input_ids=ids)
        rec.annotate(labels=[0, 1])
        with pytest.raises(RoutingError, match="already labelled"):
            rec.annotate(labels=[0, 1])
        generate(model, ids, mask, 3)
    routing = rec.routing
    assert routing.n_sequences == 4 and routing.phases == ["prefill", "decode"]
    table = routing.token_table()
    assert set(table.sequence) == {0, 1, 2, 3}
    assert table[table.sequence >= 2].label.isna().all() and table[table.sequence < 2].label.notna().all()


def test_labels_after_reading_the_recording_still_reach_the_whole_generation():
    model = lily(gpt2, "causal")
    ids, mask = prompts(b=2)
    with ll.record_routing(model, max_tokens=7) as rec:
        generate(model, ids, mask, 4)
        rec.routing  # noqa: B018 - reading sums every call before the labels come
        rec.annotate(labels=["a", "b"])
    routing = rec.routing
    site = routing.sites[0]
    counts = {routing.labels[c]: v.count for c, v in routing.record(site).label_sums.items()}
    assert counts == {"a": int(mask[0].sum()) + 3, "b": int(mask[1].sum()) + 3}
    assert (routing.record(site).tokens.columns["label"] >= 0).all()  # sampled rows relabelled too
    assert_phases_add_up(routing)


def _without_phases(data: bytes) -> bytes:
    """A routing file as format 1 wrote it: no phase members, version 1."""
    src = np.load(io.BytesIO(data), allow_pickle=False)
    arrays = {k: src[k] for k in src.files if ".phase" not in k and not k.split(".", 1)[-1].startswith("phase_")
              and "dispatch" not in k}
    header = json.loads(bytes(arrays.pop("__header__")).decode())
    header["format_version"] = 1
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_save_load_and_merge_keep_the_phases(tmp_path):
    model = lily(llama, "batch")
    ids, mask = prompts()
    with ll.record_routing(model) as rec:
        generate(model, ids, mask, 4)
        rec.annotate(labels=[1, 2, 1])
    routing = rec.routing
    loaded = Routing.load(routing.save(tmp_path / "gen.npz"))
    assert loaded.phases == routing.phases
    for ph in ("prefill", "decode"):
        assert ll.router_metrics(loaded.phase(ph)).equals(ll.router_metrics(routing.phase(ph)))
        assert ll.specialization(loaded.phase(ph)).equals(ll.specialization(routing.phase(ph)))
        assert ll.specialization(loaded.phase(ph), by="token").equals(ll.specialization(routing.phase(ph), by="token"))
    assert loaded.token_table().equals(routing.token_table())
    assert_phases_add_up(loaded)
    # A phase view saves and loads too, and holds one phase.
    assert Routing.load(routing.phase("decode").save(tmp_path / "dec.npz")).phases == ["decode"]
    # Merge: the phases' sums add up, across recordings and to the merged total.
    with ll.record_routing(model) as other, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    merged = Routing.merge([routing, loaded, other.routing])
    assert merged.phases == [None, "prefill", "decode"]
    name = merged.sites[0]
    assert merged.phase("decode").record(name).n_tokens == 2 * routing.phase("decode").record(name).n_tokens
    assert merged.record(name).n_tokens == sum(merged.phase(p).record(name).n_tokens for p in merged.phases)
    table = merged.token_table()
    assert set(table.phase.dropna()) == {"prefill", "decode"} and table.phase.isna().any()
    # A file from before phases loads, every token of phase None.
    old = tmp_path / "old.npz"
    old.write_bytes(_without_phases(routing_bytes(routing)))
    legacy = Routing.load(old)
    assert legacy.phases == [None]
    assert ll.router_metrics(legacy).equals(ll.router_metrics(routing))
    assert legacy.phase(None).record(name).n_tokens == routing.record(name).n_tokens


def test_a_damaged_phase_member_is_refused(tmp_path):
    model = lily(llama, "causal")
    ids, mask = prompts(b=2)
    with ll.record_routing(model) as rec:
        generate(model, ids, mask, 3)
    data = routing_bytes(rec.routing)
    src = np.load(io.BytesIO(data), allow_pickle=False)
    for key, bad, msg in (("s0.phase_sum_probs", np.zeros((2, 5)), "shape"),
                          ("s0.tokens.phase", np.full(len(src["s0.tokens.phase"]), 7, dtype=np.int8), "codes"),
                          ("s0.phase_n_tokens", np.array([1, 1]), "add up")):
        arrays = {k: src[k] for k in src.files}
        arrays[key] = bad
        path = tmp_path / f"bad-{key}.npz"
        np.savez(path, **arrays)
        with pytest.raises(RoutingError, match=msg):
            Routing.load(path)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert "s0.phase_codes.npy" in z.namelist()


def test_token_routes_mark_where_generation_begins():
    from lily_lab.plots.tokens import plot_token_routes

    model = lily(llama, "causal")
    ids, mask = prompts(b=2)
    with ll.record_routing(model) as rec:
        generate(model, ids, mask, 4)
    table = rec.routing.token_table()
    fig = plot_token_routes(table, 0)
    assert any(a.text == "prompt | generated" for a in fig.layout.annotations)
    # the hover names each token's phase: its column's category, which the hover template shows
    columns = [c for k in fig.layout if k.startswith("xaxis") for c in fig.layout[k].categoryarray]
    assert all("%{x}" in tr.hovertemplate for tr in fig.data if tr.type == "heatmap")
    assert any(c.endswith("· generated") for c in columns) and any(c.endswith("· prompt") for c in columns)
    plain = table[table.phase == "prefill"]
    assert not any(a.text == "prompt | generated" for a in plot_token_routes(plain, 0).layout.annotations)


def _held_bytes(rec) -> int:
    """Bytes of every array the recorder holds for its recording (samples, sums, waiting rows)."""
    total = 0
    routing = rec._routing
    for name in routing.sites:
        r = routing.record(name)
        for res in (r.tokens, r.mixtures):
            total += sum(a.nbytes for a in res.columns.values()) + sum(a.nbytes for a in res._buffers.values())
        for part in [r, *r.phases.values()]:
            total += sum(v.probs.nbytes + 8 for v in part.token_sums.values())
            total += sum(v.probs.nbytes + v.argmax.nbytes for v in part.label_sums.values())
    for rows in rec._token_rows.values():
        total += sum(_array_bytes(part) for part in rows)
    if rec._gen is not None:
        total += sum(_array_bytes(sums) for sums in rec._gen.sums.values())
    return total


def _array_bytes(state) -> int:
    """Bytes of the arrays held by one of the recorder's dataclasses (IdRows, SequenceSums)."""
    values = [getattr(state, f.name) for f in dataclasses.fields(state)]
    return sum(v.nbytes for v in values if isinstance(v, np.ndarray))


def test_memory_stays_flat_over_10000_generated_tokens():
    model = lily(llama, "causal")
    ids, mask = prompts(b=4, t=4)
    sizes = []
    with ll.record_routing(model, max_tokens=200) as rec:
        for i in range(10):  # 10 generates × 4 sequences × 250 new tokens
            generate(model, ids, mask, 250)
            rec.annotate(labels=[i % 2, 1, 0, 1])
            rec.routing  # noqa: B018 - sums everything waiting
            sizes.append(_held_bytes(rec))
            assert not rec._queue
    assert sizes[-1] == sizes[1]  # filled after the first: nothing grows with tokens
    routing = rec.routing
    name = routing.sites[0]
    assert routing.phase("decode").record(name).n_tokens == 10 * 4 * 249
    assert len(routing.probs(name)) == 200
    assert_phases_add_up(routing)
