"""The texts as a chat task for causal LMs (lily_lab.app.llm): prompts from the tokenizer's chat template,
examples with the loss on the answer only, answer scores equal to one-example-at-a-time scoring,
generation with left padding, the AdamW loop, transformers' Trainer and TRL's SFTTrainer with
lily_lab and PEFT Lily, and `lily-lab demo` on tiny random Llama and GPT-2 folders."""

from __future__ import annotations

import re

import pandas as pd
import pytest
import torch

import lily_lab as ll
from lily_lab.app import cli, llm

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<unk>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = "the a movie film was is great awful good bad not very really day night so positive negative happy sad".split()
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
NAMES = ["negative", "positive"]


def chat_tokenizer(template: str | None = TEMPLATE):
    """A word-level tokenizer with no pad token (as Llama-3.2's) and a small chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    out = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                               extra_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    out.chat_template = template
    return out


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_embd=32, n_layer=2, n_head=4, n_positions=128, eos_token_id=1, bos_token_id=1)).eval()


def texts_and_labels(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = WORDS[:16]
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (int(k),), generator=g))
             for k in torch.randint(1, 12, (n,), generator=g)]
    return texts, [i % 2 for i in range(n)]


def tokens(tok, ids):
    return tok.convert_ids_to_tokens([int(i) for i in ids])


# --------------------------------------------------------------------------- prompts and examples


def test_prompts_and_examples_put_the_loss_on_the_answer_only():
    tok = chat_tokenizer()
    names = ["happy", "sad", "neutral"]  # any label names
    assert tokens(tok, llm.answer_ids(tok, names)[1]) == ["sad", "<|end|>"]  # the word and the end of turn
    prompt = tokens(tok, llm.chat_prompts(tok, ["the movie was great"], names)[0])
    assert prompt[0] == "<|user|>" and prompt[-2:] == ["<|end|>", "<|assistant|>"]  # the generation prompt
    assert prompt[-6:-2] == ["the", "movie", "was", "great"]
    ex = llm.chat_examples(tok, ["the movie was great", "bad"], [2, 1], names)
    ids, mask, labels = ex["input_ids"], ex["attention_mask"], ex["labels"]
    assert ids.shape == mask.shape == labels.shape and mask[0].all() and not mask[1, -1]  # right padding
    for row, name in ((0, "neutral"), (1, "sad")):
        kept = labels[row] != -100
        assert tokens(tok, labels[row][kept]) == [name if name in WORDS else "<unk>", "<|end|>"]
        n = int(mask[row].sum())
        assert kept.nonzero().flatten().tolist() == [n - 2, n - 1]  # the answer ends the real tokens
        assert torch.equal(ids[row][kept], labels[row][kept])
        assert (ids[row, n:] == tok.eos_token_id).all()  # no pad token: EOS pads


def test_truncation_cuts_the_text_never_the_question_template_or_answer():
    tok = chat_tokenizer()
    long = " ".join(["movie"] * 200)
    full = llm.chat_prompts(tok, ["good day"], NAMES)[0]
    ex = llm.chat_examples(tok, [long, "good day"], [1, 0], NAMES, max_length=40)
    assert ex["input_ids"].shape[1] == 40
    row = tokens(tok, ex["input_ids"][0])
    assert row[-4:] == ["<|end|>", "<|assistant|>", "positive", "<|end|>"]
    assert row[:len(full) - 4] == tokens(tok, full)[:len(full) - 4]  # the question, before the text, intact
    assert set(row[len(full) - 4:-4]) == {"movie"}
    with pytest.raises(ll.LilyLabError, match="raise max_length"):
        llm.chat_prompts(tok, ["good"], NAMES, max_length=10)


def test_a_tokenizer_without_chat_template_names_the_fix():
    with pytest.raises(llm.ChatTemplateError, match="no chat template.*tokenizer.chat_template"):
        llm.chat_examples(chat_tokenizer(template=None), ["good"], [1], NAMES)
    with pytest.raises(ll.LilyLabError, match="labels must be 0…1"):
        llm.chat_examples(chat_tokenizer(), ["good"], [2], NAMES)


# --------------------------------------------------------------------------- scores and generation


def reference_scores(model, tok, texts, names):
    """One text and one answer at a time, no padding at all."""
    answers, prompts = llm.answer_ids(tok, names), llm.chat_prompts(tok, texts, names)
    out = torch.zeros(len(texts), len(names))
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for k, a in enumerate(answers):
                ids = torch.tensor([p + a])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
                out[i, k] = logp[len(p) - 1:].gather(1, ids[0, len(p):, None]).sum()
    return out


@pytest.mark.parametrize("arch, targets, routing", [("llama", ["q_proj", "v_proj"], "causal"),
                                                    ("llama", None, None), ("gpt2", ["c_attn"], "token")])
def test_batched_answer_scores_equal_one_example_at_a_time(arch, targets, routing):
    tok = chat_tokenizer()
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    if targets:
        ll.add_lily(model, ll.LilyConfig(targets, r=4, num_B=3, routing=routing, init_weights=False))
    texts, labels = texts_and_labels(10)
    names = ["bad", "very good"]  # answers of different lengths
    got = llm.answer_scores(model, tok, texts, names, batch_size=4)
    assert got.shape == (10, 2) and (got < 0).all()
    assert torch.allclose(got, reference_scores(model, tok, texts, names), atol=1e-4, rtol=0)
    acc = llm.answer_accuracy(model, tok, texts, labels, names, batch_size=4)
    assert acc == (got.argmax(dim=1) == torch.tensor(labels)).float().mean().item()


def test_generated_answers_with_left_padding_equal_one_prompt_at_a_time():
    tok = chat_tokenizer()
    model = ll.add_lily(tiny_llama(), ll.LilyConfig(["q_proj", "v_proj"], r=4, num_B=3, routing="causal",
                                                    init_weights=False))
    texts, _ = texts_and_labels(6)
    batches = []
    batched = llm.generate_answers(model, tok, texts, NAMES, max_new_tokens=3, batch_size=4,
                                   each_batch=batches.append)
    single = [llm.generate_answers(model, tok, [t], NAMES, max_new_tokens=3)[0] for t in texts]
    assert batched == single and not model.training
    assert batches == [[0, 1, 2, 3], [4, 5]]


# --------------------------------------------------------------------------- training


def lily_model(kind):
    model = tiny_llama()
    if kind == "lily_lab":
        return ll.add_lily(model, ll.LilyConfig(["q_proj", "v_proj"], r=4, num_B=3, routing="causal"))
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_B=3))


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(model, before):
    return sum((p.detach() - before[n]).abs().sum().item() for n, p in model.named_parameters() if n in before)


def test_train_chat_is_seeded_restores_the_mode_and_learns():
    tok = chat_tokenizer()
    texts, labels = texts_and_labels(16)
    ex = llm.chat_examples(tok, texts, labels, NAMES)
    runs = []
    for _ in range(2):
        model = lily_model("lily_lab")
        before = trainable(model)
        runs.append(llm.train_chat(model, ex, steps=12, batch_size=4, lr=1e-2, progress=False))
        assert not model.training and changed(model, before) > 0
    assert runs[0] == runs[1] and len(runs[0]) == 12
    assert sum(runs[0][-3:]) < sum(runs[0][:3])
    with pytest.raises(ll.LilyLabError, match="no trainable parameters"):
        llm.train_chat(tiny_llama().requires_grad_(False), ex, steps=1)


@pytest.mark.parametrize("kind", ["lily_lab", "peft"])
def test_transformers_trainer_trains_on_the_chat_dataset(tmp_path, kind):
    tok = chat_tokenizer()
    texts, labels = texts_and_labels(16)
    model = lily_model(kind)
    before = trainable(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2,
                                          disable_tqdm=True)
    out = transformers.Trainer(model=model, args=args, train_dataset=llm.chat_dataset(tok, texts, labels, NAMES)).train()
    assert torch.isfinite(torch.tensor(out.training_loss)) and changed(model, before) > 0


@pytest.mark.parametrize("kind", ["lily_lab", "peft"])
def test_trl_sft_trainer_trains_on_the_chat_dataset_with_our_labels(tmp_path, kind):
    trl = pytest.importorskip("trl")
    pytest.importorskip("datasets")
    tok = chat_tokenizer()
    texts, labels = texts_and_labels(16)
    ds = llm.chat_dataset(tok, texts, labels, NAMES)
    model = lily_model(kind)
    before = trainable(model)
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                        use_cpu=True, save_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds.to_datasets(), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ours = ds.collate([ds[i] for i in range(4)])
    assert torch.equal(batch["labels"], ours["labels"])  # the loss stays on the answers
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss)) and changed(model, before) > 0


# --------------------------------------------------------------------------- end to end


def save_base(tmp_path, arch, template=TEMPLATE):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    folder = tmp_path / f"{arch}_base"
    model.save_pretrained(folder)
    chat_tokenizer(template).save_pretrained(folder)
    return folder


@pytest.fixture
def data(tmp_path):
    texts, labels = texts_and_labels(24, seed=1)
    path = tmp_path / "texts.csv"
    pd.DataFrame({"text": texts, "label": [NAMES[y] for y in labels]}).to_csv(path, index=False)
    return path


def test_peft_lily_trained_with_trainer_gets_its_report_from_the_cli(tmp_path, data, capsys):
    peft = pytest.importorskip("peft")
    base = save_base(tmp_path, "llama")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                peft.LilyConfig(target_modules=["q_proj", "v_proj"], r=4, num_B=3))
    frame = pd.read_csv(data)
    ds = llm.chat_dataset(tok, frame["text"], (frame["label"] == "positive").astype(int), NAMES)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=ds).train()
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "report.html"
    capsys.readouterr()
    rc = cli.main(["report", str(tmp_path / "adapter"), "--model", str(base), "--data", str(data),
                   "--label-column", "label", "--texts", "16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "Routers" in out.read_text(encoding="utf-8")


def run_demo_cli(argv, capsys):
    capsys.readouterr()
    rc = cli.main(["demo", *argv])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("arch, extra", [("llama", []), ("gpt2", ["--targets", "c_attn", "--routing", "token"])])
def test_demo_on_a_tiny_causal_lm_folder(tmp_path, data, capsys, arch, extra):
    base = save_base(tmp_path, arch)
    rc, printed = run_demo_cli(["--model", str(base), "--data", str(data), "--steps", "4", "--n-train", "16",
                                "--n-heldout", "8", "--out", str(tmp_path / "r.html"), "--out-dir",
                                str(tmp_path / "ad"), *extra], capsys)
    out = printed.out
    assert rc == 0, out + printed.err
    assert re.search(r"accuracy before training \(zero-shot.*\): [0-9.]+", out)
    assert re.search(r"accuracy after 4 steps \(batch 8, AdamW lr 0.002.*\): [0-9.]+", out)
    assert "generated answers" in out and "Diagnosis:" in out and "(ok, limit 1e-5" in out
    assert ("causal" if arch == "llama" else "token") in out  # the routing default for causal LMs, or --routing
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Routers" in html and "positive" in html
    saved = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert "lily_adapter.json" in saved and "classifier_head.safetensors" not in saved


def test_demo_bad_causal_input_is_one_line_and_exit_2(tmp_path, data, capsys):
    bert = tmp_path / "bert"
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(bert)
    llama = save_base(tmp_path, "llama")
    gpt2 = save_base(tmp_path, "gpt2")
    plain = save_base(tmp_path / "plain", "llama", template=None)
    common = ["--data", str(data), "--steps", "1", "--n-train", "16", "--n-heldout", "8",
              "--out", str(tmp_path / "r.html"), "--out-dir", str(tmp_path / "ad")]
    cases = [
        (["--model", str(bert), "--causal-lm"], "not a causal LM"),
        (["--model", str(llama), "--encoder"], "a causal LM; drop --encoder"),
        (["--model", str(plain)], "no chat template"),
        (["--model", str(gpt2)], "--targets q_proj,v_proj: no module matched"),
    ]
    for argv, message in cases:
        rc, printed = run_demo_cli([*argv, *common], capsys)
        lines = [line for line in printed.err.splitlines() if line.startswith("lily-lab: error: ")]
        assert rc == 2 and len(lines) == 1 and message in lines[0], (argv, printed.err[-800:])
        assert not (tmp_path / "r.html").exists()
