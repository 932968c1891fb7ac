"""``lily_layers_by_group``: the one grouping of lily_lab's Lily layers by bank that checkpoints and
FSDP layouts are built on, checked against what ``add_lily`` planned, the shared tensors themselves,
a saved checkpoint's JSON and ``lily_fsdp_units``."""

from __future__ import annotations

import json

import torch

import lily_lab as ll
from lily_lab.core.checkpoint import LILY_JSON
from lily_lab.core.fsdp import lily_fsdp_units
from lily_lab.core.inject import get_state
from lily_lab.core.sites import lily_layers_by_group


def adapted(tiny_bert):
    # Three groups, two shapes (32x32, 37x32), 4 layers: the groups' sites interleave in traversal
    # order (query, value, intermediate of layer 0, then of layer 1, …); stride_A=3 gives two A's.
    return ll.add_lily(tiny_bert(intermediate_size=37),
                       ll.LilyConfig(["query", "value", "intermediate.dense"], r=2, stride_A=3, num_B=2))


def test_groups_and_sites_in_traversal_order_sharing_one_bank(tiny_bert):
    model = adapted(tiny_bert)
    groups = lily_layers_by_group(model)
    planned = get_state(model).groups
    assert list(groups) == [g.key for g in planned] == ["query:32x32", "value:32x32", "intermediate.dense:37x32"]
    traversal = [(n, m) for n, m in model.named_modules() if isinstance(m, ll.LilyLayer)]
    assert list(groups) == list(dict.fromkeys(m.group for _, m in traversal))  # by first appearance
    for key, members in groups.items():
        assert members == [(n, m) for n, m in traversal if m.group == key]
    for g in planned:
        members = groups[g.key]
        assert [n for n, _ in members] == [s.name for s in g.sites] and len(members) == 4
        assert all(model.get_submodule(n) is layer for n, layer in members)
        assert [layer.index for _, layer in members] == [0, 1, 2, 3]
        assert [layer.a_index for _, layer in members] == [0, 0, 0, 1]
        assert len({id(layer.lily_B) for _, layer in members}) == 1  # one bank per key
        assert len({id(layer.lily_A) for _, layer in members}) == 2
    assert sum(map(len, groups.values())) == len(traversal) == 12  # every Lily layer once, nothing else


def test_checkpoints_and_fsdp_units_follow_it(tiny_bert, tmp_path):
    model = adapted(tiny_bert)
    groups = lily_layers_by_group(model)
    ll.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / LILY_JSON).read_text())["groups"]
    assert [(g["key"], g["sites"]) for g in saved] == [(k, [n for n, _ in m]) for k, m in groups.items()]
    assert lily_fsdp_units(model)[:len(groups)] == [[n for n, _ in m] for m in groups.values()]


def test_no_lily_layers_no_groups(tiny_bert):
    assert lily_layers_by_group(tiny_bert()) == {}
    assert lily_layers_by_group(torch.nn.Linear(2, 2)) == {}
    model = adapted(tiny_bert)
    ll.remove_lily(model)
    assert lily_layers_by_group(model) == {}
