"""--quantize int8: the model computes exactly with its dequantized int8 weights, and stays close to bf16."""

import copy

import pytest
import torch
from hf_reference import VARIANTS, hf_config_dict

import dsv3
from dsv3 import ConfigError, InferenceOptions
from dsv3.kernels.int8 import dequantize_int8, quantize_int8
from dsv3.model.linear import ExpertLinear, Linear


def _model(variant: str, dtype: torch.dtype) -> dsv3.DeepSeekV3:
    cfg = dsv3.ModelConfig.from_dict(hf_config_dict(**VARIANTS[variant]))
    torch.manual_seed(len(variant))
    model = dsv3.DeepSeekV3(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("lm_head", [True, False])
def test_int8_model_computes_with_its_dequantized_weights(lm_head):
    model = _model("odd_sizes", torch.float32)  # sizes not multiples of 8: kernel and fallback both run
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    # Independent: every projection's weight replaced by dequantize(quantize(w)) in fp32.
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in expected.named_modules():
            if isinstance(m, (Linear, ExpertLinear)) and (lm_head or "head" not in name):
                m.weight.copy_(dequantize_int8(*quantize_int8(m.weight), torch.float32))
        want = expected.prepare_for_inference()(ids)
        model.prepare_for_inference(InferenceOptions(quantize="int8", quantize_lm_head=lm_head))
        got = model(ids)
    assert model.model.layers[1].mlp.experts.gate_proj.is_int8
    assert model.model.layers[0].self_attn.o_proj.is_int8
    assert model.lm_head.is_int8 == lm_head
    assert model.model.layers[1].mlp.experts._gate_up is None  # int8 weights are not fused
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


@pytest.mark.parametrize("variant", ["v3like", "odd_sizes"])
def test_int8_stays_close_to_bf16(variant):
    """Measured on the parity configs: relative RMS logit error 1.0-2.6%, top-1 agreement 94-99%."""
    model = _model(variant, torch.bfloat16).prepare_for_inference()
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        quantized = copy.deepcopy(model).prepare_for_inference(InferenceOptions(quantize="int8"))
        got = quantized(ids)
    rel_rms = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert 0 < rel_rms < 0.04 and agree >= 0.9, (rel_rms, agree)
    # Greedy decoding through the cache runs on the int8 kernels too.
    prompt = [ids[0, :8].tolist()]
    assert (
        dsv3.generate(quantized, prompt, max_new_tokens=4, stop_token_ids=[])[0][:2]
        == (dsv3.generate(model, prompt, max_new_tokens=4, stop_token_ids=[])[0][:2])
    )


def test_int8_cannot_be_undone_in_place(tiny_cfg):
    model = dsv3.DeepSeekV3(tiny_cfg).prepare_for_inference(InferenceOptions(quantize="int8"))
    model.prepare_for_inference()  # the options applied last: still int8, fine
    with pytest.raises(ConfigError, match="int8 already"):
        model.prepare_for_inference(InferenceOptions())
    with pytest.raises(ConfigError, match="quantize must be int8"):
        InferenceOptions(quantize="int4").validate()


@pytest.mark.parametrize(
    "dtype, matmul_dtype", [(torch.bfloat16, "fp32"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")]
)
def test_prefill_sized_int8_products_dequantize_for_a_gemm_in_blocks(monkeypatch, dtype, matmul_dtype):
    """More rows than a decode-sized pass: the weight dequantized a block of output rows at a time (fp32 products
    where bf16 products widen) and one GEMM a block, never torch's weight-only int8 kernel (10-28x slower there);
    the result is the float64 product of the dequantized weight, rounded once, within the products' rounding."""
    import dsv3.model.linear as linear

    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", None)  # a call would fail
    monkeypatch.setattr(linear, "WIDEN_MAX_ELEMENTS", 40 * 6)  # 6 rows a block, a ragged last block
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(45, 40))
    options = InferenceOptions(matvec="native", matmul_dtype=matmul_dtype)
    for rows in (17, 64):
        x = torch.randn(2, rows // 2 + 1, 40).to(dtype)
        with torch.no_grad():
            got = linear.int8_matmul(x, q, scale, options)
        w = dequantize_int8(q, scale, torch.float64 if matmul_dtype == "fp32" else dtype).double()
        exact = x.double() @ w.T
        assert got.shape == (2, rows // 2 + 1, 45) and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 8e-3
        assert (got.double() - exact).abs().max() <= tol * exact.abs().max()
        if matmul_dtype == "fp32" and dtype == torch.bfloat16:  # one fp32 product, rounded once to bf16
            assert torch.equal(
                got, torch.nn.functional.linear(x.float(), dequantize_int8(q, scale, torch.float32)).to(dtype)
            )
