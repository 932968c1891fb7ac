"""A diverged run (NaN / inf in the adapter), empty batches and recordings, and scalar options that
do not fit the dtype: each gets a clear answer, never a raw LinAlgError, reshape error or NaN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lily_lab as ll

D = 4


class Net(nn.Module):
    """Two 4→4 layers (one bank of two sites under the regex target) and a 4→6 layer (a second bank)."""

    def __init__(self):
        super().__init__()
        self.a0, self.a1, self.b0 = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, 6)

    def forward(self, x, attention_mask=None):
        return self.b0(self.a1(self.a0(x)))


def net(routing="token", E=3, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = Net().to(dtype)
    return ll.add_lily(model, ll.LilyConfig(r"a0|a1|b0", r=2, num_B=E, routing=routing, init_weights=False, **kw))


def sites(model):
    return {s.name: s for s in ll.adapter_sites(model)}


BANK_44, BANK_64 = r"a0|a1|b0:4x4", r"a0|a1|b0:6x4"


def recorded(model, x=None):
    with ll.record_routing(model) as rec:
        model(torch.randn(2, 5, D) if x is None else x)
    return rec.routing


def corrupt(model, site, tensor, value):
    with torch.no_grad():
        getattr(sites(model)[site], tensor).view(-1)[1] = value


def kinds(d):
    return {f.kind: f for f in d.findings}


# --------------------------------------------------------------------------- non-finite weights

BAD_VALUES = [float("nan"), float("inf"), -float("inf")]
# tensor corrupted at site a0 → sites of the 4x4 bank that use it
CORRUPTED = [("B", ["a0", "a1"]), ("A", ["a0"]), ("router", ["a0"])]


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor,affected", CORRUPTED, ids=[c[0] for c in CORRUPTED])
@pytest.mark.parametrize("with_routing", [False, True], ids=["model", "model+routing"])
def test_diagnose_names_nonfinite_weights_first(value, tensor, affected, with_routing):
    model = net()
    routing = recorded(model) if with_routing else None  # recorded before the run diverged
    corrupt(model, "a0", tensor, value)
    d = ll.diagnose(model, routing)
    f = d.findings[0]
    assert f.kind == "nonfinite_weights" and f.severity == "critical" and f.scope == "bank"
    assert f.sites == [BANK_44]
    assert f.evidence[f"nonfinite_{tensor}"] == {BANK_44: 1}
    assert f.evidence["sites_affected"] == {BANK_44: len(affected)}
    assert all(name in f.summary for name in affected)
    assert "learning rate" in f.remedy and "clip" in f.remedy and "checkpoint" in f.remedy
    assert "nonfinite_weights" in d.checked and d.checked[0] == "nonfinite_weights"
    assert any("skipped" in n and BANK_44 in n for n in d.notes)
    assert "no collapse found" not in str(d)
    # the healthy bank was still checked: no finding names it, and the other checks did not crash
    assert all(BANK_44 not in g for k in d.findings[1:] for g in k.sites)


def test_diagnose_still_checks_the_healthy_bank():
    model = net()
    with torch.no_grad():
        B = sites(model)["b0"].B
        B.copy_(B[0].expand_as(B))  # the 6x4 bank: identical experts
    corrupt(model, "a0", "B", float("nan"))
    k = kinds(ll.diagnose(model))
    assert k["nonfinite_weights"].sites == [BANK_44]
    assert k["redundant_experts"].sites == [BANK_64]


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
def test_bank_summary_marks_the_diverged_bank(value):
    model = net()
    corrupt(model, "a0", "B", value)
    banks = ll.bank_summary(model).set_index("group")
    assert banks.loc[BANK_44, "nonfinite_B"] == 1 and math.isnan(banks.loc[BANK_44, "mean_cosine"])
    assert banks.loc[BANK_64, "nonfinite_B"] == 0 and np.isfinite(banks.loc[BANK_64, "mean_cosine"])


ANALYSES = {
    "delta_spectra": lambda m: ll.delta_spectra(m),
    "expert_similarity": lambda m: ll.expert_similarity(m),
    "intruder_dimensions": lambda m: ll.intruder_dimensions(m, k=2, progress=False),
    "merge_at": lambda m: ll.merge_at(m),
}


@pytest.mark.parametrize("value", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor", ["A", "B"])
@pytest.mark.parametrize("name", list(ANALYSES))
def test_analyses_refuse_nonfinite_weights_by_name(name, tensor, value):
    model = net()
    corrupt(model, "a0", tensor, value)
    with pytest.raises(ll.NonFiniteWeightsError) as err:
        ANALYSES[name](model)
    assert isinstance(err.value, ValueError) and isinstance(err.value, ll.LilyLabError)
    msg = str(err.value)
    assert name in msg and BANK_44 in msg and "a0" in msg and "learning rate" in msg
    assert BANK_64 not in msg


@pytest.mark.parametrize("name", list(ANALYSES))
def test_a_nonfinite_router_does_not_stop_weight_analyses(name):
    model = net()
    corrupt(model, "a0", "router", float("nan"))
    ANALYSES[name](model)  # they read A and B only


def test_report_on_a_diverged_adapter(tmp_path):
    model = net()
    routing = recorded(model)
    corrupt(model, "a0", "B", float("inf"))
    text = ll.report(model, routing, tmp_path / "r.html").read_text()
    assert "nonfinite_weights" in text and "non-finite weights" in text


# --------------------------------------------------------------------------- mixtures for merge_at / spectra

MIXTURES = [
    ("nan", lambda names: {n: [float("nan"), 0.5, 0.5] for n in names}, "NaN"),
    ("inf", lambda names: {n: [float("inf"), 0, 0] for n in names}, "NaN or infinite"),
    ("too short", lambda names: {n: [0.5, 0.5] for n in names}, "2 entries"),
    ("too long", lambda names: {n: [0.25] * 4 for n in names}, "4 entries"),
    ("scalar", lambda names: {n: 1.0 for n in names}, "1 entries"),
    ("not numbers", lambda names: {n: ["a", "b", "c"] for n in names}, "not a vector"),
]


@pytest.mark.parametrize("fn", [ll.merge_at, ll.delta_spectra], ids=["merge_at", "delta_spectra"])
@pytest.mark.parametrize("label,build,words", MIXTURES, ids=[m[0] for m in MIXTURES])
def test_bad_mixture_is_a_clear_error(fn, label, build, words):
    model = net()
    with pytest.raises(ll.MixtureError, match=words) as err:
        fn(model, build(list(sites(model))))
    assert isinstance(err.value, ValueError) and "a0" in str(err.value)


def test_mixture_from_a_recording_of_another_bank_size():
    routing = recorded(net(E=2))
    with pytest.raises(ll.MixtureError, match="2 entries.*3 experts"):
        ll.merge_at(net(E=3), routing)


# --------------------------------------------------------------------------- empty batches

MODES = ["batch", "sequence", "token", "causal"]
SHAPES = [(0, 5, D), (3, 0, D), (0, 0, D), (0, D), (2, 0, 3, D)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
def test_empty_input_gives_an_empty_output_like_nn_linear(mode, shape, masked):
    model = net(mode)
    x = torch.randn(shape, requires_grad=True)
    mask = torch.ones(shape[:2], dtype=torch.long) if masked and len(shape) == 3 else None
    y = model(x, attention_mask=mask)
    base = nn.Linear(D, 6)(nn.Linear(D, D)(x))
    assert y.shape == base.shape and y.dtype == base.dtype
    y.sum().backward()  # and the backward runs
    assert x.grad.shape == x.shape
    # an empty call leaves the layer usable (causal routing's running sums included)
    z = torch.randn(2, 5, D)
    assert torch.isfinite(model(z)).all()


@pytest.mark.parametrize("mode", MODES)
def test_recording_an_empty_batch(mode):
    model = net(mode)
    with ll.record_routing(model) as rec:
        model(torch.randn(0, 5, D))
        model(torch.randn(2, 5, D))
    for name in rec.routing.sites:
        assert np.isfinite(rec.routing.mean_mixture(name)).all()


# --------------------------------------------------------------------------- empty recordings


def _no_calls(model):
    with ll.record_routing(model) as rec:
        pass
    return rec.routing


EMPTY_RECORDINGS = [
    ("no call", _no_calls),
    ("empty batch", lambda m: recorded(m, torch.randn(0, 5, D))),
    ("no positions", lambda m: recorded(m, torch.randn(2, 0, D))),
]


@pytest.mark.parametrize("label,record", EMPTY_RECORDINGS, ids=[e[0] for e in EMPTY_RECORDINGS])
def test_diagnose_on_an_empty_recording_says_nothing_was_recorded(label, record):
    model = net()
    d = ll.diagnose(model, record(model))
    text = str(d)
    assert "nothing recorded" in text and "no collapse found" not in text
    assert "dominant_expert" not in d.checked
    assert "No collapse" not in d._repr_html_() and "nothing recorded" in d._repr_html_()


def test_a_recording_made_after_the_run_diverged():
    model = net()
    for name in sites(model):
        corrupt(model, name, "router", float("nan"))  # every token's router logits are NaN
    d = ll.diagnose(model, recorded(model))
    assert d.findings[0].kind == "nonfinite_weights"
    assert sorted(d.findings[0].sites) == sorted([BANK_44, BANK_64])
    assert any("nothing recorded" in n and "NaN" in n for n in d.notes)


def test_report_on_an_empty_recording(tmp_path):
    model = net()
    text = ll.report(model, recorded(model, torch.randn(0, 5, D)), tmp_path / "r.html").read_text()
    assert "nothing recorded" in text and "No collapse found" not in text


# --------------------------------------------------------------------------- scalar options against the dtype

BAD_OPTIONS = [
    ("scaling", 1e39, "float32"),
    ("scaling", -1e39, "float32"),
    ("router_temperature", 1e-300, "float32"),
    ("router_temperature", 1e-39, "float32"),
    ("router_temperature", 1e39, "float32"),
]
OPTION_IDS = [f"{k}={v:g}" for k, v, _ in BAD_OPTIONS]


@pytest.mark.parametrize("field,value,words", BAD_OPTIONS, ids=OPTION_IDS)
def test_config_rejects_options_that_do_not_fit_float32(field, value, words):
    with pytest.raises(ll.LilyConfigError, match=words) as err:
        ll.LilyConfig(["q"], **{field: value})
    assert field in str(err.value)


@pytest.mark.parametrize("field,value,words", BAD_OPTIONS, ids=OPTION_IDS)
def test_set_lily_options_rejects_them_and_keeps_the_model(field, value, words):
    model = net()
    before = {n: s.layer.options() for n, s in sites(model).items()}
    with pytest.raises(ll.LilyConfigError, match=field):
        ll.set_lily_options(model, **{field: value})
    assert {n: s.layer.options() for n, s in sites(model).items()} == before


def _save_with(model, tmp_path, **config):
    path = ll.save_adapter(model, tmp_path / "adapter")
    meta_path = path / "lily_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["config"].update(config)
    meta_path.write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("field,value,words", BAD_OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("into", ["base model", "adapted model"])
def test_checkpoint_with_such_an_option_is_refused(tmp_path, field, value, words, into):
    path = _save_with(net(), tmp_path, **{field: value})
    target = Net() if into == "base model" else net()
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ll.CheckpointError, match=field):
        ll.load_adapter(target, path)
    assert target.state_dict().keys() == state.keys()
    assert all(torch.equal(target.state_dict()[k], v) for k, v in state.items())
    if into == "base model":
        assert not ll.adapter_sites(target)


HALF_CASES = [  # (how the scaling reaches a float16 adapter, error class)
    ("add_lily", ll.LilyConfigError),
    ("set_lily_options", ll.LilyConfigError),
    ("load_adapter", ll.CheckpointError),
    ("cast after add_lily", ll.LilyConfigError),
]


@pytest.mark.parametrize("how,error", HALF_CASES, ids=[c[0] for c in HALF_CASES])
def test_scaling_that_overflows_float16_names_the_option_and_the_dtype(tmp_path, how, error):
    big = 1e5  # finite in float32, above float16's 65504
    with pytest.raises(error) as err:
        if how == "add_lily":
            net(dtype=torch.float16, scaling=big)
        elif how == "set_lily_options":
            model = net(dtype=torch.float16)
            ll.set_lily_options(model, scaling=big)
        elif how == "load_adapter":
            path = ll.save_adapter(net(scaling=big), tmp_path / "adapter")  # fine in float32 ...
            ll.load_adapter(Net().half(), path)  # ... not in the float16 model it is loaded onto
        else:
            model = net(scaling=big).half()
            model(torch.randn(2, 3, D, dtype=torch.float16))
    msg = str(err.value)
    assert "scaling" in msg and "float16" in msg and "6.55e+04" in msg


def test_set_lily_options_on_float16_keeps_the_model():
    model = net(dtype=torch.float16)
    with pytest.raises(ll.LilyConfigError):
        ll.set_lily_options(model, scaling=1e5)
    assert all(s.layer.scaling == 1.0 for s in sites(model).values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tau", [1e-30, 2e-38])
def test_tiny_temperature_routes_to_the_argmax_without_nan(mode, tau):
    x = torch.randn(2, 5, D) * 100  # large logits: logits / τ alone would be ±inf
    cold = net(mode, router_temperature=tau)
    argmax = net(mode, router_top_k=1)
    y = cold(x)
    assert torch.isfinite(y).all()
    # one-hot router distributions: the same as keeping the top expert only, then mixing
    torch.testing.assert_close(y, argmax(x))
