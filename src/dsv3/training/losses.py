"""The training objective of DeepSeek-V3: next-token loss + lambda * MTP loss + sequence-wise balance loss.

    L = L_main + (lambda / D) * sum_k L_MTP^k + alpha * sum_layers mean_sequences sum_i f_i P_i

- L_main: cross-entropy of the main model's logits against token t+1 (V3 section 2.2, eq. 24-25).
- L_MTP^k, k = 1..D: MTP module k runs at the ORIGINAL positions t on (h^{k-1}_t, embedding of token t+k),
  where h^0 is the main model's final hidden state and h^{k-1} the previous module's output, and
  predicts token t+k+1 (eq. 21-25). Targets that would cross a document boundary are IGNORE.
- Sequence-wise balance loss (section 2.1.2, eq. 17-20), per MoE layer and per sequence of T tokens:
      f_i = N_r / (K_r T) * sum_t 1[expert i in the top-K_r of token t]     (a count, no gradient)
      P_i = 1/T sum_t s'_{i,t},   s'_{i,t} = s_{i,t} / sum_j s_{j,t}      (over ALL N_r routed experts)
      L_bal = alpha * sum_i f_i P_i
  The selection is the router's own (biased, group-limited), recomputed from its `last_scores`.

Every loss is returned as this micro-batch's SHARE of the global-batch mean: sums divided by the
global count of targets (or sequences). Shares add up over micro-batches and processes to the
same value one process gets on the whole batch, so gradient accumulation and data parallelism
change nothing but rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.moe import Router, route_tokens
from ..model.transformer import DeepSeekV3
from .data import IGNORE, Batch


@dataclass
class LossShares:
    """One micro-batch's shares of the global-batch losses (see the module doc)."""

    total: torch.Tensor  # scalar, with grad: lm + mtp_weight * mtp + balance
    lm: torch.Tensor  # detached scalars from here on
    mtp: torch.Tensor  # mean over depths of the MTP cross-entropies (unweighted)
    balance: torch.Tensor  # alpha * sum over MoE layers of the mean per-sequence sum_i f_i P_i


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of logits (..., V) against targets (...), IGNORE positions skipped."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
    """sum_i f_i P_i for each sequence (eq. 17-19, without alpha): scores (B, T, E), topk_idx (B, T, K) -> (B,)."""
    B, T, E = scores.shape
    K = topk_idx.shape[-1]
    chosen = torch.zeros(B, T, E, dtype=scores.dtype, device=scores.device)
    chosen.scatter_(-1, topk_idx, 1.0)  # 1[expert i in the top-k of token t]
    f = chosen.sum(dim=1) * (E / (K * T))  # (B, E)
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return (f * p).sum(dim=-1)


def router_balance_loss(router: Router, batch_size: int) -> torch.Tensor:
    """Per-sequence balance loss (B,) of `router`'s last training forward over B sequences."""
    scores = router.last_scores
    if scores is None:
        raise RuntimeError("the router has no scores: run a forward pass in training mode first")
    topk = route_tokens(
        scores.detach(), router.e_score_correction_bias.float(), router.n_group, router.topk_group, router.top_k
    )
    # The MoE flattens (B, T, D) to (B*T, D) in row-major order, so rows b*T..(b+1)*T-1 are sequence b.
    E, K = scores.shape[-1], topk.shape[-1]
    return sequence_balance_loss(scores.view(batch_size, -1, E), topk.view(batch_size, -1, K))


def model_losses(
    model: DeepSeekV3,
    batch: Batch,
    routers: list[Router],
    num_targets: torch.Tensor,
    num_sequences: int,
    mtp_weight: float,
    balance_alpha: float,
) -> LossShares:
    """Forward `batch` through the model and its MTP modules; shares of the global-batch losses.

    `num_targets` (D+1,) and `num_sequences` are counts over the GLOBAL batch (all micro-batches,
    all processes); `routers` are the model's routers, whose balance losses are summed.
    """
    depths = batch.targets.shape[1] - 1
    hidden = model.hidden_states(batch.input_ids)
    lm = cross_entropy_sum(model.logits(hidden), batch.targets[:, 0]) / num_targets[0].clamp(min=1)
    mtp = torch.zeros((), device=lm.device)
    for k in range(1, depths + 1):
        logits_k, hidden = model.mtp_logits(hidden, batch.mtp_input_ids(k), depth=k - 1)
        mtp = mtp + cross_entropy_sum(logits_k, batch.targets[:, k]) / num_targets[k].clamp(min=1)
    if depths:
        mtp = mtp / depths
    balance = torch.zeros((), device=lm.device)
    if balance_alpha:
        B = batch.tokens.shape[0]
        for router in routers:
            balance = balance + router_balance_loss(router, B).sum() / num_sequences
        balance = balance_alpha * balance
    total = lm + mtp_weight * mtp + balance
    return LossShares(total=total, lm=lm.detach(), mtp=mtp.detach(), balance=balance.detach())
