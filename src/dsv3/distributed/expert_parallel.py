"""Expert parallelism over one process group, applied from outside: `apply_ep(model, group)`.

Rank r of R keeps routed experts [r*E/R, (r+1)*E/R) of every MoE layer (the stacked ExpertLinear
weights, and FP8 scales, are sliced) and each MoE's `experts` is swapped for `ExpertParallel`,
which takes the same call `experts(x_TD, topk_idx_TK, topk_weight_TK)`. Routers and shared
experts are untouched (replicated, or TP-split by `apply_tp`).

Two ways to combine, chosen per model (`combine`):
- "all_to_all" (dispatch): each assignment (token, chosen expert) is sent to the rank that holds
  the expert (all_to_all_single, after exchanging per-expert counts so every rank knows its split
  sizes), the expert outputs come back the same way, and the sending rank weights and sums them;
- "all_reduce" (the official code's): each rank runs its local experts on every token that chose
  them and the partial sums are all-reduced. This needs the same tokens on every rank.

Which tokens a rank sees (`tokens`):
- "replicated": every rank of the group runs the same sequences (the decode loop of
  `dsv3.distributed.launch`, and always under TP). With "all_to_all", rank r dispatches only its
  1/R share of the tokens and the outputs are all-gathered; with "all_reduce" (the default when the
  model is also tensor parallel, the official T = E = N layout) no dispatch is needed at all;
- "local": each rank has its own tokens (data-parallel attention, training); only "all_to_all".

Under TP + EP over the same ranks with the all-reduce combine, the routed experts' partial sum and
the TP-split shared experts' partial sum are added first and all-reduced ONCE per MoE layer
(a forward hook on the MoE layer), where the official code all-reduces each: one collective fewer per layer, same sum.

Legend: T tokens, D model dim, E experts (El local to this rank), K experts per token,
N = T*K assignments, R ranks, M rows received for this rank's experts, C tokens per rank's share.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ..errors import ConfigError
from ..model.linear import ExpertLinear
from ..model.moe import Experts, MoE, sort_by_expert
from ..model.transformer import DeepSeekV3
from .comm import CommStats, all_gather_cat, all_reduce_, all_to_all_rows, group_rank, group_size
from .tensor_parallel import Shard, _take, adopt, fuse_again, reduce_output

COMBINES = ("all_to_all", "all_reduce")
TOKENS = ("replicated", "local")


def _slice_experts(lin: ExpertLinear, lo: int, hi: int) -> None:
    """Keep experts [lo, hi) of a stacked [E, out, in] weight (and its [E, ...] scale grid)."""
    E = lin.weight.shape[0]
    lin.weight = nn.Parameter(_take(lin.weight, 0, lo, hi), requires_grad=lin.weight.requires_grad)
    if lin.is_fp8:
        lin.weight_scale_inv = nn.Parameter(_take(lin.weight_scale_inv, 0, lo, hi), requires_grad=False)
    lin.num_experts = hi - lo
    lin.shard = Shard(0, lo, hi, E)


class ExpertParallel(Experts):
    """This rank's routed experts [first, first + El) of E, computing `experts(x, idx, w)` with the others."""

    group: ProcessGroup
    stats: CommStats | None
    first: int
    total: int
    combine: str
    tokens: str
    reduce: bool = True  # all_reduce combine: False returns this rank's partial sum (a hook on the MoE layer sums it)

    @classmethod
    def adopt(
        cls, experts: Experts, group: ProcessGroup, combine: str, tokens: str, stats: CommStats | None
    ) -> ExpertParallel:
        """Slice `experts` to this rank's share and swap in this class for it (parameters taken over)."""
        R, r = group_size(group), group_rank(group)
        E = experts.num_experts
        El = E // R
        for lin in (experts.gate_proj, experts.up_proj, experts.down_proj):
            _slice_experts(lin, r * El, (r + 1) * El)
        return adopt(cls, experts, group=group, stats=stats, first=r * El, total=E, combine=combine, tokens=tokens)

    def extra_repr(self) -> str:
        return f"experts [{self.first}, {self.first + self.num_experts}) of {self.total}, {self.combine}, {self.tokens}"

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        if self.combine == "all_reduce":
            y_TD = self._local_partial(x_TD, topk_idx_TK, topk_weight_TK)
            return all_reduce_(y_TD, self.group, self.stats, "ep.all_reduce") if self.reduce else y_TD
        if self.tokens == "local":
            return self._dispatch(x_TD, topk_idx_TK, topk_weight_TK)
        # Replicated tokens: this rank dispatches rows [lo, hi) only, then every rank gathers all rows.
        R, r = group_size(self.group), group_rank(self.group)
        T = x_TD.shape[0]
        bounds = [T * i // R for i in range(R + 1)]
        lo, hi = bounds[r], bounds[r + 1]
        y_CD = self._dispatch(x_TD[lo:hi], topk_idx_TK[lo:hi], topk_weight_TK[lo:hi])
        C = -(-T // R)  # all_gather wants equal sizes: pad every chunk to C rows
        padded_CD = torch.cat([y_CD, y_CD.new_zeros(C - (hi - lo), y_CD.shape[1])])
        gathered = all_gather_cat(padded_CD, 0, self.group, self.stats, "ep.all_gather").view(R, C, -1)
        return torch.cat([gathered[i, : bounds[i + 1] - bounds[i]] for i in range(R)])

    def _expert_outputs(self, x_MD: torch.Tensor, local_idx_M: torch.Tensor) -> torch.Tensor:
        """Row m through local expert local_idx_M[m], unweighted: (M, D)."""
        if x_MD.shape[0] == 0:  # nothing routed here this step (common in decode): skip the kernels
            return x_MD.new_zeros(0, self.down_proj.out_features)
        order_M, counts_E = sort_by_expert(local_idx_M[:, None], self.num_experts)
        h_MD = x_MD.new_empty(x_MD.shape[0], self.down_proj.out_features)
        h_MD[order_M] = self.compute(x_MD[order_M], counts_E)
        return h_MD

    def _local_partial(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor
    ) -> torch.Tensor:
        """sum over this rank's experts only of weight * expert(x), for every token: (T, D)."""
        local_TK = topk_idx_TK - self.first
        mine_TK = (local_TK >= 0) & (local_TK < self.num_experts)
        t_N, k_N = mine_TK.nonzero(as_tuple=True)
        h_ND = self._expert_outputs(x_TD[t_N], local_TK[t_N, k_N])
        h_ND = h_ND * topk_weight_TK[t_N, k_N, None].to(h_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, t_N, h_ND.to(x_TD.dtype))

    def _dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        """All-to-all: send each assignment to its expert's rank, get the output back, weight and sum."""
        R, El = group_size(self.group), self.num_experts
        _T, K = topk_idx_TK.shape
        idx_N = topk_idx_TK.flatten()
        # Sorting by global expert id groups the rows by destination rank (rank = id // El) and, within
        # a rank, by expert, so per-expert counts alone tell the receiver which rows go to which expert.
        order_N = torch.argsort(idx_N, stable=True)
        token_N = order_N // K
        send_counts_RE = torch.bincount(idx_N, minlength=self.total).view(R, El)
        recv_counts_RE = torch.empty_like(send_counts_RE)
        if self.stats is not None:
            self.stats.add("ep.counts", (R - 1) * El * send_counts_RE.element_size())
        dist.all_to_all_single(recv_counts_RE, send_counts_RE, group=self.group)
        send_R = send_counts_RE.sum(1).tolist()
        recv_R = recv_counts_RE.sum(1).tolist()
        x_MD = all_to_all_rows(x_TD[token_N], send_R, recv_R, self.group, self.stats, "ep.all_to_all")
        # Received rows: from rank 0 (its rows for local expert 0, 1, ...), then rank 1, ...
        local_idx_M = torch.arange(El, device=x_TD.device).repeat(R).repeat_interleave(recv_counts_RE.flatten())
        h_MD = self._expert_outputs(x_MD, local_idx_M)
        h_ND = all_to_all_rows(h_MD, recv_R, send_R, self.group, self.stats, "ep.all_to_all")  # back, in send order
        h_ND = h_ND * topk_weight_TK.flatten()[order_N, None].to(h_ND.dtype)
        return torch.zeros_like(x_TD).index_add_(0, token_N, h_ND.to(x_TD.dtype))


def apply_ep(
    model: DeepSeekV3,
    group: ProcessGroup | None,
    combine: str | None = None,
    tokens: str = "replicated",
    stats: CommStats | None = None,
) -> CommStats:
    """Deal each MoE layer's routed experts over `group` and swap in `ExpertParallel` (see module doc).

    `combine` defaults to "all_reduce" when the model is already tensor parallel (tokens are then
    replicated and no dispatch is needed) and to "all_to_all" otherwise. Works on `meta` as on a
    loaded model; a group of size 1 changes nothing. Returns the byte ledger.
    """
    stats = stats if stats is not None else CommStats()
    R = group_size(group)
    if R == 1:
        return stats
    if tokens not in TOKENS:
        raise ConfigError(f"tokens must be one of {', '.join(TOKENS)}, got {tokens!r}")
    if combine is None:
        combine = "all_reduce" if getattr(model, "tp_group", None) is not None else "all_to_all"
    if combine not in COMBINES:
        raise ConfigError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    if combine == "all_reduce" and tokens == "local":
        raise ConfigError("the all_reduce combine needs the same tokens on every rank (tokens='replicated')")
    if getattr(model, "ep_group", None) is not None:
        raise ConfigError("apply_ep: the model is already expert-parallel")
    E = model.config.n_routed_experts
    layers = [layer for layer in (*model.model.layers, *model.mtp) if isinstance(layer.mlp, MoE)]
    if layers and E % R:
        raise ConfigError(f"n_routed_experts ({E}) is not divisible by ep ({R}); use an ep that divides it")
    # Same ranks for TP and EP, all-reduce combine: shared (TP-split) and routed partials reduce together.
    fuse = combine == "all_reduce" and getattr(model, "tp_group", None) is group
    was_fused = model.invalidate_derived_()  # e.g. a fused [E, 2F, D] gate/up of ALL experts
    for layer in layers:
        moe = layer.mlp
        moe.experts = ExpertParallel.adopt(moe.experts, group, combine, tokens, stats)
        if fuse:
            # Routed and (TP-split) shared experts both return partial sums: ONE all-reduce of their total.
            moe.experts.reduce = False
            if moe.shared_experts is not None:
                moe.shared_experts.down_proj.tp_reduce_hook.remove()
            reduce_output(moe, group, stats, "ep.all_reduce")
    model.ep_group = group
    fuse_again(model, was_fused)
    return stats
