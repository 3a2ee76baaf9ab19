"""InferenceOptions: validated in one place, applied by prepare_for_inference, passed through from_pretrained."""

import pytest
import torch

import dsv3
from dsv3 import ConfigError, InferenceOptions
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
