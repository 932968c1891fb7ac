"""Token text: a byte-level BPE's ``Ġthe`` / ``Ċ`` read `` the`` / ``⏎`` in the token table, the top
tokens and the plots (one rule, ``lily_lab.observe.tokens.token_texts``), each id decoded once;
WordPiece ``##ing`` and tokenizers without a decoder keep ``convert_ids_to_tokens``' text.
Tokenizers are built in memory with the ``tokenizers`` library (milliseconds)."""

from __future__ import annotations

import pytest
import torch

import lily_lab as ll
from lily_lab import plots
from lily_lab.observe.tokens import is_byte_level, token_texts

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["Hello world, the movie was great.\n", "\tThe film was  really bad.\n", "A day at the cinema 😀 so good"]


def byte_level_bpe():
    """A GPT-2-style tokenizer: byte-level pre-tokenizer and decoder, BPE trained on ``TEXTS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


WORDPIECE = ["[UNK]", "[PAD]", "the", "movie", "film", "play", "##ing", "##s", "was", "great", ",", "."]


def wordpiece():
    """A BERT-style tokenizer: WordPiece model and decoder over ``WORDPIECE``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDPIECE)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def shown_back(texts):
    """The text the shown tokens stand for: the visible whitespace turned back into whitespace."""
    return "".join(texts).replace("⏎", "\n").replace("⇥", "\t").replace("␣", " ")


@pytest.fixture(scope="module")
def bpe():
    return byte_level_bpe()


def test_byte_level_tokens_read_as_their_text(bpe):
    assert is_byte_level(bpe)
    for text in TEXTS:
        ids = bpe(text)["input_ids"]
        raw = bpe.convert_ids_to_tokens(ids)
        shown = token_texts(bpe, ids)
        assert any(t.startswith("Ġ") for t in raw) and ("Ċ" in "".join(raw)) == ("\n" in text)  # the raw tokens
        assert not any(c in t for t in shown for c in "ĠĊĉ")
        assert shown_back(shown) == text  # nothing lost: the tokens spell the text out
    ids = bpe("Hello world, the movie was great.\n")["input_ids"]
    shown = token_texts(bpe, ids)
    assert " world" in shown and shown[-1] == "⏎"  # a leading space stays a space; a newline is ⏎
    tab = token_texts(bpe, bpe("\tThe")["input_ids"])
    assert tab[0].startswith("⇥")
    assert token_texts(bpe, bpe.convert_tokens_to_ids(["Ġ"])) == ["␣"]  # a token of spaces alone: ␣
    # a byte that starts a multi-byte character (0xF0, the first of 😀's four) decodes to nothing: its bytes
    assert token_texts(bpe, bpe.convert_tokens_to_ids(["ð"])) == ["\\xf0"]
    assert token_texts(bpe, [bpe.eos_token_id]) == ["<|endoftext|>"]


def test_a_slow_gpt2_tokenizer_reads_the_same(bpe, tmp_path):
    bpe.backend_tokenizer.model.save(str(tmp_path))  # vocab.json and merges.txt
    slow = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ids = bpe(TEXTS[1])["input_ids"]
    assert slow.convert_ids_to_tokens(ids) == bpe.convert_ids_to_tokens(ids)
    assert is_byte_level(slow) and token_texts(slow, ids) == token_texts(bpe, ids)


def test_wordpiece_and_plain_tokenizers_keep_their_tokens(tmp_path):
    fast = wordpiece()
    ids = fast("the movies playing")["input_ids"]
    assert fast.convert_ids_to_tokens(ids) == ["the", "movie", "##s", "play", "##ing"]
    assert not is_byte_level(fast) and token_texts(fast, ids) == ["the", "movie", "##s", "play", "##ing"]
    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    slow = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    assert not is_byte_level(slow) and token_texts(slow, ids) == ["the", "movie", "##s", "play", "##ing"]

    class Ids:  # a tokenizer with convert_ids_to_tokens only
        def convert_ids_to_tokens(self, ids):
            return [f"Ġ{i}" for i in ids]

    assert not is_byte_level(Ids()) and token_texts(Ids(), [3, 4]) == ["Ġ3", "Ġ4"]


class Counting:
    """A byte-level tokenizer that counts the ids and tokens it converts."""

    def __init__(self, inner):
        self.inner, self.ids, self.decoded = inner, [], []
        self.backend_tokenizer = inner.backend_tokenizer

    def convert_ids_to_tokens(self, ids):
        self.ids += list(ids)
        return self.inner.convert_ids_to_tokens(ids)

    def convert_tokens_to_string(self, tokens):
        self.decoded += list(tokens)
        return self.inner.convert_tokens_to_string(tokens)


def test_each_distinct_id_is_decoded_once(bpe):
    counting = Counting(bpe)
    ids = bpe(TEXTS[0] * 4)["input_ids"]
    assert token_texts(counting, ids) == token_texts(bpe, ids)
    assert len(counting.ids) == len(counting.decoded) == len(set(ids)) < len(ids)


@pytest.fixture(scope="module")
def recorded(bpe):
    """A tiny GPT-2 with Lily (token routing) on ``TEXTS`` as one batch, recorded."""
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=len(bpe), n_positions=64, n_embd=32,
                                                           n_layer=2, n_head=4)).eval()
    ll.add_lily(model, ll.LilyConfig(["c_attn"], r=4, num_B=3, routing="token", init_weights=False))
    ids = [bpe(t)["input_ids"] for t in TEXTS]
    with torch.no_grad(), ll.record_routing(model) as rec:
        for row in ids:  # one sequence per call: no padding
            model(input_ids=torch.tensor([row]))
    return rec.routing, ids


def test_the_token_table_top_tokens_and_plots_show_the_same_text(bpe, recorded):
    routing, ids = recorded
    counting = Counting(bpe)
    table = routing.token_table(counting)
    assert len(counting.ids) == len(counting.decoded) == table["token_id"].nunique()  # once per distinct id
    want = dict(zip(table["token_id"], token_texts(bpe, table["token_id"])))
    assert table["token"].tolist() == table["token_id"].map(want).tolist()
    assert "⏎" in set(table["token"]) and not any("Ġ" in t or "Ċ" in t for t in table["token"])
    site = routing.sites[0]
    seq = table[(table.site == site) & (table.sequence == 0)].sort_values("position")
    assert shown_back(seq["token"]) == TEXTS[0]
    top = ll.top_tokens(routing, k=5, min_count=1, tokenizer=bpe)
    assert top["token"].tolist() == token_texts(bpe, top["token_id"]) and not any("Ġ" in t for t in top["token"])
    fig = plots.plot_token_routes(table, 0)
    assert fig.layout.xaxis.ticktext[-1] == "⏎" and "<b>⏎</b> · position" in fig.layout.xaxis.categoryarray[-1]
    ticks = plots.plot_top_tokens(top, site).layout.yaxis.ticktext
    assert set(ticks) <= set(top["token"])
