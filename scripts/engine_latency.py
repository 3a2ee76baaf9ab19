#!/usr/bin/env python
"""Engine latency under a long prompt, and time to first token of a chat's second turn.

1. Chunked prefill: `--streams` requests are decoding when a `--long`-token prompt arrives; reports the
   running streams' inter-token gaps (p50 / p99 / max) from its arrival to its first token, and its
   time to first token, for each `--chunks` value (0: the whole prompt in one pass, as before).
2. Prefix reuse: turn 1 (a `--turn1`-token prompt, 32 new tokens), then turn 2 = turn 1 + its answer
   + 64 new prompt tokens; reports turn 2's time to first token with and without prefix reuse.

The model is the random-weight `--preset` (default small) in bf16, in this process, no HTTP:

    python scripts/engine_latency.py --preset small --long 4096 --streams 4 --chunks 0 512 256
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import dsv3
from dsv3.inference.engine import Engine

VOCAB = [100_000]  # ids drawn below this (set to the model's vocabulary in main)


def ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(2, VOCAB[0], (n - 1,), generator=g).tolist()


def interference(model: dsv3.DeepSeekV3, chunk: int | None, streams: int, long_len: int) -> str:
    with Engine(model, max_batch=streams + 1, max_len=long_len + 64, prefill_chunk=chunk) as eng:
        handles = [eng.submit(ids(32, s), max_new_tokens=long_len, stop_token_ids=[]) for s in range(streams)]
        stamps: list[list[float]] = [[] for _ in handles]

        def read(k: int) -> None:
            for _ in handles[k]:
                stamps[k].append(time.monotonic())

        readers = [threading.Thread(target=read, args=(k,), daemon=True) for k in range(streams)]
        for r in readers:
            r.start()
        while min(len(s) for s in stamps) < 8:  # every stream is decoding
            time.sleep(0.01)
        t0 = time.monotonic()
        long_req = eng.submit(ids(long_len, 99), max_new_tokens=1, stop_token_ids=[])
        long_req.result()
        t1 = time.monotonic()
        deadline = time.monotonic() + 600
        while min(s[-1] for s in stamps) <= t1 and time.monotonic() < deadline:  # the gap spanning t1 closes
            time.sleep(0.01)
        for h in handles:
            h.cancel()
        for r in readers:
            r.join()
    # Every gap between two tokens of a running stream that overlaps the window [arrival, first token].
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > t0 and a < t1]
    gaps.sort()
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]
    return (
        f"prefill_chunk={chunk}: {long_len}-token prompt TTFT {t1 - t0:.2f} s; running streams' inter-token gaps "
        f"while it prefilled: n={len(gaps)}, p50 {statistics.median(gaps) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, "
        f"max {gaps[-1] * 1e3:.0f} ms"
    )


def second_turn(model: dsv3.DeepSeekV3, reuse: bool, turn1_len: int) -> str:
    with Engine(model, max_batch=2, max_len=turn1_len + 200, prefix_reuse=reuse) as eng:
        turn1 = ids(turn1_len, 7)
        answer = eng.submit(turn1, max_new_tokens=32, stop_token_ids=[]).result()
        turn2 = turn1 + answer + ids(65, 8)[1:]
        t0 = time.monotonic()
        handle = eng.submit(turn2, max_new_tokens=1, stop_token_ids=[])
        handle.result()
        dt = time.monotonic() - t0
        reused = eng.stats().prefix_tokens_reused
    return f"prefix_reuse={reuse}: turn 2 ({len(turn2)} prompt tokens, {reused} reused) TTFT {dt:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--long", type=int, default=4096)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 512])
    ap.add_argument("--turn1", type=int, default=2048)
    ap.add_argument("--skip", choices=["chunks", "reuse"], default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained(args.preset), dtype=torch.bfloat16).eval()
    VOCAB[0] = min(100_000, model.config.vocab_size)
    print(f"{args.preset}, bf16, {torch.get_num_threads()} threads", flush=True)
    if args.skip != "chunks":
        for chunk in args.chunks:
            print(interference(model, chunk or None, args.streams, args.long), flush=True)
    if args.skip != "reuse":
        for reuse in (False, True):
            print(second_turn(model, reuse, args.turn1), flush=True)


if __name__ == "__main__":
    main()
