"""Next-token selection: greedy, temperature, top-k, top-p, each per row of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import RequestError

# Temperatures below this are greedy: logits / t would overflow float32 (NaN after softmax) long before
# t reaches 0, and at 1e-5 a logit gap of 1e-4 already weighs e**10 to one.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. temperature 0 (or below GREEDY_BELOW) is greedy; top_k 0 and top_p 1
    disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    def validate(self) -> SamplingParams:
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100):
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise RequestError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        return self


def filtered_probs(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution one row samples from (float32, sums to 1); greedy rows are one-hot."""
    logits_V = logits_V.float()
    if params.temperature == 0:
        return torch.nn.functional.one_hot(logits_V.argmax(), logits_V.shape[-1]).float()
    logits_V = logits_V / params.temperature
    if params.top_k and params.top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs = torch.softmax(logits_V, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        probs = probs / probs.sum()
    return probs


def sample_tokens(
    logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row; greedy rows take the argmax (lowest id on ties), others draw with their generator."""
    out = []
    greedy = logits_BV.float().argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if p.temperature == 0:
            out.append(greedy[b])
        else:
            probs = filtered_probs(logits_BV[b], p)
            out.append(int(torch.multinomial(probs.cpu(), 1, generator=generators[b]).item()))
    return out
