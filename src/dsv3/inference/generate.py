"""Batched generation with the latent cache: prefill, then one decode step per token.

`prefill()` and `decode_step()` are plain functions over (model, cache, tokens); `stream()` drives
them for a batch of prompts of different lengths and yields each step's new tokens; `generate()`
collects them. One sequence finishing (EOS, a stop id, its budget) does not stop the others: it
simply leaves the decode batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import RequestError
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .compiled import compiled_decoder
from .sampling import SamplingParams, sample_tokens


def model_dtype(model: DeepSeekV3) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def model_device(model: DeepSeekV3) -> torch.device:
    return model.model.embed_tokens.weight.device


@torch.inference_mode()
def prefill(
    model: DeepSeekV3, cache: LatentCache, slots: list[int], prompts: Sequence[Sequence[int]], chunk: int = 4096
) -> torch.Tensor:
    """Append each prompt to its (empty or not) slot; return the logits (B, V) after each prompt's last token.

    Prompts are right-padded into one batch and processed `chunk` tokens at a time, so activation
    memory stays bounded however long the prompt is.
    """
    device = model_device(model)
    lens = [len(p) for p in prompts]
    T = max(lens)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    ids = ids.to(device)
    last = torch.empty(len(prompts), model.config.vocab_size, dtype=torch.float32, device=device)
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        n_new = [max(0, min(n, hi) - lo) for n in lens]
        batch = cache.bind(slots, n_new)
        hidden = model.hidden_states(ids[:, lo:hi], cache=batch)
        batch.commit()
        ends = [(b, n - 1 - lo) for b, n in enumerate(lens) if lo <= n - 1 < hi]
        if ends:
            rows = torch.tensor([b for b, _ in ends], device=device)
            cols = torch.tensor([t for _, t in ends], device=device)
            last[rows] = model.logits(hidden[rows, cols][:, None])[:, 0]
    return last


@torch.inference_mode()
def decode_step(model: DeepSeekV3, cache: LatentCache, slots: list[int], tokens: list[int]) -> torch.Tensor:
    """Append one token per slot; return the next-token logits (B, V).

    Through the compiled static-shape step when the model's `InferenceOptions.compile` is on
    (`inference.compiled`), else eagerly: the reference the compiled step is tested against.
    """
    options = model.inference_options
    if options is not None and options.compile:
        return compiled_decoder(model)(cache, slots, tokens)
    ids = torch.tensor(tokens, dtype=torch.long, device=model_device(model))[:, None]
    batch = cache.bind(slots, [1] * len(slots))
    logits = model(ids, cache=batch)
    batch.commit()
    return logits[:, -1]


def check_prompts(model: DeepSeekV3, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    cfg = model.config
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise RequestError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise RequestError(f"prompt {i} is empty")
        bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size]
        if bad:
            raise RequestError(f"prompt {i} has token id {bad[0]!r} outside [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise RequestError(
                f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceeds the context "
                f"length {cfg.max_position_embeddings}"
            )


def per_row_sampling(num_rows: int, sampling: SamplingParams | Sequence[SamplingParams]) -> list[SamplingParams]:
    """One validated SamplingParams per row (a single one is shared by all rows)."""
    params = [sampling] * num_rows if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != num_rows:
        raise RequestError("one SamplingParams per prompt is needed")
    return [p.validate() for p in params]


def row_generators(num_rows: int, seed: int | None) -> list[torch.Generator]:
    """A CPU generator per row, row b seeded with seed + b (a random seed when None)."""
    base = seed if seed is not None else torch.seed() % (2**62)
    gens = []
    for b in range(num_rows):
        g = torch.Generator(device="cpu")
        g.manual_seed(base + b)
        gens.append(g)
    return gens


def stream(
    model: DeepSeekV3,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    vocab_limit: int | None = None,
) -> Iterator[dict[int, int]]:
    """Yield, per step, {row: new token} for the rows still running; stops at EOS / stop ids / budget.

    `vocab_limit` masks ids >= limit (the padded vocabulary a tokenizer cannot decode).
    """
    prompts = [list(p) for p in prompts]
    check_prompts(model, prompts, max_new_tokens)
    params = per_row_sampling(len(prompts), sampling)
    if max_new_tokens == 0:
        return
    model.prepare_for_inference()
    gens = row_generators(len(prompts), seed)
    stops = set(model.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    cache = LatentCache(
        model.config,
        len(prompts),
        max(len(p) for p in prompts) + max_new_tokens,
        dtype=model_dtype(model),
        device=model_device(model),
    )
    slots = [cache.allocate() for _ in prompts]
    logits = prefill(model, cache, slots, prompts)
    active = list(range(len(prompts)))
    produced = [0] * len(prompts)
    while active:
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits[:, :vocab_limit]  # ids past the limit can never be sampled
        tokens = sample_tokens(logits, [params[b] for b in active], [gens[b] for b in active])
        yield dict(zip(active, tokens))
        still = []
        for b, t in zip(active, tokens):
            produced[b] += 1
            if t not in stops and produced[b] < max_new_tokens:
                still.append((b, t))
        if not still:
            return
        active = [b for b, _ in still]
        logits = decode_step(model, cache, [slots[b] for b in active], [t for _, t in still])


def generate(
    model: DeepSeekV3,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    speculative: str | None = None,
) -> list[list[int]]:
    """New tokens only, one list per prompt; greedy at temperature 0; the stop token is included.

    `speculative="mtp"` drafts with the MTP module and verifies with the main model (same output
    distribution; identical greedy output).
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    out: list[list[int]] = [[] for _ in prompts]
    if speculative is None:
        for step in stream(model, prompts, max_new_tokens, params, seed, stop_token_ids):
            for b, t in step.items():
                out[b].append(t)
        return out
    if speculative != "mtp":
        raise RequestError(f"speculative must be None or 'mtp', got {speculative!r}")
    from .speculative import speculative_stream

    for step in speculative_stream(model, prompts, max_new_tokens, params, seed, stop_token_ids):
        for b, toks in step.items():
            out[b].extend(toks)
    return out
