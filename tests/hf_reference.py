"""Build a random transformers `DeepseekV3ForCausalLM` whose weights matter, and save it.

"Matter": random `e_score_correction_bias` large enough to change which experts are chosen,
RMSNorm weights not all ones, so parity cannot pass by accident.
"""

from __future__ import annotations

import json
import os

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


# --------------------------------------------------------------------------- the published family, shrunk
def family_configs() -> dict[str, dict]:
    """The real config.json of each checkpoint family member (dsv3.presets), before shrinking."""
    from dsv3 import presets

    return {
        "deepseek-v3": presets.DEEPSEEK_V3,
        "deepseek-r1": presets.DEEPSEEK_V3,  # R1 and V3-0324 have V3's config.json architecture keys
        "deepseek-v3-0324": presets.DEEPSEEK_V3,
        "deepseek-v3.1": presets.DEEPSEEK_V3_1,
        "kimi-k2-instruct": presets.KIMI_K2,
        "moonlight-16b-a3b": presets.MOONLIGHT_16B_A3B,
        "deepseek-v2-lite-chat": presets.DEEPSEEK_V2_LITE,
        "deepseek-v2.5": presets.DEEPSEEK_V2,
    }


def shrink(real: dict) -> dict:
    """A few layers and small widths, every structural key kept (routing, eps, scaling, q LoRA or not, YaRN).

    Experts shrink to two per group (at least num_experts_per_tok + 4 when there is one group), so the
    group-limited routing still has groups to drop; YaRN's original context shrinks to 128 positions so a
    160-token input reaches the interpolated band. Token ids shrink with the vocabulary.
    """
    d = dict(real)
    n_group, k = d["n_group"] or 1, d["num_experts_per_tok"]
    experts = n_group * 2 if n_group > 1 else k + 4
    d.update(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=24,
        num_hidden_layers=min(d["first_k_dense_replace"], 1) + 2,
        first_k_dense_replace=min(d["first_k_dense_replace"], 1),
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None if d["q_lora_rank"] is None else 40,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=experts,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        quantization_config=None,  # fp32 parity; the FP8 / ue8m0 side is tested on its own
    )
    if d.get("rope_scaling"):
        d["rope_scaling"] = {**d["rope_scaling"], "original_max_position_embeddings": 128}
        d["max_position_embeddings"] = 128 * int(d["rope_scaling"]["factor"])
    return d


def make_hf_family_model(cfg_dict: dict, seed: int = 0):
    """transformers' DeepseekV3ForCausalLM (V3, Kimi-K2, Moonlight) or DeepseekV2ForCausalLM, random weights that matter."""
    import transformers

    v2 = cfg_dict.get("model_type") == "deepseek_v2"
    config_cls = transformers.DeepseekV2Config if v2 else transformers.DeepseekV3Config
    model_cls = transformers.DeepseekV2ForCausalLM if v2 else transformers.DeepseekV3ForCausalLM
    d = {k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures", "quantization_config")}
    if d.get("rope_scaling") is None:
        d.pop("rope_scaling", None)
    cfg = config_cls(**d)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    randomize_(model, seed + 1)
    return model


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights that matter (ours or transformers'): non-unit norms, spread router, random correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def hf_load(path, model_type: str):
    """transformers' own loader on a directory dsv3 wrote.

    transformers picks its expert-stacking converter by `model_type` and has none for `kimi_k2` (Kimi-K2
    runs there as remote code), so a Kimi-K2 directory is loaded from a copy that says `deepseek_v3`.
    """
    import shutil

    import transformers

    cls = transformers.DeepseekV2ForCausalLM if model_type == "deepseek_v2" else transformers.DeepseekV3ForCausalLM
    if model_type not in ("deepseek_v2", "deepseek_v3"):
        copy = os.fspath(path) + "-as-deepseek_v3"
        shutil.copytree(path, copy, dirs_exist_ok=True)
        config_path = os.path.join(copy, "config.json")
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        config["model_type"] = "deepseek_v3"
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)
        path = copy
    model = cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.float().eval()
