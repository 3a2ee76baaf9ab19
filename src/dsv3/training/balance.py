"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2) and the MaxVio measure.

The model counts, the trainer balances: each Router accumulates `tokens_per_expert` during training
forwards; after every optimizer step the trainer moves each routing bias b (a buffer, never a
parameter) by the update speed gamma against the step's load,

    b_i += gamma * sign(mean_load - load_i)

so overloaded experts become less likely to be picked and underloaded ones more. The loads are
summed over micro-batches and, under torch.distributed, over processes, so every rank applies the
same update. MaxVio (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing") = max_i load_i /
mean load - 1: 0 for a perfectly balanced layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import Router


def moe_routers(model: nn.Module) -> list[tuple[str, Router]]:
    """(module name, router) of every MoE layer, the MTP modules' included, in model order."""
    return [(name.removesuffix(".mlp.gate"), m) for name, m in model.named_modules() if isinstance(m, Router)]


def take_expert_counts(routers: list[Router]) -> torch.Tensor:
    """The routers' accumulated per-expert token counts (L, E), and reset them to zero."""
    counts = torch.stack([r.tokens_per_expert.detach().clone() for r in routers])
    reset_expert_counts(routers)
    return counts


def reset_expert_counts(routers: list[Router]) -> None:
    for r in routers:
        r.tokens_per_expert.zero_()


def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """Sum counts over processes when torch.distributed is initialized (the global load)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return counts


@torch.no_grad()
def update_bias(router: Router, load: torch.Tensor, gamma: float) -> None:
    """b += gamma * sign(mean(load) - load): overloaded experts' bias down, underloaded up."""
    bias = router.e_score_correction_bias
    # The bias steers selection only; a gradient would make it a parameter the optimizer also moves.
    assert not bias.requires_grad and not isinstance(bias, nn.Parameter), "the routing bias must not have a gradient"
    load = load.to(bias.device, torch.float32)
    bias += gamma * torch.sign(load.mean() - load)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max load / mean load - 1 along the last dim: (..., E) -> (...); 0 when nothing was routed."""
    load = load.float()
    mean = load.mean(dim=-1)
    return torch.where(mean > 0, load.max(dim=-1).values / mean.clamp(min=1e-12) - 1, torch.zeros_like(mean))
