"""`lily-lab report` on causal LMs: tiny random Llama, GPT-2 and Qwen2 bases saved to folders with a
tokenizer that has no pad token (as Llama-3.2's), adapters from lily_lab, PEFT Lily and PEFT LoRA;
the base is loaded as a causal LM (no random classification head), EOS pads, the report is
written. A base of the wrong architecture is one line and exit 2."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import lily_lab as ll
from lily_lab.app import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a movie film was is great awful good bad not very really day night so".split()


def tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


BASES = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)), ["q_proj", "v_proj"]),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=64)), ["c_attn"]),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)), ["q_proj", "v_proj"]),
}


def base_dir(tmp_path, arch):
    torch.manual_seed(0)
    build, targets = BASES[arch]
    model = build()
    folder = tmp_path / f"{arch}_base"
    model.save_pretrained(folder)
    tok = tokenizer()
    assert tok.pad_token is None  # as Llama-3.2's
    tok.save_pretrained(folder)
    return folder, build, targets


@pytest.fixture
def data(tmp_path):
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(3, 12, (24,), generator=g)]
    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": texts, "label": ["pos", "neg"] * 12}).to_csv(path, index=False)
    return path


# PEFT's lily tuner has no GPT-2 Conv1D layers (it raises NotImplementedError), so that pair is absent.
CASES = [(a, k) for a in BASES for k in ("lily_lab", "peft-lily", "peft-lora") if (a, k) != ("gpt2", "peft-lily")]


@pytest.mark.parametrize("arch, kind", CASES)
def test_report_reads_adapters_of_causal_lms(tmp_path, data, arch, kind, capsys):
    folder, build, targets = base_dir(tmp_path, arch)
    torch.manual_seed(1)
    model = build()
    adapter = tmp_path / "adapter"
    if kind == "lily_lab":
        ll.add_lily(model, ll.LilyConfig(targets, r=4, num_B=3, routing="causal", init_weights=False))
        ll.save_adapter(model, adapter)
    elif kind == "peft-lily":
        peft.get_peft_model(model, peft.LilyConfig(target_modules=targets, r=4, num_B=3)).save_pretrained(adapter)
    else:
        peft.get_peft_model(model, peft.LoraConfig(target_modules=targets, r=4)).save_pretrained(adapter)
    out = tmp_path / "report.html"
    capsys.readouterr()
    rc = cli.main(["report", str(adapter), "--model", str(folder), "--data", str(data), "--label-column", "label",
                   "--texts", "16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    text = out.read_text(encoding="utf-8")
    assert "Diagnosis" in text and "Spectra of ΔW" in text
    assert ("Routers" in text) == (kind != "peft-lora")  # LoRA has no router to record
    printed = capsys.readouterr()
    assert "Cannot handle batch sizes" not in printed.err and "newly initialized" not in printed.err


def test_a_base_of_another_architecture_is_one_line_and_exit_2(tmp_path, data, capsys):
    llama_dir, _, _ = base_dir(tmp_path, "llama")
    _, build, targets = base_dir(tmp_path, "gpt2")
    torch.manual_seed(1)
    model = ll.add_lily(build(), ll.LilyConfig(targets, r=4, num_B=3, init_weights=False))
    ll.save_adapter(model, tmp_path / "gpt2_adapter")
    capsys.readouterr()  # the set-up's own progress bars
    rc = cli.main(["report", str(tmp_path / "gpt2_adapter"), "--model", str(llama_dir), "--data", str(data),
                   "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lily-lab: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_a_tokenizer_without_pad_or_eos_is_refused_clearly(tmp_path, data, capsys):
    folder, build, targets = base_dir(tmp_path, "llama")
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    tok.eos_token = None
    tok.save_pretrained(folder)
    torch.manual_seed(1)
    ll.save_adapter(ll.add_lily(build(), ll.LilyConfig(targets, r=4, num_B=3)), tmp_path / "a")
    capsys.readouterr()
    rc = cli.main(["report", str(tmp_path / "a"), "--model", str(folder), "--data", str(data),
                   "--out", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither a pad nor an EOS token" in err


def test_causal_lm_flag_loads_a_base_whose_config_names_no_architecture(tmp_path, data, capsys):
    import json

    folder, build, targets = base_dir(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures", None)
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    ll.save_adapter(ll.add_lily(build(), ll.LilyConfig(targets, r=4, num_B=3, init_weights=False)), tmp_path / "a")
    out = tmp_path / "r.html"
    assert cli.main(["report", str(tmp_path / "a"), "--model", str(folder), "--data", str(data), "--causal-lm",
                     "--texts", "8", "--out", str(out)]) == 0
    assert "Routers" in out.read_text(encoding="utf-8")
