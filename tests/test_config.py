"""ModelConfig: presets, both rope styles, round trip, and validation that names the field."""

import json

import pytest

import dsv3
from dsv3 import ConfigError
from dsv3.presets import DEEPSEEK_V3


def test_seed_preset_is_the_seed_config():
    cfg = dsv3.ModelConfig.from_pretrained("deepseek-v3")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.q_lora_rank) == (7168, 61, 256, 1536)
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40
    assert cfg.fp8_block_size == (128, 128)
    assert cfg.moe_layer_indices == list(range(3, 61)) and cfg.qk_head_dim == 192


def test_json_path_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    a = dsv3.ModelConfig.from_pretrained(tmp_path / "config.json")
    b = dsv3.ModelConfig.from_pretrained(tmp_path)
    assert a == b == dsv3.ModelConfig.from_pretrained("deepseek-v3")


def test_new_style_rope_parameters_load_like_old_style():
    d = dict(DEEPSEEK_V3)
    old = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000, **{k: v for k, v in old.items() if k != "type"}}
    cfg = dsv3.ModelConfig.from_dict(d)
    ref = dsv3.ModelConfig.from_pretrained("deepseek-v3")
    assert cfg.rope_theta == 10000 and cfg.softmax_scale == ref.softmax_scale
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_type == "yarn"
    plain = dsv3.ModelConfig.from_dict({**d, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert plain.rope_scaling is None and plain.rope_theta == 5e5


def test_round_trip_keeps_unknown_keys(tmp_path):
    cfg = dsv3.ModelConfig.from_dict({**DEEPSEEK_V3, "auto_map": {"AutoConfig": "x"}})
    cfg.save(tmp_path / "c.json")
    again = dsv3.ModelConfig.from_pretrained(tmp_path / "c.json")
    assert again == cfg and again.extra["auto_map"] == {"AutoConfig": "x"}


@pytest.mark.parametrize(
    "override, field",
    [
        ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts"),
        ({"topk_group": 9}, "topk_group"),
        ({"num_experts_per_tok": 200, "topk_group": 1}, "num_experts_per_tok"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "greedy"}, "topk_method"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_attention_heads": -4}, "num_attention_heads"),
        ({"kv_lora_rank": "512"}, "kv_lora_rank"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
    ],
)
def test_validation_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        dsv3.ModelConfig.from_dict({**DEEPSEEK_V3, **override})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="deepseek-v3.*small.*tiny|presets"):
        dsv3.ModelConfig.from_pretrained("deepseek-v9")


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        dsv3.ModelConfig.from_pretrained(tmp_path)


def test_one_group_and_no_q_lora_are_valid():
    cfg = dsv3.ModelConfig.from_dict({**DEEPSEEK_V3, "n_group": 1, "topk_group": 1, "q_lora_rank": None})
    assert cfg.q_lora_rank is None and cfg.n_group == 1


def test_moe_layer_freq():
    cfg = dsv3.ModelConfig.from_pretrained("tiny", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    assert cfg.moe_layer_indices == [2, 4]
