"""FP8 block quantization and GEMM against independent loop implementations and hand-worked answers.

Error bound used throughout: e4m3 keeps 3 mantissa bits, so rounding a value v that is scaled into
[-448, 448] moves it by at most half a step: |v| * 2**-4 in the normal range, 2**-10 in the
subnormal range (below 2**-6, the step is 2**-9). Scaled back, an element x with block scale s
dequantizes within |x| / 16 + s / 1024 (plus fp32 rounding, allowed for with a 1e-6 relative slack).
"""

import math

import pytest
import torch

from dsv3.kernels import fp8
from dsv3.kernels.fp8 import (
    FP8_MAX,
    act_quant,
    dequantize_blocks,
    fp8_gemm,
    fp8_gemm_reference,
    linear_fp8,
    quantize_blocks,
    set_fp8_gemm_impl,
)

B = 128


@pytest.fixture
def impl():
    """Yield set_fp8_gemm_impl and restore the import-time choice afterwards."""
    previous = set_fp8_gemm_impl("reference")
    set_fp8_gemm_impl(previous)
    yield set_fp8_gemm_impl
    set_fp8_gemm_impl(previous)


def loop_quantize(w: torch.Tensor, block: tuple[int, int] = (B, B)) -> tuple[torch.Tensor, torch.Tensor]:
    """One block at a time, straight from the spec (2-D only)."""
    (rows, cols), (b0, b1) = w.shape, block
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    s = torch.empty(math.ceil(rows / b0), math.ceil(cols / b1))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            r, c = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            amax = w[r, c].float().abs().max().item()
            s[i, j] = amax / FP8_MAX if amax > 0 else 1.0
            q[r, c] = (w[r, c].float() / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def loop_dequantize(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (B, B)) -> torch.Tensor:
    out = torch.empty(q.shape)
    b0, b1 = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            r, c = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            out[r, c] = q[r, c].float() * s[i, j]
    return out


def expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Per-element copy of a per-block scale, cropped to `shape`."""
    return scale.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., : shape[-2], : shape[-1]]


def assert_within_fp8_rounding(approx: torch.Tensor, exact: torch.Tensor, scale_per_elem: torch.Tensor) -> None:
    bound = exact.abs() / 16 + scale_per_elem / 1024 + 1e-6 * exact.abs() + 1e-30
    err = (approx.float() - exact.float()).abs()
    assert (err <= bound).all(), f"worst error / bound = {(err / bound).max().item():.3f}"


@pytest.mark.parametrize(
    "shape, block",
    [
        ((256, 384), (B, B)),
        ((300, 200), (B, B)),
        ((1, 130), (B, B)),
        ((129, 1), (B, B)),
        ((128, 128), (B, B)),
        ((100, 70), (64, 32)),
    ],
)
def test_quantize_matches_loop_and_round_trips(shape, block):
    torch.manual_seed(0)
    # Rows of very different magnitude so blocks get different scales; some values land in subnormals.
    w = torch.randn(shape) * torch.logspace(-3, 2, shape[0])[:, None]
    q, s = quantize_blocks(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))

    q_loop, s_loop = loop_quantize(w, block)
    torch.testing.assert_close(s, s_loop, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), q_loop.view(torch.uint8))

    deq = dequantize_blocks(q, s, block, dtype=torch.float32)
    torch.testing.assert_close(deq, loop_dequantize(q, s, block), rtol=0, atol=0)
    assert_within_fp8_rounding(deq, w, expand(s, w.shape, block))
    # Each block's amax maps onto 448 exactly (up to the fp32 division), so it round-trips.
    amax = w.abs().amax()
    assert deq.abs().amax() == pytest.approx(amax.item(), rel=1e-6)


def test_quantize_stacked_experts_equals_per_expert():
    torch.manual_seed(1)
    w = torch.randn(3, 200, 130)
    w[1] *= 1e3  # experts must not share scales
    q, s = quantize_blocks(w)
    assert q.shape == w.shape and s.shape == (3, 2, 2)
    for e in range(3):
        q_e, s_e = loop_quantize(w[e])
        assert torch.equal(q[e].view(torch.uint8), q_e.view(torch.uint8))
        torch.testing.assert_close(s[e], s_e, rtol=0, atol=0)
    deq = dequantize_blocks(q, s, dtype=torch.float32)
    assert deq.shape == w.shape
    assert_within_fp8_rounding(deq, w, expand(s, w.shape, (B, B)))


def test_zero_blocks_give_zeros_not_nan():
    w = torch.zeros(200, 300)
    w[:128, :128] = torch.randn(128, 128)  # one live block, the rest (including partial edges) zero
    q, s = quantize_blocks(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    deq = dequantize_blocks(q, s, dtype=torch.float32)
    assert torch.isfinite(deq).all()
    assert (deq[128:] == 0).all() and (deq[:, 128:] == 0).all()


def test_fast_fp8_decode_is_exact_on_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    expected = codes.float()
    got = fp8._fp8_to_float32(codes)
    finite = torch.isfinite(expected)  # 0x7f and 0xff are NaN; quantization never produces them
    assert finite.sum() == 254
    assert torch.equal(got[finite], expected[finite])
    assert torch.equal(got[finite].view(torch.int32), expected[finite].view(torch.int32)), "signed zeros too"


def test_dequantize_hand_built():
    # [130, 260] -> a 2x3 scale grid; block (1, 2) is the partial corner (2 rows x 4 columns).
    q = torch.full((130, 260), 2.0).to(torch.float8_e4m3fn)
    q[129, 259] = -0.5
    s = torch.tensor([[0.5, 0.25, 3.0], [1.0, 2.0, 4.0]])
    out = dequantize_blocks(q, s, dtype=torch.float32)
    expected = torch.empty(130, 260)
    expected[:128, :128], expected[:128, 128:256], expected[:128, 256:] = 1.0, 0.5, 6.0
    expected[128:, :128], expected[128:, 128:256], expected[128:, 256:] = 2.0, 4.0, 8.0
    expected[129, 259] = -2.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert dequantize_blocks(q, s).dtype == torch.bfloat16


def test_dequantize_multiplies_by_scale_inv():
    # 3.0 is not a power of two, so dividing instead of multiplying would be caught.
    q = torch.tensor([[1.5]]).to(torch.float8_e4m3fn)
    assert dequantize_blocks(q, torch.tensor([[3.0]]), dtype=torch.float32).item() == 4.5


@pytest.mark.parametrize(
    "w_shape, s_shape",
    [((300, 200), (2, 2)), ((300, 200), (3, 1)), ((256, 256), (2, 2, 1)), ((3, 200, 130), (2, 2, 2))],
)
def test_misshaped_scale_inv_raises_naming_shapes(w_shape, s_shape):
    q = torch.zeros(w_shape).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError) as exc:
        dequantize_blocks(q, torch.ones(s_shape))
    msg = str(exc.value)
    assert str(list(w_shape)) in msg and str(list(s_shape)) in msg


def test_dequantize_rejects_non_fp8_and_1d():
    with pytest.raises(ValueError, match="bfloat16"):
        dequantize_blocks(torch.zeros(4, 4, dtype=torch.bfloat16), torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"\[4\]"):
        dequantize_blocks(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones(1))


@pytest.mark.parametrize("ue8m0", [False, True])
def test_act_quant_scales_and_round_trip(ue8m0):
    torch.manual_seed(2)
    K = 300  # groups of 128, 128 and a partial 44
    x = torch.randn(2, 3, K) * torch.tensor([1e-2, 1.0, 50.0]).repeat_interleave(torch.tensor([128, 128, 44]))
    x[1, 2, :] = 0.0  # an all-zero token
    q, s = act_quant(x, ue8m0=ue8m0)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (2, 3, 3) and s.dtype == torch.float32

    amax = torch.stack([x[..., i * B : (i + 1) * B].abs().amax(-1) for i in range(3)], -1).clamp(min=1e-4)
    if ue8m0:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), "scales are powers of two"
        assert (s >= amax / FP8_MAX * (1 - 2**-20)).all() and (s < 2 * amax / FP8_MAX).all()
    else:
        torch.testing.assert_close(s, amax / FP8_MAX, rtol=0, atol=0)

    deq = q.float() * s.repeat_interleave(B, -1)[..., :K]
    assert_within_fp8_rounding(deq, x, s.repeat_interleave(B, -1)[..., :K])
    assert torch.isfinite(deq).all() and (deq[1, 2] == 0).all()


def test_act_quant_bf16_input():
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    q, s = act_quant(x)
    assert_within_fp8_rounding(q.float() * s.repeat_interleave(B, -1), x.float(), s.repeat_interleave(B, -1))


def _gemm_inputs(M: int, K: int = 200, N: int = 300, seed: int = 3):
    torch.manual_seed(seed)
    x = torch.randn(M, K).bfloat16().float()
    w = (torch.randn(N, K) * torch.logspace(-2, 0, N)[:, None]).bfloat16().float()
    return x, w, act_quant(x), quantize_blocks(w)


@pytest.mark.parametrize("M", [1, 5, 130])
def test_fp8_gemm_scaled_mm_matches_reference(impl, M):
    K = 200
    _x, _w, (xq, xs), (wq, ws) = _gemm_inputs(M, K)
    ref = fp8_gemm_reference(xq, xs, wq, ws, out_dtype=torch.float32)
    impl("scaled_mm")
    fast = fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    assert fast.shape == ref.shape == (M, 300)
    # Both sum the same exact fp8 products in fp32, in different orders: each is within K * 2**-24 of
    # the exact sum of |terms|, plus a few roundings for applying the scales.
    x_deq = xq.float() * xs.repeat_interleave(B, -1)[:, :K]
    abs_terms = x_deq.abs() @ dequantize_blocks(wq, ws, dtype=torch.float32).abs().T
    assert ((fast - ref).abs() <= 2 * (K + 4) * 2**-24 * abs_terms + 1e-30).all()
    # In bf16: the same fp32 bound plus the output's own rounding, half a bf16 step (2**-9 relative), each
    # side. A plain 2**-7 relative bound fails where the sum nearly cancels (a result ~1e-5 of terms ~1).
    fast_bf16 = fp8_gemm(xq, xs, wq, ws)
    assert fast_bf16.dtype == torch.bfloat16
    bound = 2 * (K + 4) * 2**-24 * abs_terms + 2**-8 * ref.abs() + 1e-30
    assert ((fast_bf16.float() - ref).abs() <= bound).all()


@pytest.mark.parametrize("name", ["reference", "scaled_mm"])
def test_fp8_gemm_close_to_unquantized_matmul(impl, name):
    impl(name)
    M, K = 130, 200
    x, w, (xq, xs), (wq, ws) = _gemm_inputs(M, K)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    exact = x.double() @ w.double().T
    # Worst case from the per-element bounds: |x^w^ - xw| <= ex|w| + |x|ew + ex ew.
    ex = x.abs() / 16 + xs.repeat_interleave(B, -1)[:, :K] / 1024
    ew = w.abs() / 16 + expand(ws, w.shape, (B, B)) / 1024
    bound = (ex @ w.abs().T + x.abs() @ ew.T + ex @ ew.T) * (1 + 1e-5)
    assert ((y.double() - exact).abs() <= bound.double()).all()
    # And typically much better: rounding errors average out (measured ~3% here).
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.06


def test_fp8_gemm_flattens_and_restores_leading_dims(impl):
    _x, _w, (xq, xs), (wq, ws) = _gemm_inputs(6)
    for name in ("reference", "scaled_mm"):
        impl(name)
        y = fp8_gemm(xq.view(2, 3, -1), xs.view(2, 3, -1), wq, ws, out_dtype=torch.float32)
        assert y.shape == (2, 3, 300)
        torch.testing.assert_close(y.view(6, -1), fp8_gemm_reference(xq, xs, wq, ws, out_dtype=torch.float32))


def test_impl_switch_really_switches(impl, monkeypatch):
    calls = []
    real = torch._scaled_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", counting)
    _, _, (xq, xs), (wq, ws) = _gemm_inputs(5)
    impl("reference")
    fp8_gemm(xq, xs, wq, ws)
    assert len(calls) == 0
    assert impl("scaled_mm") == "reference"
    fp8_gemm(xq, xs, wq, ws)
    assert len(calls) == 2, "one _scaled_mm per 128-wide K block (K=200: two)"
    with pytest.raises(ValueError, match="valid"):
        impl("triton")


def test_scaled_mm_failure_falls_back_to_reference(impl, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("not supported here")

    monkeypatch.setattr(torch, "_scaled_mm", broken)
    _, _, (xq, xs), (wq, ws) = _gemm_inputs(5)
    impl("scaled_mm")
    with pytest.warns(RuntimeWarning, match="not supported here"):
        y = fp8_gemm(xq.view(5, 1, -1), xs.view(5, 1, -1), wq, ws, out_dtype=torch.float32)
    ref = fp8_gemm_reference(xq, xs, wq, ws, out_dtype=torch.float32)
    torch.testing.assert_close(y.view(5, -1), ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fp8_modes(impl, dtype):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 200, dtype=dtype)
    w = torch.randn(300, 200) * 0.05
    wq, ws = quantize_blocks(w)

    y_dequant = linear_fp8(x, wq, ws, mode="dequant")
    assert y_dequant.dtype == dtype and y_dequant.shape == (2, 3, 300)
    torch.testing.assert_close(y_dequant, x @ dequantize_blocks(wq, ws, dtype=dtype).T)

    for name in ("reference", "scaled_mm"):
        impl(name)
        y_gemm = linear_fp8(x, wq, ws, mode="gemm")
        assert y_gemm.dtype == dtype and y_gemm.shape == (2, 3, 300)
        xq, xs = act_quant(x)
        torch.testing.assert_close(y_gemm, fp8_gemm_reference(xq, xs, wq, ws, out_dtype=dtype))
        # Quantizing x too costs ~2-3% relative error on top of the weight's.
        rel = (y_gemm.float() - y_dequant.float()).norm() / y_dequant.float().norm()
        assert rel.item() < 0.06

    with pytest.raises(ValueError, match="mode"):
        linear_fp8(x, wq, ws, mode="fast")
    # model/linear.py passes (x, weight, scale_inv, block, mode) positionally.
    torch.testing.assert_close(linear_fp8(x, wq, ws, (B, B), "dequant"), y_dequant, rtol=0, atol=0)


def test_linear_fp8_ue8m0_uses_power_of_two_activation_scales(monkeypatch):
    seen = []
    real = fp8.act_quant

    def spy(x, block=128, ue8m0=False):
        seen.append((block, ue8m0))
        return real(x, block, ue8m0)

    monkeypatch.setattr(fp8, "act_quant", spy)
    wq, ws = quantize_blocks(torch.randn(64, 256))
    y = linear_fp8(torch.randn(3, 256), wq, ws, mode="gemm", ue8m0=True)
    assert seen == [(128, True)] and y.shape == (3, 64)
