"""Helpers of the training tests: a small deterministic corpus, a CLI runner for `train`/`plot`, metrics."""

from __future__ import annotations

import argparse
import json
import os
import random

WORDS = (
    "the model routes each token to a few experts and the bias keeps their load even while the loss falls "
    "def return import class for while if else print value index data layer expert token batch step"
).split()


def make_corpus(folder: str, docs: int = 40, seed: int = 0) -> str:
    """Write `docs` small text files of pseudo-sentences (the same bytes on every machine) into folder."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    for d in range(docs):
        lines = []
        for _ in range(rng.randint(3, 12)):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".")
        with open(os.path.join(folder, f"doc{d:03d}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return folder


def run_cli(*argv: str) -> int:
    """Parse and run a `train`/`plot` command line as `dsv3` would (errors propagate as exceptions)."""
    from dsv3.training.commands import add_commands

    parser = argparse.ArgumentParser(prog="dsv3")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.fn(args)


def read_metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# Small and fast: the tiny preset, byte tokenizer, 4 sequences of 32 tokens per step.
FAST = (
    "--config",
    "tiny",
    "--tokenizer",
    "byte",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--warmup",
    "2",
    "--log-every",
    "0",
)
