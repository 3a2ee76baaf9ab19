"""Weight-only int8 with one scale per output channel: quantized at load, multiplied without a dequantized copy.

Why each choice:

- Symmetric, per output channel: scale = amax(row) / 127, q = round(w / scale) in [-127, 127], so
  every weight is off by at most scale / 2 and one outlier spoils only its own row. Models store the
  scale in float32 (what `kernels.native` multiplies by); torch's kernel below takes it in the input's
  dtype, so `linear_int8` casts it per call (a bf16 scale adds at most 2**-9 of relative error to its
  row, counted in the tests' accuracy bounds).
- `linear_int8` is torch's weight-only int8 CPU kernel (`aten._weight_int8pack_mm`; prefill-sized
  inputs: decode-sized ones on x86-64 go to `kernels.native` instead): it converts each
  int8 weight in registers and reads each weight byte once, which is what makes 8-bit weights
  faster than 16-bit on a memory-bound decode step (a dequantize-then-matmul reads them three times).
  In torch 2.13 its bf16 path crashes or returns garbage when the input width K is not a multiple of 8
  on AVX2 CPUs (seen at K = 33 and 300), and of 16 on AVX-512 ones (K = 24, 264, 4104: a segfault
  from two rows up); so it takes only K % 16 == 0 (every DeepSeek width). Other shapes, and any device
  or dtype it does not take, run `linear_int8_reference` (dequantize, then F.linear), which the fast
  path is tested against.
- Decode-sized inputs in `kernels.native` multiply the int8 weights by int16 activation rows (one scale
  per row, max |row| / 32767: each activation off by at most 2**-16 of its row's largest, against the
  weights' 2**-8 of theirs), 16 products per instruction into int32 sums: 1.2x / 1.4x the fp32-widening
  kernel's speed at 4 / 8 rows, the same at one row (memory-bound either way). A row holding inf or NaN
  gives NaN outputs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native, pages

INT8_MAX = 127.0


def quantize_int8(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """[..., out, in] weight -> (int8 [..., out, in], scale [..., out] in `scale_dtype`); weight ~ q * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=-1) / INT8_MAX).to(scale_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale gives zeros
    q = torch.round(w / scale.float()[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return (pages.copy_of(q) if pages.wanted(q) else q.contiguous()), scale  # a weight decode streams: huge pages


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """q * scale per output channel, in fp32, rounded once to `dtype` (one native pass where it applies)."""
    if not torch.compiler.is_compiling() and native.fits_dequantize_int8(q, scale, dtype):
        return native.dequantize_int8(q, scale, dtype)
    return dequantize_int8_reference(q, scale, dtype)


def dequantize_int8_reference(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The spec of `dequantize_int8`, in torch."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def linear_int8_reference(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """The spec of linear_int8: x @ (q * scale).T with the weight dequantized to x's dtype."""
    return F.linear(x, dequantize_int8(q, scale, x.dtype))


def linear_int8(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [..., K] @ (q [N, K] * scale [N]).T in x's dtype, through torch's weight-only int8 kernel where it is safe."""
    K = x.shape[-1]
    fits = (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and K % 16 == 0  # see the module docstring: torch's kernel mishandles other widths
        and x.numel() > 0
        and q.is_contiguous()
    )
    if not fits:
        return linear_int8_reference(x, q, scale)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, K).contiguous(), q, scale.to(x.dtype))
    return y.view(*x.shape[:-1], q.shape[0])
