"""Block-scaled FP8 (e4m3): quantize, dequantize, activation quantization and the FP8 GEMM.

This is the format of the official DeepSeek-V3 checkpoints (SPEC section 4) and of its inference
kernels; the plain-torch functions here are the readable spec, `fp8_gemm` may take a faster path
that a test holds to `fp8_gemm_reference`.

Why each choice:

- `float8_e4m3fn` and `FP8_MAX = 448`: e4m3fn has 3 mantissa bits and no infinities, its largest
  finite value is 1.75 * 2**8 = 448. Scaling a block so its largest magnitude lands on 448 uses the
  whole range; rounding to 3 mantissa bits then costs at most 2**-4 of each value (half a step of
  2**-3), plus 2**-10 * scale for the tiny values that fall into the subnormals.
- Weights use one scale per 128x128 block (`weight_block_size` in the checkpoint config), activations
  one scale per token per 128 channels (1x128), computed on the fly: a single outlier then spoils
  only its own block, and the K blocks of the two line up, so a GEMM can apply both scales once per
  K block of partial sums.
- Checkpoints store `weight_scale_inv` = amax / 448, the factor that takes fp8 back to real values;
  dequantizing multiplies by it (never divides), in fp32, bit for bit what the official
  `weight_dequant` does. Quantizing divides by it, which rounds each value once, correctly.
- fp8 -> fp32 goes through fp16 bits (`_fp8_to_float32`): torch's CPU cast is a scalar loop that
  costs more than the whole rest of a dequantization; the bit move is exact and ~8x faster.
  `dequantize_blocks` goes further (decode dequantizes every FP8 weight it touches, every step):
  3 integer ops give fp16 bits reading value * 2**-8, the scale (times 2**8) is applied in place in
  fp32 and rounded once to the output dtype, with no padded copy for partial blocks: 6 passes over the
  weight instead of 9, bit-identical to `dequantize_blocks_reference` (tested on every code). (A
  mixed-dtype `torch.mul(fp16, fp32, out=bf16)` would save two more passes, but torch runs it as a
  scalar loop, ~15x slower than the three vectorized ones.)
- Shapes need not be multiples of the block: edge blocks are partial and the scale grid is
  `ceil(out/b0) x ceil(in/b1)`. Internally tensors are zero-padded to whole blocks; zeros change
  no amax and are cropped away again.
- An all-zero weight block gets `scale_inv = 1` (any non-zero value would do) so that nothing is
  ever 0/0; its fp8 values are zeros and dequantize to zeros.
- `act_quant` follows the official kernel: amax is clamped to at least 1e-4 (an all-zero group then
  quantizes to zeros instead of NaN; the clamp only coarsens groups whose values are all below
  1e-4), and with `ue8m0=True` (DeepSeek-V3.1's `scale_fmt`) the scale is rounded up to a power of
  two, 2**ceil(log2(s)), the form DeepGEMM's UE8M0 scales take.
- `fp8_gemm` on this CPU build: `torch._scaled_mm` accepts only per-tensor or row-wise scales, not
  1x128 / 128x128 block scales, so the fast path runs one row-wise `_scaled_mm` per 128-wide K block
  and sums the fp32 partials. On CPUs without FP8 hardware that is slower than dequantizing to fp32
  and one fp32 matmul, so the reference is the default there; `set_fp8_gemm_impl` switches.

Non-finite inputs are not handled: an inf or NaN in a block poisons that block's scale.
"""

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
ACT_AMAX_MIN = 1e-4  # the official act_quant kernel's clamp on a group's amax

Block = tuple[int, int]


def _scale_grid(shape: torch.Size, block: Block) -> torch.Size:
    """The scale shape for a [..., rows, cols] tensor: one entry per (partial) block."""
    *lead, rows, cols = shape
    return torch.Size([*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1])])


def _check_scale_shape(scale: Tensor, shape: torch.Size, block: Block) -> None:
    if len(shape) < 2:
        raise ValueError(f"expected a tensor of at least 2 dims [..., rows, cols], got shape {list(shape)}")
    expected = _scale_grid(shape, block)
    if scale.shape != expected:
        raise ValueError(
            f"scale of shape {list(scale.shape)} does not match a tensor of shape {list(shape)} "
            f"with {block[0]}x{block[1]} blocks: expected scale shape {list(expected)}"
        )


def _to_blocks(t: Tensor, block: Block) -> Tensor:
    """View [..., rows, cols], zero-padded up to whole blocks, as [..., rows/b0, b0, cols/b1, b1]."""
    *lead, rows, cols = t.shape
    b0, b1 = block
    pad_rows, pad_cols = -rows % b0, -cols % b1
    if pad_rows or pad_cols:
        t = F.pad(t, (0, pad_cols, 0, pad_rows))
    return t.reshape(*lead, (rows + pad_rows) // b0, b0, (cols + pad_cols) // b1, b1)


def _from_blocks(t: Tensor, shape: torch.Size) -> Tensor:
    """Undo `_to_blocks`: back to [..., rows, cols], cropping the padding."""
    *lead, nb0, b0, nb1, b1 = t.shape
    return t.reshape(*lead, nb0 * b0, nb1 * b1)[..., : shape[-2], : shape[-1]]


def _fp8_to_float32(t: Tensor) -> Tensor:
    """Exactly `t.float()` for an e4m3fn tensor, NaN codes aside; ~8x faster on CPU (that cast is a scalar loop)."""
    # e4m3's 4 exponent and 3 mantissa bits, shifted left by 7, line up with fp16's; as fp16's exponent
    # bias is 15 against e4m3's 7, the fp16 then reads exactly value * 2**-8, subnormals included. The
    # shift puts the sign on bit 14: adding the sign bit once more carries it to bit 15 (int16 wraps).
    # The NaN codes 0x7f / 0xff come out as +-480; quantize_blocks and act_quant never produce them.
    bits = t.view(torch.uint8).to(torch.int16)
    return ((bits + (bits & 0x80)) << 7).view(torch.float16).float().mul_(256.0)


def quantize_blocks(weight: Tensor, block: Block = (128, 128), ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Quantize a [out, in] or stacked [E, out, in] weight to (fp8 weight, fp32 scale_inv per block).

    With `ue8m0` (DeepSeek-V3.1's `scale_fmt`) each scale is rounded up to a power of two, so it is
    exactly an 8-bit exponent and no block value exceeds the e4m3 range.
    """
    if weight.dim() not in (2, 3):
        raise ValueError(f"expected a 2-D [out, in] or 3-D [E, out, in] weight, got shape {list(weight.shape)}")
    blocks = _to_blocks(weight.float(), block)  # (..., out/b0, b0, in/b1, b1)
    amax = blocks.abs().amax(dim=(-3, -1))  # (..., out/b0, in/b1)
    scale_inv = amax / FP8_MAX
    # All-zero block (or amax so small that amax/448 underflows): any non-zero scale gives zeros.
    scale_inv = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    if ue8m0:
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv)))
    quantized = (blocks / scale_inv[..., :, None, :, None]).to(FP8_DTYPE)
    return _from_blocks(quantized, weight.shape).contiguous(), scale_inv


def _fp8_to_float16_scaled(t: Tensor) -> Tensor:
    """fp16 holding exactly value * 2**-8 for an e4m3fn tensor (NaN codes aside): 3 integer ops, no float pass."""
    # As in _fp8_to_float32, the code shifted left by 7 puts e4m3's exponent and mantissa where fp16's are.
    # Read as int8 and widened, the code's sign is copied into bits 8-15, so after the shift it sits on
    # bit 15 (right) and bit 14 (an exponent bit, wrong): clearing bit 14 (mask 0xBFFF) leaves fp16 bits.
    bits = t.view(torch.int8).to(torch.int16)
    bits <<= 7
    bits &= -16385  # 0xBFFF as int16
    return bits.view(torch.float16)


def dequantize_blocks_reference(
    weight_fp8: Tensor, scale_inv: Tensor, block: Block = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """The readable spec of dequantize_blocks: fp8 -> fp32, times each block's scale_inv in fp32, rounded once."""
    if weight_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"expected a {FP8_DTYPE} weight, got {weight_fp8.dtype}")
    _check_scale_shape(scale_inv, weight_fp8.shape, block)
    blocks = _to_blocks(_fp8_to_float32(weight_fp8), block)
    blocks = blocks * scale_inv.float()[..., :, None, :, None]  # multiply in fp32, round once to dtype
    return _from_blocks(blocks, weight_fp8.shape).to(dtype)


def dequantize_blocks(
    weight_fp8: Tensor, scale_inv: Tensor, block: Block = (128, 128), dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """fp8 [..., out, in] times its per-block scale_inv [..., ceil(out/b0), ceil(in/b1)], in `dtype`.

    Bit-identical to dequantize_blocks_reference, in 6 passes over the weight instead of 9 (module doc).
    """
    if weight_fp8.dtype != FP8_DTYPE:
        raise ValueError(f"expected a {FP8_DTYPE} weight, got {weight_fp8.dtype}")
    _check_scale_shape(scale_inv, weight_fp8.shape, block)
    *lead, rows, cols = weight_fp8.shape
    (b0, b1), n_full = block, cols // block[1]
    w = _fp8_to_float16_scaled(weight_fp8).float()  # value * 2**-8, exactly, (..., rows, cols)
    # One scale per (row, column block): (..., rows, ceil(cols/b1)), small. Times 2**8 (exact) undoes w's 2**-8.
    row_scale = (scale_inv.float() * 256.0).repeat_interleave(b0, dim=-2)[..., :rows, :]
    # In place, whole column blocks in one broadcast multiply and the partial last block (if any) in a
    # second: no padded copy. The fp32 product is then rounded once to dtype, as in the reference.
    if n_full:
        w[..., : n_full * b1].unflatten(-1, (n_full, b1)).mul_(row_scale[..., :n_full, None])
    if cols % b1:
        w[..., n_full * b1 :].mul_(row_scale[..., -1:])
    return w.to(dtype)


def act_quant(x: Tensor, block: int = 128, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Quantize x [..., K] per token per `block` channels to (fp8 [..., K], fp32 scale [..., ceil(K/block)])."""
    K = x.shape[-1]
    groups = F.pad(x.float(), (0, -K % block)).unflatten(-1, (-1, block))  # (..., K/block, block)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_AMAX_MIN)
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    quantized = (groups / scale).to(FP8_DTYPE).flatten(-2)[..., :K]
    return quantized.contiguous(), scale.squeeze(-1)


def fp8_gemm_reference(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale_inv: Tensor,
    block: Block = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """y [..., N] = dequant(x [..., K]) @ dequant(w [N, K]).T, computed in fp32: the spec of fp8_gemm."""
    lead, K = x_fp8.shape[:-1], x_fp8.shape[-1]
    x = dequantize_blocks(x_fp8.reshape(-1, K), x_scale.reshape(-1, x_scale.shape[-1]), (1, block[1]), torch.float32)
    w = dequantize_blocks(w_fp8, w_scale_inv, block, torch.float32)
    return (x @ w.T).to(out_dtype).reshape(*lead, w.shape[0])


def _fp8_gemm_scaled_mm(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale_inv: Tensor,
    block: Block = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """fp8_gemm as one row-wise `torch._scaled_mm` per K block; falls back to the reference if it raises."""
    lead, K = x_fp8.shape[:-1], x_fp8.shape[-1]
    x = x_fp8.reshape(-1, K)  # (M, K)
    x_scale = x_scale.reshape(-1, x_scale.shape[-1]).float()
    _check_scale_shape(x_scale, x.shape, (1, block[1]))
    _check_scale_shape(w_scale_inv, w_fp8.shape, block)
    N, b0, b1 = w_fp8.shape[0], block[0], block[1]
    # Within K block k every product x[m, i] * w[n, i] shares the factor x_scale[m, k] * w_scale_inv[n // b0, k]:
    # a row-wise scale for x and a column-wise one for w.T. _scaled_mm wants each scale contiguous.
    scale_a = x_scale.T.contiguous()  # (K/b1, M)
    scale_b = w_scale_inv.float().repeat_interleave(b0, dim=0)[:N].T.contiguous()  # (K/b1, N)
    try:
        y = torch.zeros(x.shape[0], N, dtype=torch.float32, device=x.device)
        for k in range(scale_a.shape[0]):
            ks = slice(k * b1, (k + 1) * b1)
            a_scale, b_scale = scale_a[k, :, None], scale_b[k, None, :]  # (M, 1), (1, N)
            y += torch._scaled_mm(x[:, ks], w_fp8[:, ks].T, scale_a=a_scale, scale_b=b_scale, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as err:  # e.g. a device or layout _scaled_mm does not support
        warnings.warn(f"torch._scaled_mm failed ({err}); using fp8_gemm_reference", RuntimeWarning, stacklevel=2)
        y = fp8_gemm_reference(x, x_scale, w_fp8, w_scale_inv, block, torch.float32)
    return y.to(out_dtype).reshape(*lead, N)


_FP8_GEMM_IMPLS: dict[str, Callable[..., Tensor]] = {
    "reference": fp8_gemm_reference,
    "scaled_mm": _fp8_gemm_scaled_mm,
}
# Chosen once, here. On CPU (no FP8 units) the reference's fp32 dequant + one fp32 matmul took
# 0.35-0.6x the time of the 8-22 chunked _scaled_mm calls for M = 1, 8 and 512 tokens on [2816, 1024]
# and [1024, 2816] weights, so it is the default; "scaled_mm" stays tested for builds where it is fast.
_fp8_gemm_impl_name = "reference"


def set_fp8_gemm_impl(name: str) -> str:
    """Make fp8_gemm use implementation `name` ("reference" | "scaled_mm"); returns the previous name."""
    global _fp8_gemm_impl_name
    if name not in _FP8_GEMM_IMPLS:
        raise ValueError(f"unknown fp8_gemm implementation {name!r}; valid: {sorted(_FP8_GEMM_IMPLS)}")
    if name == "scaled_mm" and not hasattr(torch, "_scaled_mm"):
        raise ValueError("fp8_gemm implementation 'scaled_mm' needs torch._scaled_mm, which this torch lacks")
    previous, _fp8_gemm_impl_name = _fp8_gemm_impl_name, name
    return previous


def fp8_gemm(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale_inv: Tensor,
    block: Block = (128, 128),
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """y [..., N] = dequant(x [..., K]) @ dequant(w [N, K]).T with the implementation chosen by set_fp8_gemm_impl."""
    return _FP8_GEMM_IMPLS[_fp8_gemm_impl_name](x_fp8, x_scale, w_fp8, w_scale_inv, block, out_dtype)


def linear_fp8(
    x: Tensor,
    weight_fp8: Tensor,
    weight_scale_inv: Tensor,
    block: Block = (128, 128),
    mode: str = "dequant",
    *,
    ue8m0: bool = False,
) -> Tensor:
    """x [..., in] @ W.T for an FP8 block-scaled W [out, in], in x's dtype.

    mode="dequant": dequantize W to x's dtype and matmul (callers that can spare the memory cache
    the dequantized weight instead of calling this). mode="gemm": quantize x per 1x128 group
    (`ue8m0` as in the checkpoint's `scale_fmt`) and run fp8_gemm, as the official kernels do.
    """
    if mode == "dequant":
        return F.linear(x, dequantize_blocks(weight_fp8, weight_scale_inv, block, x.dtype))
    if mode == "gemm":
        x_fp8, x_scale = act_quant(x, block[1], ue8m0)
        return fp8_gemm(x_fp8, x_scale, weight_fp8, weight_scale_inv, block, x.dtype)
    raise ValueError(f"unknown linear_fp8 mode {mode!r}; valid: ['dequant', 'gemm']")
