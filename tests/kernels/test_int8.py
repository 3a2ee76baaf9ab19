"""Weight-only int8: the quantization bound, and the fast kernel against the plain reference."""

import pytest
import torch

from dsv3.kernels.int8 import dequantize_int8, linear_int8, linear_int8_reference, quantize_int8


def test_quantize_int8_error_is_at_most_half_a_step_per_weight():
    torch.manual_seed(0)
    w = torch.randn(3, 37, 50) * torch.logspace(-3, 1, 37)[:, None]  # rows of very different ranges
    w[1, 5] = 0.0  # an all-zero row
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 37) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scale, torch.float32) - w).abs()
    assert bool((err <= scale[..., None] / 2 * (1 + 1e-6)).all())
    assert bool((q[1, 5] == 0).all()) and float(scale[1, 5]) == 1.0
    # Each row's largest magnitude lands on +-127: the whole int8 range is used.
    nonzero = w.abs().amax(-1) > 0
    assert bool((q.abs().amax(-1)[nonzero] == 127).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K", [(1, 40, 64), (5, 17, 264), (3, 16, 33), (10, 17, 24), (4, 7, 272)])
def test_linear_int8_matches_the_reference(dtype, M, N, K):
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(N, K), dtype)
    x = torch.randn(2, M, K).to(dtype)
    got, ref = linear_int8(x, q, scale), linear_int8_reference(x, q, scale)
    assert got.shape == (2, M, N) and got.dtype == dtype
    exact = (x.double() @ dequantize_int8(q, scale, torch.float64).T).to(got.dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale_out = exact.abs().max()
    assert (got - exact).abs().max() <= tol * scale_out and (ref - exact).abs().max() <= tol * scale_out
    if K % 16:  # the shapes torch's kernel mishandles (K = 24 and 264 crash it on AVX-512) take the reference
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N, K", [(1, 1), (7, 13), (40, 64), (33, 1031)])
def test_dequantize_int8_is_the_torch_expression_value_for_value(dtype, N, K):
    """The one-pass native dequantization (where the kernels run) against `(q.float() * scale).to(dtype)`: every
    int8 code, scales spanning 2**-20..2**6 (products that round to bf16 both ways), column tails, strided rows."""
    from dsv3.kernels import native
    from dsv3.kernels.int8 import dequantize_int8_reference

    torch.manual_seed(N * K)
    q = torch.randint(-128, 128, (N, K + 5), dtype=torch.int8)[:, 2 : K + 2]  # rows strided, not contiguous
    q[0, : min(K, 256)] = torch.arange(-128, 128, dtype=torch.int8)[: min(K, 256)]
    scale = torch.exp2(torch.empty(N).uniform_(-20, 6)) * (1 + torch.rand(N))
    got = dequantize_int8(q, scale, dtype)
    assert got.dtype == dtype and got.shape == (N, K)
    assert torch.equal(got, dequantize_int8_reference(q, scale, dtype))
    if native.available():
        assert native.fits_dequantize_int8(q, scale, dtype)
        assert not native.fits_dequantize_int8(q, scale.bfloat16(), dtype)  # bf16 scales: the torch expression
