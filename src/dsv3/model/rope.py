"""Rotary embeddings with YaRN, on interleaved pairs (x0,x1),(x2,x3),... as in the official code.

YaRN (Peng et al. 2023; DeepSeek-V3 `precompute_freqs_cis`): dimensions that rotate fast
(> beta_fast turns over the original context) keep their frequency, slow ones (< beta_slow turns)
are interpolated by `factor`, and a linear ramp blends the band between the two correction dims.
YaRN is applied whenever the config asks for it, whatever the sequence length: switching it off
for short inputs (as one code path of the official repo does) changes every logit.

The YaRN attention temperature for V3 lives in the softmax scale (`ModelConfig.softmax_scale`);
cos/sin carry `mscale(factor, mscale) / mscale(factor, mscale_all_dim)`, which is 1 for V3.
"""

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension index that turns `num_rotations` times over `max_pos` positions."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq of shape [qk_rope_head_dim // 2] in float32, cos/sin multiplier) for the config."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    rs = cfg.rope_scaling or {}
    attn_factor = 1.0
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / float(rs["factor"])
    elif cfg.rope_type == "yarn":
        factor = float(rs["factor"])
        beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)
        orig = int(rs["original_max_position_embeddings"])
        low = max(math.floor(_correction_dim(beta_fast, dim, base, orig)), 0)
        high = min(math.ceil(_correction_dim(beta_slow, dim, base, orig)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
        # ramp 0 -> keep the original (extrapolated) frequency, ramp 1 -> interpolate by factor.
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
        # As transformers (and DeepSeek's code when both are given): an explicit attention_factor wins, else
        # mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1 for V3, where they are equal), else
        # mscale(factor) when either is missing.
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if rs.get("attention_factor") is not None:
            attn_factor = float(rs["attention_factor"])
        elif mscale and mscale_all_dim:
            attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attn_factor = yarn_mscale(factor, 1.0)
    return inv_freq.float(), attn_factor


class RotaryEmbedding(nn.Module):
    """Maps positions [B, T] to (cos, sin) of shape [B, T, qk_rope_head_dim // 2] in float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, self.attn_factor = rope_frequencies(cfg)
        # A plain attribute, not a buffer: it is derived from the config, never saved, and must
        # survive building on `meta` followed by `load_state_dict(assign=True)`.
        self._inv_freq = {torch.device("cpu"): inv_freq}
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = positions.device
        if dev not in self._inv_freq:
            self._inv_freq[dev] = self._inv_freq[torch.device("cpu")].to(dev)
        angles = positions.float()[..., None] * self._inv_freq[dev]
        return angles.cos() * self.attn_factor, angles.sin() * self.attn_factor

    def table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [>= length, d/2] on CPU: row p is `forward` at position p (the same elementwise ops), for the
        native decode pass, which reads its rows instead of running the ops each step. Kept; grown by doubling."""
        have = self._table[0].shape[0] if self._table is not None else 0
        if have < length:
            with torch.no_grad():
                cos, sin = self(torch.arange(max(length, 2 * have, 64))[None])
            self._table = (cos[0].contiguous(), sin[0].contiguous())
        return self._table


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of x [B, T, ..., d] by angles cos/sin [B, T, d/2]."""
    while cos.dim() < x.dim():  # broadcast over head dims between T and d
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    # Each pair (x0, x1) is the complex number x0 + i x1, rotated by cos + i sin (float32, as the
    # official code): one complex multiply instead of a handful of real ops.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotated = torch.view_as_real(pairs * torch.complex(cos, sin))
    return rotated.flatten(-2).to(x.dtype)
