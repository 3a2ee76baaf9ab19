"""Kernels: a plain-torch reference for each, and faster versions chosen once, overridable in tests."""

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

__all__ = [
    "FP8_MAX",
    "act_quant",
    "dequantize_blocks",
    "fp8_gemm",
    "fp8_gemm_reference",
    "linear_fp8",
    "quantize_blocks",
    "set_fp8_gemm_impl",
]
