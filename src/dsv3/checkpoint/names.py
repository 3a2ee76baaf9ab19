"""The ONE name table between the official checkpoint and the in-memory model.

Everything is identical except two bridges:
- routed experts are stacked: `model.layers.{i}.mlp.experts.{e}.{proj}.{weight|weight_scale_inv}` on disk
  is row e of `model.layers.{i}.mlp.experts.{proj}.{weight|weight_scale_inv}` in memory;
- the MTP modules `model.layers.{L+k}.*` on disk (L = num_hidden_layers) are `mtp.{k}.*` in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

_EXPERT_DISK = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_EXPERT_MEM = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
_LAYER_DISK = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_MEM = re.compile(r"^mtp\.(\d+)\.(.*)$")


def disk_to_memory(key: str, num_layers: int) -> tuple[str, int | None]:
    """Official key -> (in-memory state_dict name, expert row or None)."""
    m = _LAYER_DISK.match(key)
    if m and int(m.group(1)) >= num_layers:
        key = f"mtp.{int(m.group(1)) - num_layers}.{m.group(2)}"
    m = _EXPERT_DISK.match(key)
    if m:
        return f"{m.group(1)}.{m.group(3)}.{m.group(4)}", int(m.group(2))
    return key, None


def memory_to_disk(name: str, num_layers: int, num_experts: int | None = None) -> list[str]:
    """In-memory name -> the official key(s) it holds (one per expert for stacked tensors)."""
    m = _MTP_MEM.match(name)
    if m:
        name = f"model.layers.{num_layers + int(m.group(1))}.{m.group(2)}"
    m = _EXPERT_MEM.match(name)
    if m:
        if num_experts is None:
            raise ValueError(f"{name} is stacked: num_experts is needed")
        return [f"{m.group(1)}.{e}.{m.group(2)}.{m.group(3)}" for e in range(num_experts)]
    return [name]


def iter_disk_tensors(state: dict[str, torch.Tensor], num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(official key, tensor) for an in-memory state dict, experts unstacked (views, no copies)."""
    for name, t in state.items():
        keys = memory_to_disk(name, num_layers, t.shape[0] if _EXPERT_MEM.match(name) else None)
        if len(keys) == 1 and not _EXPERT_MEM.match(name):
            yield keys[0], t
        else:
            for e, key in enumerate(keys):
                yield key, t[e]


# `kv_a_proj_with_mqa` is FP8 in the official release too (its scale is [ceil(576/128), 56] in V3).
_FP8_WEIGHT = re.compile(r"_proj(_with_mqa)?\.weight$")


def is_fp8_quantizable(key: str) -> bool:
    """The tensors the official FP8 checkpoint stores in FP8: attention, MLP, expert and eh `*_proj.weight`.

    That includes `kv_a_proj_with_mqa.weight`; never embeddings, lm_head / shared_head.head, norms, or
    the router weight and bias.
    """
    return _FP8_WEIGHT.search(key) is not None
