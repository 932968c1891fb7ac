"""Routing on causal LMs: does a later token change an earlier output (the future leaking through
the mixture), and does cached generation compute what one forward pass over the same text does?
Every routing mode, on tiny random Llama and GPT-2 models. ``causal`` and ``token`` must do
neither; ``batch`` and ``sequence`` do both (measured, so the documentation's claim is tested)."""

from __future__ import annotations

import pytest
import torch

import lily_lab as ll

transformers = pytest.importorskip("transformers")
from _tiny_lm import gpt2, llama  # noqa: E402

MODES = ll.core.ROUTING_MODES


def adapted(build, routing):
    torch.manual_seed(0)
    model, targets = build()
    torch.manual_seed(1)  # the same adapter weights for every mode
    return ll.add_lily(model, ll.LilyConfig(targets, r=4, num_B=3, routing=routing, init_weights=False, scaling=2.0))


def leak(model, mask=None):
    """Largest change of the logits before the last position when only the last token changes."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (2, 12), generator=g)
    other = ids.clone()
    other[:, -1] = ids[:, -1] % 63 + 1
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        b = model(input_ids=other, attention_mask=mask).logits[:, :-1]
    return (a - b).abs().max().item()


def drift(model, prompt, mask, new_tokens=6):
    """Largest difference between greedy generate's logits (KV cache) and one forward pass over
    the generated text, at every generated position."""
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones(len(seq), seq.shape[1] - prompt.shape[1], dtype=mask.dtype)], 1)
        full = model(input_ids=seq, attention_mask=full_mask).logits
    gen = torch.stack(out.logits, dim=1)
    start = prompt.shape[1] - 1
    keep = full_mask[:, start:-1].bool()  # every generated position is real
    return (gen - full[:, start:-1])[keep].abs().max().item()


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("routing", MODES)
def test_later_tokens_change_earlier_outputs_only_under_batch_and_sequence_routing(build, routing):
    got = leak(adapted(build, routing))
    if routing in ("causal", "token"):
        assert got == 0.0
    else:
        assert got > 1e-4  # the future leaks through a mixture averaged over later tokens


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("routing", MODES)
def test_cached_generation_equals_one_forward_pass_under_causal_and_token_routing(build, routing):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 64, (2, 5), generator=g)
    got = drift(adapted(build, routing), prompt, torch.ones_like(prompt))
    if routing in ("causal", "token"):
        assert got <= 1e-5
    else:
        assert got > 1e-4  # each decode step mixes from its new tokens only


def test_causal_routing_skips_left_padding_in_forward_and_generation():
    model = adapted(llama, "causal")
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(1, 64, (2, 6), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # sequence 1 is left-padded by 2, as generate batches prompts
    prompt[1, :2] = 0
    assert drift(model, prompt, mask) <= 1e-5
    left = torch.ones(2, 12, dtype=torch.long)
    left[0, :3] = 0
    assert leak(model, left) == 0.0
    # The padded sequence's real tokens route as they do alone, without the padding.
    with torch.no_grad():
        alone = model(input_ids=prompt[1:, 2:], attention_mask=mask[1:, 2:]).logits
        padded = model(input_ids=prompt[1:], attention_mask=mask[1:]).logits[:, 2:]
    assert (alone - padded).abs().max().item() <= 1e-5


def test_causal_mixture_is_the_running_mean_of_p():
    """Hand-computed: π_t = mean of p_1 … p_t over real positions, recorded as the mixture."""
    model = adapted(llama, "causal")
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    layer = next(m for m in model.modules() if isinstance(m, ll.core.LilyLayer))
    events = []
    handle = layer.register_routing_observer(events.append)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    (event,) = events
    p, m = event.probs.float(), mask.unsqueeze(-1).float()
    want = torch.cumsum(p * m, 1) / torch.cumsum(m, 1).clamp_min(1)
    want = torch.where(torch.cumsum(m, 1) > 0, want, p)
    assert torch.allclose(event.mixture.float(), want, atol=1e-6)
    with ll.record_routing(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    site = rec.routing.sites[0]
    assert rec.routing.mixtures(site).shape == (int(mask.sum()), 3)  # one mixture per real token


def test_causal_routing_round_trips_and_peft_export_refuses_it(tmp_path):
    model = adapted(llama, "causal")
    ll.save_adapter(model, tmp_path / "a")
    fresh, _ = llama()
    ll.load_adapter(fresh, tmp_path / "a")
    assert {m.routing for m in fresh.modules() if isinstance(m, ll.core.LilyLayer)} == {"causal"}
    with pytest.raises(ll.LilyLabError, match="causal"):
        ll.save_adapter(model, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists() or not any((tmp_path / "peft").iterdir())
    batch = adapted(llama, "batch")
    ll.set_lily_options(batch, routing="causal")
    assert leak(batch) == 0.0


def test_diagnose_under_causal_routing_gives_its_own_remedy():
    model = adapted(llama, "causal")
    site = ll.adapter_sites(model)[0]
    with torch.no_grad():
        site.B.copy_(site.B[0].expand_as(site.B))  # identical experts: redundant_experts
    finding = next(f for f in ll.diagnose(model).findings if f.kind == "redundant_experts")
    assert "causal routing" in finding.remedy and "running means" in finding.remedy
