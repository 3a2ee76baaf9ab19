"""Linear layers whose weight is either high precision or FP8 with 128x128 block scales.

FP8 is a weight format, not a model variant: an FP8 `Linear` owns `weight` (float8_e4m3fn) and
`weight_scale_inv` (float32, one per block) and computes through `dsv3.kernels.fp8`; everything
else about the layer is the same. `ExpertLinear` is the same idea for experts stacked as [E, out, in].
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import fp8 as fp8_kernels
from ..kernels import int8 as int8_kernels
from ..kernels import native, pages
from .options import UNPREPARED, InferenceOptions

# Up to this many activation rows the native kernels (one pass over the weight, fp32 accumulators for
# four rows at a time) beat torch's CPU GEMMs; beyond, the product is compute-bound (prefill).
NATIVE_MAX_ROWS = 16


def uses_native(x: torch.Tensor, matvec: str) -> bool:
    """Whether a product of `x` runs through `kernels.native` under the `matvec` backend (decode-sized, CPU, no grad)."""
    return (
        matvec == "native"
        and x.device.type == "cpu"
        and x.numel() <= NATIVE_MAX_ROWS * x.shape[-1]
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def widens(x: torch.Tensor, options: InferenceOptions) -> bool:
    """Whether a product of bf16 `x` computes in fp32 (`matmul_dtype="fp32"`): CPU, no grad, more than decode-sized.

    Decode-sized products stay bf16 (native kernels or torch's matrix-vector paths): widening the whole
    weight for a few rows would cost more than the product.
    """
    return (
        options.matmul_dtype == "fp32"
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.numel() > NATIVE_MAX_ROWS * x.shape[-1]
        and not torch.is_grad_enabled()
    )


# Widening a bf16 weight to fp32 takes a temporary copy: at most this many elements (64 MiB) at a time.
WIDEN_MAX_ELEMENTS = 1 << 24


def fp32_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T computed in fp32, returned as fp32: `kernels.native.gemm` (the operands widened block by block
    inside, 1.1-1.5x torch's fp32 GEMM on the AVX2 benchmark host) where it runs, else torch on fp32 copies."""
    if native.fits_gemm(x, weight):
        return native.gemm(x, weight)
    return F.linear(x.float(), weight.float())


def widened_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T computed in fp32 and rounded to x's dtype, a block of output columns at a time (the fp32
    block, and torch's widened copy of the weight's rows, bounded by WIDEN_MAX_ELEMENTS)."""
    N, K = weight.shape
    rows = max(1, WIDEN_MAX_ELEMENTS // max(1, K))
    if rows >= N:
        return fp32_product(x, weight).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], N)
    for n0 in range(0, N, rows):
        out[..., n0 : n0 + rows] = fp32_product(x, weight[n0 : n0 + rows])
    return out


def matmul_wt(x: torch.Tensor, weight: torch.Tensor, options: InferenceOptions = UNPREPARED) -> torch.Tensor:
    """x @ weight.T for a high-precision weight; the one place that picks the CPU matmul backend.

    A single row (batch-1 decode) is a matrix-VECTOR product bound by reading the weight. For bf16
    on CPU, torch's MKL path streams those at about twice the bytes/s of its oneDNN path (18.6 vs
    9.3 GB/s measured on the 2-core benchmark machine), while MKL is far slower from 2 rows on; so
    with `matvec="mkl"` (the model's `InferenceOptions.matvec`) only single-row bf16 products bypass
    oneDNN. torch has no per-call backend argument: the bypass clears `torch.backends.mkldnn.enabled`
    for this one call only (its `flags()` context would also reset the other oneDNN flags).
    With `matvec="native"`, up to NATIVE_MAX_ROWS rows of bf16 weights go through `kernels.native`
    instead (both torch paths emulate bf16 products on CPUs without BF16 instructions), and with
    `matmul_dtype="fp32"` larger bf16 products are computed in fp32 (`widened_linear`).
    """
    if torch.compiler.is_compiling():  # inductor picks the kernel; flipping a backend flag would break the graph
        return F.linear(x, weight)
    matvec = options.matvec
    if uses_native(x, matvec) and native.fits_linear(x, weight):
        return native.linear(x, weight)
    if widens(x, options) and weight.dtype == torch.bfloat16:
        return widened_linear(x, weight)
    if matvec == "mkl" and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return F.linear(x, weight)
        finally:
            torch.backends.mkldnn.enabled = previous
    return F.linear(x, weight)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """x @ (q * scale).T for int8 weights: native kernels for decode-sized x, a GEMM on the dequantized weight for
    more rows (`dequantized_int8_gemm`), else torch's weight-only int8 kernel (fp32 per `matmul_dtype`)."""
    if uses_native(x, options.matvec) and native.fits_linear(x, q):
        return native.linear(x, q, scale)
    if x.numel() > NATIVE_MAX_ROWS * x.shape[-1] and not torch.compiler.is_compiling():
        return dequantized_int8_gemm(x, q, scale, options)
    if widens(x, options):
        return int8_kernels.linear_int8(x.float(), q, scale).to(x.dtype)
    return int8_kernels.linear_int8(x, q, scale)


def dequantized_fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], options: InferenceOptions
) -> torch.Tensor | None:
    """`matmul_wt(x, dequantize_blocks(weight, scale_inv, block, x.dtype), options)` where that widens bf16 x to fp32
    products (prefill-sized x on CPUs without BF16 instructions): the same values, each block of `widened_linear`'s
    rows dequantized straight to fp32 in one native pass. None where it does not apply.

    Why: the torch dequantization takes six passes over the weight and `widened_linear` one more; for a 200-token
    prompt that cost more than the GEMM itself (a 2816 x 1024 weight: 9.6 ms against 8.4)."""
    if torch.compiler.is_compiling() or not (widens(x, options) and native.fits_dequantize_fp8(weight, scale_inv)):
        return None  # (inductor picks its own kernels, as in `matmul_wt`)
    N, K = weight.shape
    rows = max(1, WIDEN_MAX_ELEMENTS // max(1, K))  # widened_linear's blocks: the same products
    if rows >= N:
        return fp32_product(x, native.dequantize_fp8(weight, scale_inv, block, True)).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], N)
    for n0 in range(0, N, rows):
        n1 = min(n0 + rows, N)
        out[..., n0:n1] = fp32_product(x, native.dequantize_fp8(weight, scale_inv, block, True, (n0, n1)))
    return out


def dequantized_int8_gemm(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, options: InferenceOptions
) -> torch.Tensor:
    """x @ (q * scale).T for prefill-sized x: the weight dequantized a block of output rows at a time (to fp32 where
    `widens`, else to x's dtype as `linear_int8_reference` does), each block one GEMM.

    Why: torch's weight-only int8 kernel (`linear_int8`) is built for a few rows; from 17 rows on it ran 10-28x
    slower than dequantizing and a GEMM (a 2816 x 1024 weight at 17-1024 rows, 2 threads: 65 vs 6 ms at 17, 2.7 s
    vs 96 ms at 1024), which made an int8 model's prefill ~25x slower than its bf16 one. The blocks bound the
    dequantized copy as `widened_linear` bounds its widened one (an lm_head over every position)."""
    if widens(x, options):
        dtype, product = torch.float32, fp32_product
    else:
        dtype, product = x.dtype, F.linear
    N, K = q.shape
    rows = max(1, WIDEN_MAX_ELEMENTS // max(1, K))
    if rows >= N:
        return product(x, int8_kernels.dequantize_int8(q, scale, dtype)).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], N)
    for n0 in range(0, N, rows):
        out[..., n0 : n0 + rows] = product(
            x, int8_kernels.dequantize_int8(q[n0 : n0 + rows], scale[n0 : n0 + rows], dtype)
        )
    return out


class Linear(nn.Module):
    """y = x @ weight.T, weight [out, in]; FP8 weights carry `weight_scale_inv` [ceil(out/b0), ceil(in/b1)]."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.block_size: tuple[int, int] = (128, 128)
        self.options = UNPREPARED  # the model's InferenceOptions, from prepare_for_inference

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    def to_fp8_layout(self, block_size: tuple[int, int]) -> None:
        """Give this layer FP8 storage (values filled by the loader or by `quantize_`)."""
        b0, b1 = block_size
        self.block_size = block_size
        dev = self.weight.device
        self.weight = nn.Parameter(
            torch.empty(self.out_features, self.in_features, dtype=torch.float8_e4m3fn, device=dev),
            requires_grad=False,
        )
        grid = (-(-self.out_features // b0), -(-self.in_features // b1))
        self.weight_scale_inv = nn.Parameter(torch.ones(grid, dtype=torch.float32, device=dev), requires_grad=False)

    @property
    def is_int8(self) -> bool:
        return self.weight.dtype == torch.int8

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        if self.is_int8:
            return int8_kernels.dequantize_int8(self.weight, self.weight_scale, dtype)
        if not self.is_fp8:
            return self.weight.to(dtype)
        return fp8_kernels.dequantize_blocks(self.weight, self.weight_scale_inv, self.block_size, dtype)

    @torch.no_grad()
    def quantize_int8_(self, scale_dtype: torch.dtype) -> None:
        """Replace the weight (any precision, FP8 included) by int8 + one `weight_scale` per output channel."""
        if self.is_int8:
            return
        q, scale = int8_kernels.quantize_int8(self.dequantized_weight(torch.float32), scale_dtype)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        if hasattr(self, "weight_scale_inv"):
            del self.weight_scale_inv

    def forward(self, x: torch.Tensor, widen: bool = False) -> torch.Tensor:
        """x @ weight.T in x's dtype; `widen=True` returns it as float32 (`forward(x).float()`; decode-sized rows get
        it from the kernel's own pass, not a second one over the output: the logits' case)."""
        operands = self._native_operands(x)
        if operands is not None:
            return native.linear(x, *operands, widen=widen)
        y = self._torch_forward(x)
        return y.float() if widen else y

    def _native_operands(self, x: torch.Tensor) -> tuple | None:
        """(weight, scale, FP8 grid) as `native.linear` takes them when this product of x runs natively, else None.

        Decode-sized rows: int8 and bf16 weights as they are; FP8 bytes read in place with bf16 rows, dequantized in
        registers ('dequant': bit-identical to a weight dequantized at load) or multiplied per column block with
        the rows quantized as `fp8.act_quant` ('gemm': linear_fp8's numerics).
        """
        if not uses_native(x, self.options.matvec):
            return None
        if self.is_fp8:
            if x.dtype != torch.bfloat16 or not self.fits_native_fp8():
                return None
            if self.options.fp8_compute == "dequant":
                return self.weight, None, native.Fp8Grid.of(self.weight_scale_inv, self.block_size, x.dtype)
            return self.weight, None, self.native_gemm_grid(x.dtype)
        if not native.fits_linear(x, self.weight):
            return None
        return self.weight, self.weight_scale if self.is_int8 else None, None

    def _torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_int8:
            return int8_matmul(x, self.weight, self.weight_scale, self.options)
        if self.is_fp8 and self.options.fp8_compute == "dequant":
            # Through the same product as a weight dequantized at load: bit-identical to it (InferenceOptions).
            y = dequantized_fp8_linear(x, self.weight, self.weight_scale_inv, self.block_size, self.options)
            return y if y is not None else matmul_wt(x, self.dequantized_weight(x.dtype), self.options)
        if self.is_fp8:
            o = self.options
            return fp8_kernels.linear_fp8(
                x, self.weight, self.weight_scale_inv, self.block_size, o.fp8_compute, ue8m0=o.ue8m0
            )
        return matmul_wt(x, self.weight, self.options)

    def native_gemm_grid(self, dtype: torch.dtype) -> native.Fp8Grid:
        """This FP8 layer's block scales for kernels.native under fp8_compute 'gemm' (UE8M0 as the checkpoint says)."""
        return native.Fp8Grid.of(
            self.weight_scale_inv, self.block_size, dtype, "ue8m0" if self.options.ue8m0 else "e4m3"
        )

    def fits_native_fp8(self) -> bool:
        """Whether this FP8 layer's weight and block scales go to kernels.native as they are."""
        return native.available() and native.fits_fp8(self.weight, self.weight_scale_inv, self.block_size)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class ExpertLinear(nn.Module):
    """Weights of all routed experts for one projection, stacked as [E, out, in] (+ FP8 scales)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.block_size: tuple[int, int] = (128, 128)

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    def to_fp8_layout(self, block_size: tuple[int, int]) -> None:
        b0, b1 = block_size
        self.block_size = block_size
        dev = self.weight.device
        shape = (self.num_experts, self.out_features, self.in_features)
        self.weight = nn.Parameter(torch.empty(shape, dtype=torch.float8_e4m3fn, device=dev), requires_grad=False)
        grid = (self.num_experts, -(-self.out_features // b0), -(-self.in_features // b1))
        self.weight_scale_inv = nn.Parameter(torch.ones(grid, dtype=torch.float32, device=dev), requires_grad=False)

    @property
    def is_int8(self) -> bool:
        return self.weight.dtype == torch.int8

    def expert_weight(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's [out, in] weight in `dtype` (dequantized when FP8 or int8)."""
        return self.gathered_weight(e, dtype)

    def gathered_weight(self, e: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Expert(s) e's weights ([out, in], or [N, out, in] for an index tensor) in `dtype`, dequantized."""
        if self.is_int8:
            return int8_kernels.dequantize_int8(self.weight[e], self.weight_scale[e], dtype)
        if not self.is_fp8:
            return self.weight[e].to(dtype)
        return fp8_kernels.dequantize_blocks(self.weight[e], self.weight_scale_inv[e], self.block_size, dtype)

    def expert_matmul(self, e: int, x: torch.Tensor, options: InferenceOptions = UNPREPARED) -> torch.Tensor:
        """x @ W_e.T; int8 experts multiply through the int8 kernel, without a dequantized copy."""
        if self.is_int8:
            return int8_matmul(x, self.weight[e], self.weight_scale[e], options)
        if self.is_fp8:
            weight, scale_inv = self.weight[e], self.weight_scale_inv[e]
            y = dequantized_fp8_linear(x, weight, scale_inv, self.block_size, options)
            if y is not None:
                return y
            if (
                x.dtype == torch.bfloat16
                and uses_native(x, options.matvec)
                and native.available()
                and native.fits_fp8(weight, scale_inv, self.block_size)
            ):  # a few rows (an expert's share of a prompt): the FP8 bytes read in place, the same values
                return native.linear(x, weight, fp8=native.Fp8Grid.of(scale_inv, self.block_size, x.dtype))
        return matmul_wt(x, self.expert_weight(e, x.dtype), options)

    @torch.no_grad()
    def quantize_int8_(self, scale_dtype: torch.dtype) -> None:
        """Replace the stacked weights by int8 + one `weight_scale` per expert and output channel."""
        if self.is_int8:
            return
        w = torch.stack([self.expert_weight(e, torch.float32) for e in range(self.weight.shape[0])])
        q, scale = int8_kernels.quantize_int8(w, scale_dtype)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        if hasattr(self, "weight_scale_inv"):
            del self.weight_scale_inv

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


def fuse_weights(*layers: Linear | ExpertLinear) -> torch.Tensor | None:
    """Re-home the layers' weights as consecutive row blocks (dim -2) of ONE new tensor and return it.

    Each layer keeps its own `weight` Parameter (state_dict names and training are unchanged), now a
    view into the fused tensor, so inference can run the projections that read the same input as one
    matmul: fewer launches and one pass over the input. FP8, int8 or mixed layers are left alone (None).
    """
    weights = [layer.weight for layer in layers]
    if any(layer.is_fp8 or w.is_meta or not w.is_floating_point() for layer, w in zip(layers, weights)):
        return None
    if len({(w.dtype, w.device, w.shape[:-2], w.shape[-1]) for w in weights}) != 1:
        return None
    shape = (*weights[0].shape[:-2], sum(w.shape[-2] for w in weights), weights[0].shape[-1])
    fused = pages.empty(shape, weights[0].dtype, weights[0].device)  # a weight decode streams: huge pages
    torch.cat([w.detach() for w in weights], dim=-2, out=fused)
    start = 0
    for layer, w in zip(layers, weights):
        rows = w.shape[-2]
        layer.weight.data = fused.narrow(-2, start, rows)
        start += rows
    return fused


def fused_weight(fused: torch.Tensor | None, *layers: Linear | ExpertLinear) -> torch.Tensor | None:
    """`fused` if it still backs the layers' weights (nothing re-assigned them) and no graph is being built.

    While torch.compile traces, `fused` is trusted as is (data pointers are not traceable): the
    compiled decode step is built right after `prepare_for_inference` fused the projections.
    """
    if fused is None or torch.is_grad_enabled():
        return None
    if torch.compiler.is_compiling():
        return fused
    offset = 0
    for layer in layers:
        w = layer.weight
        if w.data_ptr() != fused.data_ptr() + offset * fused.element_size() or w.dtype != fused.dtype:
            return None
        offset += w.shape[-2] * w.shape[-1]
    return fused
