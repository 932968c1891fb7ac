"""Token ids as text a person can read: the one rule every table and figure of lily_lab uses.

A byte-level BPE tokenizer (GPT-2, SmolLM2, Llama-3, Qwen2) stores each token as its bytes drawn
as printable characters, so the vocabulary reads ``Ġthe`` (a leading space) and ``Ċ`` (a
newline). ``token_texts`` shows such a token as the text it decodes to, with the whitespace that
would otherwise vanish made visible: a newline ``⏎``, a tab ``⇥``, a carriage return ``␍``, and a
token made of spaces alone one ``␣`` per space. A leading space stays a space (`` the``): in a
row of tokens most words begin with one, and marking them all would bury the text. A token that
ends inside a multi-byte character (half an emoji) shows the bytes that make no character as
escapes (`` \\xf0\\x9f\\x98``). Any other tokenizer (WordPiece ``##ing``, SentencePiece
``▁the``, a word-level vocabulary) shows its tokens as ``convert_ids_to_tokens`` gives them.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

#: How whitespace inside a byte-level token is shown.
VISIBLE_WHITESPACE = {"\n": "⏎", "\t": "⇥", "\r": "␍"}
SPACE = "␣"  # each space of a token that holds nothing else


def _mentions_byte_level(state: Any) -> bool:
    if isinstance(state, dict):
        return state.get("type") == "ByteLevel" or any(_mentions_byte_level(v) for v in state.values())
    if isinstance(state, list):
        return any(_mentions_byte_level(v) for v in state)
    return False


def is_byte_level(tokenizer) -> bool:
    """Whether ``tokenizer`` is a byte-level BPE: a fast tokenizer whose decoder is (or contains)
    ``ByteLevel``, or a slow one with a byte table (``GPT2Tokenizer``'s ``byte_decoder``)."""
    if isinstance(getattr(tokenizer, "byte_decoder", None), dict):
        return True
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return False
    try:
        return _mentions_byte_level(json.loads(decoder.__getstate__()))
    except (AttributeError, TypeError, ValueError):
        return False


def _byte_of_char() -> dict[str, int]:
    """The byte-level alphabet read backwards: the printable bytes stand for themselves, every
    other byte for the character 256 + its rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


_BYTES = _byte_of_char()


def _readable(token: str, decoded: str) -> str:
    if not decoded:
        return token
    if "\ufffd" in decoded and "\ufffd" not in token and all(c in _BYTES for c in token):
        # part of a character: the bytes that make no character are shown as escapes
        decoded = bytes(_BYTES[c] for c in token).decode("utf-8", errors="backslashreplace")
    if decoded.strip(" ") == "":
        return SPACE * len(decoded)
    for char, shown in VISIBLE_WHITESPACE.items():
        decoded = decoded.replace(char, shown)
    return decoded


def token_texts(tokenizer, ids: Iterable[int]) -> list[str | None]:
    """The text of each token id in ``ids`` (see the module docstring for the rule); ``None``
    where the tokenizer has no token for an id. Each distinct id is converted once."""
    if not callable(getattr(tokenizer, "convert_ids_to_tokens", None)):
        from ..core.errors import LilyLabTypeError

        raise LilyLabTypeError(f"tokenizer must be a transformers tokenizer (with convert_ids_to_tokens), got "
                               f"{type(tokenizer).__name__}")
    ids = [int(i) for i in ids]
    distinct = list(dict.fromkeys(ids))
    tokens = list(tokenizer.convert_ids_to_tokens(distinct)) if distinct else []
    if is_byte_level(tokenizer):
        tokens = [None if t is None else _readable(t, tokenizer.convert_tokens_to_string([t])) for t in tokens]
    text = dict(zip(distinct, tokens))
    return [text[i] for i in ids]


__all__ = ["token_texts", "is_byte_level", "VISIBLE_WHITESPACE", "SPACE"]
