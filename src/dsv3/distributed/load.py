"""Sharded loading: each rank reads only its own slices of the official safetensors shards.

The model is built on `meta`, given its TP / EP structure there (`apply_tp` / `apply_ep` on meta
only record shapes and each module's `Shard`), and then filled with `load_state_dict(assign=True)`
from slices read with `safe_open(...).get_slice(key)[rows]`: a full tensor is never materialised
and cut, so a rank's peak memory is about its share of the weights (model bytes / world size under
T = E = N, plus the replicated latent projections, norms and routers).

Which slice a tensor needs comes from the module that will hold it: `Shard(dim, start, stop, full)`
on split Linears / embeddings (rows or columns), and on ExpertLinear (dim 0 = the expert axis, so
an expert whose row is outside [start, stop) is not read at all).

FP8 weights (a `weight_scale_inv` beside them, 128x128 blocks): kept in FP8 (`fp8=True`) the shard
must start on a block boundary (checked by `apply_tp`, ConfigError otherwise) and the scale grid is
sliced to the same blocks; dequantized (the default), any split works: the rows (columns) of
the scale grid covering the shard are read, the shard is padded at the front to the block
boundary, dequantized with `dequantize_blocks` and cropped.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed import ProcessGroup

from ..checkpoint.load import SCALE_SUFFIX, _fp8_layout, _materialize_meta_buffers, check_complete, plan_load
from ..checkpoint.names import disk_to_memory
from ..errors import CheckpointError
from ..kernels.fp8 import dequantize_blocks
from ..model.transformer import DeepSeekV3
from .comm import CommStats
from .expert_parallel import apply_ep
from .tensor_parallel import Shard, apply_tp

_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}


def local_shards(model: nn.Module) -> dict[str, Shard]:
    """{state-dict name: Shard} for every tensor of `model` that holds a slice of its checkpoint tensor."""
    out = {}
    for mname, module in model.named_modules():
        shard = getattr(module, "shard", None)
        if shard is None:
            continue
        for pname in ("weight", "weight_scale_inv"):
            if pname in module._parameters:
                out[f"{mname}.{pname}"] = shard
    return out


def load_sharded(
    path: str | os.PathLike,
    tp_group: ProcessGroup | None = None,
    ep_group: ProcessGroup | None = None,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    mtp: bool | None = None,
    ep_combine: str | None = None,
    stats: CommStats | None = None,
) -> tuple[DeepSeekV3, CommStats]:
    """This rank's part of the checkpoint at `path`, TP-split over `tp_group` and EP-split over `ep_group`.

    Arguments as `DeepSeekV3.from_pretrained` (dtype, fp8 kept or dequantized, mtp), plus the groups
    (None = not split that way) and the expert combine (`apply_ep`). Returns (model, byte ledger).
    """
    plan = plan_load(path, fp8, mtp)
    path, cfg, files, scaled, block = plan.path, plan.cfg, plan.files, plan.scaled, plan.block
    want_mtp, keep_fp8, model_cfg = plan.want_mtp, plan.keep_fp8, plan.model_cfg
    L = cfg.num_hidden_layers

    with torch.device("meta"):
        model = DeepSeekV3(model_cfg)
    if keep_fp8:
        _fp8_layout(model, scaled, block, L)
    stats = apply_tp(model, tp_group, stats)
    stats = apply_ep(model, ep_group, combine=ep_combine, stats=stats)
    expected = model.state_dict()
    shards = local_shards(model)
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()

    state: dict[str, torch.Tensor] = {}
    filled_rows: dict[str, set[int]] = {}
    by_file: dict[str, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file in sorted(by_file):
        # One shard file open at a time; nothing read keeps a view of it (`_read` copies), so its
        # mapped pages leave this rank's memory when the handle goes.
        handle = _open(file)
        for key in sorted(by_file[file]):
            name, row = disk_to_memory(key, L)
            if name.startswith("mtp.") and not want_mtp:
                continue
            if key.endswith(SCALE_SUFFIX) and not keep_fp8:
                if key[: -len(SCALE_SUFFIX)] not in files:
                    raise CheckpointError(f"{key} has no weight {key[: -len(SCALE_SUFFIX)]} beside it")
                continue  # read with its weight, for the rows that weight needs
            if name not in expected or name in tied:
                raise CheckpointError(f"unexpected tensor {key} in {os.path.basename(file)}")
            target, shard = expected[name], shards.get(name)
            if row is not None:  # one expert of a stacked tensor: whole, on the rank that holds it
                lo, hi = (shard.start, shard.stop) if shard is not None else (0, target.shape[0])
                total = shard.full if shard is not None else target.shape[0]
                if not 0 <= row < total:
                    raise CheckpointError(f"unexpected tensor {key}: expert {row} of {total}")
                want = tuple(target.shape[1:])
                if not lo <= row < hi:
                    _check_shape(handle, key, want)
                    continue
                tensor = _read(handle, key, None, want, keep_fp8, dtype, block, files)
                if name not in state:
                    state[name] = torch.empty(target.shape, dtype=tensor.dtype, device=device)
                state[name][row - lo].copy_(tensor)
                filled_rows.setdefault(name, set()).add(row - lo)
                continue
            want = list(target.shape)
            if shard is not None:
                scale_block = block[shard.dim] if key.endswith(SCALE_SUFFIX) else 1
                want[shard.dim] = -(-shard.full // scale_block)
            state[name] = _read(handle, key, shard, tuple(want), keep_fp8, dtype, block, files).to(device)
        del handle

    first_row = {name: shard.start for name, shard in shards.items() if shard is not None}
    check_complete(path, expected, state, filled_rows, tied, L, first_row)

    model.load_state_dict(state, strict=False, assign=True)
    state.clear()  # the model holds them now; a reference here would keep unfused copies alive below
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_meta_buffers(model, device)
    model.prepare_for_inference()  # as the single-process loader does
    return model.eval(), stats


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{os.path.basename(file)}: cannot read safetensors file ({e})") from None


def _check_shape(handle, key: str, want: tuple[int, ...]) -> None:
    got = tuple(handle.get_slice(key).get_shape())
    if got != want:
        raise CheckpointError(f"tensor {key} has shape {got}, the model expects {want}")


def _slice(handle, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, stop) of a stored tensor, reading only those."""
    part = handle.get_slice(key)
    return part[start:stop] if dim == 0 else part[:, start:stop]


def _read(
    handle,
    key: str,
    shard: Shard | None,
    full_shape: tuple[int, ...],
    keep_fp8: bool,
    dtype: torch.dtype | None,
    block: tuple[int, int],
    files: dict[str, str],
) -> torch.Tensor:
    """This rank's part of one checkpoint tensor, converted for the model (see module doc for FP8).

    Always a copy: safetensors hands out views of the shard's mmap, and one view kept by the model
    would keep the whole file mapped, with every page read from it (the experts copied into their
    stacked tensors...) counted in this rank's memory for as long as the model lives.
    """
    _check_shape(handle, key, full_shape)
    stored = handle.get_slice(key).get_dtype()
    scale_key = key + SCALE_SUFFIX
    is_fp8 = _DTYPES.get(stored) == torch.float8_e4m3fn
    if key.endswith(SCALE_SUFFIX):
        # Kept FP8: the scale blocks of the weight's shard (apply_tp made sure it starts on a block).
        b = block[shard.dim] if shard is not None else 1
        raw = (
            handle.get_tensor(key)
            if shard is None
            else _slice(handle, key, shard.dim, shard.start // b, -(-shard.stop // b))
        )
        return _owned(raw.float(), raw)
    if is_fp8 and scale_key not in files:
        raise CheckpointError(f"FP8 tensor {key} has no {scale_key}")
    if not is_fp8 and scale_key in files:
        raise CheckpointError(f"{key} has a weight_scale_inv but is stored as {stored}, not float8_e4m3fn")
    raw = handle.get_tensor(key) if shard is None else _slice(handle, key, shard.dim, shard.start, shard.stop)
    if is_fp8:
        if keep_fp8:
            return _owned(raw, raw)
        return _dequantize_part(raw, _scale_handle(handle, scale_key, files), scale_key, shard, block, dtype)
    if key.endswith("e_score_correction_bias"):
        return _owned(raw.float(), raw)  # the routing bias stays float32 (a bf16 bias would move near-ties)
    return _owned(raw if dtype is None else raw.to(dtype), raw)


def _owned(t: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """`t`, copied if it still shares memory with `raw` (a view of the mmap'ed file)."""
    return t.clone() if t.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr() else t


def _scale_handle(handle, scale_key: str, files: dict[str, str]):
    """The scale usually sits in the same shard file as its weight; otherwise open the one that has it."""
    if scale_key in handle.keys():
        return handle
    return _open(files[scale_key])


def _dequantize_part(
    w: torch.Tensor, scales, scale_key: str, shard: Shard | None, block: tuple[int, int], dtype: torch.dtype | None
) -> torch.Tensor:
    """Dequantize a (row or column) slice of an FP8 weight with the scale blocks that cover it."""
    dtype = dtype or torch.bfloat16
    try:
        if shard is None:
            return dequantize_blocks(w, scales.get_tensor(scale_key), block, dtype)
        b = block[shard.dim]
        first, offset = divmod(shard.start, b)
        s = _slice(scales, scale_key, shard.dim, first, -(-shard.stop // b))
        if offset == 0:
            return dequantize_blocks(w, s, block, dtype)
        # The shard starts `offset` rows/columns into a block: pad it to the block start, dequantize, crop.
        pad_shape = list(w.shape)
        pad_shape[shard.dim] = offset
        pad = torch.zeros(pad_shape, dtype=torch.uint8)  # cat has no float8 kernel: go through the bytes
        padded = torch.cat([pad, w.view(torch.uint8)], dim=shard.dim).view(w.dtype)
        out = dequantize_blocks(padded, s, block, dtype).narrow(shard.dim, offset, w.shape[shard.dim])
        return out.clone() if out.is_contiguous() else out.contiguous()  # let the padded copy go
    except ValueError as e:
        raise CheckpointError(f"{scale_key}: {e}") from None
