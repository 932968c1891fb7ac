"""Bad input: every case raises a LilyLabError (also the natural ValueError / TypeError) whose
message names what was wrong and what would be right, and leaves the model exactly as it was."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

import lily_lab
from lily_lab.core.config import CONFIG_FORMAT_VERSION

from _adapter_files import resign

CONFIG = dict(target_modules=["query", "value"], r=4, stride_A=2, num_B=3)


def refused(snapshot, call, model, kind, *says):
    """``call()`` raises a LilyLabError that is also ``kind``, says every fragment, and changes nothing."""
    before = snapshot(model)
    with pytest.raises(lily_lab.LilyLabError) as info:
        call()
    assert isinstance(info.value, kind), type(info.value).__mro__
    for fragment in says:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    before.assert_same(model)
    return str(info.value)


# --------------------------------------------------------------------------- add_lily

ADD_CASES = {
    "no target matched": (["q_proj"], None, ValueError, ("'q_proj'", "query", "key", "value")),
    "regex matched nothing": (r".*\.q_proj", None, ValueError, ("q_proj", "query", "key", "value")),
    "everything excluded": (["query"], ["query"], ValueError, ("exclude_modules", "query")),
    "not a linear layer": (["attention"], None, TypeError,
                           ("'attention'", "BertAttention", "torch.nn.Linear", "Conv1D", "'query'", "'key'")),
}


@pytest.mark.parametrize("case", list(ADD_CASES))
def test_add_lily_refuses_bad_targets(case, tiny_bert, snapshot):
    targets, exclude, kind, says = ADD_CASES[case]
    model = tiny_bert()
    config = lily_lab.LilyConfig(targets, r=4, exclude_modules=exclude)
    refused(snapshot, lambda: lily_lab.add_lily(model, config), model, kind, *says)


def test_add_lily_names_close_modules_before_listing_the_rest(tiny_bert):
    with pytest.raises(lily_lab.LilyLabError) as info:
        lily_lab.add_lily(tiny_bert(), lily_lab.LilyConfig(["querry"], r=4))
    closest = str(info.value).split("closest:")[1].split(".")[0]
    assert "query" in closest and "dense" not in closest


def test_add_lily_refuses_an_adapted_model(tiny_bert, snapshot):
    model = lily_lab.add_lily(tiny_bert(), lily_lab.LilyConfig(**CONFIG))
    again = lily_lab.LilyConfig(["key"], r=4)
    refused(snapshot, lambda: lily_lab.add_lily(model, again), model, ValueError, "already", "remove_lily")


def test_add_lily_refuses_a_peft_model(tiny_bert, snapshot):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_bert(), peft.LilyConfig(target_modules=["query"], r=4))
    refused(snapshot, lambda: lily_lab.add_lily(model, lily_lab.LilyConfig(["query"], r=4)), model, ValueError,
            "PEFT", "base model")


def test_add_lily_refuses_a_config_that_is_not_a_lily_config(tiny_bert, snapshot):
    model = tiny_bert()
    refused(snapshot, lambda: lily_lab.add_lily(model, dict(CONFIG)), model, TypeError, "LilyConfig", "dict")


def test_an_invalid_regex_is_refused(tiny_bert, snapshot):
    model = tiny_bert()
    refused(snapshot, lambda: lily_lab.add_lily(model, lily_lab.LilyConfig("(query", r=4)), model, ValueError,
            "target_modules", "(query")


# --------------------------------------------------------------------------- load_adapter


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_bert):
    """One good adapter directory per format, saved from a 4-layer, hidden-32 BERT."""
    model = lily_lab.add_lily(tiny_bert(), lily_lab.LilyConfig(**CONFIG))
    root = tmp_path_factory.mktemp("saved")
    lily_lab.save_adapter(model, root / "lily_lab")
    lily_lab.save_adapter(model, root / "peft", format="peft")
    return root


def _json_edit(name, edit):
    def corrupt(d):
        data = json.loads((d / name).read_text())
        edit(data)
        (d / name).write_text(json.dumps(data))
    return corrupt


def _weights(d):
    return next(p for p in d.iterdir() if p.suffix == ".safetensors")


def _truncate(d):
    w = _weights(d)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def _flip(d):
    w = _weights(d)
    data = bytearray(w.read_bytes())
    data[-7] ^= 0x10
    w.write_bytes(bytes(data))


def _cfg(**kw):
    return lambda m: m["config"].update(kw)


def _swap_groups(m):
    m["groups"].reverse()


def _retensor(edit):
    """Edit the weights' tensors, then re-sign the directory as an attacker would (description
    hash, file name and SHA-256 all made to match): only the structural checks stand in the way."""
    def corrupt(d):
        w = _weights(d)
        with safe_open(str(w), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(w))
        edit(tensors)
        w.unlink()
        save_file(tensors, str(w), metadata=metadata)
        if (d / J).is_file():
            meta = json.loads((d / J).read_text())
            meta["weights_file"] = w.name
            (d / J).write_text(json.dumps(meta))
            resign(d)
    return corrupt


def _unsigned(d):
    """The weights rewritten without their metadata (as a tool that knows only safetensors would),
    SHA-256 and file name updated: the description hash is gone."""
    w = _weights(d)
    tensors = load_file(str(w))
    w.unlink()
    data = save(tensors)
    digest = hashlib.sha256(data).hexdigest()
    (d / f"adapter-{digest[:16]}.safetensors").write_bytes(data)
    _json_edit(J, lambda m: m.update(weights_file=f"adapter-{digest[:16]}.safetensors", weights_sha256=digest))(d)


def _resigned(edit):
    """A JSON edit the integrity check would catch, re-signed so the checks behind it are reached."""
    def corrupt(d):
        edit(d)
        resign(d)
    return corrupt


def _overflow(tensors):  # finite in float64, infinite in the float32 model
    tensors["g0.router1"] = tensors["g0.router1"].double()
    tensors["g0.router1"][0, 0] = 1e300


def _a_copy_in_float64(tensors):  # sites 0 and 1 share A_0: PEFT writes it twice
    key = "base_model.model.encoder.layer.1.attention.self.query.lily_A.weight"
    tensors[key] = tensors[key].double()


J, P = "lily_adapter.json", "adapter_config.json"
LOAD_CASES = {
    "no directory": ("lily_lab", lambda d: shutil.rmtree(d), ("no adapter directory", "'")),
    "empty directory": ("lily_lab", lambda d: [p.unlink() for p in d.iterdir()], (J, P, "holds no adapter")),
    "weights missing": ("lily_lab", lambda d: _weights(d).unlink(), ("adapter-", "is missing")),
    "weights truncated": ("lily_lab", _truncate, ("adapter-", "SHA-256", "save the adapter again")),
    "weights corrupted": ("lily_lab", _flip, ("adapter-", "SHA-256", "save the adapter again")),
    "json not JSON": ("lily_lab", lambda d: (d / J).write_text('{"format": "lily'), (J, "not valid JSON")),
    "json not UTF-8": ("lily_lab", lambda d: (d / J).write_bytes(b"\xff\xfe{}"), (J, "not valid JSON")),
    "json unknown key": ("lily_lab", _json_edit(J, lambda m: m.update(colour="red")), (J, "'colour'")),
    "json newer version": ("lily_lab", _json_edit(J, lambda m: m.update(format_version=7)),
                           (J, "format_version 7", "upgrade lily_lab")),
    "json r=0": ("lily_lab", _json_edit(J, _cfg(r=0)), ("r must be an integer ≥ 1", "got 0")),
    "json bogus routing": ("lily_lab", _json_edit(J, _cfg(routing="bogus")),
                           ("routing must be one of", "'batch'", "'bogus'")),
    "json config unknown key": ("lily_lab", _json_edit(J, _cfg(colour=1)), ("'colour'", "known keys")),
    "json config newer version": ("lily_lab", _json_edit(J, _cfg(format_version=CONFIG_FORMAT_VERSION + 1)),
                                  (f"format_version {CONFIG_FORMAT_VERSION + 1}", "upgrade lily_lab")),
    "json groups malformed": ("lily_lab", _json_edit(J, lambda m: m.update(groups={})), (J, "'groups'")),
    "json edited, still valid": ("lily_lab", _json_edit(J, _cfg(scaling=0.25)),
                                 (J, "edited after saving", "save the adapter again")),
    "json groups edited": ("lily_lab", _json_edit(J, _swap_groups), (J, "edited after saving")),
    "json groups swapped, re-signed": ("lily_lab", _resigned(_json_edit(J, _swap_groups)),
                                       ("'value:32x32'", "'query:32x32'", "target_modules")),
    "weights description hash missing": ("lily_lab", lambda d: _unsigned(d), (J, "edited after saving")),
    "json bad regex": ("lily_lab", _json_edit(J, _cfg(target_modules="(query")),
                       ("target_modules='(query'", "not a valid regular expression")),
    "weights overflow the model's dtype": ("lily_lab", _retensor(_overflow), ("NaN or infinite", "float32")),
    "weights tensor missing": ("lily_lab", _retensor(lambda t: t.pop("g1.router3")), ("'g1.router3'",)),
    "weights tensor extra": ("lily_lab", _retensor(lambda t: t.update(x=t["g0.B"].clone())), ("does not use", "'x'")),
    "peft json not JSON": ("peft", lambda d: (d / P).write_text("r: 4"), (P, "not valid JSON")),
    "peft json unknown key": ("peft", _json_edit(P, lambda m: m.update(colour=1)), (P, "'colour'")),
    "peft r=0": ("peft", _json_edit(P, lambda m: m.update(r=0)), (P, "r must be an integer ≥ 1", "got 0")),
    "peft LoRA": ("peft", _json_edit(P, lambda m: m.update(peft_type="LORA")), (P, "'LORA'", "'LILY'")),
    "peft no weights": ("peft", lambda d: _weights(d).unlink(), (P, "adapter_model.safetensors")),
    "peft truncated": ("peft", _truncate, ("adapter_model.safetensors", "not a readable safetensors")),
    "peft bad regex": ("peft", _json_edit(P, lambda m: m.update(target_modules="[query")),
                       (P, "target_modules='[query'", "not a valid regular expression")),
    "peft num_B edited": ("peft", _json_edit(P, lambda m: m.update(num_B=1)),
                          {"base": (P, "adapter_model.safetensors does not match", "num_B=1", "save the adapter again"),
                           "adapted": ("num_B", "4/2/1", "4/2/3", "remove_lily")}),
    "peft shared copies disagree": ("peft", _retensor(_a_copy_in_float64),
                                    ("encoder.layer.1.attention.self.query", "shared tensor A", "differs")),
}


@pytest.mark.parametrize("onto", ["base", "adapted"])
@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_adapter_refuses_bad_directories(case, onto, saved, tiny_bert, snapshot, tmp_path):
    fmt, corrupt, says = LOAD_CASES[case]
    says = says[onto] if isinstance(says, dict) else says  # where the two models meet different checks first
    d = tmp_path / "adapter"
    shutil.copytree(saved / fmt, d)
    corrupt(d)
    model = tiny_bert() if onto == "base" else lily_lab.add_lily(tiny_bert(), lily_lab.LilyConfig(**CONFIG))
    refused(snapshot, lambda: lily_lab.load_adapter(model, d), model, ValueError, *says)


MISFITS = {
    # (BertConfig overrides of the model, fragments the message must hold)
    "wider model": (dict(hidden_size=48, intermediate_size=96),
                    ("encoder.layer.0.attention.self.query", "32x32", "48x48")),
    "fewer layers": (dict(num_hidden_layers=2), ("4", "2", "encoder.layer.2")),
    "more layers": (dict(num_hidden_layers=6), ("4", "6", "encoder.layer.4")),
}


@pytest.mark.parametrize("fmt", ["lily_lab", "peft"])
@pytest.mark.parametrize("onto", ["base", "adapted"])
@pytest.mark.parametrize("case", list(MISFITS))
def test_load_adapter_refuses_a_different_base(case, onto, fmt, saved, tiny_bert, snapshot):
    overrides, says = MISFITS[case]
    model = tiny_bert(**overrides)
    if onto == "adapted":
        lily_lab.add_lily(model, lily_lab.LilyConfig(**CONFIG))
    message = refused(snapshot, lambda: lily_lab.load_adapter(model, saved / fmt), model, ValueError,
                      "does not fit this model")
    if fmt == "lily_lab" or case == "wider model":
        for fragment in says:
            assert fragment in message, message
    else:  # PEFT stores per-site keys: the message names the first site one side lacks
        assert says[2] in message, message


def test_load_adapter_refuses_a_different_adapter_layout(saved, tiny_bert, snapshot):
    model = lily_lab.add_lily(tiny_bert(), lily_lab.LilyConfig(**{**CONFIG, "num_B": 2}))
    refused(snapshot, lambda: lily_lab.load_adapter(model, saved / "lily_lab"), model, ValueError,
            "4/2/3", "4/2/2", "remove_lily")


# --------------------------------------------------------------------------- LilyConfig

BAD_FIELDS = [
    ("target_modules", []), ("target_modules", ""), ("target_modules", [""]), ("target_modules", 5),
    ("target_modules", None), ("target_modules", ["query", 3]),
    ("r", 0), ("r", -1), ("r", 1.5), ("r", "4"), ("r", True),
    ("stride_A", 0), ("stride_A", 2.0), ("num_B", 0), ("num_B", None),
    ("scaling", float("nan")), ("scaling", float("inf")), ("scaling", "1"), ("scaling", True),
    ("routing", "bogus"), ("routing", "Batch"), ("routing", None),
    ("router_temperature", 0), ("router_temperature", -1.0), ("router_temperature", float("inf")),
    ("router_temperature", float("nan")), ("router_temperature", "1"),
    ("router_top_k", 0), ("router_top_k", 3), ("router_top_k", 1.5), ("router_top_k", True),
    ("init_weights", "yes"), ("init_weights", 1), ("init_weights", None),
    ("exclude_modules", ""), ("exclude_modules", 5), ("exclude_modules", [None]),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_config_rejects_bad_values_naming_the_field(field, value):
    kwargs = {"target_modules": ["query"], "num_B": 2, field: value}
    with pytest.raises(lily_lab.LilyLabError) as info:
        lily_lab.LilyConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(field), str(info.value)


GOOD_CONFIGS = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=r".*\.(q|v)_proj", r=8, stride_A=3, num_B=4, scaling=0.25, routing="token",
         router_temperature=0.5, router_top_k=2, init_weights=False, exclude_modules=["layer.0.query"]),
    dict(target_modules=["dense"], num_B=1, routing="sequence", scaling=2, exclude_modules=r".*output.*"),
]


@pytest.mark.parametrize("kwargs", GOOD_CONFIGS)
def test_config_json_round_trip(kwargs):
    config = lily_lab.LilyConfig(**kwargs)
    text = config.to_json()
    assert json.loads(text)["format_version"] == CONFIG_FORMAT_VERSION
    back = lily_lab.LilyConfig.from_json(text)
    assert back == config and back.to_json() == text
    assert type(back.scaling) is float


BAD_JSON = {
    "unknown key": (lambda d: d.update(colour="red"), ("'colour'", "known keys", "target_modules")),
    "newer version": (lambda d: d.update(format_version=CONFIG_FORMAT_VERSION + 1),
                      (f"format_version {CONFIG_FORMAT_VERSION + 1}", "upgrade lily_lab")),
    "no version": (lambda d: d.pop("format_version"), ("format_version", f"writes {CONFIG_FORMAT_VERSION}")),
    "no targets": (lambda d: d.pop("target_modules"), ("target_modules",)),
    "bad value": (lambda d: d.update(r=0), ("r must be",)),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_config_from_json_rejects(case):
    edit, says = BAD_JSON[case]
    data = lily_lab.LilyConfig(["query"]).to_dict()
    edit(data)
    with pytest.raises(lily_lab.LilyLabError) as info:
        lily_lab.LilyConfig.from_json(json.dumps(data))
    assert isinstance(info.value, ValueError)
    for fragment in says:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("text", ["{", "[1, 2]", "null", '"query"'])
def test_config_from_json_rejects_what_is_not_a_json_object(text):
    with pytest.raises(lily_lab.LilyConfigError, match="JSON"):
        lily_lab.LilyConfig.from_json(text)
