"""The continuous-batching engine on its own: parity with offline generate, isolation, limits, cancel."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import dsv3
from dsv3.errors import RequestError
from dsv3.inference import engine as engine_mod
from dsv3.inference.engine import CANCELLED, ERROR, LENGTH, STOP, Engine, QueueFullError
from dsv3.inference.generate import stream
from dsv3.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def tiny_model() -> dsv3.DeepSeekV3:
    torch.manual_seed(1)
    return dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"), dtype=torch.float32).eval()


def prompt(n: int, start: int = 3) -> list[int]:
    return [0] + [(start + 7 * i) % 300 + 2 for i in range(n - 1)]


def offline(model, p: list[int], n: int, **kw) -> list[int]:
    return dsv3.generate(model, [p], max_new_tokens=n, stop_token_ids=[], **kw)[0]


def wait_for(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_greedy_requests_joining_and_leaving_match_generate(tiny_model):
    # 7 requests through 3 slots: later ones wait, then join the running batch as earlier ones finish.
    lens, budgets = [3, 11, 5, 20, 1, 8, 14], [9, 4, 15, 6, 12, 10, 3]
    prompts = [prompt(n, start=n) for n in lens]
    want = [offline(tiny_model, p, b) for p, b in zip(prompts, budgets)]
    with Engine(tiny_model, max_batch=3, max_len=64, max_queue=8) as eng:
        handles = [eng.submit(p, max_new_tokens=b, stop_token_ids=[]) for p, b in zip(prompts, budgets)]
        got = [h.result() for h in handles]
        stats = eng.stats()
    assert got == want
    assert all(h.finish_reason == LENGTH for h in handles)
    assert stats.max_batch_size == 3
    assert stats.cache_slots_in_use == 0 and stats.requests_active == 0 and stats.requests_queued == 0
    assert stats.tokens_generated == sum(budgets)
    assert stats.prompt_tokens == sum(lens)
    assert stats.requests_finished[LENGTH] == len(prompts)


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model):
    p = prompt(6)
    params = SamplingParams(temperature=1.0, top_p=0.9)
    want = offline(tiny_model, p, 12, temperature=1.0, top_p=0.9, seed=1234)
    with Engine(tiny_model, max_batch=4, max_len=64) as eng:
        alone = eng.submit(p, params, max_new_tokens=12, stop_token_ids=[], seed=1234).result()
        others = [eng.submit(prompt(n), params, max_new_tokens=12, stop_token_ids=[], seed=n) for n in (2, 9, 4)]
        crowded = eng.submit(p, params, max_new_tokens=12, stop_token_ids=[], seed=1234).result()
        for h in others:
            h.result()
    assert alone == want and crowded == want


def test_stop_ids_end_a_request_and_are_included(tiny_model):
    p = prompt(5)
    greedy = offline(tiny_model, p, 6)
    with Engine(tiny_model, max_batch=2, max_len=64) as eng:
        h = eng.submit(p, max_new_tokens=6, stop_token_ids=[greedy[2]])
        assert h.result() == greedy[: greedy.index(greedy[2]) + 1]
        assert h.finish_reason == STOP
        zero = eng.submit(p, max_new_tokens=0)
        assert zero.result() == [] and zero.finish_reason == LENGTH


def test_valid_ids_mask_is_never_sampled(tiny_model):
    p = prompt(7)
    greedy = offline(tiny_model, p, 8)
    valid = torch.ones(tiny_model.config.vocab_size, dtype=torch.bool)
    valid[greedy] = False  # holes: an additive -inf mask
    with Engine(tiny_model, max_batch=1, max_len=64, valid_ids=valid) as eng:
        got = eng.submit(p, max_new_tokens=8, stop_token_ids=[]).result()
    assert len(got) == 8 and not set(got) & set(greedy)


def test_valid_ids_suffix_samples_like_stream_with_vocab_limit(tiny_model):
    p, limit = prompt(5), 200
    params = SamplingParams(temperature=1.5)
    with torch.inference_mode():
        want = [
            t
            for step in stream(tiny_model, [p], 16, params, seed=9, stop_token_ids=[], vocab_limit=limit)
            for t in step.values()
        ]
    valid = torch.arange(tiny_model.config.vocab_size) < limit
    with Engine(tiny_model, max_batch=2, max_len=64, valid_ids=valid) as eng:
        got = eng.submit(p, params, max_new_tokens=16, stop_token_ids=[], seed=9).result()
    assert got == want and max(got) < limit


def test_async_iteration_yields_the_same_tokens(tiny_model):
    p = prompt(4)
    with Engine(tiny_model, max_batch=2, max_len=64) as eng:

        async def collect() -> list[int]:
            return [t async for t in eng.submit(p, max_new_tokens=7, stop_token_ids=[])]

        assert asyncio.run(collect()) == offline(tiny_model, p, 7)


def test_invalid_requests_are_refused_at_submit(tiny_model):
    with Engine(tiny_model, max_batch=1, max_len=32) as eng:
        for bad in ([], [0, 320], [0, -1], [0, True]):
            with pytest.raises(RequestError):
                eng.submit(bad)
        with pytest.raises(RequestError, match="context"):
            eng.submit(prompt(30), max_new_tokens=3)
        with pytest.raises(RequestError):
            eng.submit(prompt(3), max_new_tokens=-1)
        with pytest.raises(RequestError):
            eng.submit(prompt(3), SamplingParams(top_p=0.0))
        with pytest.raises(RequestError, match="seed"):
            eng.submit(prompt(3), seed=2**64)
        assert eng.stats().requests_total == 0
        assert eng.submit(prompt(3), max_new_tokens=2).result()  # still serving


def test_queue_bound_raises_queue_full():
    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    model = dsv3.DeepSeekV3(cfg, dtype=torch.float32).eval()
    eng = Engine(model, max_batch=1, max_len=32, max_queue=2, start=False)  # no loop: nothing is admitted
    handles = [eng.submit(prompt(3)) for _ in range(3)]  # one slot + two queue places
    with pytest.raises(QueueFullError):
        eng.submit(prompt(3))
    assert eng.stats().requests_rejected == 1 and eng.stats().requests_queued == 3
    eng.close()
    assert all(h.finish_reason == CANCELLED and h.result() == [] for h in handles)


def test_cancel_frees_the_slot_at_once(tiny_model):
    with Engine(tiny_model, max_batch=1, max_len=256, max_queue=4) as eng:
        running = eng.submit(prompt(4), max_new_tokens=250, stop_token_ids=[])
        waiting = eng.submit(prompt(5), max_new_tokens=3, stop_token_ids=[])
        tokens = iter(running)
        first = [next(tokens) for _ in range(3)]
        waiting.cancel()  # cancelled while queued: never takes the slot
        running.cancel()
        wait_for(lambda: running.done and waiting.done)
        assert running.finish_reason == CANCELLED and waiting.finish_reason == CANCELLED
        assert running.tokens[:3] == first and len(running.tokens) < 250
        assert waiting.tokens == []
        wait_for(lambda: eng.stats().cache_slots_in_use == 0)
        assert eng.submit(prompt(4), max_new_tokens=2, stop_token_ids=[]).result() == offline(tiny_model, prompt(4), 2)


def test_a_failing_request_fails_alone(tiny_model, monkeypatch):
    # Prefill of prompts holding id 1 raises; so does any decode step touching a sequence of length 40.
    real_prefill, real_decode = engine_mod.prefill, engine_mod.decode_step

    def bad_prefill(model, cache, slots, prompts):
        if any(1 in p for p in prompts):
            raise RuntimeError("prefill exploded")
        return real_prefill(model, cache, slots, prompts)

    def bad_decode(model, cache, slots, tokens):
        if any(int(cache.lengths[s]) == 40 for s in slots):
            raise RuntimeError("decode exploded")
        return real_decode(model, cache, slots, tokens)

    monkeypatch.setattr(engine_mod, "prefill", bad_prefill)
    monkeypatch.setattr(engine_mod, "decode_step", bad_decode)
    good = [prompt(n, start=n) for n in (4, 9, 6)]
    want = [offline(tiny_model, p, 10) for p in good]
    with Engine(tiny_model, max_batch=4, max_len=64) as eng:
        handles = [eng.submit(p, max_new_tokens=10, stop_token_ids=[]) for p in good[:2]]
        bad_prefill_h = eng.submit([0, 1, 14], max_new_tokens=5, stop_token_ids=[])
        bad_decode_h = eng.submit([0] + [5] * 39, max_new_tokens=5, stop_token_ids=[])  # 40 tokens
        handles.append(eng.submit(good[2], max_new_tokens=10, stop_token_ids=[]))
        assert [h.result() for h in handles] == want
        for h in (bad_prefill_h, bad_decode_h):
            with pytest.raises(RequestError, match="exploded"):
                h.result()
            assert h.finish_reason == ERROR
        stats = eng.stats()
        assert stats.requests_finished[ERROR] == 2 and stats.cache_slots_in_use == 0
        assert eng.alive


def test_chunked_prefill_interleaves_decode_steps(tiny_model):
    short, long_ = prompt(4), prompt(40, start=5)
    want_short, want_long = offline(tiny_model, short, 30), offline(tiny_model, long_, 5)
    with Engine(tiny_model, max_batch=2, max_len=64, prefill_chunk=8) as eng:
        running = eng.submit(short, max_new_tokens=30, stop_token_ids=[])
        tokens = iter(running)
        next(tokens)  # the short request is decoding
        arriving = eng.submit(long_, max_new_tokens=5, stop_token_ids=[])
        first = next(iter(arriving))
        seen_by_then = len(running.tokens)
        assert arriving.result() == want_long and running.result() == want_short
        assert first == want_long[0]
    # 40 prompt tokens in chunks of 8 take 5 steps, each followed by a decode step of the running request.
    assert seen_by_then >= 1 + 4


def test_prefix_reuse_skips_the_shared_prefix_and_keeps_the_answer(tiny_model):
    turn1 = prompt(20)
    with Engine(tiny_model, max_batch=2, max_len=96, prefix_reuse=True) as eng:
        answer = eng.submit(turn1, max_new_tokens=6, stop_token_ids=[]).result()
        wait_for(lambda: eng.stats().cached_prefixes == 1)
        assert eng.stats().cache_slots_in_use == 0
        turn2 = turn1 + answer + prompt(9, start=40)[1:]
        got = eng.submit(turn2, max_new_tokens=8, stop_token_ids=[]).result()
        stats = eng.stats()
        # The slot held turn 1's prompt and all but its last answer token (never fed back).
        assert stats.prefix_tokens_reused == len(turn1) + len(answer) - 1
        assert stats.prompt_tokens == len(turn1) + len(turn2) - stats.prefix_tokens_reused
        # A prompt sharing nothing takes the other slot; a third one evicts the oldest cached prefix.
        other = [eng.submit(prompt(7, start=s), max_new_tokens=3, stop_token_ids=[]).result() for s in (90, 91)]
        assert other == [offline(tiny_model, prompt(7, start=s), 3) for s in (90, 91)]
        wait_for(lambda: eng.stats().cached_prefixes == 2)
    assert got == offline(tiny_model, turn2, 8)
