"""``causal_consistency`` on a user's own adapter (future leak and generation drift per routing mode),
and the ``future_leak`` finding of ``diagnose`` that uses it. Tiny random Llama and GPT-2 models
with random experts (``init_weights=False``), so the experts differ and a mixture matters."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lily_lab as ll
from lily_lab.analysis import CausalConsistencyError

transformers = pytest.importorskip("transformers")
from _tiny_lm import VOCAB as V, gpt2, llama  # noqa: E402

MODES = ll.core.ROUTING_MODES


def adapted(build, routing="batch"):
    torch.manual_seed(0)
    model, targets = build()
    torch.manual_seed(1)
    return ll.add_lily(model, ll.LilyConfig(targets, r=4, num_B=3, routing=routing, init_weights=False, scaling=2.0))


def ids_and_mask(b=3, t=10, left=0, seed=0):
    ids = torch.randint(1, V, (b, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if left:
        mask[1, :left] = 0
        ids[1, :left] = 0
    return ids, mask


def routing_of(model):
    layers = {m.routing for m in model.modules() if isinstance(m, ll.LilyLayer)}
    return layers | {ll.core.inject.get_state(model).config.routing}


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("left", [0, 3], ids=["unpadded", "left-padded"])
def test_batch_and_sequence_leak_and_drift_causal_and_token_do_neither(build, left):
    model = adapted(build, "batch")
    ids, mask = ids_and_mask(left=left)
    frame = ll.causal_consistency(model, ids, mask if left else None)
    assert list(frame.routing) == list(MODES)
    assert list(frame.columns) == ["routing", "future_leak", "generation_drift", "future_leak_base",
                                   "generation_drift_base", "sequences", "tokens", "new_tokens"]
    by = frame.set_index("routing")
    # The base model alone (adapter off) neither leaks nor drifts beyond float rounding, the same for every row.
    assert frame.future_leak_base.nunique() == 1 and frame.generation_drift_base.nunique() == 1
    assert by.future_leak_base.iloc[0] == 0 and by.generation_drift_base.iloc[0] <= 1e-5
    for mode in ("batch", "sequence"):
        assert by.loc[mode, "future_leak"] > 1e-4 and by.loc[mode, "generation_drift"] > 1e-4, frame
    for mode in ("causal", "token"):
        assert by.loc[mode, "future_leak"] <= 1e-5 and by.loc[mode, "generation_drift"] <= 1e-5, frame
    assert (by.sequences == 3).all() and (by.tokens == int(mask.sum())).all() and (by.new_tokens == 8).all()
    assert routing_of(model) == {"batch"}  # put back


def test_right_padding_is_measured_as_the_same_sequences_left_padded():
    model = adapted(llama, "sequence")
    ids, mask = ids_and_mask(left=3)
    right_ids, right_mask = ids.clone(), mask.clone()
    right_ids[1] = torch.cat([ids[1, 3:], ids[1, :3]])
    right_mask[1] = torch.cat([mask[1, 3:], mask[1, :3]])
    a = ll.causal_consistency(model, ids, mask, modes=["sequence"])
    b = ll.causal_consistency(model, right_ids, right_mask, modes=["sequence"])
    assert a.future_leak.item() == pytest.approx(b.future_leak.item(), rel=1e-5)
    assert a.generation_drift.item() == pytest.approx(b.generation_drift.item(), rel=1e-5)


def test_the_values_equal_a_direct_computation():
    """By hand: two separate forwards with the last token changed, and generate against one pass."""
    model = adapted(llama, "batch")
    ids, mask = ids_and_mask(left=2)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    other = ids.clone()
    other[:, -1] = (ids[:, -1] + 1) % V
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        b = model(input_ids=other, attention_mask=mask, position_ids=pos).logits[:, :-1]
        want_leak = (a - b).abs()[mask[:, :-1].bool()].max().item()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(3, 5, dtype=mask.dtype)], 1)
        full = model(input_ids=seq, attention_mask=full_mask,
                     position_ids=(full_mask.cumsum(-1) - 1).clamp_min(0)).logits
        want_drift = (torch.stack(out.logits, 1) - full[:, ids.shape[1] - 1:-1]).abs().max().item()
    got = ll.causal_consistency(model, ids, mask, max_new_tokens=5, modes="batch").iloc[0]
    assert got.future_leak == pytest.approx(want_leak, rel=1e-6) and want_leak > 1e-4
    assert got.generation_drift == pytest.approx(want_drift, rel=1e-4) and want_drift > 1e-4
    # Sequence routing runs both leak inputs in one call (per-sequence mixtures): the same number.
    ll.set_lily_options(model, routing="sequence")
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        b = model(input_ids=other, attention_mask=mask, position_ids=pos).logits[:, :-1]
    want = (a - b).abs()[mask[:, :-1].bool()].max().item()
    got = ll.causal_consistency(model, ids, mask, modes=["sequence"]).future_leak.item()
    assert got == pytest.approx(want, rel=1e-4)


def test_the_model_s_own_mode_and_train_mode_come_back_also_on_error(monkeypatch):
    model = adapted(llama, "sequence").train()
    ids, _ = ids_and_mask()
    ll.causal_consistency(model, ids)
    assert routing_of(model) == {"sequence"} and model.training and model.model.layers[0].training
    calls = []
    real = model.generate

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second mode's generation fails
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", failing)
    with pytest.raises(RuntimeError, match="boom"):
        ll.causal_consistency(model, ids)
    assert routing_of(model) == {"sequence"} and model.training
    assert torch.is_grad_enabled()


def test_peft_lily_has_one_batch_row_that_leaks():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, targets = llama()
    model = peft.get_peft_model(base, peft.LilyConfig(target_modules=targets, r=4, num_B=3, init_weights=False))
    ids, mask = ids_and_mask(left=2)
    frame = ll.causal_consistency(model, ids, mask)
    assert list(frame.routing) == ["batch"]
    assert frame.future_leak.item() > 1e-4 and frame.generation_drift.item() > 1e-4
    with pytest.raises(CausalConsistencyError, match="load_adapter"):
        ll.causal_consistency(model, ids, modes=["causal"])
    lora = peft.get_peft_model(llama()[0], peft.LoraConfig(target_modules=targets, r=2))
    with pytest.raises(ll.TargetError, match="LoRA"):
        ll.causal_consistency(lora, ids)


class _FlatLogits(nn.Module):
    """Has generate, but its logits are one vector per sequence."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.proj = nn.Linear(8, V)

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.proj(self.emb(input_ids)).mean(1)})()

    def get_input_embeddings(self):
        return self.emb

    def generate(self, **kwargs):
        raise AssertionError("not reached")


def test_clear_errors():
    ids, _ = ids_and_mask()
    model = adapted(llama)
    with pytest.raises(CausalConsistencyError, match="2-D"):
        ll.causal_consistency(model, ids[0])
    with pytest.raises(ll.LilyLabError, match="torch.Tensor"):
        ll.causal_consistency(model, ids.tolist())
    short = torch.ones_like(ids)
    short[2, :-1] = 0
    with pytest.raises(CausalConsistencyError, match=r"at least 2 real tokens.*\[2\]"):
        ll.causal_consistency(model, ids, short)
    with pytest.raises(ll.LilyConfigError, match="unknown routing"):
        ll.causal_consistency(model, ids, modes=["casual"])
    with pytest.raises(ll.TargetError, match="Lily adapter"):
        ll.causal_consistency(llama()[0], ids)
    bert = ll.add_lily(transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)),
        ll.LilyConfig(["query"], r=2, num_B=2))
    with pytest.raises(ll.LilyLabError, match="causal language model"):
        ll.causal_consistency(bert, ids)
    flat = ll.add_lily(_FlatLogits(), ll.LilyConfig(["proj"], r=2, num_B=2, init_weights=False))
    with pytest.raises(ll.LilyLabError, match=r"\.logits of shape batch × positions × vocabulary"):
        ll.causal_consistency(flat, ids)
    assert routing_of(model) == {"batch"}


# ----------------------------------------------------------------------------- diagnose: future_leak


def recorded(model, ids, mask=None, **kw):
    with ll.record_routing(model, **kw) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return rec.routing


def kinds(d):
    return {f.kind: f for f in d.findings}


@pytest.mark.parametrize("routing", ["batch", "sequence"])
def test_diagnose_finds_the_future_leak_with_causal_consistency_s_numbers(routing):
    model = adapted(llama, routing)
    ids, mask = ids_and_mask(b=5, t=12, left=3)
    d = ll.diagnose(model, recorded(model, ids, mask))
    f = kinds(d)["future_leak"]
    assert "future_leak" in d.checked and f.severity == "warning"
    assert f.sites == [s.name for s in ll.adapter_sites(model)]
    # Four of the five recorded sequences are replayed, the padded one with its 9 real tokens.
    want = ll.causal_consistency(model, ids[:4], mask[:4], modes=[routing]).iloc[0]
    assert f.evidence == {"routing": routing, "future_leak": want.future_leak,
                          "generation_drift": want.generation_drift,
                          "generation_drift_base": want.generation_drift_base, "sequences": 4}
    assert "set_lily_options(model, routing='causal')" in f.remedy and "fine-tune" in f.remedy
    html = ll.plots.finding_html(f)
    assert ll.plots.KIND_TITLES["future_leak"] in html and "future leak" in html
    assert "future_leak" in str(d) and "future_leak" in d._repr_html_()
    high = ll.diagnose(model, recorded(model, ids, mask), thresholds={"future_leak": 10.0})
    assert "future_leak" not in kinds(high) and "future_leak" in high.checked


@pytest.mark.parametrize("routing", ["causal", "token"])
def test_diagnose_does_not_check_causal_or_token_routing(routing):
    model = adapted(llama, routing)
    ids, _ = ids_and_mask()
    d = ll.diagnose(model, recorded(model, ids))
    assert "future_leak" not in kinds(d) and "future_leak" not in d.checked


def test_diagnose_never_checks_an_encoder():
    torch.manual_seed(0)
    bert = ll.add_lily(transformers.BertModel(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)),
        ll.LilyConfig(["query", "value"], r=2, num_B=3, init_weights=False))
    ids, _ = ids_and_mask()
    d = ll.diagnose(bert.eval(), recorded(bert, ids))
    assert "future_leak" not in kinds(d) and "future_leak" not in d.checked
    assert not any("future_leak" in n for n in d.notes)


def test_diagnose_says_how_to_get_sequences_it_can_replay():
    model = adapted(llama, "batch")
    ids, _ = ids_and_mask(b=2, t=12)
    d = ll.diagnose(model, recorded(model, ids, max_tokens=5))  # 5 of 24 tokens sampled: no whole sequence
    assert "future_leak" not in d.checked and "future_leak" not in kinds(d)
    assert any("future_leak not checked" in n and "max_tokens" in n for n in d.notes)
    with ll.record_routing(model) as rec, torch.no_grad():  # no input_ids: token ids unknown
        model(inputs_embeds=model.get_input_embeddings()(ids))
    assert any("input_ids" in n for n in ll.diagnose(model, rec.routing).notes)
    assert any("future_leak not checked" in n for n in ll.diagnose(model).notes)


def test_diagnose_on_peft_lily_points_to_lily_lab():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base, targets = llama()
    model = peft.get_peft_model(base, peft.LilyConfig(target_modules=targets, r=4, num_B=3, init_weights=False))
    ids, _ = ids_and_mask()
    f = kinds(ll.diagnose(model, recorded(model, ids)))["future_leak"]
    assert f.evidence["routing"] == "batch" and f.evidence["future_leak"] > 1e-4
    assert "lily_lab.load_adapter(base_model, folder)" in f.remedy and "routing='causal'" in f.remedy
    assert len(f.sites) == 4


def test_diagnose_notes_a_recording_it_cannot_replay_instead_of_failing():
    model = adapted(llama, "batch")
    ids, _ = ids_and_mask()
    routing = recorded(model, ids)
    for site in routing.sites:  # token ids this model does not have (a recording of another model)
        routing.record(site).tokens.columns["token_id"][:] = 10_000
    d = ll.diagnose(model, routing)
    assert "future_leak" not in d.checked
    assert any("future_leak not checked" in n and "vocabulary" in n for n in d.notes)


def test_the_base_floor_is_the_model_with_its_adapter_switched_off():
    """future_leak_base / generation_drift_base equal the measures on the same model with no adapter,
    and the adapter is back on afterwards (lily_lab: scaling restored; PEFT: adapters enabled)."""
    model = adapted(llama, "batch")
    ids, mask = ids_and_mask()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    frame = ll.causal_consistency(model, ids, mask, modes=["batch"])
    bare = ll.remove_lily(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)  # the adapter is on again
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    wrapped = peft.get_peft_model(copy.deepcopy(bare), peft.LilyConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                       num_B=3, init_weights=False))
    peft_frame = ll.causal_consistency(wrapped, ids, mask)
    # The same base weights: the floor does not depend on which adapter was switched off.
    assert peft_frame.generation_drift_base.iloc[0] == pytest.approx(frame.generation_drift_base.iloc[0], abs=1e-6)
    assert peft_frame.future_leak_base.iloc[0] == frame.future_leak_base.iloc[0] == 0
    assert all(not m.disable_adapters for m in wrapped.modules() if isinstance(getattr(m, "disable_adapters", None), bool))
