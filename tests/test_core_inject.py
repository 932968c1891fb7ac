"""Injection, sharing, removal, sites and parameter counts across architectures."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lily_lab as ll
from lily_lab.core import lily_parameter_formula

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=64)).eval()


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=3, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)).eval()


def llama():
    torch.manual_seed(0)
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def vit():
    torch.manual_seed(0)
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8)).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 2))


def vit_names(model):
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})


# (builder, targets, input maker, expected (group → number of sites))
ARCHS = {
    "bert": (bert, ["query", "value"], lambda: {"input_ids": torch.randint(0, 100, (2, 6))},
             {"query:32x32": 5, "value:32x32": 5}),
    "gpt2": (gpt2, ["c_attn", "c_proj"], lambda: {"input_ids": torch.randint(0, 100, (2, 6))},
             {"c_attn:96x32": 3, "c_proj:32x32": 3, "c_proj:32x128": 3}),
    "llama": (llama, ["q_proj", "v_proj"], lambda: {"input_ids": torch.randint(0, 100, (2, 6))},
              {"q_proj:32x32": 3, "v_proj:16x32": 3}),
    "vit": (vit, None, lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, None),
    "mlp": (mlp, ["0", "2", "4"], lambda: {"input": torch.randn(3, 8)}, {"0:16x8": 1, "2:16x16": 1, "4:16x16": 1}),
}


def targets_for(name, model):
    targets = ARCHS[name][1]
    if targets is None:  # ViT's attention names changed across transformers versions
        names = vit_names(model)
        targets = ["query", "value"] if "query" in names else ["q_proj", "v_proj"]
    return targets


def call(model, inputs):
    out = model(**inputs) if "input" not in inputs else model(inputs["input"])
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("routing", ["batch", "sequence", "token"])
def test_architectures_train_share_and_remove(arch, routing):
    build, _, make_inputs, groups = ARCHS[arch]
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types_before = [(n, type(m)) for n, m in model.named_modules()]
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}

    cfg = ll.LilyConfig(targets_for(arch, model), r=4, stride_A=2, num_B=3, routing=routing, init_weights=False)
    ll.add_lily(model, cfg)
    sites = ll.adapter_sites(model)
    if groups is not None:
        assert {g: sum(s.group == g for s in sites) for g in groups} == groups
        assert len(sites) == sum(groups.values())

    # Sharing is real: the same Parameter object, grouped as the formula says.
    for s in sites:
        peers = [t for t in sites if t.group == s.group]
        assert all(t.B is s.B for t in peers)
        assert all((t.A is s.A) == (t.index // 2 == s.index // 2) for t in peers)
        assert all((t.router is s.router) == (t is s) for t in peers)
        assert s.a_index == s.index // 2

    # Only adapter parameters train, and they all get gradients.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for s in sites for p in s.parameters}
    inputs = make_inputs()
    call(model, inputs).square().mean().backward()
    assert all(p.grad is not None for s in sites for p in s.parameters)

    ll.remove_lily(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(n, type(m)) for n, m in model.named_modules()] == types_before
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags_before
    assert not hasattr(model, "_lily_lab_state")


def test_remove_restores_the_original_objects_and_hooks():
    model = bert()
    query = model.encoder.layer[0].attention.self.query
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    ll.add_lily(model, ll.LilyConfig(["query"], r=2))
    assert model.encoder.layer[0].attention.self.query is not query
    ll.remove_lily(model)
    assert model.encoder.layer[0].attention.self.query is query
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks


def test_remove_restores_requires_grad_the_user_had():
    model = bert()
    model.pooler.requires_grad_(False)
    ll.add_lily(model, ll.LilyConfig(["query"], r=2))
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lily" not in n)
    ll.remove_lily(model)
    assert not any(p.requires_grad for p in model.pooler.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())


def test_sites_are_live_views():
    model = ll.add_lily(bert(), ll.LilyConfig(["query", "value"], r=4, num_B=3, init_weights=False))
    ids = torch.randint(0, 100, (2, 6))
    y0 = model(input_ids=ids).last_hidden_state.clone()
    site = ll.adapter_sites(model)[0]
    with torch.no_grad():
        site.router.zero_()  # ablate one router: uniform mixture
        site.B[0].copy_(site.B[1])  # swap in another expert
    layer = model.encoder.layer[0].attention.self.query
    assert torch.equal(layer.lily_router, torch.zeros_like(layer.lily_router))
    assert torch.equal(layer.lily_B[0], layer.lily_B[1])
    assert not torch.equal(model(input_ids=ids).last_hidden_state, y0)


def test_exclude_modules_and_regex_targets():
    model = bert()
    ll.add_lily(model, ll.LilyConfig(r".*\.(query|value)", r=2, exclude_modules=["layer.0.attention.self.query"]))
    names = [s.name for s in ll.adapter_sites(model)]
    assert "encoder.layer.0.attention.self.query" not in names
    assert "encoder.layer.1.attention.self.query" in names and len(names) == 9
    # one regex target: sites are grouped by shape only
    assert {s.group for s in ll.adapter_sites(model)} == {r".*\.(query|value):32x32"}


def test_count_parameters_and_summary():
    model = ll.add_lily(bert(), ll.LilyConfig(["query", "value"], r=4, stride_A=2, num_B=3))
    counts = ll.count_parameters(model)
    per_group = lily_parameter_formula(5, 32, 32, 4, 2, 3)
    assert counts["adapter"] == counts["trainable"] == 2 * per_group
    assert counts["total"] == sum(p.numel() for p in bert().parameters()) + 2 * per_group
    text = ll.adapter_summary(model)
    assert "group query:32x32: 5 sites" in text and "3 A of 4×32" in text and f"{per_group:,} parameters" in text


@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 7),
    d_in=st.integers(1, 12),
    d_out=st.integers(1, 12),
    r=st.integers(1, 6),
    stride=st.integers(1, 8),
    E=st.integers(1, 5),
)
def test_parameter_count_equals_formula(layers, d_in, d_out, r, stride, E):
    dims = [d_in] + [d_out] * layers
    blocks = []
    for i in range(layers):
        blocks.append(nn.Linear(dims[i], dims[i + 1]))
    model = nn.Sequential(*blocks)
    ll.add_lily(model, ll.LilyConfig(r".*", r=r, stride_A=stride, num_B=E))
    sites = ll.adapter_sites(model)
    want = 0
    for g in dict.fromkeys(s.group for s in sites):
        members = [s for s in sites if s.group == g]
        s0 = members[0]
        want += math.ceil(len(members) / stride) * r * s0.d_in + E * r * s0.d_out + len(members) * r * E
    assert ll.count_parameters(model)["adapter"] == want == ll.count_parameters(model)["trainable"]
    # Independent check of the formula itself: count unique tensors by identity.
    unique = {id(t): t.numel() for s in sites for t in (s.A, s.B, s.router)}
    assert sum(unique.values()) == want


def test_peft_lora_sites_read_as_one_expert():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(bert(), peft.LoraConfig(target_modules=["query", "value"], r=3, lora_alpha=6))
    sites = ll.adapter_sites(model)
    assert len(sites) == 10 and all(s.kind == "peft-lora" for s in sites)
    s = sites[0]
    assert s.name == "base_model.model.encoder.layer.0.attention.self.query"
    assert s.A.shape == (3, 32) and s.B.shape == (1, 3, 32) and s.router is None and s.scaling == 2.0
    with torch.no_grad():
        s.B.fill_(0.5)  # live: edits PEFT's lora_B
    assert torch.all(model.base_model.model.encoder.layer[0].attention.self.query.lora_B["default"].weight == 0.5)
    assert ll.count_parameters(model)["adapter"] == 10 * 3 * (32 + 32)


class Boom(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.seen = None

    def forward(self, x, attention_mask=None):
        y = self.proj(x)
        self.seen = self.proj._context.attention_mask
        raise RuntimeError("boom")


def test_mask_reaches_layers_and_is_dropped_when_the_forward_raises():
    model = ll.add_lily(Boom(), ll.LilyConfig(["proj"], r=2, routing="sequence"))
    mask = torch.ones(2, 3)
    for args, kwargs in [((torch.randn(2, 3, 4), mask), {}), ((torch.randn(2, 3, 4),), {"attention_mask": mask})]:
        with pytest.raises(RuntimeError, match="boom"):
            model(*args, **kwargs)
        assert model.seen is mask
        assert model._lily_lab_state.context.attention_mask is None


def test_an_adapted_model_deep_copies():
    model = ll.add_lily(bert(), ll.LilyConfig(["query", "value"], r=4, stride_A=2, num_B=3, init_weights=False,
                                              routing="sequence"))
    twin = copy.deepcopy(model)
    a, b = ll.adapter_sites(model), ll.adapter_sites(twin)
    q = [s for s in b if s.group == "query:32x32"]
    assert q[0].B is q[1].B and q[0].A is q[1].A  # sharing survives deepcopy…
    assert q[0].B is not a[0].B and q[0].B.data_ptr() != a[0].B.data_ptr()  # …with storage of its own
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    assert torch.equal(model(ids, mask).last_hidden_state, twin(ids, mask).last_hidden_state)
    # the copy's hooks feed the copy's layers: padding is skipped in the copy too
    alone = twin(ids[:1, :4], mask[:1, :4]).last_hidden_state
    assert (twin(ids, mask).last_hidden_state[0, :4] - alone[0]).abs().max() <= 1e-5
    ll.remove_lily(twin)  # removing the copy's adapter leaves the original's hooks in place
    assert len(model._forward_pre_hooks) == 1 and ll.adapter_sites(model)


def test_set_lily_options_switches_routing_keeping_weights_and_saves_what_it_computes(tmp_path):
    def lily(routing):
        model = bert()
        torch.manual_seed(1)
        return ll.add_lily(model, ll.LilyConfig(["query", "value"], r=4, stride_A=2, num_B=3, routing=routing,
                                                init_weights=False))

    x = {"input_ids": torch.randint(0, 100, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    x["attention_mask"][0, 4:] = 0
    model, token_model = lily("batch"), lily("token")
    with torch.no_grad():
        batch_out = model(**x).last_hidden_state
        assert ll.set_lily_options(model, routing="token", router_temperature=0.5) is model
        ll.set_lily_options(token_model, router_temperature=0.5)
        out = model(**x).last_hidden_state
        assert not torch.allclose(out, batch_out)  # the switch changed what the model computes
        assert torch.equal(out, token_model(**x).last_hidden_state)  # to exactly a token-routed adapter
    ll.save_adapter(model, tmp_path / "a")
    reloaded = ll.load_adapter(bert(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(reloaded(**x).last_hidden_state, out)

    before = {n: m.options() for n, m in model.named_modules() if isinstance(m, ll.LilyLayer)}
    with pytest.raises(ll.LilyConfigError, match="routing must be one of"):
        ll.set_lily_options(model, routing="tokens", scaling=2.0)
    with pytest.raises(ll.LilyConfigError, match=r"\['r'\].*remove_lily and add_lily"):
        ll.set_lily_options(model, r=8)
    with pytest.raises(ll.LilyConfigError, match="unknown option.*'temperature'"):
        ll.set_lily_options(model, temperature=2.0)
    assert {n: m.options() for n, m in model.named_modules() if isinstance(m, ll.LilyLayer)} == before
    with torch.no_grad():
        assert torch.equal(model(**x).last_hidden_state, out)  # nothing changed by the failed calls
    with pytest.raises(ll.TargetError, match="no lily_lab Lily adapter"):
        ll.set_lily_options(bert(), routing="token")
