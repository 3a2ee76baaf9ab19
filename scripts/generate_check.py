"""`dsv3.generate` (greedy runs of decode steps in one native call each) against `stream` (one call a step), alternating.

    python scripts/generate_check.py [--checkpoint ~/.cache/dsv3/bench-small] [--quantize int8] [--rounds 7]
                                     [--context 128] [--tokens 129] [--batch 1] [--threads 2]

Each round times, in this one process (the host's speed drifts between processes), `dsv3.generate` and a loop over
`stream` (what a caller reading each token as it comes gets), each for 1 and for --tokens new tokens after the same
--context-token prompt; decode tokens/s = (tokens - 1) / (time(tokens) - time(1)), so the prefill cancels. Greedy,
no stop ids: both produce the same tokens (checked). Printed: each mode's median over the rounds and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dsv3 import DeepSeekV3, InferenceOptions, generate
from dsv3.bench import _prompt
from dsv3.inference.generate import stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="~/.cache/dsv3/bench-small")
    ap.add_argument("--quantize", choices=["int8"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=129)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = DeepSeekV3.from_pretrained(Path(args.checkpoint).expanduser(), dtype=torch.bfloat16).eval()
    model.prepare_for_inference(InferenceOptions(quantize=args.quantize))
    prompts = [_prompt(args.context, model.config.vocab_size, b) for b in range(args.batch)]

    def by_stream(n: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for step in stream(model, prompts, n, stop_token_ids=[]):
            for b, t in step.items():
                out[b].append(t)
        return out

    modes = {"generate": lambda n: generate(model, prompts, max_new_tokens=n, stop_token_ids=[]), "stream": by_stream}
    if modes["generate"](args.tokens) != modes["stream"](args.tokens):
        raise SystemExit("generate's tokens differ from stream's")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, run in modes.items():
            t0 = time.perf_counter()
            run(1)
            t1 = time.perf_counter()
            run(args.tokens)
            t2 = time.perf_counter()
            rates[mode].append(args.batch * (args.tokens - 1) / ((t2 - t1) - (t1 - t0)))
    med = {m: statistics.median(r) for m, r in rates.items()}
    for mode, r in rates.items():
        print(f"{mode:8s}: {med[mode]:7.1f} decode tok/s (rounds: {', '.join(f'{x:.1f}' for x in r)})")
    print(f"generate / stream = {med['generate'] / med['stream']:.2f}x")


if __name__ == "__main__":
    main()
