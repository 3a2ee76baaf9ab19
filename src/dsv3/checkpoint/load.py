"""Load a checkpoint in the official layout, streaming one safetensors shard at a time.

The model is built on `meta` (nothing allocated), each tensor is read from its mmap'ed shard,
converted to the target dtype/device, and put in place with `load_state_dict(assign=True)`; so peak
memory stays near the model's own size. Every missing, unexpected or mis-shaped tensor is named in
a CheckpointError. FP8 weights are recognised by their `weight_scale_inv`, whatever their name.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..kernels import pages
from ..kernels.fp8 import dequantize_blocks
from .names import disk_to_memory, memory_to_disk

INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
# Tensors some checkpoints hold that are derived from config.json, not learned (Kimi-K2's shards list 61
# `rotary_emb.inv_freq`; transformers skips them too): skipped with a note. Every other key stays strict.
IGNORED_TENSORS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def checkpoint_files(path: str) -> dict[str, str]:
    """{official key: shard file path} from the index, or from a single `model.safetensors`."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        files = {k: _shard_path(path, k, v) for k, v in _read_weight_map(index).items()}
        for f in sorted(set(files.values())):
            if not os.path.isfile(f):
                raise CheckpointError(f"shard {os.path.basename(f)} named in {INDEX_NAME} is missing")
        return files
    single = os.path.join(path, "model.safetensors")
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not os.path.isfile(single) and len(shards) != 1:
        raise CheckpointError(f"{path}: no {INDEX_NAME} and not exactly one .safetensors file")
    file = single if os.path.isfile(single) else os.path.join(path, shards[0])
    with _open(file) as f:
        return {k: file for k in f.keys()}


def _read_weight_map(index: str) -> dict[str, str]:
    """The index's `weight_map`, checked to be an object of tensor name -> shard file name."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (not UTF-8 JSON: {e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map' object)")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name, got {shard!r}")
    return weight_map


def _shard_path(path: str, key: str, shard: str) -> str:
    """path/shard, refused when it leaves the checkpoint folder (`..`, an absolute path, an escaping symlink)."""
    full = os.path.join(path, shard)
    root = os.path.realpath(path)
    real = os.path.realpath(full)
    if os.path.isabs(shard) or os.path.commonpath([root, real]) != root or real == root:
        raise CheckpointError(
            f"{INDEX_NAME}: {key} points to {shard!r}, outside the checkpoint folder {path} (refused)"
        )
    return full


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{os.path.basename(file)}: cannot read safetensors file ({e})") from None


@dataclass(frozen=True)
class LoadPlan:
    """What a checkpoint directory holds and which model to build for it (shared by every loader)."""

    path: str
    cfg: ModelConfig  # as in config.json
    files: dict[str, str]  # official key -> shard file
    scaled: set[str]  # keys of the weights stored in FP8 (they have a weight_scale_inv)
    block: tuple[int, int]  # FP8 block size, from weight_block_size
    want_mtp: bool
    keep_fp8: bool
    model_cfg: ModelConfig  # the config the in-memory model is built with


def plan_load(path: str | os.PathLike, fp8: bool = False, mtp: bool | None = None) -> LoadPlan:
    """Read config.json and the index, check they agree, and decide the model to build."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a checkpoint directory")
    try:
        cfg = ModelConfig.from_pretrained(os.path.join(path, "config.json"))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if cfg.int4_group_size is not None:
        raise CheckpointError(
            f"{path}: INT4 weights (quantization_config.quant_method 'compressed-tensors', as Kimi-K2-Thinking) "
            "cannot be loaded; `dsv3 params` and `dsv3 plan` do read this config"
        )
    files = checkpoint_files(path)
    ignored = sorted(k for k in files if IGNORED_TENSORS.match(k))
    if ignored:
        print(
            f"dsv3: note: {path}: skipped {len(ignored)} rotary_emb.inv_freq tensor(s) (recomputed from config.json)",
            file=sys.stderr,
        )
        files = {k: v for k, v in files.items() if k not in ignored}
    check_counts(path, cfg, files)
    scaled = {k[: -len(SCALE_SUFFIX)] for k in files if k.endswith(SCALE_SUFFIX)}
    if scaled and cfg.fp8_block_size is None:
        raise CheckpointError(
            f"{sorted(scaled)[0]} has a weight_scale_inv but config.json has no fp8 quantization_config"
        )
    block = cfg.fp8_block_size or (128, 128)
    has_mtp = any(disk_to_memory(k, cfg.num_hidden_layers)[0].startswith("mtp.") for k in files)
    # Default: load the MTP layer when the config declares it and the checkpoint has it (HF's
    # save_pretrained drops it); asking for it explicitly makes its absence an error.
    want_mtp = cfg.num_nextn_predict_layers > 0 and has_mtp if mtp is None else mtp
    if want_mtp and cfg.num_nextn_predict_layers == 0:
        raise CheckpointError(f"{path}: mtp=True but config.json has num_nextn_predict_layers = 0")
    model_cfg = cfg if want_mtp else cfg.replace(num_nextn_predict_layers=0)
    keep_fp8 = fp8 and bool(scaled)
    if not keep_fp8:
        model_cfg = model_cfg.replace(quantization_config=None)
    return LoadPlan(path, cfg, files, scaled, block, want_mtp, keep_fp8, model_cfg)


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def check_counts(path: str, cfg: ModelConfig, files: dict[str, str]) -> None:
    """Raise CheckpointError when config.json's layer or expert counts disagree with the index's names.

    Done on the names alone, before the model is built: a config claiming 20000 layers or 2**40 experts
    fails here in milliseconds instead of after allocating (and failing to fill) a huge model.
    """
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, files) if m}
    if not layers:
        return  # not a decoder checkpoint by these names; the tensor-level checks decide
    main_layers = {i for i in layers if i < cfg.num_hidden_layers}
    most = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    if max(layers) >= most:
        raise CheckpointError(
            f"{path}: the index has tensors of layer {max(layers)}, but config.json declares "
            f"{cfg.num_hidden_layers} layer(s) + {cfg.num_nextn_predict_layers} MTP layer(s)"
        )
    if len(main_layers) != cfg.num_hidden_layers:
        absent = sorted(set(range(cfg.num_hidden_layers)) - main_layers)
        raise CheckpointError(
            f"{path}: config.json declares num_hidden_layers = {cfg.num_hidden_layers}, but the index has "
            f"tensors of {len(main_layers)} of those layers (missing layer(s) {absent[:5]}"
            f"{'...' if len(absent) > 5 else ''})"
        )
    # Expert ids: one missing expert is named by the tensor-level check; a count that is off is caught here.
    ids = {int(m.group(2)) for m in map(_EXPERT_KEY.match, files) if m}
    if ids and (max(ids) >= cfg.n_routed_experts or max(ids) + 1 < cfg.n_routed_experts):
        raise CheckpointError(
            f"{path}: config.json declares n_routed_experts = {cfg.n_routed_experts}, but the index names "
            f"experts 0..{max(ids)}"
        )


def load_model(
    cls: Callable[[ModelConfig], nn.Module],
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    fp8: bool = False,
    mtp: bool | None = None,
) -> nn.Module:
    """Build `cls` on meta from `path/config.json` and fill it from the shards (see module doc)."""
    plan = plan_load(path, fp8, mtp)
    path, cfg, files, scaled, block = plan.path, plan.cfg, plan.files, plan.scaled, plan.block
    want_mtp, keep_fp8, model_cfg = plan.want_mtp, plan.keep_fp8, plan.model_cfg

    with torch.device("meta"):
        model = cls(model_cfg)
    # In-memory names of the weights kept in FP8: those with a scale whose module can compute with it.
    fp8_in_memory = _fp8_layout(model, scaled, block, cfg.num_hidden_layers) if keep_fp8 else set()
    expected = model.state_dict()
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()

    state: dict[str, torch.Tensor] = {}
    filled_rows: dict[str, set[int]] = {}
    handles: dict[str, object] = {}

    def read(key: str) -> torch.Tensor:
        file = files[key]
        if file not in handles:
            handles[file] = _open(file)
        return handles[file].get_tensor(key)

    # Shard by shard: tensors of one file are read together, then the file is closed.
    by_file: dict[str, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file in sorted(by_file):
        for key in sorted(by_file[file]):
            name, row = disk_to_memory(key, cfg.num_hidden_layers)
            if name.startswith("mtp.") and not want_mtp:
                continue  # the MTP layer is skipped when the model does not want it
            is_scale = key.endswith(SCALE_SUFFIX)
            keep = (name[: -len(SCALE_SUFFIX)] if is_scale else name) in fp8_in_memory
            if is_scale and not keep:
                if key[: -len(SCALE_SUFFIX)] not in files:
                    raise CheckpointError(f"{key} has no weight {key[: -len(SCALE_SUFFIX)]} beside it")
                continue  # consumed with its weight
            if name not in expected or name in tied:
                raise CheckpointError(f"unexpected tensor {key} in {os.path.basename(file)}")
            target = expected[name]
            want_shape = tuple(target.shape[1:] if row is not None else target.shape)
            raw = read(key)
            if tuple(raw.shape) != want_shape:
                raise CheckpointError(f"tensor {key} has shape {tuple(raw.shape)}, the model expects {want_shape}")
            tensor = _convert(key, raw, keep, dtype, block, read, files)
            if row is None:
                # get_tensor is zero-copy: a tensor kept as stored still lives in the shard's mmap, and would
                # keep the whole file mapped (and the pages read for other tensors resident) for the model's life.
                # A large CPU weight is copied into memory advised into huge pages (kernels.pages) anyway.
                zero_copy = tensor.data_ptr() == raw.data_ptr()
                on_cpu = torch.device(device).type == "cpu"
                if on_cpu and (zero_copy or pages.wanted(tensor)):
                    state[name] = pages.copy_of(tensor)
                else:
                    state[name] = tensor.to(device, copy=zero_copy)
            else:
                if not 0 <= row < target.shape[0]:
                    raise CheckpointError(f"unexpected tensor {key}: expert {row} of {target.shape[0]}")
                if name not in state:
                    state[name] = pages.empty(target.shape, tensor.dtype, device)
                state[name][row].copy_(tensor)
                filled_rows.setdefault(name, set()).add(row)
        handles.clear()  # this shard, and any other one opened only to read a scale

    check_complete(path, expected, state, filled_rows, tied, cfg.num_hidden_layers)

    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_meta_buffers(model, device)
    return model.eval()


def check_complete(
    path: str,
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    filled_rows: dict[str, set[int]],
    skip: set[str],
    num_layers: int,
    first_row: dict[str, int] | None = None,
) -> None:
    """Raise a CheckpointError naming (official names) what the checkpoint did not provide.

    `filled_rows` are the expert rows read per stacked tensor; `first_row` gives the global expert id
    of local row 0 where a rank holds only a slice of the experts.
    """
    missing = []
    for name, target in expected.items():
        if name in skip:
            continue
        if name not in state:
            missing.append(memory_to_disk(name, num_layers, 1)[0])
        elif name in filled_rows and len(filled_rows[name]) != target.shape[0]:
            offset = (first_row or {}).get(name, 0)
            absent = sorted(offset + i for i in set(range(target.shape[0])) - filled_rows[name])
            missing.append(f"{name} (experts {absent[:5]}{'...' if len(absent) > 5 else ''})")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {', '.join(missing[:5])}{more}")


def _convert(key, tensor, keep_fp8, dtype, block, read, files) -> torch.Tensor:
    """Cast one checkpoint tensor for the model: dequantize FP8 (or keep it), else cast to dtype."""
    scale_key = key + SCALE_SUFFIX
    if tensor.dtype == torch.float8_e4m3fn:
        if scale_key not in files:
            raise CheckpointError(f"FP8 tensor {key} has no {scale_key}")
        if keep_fp8:
            return tensor
        try:
            return dequantize_blocks(tensor, read(scale_key), block, dtype or torch.bfloat16)
        except ValueError as e:
            raise CheckpointError(f"{scale_key}: {e}") from None
    if scale_key in files:
        raise CheckpointError(f"{key} has a weight_scale_inv but is stored as {tensor.dtype}, not float8_e4m3fn")
    if keep_fp8 and not key.endswith(SCALE_SUFFIX):  # an expert row in bf16 where its siblings are FP8
        raise CheckpointError(f"{key} is stored as {tensor.dtype} but other experts of its projection are FP8")
    if key.endswith((SCALE_SUFFIX, "e_score_correction_bias", ".mlp.gate.weight")):
        # FP8 scales and the router (weight and bias) stay float32: the router computes in float32.
        return tensor.float()
    return tensor if dtype is None else tensor.to(dtype)


def _fp8_layout(model: nn.Module, scaled: set[str], block: tuple[int, int], num_layers: int) -> set[str]:
    """FP8 storage (on meta) for each module whose weight has a scale on disk; returns the weight names.

    A module takes FP8 storage through its `to_fp8_layout(block)` (the model's Linear and ExpertLinear
    have one); a scaled weight of any other module (none in the official release) is dequantized on load.
    """
    scaled_names = {disk_to_memory(k + SCALE_SUFFIX, num_layers)[0][: -len(SCALE_SUFFIX)] for k in scaled}
    kept = set()
    for mname, module in model.named_modules():
        if hasattr(module, "to_fp8_layout") and f"{mname}.weight" in scaled_names:
            module.to_fp8_layout(block)
            kept.add(f"{mname}.weight")
    return kept


def _materialize_meta_buffers(model, device) -> None:
    """Non-persistent buffers (not in the checkpoint) are still on meta after assign: zero them."""
    for module in model.modules():
        for bname, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
    for p_name, p in model.named_parameters():
        if p.is_meta:
            raise CheckpointError(f"parameter {p_name} was not loaded")
