"""`lily-lab report` checks what it is handed before it trusts it: the classifier head file beside
the adapter, the data CSV, the model folder and --out. Each bad case is one line on stderr, exit
2, names the file and the fix, and fails before any work (or allocation) its contents would size.
A tiny random BERT base (hidden size 32) and a Lily adapter for it are saved to a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save

import lily_lab as ll
from lily_lab.app import cli
from lily_lab.app import demo as D
from lily_lab.core.safetensors_header import read_header

from _tiny_bert import HIDDEN, TINY, WORDS, save_lily_adapter, save_model_folder

transformers = pytest.importorskip("transformers")

FIX = "save it again"  # every head message ends with how to put it right (demo.HEAD_FIX)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder with a tiny random BertModel (safetensors) and a WordPiece tokenizer."""
    return save_model_folder(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return save_lily_adapter(tmp_path_factory.mktemp("adapter") / "lily")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"] + [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g)) + f",{lab}"
                             for lab in ("pos", "neg", "meh") * 8]
    path = tmp_path_factory.mktemp("data") / "texts.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def report(adapter_dir, base, data, out, *extra):
    return ["report", str(adapter_dir), "--model", str(base), "--data", str(data), "--texts", "8",
            "--out", str(out), *extra]


def one_line_error(err: str, rc: int) -> str:
    """The CLI's one line on stderr ``err`` (and exit 2); no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("lily-lab: error: "), (rc, err[-800:])
    return lines[0]


# --------------------------------------------------------------------------- head files


def raw(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors-like file: an 8-byte little-endian length, the header, the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def head(num_labels=2, hidden=HIDDEN, dtype=torch.float32, **changes) -> bytes:
    """A head file's bytes: ``classifier.weight`` / ``classifier.bias``; a change of None drops a key."""
    g = torch.Generator().manual_seed(0)
    tensors = {"classifier.weight": torch.randn(num_labels, hidden, generator=g).to(dtype),
               "classifier.bias": torch.randn(num_labels, generator=g).to(dtype)}
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    return save(tensors)


def _nan_weight():
    w = torch.zeros(2, HIDDEN)
    w[1, 3] = float("nan")
    return w


def _truncated():
    return head()[:-12]


def _garbage():
    g = torch.Generator().manual_seed(3)
    return bytes(torch.randint(0, 256, (300,), generator=g, dtype=torch.uint8).tolist())


# case → (file bytes, fragments the message must hold besides the file's path and the fix)
HEAD_CASES = {
    # the 96-byte file that made report allocate 11.5 GB: a bias of 30 million labels
    "huge declared shape": (raw({"classifier.bias": {"dtype": "F32", "shape": [30000000, 0],
                                                      "data_offsets": [0, 0]}}), ("[30000000, 0]",)),
    "shape larger than the file": (raw({"classifier.bias": {"dtype": "F32", "shape": [30000000],
                                                             "data_offsets": [0, 120000000]}}, b"\0" * 64),
                                   ("data_offsets",)),
    "shape and offsets disagree": (raw({"classifier.bias": {"dtype": "F32", "shape": [2, 32],
                                                             "data_offsets": [0, 8]}}, b"\0" * 8), ("declares shape",)),
    "a base weight": (head(bert__embeddings__word_embeddings__weight=torch.zeros(TINY["vocab_size"], HIDDEN)),
                      ("'bert.embeddings.word_embeddings.weight'", "not a parameter")),
    "no bias": (head(classifier__bias=None), ("no bias",)),
    "bias without weight": (head(classifier__weight=None), ("'classifier.weight' is missing",)),
    "unknown names": (save({"head.weight": torch.zeros(2, HIDDEN), "head.bias": torch.zeros(2)}),
                      ("'head.", "not a parameter")),
    "wrong hidden size": (head(hidden=64), ("hidden size 64", "hidden size is 32")),
    "weight and bias disagree": (head(classifier__bias=torch.zeros(3)), ("[3]", "[2, 32]")),
    "integer dtype": (head(dtype=torch.int64), ("dtype I64",)),
    "NaN weight": (head(classifier__weight=_nan_weight()), ("NaN or infinite",)),
    "overflows float32": (head(dtype=torch.float64, classifier__bias=torch.tensor([1e300, 0.0], dtype=torch.float64)),
                          ("NaN or infinite", "torch.float32")),
    "empty file": (b"", ("fewer than the 8",)),
    "truncated": (_truncated(), ("data_offsets",)),
    "corrupt bytes": (_garbage(), ("header claims",)),
    "header longer than the file": (raw(b'{"a": 1}', length=10_000), ("header claims",)),
    "header not JSON": (raw(b"{nope"), ("not JSON",)),
    "repeated key": (raw(b'{"classifier.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                         b'"classifier.bias": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4),
                     ("'classifier.bias' more than once",)),
    "no tensors": (save({}), ("no tensors",)),
    "entry not an object": (raw({"classifier.bias": [0, 8]}), ("not an object of dtype",)),
    "negative dimension": (raw({"classifier.bias": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}),
                           ("not a list of non-negative integers",)),
    "unknown dtype": (raw({"classifier.bias": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
                      ("'F128'",)),
}


def adapter_with_head(adapter, tmp_path, content: bytes):
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    (folder / D.HEAD_FILE).write_bytes(content)
    return folder


@pytest.mark.parametrize("case", [c for c in HEAD_CASES if c != "huge declared shape"])  # that one: below
def test_report_refuses_a_bad_head_file(case, base, adapter, data, tmp_path, capsys):
    content, says = HEAD_CASES[case]
    folder = adapter_with_head(adapter, tmp_path, content)
    capsys.readouterr()
    rc = cli.main(report(folder, base, data, tmp_path / "r.html"))
    line = one_line_error(capsys.readouterr().err, rc)
    for fragment in (str(folder / D.HEAD_FILE), FIX, *says):
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_load_head_refuses_a_bad_head_file_and_leaves_the_model_as_it_was(case, tmp_path, snapshot):
    content, _ = HEAD_CASES[case]
    (tmp_path / D.HEAD_FILE).write_bytes(content)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=2)).eval()
    before = snapshot(model)
    with pytest.raises(ll.CheckpointError) as info:
        D.load_head(model, tmp_path)
    assert str(tmp_path / D.HEAD_FILE) in str(info.value)
    before.assert_same(model)


HUGE_RUN = textwrap.dedent("""
    import resource, sys, time
    import tokenizers, torch, transformers.models.bert.modeling_bert  # the imports, before the limit
    from lily_lab.app.cli import main
    torch.set_num_threads(1)
    size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (1536 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
    t0 = time.perf_counter()
    rc = main(sys.argv[1:])
    print(f"seconds {time.perf_counter() - t0:.3f}")
    sys.exit(rc)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_a_huge_declared_head_fails_fast_without_allocating(base, adapter, data, tmp_path):
    """With the address space capped at 1.5 GB above what the imports took, a head that declares
    30 million labels (3.8 GB of classifier for hidden size 32) is refused within seconds."""
    folder = adapter_with_head(adapter, tmp_path, HEAD_CASES["huge declared shape"][0])
    assert (folder / D.HEAD_FILE).stat().st_size < 100
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", HUGE_RUN, *report(folder, base, data, tmp_path / "r.html")],
                          capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "[30000000, 0]" in lines[0], proc.stderr[-1500:]
    assert str(folder / D.HEAD_FILE) in lines[0]
    assert float(proc.stdout.split("seconds")[-1]) < 5, proc.stdout


def test_a_head_saved_by_save_head_is_loaded_and_used(base, adapter, data, tmp_path, capsys):
    torch.manual_seed(2)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3))
    folder = tmp_path / "adapter"
    shutil.copytree(adapter, folder)
    D.save_head(model, D.head_parameter_names(model), folder)
    assert sorted(read_header(folder / D.HEAD_FILE)) == ["classifier.bias", "classifier.weight"]
    fresh = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=3))
    D.load_head(fresh, folder)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert D.head_num_labels(folder / D.HEAD_FILE, HIDDEN) == 3
    capsys.readouterr()
    rc = cli.main(report(folder, base, data, tmp_path / "r.html", "--label-column", "label"))
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# --------------------------------------------------------------------------- data, model folder, --out


CSV_CASES = {  # case → (file text, extra arguments, fragments)
    "header only": ("text,label\n", ["--label-column", "label"], ("no usable rows", "no rows")),
    "header only, no labels": ("text\n", [], ("no usable rows",)),
    "empty": ("", [], ("is empty", "header row")),
    "no label given": ("text,label\nthe movie,\na film,\n", ["--label-column", "label"], ("no usable rows",)),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_report_refuses_a_csv_without_rows(case, base, adapter, tmp_path, capsys):
    text, extra, says = CSV_CASES[case]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    rc = cli.main(report(adapter, base, path, tmp_path / "r.html", *extra))
    line = one_line_error(capsys.readouterr().err, rc)
    for fragment in (str(path), *says):
        assert fragment in line, f"{fragment!r} not in: {line}"


def test_demo_refuses_a_header_only_csv(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\n")
    rc = cli.main(["demo", "--data", str(path), "--out", str(tmp_path / "r.html"), "--out-dir", str(tmp_path / "a")])
    line = one_line_error(capsys.readouterr().err, rc)
    assert str(path) in line and "no usable rows" in line


def _pickle_only(folder, config: bool, causal: bool = False):
    folder.mkdir()
    if config:
        cfg = (transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, architectures=["LlamaForCausalLM"])
               if causal else transformers.BertConfig(**TINY))
        cfg.save_pretrained(folder)
    # Not a real pickle (none is made here): lily_lab must refuse the folder without reading this file.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not a real pickle")
    return folder


MODEL_CASES = {  # case → (config.json too, a causal LM's config, command)
    "report, encoder: config and pickle": (True, False, "report"),
    "report, encoder: pickle only": (False, False, "report"),
    "report, causal LM: config and pickle": (True, True, "report"),
    "demo, encoder: config and pickle": (True, False, "demo"),
    "demo, causal LM: config and pickle": (True, True, "demo"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_model_folder_of_pickles_is_refused_unread(case, adapter, data, tmp_path, capsys):
    config, causal, command = MODEL_CASES[case]
    folder = _pickle_only(tmp_path / "model", config, causal)
    argv = (report(adapter, folder, data, tmp_path / "r.html") if command == "report" else
            ["demo", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "r.html"),
             "--out-dir", str(tmp_path / "a")])
    rc = cli.main(argv)
    line = one_line_error(capsys.readouterr().err, rc)
    for fragment in (str(folder), "safetensors", "pytorch_model.bin", "save_pretrained"):
        assert fragment in line, f"{fragment!r} not in: {line}"


OUT_CASES = {  # case → (--out relative to tmp_path, fragments)
    "missing folder": ("nowhere/deeper/r.html", ("does not exist", "mkdir -p")),
    "a folder": (".", ("is a folder",)),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
@pytest.mark.parametrize("command", ["report", "demo"])
def test_out_is_checked_before_any_work(command, case, base, adapter, data, tmp_path, capsys):
    where, says = OUT_CASES[case]
    out = tmp_path / where
    argv = (report(adapter, base, data, out) if command == "report" else
            ["demo", "--model", str(base), "--data", str(data), "--out", str(out), "--out-dir", str(tmp_path / "a")])
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = cli.main(argv)
    took = time.perf_counter() - t0
    printed = capsys.readouterr()
    line = one_line_error(printed.err, rc)
    for fragment in (str(out), *says):
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert printed.out == "" and took < 2, (took, printed.out[-500:])  # nothing was loaded, trained or recorded
