"""Write a model in the official layout: config.json, model-0000k-of-0000n.safetensors, the index.

Everything is written into a temporary sibling directory that is renamed over the target at the
end, so a crash mid-save leaves the previous checkpoint (or nothing) and never half a checkpoint.
With `fp8=True` exactly the tensors the official checkpoint quantizes are stored as e4m3 with
float32 `weight_scale_inv` per block (`names.is_fp8_quantizable`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from ..kernels.fp8 import dequantize_blocks, quantize_blocks
from .load import INDEX_NAME, SCALE_SUFFIX
from .names import is_fp8_quantizable, iter_disk_tensors

MODEL_FILES = (".safetensors", INDEX_NAME, "config.json")
DEFAULT_BLOCK = (128, 128)


def save_model(model: nn.Module, out_dir: str | os.PathLike, fp8: bool = False, max_shard_bytes: int = 4 << 30) -> None:
    """Save `model` (a DeepSeekV3: `.config`, `.model.embed_tokens`, official state_dict names) to `out_dir`, atomically."""
    cfg = model.config
    block = cfg.fp8_block_size or DEFAULT_BLOCK
    config = cfg.to_dict()
    if fp8:
        # Keep what an FP8 model's own quantization_config says beyond these (e.g. V3.1's `scale_fmt`).
        config["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            **(cfg.quantization_config or {}),
            "weight_block_size": list(block),
        }
    else:
        config.pop("quantization_config", None)
    config["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # The router weight is float32 in memory; on disk it has the model's dtype, as in the official files.
    dtype = model.model.embed_tokens.weight.dtype
    state = {k: (t.to(dtype) if k.endswith(".mlp.gate.weight") else t) for k, t in state.items()}
    ue8m0 = config.get("quantization_config", {}).get("scale_fmt") == "ue8m0"
    tensors = disk_tensors(state, cfg.num_hidden_layers, fp8, block, ue8m0)
    write_checkpoint(out_dir, config, tensors, max_shard_bytes)


def disk_tensors(
    state: dict[str, torch.Tensor], num_layers: int, fp8: bool, block: tuple[int, int], ue8m0: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(official key, tensor) in the on-disk format: FP8-quantized (power-of-two scales with `ue8m0`) or dequantized.

    Weights already FP8 in memory are written with their own scales, as loaded.
    """
    disk = list(iter_disk_tensors(state, num_layers))
    scales = {k: t for k, t in disk if k.endswith(SCALE_SUFFIX)}
    for key, t in disk:
        if key.endswith(SCALE_SUFFIX):
            continue  # written next to its weight
        if t.dtype == torch.float8_e4m3fn:
            if fp8:
                yield key, t
                yield key + SCALE_SUFFIX, scales[key + SCALE_SUFFIX].float()
            else:
                yield key, dequantize_blocks(t, scales[key + SCALE_SUFFIX], block, torch.bfloat16)
        elif fp8 and is_fp8_quantizable(key):
            q, s = quantize_blocks(t, block, ue8m0)
            yield key, q
            yield key + SCALE_SUFFIX, s
        else:
            yield key, t


def write_checkpoint(
    out_dir: str | os.PathLike, config: dict, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> None:
    """Write shards of at most `max_shard_bytes` (one tensor may exceed it), the index and config, atomically."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        shard_keys: list[list[str]] = []
        total = 0
        current: dict[str, torch.Tensor] = {}
        current_bytes = 0

        def flush() -> None:
            nonlocal current, current_bytes
            if current:
                save_file(current, os.path.join(tmp, f"shard-{len(shard_keys)}.part"), metadata={"format": "pt"})
                shard_keys.append(list(current))
                current, current_bytes = {}, 0

        for key, t in tensors:
            nbytes = t.numel() * t.element_size()
            if current and current_bytes + nbytes > max_shard_bytes:
                flush()
            current[key] = t.detach().to("cpu").contiguous()
            current_bytes += nbytes
            total += nbytes
        flush()

        n = len(shard_keys)
        weight_map = {}
        for i, keys in enumerate(shard_keys):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(tmp, f"shard-{i}.part"), os.path.join(tmp, name))
            weight_map.update({k: name for k in keys})
        with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: str, out_dir: str) -> None:
    """Rename tmp over out_dir; files in an old out_dir that are not model files (tokenizer) carry over."""
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            src = os.path.join(out_dir, name)
            if os.path.isfile(src) and not name.endswith(MODEL_FILES) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy2(src, os.path.join(tmp, name))
        old = out_dir + f".old-{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    else:
        os.rename(tmp, out_dir)
