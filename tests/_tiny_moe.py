"""Tiny random mixture-of-experts LLMs of the architectures lily_lab reads (docs/beyond_lily.md).

Each differs in how it routes: Mixtral (softmax, top-k renormalised), Qwen2-MoE (softmax, not
renormalised, a shared expert beside the routed ones, a dense layer among the MoE ones), OLMoE
(softmax, 8 experts, top 2), DeepSeek-V3 (sigmoid scores with a correction bias, group-limited
choice, scaled weights), GPT-OSS (top-k of the logits with a bias, softmax over the chosen only).
"""

from __future__ import annotations

import torch
import transformers as T

_COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)

ARCHITECTURES = ("mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss")


def config(arch: str):
    if arch == "mixtral":
        return T.MixtralConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2_moe":  # layer 1 dense: only layer 0 has a router
        return T.Qwen2MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=32, mlp_only_layers=[1])
    if arch == "olmoe":
        return T.OlmoeConfig(**_COMMON, num_experts=8, num_experts_per_tok=2)
    if arch == "deepseek_v3":
        return T.DeepseekV3Config(**{**_COMMON, "num_key_value_heads": 4}, n_routed_experts=8, num_experts_per_tok=2,
                                  n_group=4, topk_group=2, moe_intermediate_size=16, first_k_dense_replace=0,
                                  kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
                                  v_head_dim=8, head_dim=4, routed_scaling_factor=2.5)
    if arch == "gpt_oss":
        return T.GptOssConfig(**_COMMON, num_local_experts=4, num_experts_per_tok=2, head_dim=8)
    raise ValueError(arch)


def model(arch: str, seed: int = 0):
    """A tiny random causal LM of ``arch`` in eval mode; routers with random weights (and for
    DeepSeek-V3 a random correction bias, so that it steers the choice)."""
    torch.manual_seed(seed)
    m = T.AutoModelForCausalLM.from_config(config(arch)).eval()
    with torch.no_grad():
        for name, mod in m.named_modules():
            w = mod._parameters.get("weight")
            if getattr(mod, "top_k", None) is not None and w is not None and w.dim() == 2:
                w.normal_(0, 0.5)
                bias = getattr(mod, "e_score_correction_bias", None)
                if bias is not None:
                    bias.copy_(torch.randn_like(bias) * 0.3)
    return m


def batch(seed: int = 0, b: int = 3, t: int = 7):
    """Token ids and a right-padded attention mask (some padding in every row but the first)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):
        mask[i, t - i:] = 0
    return ids, mask


def steer(m, layer: int, expert: int, sign: float = 1.0) -> None:
    """Make ``layer``'s router give ``expert`` a logit of ``sign · 100`` for every token of
    ``batch()`` (21 router inputs of 32 dimensions: ``H d = 1`` has an exact solution): ``+``
    sends every token there, ``-`` none."""
    gate = m.model.layers[layer].mlp.gate
    seen = []
    hook = gate.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    ids, mask = batch()
    with torch.no_grad():
        m(input_ids=ids, attention_mask=mask)
    hook.remove()
    H = seen[0]
    d = torch.linalg.lstsq(H, torch.ones(len(H), 1)).solution[:, 0]
    assert torch.allclose(H @ d, torch.ones(len(H)), atol=1e-3)
    with torch.no_grad():
        gate.weight[expert] = sign * 100 * d
