"""The fused native decode kernels (one call per MoE layer, one per attention) against the modules' torch paths.

`native.moe` must choose the same experts as `Router` (ties included) and combine them as `Experts.forward`;
`native.mla_attend` must equal MLA's absorbed attention, checked against a float64 reference written here.
"""

import copy
import gc
import math
import weakref

import pytest
import torch

import dsv3
from dsv3 import InferenceOptions
from dsv3.inference.generate import prefill
from dsv3.kernels import fp8 as fp8_kernels
from dsv3.kernels import native
from dsv3.model import native_decode
from dsv3.model.cache import LatentCache
from dsv3.model.linear import ExpertLinear
from dsv3.model.moe import MoE
from dsv3.model.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need x86-64 with AVX2 and a C compiler")

# (overrides of the tiny config): V3 grouped routing, one group, V2 greedy / group-max softmax, odd sizes.
V2 = dict(
    model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], scoring_func="softmax", norm_topk_prob=False
)
ROUTINGS = {
    "v3-groups": dict(n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=6),
    "v3-one-group": dict(n_routed_experts=20, n_group=1, topk_group=1, num_experts_per_tok=3),
    "v3-unnormalised": dict(n_routed_experts=24, n_group=3, topk_group=2, num_experts_per_tok=4, norm_topk_prob=False),
    "v2-greedy": dict(**V2, topk_method="greedy", n_routed_experts=18, n_group=1, topk_group=1, num_experts_per_tok=4),
    "v2-group-max": dict(
        **V2, topk_method="group_limited_greedy", n_routed_experts=24, n_group=6, topk_group=3, num_experts_per_tok=5
    ),
}


def _layer_model(tiny_cfg, dtype, **overrides) -> dsv3.DeepSeekV3:
    """The tiny config with `overrides`, random weights, a routing bias that matters, norm weights not all ones."""
    cfg = dsv3.ModelConfig.from_dict({**tiny_cfg.to_dict(), **overrides})
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _moe(tiny_cfg, dtype, quantize=None, **overrides) -> MoE:
    model = _layer_model(tiny_cfg, dtype, moe_intermediate_size=20, **overrides)
    model.prepare_for_inference(InferenceOptions(matvec="native", quantize=quantize))
    return model.model.layers[model.config.first_k_dense_replace].mlp


def _torch_path(moe: MoE, x: torch.Tensor):
    """Router in torch ops, then `Experts.forward` with the native expert kernel (the same SwiGLU roundings;
    the torch strategies round the hidden activations too, tested against it in test_native_model)."""
    idx, weight = moe.gate(x)
    return moe.experts(x, idx, weight, strategy="native"), idx, weight


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_routes_and_combines_like_the_modules(tiny_cfg, routing, T, dtype):
    moe = _moe(tiny_cfg, dtype, **ROUTINGS[routing])
    torch.manual_seed(T)
    x = torch.randn(T, moe.gate.weight.shape[1]).to(dtype)
    with torch.no_grad():
        assert moe._routes_natively(x)
        y, idx, weight = moe.routed_native(x, with_routing=True)
        ref_y, ref_idx, ref_weight = _torch_path(moe, x)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weight, ref_weight, rtol=1e-6, atol=1e-7)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    else:  # the same roundings: at most one bf16 ulp apart where fp32 sums differ in their last bit
        assert ((y.float() - ref_y.float()).abs() <= ref_y.float().abs() * 2**-7 + 1e-6).all()


@pytest.mark.parametrize("routing", ["v3-groups", "v2-group-max", "v2-greedy"])
def test_fused_moe_breaks_ties_to_the_lower_expert_id(tiny_cfg, routing):
    """Router rows and inputs of small multiples of 1/8 make every logit exact in any summation order, so
    many experts (and groups) tie exactly: the lower id must win everywhere, as in `Router`."""
    moe = _moe(tiny_cfg, torch.float32, **ROUTINGS[routing])
    torch.manual_seed(1)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.randint(-1, 2, moe.gate.weight.shape) / 8)
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.copy_(torch.randint(0, 2, (moe.gate.weight.shape[0],)) / 4)
        x = torch.randint(-2, 3, (16, moe.gate.weight.shape[1])).float()
        _, idx, weight = moe.routed_native(x, with_routing=True)
        _, ref_idx, ref_weight = _torch_path(moe, x)
        logits = x @ moe.gate.weight.T
    assert (logits[:, :, None] == logits[:, None, :]).sum() > 16 * logits.shape[1]  # ties were there to break
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weight, ref_weight, rtol=1e-6, atol=1e-7)


def test_fused_moe_takes_int8_experts(tiny_cfg):
    moe = _moe(tiny_cfg, torch.bfloat16, quantize="int8", **ROUTINGS["v3-groups"])
    assert moe.experts.gate_proj.is_int8
    x = torch.randn(5, moe.gate.weight.shape[1]).to(torch.bfloat16)
    with torch.no_grad():
        y, idx, _ = moe.routed_native(x, with_routing=True)
        ref_y, ref_idx, _ = _torch_path(moe, x)
    assert torch.equal(idx, ref_idx)
    assert ((y.float() - ref_y.float()).abs() <= ref_y.float().abs() * 2**-7 + 1e-6).all()


def test_fused_moe_is_not_used_where_it_would_skip_something(tiny_cfg):
    moe = _moe(tiny_cfg, torch.float32)
    x = torch.randn(2, moe.gate.weight.shape[1])
    with torch.no_grad():
        assert moe._routes_natively(x)
        moe.train()  # training counts tokens per expert in the router
        assert not moe._routes_natively(x)
        moe.eval()
        handle = moe.gate.register_forward_hook(lambda *a: None)
        assert not moe._routes_natively(x)
        handle.remove()
        assert not moe._routes_natively(torch.randn(17, x.shape[1]))  # more rows than decode-sized
    assert not moe._routes_natively(x.requires_grad_())


def _attend_float64(q_nope, q_rope, kv, w_uk, w_uv_t, scale, mask):
    """The absorbed attention written out in float64: the reference for `native.mla_attend`."""
    B, T, H, _ = q_nope.shape
    S, R = kv.shape[1], w_uk.shape[2]
    q_nope, q_rope, kv, w_uk, w_uv_t = (t.double() for t in (q_nope, q_rope, kv, w_uk, w_uv_t))
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None].expand(B, T, S)
    q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
    scores = torch.einsum("bthr,bsr->bths", q_latent, kv[..., :R]) + torch.einsum("bthd,bsd->bths", q_rope, kv[..., R:])
    scores = (scores * scale).masked_fill(~mask[:, :, None, :], -math.inf)
    o_latent = torch.einsum("bths,bsr->bthr", scores.softmax(-1), kv[..., :R])
    return torch.einsum("bthr,hrv->bthv", o_latent, w_uv_t)


@pytest.mark.parametrize("B, T, H, S", [(1, 1, 16, 7), (3, 1, 5, 33), (2, 2, 3, 40), (1, 4, 8, 300)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_attend_matches_float64(B, T, H, S, masked, dtype):
    torch.manual_seed(B * 100 + T * 10 + H + S)
    Dn, Dr, R, Dv = 12, 6, 40, 10  # R, Dv not multiples of 8: the scalar tails run too
    # q_nope / q_rope as strided views of one projection (as MLA splits them), the cache a slot-window view.
    q = torch.randn(B, T, H, Dn + Dr + 3).to(dtype)
    q_nope, q_rope = q[..., :Dn], q[..., Dn : Dn + Dr]
    store = torch.randn(B + 1, S + 5, R + Dr).to(dtype)
    kv = store[1:, :S]
    w_uk = (torch.randn(H, Dn, R) / Dn**0.5).to(dtype)
    w_uv_t = (torch.randn(H, R, Dv) / R**0.5).to(dtype)
    mask = None
    if masked:  # ragged rows: row b sees keys j < lengths[b] + t; key 0 always (as CacheBatch builds it)
        lengths = torch.randint(1, S - T + 2, (B,))
        j = torch.arange(S)
        mask = j[None, None, :] < (lengths[:, None, None] + torch.arange(T)[None, :, None])
        mask[:, :, 0] = True
    got = native.mla_attend(q_nope, q_rope, kv, w_uk, w_uv_t, 0.3, mask)
    exact = _attend_float64(q_nope, q_rope, kv, w_uk, w_uv_t, 0.3, mask)
    assert got.shape == (B, T, H, Dv) and got.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the latent query and output are rounded
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
    # Changing a key a row may not see leaves its output alone.
    if masked:
        b = 0
        hidden = [jj for jj in range(S) if not bool(mask[b, 0, jj])]
        if hidden:
            kv[b, hidden[0]] += 100
            again = native.mla_attend(q_nope, q_rope, kv, w_uk, w_uv_t, 0.3, mask)
            assert torch.equal(again[b, 0], got[b, 0])


@pytest.mark.parametrize("B, threads", [(1, 1), (1, 4), (3, 4), (2, 3)])
def test_mla_attend_long_cache_split_over_threads(B, threads):
    """Long caches are split into key chunks across threads and merged: chunks that see no key of a row
    (short ragged rows), a row whose largest score sits in a late chunk, and the merge all match float64."""
    torch.manual_seed(B * 10 + threads)
    T, H, S, Dn, Dr, R, Dv = 2, 5, 700, 12, 6, 40, 10
    q = torch.randn(B, T, H, Dn + Dr).to(torch.bfloat16)
    kv = torch.randn(B, S, R + Dr).to(torch.bfloat16)
    kv[0, 650, R:] = 8.0  # a late key that dominates row 0's scores for some heads
    w_uk = (torch.randn(H, Dn, R) / Dn**0.5).to(torch.bfloat16)
    w_uv_t = (torch.randn(H, R, Dv) / R**0.5).to(torch.bfloat16)
    lengths = torch.tensor([S - T + 1, 5, 300][:B])  # row 1 sees only its first few keys: later chunks see none
    j = torch.arange(S)
    mask = j[None, None, :] < (lengths[:, None, None] + torch.arange(T)[None, :, None])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.mla_attend(q[..., :Dn], q[..., Dn:], kv, w_uk, w_uv_t, 0.2, mask)
        causal = native.mla_attend(q[..., :Dn], q[..., Dn:], kv, w_uk, w_uv_t, 0.2, None)
    finally:
        torch.set_num_threads(previous)
    for out, m in ((got, mask), (causal, None)):
        exact = _attend_float64(q[..., :Dn], q[..., Dn:], kv, w_uk, w_uv_t, 0.2, m)
        assert torch.isfinite(out).all()
        assert (out.double() - exact).abs().max() <= 2e-2 * exact.abs().max()


# ------------------------------------------------------------------ one native call per decoder layer

LAYER_CONFIGS = {
    "tiny": {},
    "no-q-lora-odd-sizes": dict(
        q_lora_rank=None,
        hidden_size=72,
        num_attention_heads=3,
        num_key_value_heads=3,
        kv_lora_rank=20,
        qk_nope_head_dim=10,
        qk_rope_head_dim=6,
        v_head_dim=12,
        moe_intermediate_size=20,
        intermediate_size=52,
    ),  # fmt: skip
    "no-shared-experts-no-rope-scaling": dict(n_shared_experts=0, rope_scaling=None, first_k_dense_replace=0),
    "v2-routing": ROUTINGS["v2-group-max"],
}
PROMPTS = [[5, 9, 13, 2], [7] * 11, [100, 3, 250]]


def _decode(model, dtype, quantize=None, steps=5, tokens_per_step=1, **options):
    """Logits of a ragged batch of 3: prefill (module path: too many rows), then teacher-forced decode steps."""
    model.prepare_for_inference(InferenceOptions(**{"matvec": "native", "quantize": quantize, **options}))
    cache = LatentCache(model.config, 3, 48, dtype=dtype)
    slots = [cache.allocate() for _ in PROMPTS]
    out = [prefill(model, cache, slots, PROMPTS)]
    for step in range(steps):
        rows = [[11 + step + k, 40 + step + k, 7 + k] for k in range(tokens_per_step)]
        ids = [[rows[k][b] for k in range(tokens_per_step)] for b in range(3)]
        out.append(prefill(model, cache, slots, ids))
    return torch.stack(out).float()


def _without_layer_path(monkeypatch):
    monkeypatch.setattr(native_decode, "plan", lambda *args: None)
    monkeypatch.setattr(native_decode, "plan_stack", lambda *args: None)


def _native_calls(monkeypatch) -> list[str]:
    """Records each pass through the one-call layers: "stack" (all layers in one call) or "layer" (one)."""
    calls = []
    forward, forward_stack = native_decode.forward, native_decode.forward_stack
    monkeypatch.setattr(native_decode, "forward", lambda *a: calls.append("layer") or forward(*a))
    monkeypatch.setattr(native_decode, "forward_stack", lambda *a: calls.append("stack") or forward_stack(*a))
    return calls


@pytest.mark.parametrize("config", sorted(LAYER_CONFIGS))
@pytest.mark.parametrize("dtype, quantize", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8")])
@pytest.mark.parametrize("tokens_per_step", [1, 2])
def test_native_layer_equals_the_module_path(tiny_cfg, monkeypatch, config, dtype, quantize, tokens_per_step):
    calls = _native_calls(monkeypatch)
    got = _decode(
        _layer_model(tiny_cfg, dtype, **LAYER_CONFIGS[config]), dtype, quantize, tokens_per_step=tokens_per_step
    )
    assert calls, "the decode steps did not take the one-call layer"
    _without_layer_path(monkeypatch)
    want = _decode(
        _layer_model(tiny_cfg, dtype, **LAYER_CONFIGS[config]), dtype, quantize, tokens_per_step=tokens_per_step
    )
    if dtype == torch.bfloat16:  # the same kernels, the same roundings: bit for bit
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_the_stack_call_equals_one_call_per_layer_and_the_modules(tiny_cfg, monkeypatch, num_layers):
    """All layers in one call (they alternate between the output and a scratch buffer: 1, 2 and 3 layers end
    on different ones) gives the bits of one call per layer and of the module path. A hook on one layer keeps
    the stack off: the other layers still take their one-call path, the hooked one the modules."""
    layers = dict(num_hidden_layers=num_layers, first_k_dense_replace=min(1, num_layers - 1))
    calls = _native_calls(monkeypatch)
    stacked = _decode(_layer_model(tiny_cfg, torch.bfloat16, **layers), torch.bfloat16)
    assert calls and set(calls) == {"stack"}
    calls.clear()
    model = _layer_model(tiny_cfg, torch.bfloat16, **layers)
    hooked = model.model.layers[-1].self_attn.o_proj.register_forward_hook(lambda *a: None)
    per_layer = _decode(model, torch.bfloat16)
    assert calls.count("layer") == 5 * (num_layers - 1) and "stack" not in calls  # 5 decode steps
    hooked.remove()
    _without_layer_path(monkeypatch)
    modules = _decode(_layer_model(tiny_cfg, torch.bfloat16, **layers), torch.bfloat16)
    assert torch.equal(stacked, per_layer) and torch.equal(stacked, modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_layer_prefills_short_ragged_prompts_like_the_modules(tiny_cfg, monkeypatch, dtype):
    """A first pass of short prompts (<= 16 rows) takes the one-call layer with right padding: padded
    positions are not written to the cache, and the next steps see exactly the real tokens."""
    prompts = [[5, 9, 13, 2, 8], [7], [100, 3]]

    def run():
        model = _layer_model(tiny_cfg, dtype)
        model.prepare_for_inference(InferenceOptions(matvec="native"))
        cache = LatentCache(model.config, 3, 16, dtype=dtype)
        slots = [cache.allocate() for _ in prompts]
        out = [prefill(model, cache, slots, prompts)]
        out += [prefill(model, cache, slots, [[4], [6], [1]])]
        return torch.stack(out).float(), cache.kv.clone(), cache.lengths.clone()

    calls = _native_calls(monkeypatch)
    got, got_kv, got_len = run()
    assert calls
    _without_layer_path(monkeypatch)
    want, want_kv, want_len = run()
    assert torch.equal(got_len, want_len)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want) and torch.equal(got_kv, want_kv)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_kv, want_kv, rtol=1e-5, atol=1e-5)


def test_native_layer_follows_weights_changed_in_place(tiny_cfg, monkeypatch):
    model = _layer_model(tiny_cfg, torch.float32)
    before = _decode(model, torch.float32, steps=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(1.5)
            layer.self_attn.kv_b_proj.weight.mul_(0.5)  # absorbed weights are derived from it
    after = _decode(model, torch.float32, steps=1)
    _without_layer_path(monkeypatch)
    want = _decode(model, torch.float32, steps=1)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_a_model_that_decoded_natively_is_freed_when_dropped(tiny_cfg):
    """The plans are kept per layer outside the modules; they must not keep the layers (and their weights)
    alive once the user drops the model."""
    model = _layer_model(tiny_cfg, torch.bfloat16)
    _decode(model, torch.bfloat16, steps=1)
    _steps_through_decode_step(model, [0, 1], steps=2)  # the one-call step keeps the model's head plan too
    _verify_and_draft(model, one_call=True)  # and the MTP module's
    assert len(native_decode._PLANS) > 0 and model in native_decode._HEADS and model in native_decode._MTPS
    layer, head = weakref.ref(model.model.layers[1]), weakref.ref(model.lm_head)
    mtp, mtp_head = weakref.ref(model.mtp), weakref.ref(model.mtp[0].shared_head.head)
    del model
    gc.collect()
    assert layer() is None and head() is None and mtp() is None and mtp_head() is None


def _one_token_step(model):
    """(layer 1, a bound one-row cache batch, one bf16 token's hidden state) of `model` prepared for native decode."""
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cache = LatentCache(model.config, 1, 16, dtype=torch.bfloat16)
    batch = cache.bind([cache.allocate()], [1])
    return model.model.layers[1], batch, torch.randn(1, 1, model.config.hidden_size).to(torch.bfloat16)


def test_native_layer_follows_new_inference_options(tiny_cfg, tmp_path):
    """Switching fp8_compute from 'dequant' to 'gemm' after a first decode must not keep the plan built for
    'dequant': the FP8 projections' grids then ask for quantized activations."""
    _layer_model(tiny_cfg, torch.float32).save_pretrained(tmp_path / "fp8", fp8=True)
    model = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, fp8=True)
    layer, batch, x = _one_token_step(model)
    with torch.no_grad():
        first = native_decode.plan(layer, x, batch)
        assert first is not None and first.o_proj.fp8.act == 0
        model.prepare_for_inference(InferenceOptions(matvec="native", fp8_compute="gemm"))
        second = native_decode.plan(layer, x, batch)
        assert second is not first and second.o_proj.fp8.act == 1


def test_native_layer_is_skipped_where_it_would_change_behaviour(tiny_cfg):
    model = _layer_model(tiny_cfg, torch.bfloat16)
    layer, batch, x = _one_token_step(model)
    with torch.no_grad():
        assert native_decode.plan(layer, x, batch) is not None
        handle = layer.self_attn.o_proj.register_forward_hook(lambda *a: None)  # e.g. tensor parallelism's
        assert native_decode.plan(layer, x, batch) is None
        handle.remove()
        layer.train()
        assert native_decode.plan(layer, x, batch) is None
        layer.eval()
        assert native_decode.plan(layer, x, None) is None  # no cache
        assert native_decode.plan(layer, x.float(), batch) is None  # cache in another dtype
        assert native_decode.plan(layer, torch.randn(1, 17, x.shape[-1]).to(x.dtype), batch) is None  # prefill-sized
    assert native_decode.plan(layer, x, batch) is None  # grad enabled


# ------------------------------------------------------------------ FP8 weights read as they are stored

FP8_CODES = torch.arange(256, dtype=torch.uint8)
FP8_CODES = FP8_CODES[(FP8_CODES & 0x7F) != 0x7F]  # every finite e4m3fn value (0x7f / 0xff are NaN)


@pytest.mark.parametrize(
    "N, K, block", [(256, 512, (128, 128)), (200, 300, (128, 128)), (33, 80, (16, 16)), (31, 48, (2, 16))]
)
@pytest.mark.parametrize("M", [1, 3, 4, 6])
def test_fp8_linear_is_bit_identical_to_the_weight_dequantized_at_load(N, K, block, M):
    """Every e4m3fn code (subnormals included) in every position, partial blocks, scales over 6 decades;
    three or more rows take weight rows three at a time, which straddle row blocks of 2 and 16 rows."""
    torch.manual_seed(N + K + M)
    codes = FP8_CODES[torch.randint(0, FP8_CODES.numel(), (N, K))]
    weight = codes.view(torch.float8_e4m3fn)
    grid = (-(-N // block[0]), -(-K // block[1]))
    scale_inv = torch.logspace(-4, 2, grid[0] * grid[1])[torch.randperm(grid[0] * grid[1])].view(grid)
    x = torch.randn(M, K).to(torch.bfloat16)
    assert native.fits_fp8(weight, scale_inv, block)
    got = native.linear(x, weight, fp8=native.Fp8Grid.of(scale_inv, block, torch.bfloat16))
    want = native.linear(x, fp8_kernels.dequantize_blocks(weight, scale_inv, block, torch.bfloat16))
    assert torch.equal(got, want)
    # fp32 activations dequantize to fp32 (no bf16 rounding): the float64 product within fp32 summation error
    exact = x.double() @ fp8_kernels.dequantize_blocks(weight, scale_inv, block, torch.float64).T
    got32 = native.linear(x.float(), weight, fp8=native.Fp8Grid.of(scale_inv, block, torch.float32))
    assert ((got32.double() - exact).abs() <= 1e-5 * exact.abs().max()).all()


def test_fp8_blocks_the_kernels_do_not_take_are_refused():
    weight = torch.zeros(64, 64, dtype=torch.float8_e4m3fn)
    assert not native.fits_fp8(weight, torch.ones(64, 8), (1, 8))  # one-row and 8-column blocks
    assert not native.fits_fp8(weight, torch.ones(2, 3), (48, 24))  # not powers of two
    assert not native.fits_fp8(weight, torch.ones(1, 2), (128, 128))  # wrong grid
    assert native.fits_fp8(weight, torch.ones(1, 1), (128, 128))


@pytest.mark.parametrize("config", ["tiny", "no-q-lora-odd-sizes"])
def test_fp8_checkpoint_decodes_as_if_dequantized_at_load(tiny_cfg, tmp_path, config, monkeypatch):
    """FP8 weights kept as FP8 (the one-call layer, or the modules) give the logits of the same checkpoint
    dequantized to bf16 at load, bit for bit: the contract of fp8_compute='dequant'."""
    model = _layer_model(tiny_cfg, torch.float32, **LAYER_CONFIGS[config])
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    kept = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, fp8=True)
    assert kept.model.layers[1].mlp.experts.gate_proj.is_fp8 and kept.model.layers[0].self_attn.o_proj.is_fp8
    loaded = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    want = _decode(loaded, torch.bfloat16)
    calls = _native_calls(monkeypatch)
    assert torch.equal(_decode(kept, torch.bfloat16), want)
    assert calls, "the FP8 decode steps did not take the one-call layer"
    _without_layer_path(monkeypatch)
    assert torch.equal(_decode(kept, torch.bfloat16), want)  # the modules' native FP8 products


@pytest.mark.parametrize("config", ["tiny", "no-q-lora-odd-sizes"])
@pytest.mark.parametrize("tokens_per_step", [1, 2])
def test_fp8_gemm_decodes_natively_as_the_torch_gemm(tiny_cfg, tmp_path, config, tokens_per_step, monkeypatch):
    """fp8_compute='gemm' at decode: the one-call layer and the modules' native products agree bit for bit,
    differ from 'dequant' (the activations are quantized), and stay close to torch's `linear_fp8(mode='gemm')`
    path (matvec 'mkl'). Close, not equal: the native and torch paths round bf16 activations differently
    (0.5% relative logit difference in 'dequant' mode, measured) and an activation one bf16 step away can
    land on another e4m3 value (1.2-1.5% here); the kernel itself is held to fp32 round-off below."""
    _layer_model(tiny_cfg, torch.float32, **LAYER_CONFIGS[config]).save_pretrained(tmp_path / "fp8", fp8=True)
    kept = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, fp8=True)
    calls = _native_calls(monkeypatch)
    got = _decode(kept, torch.bfloat16, tokens_per_step=tokens_per_step, fp8_compute="gemm")
    assert calls, "the FP8 'gemm' decode steps did not take the one-call layer"
    assert not torch.equal(got, _decode(kept, torch.bfloat16, tokens_per_step=tokens_per_step))
    _without_layer_path(monkeypatch)
    assert torch.equal(_decode(kept, torch.bfloat16, tokens_per_step=tokens_per_step, fp8_compute="gemm"), got)
    want = _decode(kept, torch.bfloat16, tokens_per_step=tokens_per_step, matvec="mkl", fp8_compute="gemm")
    assert ((got - want).norm() / want.norm()).item() < 3e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("N, K, block", [(256, 512, (128, 128)), (200, 300, (128, 128)), (33, 80, (16, 16))])
@pytest.mark.parametrize("M", [1, 2, 3, 5])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_gemm_linear_matches_the_reference(N, K, block, M, ue8m0):
    """Native 'gemm' products against `fp8.linear_fp8(mode='gemm')` (act_quant + fp8_gemm_reference): the same
    e4m3 activations and scales (partial column blocks, UE8M0), so fp32 outputs agree to summation round-off."""
    torch.manual_seed(N + K + M)
    weight, scale_inv = fp8_kernels.quantize_blocks(torch.randn(N, K) * 0.05, block)
    x = torch.randn(M, K) * torch.logspace(-3, 1, K)  # groups of very different magnitudes
    grid = native.Fp8Grid.of(scale_inv, block, torch.float32, "ue8m0" if ue8m0 else "e4m3")
    got = native.linear(x, weight, fp8=grid)
    want = fp8_kernels.linear_fp8(x, weight, scale_inv, block, "gemm", ue8m0=ue8m0)
    assert ((got - want).abs() <= 1e-5 * want.abs().max()).all()
    dequant = native.linear(x, weight, fp8=native.Fp8Grid.of(scale_inv, block, torch.float32))
    assert not torch.allclose(got, dequant, rtol=1e-4, atol=0)  # the activations really were quantized


@pytest.mark.parametrize("rope_dim, scaling", [(16, None), (8, "yarn"), (24, "yarn"), (4, None)])
def test_the_rotary_table_holds_what_forward_computes(tiny_cfg, rope_dim, scaling):
    """The native decode pass reads angles from `RotaryEmbedding.table`: the bits `forward` gives at each position."""
    yarn = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}
    cfg = tiny_cfg.replace(qk_rope_head_dim=rope_dim, rope_scaling=yarn if scaling else None)
    rotary = RotaryEmbedding(cfg)
    cos_t, sin_t = rotary.table(100)
    assert cos_t.shape[0] >= 100 and cos_t.shape[1] == rope_dim // 2
    positions = torch.tensor([[0, 1, 31, 32, 33], [64, 97, 98, 99, 5]])
    cos, sin = rotary(positions)
    assert torch.equal(cos, cos_t[positions]) and torch.equal(sin, sin_t[positions])
    longer = rotary.table(5000)[0]  # grown: the first rows unchanged
    assert longer.shape[0] >= 5000 and torch.equal(longer[:100], cos_t[:100])
    assert torch.equal(rotary(torch.tensor([[4999]]))[0][0, 0], longer[4999])


def test_the_decode_pass_refuses_positions_past_its_rotary_tables(tiny_cfg):
    model = _layer_model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cache = LatentCache(model.config, 1, 16, dtype=torch.bfloat16)
    batch = cache.bind([cache.allocate()], [1])
    x = model.model.embed_tokens(torch.tensor([[3]]))
    with torch.inference_mode():
        stack = native_decode.plan_stack(model.model.layers, x, batch)
        assert stack is not None
        cos, sin = model.rotary.table(64)
        kv = cache.kv
        stores = [kv[i].data_ptr() for i in range(len(model.model.layers))]
        with pytest.raises(ValueError, match="past the rotary tables"):
            native.decode_pass(stack, x, cos[:1], sin[:1], stores, batch.slots, batch.start + 5, batch.n_new,
                               kv.stride()[1:3], 6)  # fmt: skip


def _change_between_steps(tiny_cfg, change) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a decode step before and after `change(model)`, one model, cache and set of options throughout."""
    model = _layer_model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cache = LatentCache(model.config, 3, 48, dtype=torch.bfloat16)
    slots = [cache.allocate() for _ in PROMPTS]
    prefill(model, cache, slots, PROMPTS)
    before = prefill(model, cache, slots, [[7], [8], [9]])
    change(model)
    return before, prefill(model, cache, slots, [[10], [11], [12]])


def _replace_layer(model):
    replacement = copy.deepcopy(model.model.layers[1])
    with torch.no_grad():
        replacement.self_attn.o_proj.weight.mul_(-1.0)
    model.model.layers[1] = replacement


@pytest.mark.parametrize(
    "change",
    [
        lambda model: model.model.layers[0].mlp.register_forward_hook(lambda *a: None),
        lambda model: model.model.layers[1].train(),
        _replace_layer,
    ],
    ids=["hook", "training", "replaced-layer"],
)
def test_the_stack_plan_notices_hooks_training_and_replaced_layers(tiny_cfg, monkeypatch, change):
    """After the stack plan was built and used, a hook registered on a sub-module, a layer put in training mode
    or a layer replaced in the ModuleList takes effect on the next pass: the modules run it, or a new plan
    that gives their bits."""
    calls, marks = _native_calls(monkeypatch), []
    got = _change_between_steps(tiny_cfg, lambda model: marks.append(len(calls)) or change(model))
    assert calls[marks[0] - 1] == "stack"
    assert calls[marks[0] :] == ["stack"] if change is _replace_layer else "stack" not in calls[marks[0] :]
    _without_layer_path(monkeypatch)
    want = _change_between_steps(tiny_cfg, change)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def _steps_through_decode_step(model, slots_order, steps=4, quantize=None):
    """Prefill three prompts, then `decode_step`s on the slots in `slots_order`: each step's logits, the lengths,
    and the cache."""
    from dsv3.inference.generate import decode_step

    model.prepare_for_inference(InferenceOptions(matvec="native", quantize=quantize))
    cache = LatentCache(model.config, 4, 48, dtype=model.dtype)
    slots = [cache.allocate() for _ in range(4)]
    prefill(model, cache, slots[:3], PROMPTS)
    out = []
    with torch.inference_mode():
        for step in range(steps):
            out.append(decode_step(model, cache, [slots[i] for i in slots_order], [3 + step + i for i in slots_order]))
    return torch.stack(out), cache.lengths.clone(), cache.kv.clone()


@pytest.mark.parametrize("dtype, quantize", [(torch.bfloat16, None), (torch.bfloat16, "int8"), (torch.float32, None)])
def test_decode_step_in_one_native_call_equals_the_module_path(tiny_cfg, monkeypatch, dtype, quantize):
    """`decode_step` as one `native.decode_step` call (embedding to logits, lengths advanced in C) gives the
    logits, lengths and latent cache of the module path, slots in any order, bit for bit in bf16. (An fp32
    model's head is not a native product: it keeps the module path.)"""
    calls = []
    decode_logits = native_decode.decode_logits
    monkeypatch.setattr(native_decode, "decode_logits", lambda *a: calls.append(1) or decode_logits(*a))
    native_step = native.decode_step
    monkeypatch.setattr(native, "decode_step", lambda *a: calls.append("native") or native_step(*a))
    got = _steps_through_decode_step(_layer_model(tiny_cfg, dtype), [2, 0], quantize=quantize)
    # The first step plans the stack through the modules; an fp32 lm_head is torch's (Linear's own choice).
    assert calls.count("native") == (3 if dtype == torch.bfloat16 else 0)
    monkeypatch.setattr(native_decode, "decode_logits", lambda *a: None)
    _without_layer_path(monkeypatch)
    want = _steps_through_decode_step(_layer_model(tiny_cfg, dtype), [2, 0], quantize=quantize)
    assert torch.equal(got[1], want[1])
    if dtype == torch.bfloat16:
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    else:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


def test_decode_step_in_one_call_refuses_a_full_slot_a_bad_id_or_slot_and_writes_nothing(tiny_cfg):
    from dsv3.errors import RequestError
    from dsv3.inference.generate import decode_step

    model = _layer_model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cache = LatentCache(model.config, 2, 6, dtype=torch.bfloat16)
    slots = [cache.allocate(), cache.allocate()]
    prefill(model, cache, slots, [[1, 2, 3, 4], [5, 6, 7, 8, 9]])
    with torch.inference_mode():
        decode_step(model, cache, slots[:1], [3])  # plans the stack; the next calls take the one-call path
        assert native_decode.decode_logits(model, cache, slots[:1], [4]) is not None
        lengths, kv = cache.lengths.clone(), cache.kv.clone()
        with pytest.raises(RequestError, match="exceeds the cache length 6"):
            decode_step(model, cache, slots, [1, 2])  # slot 1 holds 6 tokens already
        with pytest.raises(IndexError, match="token id"):
            native_decode.decode_logits(model, cache, slots[1:], [model.config.vocab_size])
        with pytest.raises(IndexError, match="cache slot"):
            native_decode.decode_logits(model, cache, [2], [1])
        assert torch.equal(cache.lengths, lengths) and torch.equal(cache.kv, kv)


@pytest.mark.parametrize("change", ["lm_head hook", "norm hook", "model hook", "embedding forward", "lm_head fp32"])
def test_decode_step_in_one_call_leaves_what_it_would_skip_to_the_modules(tiny_cfg, change):
    from dsv3.inference.generate import decode_step

    model = _layer_model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cache = LatentCache(model.config, 1, 16, dtype=torch.bfloat16)
    slots = [cache.allocate()]
    prefill(model, cache, slots, [[1, 2, 3]])
    with torch.inference_mode():
        decode_step(model, cache, slots, [3])
        assert native_decode.decode_logits(model, cache, slots, [4]) is not None
        if change == "lm_head hook":
            model.lm_head.register_forward_hook(lambda *a: None)
        elif change == "norm hook":
            model.model.norm.register_forward_pre_hook(lambda *a: None)
        elif change == "model hook":
            model.register_forward_hook(lambda *a: None)
        elif change == "embedding forward":
            model.model.embed_tokens.forward = lambda ids: torch.zeros(*ids.shape, model.config.hidden_size)
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.float(), requires_grad=False)
        assert native_decode.decode_logits(model, cache, slots, [5]) is None


def _prompts_in_both_caches(model) -> tuple[LatentCache, LatentCache]:
    """A main and an MTP latent cache of 3 slots and 40 positions (slot b the same in both), PROMPTS prefilled in
    the main one."""
    cfg = model.config
    main = LatentCache(cfg, 3, 40, dtype=model.dtype)
    mtp = LatentCache(cfg, 3, 40, dtype=model.dtype, num_layers=1, first_layer=cfg.num_hidden_layers)
    slots = [main.allocate() for _ in range(3)]
    assert [mtp.allocate() for _ in range(3)] == slots
    prefill(model, main, slots, PROMPTS)
    return main, mtp


def _verify_and_draft(model, one_call: bool):
    """Two rounds of speculative decoding's two passes on slots 2 and 0 (ragged, out of order): the main model over
    [last, draft] (logits and hidden states), then the MTP layer over 2 and 1 pending positions (draft logits), in
    one native call each or through the modules; with both caches' lengths and contents."""
    main, mtp = _prompts_in_both_caches(model)
    order, out = [2, 0], []
    with torch.inference_mode():
        for mtp_len in (3, 5):
            mtp.lengths[order] = mtp_len
            tokens = [[11, 40], [3, 200]]
            made = native_decode.decode_logits(model, main, order, sum(tokens, []), 2, True) if one_call else None
            if made is None:
                assert not one_call or not out  # the first pass plans the stack through the modules
                batch = main.bind(order, [2, 2])
                hidden = model.hidden_states(torch.tensor(tokens), cache=batch)
                batch.commit()
                made = model.logits(hidden), hidden
            logits, hidden = made
            n_new, next_ids = [2, 1], torch.tensor([[17, 33], [60, 0]])
            draft = native_decode.draft_logits(model, mtp, order, hidden, next_ids, n_new) if one_call else None
            if draft is None:
                assert not one_call
                batch = mtp.bind(order, n_new)
                draft = model.mtp_logits(hidden, next_ids, cache=batch, logits_at=[1, 0])[0]
                batch.commit()
            out += [logits, hidden, draft]
    return out + [main.lengths.clone(), main.kv.clone(), mtp.lengths.clone(), mtp.kv.clone()]


@pytest.mark.parametrize("config", sorted(LAYER_CONFIGS))
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_speculative_passes_in_one_call_equal_the_module_path(tiny_cfg, monkeypatch, quantize, config):
    """Verification of two tokens a row (`decode_logits(..., 2, hidden=True)`) and the MTP draft (`draft_logits`,
    ragged rows) as one native call each give the module path's logits, hidden states, lengths and caches, bit
    for bit (bf16, and int8 weights)."""
    calls = []
    for name in ("decode_step", "mtp_draft"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))

    def model():
        m = _layer_model(tiny_cfg, torch.bfloat16, **LAYER_CONFIGS[config])
        return m.prepare_for_inference(InferenceOptions(matvec="native", quantize=quantize))

    got = _verify_and_draft(model(), one_call=True)
    assert calls == ["mtp_draft", "decode_step", "mtp_draft"]
    want = _verify_and_draft(model(), one_call=False)
    assert len(calls) == 3
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert got[2].shape == (2, tiny_cfg.vocab_size) and not torch.equal(got[2], got[5])


def test_mtp_draft_in_one_call_refuses_bad_input_writes_nothing_and_steps_aside_for_hooks(tiny_cfg):
    from dsv3.errors import RequestError

    model = _layer_model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cfg = model.config
    mtp = LatentCache(cfg, 2, 6, dtype=torch.bfloat16, num_layers=1, first_layer=cfg.num_hidden_layers)
    slots = [mtp.allocate(), mtp.allocate()]
    mtp.lengths[1] = 5
    hidden = torch.randn(2, 2, cfg.hidden_size).to(torch.bfloat16)
    ids = torch.tensor([[3, 4], [5, 6]])
    with torch.inference_mode():
        lengths, kv = mtp.lengths.clone(), mtp.kv.clone()
        with pytest.raises(RequestError, match="exceeds the cache length 6"):
            native_decode.draft_logits(model, mtp, slots, hidden, ids, [2, 2])  # slot 1 has room for one
        with pytest.raises(IndexError, match="token id"):
            native_decode.draft_logits(model, mtp, slots, hidden, torch.tensor([[3, 4], [cfg.vocab_size, 0]]), [2, 1])
        with pytest.raises(IndexError, match="cache slot"):
            native_decode.draft_logits(model, mtp, [0, 2], hidden, ids, [1, 1])
        with pytest.raises(ValueError, match="new positions"):
            native_decode.draft_logits(model, mtp, slots, hidden, ids, [0, 1])
        assert torch.equal(mtp.lengths, lengths) and torch.equal(mtp.kv, kv)
        # A padding id past the vocabulary is never read.
        assert (
            native_decode.draft_logits(model, mtp, slots, hidden, torch.tensor([[3, 4], [5, -1]]), [2, 1]) is not None
        )
        assert mtp.lengths.tolist() == [2, 6]
        handle = model.mtp[0].shared_head.norm.register_forward_hook(lambda *a: None)
        assert native_decode.draft_logits(model, mtp, [0], hidden[:1], ids[:1], [1]) is None
        handle.remove()
        assert native_decode.draft_logits(model, mtp, [0], hidden[:1], ids[:1], [1]) is not None
        model.mtp[0].eh_proj.train()
        assert native_decode.draft_logits(model, mtp, [0], hidden[:1], ids[:1], [1]) is None


def _speculative_setup(tiny_cfg, quantize=None, config="tiny"):
    """A bf16 model with both plans made, and main / MTP caches holding the prompts (slots 0-2)."""
    from dsv3.inference.generate import decode_step

    model = _layer_model(tiny_cfg, torch.bfloat16, **LAYER_CONFIGS[config])
    model.prepare_for_inference(InferenceOptions(matvec="native", quantize=quantize))
    main, mtp = _prompts_in_both_caches(model)
    with torch.inference_mode():
        decode_step(model, main, [0], [3])  # plans the stack
        hidden = torch.randn(3, 2, model.config.hidden_size).to(torch.bfloat16)
        assert native_decode.draft_logits(model, mtp, [1], hidden[:1], torch.tensor([[4, 5]]), [2]) is not None
    return model, main, mtp


@pytest.mark.parametrize(
    "quantize, limit, config",
    [(None, None, "tiny"), (None, 1, "tiny"), (None, 3, "tiny"), ("int8", None, "tiny"), ("int8", 1, "tiny")]
    + [(None, None, config) for config in sorted(LAYER_CONFIGS) if config != "tiny"],
)
def test_greedy_speculative_step_in_one_call_equals_its_two_calls_and_the_argmax_rule(
    tiny_cfg, quantize, limit, config
):
    """`speculative_greedy` (one native call) against `draft_logits` + `decode_logits(..., 2, hidden=True)` and the rule
    written here: the draft is the argmax of the draft logits (over the first `limit` ids), the row takes [d, a1] when
    the verification's first argmax a0 is d, else [a0] and drops d's cache entry. Tokens, hidden states, both
    caches' lengths and contents, bit for bit; rows of 1 and 2 pending positions, slots out of order."""
    V = tiny_cfg.vocab_size
    limit = limit or V
    torch.manual_seed(5)
    D = LAYER_CONFIGS[config].get("hidden_size", tiny_cfg.hidden_size)
    pending_hidden = torch.randn(3, 2, D).to(torch.bfloat16)
    rows = dict(slots=[2, 0, 1], last=[7, 250, 31], pending=[[12, 9], [33], [100, 101]])
    results = []
    for one_call in (True, False):
        model, main, mtp = _speculative_setup(tiny_cfg, quantize, config)
        with torch.inference_mode():
            if one_call:
                new, hidden = native_decode.speculative_greedy(model, main, mtp, **rows, pending_hidden=pending_hidden,
                                                               limit=limit)  # fmt: skip
            else:
                ids = torch.tensor([p + [0] * (2 - len(p)) for p in rows["pending"]])
                n_new = [len(p) for p in rows["pending"]]
                draft = native_decode.draft_logits(model, mtp, rows["slots"], pending_hidden, ids, n_new)
                drafts = draft[:, :limit].argmax(-1).tolist()
                tokens = [t for last, d in zip(rows["last"], drafts) for t in (last, d)]
                logits, hidden = native_decode.decode_logits(model, main, rows["slots"], tokens, 2, True)
                top = logits[..., :limit].argmax(-1).tolist()
                new = []
                for slot, d, (a0, a1) in zip(rows["slots"], drafts, top):
                    new.append([d, a1] if a0 == d else [a0])
                    if a0 != d:
                        main.truncate(slot, int(main.lengths[slot]) - 1)
        results.append((new, hidden, main.lengths.clone(), main.kv.clone(), mtp.lengths.clone(), mtp.kv.clone()))
    (new, *tensors), (want_new, *want_tensors) = results
    assert new == want_new and all(max(t) < limit for t in new)
    if limit == 1:  # every argmax is id 0: every draft accepted
        assert new == [[0, 0]] * 3
    elif limit == V:  # random weights: the MTP head has learnt nothing
        assert any(len(t) == 1 for t in new)
    for got, want in zip(tensors, want_tensors, strict=True):
        assert torch.equal(got, want)


def test_greedy_speculative_step_in_one_call_refuses_bad_input_and_writes_nothing(tiny_cfg):
    from dsv3.errors import RequestError

    model, main, mtp = _speculative_setup(tiny_cfg)
    hidden = torch.randn(2, 2, tiny_cfg.hidden_size).to(torch.bfloat16)
    V = tiny_cfg.vocab_size
    rows = dict(slots=[0, 1], last=[7, 8], pending=[[1, 2], [3]], pending_hidden=hidden, limit=V)
    with torch.inference_mode():
        before = [main.lengths.clone(), main.kv.clone(), mtp.lengths.clone(), mtp.kv.clone()]
        main.lengths[1] = 39  # room for one more: the verification needs two
        with pytest.raises(RequestError, match="exceeds the cache length 40"):
            native_decode.speculative_greedy(model, main, mtp, **rows)
        main.lengths[1] = before[0][1]
        mtp.lengths[0] = 39
        with pytest.raises(RequestError, match="exceeds the cache length 40"):
            native_decode.speculative_greedy(model, main, mtp, **rows)
        mtp.lengths[0] = before[2][0]
        with pytest.raises(IndexError, match="token id"):
            native_decode.speculative_greedy(model, main, mtp, **{**rows, "last": [7, V]})
        with pytest.raises(IndexError, match="token id"):
            native_decode.speculative_greedy(model, main, mtp, **{**rows, "pending": [[1, -2], [3]]})
        with pytest.raises(IndexError, match="cache slot"):
            native_decode.speculative_greedy(model, main, mtp, **{**rows, "slots": [0, 3]})
        with pytest.raises(ValueError, match="limit"):
            native_decode.speculative_greedy(model, main, mtp, **{**rows, "limit": V + 1})
        for got, want in zip([main.lengths, main.kv, mtp.lengths, mtp.kv], before):
            assert torch.equal(got, want)
        handle = model.mtp[0].register_forward_pre_hook(lambda *a: None)
        assert native_decode.speculative_greedy(model, main, mtp, **rows) is None
        handle.remove()
        assert native_decode.speculative_greedy(model, main, mtp, **rows) is not None


def test_global_forward_hooks_keep_every_module_path(tiny_cfg):
    """A forward hook registered for every module (profilers, activation recorders) sees each decoder layer and
    attention of a decode step, a verification and a draft: the one-call kernels step aside while it is there."""
    from dsv3.inference.generate import decode_step

    model, main, mtp = _speculative_setup(tiny_cfg)
    seen = []

    def hook(module, args, output):
        seen.append(type(module).__name__)

    hidden = torch.randn(1, 2, tiny_cfg.hidden_size).to(torch.bfloat16)
    with torch.inference_mode():
        assert native_decode.decode_logits(model, main, [1], [4]) is not None
        handle = torch.nn.modules.module.register_module_forward_hook(hook)
        try:
            assert native_decode.decode_logits(model, main, [1], [4]) is None
            assert native_decode.draft_logits(model, mtp, [0], hidden, torch.tensor([[1, 2]]), [2]) is None
            assert native_decode.speculative_greedy(model, main, mtp, [0], [3], [[1, 2]], hidden, 10) is None
            decode_step(model, main, [1], [5])
        finally:
            handle.remove()
        assert seen.count("DecoderLayer") == tiny_cfg.num_hidden_layers and "MLA" in seen
        assert native_decode.decode_logits(model, main, [1], [6]) is not None


def test_fp8_prefill_dequantizes_in_one_native_pass_with_the_same_logits(tiny_cfg, tmp_path, monkeypatch):
    """Prefill-sized bf16 products of FP8 weights computed in fp32 (`fp8_compute="dequant"`): projections and experts
    dequantize each of `widened_linear`'s blocks straight to fp32 in one native pass; the logits are the torch
    dequantization's, bit for bit, with blocks of rows that start inside a 128-row block of the scale grid."""
    import dsv3.model.linear as linear

    # 32 experts, 6 a token: a prompt's rows spread so that some experts get a few rows, others more.
    _layer_model(tiny_cfg, torch.float32, **ROUTINGS["v3-groups"]).save_pretrained(tmp_path / "fp8", fp8=True)
    model = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, fp8=True)
    model.prepare_for_inference(InferenceOptions(matvec="native", matmul_dtype="fp32", fp8_compute="dequant"))
    monkeypatch.setattr(linear, "WIDEN_MAX_ELEMENTS", tiny_cfg.hidden_size * 5)  # 5 weight rows a block
    calls = []
    real_dequantize, real_linear, real_expert_weight = native.dequantize_fp8, native.linear, ExpertLinear.expert_weight
    monkeypatch.setattr(native, "dequantize_fp8", lambda *a: calls.append("dequantize") or real_dequantize(*a))
    monkeypatch.setattr(native, "linear", lambda *a, **k: calls.append("fp8" in k) or real_linear(*a, **k))
    monkeypatch.setattr(ExpertLinear, "expert_weight", lambda *a: calls.append("torch") or real_expert_weight(*a))
    ids = torch.randint(0, tiny_cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = model(ids)
        # Experts with more rows than a decode-sized product dequantize natively, the others read FP8 in place.
        assert "dequantize" in calls and True in calls and "torch" not in calls
        monkeypatch.setattr(linear, "dequantized_fp8_linear", lambda *a: None)
        monkeypatch.setattr(native, "fits_fp8", lambda *a: False)  # the torch dequantization everywhere
        want = model(ids)
    assert "torch" in calls and torch.equal(got, want)


def _prefill_attend_float64(q_nope, q_rope, kv, k_rope, v_dim, scale):
    """Causal attention of a fresh prompt written out in float64: the reference for `native.prefill_attend`."""
    B, T, H, Dn = q_nope.shape
    q_nope, q_rope, kv, k_rope = (t.double() for t in (q_nope, q_rope, kv, k_rope))
    scores = torch.einsum("bthd,bshd->bths", q_nope, kv[..., :Dn]) + torch.einsum("bthd,bsd->bths", q_rope, k_rope)
    visible = torch.ones(T, T, dtype=torch.bool).tril()
    scores = (scores * scale).masked_fill(~visible[None, :, None, :], -math.inf)
    return torch.einsum("bths,bshv->bthv", scores.softmax(-1), kv[..., Dn:])


@pytest.mark.parametrize(
    "B, T, H, Dn, Dr, Dv, threads",
    [(1, 1, 1, 4, 2, 3, 1), (2, 63, 3, 12, 6, 10, 2), (1, 65, 2, 64, 32, 64, 2), (2, 200, 5, 20, 0, 17, 3)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attend_matches_float64(B, T, H, Dn, Dr, Dv, threads, dtype):
    """Blocks of 64 queries and keys with tails on both sides, widths not multiples of 8 or 16, no rope part, and
    every operand a strided view of a wider projection (as MLA splits them); more threads than rows x heads."""
    torch.manual_seed(B * 1000 + T + H + Dv)
    q = torch.randn(B, T, H, Dn + Dr + 5).to(dtype)
    kv_a = torch.randn(B, T, 40 + Dr).to(dtype)
    kv = torch.randn(B, T, H, Dn + Dv).to(dtype)
    q_nope, q_rope, k_rope = q[..., :Dn], q[..., Dn : Dn + Dr], kv_a[..., 40:]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.prefill_attend(q_nope, q_rope, kv, k_rope, Dv, 0.4)
    finally:
        torch.set_num_threads(previous)
    exact = _prefill_attend_float64(q_nope, q_rope, kv, k_rope, Dv, 0.4)
    assert got.shape == (B, T, H, Dv) and got.dtype == dtype
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-5  # bf16: the output is rounded once
    assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
    # Query t never sees key t + 1: changing the last key leaves every earlier query's output alone.
    kv[:, -1] += 50
    again = native.prefill_attend(q_nope, q_rope, kv, k_rope, Dv, 0.4)
    assert torch.equal(again[:, :-1], got[:, :-1])


def test_prefill_attention_of_a_bf16_prompt_takes_the_native_pass_and_matches_torchs():
    """MLA's expanded attention on a fresh bf16 prompt with fp32 products goes through `prefill_attend`, and its
    output is torch's flash-kernel path to bf16 rounding (the kernel swapped out for the same call)."""
    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    torch.manual_seed(3)
    model = dsv3.DeepSeekV3(cfg, dtype=torch.bfloat16).prepare_for_inference(InferenceOptions(matmul_dtype="fp32"))
    attn = model.model.layers[0].self_attn
    T = 150
    x = torch.randn(1, T, cfg.hidden_size).to(torch.bfloat16)
    cos, sin = model.rotary(torch.arange(T)[None])
    calls = []
    real, fits = native.prefill_attend, native.fits_prefill_attend
    try:
        native.prefill_attend = lambda *a: calls.append(a[0].shape) or real(*a)
        with torch.no_grad():
            got = attn(x, cos, sin, absorb=False)
        native.prefill_attend = real
        native.fits_prefill_attend = lambda *a: False
        with torch.no_grad():
            want = attn(x, cos, sin, absorb=False)
    finally:
        native.prefill_attend = real
        native.fits_prefill_attend = fits
    assert calls == [torch.Size([1, T, cfg.num_attention_heads, cfg.qk_nope_head_dim])]
    assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
