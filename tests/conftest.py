"""Shared fixtures: tiny random transformers models (built offline in milliseconds) and a model
snapshot that tells whether a failed call left a model exactly as it was."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere
_OWN_CACHE = None
if "LILY_LAB_CACHE" not in os.environ:  # SmolLM2's de-quantized copy: once per test run, not in ~/.cache
    import tempfile

    _OWN_CACHE = os.environ["LILY_LAB_CACHE"] = tempfile.mkdtemp(prefix="lily_lab_test_cache_")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:  # ~540 MB: not left behind
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
# threads made one 32×32 matmul take ~20 ms instead of ~5 µs.
torch.set_num_threads(1)

TINY_BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=64)


def _tiny_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(**{**TINY_BERT, **overrides})).eval()


def _tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    cfg = dict(vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2Model(GPT2Config(**{**cfg, **overrides})).eval()


class Snapshot:
    """Every tensor (bit for bit), module type and ``requires_grad`` flag of a model, to compare."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.types = [(n, type(m)) for n, m in model.named_modules()]
        self.grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
        self.attrs = sorted(vars(model))
        self.hooks = [len(getattr(model, h)) for h in ("_forward_hooks", "_forward_pre_hooks")]

    def assert_same(self, model: torch.nn.Module) -> None:
        now = Snapshot(model)
        assert now.types == self.types, "module types or names changed"
        assert now.grads == self.grads, "requires_grad flags changed"
        assert now.attrs == self.attrs, "the model's attributes changed"
        assert now.hooks == self.hooks, "hooks were added or removed"
        assert list(now.tensors) == list(self.tensors), "state_dict keys changed"
        for k, v in self.tensors.items():
            w = now.tensors[k]
            assert w.dtype == v.dtype and w.shape == v.shape, f"{k}: dtype or shape changed"
            assert torch.equal(w.view(-1).view(torch.uint8), v.view(-1).view(torch.uint8)), f"{k} changed"


@pytest.fixture
def two_threads():
    """Both cores for a test on the real 22M-parameter model (the tiny models run on one, above);
    the previous thread count is put back afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("two_threads")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert():
    """``tiny_bert(seed=0, **BertConfig overrides)`` → a 4-layer, hidden-32 random BertModel."""
    return _tiny_bert


@pytest.fixture(scope="session")
def tiny_gpt2():
    """``tiny_gpt2(seed=0, **GPT2Config overrides)`` → a 2-layer, hidden-32 random GPT2Model."""
    return _tiny_gpt2


@pytest.fixture(scope="session")
def snapshot():
    """``snap = snapshot(model)``; later ``snap.assert_same(model)``."""
    return Snapshot
