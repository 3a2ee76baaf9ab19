"""Tensor parallelism over one process group, applied to a built model from outside: `apply_tp(model, group)`.

The layout is the official inference code's (Megatron-style), rank r of R:
- attention heads are dealt out in whole heads: `q_b_proj` (or `q_proj`) and `kv_b_proj` keep the
  output rows of heads [r*H/R, (r+1)*H/R); `o_proj` keeps the matching input columns and its
  partial outputs are summed over the group (`RowParallelLinear`). MLA infers its local head count
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

The wrappers subclass the module they replace and take over its parameters, so state-dict names
stay the checkpoint's (`self_attn.o_proj.weight`). They are for inference: the collectives are
not autograd-aware. Each sharded module records its slice of the full tensor in `module.shard`
(`Shard`), which the sharded loader reads to fetch exactly that slice from disk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

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


def forget_derived(module: nn.Module) -> bool:
    """Drop what `module` derived from its weights (fused projections, absorbed MLA weights), stale once
    the weights are sliced; True if there was any. Plain tensor attributes are such caches: parameters
    and buffers live in their own dicts."""
    had = False
    for name, value in list(vars(module).items()):
        if isinstance(value, torch.Tensor) or (name == "_absorbed_cache" and value is not None):
            setattr(module, name, None)
            had = True
    return had


def refuse_if(model: DeepSeekV3, fused: bool) -> None:
    """Fuse the (now local) projections again when the model had them fused before it was split."""
    if fused and not any(p.is_meta for p in model.parameters()) and hasattr(model, "fuse_projections_"):
        model.fuse_projections_()


def _adopt(cls: type[nn.Module], module: nn.Module) -> nn.Module:
    """An instance of the subclass `cls` that takes over `module`'s parameters, buffers and attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    return new


class RowParallelLinear(Linear):
    """A Linear holding input columns [start, stop): y = all_reduce(x_local @ W_local^T).

    `reduce = False` returns the partial sum instead, for a caller that reduces it together with
    another partial (the MoE layer under TP + EP: shared and routed experts in one all-reduce).
    """

    group: ProcessGroup
    stats: CommStats | None
    reduce: bool = True

    @classmethod
    def adopt(cls, linear: Linear, group: ProcessGroup, stats: CommStats | None) -> RowParallelLinear:
        new = _adopt(cls, linear)
        new.group, new.stats = group, stats
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return all_reduce_(y, self.group, self.stats, "tp.all_reduce") if self.reduce else y


class VocabParallelEmbedding(nn.Embedding):
    """An Embedding holding rows [start, stop) of the vocabulary: other ids give zeros, then all-reduce."""

    group: ProcessGroup
    stats: CommStats | None

    @classmethod
    def adopt(cls, emb: nn.Embedding, group: ProcessGroup, stats: CommStats | None) -> VocabParallelEmbedding:
        new = _adopt(cls, emb)
        new.group, new.stats = group, stats
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        return all_reduce_(out, self.group, self.stats, "tp.embed_all_reduce")


class VocabParallelHead(Linear):
    """An output head holding vocabulary rows [start, stop): local logits, all-gathered to (..., V)."""

    group: ProcessGroup
    stats: CommStats | None

    @classmethod
    def adopt(cls, linear: Linear, group: ProcessGroup, stats: CommStats | None) -> VocabParallelHead:
        new = _adopt(cls, linear)
        new.group, new.stats = group, stats
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_cat(super().forward(x), -1, self.group, self.stats, "tp.logits_all_gather")


def check_tp_divisible(model: DeepSeekV3, tp: int) -> None:
    """Raise ConfigError naming the first size of `model` that `tp` does not divide."""
    cfg = model.config
    sizes = [("num_attention_heads", cfg.num_attention_heads), ("vocab_size", cfg.vocab_size)]
    layers = _decoder_layers(model)
    if any(isinstance(layer.mlp, MLP) for layer in layers):
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if cfg.n_shared_experts and any(isinstance(layer.mlp, MoE) for layer in layers):
        sizes.append(("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts))
    for name, n in sizes:
        if n % tp:
            raise ConfigError(f"{name} ({n}) is not divisible by tp ({tp}); use a tp that divides it")


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

    fused = False
    for module in model.modules():
        had = forget_derived(module)
        fused |= had and hasattr(module, "fuse_")
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

    tied = model.config.tie_word_embeddings
    embed = model.model.embed_tokens
    vocab_rows(embed)
    embed.num_embeddings = embed.weight.shape[0]
    model.model.embed_tokens = VocabParallelEmbedding.adopt(embed, group, stats)
    if tied:  # same rows as the embedding: share the shard, then wrap
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.shard = model.model.embed_tokens.shard
    else:
        vocab_rows(model.lm_head)
    model.lm_head.out_features = model.lm_head.weight.shape[0]
    model.lm_head = VocabParallelHead.adopt(model.lm_head, group, stats)
    for mtp in model.mtp:
        vocab_rows(mtp.embed_tokens)
        mtp.embed_tokens.num_embeddings = mtp.embed_tokens.weight.shape[0]
        mtp.embed_tokens = VocabParallelEmbedding.adopt(mtp.embed_tokens, group, stats)
        head = mtp.shared_head.head
        vocab_rows(head)
        head.out_features = head.weight.shape[0]
        mtp.shared_head.head = VocabParallelHead.adopt(head, group, stats)
    model.tp_group = group
    refuse_if(model, fused)
    return stats


def _shard_attention(attn: MLA, r: int, R: int, group: ProcessGroup, stats: CommStats, where: str) -> None:
    q = attn.q_proj if attn.q_lora_rank is None else attn.q_b_proj
    H = q.weight.shape[0] // attn.qk_head_dim  # from the tensor: the head count is what the weights hold
    h = H // R
    qk, kv = attn.qk_head_dim, attn.nope_dim + attn.v_dim
    shard_linear(q, 0, r * h * qk, (r + 1) * h * qk, f"{where} q projection")
    shard_linear(attn.kv_b_proj, 0, r * h * kv, (r + 1) * h * kv, f"{where} kv_b_proj")
    shard_linear(attn.o_proj, 1, r * h * attn.v_dim, (r + 1) * h * attn.v_dim, f"{where} o_proj")
    attn.o_proj = RowParallelLinear.adopt(attn.o_proj, group, stats)
    attn.n_heads = h  # (W_UK / W_UV of the full kv_b_proj were dropped by forget_derived)


def _shard_mlp(mlp: MLP, r: int, R: int, group: ProcessGroup, stats: CommStats, where: str) -> None:
    n = mlp.gate_proj.weight.shape[0] // R
    shard_linear(mlp.gate_proj, 0, r * n, (r + 1) * n, f"{where} gate_proj")
    shard_linear(mlp.up_proj, 0, r * n, (r + 1) * n, f"{where} up_proj")
    shard_linear(mlp.down_proj, 1, r * n, (r + 1) * n, f"{where} down_proj")
    mlp.down_proj = RowParallelLinear.adopt(mlp.down_proj, group, stats)
