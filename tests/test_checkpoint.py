"""save_adapter / load_adapter: round trips, sharing on disk, atomic saves, and PEFT interop.

References: the saved model's own tensors and outputs (compared exactly), the safetensors file's
own listing, and PEFT itself (``PeftModel.from_pretrained`` and ``get_peft_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

import lily_lab
from lily_lab.core.checkpoint import LILY_JSON

peft = pytest.importorskip("peft")


def adapted(model, seed=1, **config):
    """``model`` with Lily added and every adapter tensor set to seeded random values (B too)."""
    lily_lab.add_lily(model, lily_lab.LilyConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in {id(p): p for s in lily_lab.adapter_sites(model) for p in s.parameters}.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def adapter_tensors(model) -> dict[str, tuple]:
    return {s.name: (s.A.detach().clone(), s.B.detach().clone(), s.router.detach().clone(), s.scaling)
            for s in lily_lab.adapter_sites(model)}


def assert_same_adapter(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, (A, B, R, s) in want.items():
        gA, gB, gR, gs = got[name]
        assert torch.equal(gA, A) and torch.equal(gB, B) and torch.equal(gR, R), name
        assert gs == s, name


def batch(vocab=100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding, so sequence routing has something to skip
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


ROUND_TRIPS = {
    "query-value stride 2": ("bert", dict(target_modules=["query", "value"], r=4, stride_A=2, num_B=3)),
    "dense, 3 shapes, sequence": ("bert", dict(target_modules=["dense"], r=3, stride_A=3, num_B=2,
                                              routing="sequence", scaling=0.5)),
    "regex, token, τ, top-k": ("bert", dict(target_modules=r".*\.(key|value)", r=4, num_B=3, routing="token",
                                            router_temperature=0.7, router_top_k=2)),
    "one expert": ("bert", dict(target_modules=["key"], r=2, stride_A=4, num_B=1)),
    "gpt2 Conv1D": ("gpt2", dict(target_modules=["c_attn", "c_proj"], r=4, stride_A=2, num_B=2, routing="token")),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_restores_every_tensor_option_and_output(case, tiny_bert, tiny_gpt2, tmp_path):
    kind, config = ROUND_TRIPS[case]
    make = tiny_bert if kind == "bert" else tiny_gpt2
    model = adapted(make(), **config)
    inputs = batch()
    want, want_out = adapter_tensors(model), outputs(model, inputs)
    lily_lab.save_adapter(model, tmp_path)

    loaded = lily_lab.load_adapter(make(), tmp_path)
    assert_same_adapter(adapter_tensors(loaded), want)
    assert torch.equal(outputs(loaded, inputs), want_out)
    cfg = lily_lab.LilyConfig(**config)
    for s in lily_lab.adapter_sites(loaded):
        assert (s.layer.routing, s.layer.router_temperature, s.layer.router_top_k) == (
            cfg.routing, cfg.router_temperature, cfg.router_top_k)
    # Sharing survives: one A object per (group, a_index), one bank per group.
    sites = lily_lab.adapter_sites(loaded)
    assert len({(s.group, s.a_index) for s in sites}) == len({id(s.A) for s in sites})
    assert len({s.group for s in sites}) == len({id(s.B) for s in sites})
    # Every adapter parameter trains, the base stays frozen.
    adapter_ids = {id(p) for s in sites for p in s.parameters}
    assert all(p.requires_grad == (id(p) in adapter_ids) for p in loaded.parameters())


def test_each_shared_tensor_is_stored_once(tiny_bert, tmp_path):
    model = adapted(tiny_bert(num_hidden_layers=8), target_modules=["query", "value"], r=8, stride_A=4, num_B=4)
    lily_lab.save_adapter(model, tmp_path)
    (weights,) = tmp_path.glob("adapter-*.safetensors")
    sites = lily_lab.adapter_sites(model)
    unique = {id(p): p for s in sites for p in s.parameters}
    n_A, n_B = len({id(s.A) for s in sites}), len({id(s.B) for s in sites})
    assert (n_A, n_B, len(sites)) == (4, 2, 16)  # 8 layers / stride 4, two groups, 16 routers
    with safe_open(str(weights), "pt") as f:
        assert len(list(f.keys())) == n_A + n_B + len(sites)
    param_bytes = sum(p.numel() * p.element_size() for p in unique.values())
    assert param_bytes == lily_lab.count_parameters(model)["adapter"] * 4
    assert weights.stat().st_size <= 1.05 * param_bytes + 64 * 1024
    # PEFT's layout repeats the shared tensors at every site, so it must be clearly larger.
    lily_lab.save_adapter(model, tmp_path / "peft", format="peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size > 3 * param_bytes


def test_saving_again_replaces_the_weights_file_and_leaves_two_files(tiny_bert, tmp_path):
    model = adapted(tiny_bert(), target_modules=["query"], r=4)
    lily_lab.save_adapter(model, tmp_path)
    first = {p.name for p in tmp_path.iterdir()}
    with torch.no_grad():
        lily_lab.adapter_sites(model)[0].router.add_(1.0)
    lily_lab.save_adapter(model, tmp_path)
    second = {p.name for p in tmp_path.iterdir()}
    assert len(first) == len(second) == 2 and first != second and LILY_JSON in second
    meta = json.loads((tmp_path / LILY_JSON).read_text())
    assert meta["weights_file"] in second
    assert meta["weights_file"] == f"adapter-{meta['weights_sha256'][:16]}.safetensors"


def test_saved_files_get_ordinary_permissions(tiny_bert, tmp_path):
    model = adapted(tiny_bert(), target_modules=["query"], r=4)
    lily_lab.save_adapter(model, tmp_path / "a")
    lily_lab.save_adapter(model, tmp_path / "p", format="peft")
    umask = os.umask(0)
    os.umask(umask)
    for path in [*(tmp_path / "a").iterdir(), *(tmp_path / "p").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name  # not mkstemp's 0600


class Crash(Exception):
    pass


def _crash_replace(target):
    real = os.replace

    def replace(src, dst, *a, **kw):
        if re.fullmatch(target, os.path.basename(dst)):
            raise Crash(f"replace → {dst}")
        return real(src, dst, *a, **kw)

    return replace


def _crash_nth_file_fsync(n):
    real, seen = os.fsync, []

    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(fd)
            if len(seen) == n:
                raise Crash(f"fsync #{n}")
        return real(fd)

    return fsync


CRASHES = {
    "writing the weights": ("fsync", lambda: _crash_nth_file_fsync(1)),
    "renaming the weights": ("replace", lambda: _crash_replace(r"adapter-.*\.safetensors")),
    "writing the json": ("fsync", lambda: _crash_nth_file_fsync(2)),
    "renaming the json (the commit)": ("replace", lambda: _crash_replace(re.escape(LILY_JSON))),
}


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_save_that_dies_half_way_keeps_the_previous_checkpoint(crash, tiny_bert, tmp_path, monkeypatch):
    model = adapted(tiny_bert(), target_modules=["query", "value"], r=4, stride_A=2)
    lily_lab.save_adapter(model, tmp_path)
    old, old_files = adapter_tensors(model), {p.name for p in tmp_path.iterdir()}
    with torch.no_grad():
        for s in lily_lab.adapter_sites(model):
            s.router.mul_(-1.0)
    fn, make = CRASHES[crash]
    with monkeypatch.context() as m:
        m.setattr(os, fn, make())
        with pytest.raises(Crash):
            lily_lab.save_adapter(model, tmp_path)
    left = {p.name for p in tmp_path.iterdir()}
    assert not [n for n in left if n.startswith(".") or n.endswith(".tmp")], left  # no temp files
    assert old_files <= left and len(left - old_files) <= 1  # at most the new, uncommitted weights
    assert_same_adapter(adapter_tensors(lily_lab.load_adapter(tiny_bert(), tmp_path)), old)
    lily_lab.save_adapter(model, tmp_path)  # the next save commits and cleans up
    assert len(list(tmp_path.iterdir())) == 2
    assert_same_adapter(adapter_tensors(lily_lab.load_adapter(tiny_bert(), tmp_path)), adapter_tensors(model))


class Interrupt(BaseException):
    pass


@pytest.mark.parametrize("onto", ["base", "adapted"])
@pytest.mark.parametrize("nth_copy", [1, 6])
def test_a_load_interrupted_half_way_leaves_the_model_as_it_was(onto, nth_copy, tiny_bert, snapshot, tmp_path,
                                                                monkeypatch):
    lily_lab.save_adapter(adapted(tiny_bert(), target_modules=["query", "value"], r=4, stride_A=2,
                                  routing="token"), tmp_path)
    model = tiny_bert() if onto == "base" else adapted(tiny_bert(), seed=5, target_modules=["query", "value"],
                                                         r=4, stride_A=2)
    before = snapshot(model)
    real, calls = torch.Tensor.copy_, []

    def copy_(self, *args, **kwargs):  # Ctrl-C arriving in the middle of the weight copy
        calls.append(1)
        if len(calls) == nth_copy:
            raise Interrupt
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "copy_", copy_)
        with pytest.raises(Interrupt):
            lily_lab.load_adapter(model, tmp_path)
    before.assert_same(model)
    if onto == "adapted":
        assert {s.layer.routing for s in lily_lab.adapter_sites(model)} == {"batch"}


def test_load_onto_an_adapted_model_replaces_weights_and_options(tiny_bert, tmp_path):
    source = adapted(tiny_bert(), seed=1, target_modules=["query", "value"], r=4, stride_A=2, num_B=3,
                     routing="token", router_temperature=2.0, router_top_k=2, scaling=0.3)
    lily_lab.save_adapter(source, tmp_path)
    target = adapted(tiny_bert(), seed=2, target_modules=["query", "value"], r=4, stride_A=2, num_B=3)
    layers_before = [s.layer for s in lily_lab.adapter_sites(target)]
    assert lily_lab.load_adapter(target, tmp_path) is target
    sites = lily_lab.adapter_sites(target)
    assert [s.layer for s in sites] == layers_before  # weights replaced in place, same modules
    assert_same_adapter(adapter_tensors(target), adapter_tensors(source))
    assert all((s.layer.routing, s.layer.router_temperature, s.layer.router_top_k) == ("token", 2.0, 2)
               for s in sites)
    inputs = batch()
    assert torch.equal(outputs(target, inputs), outputs(source, inputs))
    assert len({id(s.A) for s in sites}) == 4  # still shared: 2 groups × 2 A


SPELLINGS = [  # (saved with, model adapted with): the same sites, chosen in different words
    (dict(target_modules=r".*\.query"), dict(target_modules=["query"])),
    (dict(target_modules=["query"]), dict(target_modules=r".*\.query")),
    (dict(target_modules=["query", "value"], exclude_modules=["value"]), dict(target_modules=["query"])),
]


@pytest.mark.parametrize("fmt", ["lily_lab", "peft"])
@pytest.mark.parametrize("saved_with,adapted_with", SPELLINGS, ids=["regex onto list", "list onto regex", "exclude"])
def test_load_onto_an_adapted_model_keeps_its_own_site_selection(fmt, saved_with, adapted_with, tiny_bert, tmp_path):
    """The sites are checked to be the same; the model keeps its target_modules/exclude_modules, so
    its next save still loads onto the base model (writing the saved ones in broke that)."""
    source = adapted(tiny_bert(), seed=1, r=4, num_B=2, **saved_with)
    lily_lab.save_adapter(source, tmp_path / "saved", format=fmt)
    target = adapted(tiny_bert(), seed=2, r=4, num_B=2, **adapted_with)
    lily_lab.load_adapter(target, tmp_path / "saved")
    assert_same_adapter(adapter_tensors(target), adapter_tensors(source))
    state = lily_lab.core.inject.get_state(target)
    assert (state.config.target_modules, state.config.exclude_modules) == (
        adapted_with["target_modules"], adapted_with.get("exclude_modules"))
    lily_lab.save_adapter(target, tmp_path / "again")
    again = lily_lab.load_adapter(tiny_bert(), tmp_path / "again")
    assert_same_adapter(adapter_tensors(again), adapter_tensors(source))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_a_lower_precision_file_loads_exactly_into_a_float32_model(dtype, tiny_bert, tmp_path):
    model = adapted(tiny_bert(), target_modules=["query"], r=4)
    with torch.no_grad():  # values the low-precision type holds exactly
        for s in lily_lab.adapter_sites(model):
            for p in s.parameters:
                p.copy_(p.to(dtype).float())
    want = adapter_tensors(model)
    lily_lab.save_adapter(model, tmp_path)
    # Rewrite the weights in `dtype` (torch cannot run a float8 model to save one), hash and all.
    meta = json.loads((tmp_path / LILY_JSON).read_text())
    w = tmp_path / meta["weights_file"]
    with safe_open(str(w), "pt") as f:
        metadata = f.metadata()  # holds the SHA-256 of the JSON's description: keep it
    data = save({k: v.to(dtype) for k, v in load_file(str(w)).items()}, metadata=metadata)
    w.unlink()
    digest = hashlib.sha256(data).hexdigest()
    meta["weights_file"], meta["weights_sha256"] = f"adapter-{digest[:16]}.safetensors", digest
    (tmp_path / meta["weights_file"]).write_bytes(data)
    (tmp_path / LILY_JSON).write_text(json.dumps(meta))
    loaded = lily_lab.load_adapter(tiny_bert(), tmp_path)
    assert all(s.A.dtype == torch.float32 for s in lily_lab.adapter_sites(loaded))
    assert_same_adapter(adapter_tensors(loaded), want)


def test_load_onto_a_model_with_a_different_layout_refuses(tiny_bert, tmp_path):
    lily_lab.save_adapter(adapted(tiny_bert(), target_modules=["query"], r=4, num_B=3), tmp_path)
    target = adapted(tiny_bert(), target_modules=["query"], r=4, num_B=2)
    with pytest.raises(lily_lab.LilyLabError, match="num_B"):
        lily_lab.load_adapter(target, tmp_path)


# --------------------------------------------------------------------------- PEFT format

_PEFT_KEY_WARNING = re.compile(r"missing|unexpected|mismatch|ignored|key", re.I)


def peft_load(base, directory):
    """``PeftModel.from_pretrained`` and the warnings it gave about keys or the config."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory)).eval()
    return model, [str(w.message) for w in caught if _PEFT_KEY_WARNING.search(str(w.message))]


PEFT_CASES = {
    "query-value stride 2": dict(target_modules=["query", "value"], r=4, stride_A=2, num_B=3),
    "dense, 3 shapes, scaled": dict(target_modules=["dense"], r=3, stride_A=3, num_B=2, scaling=0.5),
    "regex": dict(target_modules=r".*\.(key|value)", r=4, num_B=2),
    "top-k = num_B (no-op)": dict(target_modules=["key"], r=2, num_B=2, router_top_k=2),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_format_loads_in_peft_without_warnings_and_same_outputs(case, tiny_bert, tmp_path):
    config = PEFT_CASES[case]
    model = adapted(tiny_bert(), **config)
    lily_lab.save_adapter(model, tmp_path, format="peft")
    pm, warned = peft_load(tiny_bert(), tmp_path)
    assert warned == []
    inputs = batch()
    torch.testing.assert_close(outputs(pm, inputs), outputs(model, inputs), rtol=0, atol=1e-5)
    # PEFT's model holds exactly our tensors, site by site.
    theirs = {s.name.removeprefix("base_model.model."): s for s in lily_lab.adapter_sites(pm)}
    for s in lily_lab.adapter_sites(model):
        t = theirs[s.name]
        assert torch.equal(t.A, s.A) and torch.equal(t.B, s.B) and torch.equal(t.router, s.router)
    # The same keys and shapes PEFT itself writes for this config.
    kw = {k: v for k, v in config.items() if k != "router_top_k"}
    ref = peft.get_peft_model(tiny_bert(), peft.LilyConfig(**kw))
    ref.save_pretrained(str(tmp_path / "ref"))
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    ref_w = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref_w.items()}
    # …and lily_lab reads its own PEFT-format save back exactly.
    back = lily_lab.load_adapter(tiny_bert(), tmp_path)
    assert torch.equal(outputs(back, inputs), outputs(model, inputs))


def test_the_peft_warning_filter_can_fail(tiny_bert, tmp_path):
    """A PEFT file missing one site's keys does make PEFT warn, and the filter above sees it."""
    model = adapted(tiny_bert(), target_modules=["query"], r=4)
    lily_lab.save_adapter(model, tmp_path, format="peft")
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v for k, v in tensors.items() if ".layer.3." not in k}, str(path), metadata={"format": "pt"})
    _, warned = peft_load(tiny_bert(), tmp_path)
    assert warned and "missing adapter keys" in warned[0]


@pytest.mark.parametrize("stride_A, num_B", [(1, 2), (2, 3)])
def test_a_peft_trained_adapter_loads_with_lily_lab(stride_A, num_B, tiny_bert, tmp_path):
    pm = peft.get_peft_model(tiny_bert(), peft.LilyConfig(target_modules=["query", "value"], r=4,
                                                         stride_A=stride_A, num_B=num_B, init_weights=False))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # "train": routers move too, not only what kaiming drew
        for s in lily_lab.adapter_sites(pm):
            s.router.add_(torch.randn(s.router.shape, generator=gen))
    pm.eval().save_pretrained(str(tmp_path))
    model = lily_lab.load_adapter(tiny_bert(), tmp_path)
    inputs = batch()
    torch.testing.assert_close(outputs(model, inputs), outputs(pm, inputs), rtol=0, atol=1e-5)
    theirs = {s.name.removeprefix("base_model.model."): s for s in lily_lab.adapter_sites(pm)}
    for s in lily_lab.adapter_sites(model):
        t = theirs[s.name]
        assert torch.equal(t.A, s.A) and torch.equal(t.B, s.B) and torch.equal(t.router, s.router)
        assert s.layer.routing == "batch"


PEFT_REFUSALS = {
    "token routing": ("bert", dict(target_modules=["query"], routing="token"), "routing='token'"),
    "sequence routing": ("bert", dict(target_modules=["query"], routing="sequence"), "routing='sequence'"),
    "temperature": ("bert", dict(target_modules=["query"], router_temperature=0.5), "router_temperature=0.5"),
    "top-k": ("bert", dict(target_modules=["query"], num_B=3, router_top_k=2), "router_top_k=2"),
    "Conv1D": ("gpt2", dict(target_modules=["c_attn"]), "Conv1D"),
    "one expert": ("bert", dict(target_modules=["query"], num_B=1), "num_B=1"),  # PEFT demands num_B ≥ 2
}


@pytest.mark.parametrize("case", list(PEFT_REFUSALS))
@pytest.mark.parametrize("existing", [False, True])
def test_peft_format_refuses_what_peft_cannot_express(case, existing, tiny_bert, tiny_gpt2, tmp_path):
    kind, config, reason = PEFT_REFUSALS[case]
    model = adapted((tiny_bert if kind == "bert" else tiny_gpt2)(), r=4, **config)
    directory = tmp_path / "out"
    if existing:
        lily_lab.save_adapter(model, directory)
    before = {p.name: p.read_bytes() for p in directory.iterdir()} if existing else None
    with pytest.raises(lily_lab.LilyLabError) as info:
        lily_lab.save_adapter(model, directory, format="peft")
    assert reason in str(info.value) and "format='lily_lab'" in str(info.value)
    if existing:
        assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    else:
        assert not directory.exists()


def test_a_peft_save_over_a_lily_lab_save_is_what_loads(tiny_bert, tmp_path):
    """load_adapter prefers lily_adapter.json; a later PEFT save must not be shadowed by it."""
    model = adapted(tiny_bert(), target_modules=["query"], r=4)
    lily_lab.save_adapter(model, tmp_path)
    with torch.no_grad():
        lily_lab.adapter_sites(model)[0].A.add_(1.0)
    lily_lab.save_adapter(model, tmp_path, format="peft")
    assert_same_adapter(adapter_tensors(lily_lab.load_adapter(tiny_bert(), tmp_path)), adapter_tensors(model))
