"""A tiny random BERT as a local model folder — what ``lily-lab report --model DIR`` and
``lily-lab demo --model DIR`` read: ``config.json``, safetensors weights and a WordPiece tokenizer
over ``WORDS`` — and a Lily adapter for it (``query``, ``value``; random ``B``). Hidden size
``HIDDEN``; ``config(**changes)`` is its ``BertConfig``. Imported by the untrusted-input and
missing-label tests."""

from __future__ import annotations

from pathlib import Path

import torch

import lily_lab as ll

WORDS = "the a movie film was is great awful good bad not very really day night so".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64)
HIDDEN = TINY["hidden_size"]


def config(**changes):
    """The tiny BERT's ``BertConfig``; ``changes`` (``num_labels=3``, ``num_hidden_layers=1``) on top."""
    import transformers  # imported when used: the tests that import this module skip without it

    return transformers.BertConfig(**{**TINY, **changes})


def save_model_folder(folder: Path, *, seed: int = 0, **changes) -> Path:
    """``folder`` with a random ``BertModel`` (safetensors) and its WordPiece tokenizer."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformers.BertModel(config(**changes)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def save_lily_adapter(folder: Path, *, seed: int = 1, **changes) -> Path:
    """``folder`` with a Lily adapter (``query``, ``value``, r = 2, two experts, random ``B``) for
    the tiny BERT of the same ``changes``; saved with ``save_adapter``."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertModel(config(**changes))
    ll.save_adapter(ll.add_lily(model, ll.LilyConfig(["query", "value"], r=2, num_B=2, init_weights=False)), folder)
    return folder
