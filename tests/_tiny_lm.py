"""The tiny random causal LMs the causal-routing, phase and consistency tests share: each builder
returns ``(model in eval mode, Lily target names)``; vocabulary ``VOCAB``, pad id 0."""

from __future__ import annotations

import transformers

VOCAB = 64


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj"]


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval(), ["c_attn"]
