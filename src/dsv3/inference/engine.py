"""Continuous batching: one background loop owns the model and serves many token-id requests at once.

`Engine.submit()` queues a request (prompt ids, sampling, budget, stop ids, seed) and returns a
`RequestHandle` whose tokens are read as they come, by a thread (`for token in handle`) or by asyncio
(`async for token in handle`). The loop, each step:

1. drops cancelled requests and frees their cache slots;
2. admits waiting requests while `LatentCache` slots are free, prefills them (a burst of prompts of
   similar length in one pass) and samples each one's first token;
3. runs ONE `decode_step` for every running request (the new ones included) and samples each row;
   a request that hits a stop id or its budget leaves the batch and frees its slot at once.

Each request samples with its own `torch.Generator` (seeded with `seed`, as `generate()` seeds row 0),
and rows never share cache slots, so a request's tokens do not depend on what else is batched: at
temperature 0 they equal `generate()` on the same prompt. The engine is tokenizer-free: ids in, ids
out; a caller that cannot decode some ids passes `valid_ids` to mask them.

A failure is contained to its request: a batched prefill or decode step that raises is replayed
row by row (a decode step commits cache lengths only after its pass; a prefill's slots are emptied
before the replay), so only the row that fails again is ended with an error; the loop keeps serving.

Admission is bounded: at most `max_batch` requests run and `max_queue` wait; beyond that `submit()`
raises `QueueFullError` at once (an HTTP server answers 429).

The loop touches the model and the contents of its cache only through a `ModelRunner` (prefill,
decode_step, truncate, free; the slot bookkeeping stays here): the default runs the plain functions
in this process; `Engine(runner=...)` swaps in one that also replays each call elsewhere (`dsv3 serve`
under torchrun: rank 0's runner broadcasts every call and the other ranks repeat it on their shard).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import RequestError
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .generate import decode_step, model_device, model_dtype, prefill, prefill_chunks
from .request import GenerationRequest
from .sampling import LogitsProcessor, SamplingParams, sample_tokens

# Finish reasons, as OpenAI names the first two.
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
_THROUGHPUT_WINDOW_S = 10.0  # tokens/s is measured over this sliding window
_MIN_PREFIX_REUSE = 16  # tokens: a shorter cached prefix is reused only when no empty slot is free
_UNLIKELY = -9999.0  # the logprob reported for an id that cannot be sampled (-inf is not JSON)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the `top` most likely ids at its position, as (id, logprob), best first.

    Log-probabilities are `log_softmax` of the logits the request samples from: the model's, past the
    engine's vocabulary mask and the request's logit edits (bias, penalties, a grammar's mask), before
    temperature, top-k, top-p and min-p.
    """

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class TokenConstraint(Protocol):
    """A per-request rule on which ids may come next (e.g. a grammar); the engine calls it from its thread."""

    def allowed(self, vocab_size: int) -> torch.Tensor | None:
        """Bool (vocab_size,) of the ids allowed next, or None when any id is."""

    def accept(self, token: int) -> None:
        """Advance past the sampled `token`."""

    def is_finished(self) -> bool:
        """True when the constraint allows nothing more but the end (the request then stops)."""


_Sampled = tuple["RequestHandle", int, TokenLogprob | None]


class QueueFullError(RequestError):
    """The engine already holds `max_batch + max_queue` requests; retry later (HTTP 429)."""


class EngineClosedError(RequestError):
    """The engine has been shut down and accepts no more requests."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics; counters are totals since the engine started."""

    requests_total: int  # accepted by submit()
    requests_rejected: int  # refused with QueueFullError
    requests_finished: dict[str, int]  # by finish reason
    requests_active: int  # holding a cache slot
    requests_queued: int  # waiting for a slot
    prompt_tokens: int  # prefilled
    tokens_generated: int
    tokens_per_second: float  # over the last _THROUGHPUT_WINDOW_S seconds
    batch_size: int  # rows in the latest decode step
    max_batch_size: int  # most rows seen in one decode step
    cache_slots_in_use: int  # by requests (not by cached prefixes)
    cache_slots: int
    prefix_tokens_reused: int = 0  # prompt tokens not prefilled because a cached prefix held them
    cached_prefixes: int = 0  # idle slots holding a finished sequence for reuse


class RequestHandle:
    """One submitted request: iterate it for its new token ids; `finish_reason` is set when it ends.

    Iteration ends after the last token; it raises the request's error if the engine failed it.
    `tokens` holds every id produced so far (a stop id that ended it included, as in `generate()`);
    with `logprobs`, `token_logprobs[i]` is set before `tokens[i]` is delivered, and with
    `prompt_logprobs`, `prompt_scores` before the first token (or the end, for a request of 0 new tokens).
    """

    _ids = itertools.count()

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_token_ids: frozenset[int],
        seed: int | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: TokenConstraint | None = None,
    ) -> None:
        self.id = next(RequestHandle._ids)
        self.prompt, self.params, self.max_new_tokens = prompt, params, max_new_tokens
        self.stop_token_ids = stop_token_ids
        # Logprobs asked for (None: not computed; n: the sampled token's and the n most likely ids').
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.token_logprobs: list[TokenLogprob] = []  # one per entry of `tokens`, filled before it is emitted
        self.prompt_scores: list[TokenLogprob | None] = []  # one per prompt token (None for the first), if asked
        self.processor = LogitsProcessor(params, prompt, stop_token_ids) if params.edits_logits else None
        self.constraint = constraint
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed if seed is not None else torch.seed() % (2**62))
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the slot's cache (a reused prefix counts)
        self._engine = engine
        self._cancelled = False
        self._cancel_reason = CANCELLED
        # Events (a token id, or None at the end) cross from the engine thread to the reader here;
        # `_wakeup` (set by an asyncio reader) is called after each put.
        self._events: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._wakeup: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self, reason: str = CANCELLED) -> None:
        """Stop generating; the engine frees the request's slot before its next step (idempotent).

        `reason` is the finish reason recorded: STOP when the caller ended it on a stop string.
        """
        if not self._cancelled and not self.done:
            self._cancel_reason = reason
            self._cancelled = True
            self._engine._poke()

    # --- engine side -------------------------------------------------------------------------------------------------

    def _emit(self, token: int | None) -> None:
        self._events.put(token)
        wakeup = self._wakeup
        if wakeup is not None:
            try:
                wakeup()
            except RuntimeError:  # the reader's event loop is closed: nobody is listening any more
                pass

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self._emit(None)

    # --- reader side -------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[int]:
        while (token := self._events.get()) is not None:
            yield token
        self._raise_if_failed()

    async def __aiter__(self) -> AsyncIterator[int]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        self._wakeup = lambda: loop.call_soon_threadsafe(ready.set)
        try:
            while True:
                ready.clear()
                # Drain after clearing: an event put in between leaves `ready` set, so nothing is missed.
                while True:
                    try:
                        token = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if token is None:
                        self._raise_if_failed()
                        return
                    yield token
                await ready.wait()
        finally:
            self._wakeup = None

    def _raise_if_failed(self) -> None:
        if self.finish_reason == ERROR:
            raise RequestError(f"generation failed: {self.error}") from self.error

    def result(self) -> list[int]:
        """Block until the request ends; return all its new tokens."""
        for _ in self:
            pass
        return list(self.tokens)


class ModelRunner:
    """The engine's forward passes and cache edits on `model` and `cache`: here, the plain functions.

    A replacement keeps these four methods and may mirror each call (same slots, same ids) on other
    processes; `Engine(runner=factory)` builds it with `factory(model, cache)`.
    """

    def __init__(self, model: DeepSeekV3, cache: LatentCache) -> None:
        self.model, self.cache = model, cache

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Append each prompt to its slot; (B, V) logits after each prompt's last token."""
        return prefill(self.model, self.cache, slots, prompts)

    def decode_step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Append one token per slot; (B, V) next-token logits."""
        return decode_step(self.model, self.cache, slots, tokens)

    def prefill_with_logits(
        self, slots: list[int], prompts: list[list[int]], on_logits: Callable[[int, int, torch.Tensor], None]
    ) -> torch.Tensor:
        """`prefill`, also calling `on_logits(row, position, logits (n, V))` for the logits after every prompt token.

        `position` is the index in the row's prompt of the first of those n tokens; the calls come in order.
        """
        return prefill_all_logits(self.model, self.cache, slots, prompts, on_logits)

    def truncate(self, slot: int, length: int) -> None:
        """Keep only the first `length` cached tokens of `slot`."""
        self.cache.truncate(slot, length)

    def free(self, slot: int) -> None:
        """Give `slot` back to the cache's pool (emptied)."""
        self.cache.free(slot)


class Engine:
    """Owns `model` in one background thread and batches every submitted request into its decode steps."""

    def __init__(
        self,
        model: DeepSeekV3,
        max_batch: int = 8,
        max_len: int | None = None,
        max_queue: int = 64,
        valid_ids: torch.Tensor | None = None,
        start: bool = True,
        runner: Callable[[DeepSeekV3, LatentCache], ModelRunner] = ModelRunner,
        prefill_chunk: int | None = None,
        prefix_reuse: bool = False,
    ) -> None:
        """`max_len` (default: the model's context) bounds prompt + new tokens; `valid_ids` (bool [V]) masks logits;
        `runner(model, cache)` builds what runs the forward passes (default: this process, plainly).

        `prefill_chunk`: prefill at most this many prompt tokens per step, between decode steps of the
        running requests (None: whole prompts at once). `prefix_reuse`: keep a finished request's cache
        in its slot while the slot is not needed, and start a new request whose prompt begins with the
        same tokens from there.
        """
        cfg = model.config
        max_len = cfg.max_position_embeddings if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_position_embeddings:
            raise RequestError(f"max_len must be in [1, {cfg.max_position_embeddings}], got {max_len}")
        if max_batch < 1 or max_queue < 0:
            raise RequestError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise RequestError(f"prefill_chunk must be None or >= 1, got {prefill_chunk}")
        self.model = model
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.prefill_chunk, self.prefix_reuse = prefill_chunk, prefix_reuse
        # Idle slots still holding a finished sequence: slot -> the tokens cached there, least recently used first.
        self._cached: dict[int, list[int]] = {}
        self.cache = LatentCache(
            cfg, num_slots=max_batch, max_len=max_len, dtype=model_dtype(model), device=model_device(model)
        )
        self.default_stop_ids = frozenset(cfg.eos_token_ids)
        # Ids a request may not sample. When they are a suffix of the vocabulary (the padded rows past
        # the tokenizer's ids, the usual case) the logits are cut there, exactly as `stream(vocab_limit=)`
        # does, so seeded sampling draws what offline generation draws; holes get an additive -inf mask.
        self._vocab_limit: int | None = None
        self._mask: torch.Tensor | None = None  # (V,): 0 where valid, -inf where not
        if valid_ids is not None:
            if valid_ids.shape != (cfg.vocab_size,):
                raise RequestError(f"valid_ids must have shape ({cfg.vocab_size},), got {tuple(valid_ids.shape)}")
            valid_ids = valid_ids.bool().cpu()
            n_valid = int(valid_ids.sum())
            if n_valid == 0:
                raise RequestError("valid_ids allows no token at all")
            if n_valid < cfg.vocab_size and bool(valid_ids[:n_valid].all()):
                self._vocab_limit = n_valid
            elif n_valid < cfg.vocab_size:
                self._mask = torch.zeros(cfg.vocab_size, device=model_device(model)).masked_fill(
                    ~valid_ids.to(model_device(model)), float("-inf")
                )

        self.runner = runner(model, self.cache)
        self._lock = threading.Condition()
        self._waiting: deque[RequestHandle] = deque()  # submitted, no slot yet
        self._running: list[RequestHandle] = []  # hold a slot; their last token is to be fed next step
        self._closed = False
        self._stats = dict(total=0, rejected=0, prompt_tokens=0, generated=0, batch=0, max_batch=0, reused=0)
        self._finished: dict[str, int] = {STOP: 0, LENGTH: 0, CANCELLED: 0, ERROR: 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for tokens/s
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        if start:
            self._thread.start()
            # Stop the loop before the interpreter tears torch down under it (an abort otherwise).
            atexit.register(_close_at_exit, weakref.ref(self))

    # --- public API --------------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams = SamplingParams(),
        max_new_tokens: int = 16,
        stop_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: TokenConstraint | None = None,
    ) -> RequestHandle:
        """Queue one request; raise RequestError if it is invalid, QueueFullError if the engine is full.

        `logprobs=n` records each new token's logprob and the n likeliest alternatives (`token_logprobs`);
        `prompt_logprobs=n` the same for every prompt token after the first (`prompt_scores`; the prompt
        is then prefilled whole, and `max_new_tokens=0` scores it without generating). `constraint`
        restricts which ids each step may sample.
        """
        # The same checks as every other way of generating (GenerationRequest), against this engine's max_len.
        request = GenerationRequest([list(prompt)], max_new_tokens, params, seed, stop_token_ids)
        request = request.validate(self.model.config, max_len=self.max_len)
        for name, n in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 20):
                raise RequestError(f"{name} must be None or an integer in [0, 20], got {n!r}")
        stops = self.default_stop_ids if stop_token_ids is None else request.stop_set
        handle = RequestHandle(
            self, request.prompts[0], params, max_new_tokens, stops, request.seed, logprobs, prompt_logprobs, constraint
        )
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if self._thread.ident is not None and not self._thread.is_alive():
                raise EngineClosedError("the engine loop has stopped")
            if len(self._waiting) + len(self._running) >= self.max_batch + self.max_queue:
                self._stats["rejected"] += 1
                raise QueueFullError(
                    f"server busy: {self.max_batch} requests running and {self.max_queue} waiting; retry later"
                )
            self._stats["total"] += 1
            if max_new_tokens == 0 and prompt_logprobs is None:  # nothing to do: no slot, no forward pass
                self._finished[LENGTH] += 1
                handle._finish(LENGTH)
                return handle
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    @property
    def alive(self) -> bool:
        """True while the loop thread runs and accepts requests."""
        return self._thread.is_alive() and not self._closed

    def stats(self) -> EngineStats:
        """Counters and gauges for /metrics (cheap; safe from any thread)."""
        with self._lock:
            now = time.monotonic()
            self._trim_recent(now)
            rate = sum(n for _, n in self._recent) / _THROUGHPUT_WINDOW_S
            s = self._stats
            return EngineStats(
                requests_total=s["total"],
                requests_rejected=s["rejected"],
                requests_finished=dict(self._finished),
                requests_active=len(self._running),
                requests_queued=len(self._waiting),
                prompt_tokens=s["prompt_tokens"],
                tokens_generated=s["generated"],
                tokens_per_second=rate,
                batch_size=s["batch"],
                max_batch_size=s["max_batch"],
                cache_slots_in_use=self.cache.slots_in_use - len(self._cached),
                cache_slots=self.cache.num_slots,
                prefix_tokens_reused=s["reused"],
                cached_prefixes=len(self._cached),
            )

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; unfinished requests end as cancelled. Idempotent."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with self._lock:
            for h in list(self._waiting) + self._running:
                self._end(h, CANCELLED)
            self._waiting.clear()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop ----------------------------------------------------------------------------------------------------

    def _poke(self) -> None:
        with self._lock:
            self._lock.notify()

    def _run(self) -> None:
        try:
            self._loop()
        finally:  # whatever ended the loop, no request may wait for it (close() cancels them itself)
            with self._lock:
                for h in [] if self._closed else list(self._waiting) + self._running:
                    self._end(h, ERROR, RuntimeError("the engine loop stopped"))
                self._waiting.clear()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not self._running:
                    self._stats["batch"] = 0  # idle: the gauge must not keep showing the last busy step
                    self._lock.wait()
                if self._closed:
                    return
                self._drop_cancelled()
                admitted = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            try:
                self._start(admitted)
                self._prefill()
                self._decode()
            except Exception as e:  # a bug in the loop itself: fail what is running, keep serving
                with self._lock:
                    for h in admitted + list(self._running):
                        self._end(h, ERROR, e)

    def _drop_cancelled(self) -> None:
        # Called with the lock held.
        for h in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(h)
            self._end(h, CANCELLED)
        for h in [h for h in self._running if h.cancelled]:
            self._end(h, CANCELLED)

    def _start(self, admitted: list[RequestHandle]) -> None:
        """Give each admitted request a slot: the cached prefix that shares most of its prompt, else a free one."""
        with self._lock:
            for h in admitted:
                if h.cancelled:
                    self._end(h, CANCELLED)
                    continue
                h.slot, h.prefilled = self._take_slot(h.prompt if h.prompt_logprobs is None else None)
                self._stats["reused"] += h.prefilled
                self._running.append(h)

    def _take_slot(self, prompt: list[int] | None) -> tuple[int, int]:
        """(slot, tokens of `prompt` it already holds); `prompt` None: an empty slot. Lock held."""
        if prompt is not None and self._cached:
            # At least the last prompt token is prefilled again: its logits pick the first new token.
            shared = {
                slot: min(len(os.path.commonprefix([held, prompt])), len(prompt) - 1)
                for slot, held in self._cached.items()
            }
            slot = max(shared, key=shared.__getitem__)  # the oldest of equals
            # A short match is not worth another cached sequence while an empty slot is free.
            full = self.cache.slots_in_use == self.cache.num_slots
            if shared[slot] >= _MIN_PREFIX_REUSE or (full and shared[slot] > 0):
                del self._cached[slot]
                self.runner.truncate(slot, shared[slot])
                return slot, shared[slot]
        if self.cache.slots_in_use == self.cache.num_slots:  # the free slots all hold prefixes: drop the oldest
            oldest = next(iter(self._cached))
            del self._cached[oldest]
            self.runner.free(oldest)
        return self.cache.allocate(), 0

    def _prefill(self) -> None:
        """Prefill the prompt tokens not yet in the cache; each completed prompt samples its first token.

        Without `prefill_chunk`, whole prompts: of similar length together (one forward pass for a
        burst of short prompts; a group whose padding would more than double its work is split). With
        it, at most that many tokens this step, oldest request first, so a long prompt is prefilled
        over several steps while the running requests keep decoding in between. If a batched prefill
        fails, each of its requests is retried alone, so only the culprit fails. A request that wants
        its prompt's logprobs is prefilled whole and alone, keeping the logits of every position.
        """
        with self._lock:
            pending = [h for h in self._running if h.prefilled < len(h.prompt) and not h.cancelled]
        for h in [h for h in pending if h.prompt_logprobs is not None]:
            self._start_alone(h)
        pending = [h for h in pending if h.prompt_logprobs is None]
        if self.prefill_chunk is None:
            groups = _length_groups([(h, len(h.prompt) - h.prefilled) for h in pending])
        else:
            budget, part = self.prefill_chunk, []
            for h in pending:
                if budget == 0:
                    break
                n = min(len(h.prompt) - h.prefilled, budget)
                part.append((h, n))
                budget -= n
            groups = [part] if part else []
        for group in groups:
            if len(group) == 1:
                self._start_alone(*group[0])
                continue
            try:
                logits = self.runner.prefill(
                    [h.slot for h, _ in group], [h.prompt[h.prefilled : h.prefilled + n] for h, n in group]
                )
            except Exception:
                for h, n in group:
                    self._start_alone(h, n)
                continue
            self._prefilled(logits, group)

    def _prefilled(self, logits: torch.Tensor, group: list[tuple[RequestHandle, int]]) -> None:
        """Advance each row by its n prompt tokens; the rows whose prompt is complete sample their first token."""
        for h, n in group:
            h.prefilled += n
        complete = [b for b, (h, _) in enumerate(group) if h.prefilled == len(h.prompt)]
        done = self._sample_rows(logits[complete], [group[b][0] for b in complete]) if complete else []
        with self._lock:
            self._stats["prompt_tokens"] += sum(n for _, n in group)
            self._record(done)

    def _start_alone(self, h: RequestHandle, n: int | None = None) -> None:
        """Prefill n more prompt tokens of one request (None: the rest; with prompt logprobs: the whole prompt)."""
        self.runner.truncate(h.slot, h.prefilled)  # a failed batched prefill may have committed some tokens
        try:
            if h.prompt_logprobs is None:
                n = len(h.prompt) - h.prefilled if n is None else n
                logits = self.runner.prefill([h.slot], [h.prompt[h.prefilled : h.prefilled + n]])
            else:
                h.prompt_scores = [None]
                logits = self.runner.prefill_with_logits(
                    [h.slot], [h.prompt], lambda _, at, rows: self._score_prompt(h, at, rows)
                )
                n = len(h.prompt)
        except Exception as e:
            with self._lock:
                self._end(h, ERROR, e)
            return
        if h.max_new_tokens == 0:  # scoring only
            h.prefilled = len(h.prompt)
            with self._lock:
                self._stats["prompt_tokens"] += n
                self._end(h, LENGTH)
            return
        self._prefilled(logits, [(h, n)])

    def _score_prompt(self, h: RequestHandle, at: int, logits: torch.Tensor) -> None:
        """Logprobs of prompt tokens at+1 .. at+n from the logits after tokens at .. at+n-1."""
        targets = h.prompt[at + 1 : at + 1 + logits.shape[0]]
        if targets:
            logits = self._vocab_masked(logits[: len(targets)])
            h.prompt_scores += _logprobs(logits, targets, h.prompt_logprobs)

    def _decode(self) -> None:
        """One decode step for every running request; if the batched step fails, each row is retried alone."""
        with self._lock:
            batch = [h for h in self._running if not h.cancelled and h.tokens]  # a row still prefilling has none
            if not batch:
                return
        try:
            logits = self.runner.decode_step([h.slot for h in batch], [h.tokens[-1] for h in batch])
            done = self._sample_rows(logits, batch)
        except Exception:
            # Some row broke the batched forward pass: redo each row alone so only the culprit fails. A
            # failed pass never reached `commit()`, so no slot's length moved and the rows can be replayed.
            done = []
            for h in batch:
                try:
                    logits = self.runner.decode_step([h.slot], [h.tokens[-1]])
                except Exception as e:
                    with self._lock:
                        self._end(h, ERROR, e)
                    continue
                done += self._sample_rows(logits, [h])
        with self._lock:
            self._stats["batch"] = len(done)
            self._stats["max_batch"] = max(self._stats["max_batch"], len(done))
            self._record(done)

    def _vocab_masked(self, logits: torch.Tensor) -> torch.Tensor:
        if self._vocab_limit is not None:
            return logits[..., : self._vocab_limit]
        if self._mask is not None:
            return logits + self._mask
        return logits

    @torch.inference_mode()
    def _sample_rows(self, logits: torch.Tensor, batch: list[RequestHandle]) -> list[_Sampled]:
        """(request, token, logprob) for each row that could sample; a row whose sampling fails is ended with ERROR.

        Rows with logit edits (a processor) or a constraint get them applied to their own row only;
        the other rows' logits are untouched, so they sample exactly as before these existed.
        """
        logits = self._vocab_masked(logits)
        edited = [b for b, h in enumerate(batch) if h.processor is not None or h.constraint is not None]
        if edited:
            logits = logits.float().clone()
            for b in edited:
                logits[b] = self._edit_row(logits[b], batch[b])
        states = [h.generator.get_state() for h in batch]
        try:
            tokens = sample_tokens(logits, [h.params for h in batch], [h.generator for h in batch])
            return [self._sampled(h, logits[b], t) for b, (h, t) in enumerate(zip(batch, tokens))]
        except Exception:
            pass
        # Some row cannot sample (e.g. NaN logits): rewind the generators the batched call advanced and
        # sample row by row, so the healthy rows draw exactly what they would have drawn.
        out = []
        for b, (h, state) in enumerate(zip(batch, states)):
            h.generator.set_state(state)
            try:
                token = sample_tokens(logits[b : b + 1], [h.params], [h.generator])[0]
                out.append(self._sampled(h, logits[b], token))
            except Exception as e:
                with self._lock:
                    self._end(h, ERROR, e)
        return out

    @staticmethod
    def _edit_row(logits_V: torch.Tensor, h: RequestHandle) -> torch.Tensor:
        if h.processor is not None:
            logits_V = h.processor(logits_V, h.tokens)
        if h.constraint is not None:
            allowed = h.constraint.allowed(logits_V.shape[-1])
            if allowed is not None:
                logits_V = torch.where(allowed.to(logits_V.device), logits_V, float("-inf"))
        return logits_V

    @staticmethod
    def _sampled(h: RequestHandle, logits_V: torch.Tensor, token: int) -> _Sampled:
        if h.constraint is not None:
            h.constraint.accept(token)
        if h.logprobs is None:
            return h, token, None
        return h, token, _logprobs(logits_V[None], [token], h.logprobs)[0]

    def _record(self, sampled: list[_Sampled]) -> None:
        """Deliver one new token per request; finished requests leave and free their slot. Lock held."""
        now = time.monotonic()
        self._recent.append((now, len(sampled)))
        self._trim_recent(now)
        self._stats["generated"] += len(sampled)
        for h, token, logprob in sampled:
            if h.cancelled:  # cancelled during the step: the reader is gone, drop the token
                self._end(h, CANCELLED)
                continue
            if logprob is not None:
                h.token_logprobs.append(logprob)
            h.tokens.append(token)
            h._emit(token)
            if token in h.stop_token_ids:
                self._end(h, STOP)
            elif h.constraint is not None and h.constraint.is_finished():
                self._end(h, STOP)
            elif len(h.tokens) >= h.max_new_tokens:
                self._end(h, LENGTH)

    def _end(self, h: RequestHandle, reason: str, error: BaseException | None = None) -> None:
        """Finish a request, free its slot. Lock held."""
        if h in self._running:
            self._running.remove(h)
        if h.slot is not None:
            held = int(self.cache.lengths[h.slot])
            if self.prefix_reuse and reason != ERROR and held > 0 and not self._closed:
                self._cached[h.slot] = (h.prompt + h.tokens)[:held]  # what the slot's cache holds
            else:
                self.runner.free(h.slot)
            h.slot = None
        if reason == CANCELLED and h.cancelled:
            reason = h._cancel_reason
        if not h.done:
            self._finished[reason] += 1
            h._finish(reason, error)

    def _trim_recent(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _THROUGHPUT_WINDOW_S:
            self._recent.popleft()


@torch.inference_mode()
def prefill_all_logits(
    model: DeepSeekV3,
    cache: LatentCache,
    slots: list[int],
    prompts: Sequence[Sequence[int]],
    on_logits: Callable[[int, int, torch.Tensor], None],
    chunk: int = 4096,
    head_chunk: int = 256,
) -> torch.Tensor:
    """`generate.prefill` that also hands out the logits after every prompt token, `head_chunk` positions at a time.

    The vocabulary projection runs on `head_chunk` positions at once, so memory stays at
    head_chunk x V floats however long the prompt (the whole (T, V) would be 2 GB at T=4096, V=129k).
    """
    lens = [len(p) for p in prompts]
    last = torch.empty(len(prompts), model.config.vocab_size, dtype=torch.float32, device=model_device(model))
    for lo, hi, hidden in prefill_chunks(model, cache, slots, prompts, chunk):
        for b, n in enumerate(lens):
            for a in range(lo, min(n, hi), head_chunk):
                z = min(a + head_chunk, n, hi)
                logits = model.logits(hidden[b : b + 1, a - lo : z - lo])[0]
                on_logits(b, a, logits)
                if z == n:
                    last[b] = logits[-1]
    return last


def _length_groups(parts: list[tuple[RequestHandle, int]]) -> list[list[tuple[RequestHandle, int]]]:
    """Split (request, tokens to prefill) into prefill batches, shortest first, each padded to at most twice its tokens."""
    groups: list[list[tuple[RequestHandle, int]]] = []
    tokens = 0
    for h, n in sorted(parts, key=lambda x: x[1]):
        if groups and (len(groups[-1]) + 1) * n <= 2 * (tokens + n):
            groups[-1].append((h, n))
            tokens += n
        else:
            groups.append([(h, n)])
            tokens = n
    return groups


def _logprobs(logits_NV: torch.Tensor, targets: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """TokenLogprob of targets[i] under logits row i, with the top_n likeliest ids of that row."""
    lp = torch.log_softmax(logits_NV.float(), dim=-1).clamp_(min=_UNLIKELY)
    V = lp.shape[-1]
    picked = [lp[i, t].item() if t < V else _UNLIKELY for i, t in enumerate(targets)]  # t >= V: masked off
    if top_n == 0:
        return [TokenLogprob(x) for x in picked]
    values, ids = torch.topk(lp, min(top_n, lp.shape[-1]), dim=-1)
    return [TokenLogprob(x, tuple(zip(i, v))) for x, i, v in zip(picked, ids.tolist(), values.tolist(), strict=True)]


def _close_at_exit(ref: weakref.ReferenceType[Engine]) -> None:
    engine = ref()
    if engine is not None:
        engine.close(timeout=5.0)
