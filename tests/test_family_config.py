"""The family's configs: which are run, which are refused and by what name, and their published sizes."""

import pytest

import dsv3
from dsv3 import ConfigError
from dsv3.accounting import activated_parameters, kv_cache_bytes_per_token, total_parameters
from dsv3.presets import DEEPSEEK_V2_LITE, DEEPSEEK_V3, KIMI_K2, MOONLIGHT_16B_A3B

V32_EXP = "DeepSeek-V3.2-Exp \\(DeepSeek Sparse Attention\\) is not supported"


@pytest.mark.parametrize(
    "override, message",
    [
        # V3.2-Exp's indexer keys, whatever model_type says: never counted as V3.
        ({"index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}, "'index_n_heads': " + V32_EXP),
        ({"index_topk": 2048}, "'index_topk': " + V32_EXP),
        ({"model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"]}, "deepseek_v32.*" + V32_EXP),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "'llama' is not a DeepSeek-V3 family model"),
        ({"architectures": ["LlamaForCausalLM"]}, "architectures 'LlamaForCausalLM' is not a DeepSeek-V3"),
        ({"architectures": ["DeepseekV2ForCausalLM"]}, "expects DeepseekV3ForCausalLM"),
        ({"attention_bias": True}, "attention_bias: true .*q_a_proj, kv_a_proj_with_mqa and o_proj"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_interleave": False}, "rope_interleave: false"),
        ({"scoring_func": "softmax"}, "scoring_func 'softmax'.*model_type deepseek_v2"),
        ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported for model_type 'deepseek_v3'"),
        (
            {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}},
            "no weight_block_size: per-tensor FP8 is not supported",
        ),
        (
            {"quantization_config": {**DEEPSEEK_V3["quantization_config"], "activation_scheme": "static"}},
            "activation_scheme 'static'",
        ),
        ({"quantization_config": {**DEEPSEEK_V3["quantization_config"], "scale_fmt": "e5m2"}}, "scale_fmt 'e5m2'"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method 'awq'"),
    ],
)
def test_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        dsv3.ModelConfig.from_dict({**DEEPSEEK_V3, **override})


def test_v2_refusals_name_v2_routing():
    with pytest.raises(ConfigError, match="scoring_func 'sigmoid' is not DeepSeek-V2"):
        dsv3.ModelConfig.from_dict({**DEEPSEEK_V2_LITE, "scoring_func": "sigmoid"})
    with pytest.raises(ConfigError, match="topk_method 'noaux_tc'.*greedy, group_limited_greedy"):
        dsv3.ModelConfig.from_dict({**DEEPSEEK_V2_LITE, "topk_method": "noaux_tc"})
    with pytest.raises(ConfigError, match="expects DeepseekV2ForCausalLM"):
        dsv3.ModelConfig.from_dict({**DEEPSEEK_V2_LITE, "architectures": ["DeepseekV3ForCausalLM"]})


def test_int4_config_needs_a_group_scheme():
    q = dsv3.ModelConfig.from_pretrained("kimi-k2-thinking").quantization_config
    weights = q["config_groups"]["group_0"]["weights"]
    bad = {**q, "config_groups": {"group_0": {"weights": {**weights, "num_bits": 8}}}}
    with pytest.raises(ConfigError, match="only symmetric 4-bit int weights"):
        dsv3.ModelConfig.from_dict({**KIMI_K2, "quantization_config": bad})
    bad = {**q, "config_groups": {"group_0": {"weights": {**weights, "group_size": 0}}}}
    with pytest.raises(ConfigError, match="group_size"):
        dsv3.ModelConfig.from_dict({**KIMI_K2, "quantization_config": bad})


def test_accessors():
    assert dsv3.ModelConfig.from_pretrained("deepseek-v3.1").fp8_scale_fmt == "ue8m0"
    assert dsv3.ModelConfig.from_pretrained("deepseek-v3").fp8_scale_fmt is None
    assert dsv3.ModelConfig.from_pretrained("kimi-k2-thinking").int4_group_size == 32
    assert dsv3.ModelConfig.from_pretrained("kimi-k2").int4_group_size is None
    v2 = dsv3.ModelConfig.from_pretrained("deepseek-v2-lite")
    assert not v2.uses_correction_bias and v2.family.startswith("DeepSeek-V2")
    assert v2.to_dict()["architectures"] == ["DeepseekV2ForCausalLM"]
    kimi = dsv3.ModelConfig.from_pretrained("kimi-k2")
    assert kimi.family == "Kimi-K2" and kimi.to_dict()["model_type"] == "kimi_k2"


def test_greedy_v2_config_with_null_groups_loads():
    cfg = dsv3.ModelConfig.from_dict({**DEEPSEEK_V2_LITE, "n_group": None, "topk_group": None})
    assert (cfg.n_group, cfg.topk_group) == (1, 1)


# Published sizes: V3 "671B total, 37B activated" (DeepSeek's README_WEIGHTS: 36.6B); Kimi-K2 "1T total,
# 32B activated"; Moonlight-16B-A3B "16B total, 3B activated"; V2-Lite "15.7B total, 2.4B activated";
# V2 / V2.5 "236B total, 21B activated".
@pytest.mark.parametrize(
    "name, total_b, activated_b",
    [
        ("deepseek-v3", 671.0, 36.6),
        ("deepseek-v3.1", 671.0, 36.6),
        ("kimi-k2", 1026.4, 31.7),
        ("kimi-k2-thinking", 1026.4, 31.7),
        ("moonlight-16b-a3b", 16.0, 2.6),
        ("deepseek-v2-lite", 15.7, 2.5),
        ("deepseek-v2", 235.7, 20.9),
    ],
)
def test_published_totals(name, total_b, activated_b):
    cfg = dsv3.ModelConfig.from_pretrained(name)
    assert round(total_parameters(cfg) / 1e9, 1) == total_b
    assert round(activated_parameters(cfg) / 1e9, 1) == activated_b


def test_exact_totals_of_the_published_configs():
    assert total_parameters(dsv3.ModelConfig.from_dict(DEEPSEEK_V3)) == 671_026_419_200
    assert total_parameters(dsv3.ModelConfig.from_dict(KIMI_K2)) == 1_026_408_232_448
    # V2-Lite has no routing bias: 26 MoE layers x 64 experts fewer parameters than with one.
    v2 = dsv3.ModelConfig.from_dict(DEEPSEEK_V2_LITE)
    assert total_parameters(v2) == 15_706_484_224
    assert total_parameters(v2) == total_parameters(dsv3.ModelConfig.from_dict(MOONLIGHT_16B_A3B)) - (
        (11264 - 10944) * 2048 * 3  # Moonlight's wider first dense MLP
        + (163840 - 102400) * 2048 * 2  # its larger vocabulary (embedding and lm_head)
        + 26 * 64  # and its routing bias
    )


def test_kv_cache_per_token():
    # (kv_lora_rank 512 + rope 64) x layers x 2 bytes.
    assert kv_cache_bytes_per_token(dsv3.ModelConfig.from_pretrained("kimi-k2")) == 576 * 61 * 2
    assert kv_cache_bytes_per_token(dsv3.ModelConfig.from_pretrained("deepseek-v2-lite")) == 576 * 27 * 2


def test_int4_bytes_of_kimi_k2_thinking():
    """Routed experts at 4 bits plus a bf16 scale per 32 weights of a row; everything else bf16 (bias fp32)."""
    from dsv3.accounting import int4_bytes_per_expert_weight, summary_dict, weight_bytes

    cfg = dsv3.ModelConfig.from_pretrained("kimi-k2-thinking")
    moe_layers, E, D, F = 60, 384, 7168, 2048
    routed = moe_layers * E * 3 * D * F
    scales = moe_layers * E * (2 * F * (D // 32) + D * (F // 32))
    bias = moe_layers * E
    rest = total_parameters(cfg) - routed - bias
    expected = routed // 2 + scales * 2 + rest * 2 + bias * 4
    assert weight_bytes(cfg, "int4") == expected
    assert int4_bytes_per_expert_weight(cfg) == 0.5625
    assert summary_dict(cfg)["weight_bytes_int4"] == expected
    assert "weight_bytes_int4" not in summary_dict(dsv3.ModelConfig.from_pretrained("kimi-k2"))


def test_plan_with_int4_weights():
    from dsv3.accounting import plan_deployment

    cfg = dsv3.ModelConfig.from_pretrained("kimi-k2-thinking")
    fp8 = plan_deployment(cfg, devices=8, device_memory_gb=120, context=32768, batch=8, dtype="fp8")
    int4 = plan_deployment(cfg, devices=8, device_memory_gb=120, context=32768, batch=8, dtype="int4")
    assert not fp8["fits"] and int4["fits"]
    assert int4["weights_bytes"] < fp8["weights_bytes"]


def test_cli_params_and_plan(tmp_path, capsys):
    import json

    from dsv3.cli import main

    v32 = {**DEEPSEEK_V3, "model_type": "deepseek_v32", "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    (tmp_path / "config.json").write_text(json.dumps(v32))
    assert main(["params", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DeepSeek-V3.2-Exp (DeepSeek Sparse Attention) is not supported" in err
    assert main(["params", "kimi-k2-thinking", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_parameters"] == 1_026_408_232_448 and d["int4_group_size"] == 32
    args = ["plan", "deepseek-v2-lite", "--devices", "1", "--device-memory", "28", "--context", "4096", "--batch", "1"]
    assert main([*args, "--dtype", "fp8"]) == 0
    assert "Verdict:      fits" in capsys.readouterr().out
    assert main([*args, "--dtype", "bf16"]) == 0
    assert "Verdict:      does not fit: the weights alone" in capsys.readouterr().out
    assert main([*args, "--dtype", "int4"]) == 2
    assert "needs an INT4 config" in capsys.readouterr().err
