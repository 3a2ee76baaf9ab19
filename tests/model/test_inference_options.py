"""InferenceOptions: validated in one place, applied by prepare_for_inference, passed through from_pretrained."""

import pytest
import torch

import dsv3
from dsv3 import ConfigError, InferenceOptions
from dsv3.inference.generate import stream
from dsv3.kernels import fp8 as fp8_kernels
from dsv3.kernels import native
from dsv3.model.linear import Linear


def _fp8_model(cfg: dsv3.ModelConfig) -> dsv3.DeepSeekV3:
    """tiny with every attention Linear in FP8 (16x16 blocks), values from its own random weights."""
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for m in model.model.layers.modules():
            if isinstance(m, Linear):
                w8, s = fp8_kernels.quantize_blocks(m.weight.data, (16, 16))
                m.to_fp8_layout((16, 16))
                m.weight.data.copy_(w8)
                m.weight_scale_inv.data.copy_(s)
    return model


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(fp8_compute="fast"), "fp8_compute must be one of dequant, gemm"),
        (dict(matvec="blas"), "matvec must be one of"),
        (dict(compile="yes"), "compile must be true or false"),
        (dict(matmul_dtype="fp16"), "matmul_dtype must be one of auto, bf16, fp32"),
    ],
)
def test_bad_options_are_config_errors(tiny_cfg, bad, match):
    with pytest.raises(ConfigError, match=match):
        dsv3.DeepSeekV3(tiny_cfg).prepare_for_inference(InferenceOptions(**bad))


def test_unknown_option_names_are_refused_before_loading():
    with pytest.raises(ConfigError, match="unknown inference option.*fp8_mode"):
        dsv3.DeepSeekV3.from_pretrained("/nonexistent/checkpoint", fp8_mode="gemm")


def test_scale_fmt_from_the_config_reaches_the_fp8_gemm(tiny_cfg):
    cfg = tiny_cfg.replace(
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16], "scale_fmt": "ue8m0"}
    )
    model = _fp8_model(cfg).prepare_for_inference(InferenceOptions(fp8_compute="gemm"))
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.is_fp8 and layer.options.ue8m0 and layer.options.fp8_compute == "gemm"
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        y = layer(x)
        args = (x, layer.weight, layer.weight_scale_inv, (16, 16), "gemm")
        assert torch.equal(y, fp8_kernels.linear_fp8(*args, ue8m0=True))
        assert not torch.equal(y, fp8_kernels.linear_fp8(*args, ue8m0=False))  # the flag changes the numbers
    with pytest.raises(ConfigError, match="scale_fmt 'e8m0'"):  # refused with the config, before any model
        tiny_cfg.replace(
            quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16], "scale_fmt": "e8m0"}
        )


def test_options_reach_every_module_and_stay_until_replaced(tiny_cfg):
    model = _fp8_model(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 12))
    with torch.no_grad():
        model.prepare_for_inference(InferenceOptions(fp8_compute="gemm", fuse_projections=False))
        assert model.model.layers[1].mlp.experts._gate_up is None  # not fused when told not to
        gemm = model(ids)
        dequant = model.prepare_for_inference(InferenceOptions(fp8_compute="dequant"))(ids)
        assert model.model.layers[1].mlp.experts._gate_up is not None
        model.prepare_for_inference()  # no argument: the options applied last
        assert model.inference_options.fp8_compute == "dequant"
        assert torch.equal(model(ids), dequant)
    holders = [m for m in model.modules() if hasattr(m, "options")]
    assert len(holders) > 10 and all(m.options is model.inference_options for m in holders)
    # gemm quantizes the activations: close to dequant, not equal.
    rel_rms = ((dequant - gemm).norm() / dequant.norm()).item()
    assert 0 < rel_rms < 0.1, rel_rms
    assert model.inference_options.ue8m0 is False  # tiny's config has no scale_fmt


def test_from_pretrained_passes_options_through(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    dsv3.DeepSeekV3(tiny_cfg).save_pretrained(tmp_path)
    model = dsv3.DeepSeekV3.from_pretrained(tmp_path, dtype=torch.float32, fuse_projections=False, matvec="onednn")
    assert model.inference_options.matvec == "onednn" and not model.inference_options.fuse_projections
    assert model.model.layers[1].mlp.experts._gate_up is None
    default = dsv3.DeepSeekV3.from_pretrained(tmp_path, dtype=torch.float32)
    expected = "native" if native.available() else "mkl"  # "auto" resolves to the native kernels where they run
    assert default.inference_options.matvec == expected and default.model.layers[1].mlp.experts._gate_up is not None


@pytest.mark.parametrize(
    "matvec",
    ["mkl", "onednn", pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason="no AVX2/cc"))],
)
def test_matvec_backends_agree_and_leave_the_global_flag_alone(tiny_cfg, matvec):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, tiny_cfg.vocab_size, (1, 1))
    with torch.no_grad():
        eager = model.prepare_for_inference(InferenceOptions(matvec="onednn"))(ids)
        before = torch.backends.mkldnn.enabled
        got = model.prepare_for_inference(InferenceOptions(matvec=matvec))(ids)
    assert torch.backends.mkldnn.enabled == before
    assert torch.allclose(got, eager, atol=2e-2 * eager.abs().max())


@pytest.mark.parametrize("has_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_matmul_dtype_auto_follows_the_cpu(tiny_cfg, monkeypatch, has_bf16, expected):
    monkeypatch.setattr(native, "cpu_has_bf16_products", lambda: has_bf16)
    assert InferenceOptions().resolve(tiny_cfg).matmul_dtype == expected
    assert InferenceOptions(matmul_dtype="bf16").resolve(tiny_cfg).matmul_dtype == "bf16"  # asked for: kept


def test_widened_linear_equals_fp32_products_in_blocks(monkeypatch):
    """A weight wider than the block bound is widened a slice at a time: same values as one fp32 product (the
    native GEMM's or torch's), which is the float64 product to fp32 round-off."""
    import dsv3.model.linear as linear

    torch.manual_seed(0)
    x = torch.randn(3, 7, 33).to(torch.bfloat16)
    w = torch.randn(50, 33).to(torch.bfloat16)
    whole = linear.fp32_product(x, w)
    exact = x.double() @ w.double().T
    assert whole.dtype == torch.float32 and bool(((whole - exact).abs() <= 1e-5 * exact.abs().max()).all())
    monkeypatch.setattr(linear, "WIDEN_MAX_ELEMENTS", 33 * 8)  # 8 rows per block, a ragged last block
    blocked = linear.widened_linear(x, w)
    assert blocked.dtype == torch.bfloat16 and torch.equal(blocked, whole.to(torch.bfloat16))


def test_fp32_products_of_a_bf16_model_match_its_bf16_products(tiny_cfg):
    """matmul_dtype only changes how a product is computed, not what: prefill logits agree to bf16 precision."""
    from dsv3.inference.generate import prefill
    from dsv3.model.cache import LatentCache
    from dsv3.model.moe import choose_strategy

    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg, dtype=torch.bfloat16).eval()
    prompts = [[3 + (7 * i) % (tiny_cfg.vocab_size - 3) for i in range(60)], [9, 8, 7]]
    out = {}
    for dtype in ("bf16", "fp32"):
        model.prepare_for_inference(InferenceOptions(matmul_dtype=dtype))
        cache = LatentCache(tiny_cfg, 2, 64, dtype=torch.bfloat16)
        out[dtype] = prefill(model, cache, [cache.allocate(), cache.allocate()], prompts)
    experts = model.model.layers[1].mlp.experts
    rows = torch.zeros(experts.num_experts * 4, tiny_cfg.hidden_size, dtype=torch.bfloat16)
    assert choose_strategy(experts, rows) == "loop"  # fp32: one widened expert at a time, not the grouped GEMM
    ref, got = out["bf16"].float(), out["fp32"].float()
    assert (got - ref).norm() / ref.norm() < 0.02
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_preparing_again_with_the_same_options_keeps_the_decode_plans(tiny_cfg, monkeypatch):
    """`stream` prepares the model at every call: options equal to the applied ones keep their object, so the next
    call's first decode step is already one native call (it used to replan the stack through the modules)."""
    if not native.available():
        pytest.skip("native kernels need x86-64 with AVX2 and a C compiler")
    model = dsv3.DeepSeekV3(tiny_cfg, dtype=torch.bfloat16).eval().prepare_for_inference()
    applied = model.inference_options
    assert model.prepare_for_inference().inference_options is applied
    assert model.prepare_for_inference(InferenceOptions()).inference_options is applied
    calls = []
    real = native.decode_step
    monkeypatch.setattr(native, "decode_step", lambda *a: calls.append(1) or real(*a))
    prompt = [list(range(2, 22))]  # longer than a decode-sized pass: the prefill does not plan the stack

    def generate():  # step by step (generate() runs its greedy steps in one call after the first)
        return [s[0] for s in stream(model, prompt, 4, stop_token_ids=[])]

    first = generate()
    assert len(calls) == 2  # the first decode step plans the stack through the modules
    calls.clear()
    assert generate() == first
    assert len(calls) == 3
    model.prepare_for_inference(InferenceOptions(fp8_compute="gemm"))  # other options: a new object, plans rebuilt
    assert model.inference_options is not applied and model.inference_options.fp8_compute == "gemm"
