"""One generation request (prompts, budget, sampling, seed, stop ids, vocabulary limit), validated in one place.

`stream`, `speculative_stream`, the torchrun lead (`dsv3.distributed.launch`) and the engine all take the same
request; `validate()` checks it against a model's config once and fills in the defaults, so each of them starts
from the same facts: one SamplingParams per row, a concrete seed (row b samples with seed + b), the stop ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..config import ModelConfig
from ..errors import RequestError
from .sampling import SamplingParams

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. After `validate()`, `sampling` has one entry per prompt and `seed` / `stop_token_ids` are set."""

    prompts: Sequence[Sequence[int]]
    max_new_tokens: int = 32
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams()
    seed: int | None = None
    stop_token_ids: Sequence[int] | None = None  # None: the config's EOS ids
    vocab_limit: int | None = None  # ids >= limit are never sampled (the padded vocabulary a tokenizer lacks)

    def validate(self, cfg: ModelConfig, max_len: int | None = None, reserve: int = 0) -> GenerationRequest:
        """The request checked against `cfg` (RequestError naming the problem) with its defaults filled in.

        Each prompt plus `max_new_tokens + reserve` positions must fit in `max_len` (default: the model's
        context); `reserve` is room a decoder needs beyond the budget (speculative decoding's draft).
        """
        limit = cfg.max_position_embeddings if max_len is None else max_len
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RequestError(f"max_new_tokens must be a non-negative integer, got {n!r}")
        prompts = [list(p) for p in self.prompts]
        if not prompts:
            raise RequestError("no prompts given")
        for i, p in enumerate(prompts):
            if not p:
                raise RequestError(f"prompt {i} is empty")
            bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
            if bad:
                raise RequestError(f"prompt {i} has token id {bad[0]!r} outside [0, {cfg.vocab_size})")
            if len(p) + n + reserve > limit:
                raise RequestError(
                    f"prompt {i}: {len(p)} tokens + max_new_tokens {n} exceeds the context length {limit}"
                )
        if isinstance(self.sampling, SamplingParams):
            sampling = [self.sampling] * len(prompts)
        else:
            sampling = list(self.sampling)
            if len(sampling) != len(prompts) or not all(isinstance(s, SamplingParams) for s in sampling):
                raise RequestError("sampling must be one SamplingParams, or one per prompt")
        for s in sampling:
            s.validate()
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not SEED_RANGE[0] <= seed):
            raise RequestError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        if seed is None:
            seed = torch.seed() % (2**62)
        if seed + len(prompts) - 1 >= SEED_RANGE[1]:
            raise RequestError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        stops = cfg.eos_token_ids if self.stop_token_ids is None else list(self.stop_token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stops):
            raise RequestError(f"stop_token_ids must be integers, got {stops!r}")
        vl = self.vocab_limit
        if vl is not None and (not isinstance(vl, int) or isinstance(vl, bool) or not 1 <= vl):
            raise RequestError(f"vocab_limit must be a positive integer or None, got {vl!r}")
        return replace(self, prompts=prompts, sampling=sampling, seed=seed, stop_token_ids=stops)

    @property
    def stop_set(self) -> frozenset[int]:
        """The ids that end a row (after `validate()`)."""
        return frozenset(self.stop_token_ids or ())

    def row_params(self, rows: Sequence[int]) -> list[SamplingParams]:
        """The sampling parameters of these rows (after `validate()`)."""
        return [self.sampling[b] for b in rows]

    def generators(self) -> list[torch.Generator]:
        """A CPU generator per row, row b seeded with seed + b (after `validate()`)."""
        gens = []
        for b in range(len(self.prompts)):
            g = torch.Generator(device="cpu")
            g.manual_seed(self.seed + b)
            gens.append(g)
        return gens

    def limit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (..., V) without the ids this request may not sample."""
        if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:
            return logits[..., : self.vocab_limit]
        return logits
