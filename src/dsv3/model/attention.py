"""Multi-head Latent Attention (MLA, DeepSeek-V2 section 2.1; V3 section 2.1.1).

Queries: q = q_b_proj(rmsnorm(q_a_proj(x))) (or q_proj(x) without q LoRA), split per head into a
"nope" part (qk_nope_head_dim) and a rope part (qk_rope_head_dim).
Keys/values: kv_a_proj_with_mqa(x) gives the latent c (kv_lora_rank, then kv_a_layernorm) and ONE
rope key shared by all heads; kv_b_proj expands c into per-head k_nope and v.

Two ways to compute the same attention:
- expanded (prefill, many queries): run kv_b_proj over every cached latent and attend per head;
- absorbed (decode, few queries): fold W_UK (the k_nope rows of kv_b_proj) into the query and
  apply W_UV (the v rows) after attending over the latent itself, so the cache is read as is:
    q_nope . (W_UK c) = (W_UK^T q_nope) . c      and      sum_j p_j W_UV c_j = W_UV (sum_j p_j c_j).
The cheaper one is picked per call by counting multiply-adds (`_absorbed_is_cheaper`).

Legend: B batch, T new tokens, S keys, H heads, R kv_lora_rank, Dn/Dr/Dv nope/rope/value head dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LATENT_NORM_EPS, ModelConfig
from ..kernels import native
from .cache import CacheBatch
from .linear import Linear, fuse_weights, fused_weight, matmul_wt, uses_native, widens
from .norm import RMSNorm
from .options import UNPREPARED
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        self.softmax_scale = cfg.softmax_scale
        H, D = cfg.num_attention_heads, cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * self.qk_head_dim)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * self.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        # The latent norms use eps 1e-6 whatever rms_norm_eps says (Moonlight's is 1e-5), as the reference
        # code (DeepSeek's, transformers') builds them: the config's eps there flips routing decisions.
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(H * self.v_dim, D)
        self._absorbed_cache: tuple | None = None  # (key, W_UK, W_UV) prepared once per weight version
        self._x_proj: torch.Tensor | None = None  # q_a_proj (or q_proj) + kv_a_proj_with_mqa, see fuse_()
        self.options = UNPREPARED  # the model's InferenceOptions, from prepare_for_inference

    def invalidate_derived_(self) -> bool:
        """Forget what was derived from the weights (fused input projections, absorbed W_UK/W_UV); True if the
        projections were fused. Call after re-assigning or slicing weights in place (tensor parallelism)."""
        fused, self._x_proj, self._absorbed_cache = self._x_proj is not None, None, None
        return fused

    def _input_projections(self) -> tuple[Linear, Linear]:
        return (self.q_proj if self.q_lora_rank is None else self.q_a_proj), self.kv_a_proj_with_mqa

    def fuse_(self) -> None:
        """Back the two projections of x (queries, latent) by one tensor: one matmul reads x once."""
        if fused_weight(self._x_proj, *self._input_projections()) is None:
            self._x_proj = fuse_weights(*self._input_projections())

    def _project_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_proj(x) or q_a_proj(x), kv_a_proj_with_mqa(x)), fused into one matmul when possible."""
        q_layer, kv_layer = self._input_projections()
        fused = fused_weight(self._x_proj, q_layer, kv_layer)
        if fused is None:
            return q_layer(x), kv_layer(x)
        return matmul_wt(x, fused, self.options).split([q_layer.out_features, kv_layer.out_features], dim=-1)

    # ------------------------------------------------------------------ pieces
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool) -> torch.Tensor:
        """apply_rope, through kernels.native for decode-sized inputs (`fast`): one call instead of ~8 ops."""
        if fast and native.fits_elementwise(x, cos, sin) and cos.dtype == sin.dtype == torch.float32:
            return native.rope(x, cos, sin)
        return apply_rope(x, cos, sin)

    def _queries(
        self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q_proj(x) or q_a_proj(x) -> (q_nope (B,T,H,Dn), rotated q_rope (B,T,H,Dr)).

        The head count comes from the tensor, so tensor parallelism can shard q_b_proj by heads.
        """
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.unflatten(-1, (-1, self.qk_head_dim))
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self._rope(q_rope, cos, sin, fast)

    def _latent(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """kv_a_proj_with_mqa(x) -> what the cache stores: [normed latent (R), rotated rope key (Dr)]."""
        c, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(c), self._rope(k_rope, cos, sin, fast)], dim=-1)

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK (H, Dn, R), W_UV^T (H, R, Dv)) from kv_b_proj, contiguous, prepared once per weight version.

        FP8 weights are dequantized here once, not on every decode step (the official code does).
        """
        if torch.compiler.is_compiling() and self._absorbed_cache is not None:
            return self._absorbed_cache[1], self._absorbed_cache[2]  # prepared eagerly before compiling
        w = self.kv_b_proj.weight
        # Inference tensors (made under torch.inference_mode, e.g. quantized there) have no version counter.
        key = (w.data_ptr(), 0 if w.is_inference() else w._version, dtype, w.device)
        if self._absorbed_cache is None or self._absorbed_cache[0] != key or torch.is_grad_enabled():
            full = self.kv_b_proj.dequantized_weight(dtype)  # FP8 / int8 dequantized, else cast
            full = full.view(-1, self.nope_dim + self.v_dim, self.kv_lora_rank)
            w_uk = full[:, : self.nope_dim]
            w_uv_t = full[:, self.nope_dim :].transpose(1, 2)
            if torch.is_grad_enabled():  # never cache a graph
                return w_uk, w_uv_t
            self._absorbed_cache = (key, w_uk.contiguous(), w_uv_t.contiguous())
        return self._absorbed_cache[1], self._absorbed_cache[2]

    def _absorbed_is_cheaper(self, num_queries: int) -> bool:
        # Per key and head: absorbed costs T*(2R+Dr); expanded costs R*(Dn+Dv) for kv_b_proj + T*(Dn+Dr+Dv).
        R, T = self.kv_lora_rank, num_queries
        absorbed = T * (2 * R + self.rope_dim)
        expanded = R * (self.nope_dim + self.v_dim) + T * (self.nope_dim + self.rope_dim + self.v_dim)
        return absorbed < expanded

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: CacheBatch | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With a cache, the new latents are appended and all cached keys used."""
        B, T, _ = x.shape
        q, kv_a = self._project_input(x)
        fast = uses_native(x, self.options.matvec)  # decode-sized: the native kernels where they apply
        q_nope, q_rope = self._queries(q, cos, sin, fast)
        kv_new = self._latent(kv_a, cos, sin, fast)  # (B, T, R+Dr)
        if cache is None:
            kv, mask = kv_new, None  # causal over the T tokens
        else:
            kv = cache.update(self.layer_idx, kv_new)  # (B, S, R+Dr)
            # An empty cache and right-padded rows need only the plain causal mask (fused kernel).
            mask = None if cache.is_fresh(T) else cache.attention_mask(T, x.device)  # (B, T, S)
        if absorb is None:
            absorb = cache is not None and self._absorbed_is_cheaper(T)
        if not absorb:
            attend = self._attend_expanded
        elif fast and x.dtype in (torch.bfloat16, torch.float32):  # the kernel's activation types
            attend = self._attend_absorbed_native
        else:
            attend = self._attend_absorbed
        out = attend(q_nope, q_rope, kv.to(x.dtype), mask)
        return self.o_proj(out.flatten(2))  # (B, T, H*Dv) -> (B, T, D)

    def _attend_expanded(self, q_nope, q_rope, kv, mask) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        c, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_heads = self.kv_b_proj(c).unflatten(-1, (-1, self.nope_dim + self.v_dim))  # (B, S, H, Dn+Dv)
        wide = widens(q_nope[..., 0].reshape(B * T, H), self.options)  # B*T rows (not a copy of every query)
        if (
            mask is None
            and S == T
            and wide
            and not torch.compiler.is_compiling()
            and native.fits_prefill_attend(q_nope, q_rope, kv_heads, k_rope)
        ):
            # A fresh prompt with fp32 products (no BF16 instructions): one native pass over the operands as
            # they are, v at its own width (torch's flash kernel below needs it padded to the q/k width).
            return native.prefill_attend(q_nope, q_rope, kv_heads, k_rope, self.v_dim, self.softmax_scale)
        k_nope, v = kv_heads.split([self.nope_dim, self.v_dim], dim=-1)  # (B, S, H, Dn), (B, S, H, Dv)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)  # (B, H, T, Dn+Dr)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, H, self.rope_dim)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.v_dim < self.qk_head_dim:
            # Zero-pad v to the q/k head dim: torch's fused (flash) CPU kernel needs equal head dims,
            # and without it a 4096-token prefill materialises every (T, S) score matrix: 5x slower.
            v = F.pad(v, (0, self.qk_head_dim - self.v_dim))
        dtype = q.dtype
        if wide:  # bf16 flash attention is emulated on AVX2: fp32
            q, k, v = q.float(), k.float(), v.float()
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.softmax_scale)
        return out[..., : self.v_dim].transpose(1, 2).to(dtype)  # (B, T, H, Dv)

    def _attend_absorbed(self, q_nope, q_rope, kv, mask) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S, R = kv.shape[1], self.kv_lora_rank
        w_uk, w_uv_t = self.absorbed_weights(q_nope.dtype)
        # Fold W_UK into the query, one batched matmul over heads: (H, B*T, Dn) x (H, Dn, R) -> (H, B*T, R).
        q_latent = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)
        # One query row per (t, h) against the cache as stored, [latent, rope key]: (B, T*H, R+Dr).
        q = torch.cat([q_latent.transpose(0, 1).reshape(B, T, H, R), q_rope], dim=-1).reshape(B, T * H, -1)
        # kv @ q^T reads the cache rows in place (no transposed copy of the cache); the small
        # (S, T*H) result is then laid out (T*H, S) so the softmax runs over contiguous rows.
        scores = torch.matmul(kv, q.transpose(1, 2)).transpose(1, 2)
        scores = scores.to(torch.float32, memory_format=torch.contiguous_format) * self.softmax_scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None].expand(B, T, S)
        scores = scores.view(B, T, H, S).masked_fill(~mask[:, :, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype).view(B, T * H, S)
        # probs @ kv reads the cache as stored; the rope columns of the result are dropped.
        o_latent = torch.matmul(probs, kv)[..., :R]  # (B, T*H, R)
        o_latent = o_latent.reshape(B * T, H, R).transpose(0, 1)  # (H, B*T, R)
        out = torch.bmm(o_latent, w_uv_t)  # (H, B*T, Dv)
        return out.transpose(0, 1).reshape(B, T, H, -1)

    def _attend_absorbed_native(self, q_nope, q_rope, kv, mask) -> torch.Tensor:
        """`_attend_absorbed` in one call into kernels.native: the same four products, each operand read in place.

        Scores and probabilities stay float32 (the torch path rounds probabilities to the cache dtype).
        """
        w_uk, w_uv_t = self.absorbed_weights(q_nope.dtype)  # (H, Dn, R), (H, R, Dv)
        return native.mla_attend(q_nope, q_rope, kv, w_uk, w_uv_t, self.softmax_scale, mask)
