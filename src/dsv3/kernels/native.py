"""The CPU kernels of `cpu_kernels.c`: built with the system C compiler on first use, cached, called through ctypes.

Why a C file and not torch ops: a decode step multiplies a handful of activation rows by every weight
it touches, so its speed is the speed at which weights stream from memory. torch's bf16 path emulates
bf16 products on CPUs without BF16 instructions and its int8 path reads int8 weights slower than bf16
ones; these kernels widen each weight vector in registers and read it once (docs/benchmarks.md has the
measurements). They are plain C with AVX2/FMA intrinsics and OpenMP (the process's libgomp, the one
torch loaded), compiled in about two seconds, so no torch headers and no build step at install time.

`available()` says whether they can run here: an x86-64 CPU with AVX2 and FMA, a C compiler (`CC`, else
`cc`/`gcc`) that builds the file. Everything else (other CPUs, no compiler, a failed build) keeps
torch's own kernels, with one note on stderr when a build fails. The shared object is cached under
`$DSV3_CACHE` (default `~/.cache/dsv3`) by a hash of the source and flags, written atomically.

On CPUs with AVX-512 (F, BW, VL, DQ) the file is built with those flags too and its products run on 16-lane
registers, lane for lane the AVX2 arithmetic: the same bits, about half the instructions (the tests compare
the two builds). `DSV3_NATIVE_ISA=avx2` keeps the AVX2 build on such a CPU.

`DSV3_NATIVE_PROFILE=1` loads a build that times a decode step's phases (`profile()`; scripts/decode_profile.py
prints them): the same arithmetic, a clock read around each phase.

Every function here has a plain-torch reference in the tests; callers check `fits_*` first.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared", "-Werror=implicit-function-declaration")
ISA_FLAGS = {"avx2": (), "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")}
_TYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2, torch.float8_e4m3fn: 3}
_F32_HOLDING_BF16 = 4  # an output type: float32 storage of values rounded to bf16
_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
# cpu_kernels.c's PROF_* phases, in order (the last, PROF_STEPS, counts decode steps).
PROFILE_PHASES = ("q_in", "q_b", "attend", "o_proj", "routed", "shared", "dense", "layers", "head", "steps")


def cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3") / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - an old torch without the query: assume nothing
        return False
    return capability in ("AVX2", "AVX512", "AVX512_BF16", "AMX", "AVX10") or capability.startswith("AVX512")


def isa() -> str:
    """The instruction set the kernels are built for here: 'avx512' where the CPU has it, else 'avx2'."""
    if os.environ.get("DSV3_NATIVE_ISA", "").lower() == "avx2":
        return "avx2"
    try:
        capability = torch.backends.cpu.get_cpu_capability()  # "AVX512": F, BW, VL and DQ (torch's test)
    except Exception:  # noqa: BLE001 - an old torch without the query
        return "avx2"
    return "avx512" if capability.startswith(("AVX512", "AMX", "AVX10")) else "avx2"


def cpu_has_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); False where torch emulates it (AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # not measured elsewhere: leave torch's choice alone
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def build(out_dir: Path | None = None, target_isa: str | None = None, profile: bool = False) -> Path:
    """Compile cpu_kernels.c for `target_isa` (default `isa()`; with `profile`, the phase timers; if not cached)
    and return the shared object's path; RuntimeError on failure."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    flags = (*FLAGS, *ISA_FLAGS[target_isa or isa()], *(("-DDSV3_PROFILE",) if profile else ()))
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((cc, *flags)).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    target = out_dir / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip().splitlines()[:1]}")
        os.replace(tmp, target)  # atomic: a concurrent builder finds a whole file or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if os.environ.get("DSV3_NATIVE_KERNELS", "1") == "0" or not _cpu_supported():
        return None
    try:
        return load(build(profile=os.environ.get("DSV3_NATIVE_PROFILE", "0") == "1"))
    except (RuntimeError, OSError) as e:
        print(f"dsv3: note: native CPU kernels unavailable ({e}); using torch's", file=sys.stderr)
        return None


def load(path: Path) -> ctypes.CDLL:
    """The built library at `path` with its functions' argument types declared (`build()` makes one)."""
    lib = ctypes.CDLL(str(path))
    lib.dsv3_linear.argtypes = [_i64] * 4 + [_ptr, _int, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _i64, _ptr]
    lib.dsv3_linear.argtypes += [_ptr, _int, _i64, _i64, _int]
    lib.dsv3_matmul.argtypes = [_i64] * 4 + [_ptr, _int, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _int]
    lib.dsv3_matmul.argtypes += [_i64, _i64, _int]
    lib.dsv3_experts.argtypes = [_i64] * 4 + [_ptr, _ptr, _int, _ptr, _ptr, _int, _i64, _ptr, _ptr, _ptr, _i64]
    lib.dsv3_experts.argtypes += [_ptr, _ptr, _ptr, _int, _int]
    lib.dsv3_moe.argtypes = [_i64] * 5 + [_ptr, _int, _ptr, _ptr, _int, _int, _i64, _i64, _int, ctypes.c_float]
    lib.dsv3_moe.argtypes += [_ptr, _ptr, _int, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
    lib.dsv3_mla_attend.argtypes = [_i64] * 8 + [_ptr, _ptr, _int] + [_i64] * 6 + [_ptr, _int, _i64, _i64]
    lib.dsv3_mla_attend.argtypes += [_ptr, _ptr, _int, ctypes.c_float, _ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _int]
    lib.dsv3_prefill_attend.argtypes = [_i64] * 6 + [_ptr, _ptr, _int] + [_i64] * 6 + [_ptr] + [_i64] * 3
    lib.dsv3_prefill_attend.argtypes += [_ptr, _i64, _i64, ctypes.c_float, _ptr, _int]
    lib.dsv3_decode_layer.argtypes = [ctypes.POINTER(LayerWeights), _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr]
    lib.dsv3_decode_layer.argtypes += [_ptr, _i64, _ptr, _int]
    lib.dsv3_decode_pass.argtypes = [_i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr]
    lib.dsv3_decode_pass.argtypes += [_i64, _i64, _i64, _int]
    lib.dsv3_combine.argtypes = [_i64, _i64, _i64, _ptr, _int, _ptr, _ptr, _ptr, _int]
    lib.dsv3_rms_norm.argtypes = [_i64, _i64, _ptr, _int, _i64, _ptr, ctypes.c_float, _ptr, _i64]
    lib.dsv3_rope.argtypes = [_i64, _i64, _i64, _ptr, _int, _i64, _i64, _ptr, _ptr, _i64, _ptr, _i64]
    lib.dsv3_argmax_rows.argtypes = [_i64, _i64, _ptr, _i64, _ptr]
    lib.dsv3_decode_step.argtypes = [_i64, _ptr, _ptr, _i64, _i64, _ptr, _ptr, _i64, ctypes.POINTER(HeadWeights)]
    lib.dsv3_decode_step.argtypes += [_ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _int]
    lib.dsv3_decode_greedy.argtypes = [_i64, _ptr, _ptr, _i64, _ptr, _ptr, _i64, ctypes.POINTER(HeadWeights)]
    lib.dsv3_decode_greedy.argtypes += [_ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr]
    lib.dsv3_decode_greedy.argtypes += [_i64, _ptr, _ptr, _int]
    lib.dsv3_mtp_draft.argtypes = [ctypes.POINTER(LayerWeights), _ptr, ctypes.POINTER(MtpWeights), _i64, _i64, _ptr]
    lib.dsv3_mtp_draft.argtypes += [_ptr, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _int]
    lib.dsv3_speculative_step.argtypes = [_i64, _ptr, _ptr, ctypes.POINTER(HeadWeights), _ptr, _i64]
    lib.dsv3_speculative_step.argtypes += [ctypes.POINTER(LayerWeights), _ptr, ctypes.POINTER(MtpWeights), _i64, _i64]
    lib.dsv3_speculative_step.argtypes += [_i64, _ptr, _i64] + [_ptr] * 7 + [_ptr, _ptr, _i64, _ptr, _ptr]
    lib.dsv3_speculative_step.argtypes += [_i64, _i64, _i64, _int]
    lib.dsv3_dequantize_fp8.argtypes = [_i64, _i64, _i64, _ptr, _i64, _ptr, _i64, _i64, _i64, _int, _ptr, _i64, _int]
    lib.dsv3_gemm.argtypes = [_i64] * 3 + [_ptr, _int, _i64, _ptr, _int, _i64, _ptr, _i64, _int]
    lib.dsv3_dequantize_int8.argtypes = [_i64, _i64, _ptr, _i64, _ptr, _ptr, _int, _i64, _int]
    return lib


def available() -> bool:
    """True when the native kernels can run in this process (x86-64 with AVX2, a compiler, a good build)."""
    return _library() is not None


def profile() -> dict[str, float] | None:
    """Seconds spent in each decode-step phase since the last `reset_profile()` (`PROFILE_PHASES`; "steps" is a
    count), or None unless this process loaded the profiling build (`DSV3_NATIVE_PROFILE=1`)."""
    lib = _library()
    try:
        totals = (ctypes.c_double * len(PROFILE_PHASES)).in_dll(lib, "dsv3_profile") if lib is not None else None
    except ValueError:  # not a profiling build: the symbol is absent
        return None
    return None if totals is None else dict(zip(PROFILE_PHASES, totals))


def reset_profile() -> None:
    """Zero the profiling build's phase timers (nothing without one)."""
    lib = _library()
    try:
        ctypes.memset(ctypes.addressof(ctypes.c_double.in_dll(lib, "dsv3_profile")), 0, 8 * len(PROFILE_PHASES))
    except (ValueError, TypeError):
        pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"native {what} kernel failed (code {rc})")


def _inner_contiguous(*tensors: Tensor | None) -> bool:
    return all(t is None or (t.stride(-1) == 1 and t.device.type == "cpu") for t in tensors)


class Fp8Grid(ctypes.Structure):
    """`fp8_grid`: an FP8 weight's float32 block scales (`weight_scale_inv`, [out/b0, in/b1] or [E, ...])."""

    _fields_ = [("grid", _ptr), ("grid_rs", _i64), ("grid_es", _i64), ("rows_log2", _int), ("cols_log2", _int)]
    _fields_ += [("round", _int), ("act", _int)]

    @classmethod
    def of(cls, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype, gemm: str | None = None) -> Fp8Grid:
        """The grid of `scale_inv`. gemm None: values are dequantized to `dtype` (rounded to bf16 for bf16) before
        multiplying (fp8_compute 'dequant'); "e4m3" / "ue8m0": fp8_compute 'gemm' (`linear` quantizes the
        activations per token per column block as `fp8.act_quant`, with power-of-two scales for "ue8m0")."""
        es = scale_inv.shape[-2] * scale_inv.shape[-1] if scale_inv.dim() == 3 else 0
        b0, b1 = block
        act = {None: 0, "e4m3": 1, "ue8m0": 2}[gemm]
        grid = cls(
            scale_inv.data_ptr(), scale_inv.shape[-1], es, b0.bit_length() - 1, b1.bit_length() - 1,
            int(dtype == torch.bfloat16), act,
        )  # fmt: skip
        grid.scales = scale_inv  # the struct holds a raw pointer: keep the tensor alive as long as the grid
        return grid


def fits_fp8(weight: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> bool:
    """Whether FP8 `weight` ([N, K] or [E, N, K]) with `scale_inv` runs natively: contiguous CPU tensors, float32
    scales on the checkpoint's grid, blocks of powers of two with at least 2 rows and 16 columns (128x128 in
    every DeepSeek checkpoint)."""
    b0, b1 = block
    power_of_two = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731
    N, K = weight.shape[-2:]
    return (
        weight.dtype == torch.float8_e4m3fn
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and power_of_two(b0) and b0 >= 2 and power_of_two(b1) and b1 >= 16
        and scale_inv.dtype == torch.float32
        and scale_inv.is_contiguous()
        and scale_inv.shape == (*weight.shape[:-2], -(-N // b0), -(-K // b1))
    )  # fmt: skip


def fits_dequantize_fp8(weight: Tensor, scale_inv: Tensor) -> bool:
    """Whether `dequantize_fp8` takes these: a 2-D e4m3fn CPU weight with contiguous rows, 2-D float32 scales."""
    return (
        available()
        and weight.dtype == torch.float8_e4m3fn
        and weight.dim() == 2
        and weight.device.type == "cpu"
        and weight.stride(1) == 1
        and scale_inv.dtype == torch.float32
        and scale_inv.dim() == 2
        and scale_inv.device.type == "cpu"
        and scale_inv.stride(1) == 1
    )


def dequantize_fp8(
    weight: Tensor, scale_inv: Tensor, block: tuple[int, int], round_to_bf16: bool, rows: tuple[int, int] | None = None
) -> Tensor:
    """float32 [n1 - n0, K] holding `fp8.dequantize_blocks(weight, scale_inv, block, dtype)[n0:n1]` for dtype bf16
    (`round_to_bf16`) or fp32, value for value, in one pass (`dsv3_dequantize_fp8`; the torch version takes six).

    weight [N, K] e4m3fn, scale_inv [ceil(N/b0), ceil(K/b1)] float32 (`fits_dequantize_fp8`); rows = (n0, n1), a
    slice of the weight's rows (default: all of them)."""
    n0, n1 = rows if rows is not None else (0, weight.shape[0])
    K = weight.shape[1]
    out = torch.empty(max(0, n1 - n0), K, dtype=torch.float32)
    if n1 == n0 or K == 0:
        return out
    b0, b1 = block
    if not (0 <= n0 < n1 <= weight.shape[0]) or scale_inv.shape != (-(-weight.shape[0] // b0), -(-K // b1)):
        raise ValueError("dequantize_fp8: rows outside the weight, or scales not on its block grid")
    rc = _library().dsv3_dequantize_fp8(
        n1 - n0, K, n0, weight[n0].data_ptr(), weight.stride(0), scale_inv.data_ptr(), scale_inv.stride(0), b0, b1,
        int(round_to_bf16), out.data_ptr(), K, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "dequantize_fp8")
    return out


def fits_dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> bool:
    """Whether `dequantize_int8` takes these: 2-D int8 CPU rows, contiguous within a row, float32 scales [N], bf16 or
    fp32 output."""
    return (
        available()
        and q.dtype == torch.int8
        and q.dim() == 2
        and q.device.type == "cpu"
        and q.stride(1) == 1
        and scale.dtype == torch.float32
        and scale.shape == q.shape[:1]
        and scale.is_contiguous()
        and dtype in (torch.bfloat16, torch.float32)
    )


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`int8.dequantize_int8(q, scale, dtype)` value for value ((q * scale) in fp32, rounded once to `dtype`) in one
    pass (`dsv3_dequantize_int8`); q [N, K] int8, scale [N] float32 (`fits_dequantize_int8`)."""
    N, K = q.shape
    out = torch.empty(N, K, dtype=dtype)
    if N and K:
        rc = _library().dsv3_dequantize_int8(
            N, K, q.data_ptr(), q.stride(0), scale.data_ptr(), out.data_ptr(), _TYPE[dtype], K, torch.get_num_threads()
        )
        _check(rc, "dequantize_int8")
    return out


def fits_linear(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight)` runs natively: CPU tensors, bf16/fp32 input, bf16 or int8 weight."""
    return (
        x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype in (torch.bfloat16, torch.int8)
        and weight.dim() == 2
        and x.numel() > 0
        and _inner_contiguous(x, weight)
        and not torch.is_grad_enabled()
    )


def linear(
    x: Tensor, weight: Tensor, scale: Tensor | None = None, fp8: Fp8Grid | None = None, widen: bool = False
) -> Tensor:
    """x [..., K] @ (weight [N, K] (* scale [N] fp32 for int8, block scales `fp8` for FP8)).T -> [..., N] in x's dtype.

    widen: return float32 holding the result rounded to x's dtype (`linear(x, w).float()` in the same pass:
    the model's logits, without a second pass over a vocabulary-wide row).

    FP8 weights are dequantized value by value as `fp8.dequantize_blocks` does (rounded to bf16 when the grid
    says so), so the result is bit for bit that of the bf16 weight dequantized at load (`fits_fp8` first);
    with a 'gemm' grid (`Fp8Grid.of(..., gemm=...)`) x is quantized as `fp8.act_quant` and each column
    block's e4m3 products are summed, then scaled once: `fp8.linear_fp8(mode="gemm")` to fp32 round-off.
    """
    N, K = weight.shape
    if not x.is_contiguous():
        x = x.contiguous()
    if scale is not None and (scale.dtype != torch.float32 or not scale.is_contiguous()):
        scale = scale.float().contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32 if widen else x.dtype)
    ytype = _F32_HOLDING_BF16 if widen and x.dtype == torch.bfloat16 else _TYPE[y.dtype]
    # Called ~40 times per decode step: straight to the kernel, no views of the operands (each costs an op).
    rc = _library().dsv3_linear(
        1, x.numel() // K, N, K,
        x.data_ptr(), _TYPE[x.dtype], 0, K,
        weight.data_ptr(), _TYPE[weight.dtype], 0, weight.stride(0),
        None if scale is None else scale.data_ptr(), 0, None if fp8 is None else ctypes.byref(fp8),
        y.data_ptr(), ytype, 0, N,
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "linear")
    return y


def fits_gemm(x: Tensor, weight: Tensor) -> bool:
    """Whether `gemm(x, weight)` runs natively: CPU, bf16 or fp32 operands, unit stride in the last dim, no grad."""
    return (
        available()
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and _inner_contiguous(x, weight)
        and not torch.is_grad_enabled()
    )


def gemm(x: Tensor, weight: Tensor) -> Tensor:
    """x [..., K] @ weight [N, K].T computed and returned in fp32 (`F.linear(x.float(), weight.float())` to fp32
    round-off), for many rows: the operands are widened block by block inside (`dsv3_gemm`), never copied whole.
    Each output is one fp32 multiply-add chain over k in order, so the bits do not depend on threads or shape."""
    N, K = weight.shape
    rows = x.reshape(math.prod(x.shape[:-1]), K)  # (-1 is ambiguous when K == 0)
    y = torch.empty(rows.shape[0], N, dtype=torch.float32)
    rc = _library().dsv3_gemm(
        rows.shape[0], N, K, rows.data_ptr(), _TYPE[rows.dtype], rows.stride(0),
        weight.data_ptr(), _TYPE[weight.dtype], weight.stride(0), y.data_ptr(), N, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "gemm")
    return y.view(*x.shape[:-1], N)


def batched_linear(x: Tensor, weight: Tensor, out: Tensor, scale: Tensor | None = None) -> Tensor:
    """out[g] = x[g] @ weight[g].T (* scale[g]) for x [G, M, K], weight [G, N, K], out [G, M, N] (strided)."""
    G, M, K = x.shape
    N = weight.shape[1]
    if scale is not None and (scale.dtype != torch.float32 or scale.stride(-1) != 1):
        scale = scale.float().contiguous()
    rc = _library().dsv3_linear(
        G, M, N, K,
        x.data_ptr(), _TYPE[x.dtype], x.stride(0), x.stride(1),
        weight.data_ptr(), _TYPE[weight.dtype], weight.stride(0), weight.stride(1),
        None if scale is None else scale.data_ptr(), 0 if scale is None else scale.stride(0), None,
        out.data_ptr(), _TYPE[out.dtype], out.stride(0), out.stride(1),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "linear")
    return out


def batched_matmul(x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """out[g] = x[g] @ weight[g] for x [G, M, S], weight [G, S, C] (bf16/fp32), out [G, M, C] (strided)."""
    G, M, S = x.shape
    C = weight.shape[2]
    rc = _library().dsv3_matmul(
        G, M, S, C,
        x.data_ptr(), _TYPE[x.dtype], x.stride(0), x.stride(1),
        weight.data_ptr(), _TYPE[weight.dtype], weight.stride(0), weight.stride(1),
        out.data_ptr(), _TYPE[out.dtype], out.stride(0), out.stride(1),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "matmul")
    return out


def experts(
    x: Tensor,
    counts: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    gate_scale: Tensor | None = None,
    up_scale: Tensor | None = None,
    down_scale: Tensor | None = None,
    fp8: tuple[Fp8Grid, Fp8Grid, Fp8Grid] | None = None,
) -> Tensor:
    """Unweighted SwiGLU of rows sorted by expert (`Experts.compute`'s contract) -> [R, D] in x's dtype.

    gate/up [E, F, D] (views of one fused [E, 2F, D] tensor allowed: same expert stride), down [E, D, F];
    int8 weights take fp32 scales [E, F] / [E, D], FP8 weights the grids of gate, up and down.
    """
    R, D = x.shape
    E, F_ = gate.shape[0], gate.shape[1]
    x = x.contiguous()
    counts = counts.to(torch.int64).contiguous()
    scales = [None if s is None else s.float().contiguous() for s in (gate_scale, up_scale, down_scale)]
    y = torch.empty(R, D, dtype=x.dtype)
    rc = _library().dsv3_experts(
        R, D, F_, E, counts.data_ptr(),
        x.data_ptr(), _TYPE[x.dtype],
        gate.data_ptr(), up.data_ptr(), _TYPE[gate.dtype], gate.stride(0),
        *(None if s is None else s.data_ptr() for s in scales[:2]),
        down.data_ptr(), down.stride(0), None if scales[2] is None else scales[2].data_ptr(), _grids(fp8),
        y.data_ptr(), _TYPE[y.dtype], torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "experts")
    return y


def _grids(fp8: tuple[Fp8Grid, Fp8Grid, Fp8Grid] | None):
    return None if fp8 is None else ctypes.byref((Fp8Grid * 3)(*fp8))


ROUTING_METHODS = {"greedy": 0, "noaux_tc": 1, "group_limited_greedy": 2}
SCORING_FUNCS = {"sigmoid": 0, "softmax": 1}


def moe(
    x: Tensor,
    router_weight: Tensor,
    bias: Tensor | None,
    routing: dict,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    scales: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None),
    with_routing: bool = False,
    fp8: tuple[Fp8Grid, Fp8Grid, Fp8Grid] | None = None,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """The routed experts of a MoE layer for a few tokens in one call: `Router` + `Experts.forward` -> [T, D].

    `routing` holds the Router's rules: scoring_func, topk_method, n_group, topk_group, top_k,
    norm_topk_prob, scaling. router_weight [E, D] and bias [E] are float32; expert weights as `experts`.
    With `with_routing` also returns the chosen ids [T, K] (int64) and combine weights [T, K] (float32).
    """
    T, D = x.shape
    E, F_, K = gate.shape[0], gate.shape[1], routing["top_k"]
    x = x.contiguous()
    scales = [None if s is None else s.float().contiguous() for s in scales]
    y = torch.empty(T, D, dtype=x.dtype)
    idx = torch.empty(T, K, dtype=torch.int64) if with_routing else None
    weights = torch.empty(T, K, dtype=torch.float32) if with_routing else None
    rc = _library().dsv3_moe(
        T, D, F_, E, K, x.data_ptr(), _TYPE[x.dtype],
        router_weight.data_ptr(), None if bias is None else bias.data_ptr(),
        SCORING_FUNCS[routing["scoring_func"]], ROUTING_METHODS[routing["topk_method"]],
        routing["n_group"], routing["topk_group"], int(routing["norm_topk_prob"]), routing["scaling"],
        gate.data_ptr(), up.data_ptr(), _TYPE[gate.dtype], gate.stride(0),
        *(None if s is None else s.data_ptr() for s in scales[:2]),
        down.data_ptr(), down.stride(0), None if scales[2] is None else scales[2].data_ptr(), _grids(fp8),
        y.data_ptr(), None if idx is None else idx.data_ptr(), None if weights is None else weights.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise ValueError(f"native moe: routing rules it does not take: {routing}")
    _check(rc, "moe")
    return (y, idx, weights) if with_routing else y


def mla_attend(
    q_nope: Tensor,
    q_rope: Tensor,
    kv: Tensor,
    w_uk: Tensor,
    w_uv_t: Tensor,
    scale: float,
    mask: Tensor | None,
) -> Tensor:
    """MLA's absorbed attention in one call (`MLA._attend_absorbed`'s contract) -> [B, T, H, Dv] in q's dtype.

    q_nope [B, T, H, Dn], q_rope [B, T, H, Dr], kv [B, S, R+Dr] (the cache as stored, q's dtype), w_uk
    [H, Dn, R], w_uv_t [H, R, Dv] (contiguous); mask [B, T, S] bool, or None for causal (key j <= S-T+t).
    The keys are split into chunks across threads, each walked once with an online softmax in fp32 and
    merged per query row: the two-pass softmax's result to fp32 round-off, the cache read once.
    """
    B, T, H, Dn = q_nope.shape
    S, C = kv.shape[1], kv.shape[2]
    R, Dv = w_uk.shape[2], w_uv_t.shape[2]
    Dr = C - R
    out = torch.empty(B, T, H, Dv, dtype=q_nope.dtype)
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    rc = _library().dsv3_mla_attend(
        B, T, H, S, Dn, Dr, R, Dv,
        q_nope.data_ptr(), q_rope.data_ptr(), _TYPE[q_nope.dtype], *q_nope.stride()[:3], *q_rope.stride()[:3],
        kv.data_ptr(), _TYPE[kv.dtype], kv.stride(0), kv.stride(1),
        w_uk.data_ptr(), w_uv_t.data_ptr(), _TYPE[w_uk.dtype], scale,
        None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
        0 if mask is None else mask.stride(1),
        out.data_ptr(), *out.stride()[:3], torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "attention")
    return out


def fits_prefill_attend(q_nope: Tensor, q_rope: Tensor, kv: Tensor, k_rope: Tensor) -> bool:
    """Whether `prefill_attend` takes these operands: CPU, all bf16 or all fp32, unit stride in the last dim."""
    tensors = (q_nope, q_rope, kv, k_rope)
    return (
        available()
        and all(t.device.type == "cpu" and t.dtype == q_nope.dtype and t.stride(-1) == 1 for t in tensors)
        and q_nope.dtype in (torch.bfloat16, torch.float32)
    )


def prefill_attend(q_nope: Tensor, q_rope: Tensor, kv: Tensor, k_rope: Tensor, v_dim: int, scale: float) -> Tensor:
    """Causal attention of a fresh prompt over its own keys, fp32 inside (`dsv3_prefill_attend`) -> [B, T, H, Dv].

    q_nope [B, T, H, Dn], q_rope [B, T, H, Dr], kv [B, T, H, Dn + Dv] (per head: k_nope, then v), k_rope [B, T, Dr]
    (shared by the heads); query t sees keys 0..t. The result is rounded to the inputs' dtype once.
    """
    B, T, H, Dn = q_nope.shape
    Dr = q_rope.shape[-1]
    if q_rope.shape != (B, T, H, Dr) or kv.shape != (B, T, H, Dn + v_dim) or k_rope.shape != (B, T, Dr):
        raise ValueError("prefill_attend: q_nope [B,T,H,Dn], q_rope [B,T,H,Dr], kv [B,T,H,Dn+Dv], k_rope [B,T,Dr]")
    out = torch.empty(B, T, H, v_dim, dtype=q_nope.dtype)
    rc = _library().dsv3_prefill_attend(
        B, T, H, Dn, Dr, v_dim, q_nope.data_ptr(), q_rope.data_ptr(), _TYPE[q_nope.dtype], *q_nope.stride()[:3],
        *q_rope.stride()[:3], kv.data_ptr(), *kv.stride()[:3], k_rope.data_ptr(), *k_rope.stride()[:2], scale,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "prefill attention")
    return out


class Projection(ctypes.Structure):
    """`dsv3_proj`: a [rows, cols] weight (bf16, fp32, or int8 with a float32 scale per row); rows 0 = absent."""

    _fields_ = [("w", _ptr), ("scale", _ptr), ("rows", _i64), ("cols", _i64), ("type", _int), ("fp8", Fp8Grid)]

    @classmethod
    def of(cls, weight: Tensor | None, scale: Tensor | None = None, fp8: Fp8Grid | None = None) -> Projection:
        if weight is None:
            return cls()
        rows, cols = weight.shape
        scale_ptr = None if scale is None else scale.data_ptr()
        return cls(weight.data_ptr(), scale_ptr, rows, cols, _TYPE[weight.dtype], fp8 or Fp8Grid())


class LayerWeights(ctypes.Structure):
    """`dsv3_layer`: one decoder layer's shapes, weights (pointers) and routing rules, for `decode_layer`."""

    _fields_ = [
        *((name, _i64) for name in ("D", "H", "Dn", "Dr", "Dv", "R", "QR")),
        ("xtype", _int),
        *((name, ctypes.c_float) for name in ("eps_in", "eps_post", "eps_q", "eps_kv")),
        *((name, _ptr) for name in ("norm_in", "norm_post", "norm_q", "norm_kv")),
        *((name, Projection) for name in ("q_in", "kv_a", "q_b", "o_proj")),
        ("w_uk", _ptr), ("w_uv_t", _ptr), ("softmax_scale", ctypes.c_float),
        *((name, Projection) for name in ("mlp_gate", "mlp_up", "mlp_down")),
        ("E", _i64), ("K", _i64), ("F", _i64), ("router_w", _ptr), ("bias", _ptr),
        ("scoring", _int), ("method", _int), ("n_group", _i64), ("topk_group", _i64), ("norm_topk", _int),
        ("scaling", ctypes.c_float),
        ("gate", _ptr), ("up", _ptr), ("down", _ptr), ("etype", _int), ("gu_es", _i64), ("down_es", _i64),
        ("gate_scale", _ptr), ("up_scale", _ptr), ("down_scale", _ptr), ("expert_fp8", Fp8Grid * 3),
    ]  # fmt: skip


def fits_projection(weight: Tensor, scale: Tensor | None = None) -> bool:
    """Whether `Projection.of` takes this weight: 2-D contiguous CPU bf16/fp32, or int8 with a float32 scale."""
    if weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu":
        return False
    if weight.dtype == torch.int8:
        return scale is not None and scale.dtype == torch.float32 and scale.is_contiguous()
    return weight.dtype in (torch.bfloat16, torch.float32)


def decode_layer(
    layer: LayerWeights,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    store: Tensor,
    slot_offsets: Tensor,
    write_offsets: Tensor,
    read_len: int,
    mask: Tensor | None,
) -> Tensor:
    """One decoder layer for x [B, T, D] in one call (cpu_kernels.c `dsv3_decode_layer`) -> [B, T, D].

    store: the layer's latent cache [slots, positions, R+Dr] in x's dtype, contiguous; slot_offsets [B] and
    write_offsets [B*T] (-1: padding) are int64 element offsets into it; mask [B, T, read_len] bool or None.
    cos/sin: [B, T, Dr/2] float32 contiguous.
    """
    B, T, _ = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    rc = _library().dsv3_decode_layer(
        ctypes.byref(layer), B, T, x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        store.data_ptr(), slot_offsets.data_ptr(), write_offsets.data_ptr(), read_len,
        None if mask is None else mask.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "decoder layer")
    return out


class LayerStack:
    """Several layers' `LayerWeights` as `decode_pass` passes them to C (an array of pointers to them)."""

    def __init__(self, layers: Sequence[LayerWeights]) -> None:
        self.layers = list(layers)  # the arrays below point into these structs
        self.pointers = (ctypes.c_void_p * len(self.layers))(*(ctypes.addressof(w) for w in self.layers))


def decode_pass(
    stack: LayerStack,
    x: Tensor,
    rope_cos: Tensor,
    rope_sin: Tensor,
    stores: Sequence[int],
    slots: Tensor,
    starts: Tensor,
    n_new: Tensor,
    store_strides: tuple[int, int],
    read_len: int,
) -> Tensor:
    """`decode_layer` for each of the stack's layers in turn, in one call (`dsv3_decode_pass`) -> [B, T, D].

    Row b of x [B, T, D] appends its first n_new[b] tokens to cache slot slots[b] after starts[b] cached ones
    (int64 [B] each, contiguous); the kernel builds the rotary angles (rows starts[b] + t of the float32 tables
    rope_cos / rope_sin [L, Dr/2]), the write offsets and the mask from them, as `CacheBatch` does. stores: the
    data pointer of each layer's latent cache [slots, positions, R+Dr] (x's dtype, contiguous), whose slot and
    position strides are store_strides; read_len: the positions each row's attention spans.
    """
    if len(stores) != len(stack.layers):
        raise ValueError(f"{len(stack.layers)} layers but {len(stores)} cache stores")
    B, T, _ = x.shape
    x, slots, starts, n_new = x.contiguous(), slots.contiguous(), starts.contiguous(), n_new.contiguous()
    out = torch.empty_like(x)
    store_array = (ctypes.c_void_p * len(stack.layers))(*stores)  # per call: threads may share a stack
    rc = _library().dsv3_decode_pass(
        len(stack.layers), stack.pointers, store_array, B, T, x.data_ptr(), out.data_ptr(), rope_cos.data_ptr(),
        rope_sin.data_ptr(), rope_cos.shape[0], slots.data_ptr(), starts.data_ptr(), n_new.data_ptr(),
        store_strides[0], store_strides[1], read_len, torch.get_num_threads(),
    )  # fmt: skip
    if rc == 3:
        raise ValueError("native decode pass: a position is past the rotary tables")
    _check(rc, "decoder layers")
    return out


class HeadWeights(ctypes.Structure):
    """`dsv3_head`: the final RMSNorm's weight (activation type) and eps, and the vocabulary projection."""

    _fields_ = [("norm", _ptr), ("eps", ctypes.c_float), ("proj", Projection)]


def decode_step(
    stack: LayerStack,
    head: HeadWeights,
    ids: Sequence[int],
    embed: Tensor,
    rope_cos: Tensor,
    rope_sin: Tensor,
    stores: Sequence[int],
    slots: Sequence[int],
    lengths: Tensor,
    store_shape: tuple[int, int, int],
    tokens_per_row: int = 1,
    hidden: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """T = tokens_per_row tokens a row from ids to float32 logits [B, T, V] ([B, V] for T = 1) in one call
    (`dsv3_decode_step`), the cache advanced; with `hidden`, also the stack's output [B, T, D] (the final norm's
    input, in the embedding's dtype).

    Row b embeds ids[b*T:(b+1)*T] (rows of `embed` [V, D], the activations' dtype), appends them to cache slot
    slots[b] from position lengths[slots[b]] (lengths: the cache's int64 lengths [slots], contiguous, advanced by T in
    place on success), runs `decode_pass` over the stack, then the head. store_shape: (max positions, slot stride,
    position stride) of the layers' stores. OverflowError when a slot has no room, IndexError for an id outside the
    vocabulary or a slot outside the cache (nothing written then).
    """
    B, T = len(slots), tokens_per_row
    if len(ids) != B * T:
        raise ValueError(f"{len(ids)} ids for {B} rows of {T} tokens")
    V, D = head.proj.rows, embed.shape[1]
    ids_c, slots_c = (ctypes.c_int64 * (B * T))(*ids), (ctypes.c_int64 * B)(*slots)
    logits = torch.empty(B, T, V, dtype=torch.float32)
    states = torch.empty(B, T, D, dtype=embed.dtype) if hidden else None
    store_array = (ctypes.c_void_p * len(stack.layers))(*stores)
    max_len, slot_stride, pos_stride = store_shape
    rc = _library().dsv3_decode_step(
        len(stack.layers), stack.pointers, store_array, B, T, ids_c, embed.data_ptr(), embed.shape[0],
        ctypes.byref(head), logits.data_ptr(), None if states is None else states.data_ptr(), rope_cos.data_ptr(),
        rope_sin.data_ptr(), rope_cos.shape[0], slots_c, lengths.shape[0], lengths.data_ptr(), max_len, slot_stride,
        pos_stride, torch.get_num_threads(),
    )  # fmt: skip
    _check_step(rc, lengths, slots, T, max_len, embed.shape[0])
    logits = logits[:, 0] if T == 1 and not hidden else logits
    return (logits, states) if hidden else logits


def decode_greedy(
    stack: LayerStack,
    head: HeadWeights,
    ids: Sequence[int],
    embed: Tensor,
    rope_cos: Tensor,
    rope_sin: Tensor,
    stores: Sequence[int],
    slots: Sequence[int],
    lengths: Tensor,
    store_shape: tuple[int, int, int],
    limit: int,
    n_steps: int,
    stops: Sequence[int],
) -> list[list[int]]:
    """Up to n_steps greedy tokens for each row in one call (`dsv3_decode_greedy`): `decode_step` over the running
    rows, each row's argmax over ids < limit fed next, a row stopping after an id in `stops` or at n_steps tokens.
    Row b starts from ids[b] in slot slots[b] (arguments as `decode_step`'s). Errors as `decode_step`'s, at the
    step that met them (the cache has advanced by the steps before it)."""
    B = len(slots)
    if len(ids) != B:
        raise ValueError(f"{len(ids)} ids for {B} rows")
    out = (ctypes.c_int64 * (B * max(n_steps, 1)))()
    counts = (ctypes.c_int64 * B)()
    store_array = (ctypes.c_void_p * len(stack.layers))(*stores)
    max_len, slot_stride, pos_stride = store_shape
    rc = _library().dsv3_decode_greedy(
        len(stack.layers), stack.pointers, store_array, B, (ctypes.c_int64 * B)(*ids), embed.data_ptr(),
        embed.shape[0], ctypes.byref(head), rope_cos.data_ptr(), rope_sin.data_ptr(), rope_cos.shape[0],
        (ctypes.c_int64 * B)(*slots), lengths.shape[0], lengths.data_ptr(), max_len, slot_stride, pos_stride, limit,
        n_steps, (ctypes.c_int64 * len(stops))(*stops), len(stops), out, counts, torch.get_num_threads(),
    )  # fmt: skip
    _check_step(rc, lengths, slots, 1, max_len, embed.shape[0])
    return [out[b * n_steps : b * n_steps + counts[b]] for b in range(B)]


def _check_step(rc: int, lengths: Tensor, slots: Sequence[int], n_new: int, max_len: int, vocab: int) -> None:
    if rc == 4:
        longest = max(int(lengths[s]) for s in slots) + n_new
        raise OverflowError(f"sequence of {longest} tokens exceeds the cache length {max_len}")
    if rc == 5:
        raise IndexError(f"token id out of range: ids must be in [0, {vocab})")
    if rc == 6:
        raise IndexError(f"cache slot out of range: slots must be in [0, {lengths.shape[0]})")
    if rc == 7:
        raise ValueError("a row's count of new positions is outside [1, tokens per row]")
    _check(rc, "decode step")


class MtpWeights(ctypes.Structure):
    """`dsv3_mtp`: an MTP module's embedding, enorm and hnorm weights (activation type) and eps, eh_proj, and its
    head (shared_head.norm and shared_head.head)."""

    _fields_ = [
        ("embed", _ptr), ("enorm", _ptr), ("hnorm", _ptr), ("eps_e", ctypes.c_float), ("eps_h", ctypes.c_float),
        ("eh", Projection), ("head", HeadWeights),
    ]  # fmt: skip


def mtp_draft(
    layer: LayerWeights,
    mtp: MtpWeights,
    ids: Tensor,
    n_new: Sequence[int],
    hidden: Tensor,
    vocab: int,
    rope_cos: Tensor,
    rope_sin: Tensor,
    store: int,
    slots: Sequence[int],
    lengths: Tensor,
    store_shape: tuple[int, int, int],
) -> Tensor:
    """An MTP module's draft logits, float32 [B, V], in one call (`dsv3_mtp_draft`): row b feeds its first n_new[b]
    positions (hidden [B, T, D] main-model states, ids [B, T] int64 of the tokens after them; the rest is right
    padding) to the module at positions lengths[slots[b]] + t of its cache (`store`: the data pointer of its latent
    cache [slots, positions, R+Dr], store_shape as `decode_step`'s) and gets the logits of its last one. The module's
    cache lengths advance by n_new[b]; errors as `decode_step`'s."""
    B, T, D = hidden.shape
    if ids.shape != (B, T) or ids.dtype != torch.int64 or len(n_new) != B or len(slots) != B:
        raise ValueError("mtp_draft: ids [B, T] int64, n_new and slots [B] for hidden [B, T, D]")
    ids, hidden = ids.contiguous(), hidden.contiguous()
    counts, slots_c = (ctypes.c_int64 * B)(*n_new), (ctypes.c_int64 * B)(*slots)
    logits = torch.empty(B, mtp.head.proj.rows, dtype=torch.float32)
    max_len, slot_stride, pos_stride = store_shape
    rc = _library().dsv3_mtp_draft(
        ctypes.byref(layer), store, ctypes.byref(mtp), B, T, ids.data_ptr(), counts, hidden.data_ptr(), vocab,
        logits.data_ptr(), rope_cos.data_ptr(), rope_sin.data_ptr(), rope_cos.shape[0], slots_c, lengths.shape[0],
        lengths.data_ptr(), max_len, slot_stride, pos_stride, torch.get_num_threads(),
    )  # fmt: skip
    _check_step(rc, lengths, slots, max(n_new), max_len, vocab)
    return logits


def speculative_step(
    stack: LayerStack,
    head: HeadWeights,
    embed: Tensor,
    stores: Sequence[int],
    mtp_layer: LayerWeights,
    mtp: MtpWeights,
    mtp_vocab: int,
    mtp_store: int,
    limit: int,
    slots: Sequence[int],
    last: Sequence[int],
    pending: Sequence[Sequence[int]],
    pending_hidden: Tensor,
    rope_cos: Tensor,
    rope_sin: Tensor,
    lengths: Tensor,
    mtp_lengths: Tensor,
    store_shape: tuple[int, int, int],
) -> tuple[list[list[int]], Tensor]:
    """One greedy speculative step in one call (`dsv3_speculative_step`): each row's 1 or 2 new tokens, and the main
    stack's hidden states at the two verified positions [B, 2, D] (the next step's MTP inputs).

    Row b drafts from its pending MTP positions (the ids pending[b], 1 or 2 of them, beside the hidden states
    pending_hidden[b, :len(pending[b])], [B, 2, D]) at the end of its MTP cache (`mtp_store`, `mtp_lengths`), and the
    main model verifies [last[b], draft] at the end of its cache (`stores`, `lengths`); argmaxes over the first
    `limit` ids. Both caches advance (the main one by 1 when the draft is rejected); errors as `decode_step`'s, with
    nothing written.
    """
    B = len(slots)
    if len(last) != B or len(pending) != B or pending_hidden.shape[:2] != (B, 2):
        raise ValueError("speculative_step: one slot, last token and 1-2 pending ids a row, pending_hidden [B, 2, D]")
    i64 = ctypes.c_int64
    slots_c, last_c = (i64 * B)(*slots), (i64 * B)(*last)
    ids_c = (i64 * (2 * B))(*[t for p in pending for t in (p[0], p[-1] if len(p) > 1 else 0)])
    n_c = (i64 * B)(*[len(p) for p in pending])
    tokens, counts = (i64 * (2 * B))(), (i64 * B)()
    hidden = torch.empty(B, 2, pending_hidden.shape[2], dtype=pending_hidden.dtype)
    pending_hidden = pending_hidden.contiguous()
    store_array = (ctypes.c_void_p * len(stack.layers))(*stores)
    max_len, slot_stride, pos_stride = store_shape
    rc = _library().dsv3_speculative_step(
        len(stack.layers), stack.pointers, store_array, ctypes.byref(head), embed.data_ptr(), embed.shape[0],
        ctypes.byref(mtp_layer), mtp_store, ctypes.byref(mtp), mtp_vocab, limit, B, slots_c, lengths.shape[0], last_c,
        ids_c, n_c, pending_hidden.data_ptr(), tokens, counts, hidden.data_ptr(), rope_cos.data_ptr(),
        rope_sin.data_ptr(), rope_cos.shape[0], lengths.data_ptr(), mtp_lengths.data_ptr(), max_len, slot_stride,
        pos_stride, torch.get_num_threads(),
    )  # fmt: skip
    if rc == 2:
        raise ValueError(f"speculative_step: limit {limit} outside [1, vocabulary]")
    _check_step(rc, lengths, slots, 2, max_len, embed.shape[0])
    return [list(tokens[2 * b : 2 * b + counts[b]]) for b in range(B)], hidden


def combine(h: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    """`moe.combine` in one pass: h [N, D] (rows sorted by expert, row n = assignment order[n]), weights [T, K]
    float32 -> [T, D] in h's dtype, with the torch ops' roundings."""
    T, K = weights.shape
    D = h.shape[1]
    h, order, weights = h.contiguous(), order.contiguous(), weights.contiguous()
    y = torch.empty(T, D, dtype=h.dtype)
    rc = _library().dsv3_combine(
        T, K, D, h.data_ptr(), _TYPE[h.dtype], order.data_ptr(), weights.data_ptr(), y.data_ptr(), torch.get_num_threads()
    )  # fmt: skip
    if rc == 2:
        raise ValueError("native combine: order is not a permutation of the T*K assignments (or K > 64)")
    _check(rc, "combine")
    return y


def fits_combine(h: Tensor, order: Tensor, weights: Tensor) -> bool:
    """Whether `combine` takes these: bf16 / fp32 rows on CPU, int64 order, float32 weights, no autograd."""
    return (
        not torch.compiler.is_compiling()  # a ctypes call is no graph op
        and available()
        and h.dim() == 2
        and weights.dim() == 2
        and h.dtype in (torch.float32, torch.bfloat16)
        and order.dtype == torch.int64
        and weights.dtype == torch.float32
        and all(t.device.type == "cpu" for t in (h, order, weights))
        and h.shape[0] == order.numel() == weights.numel()
        and weights.shape[-1] <= 64
        and not torch.is_grad_enabled()
    )


def argmax_rows(x: Tensor) -> list[int]:
    """`x.argmax(dim=-1).tolist()` for float32 rows [R, V] on CPU (the first NaN, else the first maximum), without
    torch's index-tracking reduction (~0.3 ms for a 129,280-id row; this is one vectorised pass and a scan)."""
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(-1) != 1 or x.shape[1] == 0:
        raise ValueError("argmax_rows takes non-empty float32 CPU rows [R, V] with contiguous rows")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _check(_library().dsv3_argmax_rows(x.shape[0], x.shape[1], x.data_ptr(), x.stride(0), out.data_ptr()), "argmax")
    return out.tolist()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`RMSNorm.forward` for a few rows: normalise in fp32, round to x's dtype, times weight (x's dtype), round."""
    D = x.shape[-1]
    if not x.is_contiguous():
        x = x.contiguous()
    y = torch.empty_like(x)
    rc = _library().dsv3_rms_norm(
        x.numel() // D, D, x.data_ptr(), _TYPE[x.dtype], D, weight.data_ptr(), eps, y.data_ptr(), D
    )
    _check(rc, "rms_norm")
    return y


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`rope.apply_rope` for x [B, T, H, d] or [B, T, d] with float32 cos/sin [B, T, d/2]; a new contiguous tensor."""
    B, T = x.shape[0], x.shape[1]
    heads = x.shape[2] if x.dim() == 4 else 1
    d = x.shape[-1]
    cos, sin = cos.contiguous(), sin.contiguous()
    x_rs = x.stride(1)
    if x.stride(0) != T * x_rs:  # the (B, T) rows must be evenly spaced: one row stride for both
        x = x.contiguous()
        x_rs = x.stride(1)
    y = torch.empty(x.shape, dtype=x.dtype)
    x_hs = x.stride(2) if x.dim() == 4 else 0
    rc = _library().dsv3_rope(
        B * T, heads, d // 2, x.data_ptr(), _TYPE[x.dtype], x_rs, x_hs, cos.data_ptr(), sin.data_ptr(), d // 2,
        y.data_ptr(), heads * d,
    )  # fmt: skip
    _check(rc, "rope")
    return y


def fits_elementwise(x: Tensor, *others: Tensor) -> bool:
    """Whether rms_norm / rope take x (bf16 or fp32 on CPU, last dim contiguous) with `others` of the types they need."""
    return (
        x.dtype in (torch.float32, torch.bfloat16)
        and x.device.type == "cpu"
        and x.stride(-1) == 1
        and all(o.device.type == "cpu" for o in others)
        and not torch.is_grad_enabled()
    )
