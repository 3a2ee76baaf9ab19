"""Build a random transformers `DeepseekV3ForCausalLM` whose weights matter, and save it.

"Matter": random `e_score_correction_bias` large enough to change which experts are chosen,
RMSNorm weights not all ones, so parity cannot pass by accident.
"""

from __future__ import annotations

import torch

from dsv3.presets import TINY

VARIANTS = {
    # V3-like: q_lora, n_group > 1, topk_group < n_group, yarn; tests run past original_max_position_embeddings.
    "v3like": {},
    "no_q_lora": {"q_lora_rank": None},
    "one_group": {"n_group": 1, "topk_group": 1},
    "no_norm_topk": {"norm_topk_prob": False},
    "all_moe": {"first_k_dense_replace": 0},
    "no_rope_scaling": {"rope_scaling": None},
    "two_shared": {"n_shared_experts": 2},
    # Sizes that are not multiples of anything nice, more experts per token, odd head count.
    "odd_sizes": {
        "hidden_size": 72,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
        "q_lora_rank": 40,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 12,
        "qk_rope_head_dim": 6,
        "v_head_dim": 10,
        "moe_intermediate_size": 20,
        "intermediate_size": 100,
        "n_routed_experts": 12,
        "n_group": 3,
        "topk_group": 2,
        "num_experts_per_tok": 3,
    },
}


def hf_config_dict(**overrides) -> dict:
    d = dict(TINY)
    d.update(overrides)
    return d


def make_hf_model(cfg_dict: dict, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = dict(cfg_dict)
    if d.get("rope_scaling") is None:
        d.pop("rope_scaling", None)
    cfg = DeepseekV3Config(**d)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "gate.weight" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))  # spread the affinities
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model
