"""`dsv3 convert IN OUT --to bf16|fp8`: checkpoint conversion, one shard at a time.

The official layout in, the official layout out (SPEC section 4), never the whole model in memory:

1. a header pass reads only the safetensors headers of every shard and checks the whole checkpoint
   (every FP8 weight has a float `weight_scale_inv` of the right shape, every scale has an FP8 weight,
   FP8 tensors only where config.json says fp8) before anything is written: a bad checkpoint fails in
   seconds, naming the tensor, instead of after converting half of it;
2. then input shard k (mmap'ed) becomes output shard k: its tensors are converted one by one and the
   shard is written, so peak memory is about one output shard. An FP8 weight's scale may sit in
   another shard; the index says which, and only that tensor is read from it;
3. all of it goes into a temporary sibling directory renamed to OUT at the end (a crash leaves no
   half checkpoint); an existing OUT is replaced only with `force`.

What changes: `--to bf16` dequantizes every weight that has a `weight_scale_inv` (whatever its name)
to bfloat16 (fp8 * scale in float32, rounded once: exactly what the loader gives) and casts the other
floating tensors to bf16, except `e_score_correction_bias`, which stays float32 as in the official
release (it decides near-ties between experts). `--to fp8` quantizes the tensors the official FP8
release stores in FP8 (`names.is_fp8_quantizable`) into 128x128 blocks (or `block_size`) and leaves
every other tensor, and FP8 weights already there, bit for bit as they are. The block size is the
config's `weight_block_size`, never guessed from shapes. config.json gains or loses its
`quantization_config`; the tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..kernels.fp8 import FP8_DTYPE, dequantize_blocks, quantize_blocks
from .load import INDEX_NAME, SCALE_SUFFIX, _open, checkpoint_files
from .names import is_fp8_quantizable

TARGETS = ("bf16", "fp8")
DEFAULT_BLOCK = (128, 128)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tiktoken.model",  # Kimi-K2, Moonlight
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)
_FP8_CODE = "F8_E4M3"  # safetensors' name for float8_e4m3fn
_FLOAT_CODES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_CODE_BYTES = {**_FLOAT_CODES, _FP8_CODE: 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
KEEP_FP32 = ("e_score_correction_bias",)  # high-precision tensors that stay float32 in a bf16 checkpoint


@dataclass
class _Header:
    shard: str  # file path
    code: str  # safetensors dtype code, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _CODE_BYTES.get(self.code, 1)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    force: bool = False,
    block_size: tuple[int, int] | None = None,
    progress: bool | None = None,
) -> dict[str, int]:
    """Convert checkpoint `src` into `dst` as "bf16" or "fp8", shard by shard (see module doc); returns counts.

    `block_size` (fp8 only) defaults to the source's `weight_block_size`, else 128x128. `progress`:
    a tqdm bar on stderr (None: only when stderr is a terminal).
    """
    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if to not in TARGETS:
        raise CheckpointError(f"unknown conversion target {to!r}; valid: {', '.join(TARGETS)}")
    files = checkpoint_files(src)  # also: src exists, index valid, shards present
    config = _read_config(src)
    src_block = _source_block(src)
    if to == "fp8":
        block = tuple(block_size) if block_size else (src_block or DEFAULT_BLOCK)
        if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise CheckpointError(f"block size must be two positive integers, got {block_size!r}")
        if src_block and block != src_block:
            raise CheckpointError(
                f"{src} is FP8 with {src_block[0]}x{src_block[1]} blocks; re-blocking to {block[0]}x{block[1]} "
                "would quantize twice (convert to bf16 first)"
            )
    else:
        if block_size:
            raise CheckpointError("a block size applies to --to fp8 only")
        block = None
    _refuse_overlap(src, dst)
    if os.path.exists(dst):
        if not force and not (os.path.isdir(dst) and not os.listdir(dst)):  # an empty directory is fine
            raise CheckpointError(f"{dst} exists (use --force to replace it)")

    headers = _read_headers(files)
    _check(headers, src_block, src)

    shards = sorted({h.shard for h in headers.values()})
    by_shard: dict[str, list[str]] = {s: [] for s in shards}
    for key in sorted(headers):
        by_shard[headers[key].shard].append(key)
    counts = {"tensors": 0, "quantized": 0, "dequantized": 0, "shards": len(shards), "bytes_in": 0, "bytes_out": 0}

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from tqdm import tqdm

    bar = tqdm(
        total=sum(h.nbytes for h in headers.values()),
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        desc=f"convert to {to}",
        disable=None if progress is None else not progress,
    )
    try:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            bar.set_postfix_str(os.path.basename(shard))
            out = _convert_shard(by_shard[shard], headers, to, src_block, block, counts, bar)
            save_file(out, os.path.join(tmp, name), metadata={"format": "pt"})
            counts["bytes_out"] += sum(t.numel() * t.element_size() for t in out.values())
            weight_map.update({k: name for k in out})
            del out  # the shard's tensors go before the next shard is read
        with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": counts["bytes_out"]}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_converted_config(config, to, block), f, indent=2, sort_keys=True)
            f.write("\n")
        for fname in sorted(os.listdir(src)):
            if fname in TOKENIZER_FILES or fname.endswith(".jinja"):
                shutil.copy2(os.path.join(src, fname), os.path.join(tmp, fname))
        _replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    counts["bytes_in"] = sum(h.nbytes for h in headers.values())
    return counts


# ---------------------------------------------------------------------------------------------- checks
def _refuse_overlap(src: str, dst: str) -> None:
    """Raise CheckpointError when OUT is IN, inside IN, or holds IN (symlinks resolved).

    Replacing OUT (--force) removes it whole: an OUT that contains IN would take the input, and every
    unrelated file beside it, with it; an OUT inside IN would be written into the checkpoint being read.
    """
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if real_src == real_dst:
        raise CheckpointError(f"output {dst} is the input checkpoint; write somewhere else")
    if os.path.commonpath([real_src, real_dst]) == real_src:
        raise CheckpointError(f"output {dst} is inside the input checkpoint {src}; write somewhere else")
    if os.path.commonpath([real_src, real_dst]) == real_dst:
        raise CheckpointError(
            f"output {dst} contains the input checkpoint {src} (replacing it would delete the input); "
            "write somewhere else"
        )


def _read_config(src: str) -> dict:
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{src} has no config.json: not a checkpoint directory")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config must be a JSON object")
    return config


def _source_block(src: str) -> tuple[int, int] | None:
    """The source's `weight_block_size` when config.json says fp8 (validated: fmt, method, sizes), else None."""
    try:
        return ModelConfig.from_pretrained(os.path.join(src, "config.json")).fp8_block_size
    except ConfigError as e:
        raise CheckpointError(f"{src}: {e}") from None


def _read_headers(files: dict[str, str]) -> dict[str, _Header]:
    """dtype and shape of every tensor, from the shard headers only (no tensor data is read)."""
    by_shard: dict[str, list[str]] = {}
    for key, shard in files.items():
        by_shard.setdefault(shard, []).append(key)
    headers: dict[str, _Header] = {}
    for shard in sorted(by_shard):
        with _open(shard) as f:
            present = set(f.keys())
            for key in by_shard[shard]:
                if key not in present:
                    raise CheckpointError(f"{key} is listed in {INDEX_NAME} but not in {os.path.basename(shard)}")
                sl = f.get_slice(key)
                headers[key] = _Header(shard, sl.get_dtype(), tuple(sl.get_shape()))
    return headers


def _scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def _check(headers: dict[str, _Header], block: tuple[int, int] | None, src: str) -> None:
    """Raise CheckpointError naming the first tensor that breaks the FP8 format (see module doc)."""
    for key in sorted(headers):
        h = headers[key]
        if key.endswith(SCALE_SUFFIX):
            weight = key[: -len(SCALE_SUFFIX)]
            if weight not in headers:
                raise CheckpointError(f"{key} has no weight {weight} beside it")
            if headers[weight].code != _FP8_CODE:
                raise CheckpointError(
                    f"{weight} has a weight_scale_inv but is stored as {headers[weight].code}, not {_FP8_CODE}"
                )
            continue
        if h.code == "F8_E5M2":
            raise CheckpointError(f"{key} is float8_e5m2; only e4m3 (float8_e4m3fn) FP8 checkpoints are supported")
        if h.code != _FP8_CODE:
            continue
        if block is None:
            raise CheckpointError(f"{key} is {_FP8_CODE} but {src}/config.json has no fp8 quantization_config")
        scale_key = key + SCALE_SUFFIX
        if scale_key not in headers:
            raise CheckpointError(f"FP8 tensor {key} has no {scale_key}")
        scale = headers[scale_key]
        if len(h.shape) < 2:
            raise CheckpointError(f"FP8 tensor {key} has shape {list(h.shape)}; block scales need 2 dims [out, in]")
        want = _scale_grid(h.shape, block)
        if scale.shape != want:
            raise CheckpointError(
                f"{scale_key} has shape {list(scale.shape)}; {key} {list(h.shape)} with {block[0]}x{block[1]} "
                f"blocks needs {list(want)}"
            )
        if scale.code not in _FLOAT_CODES:
            raise CheckpointError(f"{scale_key} is {scale.code}, expected a float (F32) scale")


# ---------------------------------------------------------------------------------------------- conversion
def _convert_shard(keys, headers, to, src_block, block, counts, bar) -> dict[str, torch.Tensor]:
    """The output tensors of one input shard; scales living in other shards are read from there."""
    handles: dict[str, object] = {}

    def read(key: str) -> torch.Tensor:
        shard = headers[key].shard
        if shard not in handles:
            handles[shard] = _open(shard)
        return handles[shard].get_tensor(key)

    out: dict[str, torch.Tensor] = {}
    for key in keys:
        h = headers[key]
        bar.update(h.nbytes)
        counts["tensors"] += 1
        if key.endswith(SCALE_SUFFIX):
            if to == "fp8":
                out[key] = read(key)  # kept with its FP8 weight, as stored
            continue  # bf16: consumed by its weight, wherever that weight lives
        t = read(key)
        if to == "bf16":
            if t.dtype == FP8_DTYPE:
                t = dequantize_blocks(t, read(key + SCALE_SUFFIX), src_block, torch.bfloat16)
                counts["dequantized"] += 1
            elif t.is_floating_point():
                t = t.float() if key.endswith(KEEP_FP32) else t.to(torch.bfloat16)
            out[key] = t
        elif t.dtype != FP8_DTYPE and is_fp8_quantizable(key):
            if t.dim() != 2 or not t.is_floating_point():
                raise CheckpointError(f"{key} is {t.dtype} {list(t.shape)}; only 2-D float weights can be quantized")
            out[key], out[key + SCALE_SUFFIX] = quantize_blocks(t, block)
            counts["quantized"] += 1
        else:
            out[key] = t  # FP8 already (its scale comes with it) or a high-precision tensor: as is
    handles.clear()
    return {k: v.contiguous() for k, v in out.items()}


def _converted_config(config: dict, to: str, block: tuple[int, int] | None) -> dict:
    config = dict(config)
    if to == "fp8":
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            **(config.get("quantization_config") or {}),
            "weight_block_size": list(block),
        }
    else:
        config.pop("quantization_config", None)
        config["torch_dtype"] = "bfloat16"
    return config


def _replace(tmp: str, dst: str) -> None:
    """Rename the finished tmp directory to dst; an old dst (allowed by --force) is removed only afterwards."""
    if not os.path.exists(dst):
        os.rename(tmp, dst)
        return
    old = f"{dst}.old-{os.getpid()}"
    os.rename(dst, old)
    os.rename(tmp, dst)
    if os.path.isdir(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


# ---------------------------------------------------------------------------------------------- command line
def cmd_convert(args: argparse.Namespace) -> int:
    counts = convert_checkpoint(
        args.input,
        args.output,
        args.to,
        force=args.force,
        block_size=tuple(args.block_size) if args.block_size else None,
    )
    print(
        f"wrote {args.output} ({args.to}): {counts['tensors']} tensors in {counts['shards']} shards, "
        f"{counts['quantized']} quantized, {counts['dequantized']} dequantized, "
        f"{counts['bytes_in'] / 1e9:.2f} GB -> {counts['bytes_out'] / 1e9:.2f} GB"
    )
    return 0


def add_commands(subparsers) -> None:
    """Register `dsv3 convert IN OUT --to bf16|fp8 [--force] [--block-size B0 B1]`."""
    s = subparsers.add_parser("convert", help="convert a checkpoint between bf16 and FP8, shard by shard")
    s.add_argument("input", metavar="IN", help="checkpoint directory (official layout)")
    s.add_argument("output", metavar="OUT", help="new checkpoint directory")
    s.add_argument("--to", required=True, choices=TARGETS, help="bf16: dequantize; fp8: 128x128 block-quantize")
    s.add_argument("--force", action="store_true", help="replace an existing OUT")
    s.add_argument(
        "--block-size",
        type=int,
        nargs=2,
        metavar=("B0", "B1"),
        default=None,
        help="fp8 block size for a bf16 input (default 128 128; an FP8 input keeps its own)",
    )
    s.set_defaults(fn=cmd_convert)
