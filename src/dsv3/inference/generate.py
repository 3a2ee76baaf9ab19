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
from ..model import native_decode
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .compiled import compiled_decoder
from .request import GenerationRequest
from .sampling import SamplingParams, sample_tokens
from .speculative import speculative_stream

GREEDY_RUN = 1 << 30  # generate(): greedy steps a native call may take (all of them)


def model_dtype(model: DeepSeekV3) -> torch.dtype:
    """`model.dtype` (kept for callers of the function)."""
    return model.dtype


def model_device(model: DeepSeekV3) -> torch.device:
    """`model.device` (kept for callers of the function)."""
    return model.device


def prefill_chunks(
    model: DeepSeekV3, cache: LatentCache, slots: list[int], prompts: Sequence[Sequence[int]], chunk: int = 4096
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Append the right-padded prompts to their slots `chunk` tokens at a time; yield (lo, hi, hidden (B, hi-lo, D)).

    The one prefill loop: `prefill` keeps each prompt's last position, the engine's scoring keeps them all.
    """
    lens = [len(p) for p in prompts]
    T = max(lens)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    ids = ids.to(model_device(model))
    for lo in range(0, T, chunk):
        hi = min(lo + chunk, T)
        batch = cache.bind(slots, [max(0, min(n, hi) - lo) for n in lens])
        hidden = model.hidden_states(ids[:, lo:hi], cache=batch)
        batch.commit()
        yield lo, hi, hidden


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
    last = torch.empty(len(prompts), model.config.vocab_size, dtype=torch.float32, device=device)
    for lo, hi, hidden in prefill_chunks(model, cache, slots, prompts, chunk):
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
    logits = native_decode.decode_logits(model, cache, slots, tokens)  # the same values in one native call
    if logits is not None:
        return logits
    ids = torch.tensor(tokens, dtype=torch.long, device=model_device(model))[:, None]
    batch = cache.bind(slots, [1] * len(slots))
    logits = model(ids, cache=batch)
    batch.commit()
    return logits[:, -1]


def stream(
    model: DeepSeekV3,
    prompts: Sequence[Sequence[int]] | GenerationRequest,
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    vocab_limit: int | None = None,
) -> Iterator[dict[int, int]]:
    """Yield, per step, {row: new token} for the rows still running; stops at EOS / stop ids / budget.

    Takes a `GenerationRequest` or its fields; `vocab_limit` masks ids >= limit (the padded vocabulary a
    tokenizer cannot decode).
    """
    if not isinstance(prompts, GenerationRequest):
        prompts = GenerationRequest(prompts, max_new_tokens, sampling, seed, stop_token_ids, vocab_limit)
    yield from _steps(model, prompts, greedy_run=1)


def _steps(model: DeepSeekV3, request: GenerationRequest, greedy_run: int) -> Iterator[dict[int, int]]:
    """`stream()`'s steps. With greedy_run > 1, up to that many steps of greedy rows at a time in one native call
    (`native_decode.decode_greedy`: the same batches, so the same tokens), yielded when the run returns."""
    request = request.validate(model.config)
    if request.max_new_tokens == 0:
        return
    model.prepare_for_inference()
    prompts, budget, stops = request.prompts, request.max_new_tokens, request.stop_set
    gens = request.generators()
    cache = LatentCache(
        model.config, len(prompts), max(len(p) for p in prompts) + budget,
        dtype=model_dtype(model), device=model_device(model),
    )  # fmt: skip
    slots = [cache.allocate() for _ in prompts]
    logits = prefill(model, cache, slots, prompts)
    tokens = sample_tokens(request.limit_vocab(logits), request.row_params(range(len(prompts))), gens)
    steps = [dict(enumerate(tokens))]
    produced = [0] * len(prompts)
    compiled = model.inference_options is not None and model.inference_options.compile
    while True:
        for step in steps:
            yield step
            for b in step:
                produced[b] += 1
        running = {b: t for b, t in steps[-1].items() if t not in stops and produced[b] < budget}
        if not running:
            return
        active, fed = list(running), list(running.values())
        params = request.row_params(active)
        run = None
        if greedy_run > 1 and not compiled and all(p.temperature == 0 for p in params):
            n_steps = min(greedy_run, budget - max(produced[b] for b in active))
            limit = min(request.vocab_limit or model.config.vocab_size, model.config.vocab_size)
            run = native_decode.decode_greedy(model, cache, [slots[b] for b in active], fed, limit, n_steps, stops)
        if run is not None:
            steps = [{b: r[i] for b, r in zip(active, run) if i < len(r)} for i in range(max(map(len, run)))]
            continue
        logits = decode_step(model, cache, [slots[b] for b in active], fed)
        steps = [dict(zip(active, sample_tokens(request.limit_vocab(logits), params, [gens[b] for b in active])))]


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
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """New tokens only, one list per prompt; greedy at temperature 0; the stop token is included.

    `speculative="mtp"` drafts with the MTP module and verifies with the main model (same output
    distribution; identical greedy output). `vocab_limit` masks ids >= limit, as `stream`'s.
    """
    if speculative not in (None, "mtp"):
        raise RequestError(f"speculative must be None or 'mtp', got {speculative!r}")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    request = GenerationRequest(prompts, max_new_tokens, params, seed, stop_token_ids, vocab_limit)
    out: list[list[int]] = [[] for _ in prompts]
    # Whole runs of greedy steps in one native call each: nothing here reads a token before the last one.
    steps = _steps(model, request, greedy_run=GREEDY_RUN) if speculative is None else speculative_stream(model, request)
    for step in steps:
        for b, tokens in step.items():
            out[b].extend([tokens] if isinstance(tokens, int) else tokens)
    return out
