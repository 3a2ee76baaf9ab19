"""RMSNorm, computed in float32 whatever the activation dtype (as the official and HF code do)."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from .linear import uses_native
from .options import UNPREPARED


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.options = UNPREPARED  # the model's InferenceOptions, from prepare_for_inference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32 (one fused kernel), cast back BEFORE the weight
        # multiply, like HF: the weight is applied in the activation dtype.
        # Decode-sized: one call into the native kernels instead of four ops.
        if uses_native(x, self.options.matvec) and self.weight.dtype == x.dtype and native.fits_elementwise(x):
            return native.rms_norm(x, self.weight.contiguous(), self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)
