"""DecoderLayer, the MTP module and DeepSeekV3, the whole model.

Module attribute names are the official checkpoint names (`model.layers.3.self_attn.kv_b_proj.weight`).
Two bridges live in `dsv3.checkpoint.names`, nowhere else: routed experts are stacked per projection
(`mlp.experts.gate_proj.weight` is [E, F, D]), and the MTP layers (`model.layers.{L+k}.*` on disk)
live in `mtp.{k}` so the main stack never sees them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from . import native_decode
from .attention import MLA
from .cache import CacheBatch
from .linear import ExpertLinear, Linear
from .moe import MLP, MoE, Router
from .norm import RMSNorm
from .options import InferenceOptions
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)); ffn is dense or MoE."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool) -> None:
        super().__init__()
        self.self_attn = MLA(cfg, layer_idx)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheBatch | None = None
    ) -> torch.Tensor:
        weights = native_decode.plan(self, x, cache)
        if weights is not None:  # decode-sized on CPU: the whole layer in one native call, same result
            return native_decode.forward(self, weights, x, cos, sin, cache)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = Linear(cfg.hidden_size, cfg.vocab_size)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module k (V3 section 2.2): predicts token t+k+1 from h_t and token t+k.

    h' = eh_proj(cat[enorm(embed(token_{t+1})), hnorm(h_t)]) -> one MoE decoder layer at the ORIGINAL
    positions -> shared_head.norm -> shared_head.head. It is always MoE, whatever its index.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, moe=True)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def forward(  # type: ignore[override]
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: CacheBatch | None = None,
        logits_at: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B,T,D) of the main model, next token ids (B,T)) -> (logits (B,T,V), this module's hidden).

        With `logits_at`, only row b's position logits_at[b] gets logits: (B, V) (a draft needs one position,
        and the head is a full-vocabulary product per position)."""
        e = self.enorm(self.embed_tokens(next_ids))
        h = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))
        h = super().forward(h, cos, sin, cache)
        if logits_at is not None:
            picked = h[torch.arange(h.shape[0], device=h.device), torch.as_tensor(list(logits_at), device=h.device)]
            return self.shared_head.head(self.shared_head.norm(picked[:, None]), widen=True)[:, 0], h
        return self.shared_head.head(self.shared_head.norm(h), widen=True), h


class Backbone(nn.Module):
    """`model.*` of the checkpoint: embedding, decoder layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, moe=cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepSeekV3(nn.Module):
    """DeepSeek-V3: input ids (B, T) -> float logits (B, T, V); optional latent cache and MTP module."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None) -> None:
        """Random weights (`initializer_range`) unless built on the `meta` device; `dtype` defaults to torch's."""
        super().__init__()
        self.config = cfg
        self.inference_options: InferenceOptions | None = None  # set by prepare_for_inference
        if dtype is not None:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
        try:
            self._build(cfg)
        finally:
            if dtype is not None:
                torch.set_default_dtype(previous)
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def _build(self, cfg: ModelConfig) -> None:
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: that of the embedding table (as transformers' models report it)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the model runs: the embedding table's device."""
        return self.model.embed_tokens.weight.device

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Random init as HF does: N(0, initializer_range) weights, unit norms, zero router bias."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(torch.initial_seed() if seed is None else seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (Linear, ExpertLinear, nn.Embedding, Router)) and not module.weight.is_meta:
                w = module.weight
                if w.dtype == torch.float8_e4m3fn:
                    continue
                w.normal_(0.0, std, generator=gen)
                if isinstance(module, Router):
                    # The router is kept in float32 but saved in the model's dtype: draw values that
                    # survive that round trip exactly.
                    w.copy_(w.to(self.model.embed_tokens.weight.dtype))
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            if isinstance(module, Router) and module.e_score_correction_bias is not None:
                module.e_score_correction_bias.zero_()

    @torch.no_grad()
    def prepare_for_inference(self, options: InferenceOptions | None = None) -> DeepSeekV3:
        """Apply `options` (default: the options applied last, else `InferenceOptions()`): the one place they take effect.

        Validates them against this model (`InferenceOptions.resolve`: FP8 compute mode, UE8M0
        activation scales from the config's `scale_fmt`, the matrix-vector backend), hands the resolved
        object to every module that computes with it and fuses the projections when asked (the
        training mode is left as it is). Idempotent; call again after re-assigning weights to re-fuse them.
        """
        if options is None:
            options = self.inference_options or InferenceOptions()
        resolved = options.resolve(self.config)
        if resolved == self.inference_options:  # the same object: the decode plans (identity checks) stay current
            resolved = self.inference_options
        quantized = any(isinstance(m, Linear) and m.is_int8 for m in self.modules())
        if quantized and resolved.quantize is None:
            raise ConfigError("this model's weights are int8 already (quantize='int8'); reload it to undo that")
        if resolved.quantize == "int8":
            self._quantize_int8_(resolved.quantize_lm_head)
        for module in self.modules():
            if hasattr(module, "options"):
                module.options = resolved
        self.inference_options = resolved
        if resolved.fuse_projections:
            self.fuse_projections_()
        return self

    @torch.no_grad()
    def _quantize_int8_(self, lm_head: bool) -> None:
        """Every projection (and lm_head / the MTP head when `lm_head`) to int8 with per-channel scales; idempotent."""
        heads = {self.lm_head, *(m.shared_head.head for m in self.mtp)}
        scale_dtype = torch.float32  # kernels.native takes fp32 scales; linear_int8 casts to the input's dtype
        for module in self.modules():
            # Derived from the high-precision weights: fused projections and absorbed MLA weights go.
            for name in ("_gate_up", "_x_proj", "_absorbed_cache"):
                if getattr(module, name, None) is not None:
                    setattr(module, name, None)
            if isinstance(module, (Linear, ExpertLinear)) and (lm_head or module not in heads):
                module.quantize_int8_(scale_dtype)

    @torch.no_grad()
    def fuse_projections_(self) -> DeepSeekV3:
        """Fuse the projections that read the same input (q_a+kv_a, gate+up) for inference; idempotent.

        Parameters and state_dict names are unchanged (each weight becomes a view of the fused
        tensor); anything that re-assigns a weight later simply falls back to the unfused path.
        """
        for module in self.modules():
            fuse = getattr(module, "fuse_", None)
            if fuse is not None and module is not self:
                fuse()
        return self

    @torch.no_grad()
    def invalidate_derived_(self) -> bool:
        """Forget every tensor derived from the weights (fused projections, absorbed MLA weights); True if any
        were fused. Code that slices or re-assigns weights in place (tensor/expert parallelism) calls it first."""
        fused = False
        for module in self.modules():
            if module is not self and hasattr(module, "invalidate_derived_"):
                fused |= module.invalidate_derived_()
        return fused

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: CacheBatch | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) in float32 for input_ids (B, T) at positions (default 0..T-1, or after the cache)."""
        return self.logits(self.hidden_states(input_ids, positions, cache))

    def hidden_states(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: CacheBatch | None = None
    ) -> torch.Tensor:
        """Final-norm input (B, T, D): the main stack's output before `model.norm`."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        if positions is None and cache is not None:
            stack = native_decode.plan_stack(self.model.layers, x, cache)
            if stack is not None:  # decode-sized on CPU: every layer's one native call, in one call
                return native_decode.forward_stack(self.model.layers, stack, x, self.rotary, cache)
        if positions is None:
            positions = (
                cache.positions(T) if cache is not None else torch.arange(T, device=input_ids.device).expand(B, T)
            )
        cos, sin = self.rotary(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden), widen=True)

    def mtp_logits(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        depth: int = 0,
        cache: CacheBatch | None = None,
        logits_at: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth`: (hidden (B,T,D) at t, ids at t+1+depth) -> (logits for t+2+depth, its hidden).

        `hidden` is the main model's `hidden_states` (depth 0) or the previous MTP module's output.
        Positions are the ORIGINAL positions t of `hidden`. `logits_at[b]`: only that position of row b
        gets logits, (B, V) (speculative drafting).
        """
        if not self.mtp:
            raise ValueError("this model has no MTP module (num_nextn_predict_layers is 0)")
        B, T = next_ids.shape
        if positions is None:
            positions = (
                cache.positions(T) if cache is not None else torch.arange(T, device=next_ids.device).expand(B, T)
            )
        cos, sin = self.rotary(positions)
        return self.mtp[depth](hidden, next_ids, cos, sin, cache, logits_at)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = torch.bfloat16,
        device: torch.device | str = "cpu",
        fp8: bool = False,
        mtp: bool | None = None,
        **options: object,
    ) -> DeepSeekV3:
        """Load a checkpoint directory in the official layout (bf16/fp32/FP8 safetensors, sharded), ready to infer.

        FP8 weights are dequantized to `dtype` while streaming, unless `fp8=True` keeps them in FP8.
        The MTP layers are loaded when `mtp` (default: the config's `num_nextn_predict_layers > 0`).
        `options` are `InferenceOptions` fields (e.g. `fp8_compute="gemm"`), applied by
        `prepare_for_inference`; an unknown name is a ConfigError, raised before anything is read.
        """
        # The one upward call (STYLE): checkpoint/ never imports model/, so there is no cycle.
        from ..checkpoint.load import load_model

        inference = InferenceOptions.from_kwargs(**options)
        return load_model(cls, path, dtype=dtype, device=device, fp8=fp8, mtp=mtp).prepare_for_inference(inference)

    def save_pretrained(self, out_dir: str | os.PathLike, fp8: bool = False, max_shard_bytes: int = 4 << 30) -> None:
        """Write the official layout (config.json, sharded safetensors, index) atomically."""
        from ..checkpoint.save import save_model

        save_model(self, out_dir, fp8=fp8, max_shard_bytes=max_shard_bytes)

    def num_parameters(self, include_mtp: bool = False) -> int:
        """Checkpoint tensors' element count, as the seed counts it (the router bias buffers included)."""
        tensors = list(self.named_parameters()) + [
            (n, b) for n, b in self.named_buffers() if n.endswith("e_score_correction_bias")
        ]
        return sum(t.numel() for n, t in tensors if include_mtp or not n.startswith("mtp."))
