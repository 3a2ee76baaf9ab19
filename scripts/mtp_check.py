"""MTP speculative decoding against plain decoding on the packaged model (its MTP head is trained), alternating.

    python scripts/mtp_check.py [--rounds 5] [--tokens 120] [--batch 1,4] [--threads 2]

Prompts: 200-token slices of the Python standard library's `json/__init__.py` (text the model learnt from). Each
round runs plain `stream` and `speculative_stream` once per batch size, alternately, in this one process (the host's
speed drifts between processes); printed are each mode's median tokens/s over the rounds, for the whole stream
(prefill included) and for decoding alone (from the first yielded token to the last), the MTP acceptance, and the
ratio MTP / plain. Greedy, no stop ids: both modes produce the same tokens (checked).

    python scripts/mtp_check.py --perfect-draft ~/.cache/dsv3/bench-small [--quantize int8]

times another checkpoint's shapes at acceptance 1.0, where its MTP head has learnt nothing: the main model is made
a bigram model (attention and MLP outputs zeroed: every weight is still read) and the MTP module an exact copy of
its next-token step (`eh_proj` passes the embedding of token t+1 through, head and final norm copied), so every
draft is the main model's own next token. Prompts are then fixed ids. An upper bound for that checkpoint's shapes:
a trained head reaches 0.94-0.98 on the packaged model.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import statistics
import time
from pathlib import Path

import torch

from dsv3 import DeepSeekV3, InferenceOptions
from dsv3.inference.generate import stream
from dsv3.inference.speculative import SpeculativeStats, speculative_stream
from dsv3.pretrained import packaged_model_dir
from dsv3.tokenizer import Tokenizer


def timed(it) -> tuple[float, float, list[list[int]], int]:
    """(seconds for the whole stream, seconds after its first step, tokens per row, tokens after the first step)."""
    t0 = time.perf_counter()
    rows: dict[int, list[int]] = {}
    first = None
    later = 0
    for step in it:
        for b, v in step.items():
            new = v if isinstance(v, list) else [v]
            rows.setdefault(b, []).extend(new)
            if first is not None:
                later += len(new)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return end - t0, end - first, [rows[b] for b in sorted(rows)], later


def make_drafts_perfect(model: DeepSeekV3) -> None:
    """Main model -> bigram model, MTP module -> its exact next-token step (see the module docstring)."""
    D = model.config.hidden_size
    with torch.no_grad():
        for layer in [*model.model.layers, *model.mtp]:
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            for down in (getattr(mlp, "down_proj", None), getattr(getattr(mlp, "experts", None), "down_proj", None)):
                if down is not None:
                    down.weight.zero_()
            shared = getattr(mlp, "shared_experts", None)
            if shared is not None:
                shared.down_proj.weight.zero_()
        mtp = model.mtp[0]
        mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = torch.eye(D)
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
        mtp.shared_head.head.weight.copy_(model.lm_head.weight)
    model.invalidate_derived_()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--perfect-draft", metavar="CHECKPOINT", help="time this checkpoint's shapes at acceptance 1.0")
    ap.add_argument("--quantize", choices=["int8"], help="with --perfect-draft: int8 weights")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.perfect_draft:
        model = DeepSeekV3.from_pretrained(Path(args.perfect_draft).expanduser(), dtype=torch.bfloat16).eval()
        make_drafts_perfect(model)
        model.prepare_for_inference(InferenceOptions(quantize=args.quantize))
        V = model.config.vocab_size
        prompts = [[(7919 * (i + 1) * (j + 3)) % (V - 2) + 2 for j in range(200)] for i in range(8)]
    else:
        d = packaged_model_dir()
        model = DeepSeekV3.from_pretrained(d, dtype=torch.bfloat16).eval()
        tok = Tokenizer.from_dir(d)
        src = pathlib.Path(inspect.getfile(json)).read_text()
        prompts = [tok.encode(src[i * 2000 : i * 2000 + 600])[:200] for i in range(8)]
    runs = {
        "plain": lambda p, st: stream(model, p, args.tokens, stop_token_ids=[]),
        "mtp": lambda p, st: speculative_stream(model, p, args.tokens, stop_token_ids=[], stats=st),
    }
    report = {}
    for B in [int(b) for b in args.batch.split(",")]:
        P = prompts[:B]
        for run in runs.values():  # warm-up: plans, rotary tables
            list(run(P, SpeculativeStats()))
        figures = {mode: {"whole": [], "decode": []} for mode in runs}
        outputs, stats = {}, SpeculativeStats()
        for _ in range(args.rounds):
            for mode, run in runs.items():
                whole, after, rows, later = timed(run(P, stats))
                figures[mode]["whole"].append(sum(map(len, rows)) / whole)
                figures[mode]["decode"].append(later / after)
                outputs[mode] = rows
        if outputs["plain"] != outputs["mtp"]:
            raise SystemExit(f"batch {B}: MTP's greedy tokens differ from plain decoding's")
        med = {m: {k: statistics.median(v) for k, v in f.items()} for m, f in figures.items()}
        report[f"b{B}"] = {**med, "acceptance": stats.acceptance_rate, "tokens_per_step": stats.tokens_per_step}
        for k in ("whole", "decode"):
            print(
                f"batch {B} {k:6s}: plain {med['plain'][k]:8.1f} tok/s  MTP {med['mtp'][k]:8.1f} tok/s  "
                f"= {med['mtp'][k] / med['plain'][k]:.2f}x",
                flush=True,
            )
        print(f"batch {B} acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_step:.2f} tokens/step", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
