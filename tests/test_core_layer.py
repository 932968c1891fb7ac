"""The Lily layer's numbers: PEFT's ``lily`` tuner as the reference for batch routing, hand-written
references for sequence / token routing, top-k and temperature."""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from torch import nn

import lily_lab as ll

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_bert(seed=0, layers=4):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=64)
    return transformers.BertModel(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaModel(cfg).eval()


def batch(seed=1, n=3, t=7, pad_from=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad_from is not None:
        mask[1, pad_from:] = 0
    return ids, mask


def out(model, ids, mask):
    o = model(input_ids=ids, attention_mask=mask)
    return o.last_hidden_state


def copy_from_peft(peft_model, ours):
    """Copy PEFT's adapter tensors into lily_lab's sites (both read through adapter_sites)."""
    theirs = ll.adapter_sites(peft_model)
    mine = ll.adapter_sites(ours)
    assert [s.name.removeprefix("base_model.model.") for s in theirs] == [s.name for s in mine]
    with torch.no_grad():
        for t, m in zip(theirs, mine):
            m.A.copy_(t.A)
            m.B.copy_(t.B)
            m.router.copy_(t.router)


PEFT_CASES = [
    # (model builder, targets, r, stride_A, num_B, scaling)
    (tiny_bert, ["query", "value"], 4, 1, 2, 1.0),
    (tiny_bert, ["query", "key", "value"], 8, 2, 3, 0.5),
    (tiny_bert, ["query", "dense"], 4, 4, 4, 2.0),  # "dense" spans two shapes: two groups
    (tiny_llama, ["q_proj", "v_proj"], 4, 2, 3, 1.0),  # q_proj and v_proj differ in d_out
    (tiny_llama, r".*\.(q|k|v|o)_proj", 4, 3, 2, 1.0),  # one regex target, grouped by shape
]


@pytest.mark.parametrize("build,targets,r,stride,E,s", PEFT_CASES)
def test_batch_routing_equals_peft_forward_and_gradients(build, targets, r, stride, E, s):
    base = build()
    theirs = peft.get_peft_model(copy.deepcopy(base),
                                 peft.LilyConfig(target_modules=targets, r=r, stride_A=stride, num_B=E,
                                                 scaling=s, init_weights=False))
    ours = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(targets, r=r, stride_A=stride, num_B=E, scaling=s))
    copy_from_peft(theirs, ours)
    assert ll.count_parameters(theirs) == ll.count_parameters(ours)

    ids, mask = batch(pad_from=4)
    y_t, y_o = out(theirs, ids, mask), out(ours, ids, mask)
    assert (y_t - y_o).abs().max().item() <= 1e-5
    assert y_o.abs().max() > 0

    loss = lambda m: sum(v.square().mean() for v in m(input_ids=ids, attention_mask=mask).values()  # noqa: E731
                         if isinstance(v, torch.Tensor))
    loss(theirs).backward()  # every output (BERT's pooler too), so every site gets a gradient
    loss(ours).backward()
    pairs = list(zip(ll.adapter_sites(theirs), ll.adapter_sites(ours)))
    for t, m in pairs:
        for pt, pm in zip(t.parameters, m.parameters):
            assert pm.grad is not None and pt.grad is not None
            g_t = pt.grad.reshape(pm.grad.shape)  # PEFT's bank is (E·r, d_out), ours (E, r, d_out)
            assert (g_t - pm.grad).abs().max().item() <= 1e-5, t.name
    assert any(m.B.grad.abs().max() > 0 for _, m in pairs)


def test_peft_sharing_layout_matches_ours():
    base = tiny_llama()
    cfg = dict(r=4, stride_A=2, num_B=3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(target_modules=["q_proj", "v_proj"], **cfg))
    ours = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(["q_proj", "v_proj"], **cfg))
    key = lambda s: (s.name.removeprefix("base_model.model."), s.group, s.index, s.a_index)  # noqa: E731
    assert [key(s) for s in ll.adapter_sites(theirs)] == [key(s) for s in ll.adapter_sites(ours)]


# ----------------------------------------------------------------------------- other routing modes


def naive_delta(x, A, B, R, s, mode, mask=None, tau=1.0, k=None):
    """A per-token, per-sequence reference written from docs/lily.md with plain loops."""
    h = x @ A.T
    p = torch.softmax(h @ R.T / tau, dim=-1)
    if k is not None:
        keep = torch.zeros_like(p)
        for idx in itertools.product(*map(range, p.shape[:-1])):
            top = torch.topk(p[idx], k).indices
            keep[idx][top] = p[idx][top] / p[idx][top].sum()
        p = keep
    out = torch.zeros(*x.shape[:-1], B.shape[-1], dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mode == "token":
                pi = p[b, t]
            elif mode == "sequence":
                m = mask[b].bool() if mask is not None else torch.ones(x.shape[1], dtype=torch.bool)
                pi = p[b][m].mean(0)
            else:
                pi = p.reshape(-1, p.shape[-1]).mean(0)
            B_mix = sum(pi[e] * B[e] for e in range(B.shape[0]))  # (r, d_out)
            out[b, t] = s * h[b, t] @ B_mix
    return out


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)

    def forward(self, x, attention_mask=None):
        return self.proj(x)


@pytest.mark.parametrize("mode", ["batch", "sequence", "token"])
@pytest.mark.parametrize("tau,k", [(1.0, None), (0.5, None), (2.0, 2), (1.0, 1)])
def test_modes_equal_naive_reference(mode, tau, k):
    torch.manual_seed(0)
    model = Holder()
    ll.add_lily(model, ll.LilyConfig(["proj"], r=3, num_B=4, scaling=0.7, routing=mode,
                                     router_temperature=tau, router_top_k=k, init_weights=False))
    (site,) = ll.adapter_sites(model)
    x = torch.randn(3, 5, 6)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    base = model.proj.base_layer(x)
    got = model(x, attention_mask=mask) - base
    want = naive_delta(x, site.A.detach(), site.B.detach(), site.router.detach(), 0.7, mode, mask, tau, k)
    assert (got - want).abs().max().item() <= 1e-5
    assert want.abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["sequence", "token"])
@pytest.mark.parametrize("mask_by", ["keyword", "position"])
def test_output_alone_equals_output_in_padded_batch(mode, mask_by):
    base = tiny_bert()
    model = ll.add_lily(base, ll.LilyConfig(["query", "value"], r=4, num_B=3, routing=mode, init_weights=False))
    ids, mask = batch(n=3, t=9, pad_from=5)

    def call(i, m):
        return model(i, m).last_hidden_state if mask_by == "position" else model(input_ids=i, attention_mask=m).last_hidden_state

    together = call(ids, mask)
    alone = call(ids[1:2, :5], mask[1:2, :5])
    assert (together[1, :5] - alone[0]).abs().max().item() <= 1e-5
    alone0 = call(ids[0:1], mask[0:1])
    assert (together[0] - alone0[0]).abs().max().item() <= 1e-5


def test_batch_routing_depends_on_batch_companions():
    """The documented caveat of batch routing: a sample's output changes with its batch."""
    model = ll.add_lily(tiny_bert(), ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="batch",
                                                   init_weights=False))
    ids, mask = batch(n=3, t=9)
    together = model(input_ids=ids, attention_mask=mask).last_hidden_state
    alone = model(input_ids=ids[:1], attention_mask=mask[:1]).last_hidden_state
    assert (together[0] - alone[0]).abs().max().item() > 1e-4


def test_sequence_routing_without_mask_averages_all_positions():
    torch.manual_seed(0)
    model = ll.add_lily(Holder(), ll.LilyConfig(["proj"], r=3, num_B=2, routing="sequence", init_weights=False))
    (site,) = ll.adapter_sites(model)
    x = torch.randn(2, 4, 6)
    got = model(x) - model.proj.base_layer(x)
    want = naive_delta(x, site.A.detach(), site.B.detach(), site.router.detach(), 1.0, "sequence", None)
    assert (got - want).abs().max().item() <= 1e-5


def test_num_B_one_is_plain_shared_low_rank():
    torch.manual_seed(0)
    model = ll.add_lily(Holder(), ll.LilyConfig(["proj"], r=2, num_B=1, init_weights=False))
    (site,) = ll.adapter_sites(model)
    x = torch.randn(4, 6)
    got = model(x) - model.proj.base_layer(x)
    assert torch.allclose(got, x @ site.A.T @ site.B[0], atol=1e-6)


def test_zero_initialised_bank_leaves_the_model_unchanged():
    base = tiny_bert()
    ids, mask = batch()
    before = out(base, ids, mask).clone()
    model = ll.add_lily(base, ll.LilyConfig(["query", "value"], r=4, num_B=2))
    assert torch.equal(out(model, ids, mask), before)


@pytest.mark.parametrize("mode", ["batch", "sequence", "token"])
def test_bf16_forward_and_backward(mode):
    base = tiny_llama().to(torch.bfloat16)
    model = ll.add_lily(base, ll.LilyConfig(["q_proj", "v_proj"], r=4, num_B=2, routing=mode, init_weights=False))
    ids, mask = batch()
    y = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    y.float().square().mean().backward()
    for s in ll.adapter_sites(model):
        assert s.A.dtype == torch.bfloat16 and s.B.grad is not None and s.B.grad.dtype == torch.bfloat16
        assert torch.isfinite(s.router.grad.float()).all()


def test_deterministic_for_a_seed():
    def build():
        torch.manual_seed(123)
        return ll.add_lily(tiny_bert(), ll.LilyConfig(["query"], r=4, num_B=3, init_weights=False))

    a, b = build(), build()
    for sa, sb in zip(ll.adapter_sites(a), ll.adapter_sites(b)):
        assert torch.equal(sa.A, sb.A) and torch.equal(sa.B, sb.B) and torch.equal(sa.router, sb.router)
    ids, mask = batch()
    assert torch.equal(out(a, ids, mask), out(b, ids, mask))


def test_token_routing_never_builds_per_token_expert_matrices():
    """Token routing is one matmul of (p ⊗ h) with the stacked bank: no op may produce a tensor
    as large as one r × d_out matrix per token."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            for t in res if isinstance(res, (tuple, list)) else [res]:
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return res

    torch.manual_seed(0)
    model = ll.add_lily(Holder(), ll.LilyConfig(["proj"], r=3, num_B=4, routing="token", init_weights=False))
    x = torch.randn(2, 50, 6)
    with Largest():
        model(x)
    tokens, r, d_out, E = 100, 3, 5, 4
    assert Largest.largest == tokens * E * r  # the (p ⊗ h) tensor is the largest one made
    assert Largest.largest < tokens * r * d_out


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_routes_the_recomputation_like_the_forward(reentrant):
    """Checkpointing recomputes layers during backward, after the top-level forward returned: the
    padding mask must still apply there, and a recorder must not count the recomputation."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, num_labels=2, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    base = transformers.BertForSequenceClassification(cfg)
    ids, mask = batch(n=3, t=9, pad_from=4)
    labels = torch.tensor([0, 1, 1])

    def grads(checkpointing):
        torch.manual_seed(1)  # the same adapter weights in both runs
        model = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(["query", "value"], r=4, num_B=3, routing="sequence",
                                                               init_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        with ll.record_routing(model) as rec:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        n_tokens = rec.routing.record(rec.routing.sites[0]).n_tokens
        return [p.grad.clone() for s in ll.adapter_sites(model) for p in s.parameters], n_tokens

    plain, n_plain = grads(False)
    checkpointed, n_ckpt = grads(True)
    assert max((a - b).abs().max().item() for a, b in zip(plain, checkpointed)) <= 1e-6
    assert n_plain == n_ckpt == int(mask.sum())
