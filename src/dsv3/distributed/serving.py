"""`dsv3 serve` under torchrun: rank 0's continuous-batching engine, every forward pass run on all ranks.

Rank 0 runs the HTTP server and the `Engine` exactly as one process does, with a `ReplicatedRunner`
in place of the engine's `ModelRunner`: before each prefill or decode step it broadcasts the call
(the op, the slots, the prompt ids or the last tokens, and the cache edits since the previous call:
slots freed or truncated) and then runs it on its own shard. Ranks > 0 sit in `follow_engine`,
which applies the same edits to their own `LatentCache` (same size, same slot numbers), runs the
same call on their shard and drops the logits: sampling happens on rank 0 alone, and the tokens it
picked arrive with the next decode call. So each pass's collectives pair up across the ranks, and
at temperature 0 the tokens are those of one process.

    model, ctx = parallel_model_from_args(ckpt, tp, ep, "bf16")
    if not ctx.is_main:
        follow_engine(model, ctx)                  # until rank 0 calls runner.release()
    else:
        engine = Engine(model, runner=functools.partial(ReplicatedRunner, ctx=ctx))
        ...serve...; engine.close(); engine.runner.release()

Failures: after a forward pass or broadcast fails, the ranks may sit in different collectives, so
the runner refuses every further call (the engine fails the running requests), calls `on_failure`
(serve stops the HTTP server) and `release()` re-raises the error: `run_or_exit` then ends rank 0,
and the other ranks' pending collective fails, which ends them too. An idle server broadcasts a
keep-alive every quarter of the process-group timeout (`DSV3_DIST_TIMEOUT`), so the waiting ranks
never time out; a rank that dies while the server is idle is noticed by the next keep-alive.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable

import torch

from ..inference.engine import ModelRunner, prefill_all_logits
from ..inference.generate import decode_step, model_device, model_dtype, prefill
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .launch import ParallelContext
from .mesh import timeout_from_env

# Messages rank 0 broadcasts: (_OPEN, num_slots, max_len), (_PREFILL | _DECODE, edits, slots, ids),
# (_KEEPALIVE,), (_STOP,). `edits` is [(slot, length)]: truncate the slot to that length (0 = freed).
_OPEN, _PREFILL, _DECODE, _KEEPALIVE, _STOP = "open", "prefill", "decode", "keepalive", "stop"
_PREFILL_LOGITS = "prefill_logits"  # a prefill that also projects every position (prompt logprobs)
_RELEASE_WAIT_S = 60.0  # how long release() waits for a forward pass still running


class ParallelGroupFailed(RuntimeError):
    """A forward pass or broadcast failed earlier: the ranks are no longer known to be in step."""


class ReplicatedRunner(ModelRunner):
    """Rank 0's engine runner: broadcast each call, then run it here. Build it as `Engine(runner=...)`'s factory.

    Every collective this process makes from now on goes through `_lock` (the engine thread's
    passes, the keep-alive thread's pings, the final release), so the ranks see them in one order.
    """

    def __init__(
        self, model: DeepSeekV3, cache: LatentCache, ctx: ParallelContext, keepalive_s: float | None = None
    ) -> None:
        super().__init__(model, cache)
        self.ctx = ctx
        self.error: BaseException | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._lock = threading.Lock()
        self._edits: list[tuple[int, int]] = []  # applied here at once; sent with the next pass
        self._edits_lock = threading.Lock()
        self._closed = threading.Event()
        self._last = time.monotonic()
        with self._lock:
            self._send((_OPEN, cache.num_slots, cache.max_len))
        self._keepalive_s = keepalive_s if keepalive_s is not None else timeout_from_env() / 4
        self._pinger = threading.Thread(target=self._keepalive, name="dsv3-keepalive", daemon=True)
        self._pinger.start()

    # --- the engine's calls ------------------------------------------------------------------------------------------

    def prefill(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        return self._run(_PREFILL, slots, prompts, super().prefill)

    def decode_step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self._run(_DECODE, slots, tokens, super().decode_step)

    def prefill_with_logits(
        self, slots: list[int], prompts: list[list[int]], on_logits: Callable[[int, int, torch.Tensor], None]
    ) -> torch.Tensor:
        local = functools.partial(super().prefill_with_logits, on_logits=on_logits)
        return self._run(_PREFILL_LOGITS, slots, prompts, local)

    def truncate(self, slot: int, length: int) -> None:
        with self._edits_lock:
            super().truncate(slot, length)
            self._edits.append((slot, length))

    def free(self, slot: int) -> None:
        with self._edits_lock:
            super().free(slot)
            self._edits.append((slot, 0))

    # --- serve's calls -----------------------------------------------------------------------------------------------

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` (from the failing thread) when the group fails; at once if it already has."""
        self._on_failure = callback
        if self.error is not None:
            callback(self.error)

    def release(self) -> None:
        """Let the other ranks leave `follow_engine`; raise the failure instead if the group failed.

        Call after `Engine.close()`, on the success path only: a failing rank 0 just exits (`run_or_exit`),
        and the others' pending broadcast fails.
        """
        self._closed.set()
        if not self._lock.acquire(timeout=_RELEASE_WAIT_S):
            raise ParallelGroupFailed(
                f"a forward pass was still running {_RELEASE_WAIT_S:.0f}s after the engine stopped"
            )
        try:
            if self.error is not None:
                raise self.error
            self._send((_STOP,))
        finally:
            self._lock.release()

    # --- inside ------------------------------------------------------------------------------------------------------

    def _run(self, op: str, slots: list[int], ids: list, local: Callable[[list[int], list], torch.Tensor]):
        with self._lock:
            if self.error is not None:
                raise ParallelGroupFailed(f"the parallel group failed earlier: {self.error}") from self.error
            with self._edits_lock:
                edits, self._edits = self._edits, []
            prompts = op in (_PREFILL, _PREFILL_LOGITS)
            self._send((op, edits, list(slots), [list(p) for p in ids] if prompts else list(ids)))
            try:
                return local(slots, ids)
            except BaseException as e:
                self._fail(e)
                raise

    def _send(self, message: tuple) -> None:
        """Broadcast (the caller holds `_lock`); a failure fails the group."""
        try:
            self.ctx.broadcast_object(message)
        except BaseException as e:
            self._fail(e)
            raise
        self._last = time.monotonic()

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
            if self._on_failure is not None:
                self._on_failure(e)

    def _keepalive(self) -> None:
        while not self._closed.wait(self._keepalive_s / 2):
            if time.monotonic() - self._last < self._keepalive_s / 2:
                continue
            with self._lock:
                if self._closed.is_set() or self.error is not None:
                    return
                try:
                    self._send((_KEEPALIVE,))
                except BaseException:  # recorded in self.error, reported by release()
                    return


def follow_engine(model: DeepSeekV3, ctx: ParallelContext) -> None:
    """Ranks > 0 of `dsv3 serve`: replay rank 0's engine calls on this rank's shard until it releases them.

    Ctrl-C and SIGTERM reach every rank (a terminal sends them to the whole group; torchrun forwards
    what it gets): here they are ignored, since rank 0 shuts the server down and then releases this
    rank, and if rank 0 dies instead the pending broadcast fails and `run_or_exit` ends this rank.
    """
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    cache: LatentCache | None = None
    with torch.inference_mode():
        while True:
            message = ctx.broadcast_object()
            op = message[0]
            if op == _STOP:
                return
            if op == _KEEPALIVE:
                continue
            if op == _OPEN:
                _, num_slots, max_len = message
                cache = LatentCache(
                    model.config, num_slots, max_len, dtype=model_dtype(model), device=model_device(model)
                )
                continue
            _, edits, slots, ids = message
            for slot, length in edits:
                cache.truncate(slot, length)
            if op == _PREFILL:
                prefill(model, cache, slots, ids)
            elif op == _PREFILL_LOGITS:  # the same passes as rank 0's; the logits are rank 0's to use
                prefill_all_logits(model, cache, slots, ids, lambda *_: None)
            else:
                decode_step(model, cache, slots, ids)
