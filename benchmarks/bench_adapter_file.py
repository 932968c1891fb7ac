"""Adapter file size: lily_lab's ``save_adapter`` against PEFT's ``save_pretrained``.

A random 12-layer BERT with MiniLM's sizes (hidden 384, 12 heads, intermediate 1536, vocabulary
30,522) and Lily on query and value, r = 16, stride_A = 4, num_B = 4. PEFT stores each shared
``A`` and bank once per site; lily_lab stores each once. Sizes are the whole directory (weights and
JSON). The smoke run uses a tiny random BERT with the same layer count.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import lily_lab as ll

from ._common import Row, Settings, fmt_bytes, load_now

LIMIT = 0.2
LAYERS, R, STRIDE, NUM_B = 12, 16, 4, 4


def twelve_layer_bert(smoke: bool):
    from transformers import BertConfig, BertModel

    from ._models import tiny_bert_config

    torch.manual_seed(0)
    if smoke:
        config = tiny_bert_config(layers=LAYERS)
    else:
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=LAYERS, num_attention_heads=12,
                            intermediate_size=1536)
    return BertModel(config).eval()


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(settings: Settings) -> list[Row]:
    import peft

    load = f"{load_now():.1f}"
    base = twelve_layer_bert(settings.smoke)
    r = 4 if settings.smoke else R
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LilyConfig(
        target_modules=["query", "value"], r=r, stride_A=STRIDE, num_B=NUM_B, init_weights=False))
    ours = ll.add_lily(copy.deepcopy(base), ll.LilyConfig(["query", "value"], r=r, stride_A=STRIDE, num_B=NUM_B))
    with tempfile.TemporaryDirectory() as tmp:
        ours_dir, peft_dir = Path(tmp, "lily_lab"), Path(tmp, "peft")
        theirs.save_pretrained(peft_dir)
        # lily_lab reads PEFT's directory, then writes its own: the same adapter, both ways.
        ll.load_adapter(ours, peft_dir)
        ll.save_adapter(ours, ours_dir)
        check_same_outputs(theirs, ours, base, ours_dir)
        n_ours, n_peft = directory_bytes(ours_dir), directory_bytes(peft_dir)
    params = ll.count_parameters(ours)["adapter"]
    ratio = n_ours / n_peft
    row = Row(f"adapter file, {LAYERS} layers, stride {STRIDE}, num_B {NUM_B} (q, v, r = {r})",
              "PEFT `save_pretrained`", "≤ 0.2×", fmt_bytes(n_ours), fmt_bytes(n_peft), f"{ratio:.3f}×",
              None if settings.smoke else ratio <= LIMIT, load)
    row.key = "adapter file"
    row.notes.append(f"directory bytes, weights + JSON; adapter parameters {params:,} = "
                     f"{fmt_bytes(params * 4)} in float32 (PEFT's file is {n_peft / (params * 4):.1f}× that)")
    return [row]


@torch.no_grad()
def check_same_outputs(theirs, ours, base, ours_dir: Path) -> None:
    """PEFT's model, lily_lab's (loaded from PEFT's files) and a fresh lily_lab model loaded from
    lily_lab's own files give the same outputs (raises if not)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    reloaded = ll.load_adapter(copy.deepcopy(base), ours_dir)
    y = [m(input_ids=ids, attention_mask=mask).last_hidden_state for m in (theirs, ours, reloaded)]
    assert (y[0] - base(input_ids=ids, attention_mask=mask).last_hidden_state).abs().max() > 1e-4, \
        "the adapter does nothing: the comparison would prove nothing"
    for other in y[1:]:
        assert (other - y[0]).abs().max().item() <= 1e-5, "lily_lab's adapter gives other outputs than PEFT's"
