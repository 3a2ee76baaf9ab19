"""Next-token selection, per row of the batch: logit edits (bias, penalties, min_tokens), then greedy or
temperature with top-k, min-p and top-p.

`SamplingParams` holds both. `sample_tokens` applies only the filters (temperature, top_k, min_p,
top_p); the logit edits need the request's history, so a caller that batches requests (the engine)
builds one `LogitsProcessor` per request that uses them and applies it to that row's logits first.
A request that uses none of them gets no processor, and its seeded draws are exactly those of a
request made before these options existed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import RequestError
from ..kernels import native

# Temperatures below this are greedy: logits / t would overflow float32 (NaN after softmax) long before
# t reaches 0, and at 1e-5 a logit gap of 1e-4 already weighs e**10 to one.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens. temperature 0 (or below GREEDY_BELOW) is greedy; top_k 0, top_p 1 and
    min_p 0 disable those filters.

    The logit edits follow vLLM's definitions: `presence_penalty` and `frequency_penalty` subtract from
    the logits of tokens already generated (once, and once per occurrence); `repetition_penalty`
    divides positive logits and multiplies negative ones of tokens in the prompt or the output;
    `logit_bias` adds to given ids; during the first `min_tokens` tokens the stop ids cannot be drawn.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit)
    min_tokens: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)

    def validate(self) -> SamplingParams:
        def number(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not (number(self.temperature) and 0 <= self.temperature <= 100):
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise RequestError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (number(self.min_p) and 0 <= self.min_p <= 1):
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (number(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not (number(self.repetition_penalty) and 0 < self.repetition_penalty <= 2):
            raise RequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if not (isinstance(self.min_tokens, int) and self.min_tokens >= 0):
            raise RequestError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        for token, bias in self.logit_bias:
            if not (isinstance(token, int) and token >= 0 and number(bias) and -100 <= bias <= 100):
                raise RequestError(f"logit_bias maps token ids >= 0 to numbers in [-100, 100], got {token!r}: {bias!r}")
        return self

    @property
    def edits_logits(self) -> bool:
        """True when sampling needs a LogitsProcessor (the request's history changes its logits)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
        )


class LogitsProcessor:
    """One request's logit edits: `processor(logits_V, generated)` -> edited float32 copy of the row.

    `generated` is every token the request has produced so far (the processor counts only the ones it
    has not seen yet, so a call costs O(new tokens + edited ids), not O(history)).
    """

    def __init__(self, params: SamplingParams, prompt: Sequence[int], stop_ids: Iterable[int]) -> None:
        self.params = params
        self._prompt = torch.as_tensor(sorted(set(prompt)), dtype=torch.long)
        self._stop_ids = torch.as_tensor(sorted(set(stop_ids)), dtype=torch.long)
        self._bias_ids = torch.as_tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        self._bias = torch.as_tensor([b for _, b in params.logit_bias], dtype=torch.float32)
        self._counts: torch.Tensor | None = None  # (V,) occurrences of each id in the output
        self._seen = 0

    def __call__(self, logits_V: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
        p = self.params
        V = logits_V.shape[-1]
        logits_V = logits_V.float().clone()
        device = logits_V.device
        if self._counts is None:
            self._counts = torch.zeros(V, dtype=torch.float32)
        new = [t for t in generated[self._seen :] if 0 <= t < V]
        self._seen = len(generated)
        if new:
            self._counts.index_add_(0, torch.as_tensor(new), torch.ones(len(new)))
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(V, dtype=torch.bool)
            seen[self._prompt[self._prompt < V]] = True
            seen |= self._counts > 0
            seen = seen.to(device)
            rp = p.repetition_penalty
            logits_V = torch.where(seen, torch.where(logits_V > 0, logits_V / rp, logits_V * rp), logits_V)
        if p.frequency_penalty or p.presence_penalty:
            counts = self._counts.to(device)
            logits_V -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if len(self._bias_ids):
            keep = self._bias_ids < V
            logits_V.index_add_(0, self._bias_ids[keep].to(device), self._bias[keep].to(device))
        if len(generated) < p.min_tokens and len(self._stop_ids):
            stops = self._stop_ids[self._stop_ids < V].to(device)
            logits_V[stops] = float("-inf")
        return logits_V


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
    if params.min_p > 0:
        # vLLM's min-p: drop tokens below min_p times the most likely token's probability.
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
        probs = probs / probs.sum()
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
    logits_BV = logits_BV.float()
    if native.available() and logits_BV.dim() == 2 and logits_BV.device.type == "cpu" and logits_BV.stride(-1) == 1:
        greedy = native.argmax_rows(logits_BV)
    else:
        greedy = logits_BV.argmax(dim=-1).tolist()
    for b, p in enumerate(params):
        if p.temperature == 0:
            out.append(greedy[b])
        else:
            probs = filtered_probs(logits_BV[b], p)
            out.append(int(torch.multinomial(probs.cpu(), 1, generator=generators[b]).item()))
    return out
