"""Component tests with answers worked out by hand: router, YaRN, softmax scale, RoPE pairs, MLA paths."""

import math

import pytest
import torch

import dsv3
from dsv3.model.attention import MLA
from dsv3.model.cache import LatentCache
from dsv3.model.moe import Router, route_tokens
from dsv3.model.options import InferenceOptions
from dsv3.model.rope import apply_rope, rope_frequencies


def router_for(logits: list[float], n_group: int, topk_group: int, top_k: int, norm=True, bias=None) -> Router:
    """A Router whose affinities for the input e_0 are sigmoid(logits)."""
    E = len(logits)
    cfg = dsv3.ModelConfig.from_pretrained(
        "tiny",
        n_routed_experts=E,
        n_group=n_group,
        topk_group=topk_group,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        hidden_size=8,
    )
    r = Router(cfg)
    with torch.no_grad():
        r.weight.zero_()
        r.weight[:, 0] = torch.tensor(logits)
        if bias is not None:
            r.e_score_correction_bias.copy_(torch.tensor(bias))
    return r


def logit(p: float) -> float:
    return math.log(p / (1 - p))


E0 = torch.zeros(1, 8)
E0[0, 0] = 1.0
SCORES = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.6, 0.05]  # groups of 2: sums 1.0, 1.5, 0.5, 0.65


def test_router_picks_top2_groups_then_topk():
    r = router_for([logit(p) for p in SCORES], n_group=4, topk_group=2, top_k=2)
    idx, w = r(E0)
    # Kept groups: g1 (1.5) and g0 (1.0); best two experts inside them: 0 (0.9) and 2 (0.8).
    assert sorted(idx[0].tolist()) == [0, 2]
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got[0] == pytest.approx(2.5 * 0.9 / 1.7, rel=1e-5)
    assert got[2] == pytest.approx(2.5 * 0.8 / 1.7, rel=1e-5)


def test_bias_changes_choice_but_not_weights():
    bias = [0, 0, 0, 0, 0, 0, 1.0, 0]
    r = router_for([logit(p) for p in SCORES], n_group=4, topk_group=2, top_k=2, bias=bias)
    idx, w = r(E0)
    # Biased group sums: g3 = 1.6 + 0.05 = 1.65, g1 = 1.5 -> experts 6 (biased 1.6) and 2 (0.8).
    assert sorted(idx[0].tolist()) == [2, 6]
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    # Combine weights come from the UNBIASED scores 0.6 and 0.8.
    assert got[6] == pytest.approx(2.5 * 0.6 / 1.4, rel=1e-5)
    assert got[2] == pytest.approx(2.5 * 0.8 / 1.4, rel=1e-5)


def test_dropped_groups_are_minus_inf_even_when_scores_are_negative():
    # All biased scores are negative; a 0-mask on dropped groups would make them win.
    bias = [-2.0] * 8
    r = router_for([logit(p) for p in SCORES], n_group=4, topk_group=2, top_k=2, bias=bias)
    idx, _ = r(E0)
    assert sorted(idx[0].tolist()) == [0, 2]


def test_group_score_is_top2_sum_not_max():
    # g0 = {0.95, 0.01}: max 0.95, sum 0.96; g1 = {0.6, 0.6}: max 0.6, sum 1.2 -> g1 must win.
    r = router_for([logit(p) for p in [0.95, 0.01, 0.6, 0.6]], n_group=2, topk_group=1, top_k=1)
    idx, w = r(E0)
    assert idx[0].tolist() == [2]  # tie 0.6 / 0.6 -> the lower id
    assert w[0].tolist() == pytest.approx([2.5])  # normalised over one expert


def test_no_norm_topk_prob_keeps_raw_scores():
    r = router_for([logit(p) for p in SCORES], n_group=4, topk_group=2, top_k=2, norm=False)
    idx, w = r(E0)
    got = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert got[0] == pytest.approx(2.5 * 0.9, rel=1e-5) and got[2] == pytest.approx(2.5 * 0.8, rel=1e-5)


def test_routing_ties_are_deterministic():
    scores = torch.full((3, 8), 0.5)
    a = route_tokens(scores, torch.zeros(8), 4, 2, 2)
    b = route_tokens(scores, torch.zeros(8), 4, 2, 2)
    assert torch.equal(a, b) and a[0].tolist() == [0, 1]


def test_router_is_float32_under_bf16():
    r = router_for([logit(p) for p in SCORES], n_group=4, topk_group=2, top_k=2).to(torch.bfloat16)
    assert r.e_score_correction_bias.dtype == torch.float32
    idx, w = r(E0.bfloat16())
    assert w.dtype == torch.float32 and sorted(idx[0].tolist()) == [0, 2]


def test_yarn_frequencies_by_hand(tiny_cfg):
    # dim 8, base 1e4, factor 4, original 128, beta_fast 32, beta_slow 1:
    # low = max(floor(8 ln(128/(64 pi)) / (2 ln 1e4)), 0) = 0; high = min(ceil(8 ln(128/(2 pi)) / (2 ln 1e4)), 7) = 2
    # ramp over i = 0..3: [0, 0.5, 1, 1]; base freqs [1, 0.1, 0.01, 0.001]; interpolated = base / 4.
    inv_freq, attn_factor = rope_frequencies(tiny_cfg)
    expected = [1.0, 0.1 * (0.5 / 4 + 0.5), 0.01 / 4, 0.001 / 4]
    assert inv_freq.tolist() == pytest.approx(expected, rel=1e-6)
    assert attn_factor == 1.0  # mscale == mscale_all_dim


def test_no_rope_scaling_frequencies(tiny_cfg):
    inv_freq, _ = rope_frequencies(tiny_cfg.replace(rope_scaling=None))
    assert inv_freq.tolist() == pytest.approx([1.0, 0.1, 0.01, 0.001], rel=1e-6)


def test_softmax_scale_v3():
    cfg = dsv3.ModelConfig.from_pretrained("deepseek-v3")
    m = 0.1 * 1.0 * math.log(40) + 1  # 1.36888794...
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(0.1352337, rel=1e-6)
    assert cfg.replace(rope_scaling=None).softmax_scale == pytest.approx(192**-0.5)


def test_rope_rotates_adjacent_pairs():
    x = torch.tensor([[[1.0, 0.0, 0.0, 2.0]]])  # (B=1, T=1, d=4): pairs (1,0) and (0,2)
    ang = torch.tensor([[[math.pi / 2, math.pi]]])
    out = apply_rope(x, ang.cos(), ang.sin())
    # (1,0) by 90 deg -> (0,1); (0,2) by 180 deg -> (0,-2)
    assert out[0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0, -2.0], abs=1e-6)


@pytest.mark.parametrize("q_lora", [48, None])
def test_absorbed_and_expanded_attention_agree(tiny_cfg, q_lora):
    cfg = tiny_cfg.replace(q_lora_rank=q_lora)
    torch.manual_seed(0)
    attn = MLA(cfg, layer_idx=0).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rotary = dsv3.DeepSeekV3(cfg.replace(num_hidden_layers=1)).rotary
    x = torch.randn(2, 9, cfg.hidden_size)
    cache = LatentCache(cfg, 2, 16, dtype=torch.float32, num_layers=1)
    slots = [cache.allocate(), cache.allocate()]
    # Ragged: row 0 brings 9 tokens, row 1 only 6 (right padded).
    batch = cache.bind(slots, [9, 6])
    cos, sin = rotary(batch.positions(9))
    with torch.no_grad():
        a = attn(x, cos, sin, cache.bind(slots, [9, 6]), absorb=True)
        b = attn(x, cos, sin, cache.bind(slots, [9, 6]), absorb=False)
        ref = attn(x, cos, sin, None)  # plain causal attention over the 9 tokens
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :6], b[1, :6], atol=1e-5)
    assert torch.allclose(a[0], ref[0], atol=1e-5) and torch.allclose(a[1, :6], ref[1, :6], atol=1e-5)


def test_cache_holds_latent_only(tiny_cfg):
    cache = LatentCache(tiny_cfg, num_slots=3, max_len=10, dtype=torch.bfloat16)
    # (kv_lora_rank 32 + rope 8) values x 3 layers x 2 bytes, per token.
    assert cache.nbytes() == 3 * 10 * 3 * (32 + 8) * 2
    v3 = dsv3.ModelConfig.from_pretrained("deepseek-v3")
    assert v3.kv_cache_dim * v3.num_hidden_layers * 2 == 70_272


def test_fused_projections_give_the_same_numbers_and_names(tiny_cfg):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg).eval()
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 20))
    with torch.no_grad():
        before = model(ids)
        names = list(model.state_dict())
        model.fuse_projections_()
        layer = model.model.layers[1]
        assert layer.mlp.experts._gate_up is not None and layer.self_attn._x_proj is not None
        # gate_proj now lives inside the fused tensor, the state dict is unchanged.
        assert layer.mlp.experts.gate_proj.weight.data_ptr() == layer.mlp.experts._gate_up.data_ptr()
        assert list(model.state_dict()) == names
        after = model(ids)
    assert torch.allclose(before, after, atol=1e-5)
    # Training (grad enabled) takes the unfused path so gradients reach every Parameter.
    model.train()
    model(ids).sum().backward()
    assert layer.mlp.experts.up_proj.weight.grad is not None and layer.self_attn.q_a_proj.weight.grad is not None


def _independent_moe(experts, x, idx, w):
    """Token by token, expert by expert, from the stacked weights: no dsv3 code involved."""
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            h = torch.nn.functional.silu(experts.gate_proj.weight[e] @ x[t]) * (experts.up_proj.weight[e] @ x[t])
            ref[t] += w[t, k] * (experts.down_proj.weight[e] @ h)
    return ref


@pytest.mark.parametrize("fused", [False, True])
def test_every_expert_strategy_matches_the_reference(tiny_cfg, fused):
    import dsv3.model.moe as moe

    torch.manual_seed(0)
    experts = moe.Experts(tiny_cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(40, tiny_cfg.hidden_size)
    idx = torch.randint(0, tiny_cfg.n_routed_experts, (40, 2))
    w = torch.rand(40, 2)
    with torch.no_grad():
        if fused:
            experts.fuse_()
            assert experts.gate_up_weights(torch.float32) is not None
        ref = _independent_moe(experts, x, idx, w)
        order, counts = moe.sort_by_expert(idx, experts.num_experts)
        x_sorted = x[order // 2]
        reference = moe.experts_reference(experts, x_sorted, counts)
        for name in moe.EXPERT_STRATEGIES:
            assert torch.allclose(experts.compute(x_sorted, counts, name), reference, atol=1e-5), name
            assert torch.allclose(experts(x, idx, w, strategy=name), ref, atol=1e-4), name
        # Default choice: many rows per expert -> grouped; one token (K rows) -> loop.
        assert moe.choose_strategy(experts, x_sorted) == "grouped"
        assert moe.choose_strategy(experts, x_sorted[:2]) == "loop"
        one = torch.cat([experts(x[t : t + 1], idx[t : t + 1], w[t : t + 1]) for t in range(40)])
    assert torch.allclose(one, ref, atol=1e-4)  # the batch-1 decode path


def test_widened_loop_gathers_each_experts_rows_as_compute_does(tiny_cfg):
    """A bf16 prefill under matmul_dtype fp32 runs the loop gathering each expert's rows from x itself: the
    same bits as `compute` on the sorted copy of x, then `combine`."""
    import dsv3.model.moe as moe

    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg, dtype=torch.bfloat16).eval()
    model.prepare_for_inference(InferenceOptions(matmul_dtype="fp32"))
    experts = next(layer.mlp.experts for layer in model.model.layers if isinstance(layer.mlp, moe.MoE))
    x = torch.randn(200, tiny_cfg.hidden_size).bfloat16()
    idx = torch.randint(0, tiny_cfg.n_routed_experts, (200, tiny_cfg.num_experts_per_tok))
    w = torch.rand(200, tiny_cfg.num_experts_per_tok)
    with torch.no_grad():
        order, counts = moe.sort_by_expert(idx, experts.num_experts)
        x_sorted = x[order // idx.shape[1]]
        assert moe.choose_strategy(experts, x_sorted) == "loop"
        expected = moe.combine(experts.compute(x_sorted, counts, "loop"), order, w)
        assert torch.equal(experts(x, idx, w), expected)
        assert not torch.equal(experts(x, idx, w.flip(0)), expected)


def test_router_affinities_stay_float32_under_autocast():
    """A bf16 router flips near-ties between experts (SPEC section 1): autocast must not reach it."""
    torch.manual_seed(0)
    router = Router(dsv3.ModelConfig.from_pretrained("tiny"))
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(16, router.weight.shape[1])
    expected = torch.sigmoid(x.double() @ router.weight.double().T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = router.scores(x)
        bf16 = torch.sigmoid(torch.nn.functional.linear(x, router.weight))  # what autocast does to a plain linear
    assert scores.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (scores.double() - expected).abs().max() < 1e-6 < (bf16.double() - expected).abs().max()


def test_expert_strategy_named_explicitly_never_falls_back(tiny_cfg):
    import dsv3.model.moe as moe

    experts = moe.Experts(tiny_cfg)
    x = torch.randn(4, tiny_cfg.hidden_size, dtype=torch.bfloat16)  # weights are fp32: grouped cannot run
    counts = torch.zeros(tiny_cfg.n_routed_experts, dtype=torch.long)
    counts[0] = 4
    with pytest.raises(ValueError, match="grouped"):
        experts.compute(x, counts, "grouped")
    with pytest.raises(ValueError, match="unknown expert strategy"):
        experts.compute(x, counts, "nope")
    assert moe.choose_strategy(experts, x) == "loop"


def test_expert_strategies_on_fp8_weights(tiny_cfg):
    import dsv3.model.moe as moe
    from dsv3.kernels.fp8 import quantize_blocks

    torch.manual_seed(0)
    experts = moe.Experts(tiny_cfg)
    with torch.no_grad():
        for lin in (experts.gate_proj, experts.up_proj, experts.down_proj):
            torch.nn.init.normal_(lin.weight, std=0.3)
            w8, s = quantize_blocks(lin.weight.data, (16, 16))
            lin.to_fp8_layout((16, 16))
            lin.weight.data.copy_(w8)
            lin.weight_scale_inv.data.copy_(s)
        x = torch.randn(12, tiny_cfg.hidden_size)
        idx = torch.randint(0, tiny_cfg.n_routed_experts, (12, 2))
        order, counts = moe.sort_by_expert(idx, experts.num_experts)
        x_sorted = x[order // 2]
        reference = moe.experts_reference(experts, x_sorted, counts)
        # no grouped GEMM on FP8 weights: its products group by group, each expert dequantized in turn
        assert moe.choose_strategy(experts, x_sorted) == "dequantized"
        assert moe.choose_strategy(experts, x_sorted[:2]) == "loop"
        for name in ("loop", "gather", "dequantized"):
            assert torch.allclose(experts.compute(x_sorted, counts, name), reference, atol=1e-5), name


@pytest.mark.parametrize("fused", [False, True])
def test_dequantized_strategy_has_the_grouped_gemms_bits(tiny_cfg, fused):
    """What lets an FP8 checkpoint kept as FP8 prefill to the bits of the same checkpoint dequantized at load:
    torch's grouped GEMM equals a GEMM per group here (bf16, ragged groups, an empty one), gate and up fused or not."""
    import dsv3.model.moe as moe

    torch.manual_seed(0)
    experts = moe.Experts(tiny_cfg).to(torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    counts = torch.zeros(experts.num_experts, dtype=torch.long)
    counts[: min(5, experts.num_experts)] = torch.tensor([7, 0, 1, 30, 3])[: min(5, experts.num_experts)]
    x = torch.randn(int(counts.sum()), tiny_cfg.hidden_size).bfloat16()
    with torch.no_grad():
        if fused:
            experts.fuse_()
        grouped = experts.compute(x, counts, "grouped")
        assert torch.equal(experts.compute(x, counts, "dequantized"), grouped)
        assert not torch.equal(experts.compute(x, counts.roll(1), "dequantized"), grouped)


def test_int8_experts_take_a_prompt_expert_by_expert(tiny_cfg):
    """Many rows on int8 experts: the loop (each expert's rows through `int8_matmul`), not the native decode kernel,
    even where the model's matvec is native and bf16 products stay bf16."""
    import dsv3.model.moe as moe
    from dsv3.kernels import native

    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg, dtype=torch.bfloat16).eval()
    matvec = "native" if native.available() else "mkl"
    model.prepare_for_inference(InferenceOptions(quantize="int8", matvec=matvec, matmul_dtype="bf16"))
    experts = next(layer.mlp.experts for layer in model.model.layers if isinstance(layer.mlp, moe.MoE))
    x = torch.randn(40, tiny_cfg.hidden_size).bfloat16()
    idx = torch.randint(0, tiny_cfg.n_routed_experts, (40, tiny_cfg.num_experts_per_tok))
    with torch.no_grad():
        order, counts = moe.sort_by_expert(idx, experts.num_experts)
        x_sorted = x[order // idx.shape[1]]
        assert moe.choose_strategy(experts, x_sorted) == "loop"
        assert moe.choose_strategy(experts, x_sorted[:1]) == ("native" if native.available() else "loop")
        reference = moe.experts_reference(experts, x_sorted, counts)
        got = experts.compute(x_sorted, counts)
    assert ((got.float() - reference.float()).abs() <= 0.02 * reference.float().abs().max()).all()
