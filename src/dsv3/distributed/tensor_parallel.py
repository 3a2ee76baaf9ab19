"""Tensor parallelism over one process group, applied to a built model from outside: `apply_tp(model, group)`.

The layout is the official inference code's (Megatron-style), rank r of R:
- attention heads are dealt out in whole heads: `q_b_proj` (or `q_proj`) and `kv_b_proj` keep the
  output rows of heads [r*H/R, (r+1)*H/R); `o_proj` keeps the matching input columns and its
  partial outputs are summed over the group (a forward hook). MLA infers its local head count
  from these tensor sizes, so `model/` is unchanged;
- the latent projections (`q_a_proj`, `kv_a_proj_with_mqa`), their norms and all other norms are
  replicated, and so is the latent KV cache: every rank computes the same latent and attends with
  its own heads over it (the cache is per token, not per head, so there is nothing to split);
- the dense MLP and the shared experts are column parallel (`gate_proj` / `up_proj` rows) then row
  parallel (`down_proj` columns + all-reduce);
- `embed_tokens` is vocab parallel (each rank holds V/R rows; ids outside its range give zeros,
  then an all-reduce), `lm_head` too (each rank computes V/R logits, then an all-gather); the MTP
  module's `embed_tokens` and `shared_head.head` likewise, its `eh_proj` replicated;
- routed experts and routers are left alone: `apply_ep` deals the experts out.

Sizes that do not divide (heads, vocab, intermediate sizes) are a ConfigError naming the size: no
padding, so every rank holds the same shapes and the all-gather needs no cropping. An FP8 weight
kept in FP8 must be split on its 128-row/column scale blocks (a shard starting inside a block
would need a scale shared with the neighbour rank); that is a ConfigError too.

Modules are sliced in place and keep their class, so state-dict names stay the checkpoint's
(`self_attn.o_proj.weight`); the collectives are forward hooks (`reduce_output`, `gather_output`) and the
vocabulary-parallel lookup is the embedding's `forward`, as in gpt-fast's tp.py. Tensors derived from the
full weights (fused projections, absorbed MLA weights) are dropped first with `invalidate_derived_()` and
rebuilt from the shards. They are for inference: the collectives are not autograd-aware. Each sharded
module records its slice of the full tensor in `module.shard` (`Shard`), which the sharded loader reads to
fetch exactly that slice from disk.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from ..accounting import check_parallel_split
from ..errors import ConfigError
from ..model.attention import MLA
from ..model.linear import Linear
from ..model.moe import MLP, MoE
from ..model.transformer import DeepSeekV3
from .comm import CommStats, all_gather_cat, all_reduce_, group_rank, group_size


@dataclass(frozen=True)
class Shard:
    """This rank's slice [start, stop) along `dim` of a tensor whose full size along `dim` is `full`."""

    dim: int
    start: int
    stop: int
    full: int


def _take(t: torch.Tensor, dim: int, start: int, stop: int) -> torch.Tensor:
    """The slice as its own tensor (a copy, so the full tensor can be freed); views on meta."""
    part = t.narrow(dim, start, stop - start)
    return part if part.is_meta else part.clone()


def shard_linear(linear: Linear, dim: int, start: int, stop: int, what: str) -> None:
    """Keep rows (dim 0) or columns (dim 1) [start, stop) of `linear`'s weight, and of its FP8 scale grid."""
    full = linear.weight.shape[dim]
    if linear.is_fp8:
        b = linear.block_size[dim]
        if start % b or (stop % b and stop != full):
            raise ConfigError(
                f"{what}: the tensor-parallel split at {'rows' if dim == 0 else 'columns'} [{start}, {stop}) "
                f"of {full} falls inside a {b}-wide FP8 scale block; load the weights dequantized "
                f"(fp8=False) or pick a tp whose shards are multiples of {b}"
            )
        scale = linear.weight_scale_inv
        linear.weight_scale_inv = nn.Parameter(_take(scale, dim, start // b, -(-stop // b)), requires_grad=False)
    linear.weight = nn.Parameter(_take(linear.weight, dim, start, stop), requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = stop - start
    else:
        linear.in_features = stop - start
    linear.shard = Shard(dim, start, stop, full)


def fuse_again(model: DeepSeekV3, was_fused: bool) -> None:
    """Re-apply the model's inference options (fusing the now local projections) when it had them fused."""
    if was_fused and not any(p.is_meta for p in model.parameters()):
        model.prepare_for_inference()


def adopt(cls: type[nn.Module], module: nn.Module, **attributes: object) -> nn.Module:
    """An instance of `cls`, a subclass of `module`'s class that changes only `forward`, taking over `module`'s
    parameters, buffers and submodules (so state_dict names stay), plus `attributes`: a seam swapped in place."""
    base = cls.__mro__[1]
    if not isinstance(module, base):
        raise TypeError(f"{cls.__name__} adopts a {base.__name__}, not a {type(module).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for name, value in attributes.items():
        setattr(new, name, value)
    return new


# Collectives are added with forward hooks (gpt-fast's tp.py shape): sharded modules keep their class, their
# parameters and their state_dict names; only what comes out of them changes. For inference: the collectives
# are not autograd-aware.


def reduce_output(module: nn.Module, group: ProcessGroup, stats: CommStats | None, kind: str) -> RemovableHandle:
    """Sum `module`'s output over the group: the partial products of a row-parallel projection."""
    return module.register_forward_hook(lambda _m, _args, out: all_reduce_(out, group, stats, kind))


def gather_output(module: nn.Module, group: ProcessGroup, stats: CommStats | None, kind: str) -> RemovableHandle:
    """Concatenate `module`'s output over the group along the last dim: vocabulary-parallel logits."""
    return module.register_forward_hook(lambda _m, _args, out: all_gather_cat(out, -1, group, stats, kind))


def vocab_parallel_embed(
    emb: nn.Embedding, group: ProcessGroup, stats: CommStats | None, ids: torch.Tensor
) -> torch.Tensor:
    """Lookup in rows [start, stop) of the vocabulary: ids outside give zeros, then the ranks' parts are summed."""
    local = ids - emb.shard.start
    outside = (local < 0) | (local >= emb.weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), emb.weight)
    return all_reduce_(out.masked_fill(outside[..., None], 0.0), group, stats, "tp.embed_all_reduce")


def check_tp_divisible(model: DeepSeekV3, tp: int) -> None:
    """Raise ConfigError naming the first size of `model` that `tp` does not divide (the rule `dsv3 plan` uses)."""
    check_parallel_split(model.config, tp=tp)


def _decoder_layers(model: DeepSeekV3) -> list[nn.Module]:
    return [*model.model.layers, *model.mtp]


def apply_tp(model: DeepSeekV3, group: ProcessGroup | None, stats: CommStats | None = None) -> CommStats:
    """Shard `model` in place for tensor parallelism over `group` (see module doc); returns the byte ledger.

    Works on a model on `meta` (the sharded loader's case: shapes only) as on a loaded one (the
    full weights are sliced, then freed). A group of size 1 changes nothing.
    """
    stats = stats if stats is not None else CommStats()
    R, r = group_size(group), group_rank(group)
    if R == 1:
        return stats
    if getattr(model, "tp_group", None) is not None:
        raise ConfigError("apply_tp: the model is already tensor-parallel")
    check_tp_divisible(model, R)

    was_fused = model.invalidate_derived_()  # fused and absorbed tensors of the full weights go stale
    for i, layer in enumerate(_decoder_layers(model)):
        _shard_attention(layer.self_attn, r, R, group, stats, f"layer {i}")
        mlp = layer.mlp
        if isinstance(mlp, MoE):
            if mlp.shared_experts is not None:
                _shard_mlp(mlp.shared_experts, r, R, group, stats, f"layer {i} shared experts")
        else:
            _shard_mlp(mlp, r, R, group, stats, f"layer {i} MLP")

    def vocab_rows(module: nn.Module) -> None:
        V = module.weight.shape[0]
        n = V // R
        rows = _take(module.weight, 0, r * n, (r + 1) * n)
        module.weight = nn.Parameter(rows, requires_grad=module.weight.requires_grad)
        module.shard = Shard(0, r * n, (r + 1) * n, V)

    def vocab_parallel(emb: nn.Embedding, head: Linear, tied: bool) -> None:
        vocab_rows(emb)
        emb.num_embeddings = emb.weight.shape[0]
        # An instance `forward` (as training's activation checkpointing does): the lookup itself changes.
        emb.forward = functools.partial(vocab_parallel_embed, emb, group, stats)
        if tied:  # same rows as the embedding: share the shard
            head.weight, head.shard = emb.weight, emb.shard
        else:
            vocab_rows(head)
        head.out_features = head.weight.shape[0]
        gather_output(head, group, stats, "tp.logits_all_gather")

    vocab_parallel(model.model.embed_tokens, model.lm_head, model.config.tie_word_embeddings)
    for mtp in model.mtp:
        vocab_parallel(mtp.embed_tokens, mtp.shared_head.head, tied=False)
    model.tp_group = group
    fuse_again(model, was_fused)
    return stats


def _shard_attention(attn: MLA, r: int, R: int, group: ProcessGroup, stats: CommStats, where: str) -> None:
    q = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    H = q.weight.shape[0] // attn.qk_head_dim  # from the tensor: the head count is what the weights hold
    h = H // R
    qk, kv = attn.qk_head_dim, attn.nope_dim + attn.v_dim
    shard_linear(q, 0, r * h * qk, (r + 1) * h * qk, f"{where} q projection")
    shard_linear(attn.kv_b_proj, 0, r * h * kv, (r + 1) * h * kv, f"{where} kv_b_proj")
    shard_linear(attn.o_proj, 1, r * h * attn.v_dim, (r + 1) * h * attn.v_dim, f"{where} o_proj")
    attn.o_proj.tp_reduce_hook = reduce_output(attn.o_proj, group, stats, "tp.all_reduce")
    attn.n_heads = h  # (W_UK / W_UV of the full kv_b_proj were dropped by invalidate_derived_)


def _shard_mlp(mlp: MLP, r: int, R: int, group: ProcessGroup, stats: CommStats, where: str) -> None:
    n = mlp.gate_proj.weight.shape[0] // R
    shard_linear(mlp.gate_proj, 0, r * n, (r + 1) * n, f"{where} gate_proj")
    shard_linear(mlp.up_proj, 0, r * n, (r + 1) * n, f"{where} up_proj")
    shard_linear(mlp.down_proj, 1, r * n, (r + 1) * n, f"{where} down_proj")
    # The handle lets expert parallelism fold this all-reduce into the MoE layer's own (see apply_ep).
    mlp.down_proj.tp_reduce_hook = reduce_output(mlp.down_proj, group, stats, "tp.all_reduce")
