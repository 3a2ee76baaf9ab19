"""Running the commands under torchrun: build the parallel model, then decode in lockstep on every rank.

Every rank runs the same forward passes (the collectives pair up only if they do); rank 0 alone
does I/O. `parallel_stream` is `dsv3.inference.generate.stream` for that setting: rank 0's request
(prompts, sampling, seed) is broadcast before the prefill, rank 0 samples each step and broadcasts
the tokens (so the ranks never drift, even when sampling at a temperature), and the other ranks
follow. A server or chat loop on rank 0 serves many requests while the other ranks sit in
`follow(model, ctx)`, which runs each broadcast request until rank 0 calls `ctx.stop_followers()`.

    model, ctx = parallel_model_from_args(model_dir, tp, ep, "bf16")
    def lead() -> int:  # rank 0's command: tokenize, stream, print
        for step in parallel_stream(model, ctx, prompts, max_new_tokens=32): print(step)
        return 0
    lead_or_follow(model, ctx, lead)  # ranks > 0 follow rank 0's requests until it is done
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import DsV3Error, RequestError
from ..inference.generate import decode_step, prefill, stream
from ..inference.request import GenerationRequest
from ..inference.sampling import SamplingParams, sample_tokens
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .comm import CommStats
from .expert_parallel import apply_ep
from .load import load_sharded
from .mesh import Mesh, init_mesh
from .tensor_parallel import apply_tp

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}

# Messages rank 0 broadcasts to the followers.
_REQUEST, _SKIP, _STOP, _ABORT = "request", "skip", "stop", "abort"


@dataclass
class ParallelContext:
    """This rank's mesh, the byte ledger of the model's collectives, and rank 0 -> all broadcasts."""

    mesh: Mesh
    stats: CommStats

    @property
    def is_main(self) -> bool:
        return self.mesh.is_main

    @property
    def distributed(self) -> bool:
        return self.mesh.distributed

    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0's `obj` on every rank (pickled: only ever rank 0's own requests, never outside input)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def stop_followers(self) -> None:
        """Rank 0: release the ranks waiting in `follow`."""
        if self.distributed and self.is_main:
            self.broadcast_object((_STOP,))


def parallel_model_from_args(
    model_dir: str,
    tp: int | None,
    ep: int | None,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: torch.device | str | None = None,
    fp8: bool = False,
    ep_combine: str | None = None,
) -> tuple[DeepSeekV3, ParallelContext]:
    """Join torchrun's process group (if any) and load this rank's part of the checkpoint at `model_dir`.

    tp / ep: each 1 or the world size (None = the world size, the official layout). Single
    process: the plain `DeepSeekV3.from_pretrained`. Returns (model, ctx).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise RequestError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    mesh = init_mesh(tp, ep, device)
    stats = CommStats()
    if not mesh.distributed:
        model = DeepSeekV3.from_pretrained(model_dir, dtype=dtype, device=mesh.device, fp8=fp8)
    else:
        model, stats = load_sharded(
            model_dir,
            mesh.tp_group,
            mesh.ep_group,
            dtype=dtype,
            device=mesh.device,
            fp8=fp8,
            ep_combine=ep_combine,
            stats=stats,
        )
    return model, ParallelContext(mesh, stats)


def parallelize(model: DeepSeekV3, tp: int | None, ep: int | None, ep_combine: str | None = None) -> ParallelContext:
    """Join torchrun's process group and shard, in place, a model that every rank built identically.

    For a model made in memory (same config, same seed on every rank: `dsv3 bench`); a checkpoint is
    better read with `parallel_model_from_args`, which never holds the full weights. Returns the context.
    """
    mesh = init_mesh(tp, ep, model.device)
    stats = apply_tp(model, mesh.tp_group)
    stats = apply_ep(model, mesh.ep_group, combine=ep_combine, stats=stats)
    return ParallelContext(mesh, stats)


def parallel_stream(
    model: DeepSeekV3,
    ctx: ParallelContext,
    prompts: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    vocab_limit: int | None = None,
) -> Iterator[dict[int, int]]:
    """`stream()` over all ranks: every rank calls it, rank 0's arguments count, rank 0 alone gets the steps.

    On the other ranks the arguments are ignored and nothing is yielded: they run the same forward
    passes with rank 0's broadcast request and tokens. A bad request raises RequestError on rank 0
    and leaves the others ready for the next one.
    """
    if not ctx.distributed:
        yield from stream(
            model, prompts, max_new_tokens, sampling, seed=seed, stop_token_ids=stop_token_ids, vocab_limit=vocab_limit
        )
        return
    if not ctx.is_main:
        _follow_one(model, ctx)
        return
    try:
        request = GenerationRequest(prompts or [], max_new_tokens, sampling, seed, stop_token_ids, vocab_limit)
        request = request.validate(model.config)  # the seed is drawn here, once: the followers get it
    except DsV3Error:
        ctx.broadcast_object((_SKIP,))
        raise
    ctx.broadcast_object((_REQUEST, request))
    yield from _lead(model, ctx, request)


def parallel_generate(
    model: DeepSeekV3,
    ctx: ParallelContext,
    prompts: Sequence[Sequence[int]] | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """`generate()` over all ranks: new tokens per prompt on rank 0, [] on the others."""
    params = SamplingParams(temperature=temperature)
    out: list[list[int]] = [[] for _ in (prompts or [])] if ctx.is_main else []
    for step in parallel_stream(model, ctx, prompts, max_new_tokens, params, seed, stop_token_ids):
        for b, t in step.items():
            out[b].append(t)
    return out


def follow(model: DeepSeekV3, ctx: ParallelContext) -> None:
    """Ranks > 0: run every request rank 0 starts with `parallel_stream`, until it calls `stop_followers`."""
    while _follow_one(model, ctx):
        pass


def lead_or_follow(model: DeepSeekV3, ctx: ParallelContext, lead: Callable[[], int]) -> int:
    """Rank 0 (or a single process) runs `lead`, its command with the I/O, calling `parallel_stream`
    per request, then releases the others; ranks > 0 follow those requests meanwhile. Returns lead's code."""
    if not ctx.distributed:
        return lead()
    if not ctx.is_main:
        follow(model, ctx)
        return 0
    try:
        return lead()
    finally:
        ctx.stop_followers()


# ---------------------------------------------------------------------------------------------- the loop
def _new_cache(model: DeepSeekV3, request: GenerationRequest) -> tuple[LatentCache, list[int]]:
    prompts = request.prompts
    cache = LatentCache(
        model.config,
        len(prompts),
        max(len(p) for p in prompts) + request.max_new_tokens,
        dtype=model.dtype,
        device=model.device,
    )
    return cache, [cache.allocate() for _ in prompts]


def _lead(model: DeepSeekV3, ctx: ParallelContext, request: GenerationRequest) -> Iterator[dict[int, int]]:
    """Rank 0: prefill, then per step sample, yield, broadcast the surviving (row, token) pairs, decode."""
    if request.max_new_tokens == 0:
        ctx.broadcast_object([])
        return
    cache, slots = _new_cache(model, request)
    gens = request.generators()
    logits = prefill(model, cache, slots, request.prompts)
    active, produced = list(range(len(request.prompts))), [0] * len(request.prompts)
    owe_broadcast = False  # True between sampling and telling the followers what comes next
    try:
        while True:
            owe_broadcast = True
            tokens = sample_tokens(request.limit_vocab(logits), request.row_params(active), [gens[b] for b in active])
            yield dict(zip(active, tokens))
            still = []
            for b, t in zip(active, tokens):
                produced[b] += 1
                if t not in request.stop_set and produced[b] < request.max_new_tokens:
                    still.append((b, t))
            owe_broadcast = False
            ctx.broadcast_object(still)
            if not still:
                return
            active = [b for b, _ in still]
            logits = decode_step(model, cache, [slots[b] for b in active], [t for _, t in still])
    finally:
        if owe_broadcast:  # the consumer stopped early or sampling failed: let the followers go
            ctx.broadcast_object(_ABORT)


def _follow_one(model: DeepSeekV3, ctx: ParallelContext) -> bool:
    """Ranks > 0: run one broadcast request in lockstep with rank 0; False when told to stop."""
    message = ctx.broadcast_object()
    if message[0] == _STOP:
        return False
    if message[0] != _REQUEST:
        return True  # rank 0 rejected the request: nothing to run
    request = message[1]
    if request.max_new_tokens == 0:
        ctx.broadcast_object()
        return True
    cache, slots = _new_cache(model, request)
    prefill(model, cache, slots, request.prompts)
    while True:
        still = ctx.broadcast_object()
        if isinstance(still, tuple):  # (_STOP,): rank 0 left mid-request (its command failed)
            return False
        if still == _ABORT or not still:
            return True
        decode_step(model, cache, [slots[b] for b, _ in still], [t for _, t in still])
