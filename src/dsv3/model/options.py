"""How a model computes at inference: one frozen `InferenceOptions`, applied once by `prepare_for_inference`.

Every choice that used to be a per-module attribute set in a loop, a module global or a backend flag
flipped per call lives here, is validated here, and reaches the modules that need it as this one
object (`module.options`):

- `fp8_compute`: how FP8 `Linear` weights compute, "dequant" (dequantize, then a matmul in the
  activation dtype; bit-identical to dequantizing at load; decode-sized bf16 rows under
  `matvec="native"` read the FP8 bytes in place and dequantize in registers, same bits) or "gemm"
  (quantize activations per token per 128 channels, then the FP8 GEMM, as the official kernels;
  decode-sized bf16 rows under `matvec="native"` do both in one native call, the torch path's result
  to fp32 round-off). Activation scales are rounded to powers of two (UE8M0) when the checkpoint's
  `quantization_config.scale_fmt` is "ue8m0" (DeepSeek-V3.1), never by hand: that is how the checkpoint
  was calibrated. The routed experts' FP8 weights are dequantized in either mode.
- `fuse_projections`: back the projections that read the same input (q_a + kv_a, gate + up) by one
  tensor, so one matmul reads x once (`linear.fuse_weights`).
- `matvec`: the CPU backend of small-batch products (decode), see `linear.matmul_wt`: "native" (the
  AVX2 kernels of `kernels.native`, which read each bf16 or int8 weight once, for up to
  `linear.NATIVE_MAX_ROWS` rows: projections, experts, the absorbed attention; an eval-mode decoder
  layer stack with a cache runs as ONE native call, `model.native_decode`, with the module path's roundings),
  "mkl" or "onednn" (torch's two paths); "auto" is native where those kernels build and run, else mkl.
- `matmul_dtype`: what bf16 products too large for the native kernels (prefill, big batches) compute
  in on CPU: "bf16" (torch's bf16 GEMM) or "fp32" (widen both operands to fp32 first, the weight a
  slice at a time; the result is rounded back to bf16 as the bf16 GEMM rounds its fp32 accumulators);
  "auto" is fp32 on x86 CPUs without BF16 instructions, where torch emulates bf16 products at about a
  fifth of its fp32 speed (docs/benchmarks.md), else bf16.
- `compile`: decode through the compiled static-shape step (`inference.compiled`) instead of eager.
- `quantize`: "int8" replaces every projection weight (attention, MLPs, experts; bf16, fp32 or FP8)
  by int8 with one scale per output channel (`kernels.int8`), once and for good: 8-bit weights
  that decode faster than 16-bit. `quantize_lm_head` includes lm_head (most of a small model's
  bytes per token) and the MTP head.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels import native

FP8_COMPUTE = ("dequant", "gemm")
# "native": kernels.native (AVX2, each weight byte read once); "mkl": torch's MKL path (oneDNN bypassed
# for that call); "onednn": torch's default dispatch; "auto": resolved by prepare_for_inference
# (native where it builds, else MKL; see linear.matmul_wt and docs/benchmarks.md for the measurements).
MATVEC = ("auto", "native", "mkl", "onednn")
MATMUL_DTYPES = ("auto", "bf16", "fp32")
SCALE_FMTS = (None, "ue8m0")
QUANTIZE = (None, "int8")


@dataclass(frozen=True)
class InferenceOptions:
    """Inference choices for one model; `DeepSeekV3.prepare_for_inference(options)` applies them."""

    fp8_compute: str = "dequant"
    fuse_projections: bool = True
    matvec: str = "auto"
    matmul_dtype: str = "auto"
    compile: bool = False
    quantize: str | None = None
    quantize_lm_head: bool = True
    ue8m0: bool = False  # set from the config by `resolve`, not by users

    def validate(self) -> InferenceOptions:
        """Self, or ConfigError naming the bad option and the valid values."""
        if self.fp8_compute not in FP8_COMPUTE:
            raise ConfigError(f"fp8_compute must be one of {', '.join(FP8_COMPUTE)}, got {self.fp8_compute!r}")
        if self.matvec not in MATVEC:
            raise ConfigError(f"matvec must be one of {', '.join(MATVEC)}, got {self.matvec!r}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"matmul_dtype must be one of {', '.join(MATMUL_DTYPES)}, got {self.matmul_dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ConfigError(f"quantize must be int8 or none, got {self.quantize!r}")
        for name in ("fuse_projections", "compile", "quantize_lm_head", "ue8m0"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        return self

    def resolve(self, cfg: ModelConfig) -> InferenceOptions:
        """Validated, with what follows from the model filled in: `ue8m0` from the config, `matvec` made concrete."""
        self.validate()
        q = cfg.quantization_config or {}
        scale_fmt = q.get("scale_fmt")
        if scale_fmt not in SCALE_FMTS:
            raise ConfigError(f"quantization_config.scale_fmt {scale_fmt!r} is not supported (supported: ue8m0)")
        matvec = self.matvec
        if matvec == "auto":
            matvec = "native" if native.available() else "mkl"
        elif matvec == "native" and not native.available():
            raise ConfigError("matvec 'native' needs an x86-64 CPU with AVX2 and a C compiler (kernels/native.py)")
        matmul_dtype = self.matmul_dtype
        if matmul_dtype == "auto":
            matmul_dtype = "bf16" if native.cpu_has_bf16_products() else "fp32"
        return dataclasses.replace(self, ue8m0=scale_fmt == "ue8m0", matvec=matvec, matmul_dtype=matmul_dtype)

    @classmethod
    def from_kwargs(cls, **options: object) -> InferenceOptions:
        """InferenceOptions(**options) with unknown names as a ConfigError (what `from_pretrained(**options)` takes)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"ue8m0"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown inference option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**options).validate()  # type: ignore[arg-type]


# What a module computes with until `prepare_for_inference` hands it the model's (resolved) options.
UNPREPARED = InferenceOptions(matvec="mkl", matmul_dtype="bf16")


def add_inference_arguments(s: argparse.ArgumentParser) -> None:
    """--quantize and --compile / --no-compile: how every command spells the InferenceOptions it prepares a model with."""
    s.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: weight-only int8 with per-channel scales at load (all projections and lm_head; "
        "1-3%% logit error on the test configs, docs/benchmarks.md)",
    )
    s.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode through the compiled static-shape step (torch.compile, once per process and batch bucket: "
        "seconds to minutes); default --no-compile, eager (docs/benchmarks.md says why)",
    )
