"""dsv3.accounting: the seed's numbers exactly, agreement with a built model, bytes, FLOPs and plans."""

import math
import pathlib
import re

import pytest

from dsv3 import accounting as A
from dsv3.config import ModelConfig
from dsv3.errors import ConfigError

# A copy of ../shared/seeds/000_ef9ea79f938a8477.txt (config.json + parameter table), kept in the repository so
# these tests run in any clone.
SEED = pathlib.Path(__file__).resolve().parent / "data" / "deepseek_v3_seed.txt"
GIB = 1 << 30


@pytest.fixture(scope="module")
def v3() -> ModelConfig:
    return ModelConfig.from_pretrained("deepseek-v3")


@pytest.fixture(scope="module")
def tiny() -> ModelConfig:
    return ModelConfig.from_pretrained("tiny")


# --------------------------------------------------------------------------- the seed's figures
def test_seed_total(v3):
    assert A.total_parameters(v3) == 671_026_419_200
    table = A.parameter_table(v3)
    assert sum(n for _, n in table) == 671_026_419_200
    # 61 layers: 3 dense, 58 MoE of 256 experts x 3 projections; lm_head last.
    assert len(table) == 1 + 3 * 12 + 58 * (7 + 256 * 3 + 5 + 2) + 1 + 1
    assert table[0] == ("embed_tokens.weight", 926_679_040)
    assert table[-2] == ("norm.weight", 7168)
    assert table[-1] == ("lm_head.weight", 129280 * 7168)
    names = dict(table)
    assert names["layers.3.mlp.experts.17.gate_proj.weight"] == 2048 * 7168
    assert names["layers.60.mlp.experts.255.down_proj.weight"] == 7168 * 2048
    assert names["layers.3.mlp.gate.e_score_correction_bias"] == 256
    assert "layers.2.mlp.gate.weight" not in names and "layers.61.eh_proj.weight" not in names


def test_seed_rows_match_the_table(v3):
    """Every numbered row of the seed's table is a tensor of ours with the same count."""
    rows = re.findall(r"^\|\s*([\w.]+)\s*\|\s*(\d+)\s*\|$", SEED.read_text(), re.M)
    assert len(rows) == 58
    names = dict(A.parameter_table(v3))
    for name, count in rows:
        assert names[name] == int(count), name


def test_mtp_counts(v3):
    assert A.mtp_parameters(v3) == {"stored": 13_463_426_304, "unique": 11_610_068_224}
    assert A.total_parameters(v3, mtp=True) == 684_489_845_504
    table = A.parameter_table(v3, mtp=True)
    assert table[: len(A.parameter_table(v3))] == A.parameter_table(v3)  # MTP rows are appended
    names = dict(table)
    assert names["layers.61.eh_proj.weight"] == 7168 * 2 * 7168
    assert names["layers.61.mlp.experts.255.up_proj.weight"] == 2048 * 7168
    assert names["layers.61.shared_head.head.weight"] == names["lm_head.weight"]
    assert names["layers.61.embed_tokens.weight"] == names["embed_tokens.weight"]
    assert table[-1][0] == "layers.61.shared_head.head.weight"


def test_kv_cache_per_token(v3, tiny):
    assert A.kv_cache_bytes_per_token(v3) == 70_272
    assert A.kv_cache_bytes_per_token(v3, dtype_bytes=1) == 35_136
    assert A.kv_cache_bytes_per_token(tiny) == (32 + 8) * 3 * 2


def test_activated_v3_is_deepseeks_figure(v3):
    # README_WEIGHTS.md: "Activation parameters: 36.6B (including 0.9B for the output Head)".
    assert A.activated_parameters(v3) == 36_625_618_432


def test_seed_table_is_reproduced_exactly(v3):
    seed_lines = SEED.read_text().splitlines()
    borders = [i for i, line in enumerate(seed_lines) if line.startswith("+---")]
    expected = seed_lines[borders[0] : borders[-1] + 1]
    out = A.format_param_table(v3).splitlines()
    ours = [i for i, line in enumerate(out) if line.startswith("+---")]
    assert out[ours[0] : ours[-1] + 1] == expected
    assert "Total Parameters: 671,026,419,200" in out


def test_table_folds_general_configs(tiny):
    cfg = tiny.replace(first_k_dense_replace=0, num_hidden_layers=5, n_routed_experts=16, n_group=4)
    lines = A.format_param_table(cfg, mtp=True).splitlines()
    text = "\n".join(lines)
    assert "layers.0.mlp.experts.1.down_proj.weight" in text and "layers.0.mlp.experts.2." not in text
    assert "... mlp.experts.2 to mlp.experts.15 ..." in text
    assert "... layers.1 to layers.4 ..." in text and "layers.1.self_attn" not in text
    assert "layers.5.shared_head.head.weight" in text  # the MTP layer, shown in full
    assert f"Total Parameters: {A.total_parameters(cfg, mtp=True):,}" in text
    widths = {len(line) for line in lines if line.startswith(("|", "+"))}
    assert len(widths) == 1
    # No fold when nothing is left to fold: two layers, the second the first MoE layer.
    two = tiny.replace(num_hidden_layers=2)
    assert "... layers." not in A.format_param_table(two)


# --------------------------------------------------------------------------- against a built model
def _model_param_count(cfg: ModelConfig, mtp: bool) -> int:
    import torch

    from dsv3.model.transformer import DeepSeekV3

    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    tensors = list(model.named_parameters()) + [
        (n, b)
        for n, b in model.named_buffers()
        if n.endswith("e_score_correction_bias")  # a persistent buffer
    ]
    return sum(
        t.numel()
        for n, t in tensors
        if (mtp or not n.startswith(("mtp.", "model.mtp."))) and not n.endswith("weight_scale_inv")
    )


MODEL_CONFIGS = {
    "deepseek-v3": {},
    "small": {},
    "tiny": {},
    "q_proj": {"q_lora_rank": None},
    "two-shared": {"n_shared_experts": 2},
    "no-shared": {"n_shared_experts": 0},
    "all-moe": {"first_k_dense_replace": 0},
    "moe-every-2nd": {"moe_layer_freq": 2, "first_k_dense_replace": 0, "num_hidden_layers": 4},
    "tied": {"tie_word_embeddings": True},
    "two-mtp": {"num_nextn_predict_layers": 2},
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_meta_model_matches(name):
    base = name if name in ("deepseek-v3", "small", "tiny") else "tiny"
    cfg = ModelConfig.from_pretrained(base, **MODEL_CONFIGS[name], quantization_config=None)
    assert _model_param_count(cfg, mtp=False) == A.total_parameters(cfg)
    if not cfg.tie_word_embeddings:  # with tied weights the MTP head's sharing is the model's choice
        assert _model_param_count(cfg, mtp=True) == A.total_parameters(cfg, mtp=True)


# --------------------------------------------------------------------------- activated, bytes, FLOPs
def test_activated_tiny_by_hand(tiny):
    attention = 64 * 48 + 48 + 48 * 4 * 24 + 64 * (32 + 8) + 32 + 32 * 4 * (16 + 16) + 4 * 16 * 64  # 18,512
    norms = 2 * 64
    dense = 3 * 64 * 128
    expert = 3 * 64 * 32
    router = 8 * 64 + 8
    moe_layer = attention + norms + router + expert * (1 + 2)  # 1 shared + top-2 routed
    lm_head = 320 * 64
    expected = (attention + norms + dense) + 2 * moe_layer + 64 + lm_head  # no embedding table
    assert expected == 138_944
    assert A.activated_parameters(tiny) == expected


def test_fp8_bytes_with_partial_blocks():
    # Nothing a multiple of 128: every scale grid rounds up.
    cfg = ModelConfig.from_dict(
        {
            "vocab_size": 256,
            "hidden_size": 200,
            "intermediate_size": 300,
            "num_hidden_layers": 1,
            "first_k_dense_replace": 1,
            "n_routed_experts": 0,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "q_lora_rank": None,
            "kv_lora_rank": 130,
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 16,
            "v_head_dim": 70,
        }
    )

    def fp8(out: int, inp: int) -> int:
        return out * inp + math.ceil(out / 128) * math.ceil(inp / 128) * 4

    projections = (
        fp8(2 * 80, 200)  # q_proj: 2 x 2 scales
        + fp8(130 + 16, 200)  # kv_a_proj_with_mqa: 2 x 2
        + fp8(2 * (64 + 70), 130)  # kv_b_proj: 3 x 2
        + fp8(200, 2 * 70)  # o_proj: 2 x 2
        + 2 * fp8(300, 200)  # gate_proj, up_proj: 3 x 2
        + fp8(200, 300)  # down_proj: 2 x 3
    )
    assert fp8(2 * (64 + 70), 130) == 268 * 130 + 6 * 4
    high_precision = 2 * (130 + 2 * 200 + 256 * 200 + 200 + 256 * 200)  # norms, embedding, final norm, lm_head
    assert A.weight_bytes(cfg, "fp8") == projections + high_precision
    assert A.weight_bytes(cfg, "bf16") == 2 * A.total_parameters(cfg)


def test_weight_bytes_v3(v3):
    bias = 58 * 256
    assert A.weight_bytes(v3, "bf16") == 2 * (671_026_419_200 - bias) + 4 * bias
    fp8 = A.weight_bytes(v3, "fp8", mtp=True)
    assert 688e9 < fp8 < 689e9  # the official FP8 checkpoint's size
    with pytest.raises(ConfigError, match="int4"):
        A.weight_bytes(v3, "int4")


def test_fp8_block_size_from_config(tiny):
    # 64x64 blocks: kv_b_proj [128, 32] gets 2 x 1 scales instead of 1 x 1, etc.
    coarse = A.weight_bytes(tiny, "fp8")
    fine = A.weight_bytes(
        tiny.replace(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]}), "fp8"
    )
    assert fine > coarse


def test_flops_per_token(tiny, v3):
    matmul = A.activated_parameters(tiny) - 3 * (2 * 64 + 48 + 32) - 64 - 2 * 8  # less norms and biases
    attention = 2 * 4 * (24 + 16) * 100 * 3
    assert A.flops_per_token(tiny, 100) == 2 * matmul + attention
    assert A.flops_per_token(v3, 0) < 2 * A.activated_parameters(v3)
    assert A.flops_per_token(v3, 1000) - A.flops_per_token(v3, 0) == 2 * 128 * (192 + 128) * 1000 * 61


def test_summary(v3):
    d = A.summary_dict(v3, mtp=True)
    assert d["total_parameters"] == 671_026_419_200
    assert d["total_parameters_with_mtp"] == 684_489_845_504
    assert d["mtp_parameters_unique"] == 11_610_068_224
    assert d["kv_cache_bytes_per_token"] == 70_272
    text = A.format_summary(v3, mtp=True)
    for figure in (
        "671,026,419,200",
        "36,625,618,432",
        "13,463,426,304",
        "11,610,068,224",
        "684,489,845,504",
        "70,272",
    ):
        assert figure in text
    assert "mtp_parameters_stored" not in A.summary_dict(v3)


# --------------------------------------------------------------------------- deployment plans
def test_plan_single_device_is_the_whole_model(tiny):
    for dtype in ("bf16", "fp8"):
        for mtp in (False, True):
            plan = A.plan_deployment(tiny, devices=1, device_memory_gb=1.0, context=256, batch=2, dtype=dtype, mtp=mtp)
            assert plan["weights_bytes"] == A.weight_bytes(tiny, dtype, mtp=mtp)
    plan = A.plan_deployment(tiny, devices=1, device_memory_gb=1.0, context=256, batch=2)
    assert plan["kv_cache_bytes"] == 2 * 256 * A.kv_cache_bytes_per_token(tiny)
    assert plan["fits"] and plan["free_bytes"] > 0
    assert plan["total_bytes"] == plan["weights_bytes"] + plan["kv_cache_bytes"] + plan["activation_bytes"]
    assert plan["verdict"].startswith("fits")
    assert "Verdict:      fits" in A.format_plan(plan)


def test_plan_v3_does_not_fit_in_bf16_on_8x80(v3):
    plan = A.plan_deployment(v3, devices=8, device_memory_gb=80, context=4096, batch=1, dtype="bf16")
    assert not plan["fits"] and plan["weights_bytes"] > 80 * GIB
    assert plan["verdict"].startswith("does not fit: the weights alone")
    assert "in fp8" in plan["verdict"]  # fp8 weights (79 GiB per device) would fit
    fits = A.plan_deployment(v3, devices=8, device_memory_gb=141, context=32768, batch=8, dtype="fp8")
    assert fits["fits"] and fits["experts_per_device"] == 32 and fits["heads_per_device"] == 16
    # max_batch is the edge: that batch fits, one more sequence does not.
    edge = A.plan_deployment(v3, devices=8, device_memory_gb=141, context=32768, batch=fits["max_batch"], dtype="fp8")
    over = A.plan_deployment(
        v3, devices=8, device_memory_gb=141, context=32768, batch=fits["max_batch"] + 1, dtype="fp8"
    )
    assert edge["fits"] and not over["fits"]


def test_plan_split_weights_by_hand(tiny):
    """tp = ep = 2: heads, dense/shared MLP and vocab halve, experts 0-3 stay on rank 0, the rest replicate."""
    plan = A.plan_deployment(tiny, devices=2, device_memory_gb=1.0, context=64, batch=1)
    split = (
        "q_b_proj",
        "kv_b_proj",
        "o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "shared_experts",
        "embed_tokens",
        "lm_head",
    )
    expected = 0
    for name, n in A.parameter_table(tiny):
        m = re.search(r"experts\.(\d+)\.", name)
        if m:
            expected += 2 * n if int(m.group(1)) < 4 else 0
        elif name.endswith("e_score_correction_bias"):
            expected += 4 * n
        elif any(s in name for s in split):
            expected += 2 * n // 2
        else:
            expected += 2 * n
    assert plan["weights_bytes"] == expected
    # Uneven splits are refused, as apply_tp / apply_ep refuse them (they used to be planned with ceil division).
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) is not divisible by tp \(3\)"):
        A.plan_deployment(tiny, devices=3, device_memory_gb=1.0, context=64, batch=1, tp=3, ep=1)
    with pytest.raises(ConfigError, match=r"n_routed_experts \(8\) is not divisible by ep \(3\)"):
        A.plan_deployment(tiny, devices=3, device_memory_gb=1.0, context=64, batch=1, tp=1, ep=3)
    odd = ModelConfig.from_pretrained("tiny", intermediate_size=130)
    with pytest.raises(ConfigError, match=r"intermediate_size \(130\) is not divisible by tp \(4\)"):
        A.plan_deployment(odd, devices=4, device_memory_gb=1.0, context=64, batch=1, tp=4, ep=1)
    two = A.plan_deployment(tiny, devices=2, device_memory_gb=1.0, context=64, batch=1, tp=2, ep=2)
    assert two["heads_per_device"] == 2 and two["experts_per_device"] == 4


def test_plan_data_parallel_attention_shares_the_batch(v3):
    plan = A.plan_deployment(v3, devices=8, device_memory_gb=141, context=8192, batch=64, dtype="fp8", tp=1, ep=8)
    assert plan["dp"] == 8 and plan["batch_per_replica"] == 8
    assert plan["kv_cache_bytes"] == 8 * 8192 * 70_272


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tp": 3}, "tp"),
        ({"devices": 0}, "devices"),
        ({"context": 10**9}, "max_position_embeddings"),
        ({"device_memory_gb": 0}, "memory"),
        ({"dtype": "fp4"}, "fp4"),
    ],
)
def test_plan_rejects_bad_arguments(v3, kwargs, match):
    args = {"devices": 8, "device_memory_gb": 80, "context": 4096, "batch": 1, **kwargs}
    with pytest.raises(ConfigError, match=match):
        A.plan_deployment(v3, **args)


# --------------------------------------------------------------------------- arithmetic only
def test_671b_accounting_builds_no_model(v3, monkeypatch):
    """Accounting is pure arithmetic on the config (why it takes ~0.1 s for 671B): building a model fails here."""
    import dsv3.model.transformer

    def refuse(*args, **kwargs):
        raise AssertionError("accounting built a model")

    monkeypatch.setattr(dsv3.model.transformer.DeepSeekV3, "__init__", refuse)
    assert "671,026,419,200" in A.format_param_table(v3, mtp=False)
    A.format_summary(v3, mtp=True)
    assert A.activated_parameters(v3) == 36_625_618_432
    assert A.flops_per_token(v3, 4096) > 0
    A.format_plan(A.plan_deployment(v3, devices=8, device_memory_gb=80, context=4096, batch=1, dtype="fp8"))
