"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeekMoE layer (router, experts, shared experts).

Router (`noaux_tc`, DeepSeek-V3 section 2.1.2): affinities s = sigmoid(x W_g^T) in float32 (a bf16
router flips near-ties). The bias b (`e_score_correction_bias`, moved by the trainer for aux-loss-free
balancing) only steers SELECTION: group score = sum of the top-2 of s+b in each group, keep the best
`topk_group` groups (others masked with -inf, not 0: biased scores can be negative), then the top
`num_experts_per_tok` of s+b. The combine weights are the UNBIASED s of the chosen experts,
normalised when `norm_topk_prob`, times `routed_scaling_factor`.

DeepSeek-V2 routing (`model_type: deepseek_v2`): s = softmax(x W_g^T) in float32, no bias; `greedy`
takes the top `num_experts_per_tok` of s, `group_limited_greedy` first keeps the `topk_group` groups
with the largest MAX score (V2's group score, not V3's top-2 sum). Combine weights as above (V2
checkpoints set `norm_topk_prob` false, so they are s times `routed_scaling_factor`).

Legend (dispatch code): T tokens, D model dim, F expert hidden, E experts, K experts per token,
N = T*K token-expert assignments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import native
from .linear import ExpertLinear, Linear, fuse_weights, fused_weight, matmul_wt, uses_native
from .options import UNPREPARED


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden)
        self.up_proj = Linear(dim, hidden)
        self.down_proj = Linear(hidden, dim)
        self._gate_up: torch.Tensor | None = None  # see fuse_()
        self.options = UNPREPARED  # the model's InferenceOptions, from prepare_for_inference

    def fuse_(self) -> None:
        """Back gate_proj and up_proj by one [2F, D] tensor so inference reads x once (linear.fuse_weights)."""
        if fused_weight(self._gate_up, self.gate_proj, self.up_proj) is None:
            self._gate_up = fuse_weights(self.gate_proj, self.up_proj)

    def invalidate_derived_(self) -> bool:
        """Forget the fused gate/up tensor (True if there was one): call after re-assigning or slicing weights."""
        fused, self._gate_up = self._gate_up is not None, None
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = fused_weight(self._gate_up, self.gate_proj, self.up_proj)
        if gate_up is not None:
            g, u = matmul_wt(x, gate_up, self.options).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Picks experts per token: x (T, D) -> (topk_idx (T, K) long, topk_weight (T, K) float32)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        # V2 routing has no bias: the buffer is None there, so it is neither built nor expected on disk.
        bias = torch.zeros(cfg.n_routed_experts, dtype=torch.float32) if cfg.uses_correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)
        # Per-expert token counts, accumulated only in training mode; the trainer reads and resets them.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.last_scores: torch.Tensor | None = None  # (T, E) affinities of the last training forward

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the routing bias: it decides near-ties between experts.
        # The router weight stays float32 too (as transformers keeps it): the router computes in
        # float32 anyway, and a float32 copy avoids a conversion every step.
        bias, weight = self.e_score_correction_bias, self.weight
        out = super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved is not None and moved.dtype != torch.float32 and not moved.is_meta:
            self.e_score_correction_bias = bias.to(device=moved.device, dtype=torch.float32)
        if self.weight.dtype != torch.float32 and not self.weight.is_meta and weight.dtype == torch.float32:
            self.weight.data = weight.data.to(device=self.weight.device)
        return out

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        # float32 even under autocast: bf16 affinities flip near-ties between experts.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits = F.linear(x_TD.float(), self.weight.float())
            return logits.softmax(dim=-1) if self.scoring_func == "softmax" else torch.sigmoid(logits)

    def select(self, s_TE: torch.Tensor) -> torch.Tensor:
        """Expert ids (T, K) for affinities s (T, E), by the config's `topk_method`."""
        if self.topk_method == "greedy":
            return _stable_topk(s_TE, self.top_k)
        if self.topk_method == "group_limited_greedy":
            return route_tokens_max_group(s_TE, self.n_group, self.topk_group, self.top_k)
        return route_tokens(s_TE, self.e_score_correction_bias.float(), self.n_group, self.topk_group, self.top_k)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s_TE = self.scores(x_TD)
        topk_idx_TK = self.select(s_TE.detach())
        weight_TK = s_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weight_TK = weight_TK * self.scaling
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(topk_idx_TK.flatten(), minlength=self.n_experts).to(
                    self.tokens_per_expert.dtype
                )
            self.last_scores = s_TE
        return topk_idx_TK, weight_TK


def route_tokens(
    scores_TE: torch.Tensor, bias_E: torch.Tensor, n_group: int, topk_group: int, top_k: int
) -> torch.Tensor:
    """Group-limited top-k selection on biased scores -> expert ids (T, K); ties go to the lower id."""
    biased_TE = scores_TE + bias_E
    T, E = biased_TE.shape
    if n_group > 1:
        grouped = biased_TE.view(T, n_group, E // n_group)
        group_score_TG = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
        keep_TG.scatter_(1, _stable_topk(group_score_TG, topk_group), True)
        biased_TE = grouped.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
    return _stable_topk(biased_TE, top_k)


def route_tokens_max_group(scores_TE: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V2's `group_limited_greedy`: keep the groups with the largest max score, then top-k -> ids (T, K)."""
    T, E = scores_TE.shape
    grouped = scores_TE.view(T, n_group, E // n_group)
    keep_TG = torch.zeros(T, n_group, dtype=torch.bool, device=scores_TE.device)
    keep_TG.scatter_(1, _stable_topk(grouped.amax(dim=-1), topk_group), True)
    return _stable_topk(grouped.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E), top_k)


def _stable_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; equal values resolve to the lower index."""
    # A stable descending sort makes tie-breaking a documented rule instead of a kernel detail.
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


class Experts(nn.Module):
    """All routed experts, stacked, behind one seam: `compute(x_sorted, counts)` (torchtitan's GroupedExperts).

    `forward` is dispatch around it: sort the token-expert assignments by expert (`sort_by_expert`),
    `compute` the unweighted expert outputs of the sorted rows, then undo the sort, weight and sum
    (`combine`). How `compute` runs is one of `EXPERT_STRATEGIES`, picked in `choose_strategy` only;
    expert parallelism calls `compute` on rows it already grouped by expert.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = ExpertLinear(E, D, F_)
        self.up_proj = ExpertLinear(E, D, F_)
        self.down_proj = ExpertLinear(E, F_, D)
        self._gate_up: torch.Tensor | None = None  # [E, 2F, D] once fuse_() ran
        self.options = UNPREPARED  # the model's InferenceOptions, from prepare_for_inference

    def fuse_(self) -> None:
        """Back the stacked gate/up weights by one [E, 2F, D] tensor: one matmul per active expert."""
        if fused_weight(self._gate_up, self.gate_proj, self.up_proj) is None:
            self._gate_up = fuse_weights(self.gate_proj, self.up_proj)

    def invalidate_derived_(self) -> bool:
        """Forget the fused [E, 2F, D] gate/up tensor (True if there was one): call after slicing the weights."""
        fused, self._gate_up = self._gate_up is not None, None
        return fused

    @property
    def num_experts(self) -> int:
        return self.gate_proj.weight.shape[0]

    def forward(
        self,
        x_TD: torch.Tensor,
        topk_idx_TK: torch.Tensor,
        topk_weight_TK: torch.Tensor,
        strategy: str | None = None,
    ) -> torch.Tensor:
        """sum_k weight[t,k] * expert_{idx[t,k]}(x[t]) for each token (T, D)."""
        order_N, counts_E = sort_by_expert(topk_idx_TK, self.num_experts)
        K = topk_idx_TK.shape[1]
        token_N = order_N // K
        # choose_strategy reads only the sorted rows' shape, dtype and device: a broadcast view stands in for them
        if strategy is None and choose_strategy(self, x_TD[:1].expand(token_N.numel(), -1)) == "loop":
            # expert by expert: each one's rows gathered as it runs (no (N, D) copy of x, ~6x its size)
            h_ND = _experts_loop(self, x_TD, counts_E, token_N)
        else:
            h_ND = self.compute(x_TD.index_select(0, token_N), counts_E, strategy)
        return combine(h_ND, order_N, topk_weight_TK).to(x_TD.dtype)

    def compute(self, x_ND: torch.Tensor, counts_E: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
        """Unweighted SwiGLU outputs (N, D) of rows sorted by expert: rows [c_0+..+c_{e-1}, +c_e) go to expert e.

        `strategy` names one of EXPERT_STRATEGIES (default: `choose_strategy`); a named strategy that
        cannot run on these weights raises instead of falling back, so a caller knows what ran.
        """
        name = choose_strategy(self, x_ND) if strategy is None else strategy
        if name not in EXPERT_STRATEGIES:
            raise ValueError(f"unknown expert strategy {name!r}; valid: {sorted(EXPERT_STRATEGIES)}")
        if name == "grouped" and not _grouped_mm_fits(self, x_ND):
            raise ValueError("expert strategy 'grouped' needs torch._grouped_mm and bf16/fp32 weights in x's dtype")
        if name == "native" and not _native_fits(self, x_ND):
            raise ValueError("expert strategy 'native' needs the native CPU kernels and fp32, bf16 or int8 weights")
        return EXPERT_STRATEGIES[name](self, x_ND, counts_E)

    def gate_up_weights(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The fused [E, 2F, D] gate/up weights when they still back the layers and match `dtype`, else None."""
        gate_up = fused_weight(self._gate_up, self.gate_proj, self.up_proj)
        return gate_up if gate_up is not None and gate_up.dtype == dtype else None


def sort_by_expert(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order_N, counts_E): the N = T*K assignments sorted by expert (stable), and rows per expert.

    Sorted row n is assignment order_N[n], i.e. token order_N[n] // K.
    """
    idx_N = topk_idx_TK.flatten()
    # A scatter-add, not bincount: its output size never depends on the ids (compilable, static shapes).
    counts_E = idx_N.new_zeros(num_experts).scatter_add_(0, idx_N, torch.ones_like(idx_N))
    return torch.argsort(idx_N, stable=True), counts_E


def combine(h_ND: torch.Tensor, order_N: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
    """Undo `sort_by_expert` on the expert outputs, weight them, sum over k: (T, D) in h's dtype, no scatter-add."""
    if native.fits_combine(h_ND, order_N, topk_weight_TK):  # one pass over h, no (N, D) temporaries
        return native.combine(h_ND, order_N, topk_weight_TK)
    T, K = topk_weight_TK.shape
    y_ND = torch.empty_like(h_ND)
    y_ND[order_N] = h_ND  # every token has exactly K rows
    return (y_ND.view(T, K, -1) * topk_weight_TK[..., None].to(h_ND.dtype)).sum(dim=1)


def experts_reference(experts: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The plain spec of `Experts.compute`: row by row, down(silu(gate(x)) * up(x)) with its expert's weights."""
    dtype = x_ND.dtype
    out = x_ND.new_empty(x_ND.shape[0], experts.down_proj.out_features)
    expert_of_row = torch.repeat_interleave(torch.arange(experts.num_experts, device=x_ND.device), counts_E)
    for n, e in enumerate(expert_of_row.tolist()):
        x = x_ND[n]
        g = experts.gate_proj.expert_weight(e, dtype) @ x
        u = experts.up_proj.expert_weight(e, dtype) @ x
        out[n] = experts.down_proj.expert_weight(e, dtype) @ (F.silu(g) * u)
    return out


def _experts_grouped(experts: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """One grouped GEMM per projection over all experts (torch._grouped_mm); best when experts see many rows."""
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    gate_up = experts.gate_up_weights(x_ND.dtype)
    if gate_up is not None:
        g, u = torch._grouped_mm(x_ND, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
    else:
        g = torch._grouped_mm(x_ND, experts.gate_proj.weight.transpose(-2, -1), offs=offs)
        u = torch._grouped_mm(x_ND, experts.up_proj.weight.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(F.silu(g) * u, experts.down_proj.weight.transpose(-2, -1), offs=offs)


def _experts_loop(
    experts: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor, row_N: torch.Tensor | None = None
) -> torch.Tensor:
    """A matmul per ACTIVE expert over its rows: reads only the chosen experts' weights (decode, FP8).

    One host sync for the counts, none per expert. A one-token batch is K rows on K experts: this path.
    With `row_N`, sorted row n is x_ND[row_N[n]] (each expert gathers its own rows).
    """
    N = x_ND.shape[0] if row_N is None else row_N.numel()
    out = x_ND.new_empty(N, experts.down_proj.out_features)
    dtype, options = x_ND.dtype, experts.options
    gate_up = experts.gate_up_weights(dtype)
    begin = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        rows = x_ND[begin : begin + n] if row_N is None else x_ND.index_select(0, row_N[begin : begin + n])
        if gate_up is not None:
            g, u = matmul_wt(rows, gate_up[e], options).chunk(2, dim=-1)
        else:
            g = experts.gate_proj.expert_matmul(e, rows, options)
            u = experts.up_proj.expert_matmul(e, rows, options)
        out[begin : begin + n] = experts.down_proj.expert_matmul(e, F.silu(g) * u, options)
        begin += n
    return out


def _experts_dequantized(experts: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """`_experts_grouped` group by group for 8-bit experts: each active expert's weights dequantized to x's dtype,
    then the GEMMs one group of the grouped call runs (gate and up as one [2F, D] weight).

    Why: an FP8 checkpoint kept as FP8 must give the logits of the same checkpoint dequantized at load
    (`fp8_compute="dequant"`), which runs "grouped" on a prompt; torch's grouped GEMM on CPU is a GEMM per
    group, so these are its bits (tests/model/test_components.py checks that on this torch), while the native
    kernels' order, which the loop takes for an expert's few rows, is another."""
    out = x_ND.new_empty(x_ND.shape[0], experts.down_proj.out_features)
    dtype = x_ND.dtype
    begin = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        rows = x_ND[begin : begin + n]
        gate_up = torch.cat([experts.gate_proj.expert_weight(e, dtype), experts.up_proj.expert_weight(e, dtype)])
        g, u = F.linear(rows, gate_up).chunk(2, dim=-1)
        out[begin : begin + n] = F.linear(F.silu(g) * u, experts.down_proj.expert_weight(e, dtype))
        begin += n
    return out


def _experts_gather(experts: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Each row's expert weights gathered, then batched matmuls: no host sync, no data-dependent shape.

    What a compiled (or CUDA-graph captured) decode step runs: shapes depend on N only.
    """
    N = x_ND.shape[0]
    dtype = x_ND.dtype
    # Expert of sorted row n = number of cumulative counts <= n.
    expert_N = torch.searchsorted(torch.cumsum(counts_E, 0), torch.arange(N, device=x_ND.device), right=True)
    gate_up = experts.gate_up_weights(dtype)
    x_ND1 = x_ND[:, :, None]
    if gate_up is not None:
        g, u = torch.bmm(gate_up[expert_N], x_ND1).squeeze(-1).chunk(2, dim=-1)
    else:
        g = torch.bmm(_gathered(experts.gate_proj, expert_N, dtype), x_ND1).squeeze(-1)
        u = torch.bmm(_gathered(experts.up_proj, expert_N, dtype), x_ND1).squeeze(-1)
    h = (F.silu(g) * u)[:, :, None]
    return torch.bmm(_gathered(experts.down_proj, expert_N, dtype), h).squeeze(-1)


def _experts_native(experts: Experts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """One call into kernels.native for all active experts: each chosen expert's weights read once (decode)."""
    gate, up, down = experts.gate_proj, experts.up_proj, experts.down_proj
    scales = (gate.weight_scale, up.weight_scale, down.weight_scale) if gate.is_int8 else (None, None, None)
    fp8 = expert_fp8_grids(experts, x_ND.dtype)
    return native.experts(x_ND, counts_E, gate.weight, up.weight, down.weight, *scales, fp8=fp8)


def expert_fp8_grids(experts: Experts, dtype: torch.dtype) -> tuple | None:
    """The FP8 experts' block-scale grids (gate, up, down) for kernels.native, dequantizing to `dtype`; else None."""
    projections = (experts.gate_proj, experts.up_proj, experts.down_proj)
    if not experts.gate_proj.is_fp8:
        return None
    return tuple(native.Fp8Grid.of(p.weight_scale_inv, p.block_size, dtype) for p in projections)


def _native_fits(experts: Experts, x_ND: torch.Tensor) -> bool:
    """Whether `_experts_native` takes these weights: fp32, bf16, int8 or FP8 (block scales as
    `native.fits_fp8` takes them), rows contiguous, gate and up alike."""
    projections = (experts.gate_proj, experts.up_proj, experts.down_proj)
    gate, up, down = (p.weight for p in projections)
    D, F_ = experts.gate_proj.in_features, experts.gate_proj.out_features
    fp8 = gate.dtype == torch.float8_e4m3fn
    return (
        native.available()
        and x_ND.device.type == "cpu"
        and x_ND.dtype in (torch.bfloat16, torch.float32)
        and gate.dtype in (torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn)
        and gate.dtype == up.dtype == down.dtype
        and (not fp8 or all(native.fits_fp8(p.weight, p.weight_scale_inv, p.block_size) for p in projections))
        and gate.stride()[1:] == up.stride()[1:] == (D, 1)
        and gate.stride(0) == up.stride(0)
        and down.stride()[1:] == (F_, 1)
        and gate.device.type == "cpu"
    )


def _gathered(proj: ExpertLinear, expert_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, out, in] weights of the experts `expert_N` in `dtype` (8-bit ones dequantized after the gather)."""
    return proj.gathered_weight(expert_N, dtype)


# The ways to run `Experts.compute`; `choose_strategy` is the one place that picks among them.
EXPERT_STRATEGIES: dict[str, Callable[[Experts, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grouped": _experts_grouped,
    "loop": _experts_loop,
    "gather": _experts_gather,
    "native": _experts_native,
    "dequantized": _experts_dequantized,
    "reference": experts_reference,
}
# Average rows per expert from which the grouped GEMM beats the loop over active experts.
GROUPED_MM_MIN_ROWS_PER_EXPERT = 1


def _grouped_mm_fits(experts: Experts, x_ND: torch.Tensor, weight_dtype: torch.dtype | None = None) -> bool:
    """Whether `_experts_grouped` takes these rows; `weight_dtype`: as if the weights were of that dtype."""
    D, F_ = experts.gate_proj.in_features, experts.gate_proj.out_features
    if weight_dtype is None:
        weight_dtype = None if experts.gate_proj.is_fp8 or experts.gate_proj.is_int8 else experts.gate_proj.weight.dtype
    return (
        hasattr(torch, "_grouped_mm")
        # _grouped_mm wants every row stride a multiple of 16 bytes (bf16 with 20-wide experts is not)
        and (D * x_ND.element_size()) % 16 == 0
        and (F_ * x_ND.element_size()) % 16 == 0
        and x_ND.dtype == weight_dtype
        and x_ND.dtype in (torch.bfloat16, torch.float32)
        and x_ND.shape[0] > 0
    )


def choose_strategy(experts: Experts, x_ND: torch.Tensor) -> str:
    """The strategy `Experts.compute` runs by default for these rows.

    - while torch.compile traces: "gather" (the others read the counts on the host: a graph break);
    - one grouped GEMM once experts see several rows each (prefill, large batches), where it fits,
      unless bf16 products are to run in fp32 (`InferenceOptions.matmul_dtype`): then the loop, which
      widens one expert's weights at a time (the grouped GEMM would need all experts' in fp32);
    - int8 experts seeing many rows: the loop, which picks per expert (512-token int8 prefill of `small` on a CPU
      with AMX, `generate` to the first token: 511 ms, against 704 ms with "native", whose int8 x int16 products
      are built for decode, and 726 ms with a grouped GEMM over chunks of dequantized experts);
    - FP8 experts (fp8_compute 'dequant') where the same checkpoint dequantized at load would run the grouped
      GEMM: its products group by group, each active expert dequantized in turn (the same bits, and never
      the whole stack in 16 bits);
    - otherwise the active experts only, each one's weights read once: in one call into the native
      kernels where the model's `matvec` is "native" and they take these weights, else a loop (decode).
    """
    if torch.compiler.is_compiling():
        return "gather"
    many_rows = x_ND.shape[0] >= GROUPED_MM_MIN_ROWS_PER_EXPERT * experts.num_experts
    if many_rows and experts.options.matmul_dtype == "fp32" and x_ND.dtype == torch.bfloat16:
        return "loop"  # fp32 products expert by expert: one expert's widened weights at a time
    if many_rows and _grouped_mm_fits(experts, x_ND):
        return "grouped"
    if many_rows and experts.gate_proj.is_int8:
        return "loop"  # per expert: the int8 kernel for a few rows, a GEMM on its dequantized weights for more
    if many_rows and experts.gate_proj.is_fp8 and experts.options.fp8_compute == "dequant":
        if _grouped_mm_fits(experts, x_ND, weight_dtype=x_ND.dtype):
            return "dequantized"  # what "grouped" computes on this checkpoint dequantized at load
    if experts.options.matvec == "native" and not torch.is_grad_enabled() and _native_fits(experts, x_ND):
        return "native"
    return "loop"


class MoE(nn.Module):
    """Routed experts + shared experts: y = experts(x, route(x)) + shared_experts(x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        if self._routes_natively(x_TD):
            y_TD = self.routed_native(x_TD)
        else:
            topk_idx_TK, topk_weight_TK = self.gate(x_TD)
            y_TD = self.experts(x_TD, topk_idx_TK, topk_weight_TK)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(shape)

    def routed_native(self, x_TD: torch.Tensor, with_routing: bool = False):
        """`experts(x, *gate(x))` in one call into kernels.native (decode-sized inputs): routing, experts, combine.

        The same rules as `Router` (ties to the lower expert id), the same roundings as `Experts.forward`;
        ~35 torch ops per layer become one call. With `with_routing` also the ids and combine weights.
        """
        gate, experts = self.gate, self.experts
        rules = {
            "scoring_func": gate.scoring_func,
            "topk_method": gate.topk_method,
            "n_group": gate.n_group,
            "topk_group": gate.topk_group,
            "top_k": gate.top_k,
            "norm_topk_prob": gate.norm_topk_prob,
            "scaling": gate.scaling,
        }
        g, u, d = experts.gate_proj, experts.up_proj, experts.down_proj
        scales = (g.weight_scale, u.weight_scale, d.weight_scale) if g.is_int8 else (None, None, None)
        bias = gate.e_score_correction_bias
        fp8 = expert_fp8_grids(experts, x_TD.dtype)
        return native.moe(x_TD, gate.weight, bias, rules, g.weight, u.weight, d.weight, scales, with_routing, fp8)

    def _routes_natively(self, x_TD: torch.Tensor) -> bool:
        """Whether `routed_native` runs: decode-sized rows under matvec='native', inference, the plain modules
        (no expert parallelism, no hooks on the router or experts that would be skipped)."""
        gate, experts = self.gate, self.experts
        bias = gate.e_score_correction_bias
        return (
            not self.training
            and type(gate) is Router
            and type(experts) is Experts
            and uses_native(x_TD, experts.options.matvec)
            and not (gate._forward_hooks or gate._forward_pre_hooks)
            and not (experts._forward_hooks or experts._forward_pre_hooks)
            and gate.topk_method in native.ROUTING_METHODS
            and gate.scoring_func in native.SCORING_FUNCS
            and gate.weight.dtype == torch.float32
            and gate.weight.is_contiguous()
            and gate.weight.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and _native_fits(experts, x_TD)
        )
