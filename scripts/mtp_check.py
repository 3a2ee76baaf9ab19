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

    python scripts/mtp_check.py --pad-mb 128

times the packaged model, trained head and all, made memory-bound: its dense layers' MLPs are widened until a
decode step streams that many more MB (`pad_dense_mlps`: the new gate/up rows random, the new down_proj columns
zero, so every output is the trained model's; the greedy tokens are checked against the unpadded model's). The
packaged model streams ~3 MB a step, so its steps cost what their Python and thread hand-offs cost and a second
verified row costs nearly what the first does; a real checkpoint streams hundreds of MB to GB a step, where a
second row is nearly free and the MTP layer is one layer of many (V3: 1 of 62, its head ~2% of a step's bytes),
which the padding reproduces with the acceptance of a trained head. The padded rows are short (the packaged
model is 128 wide), which costs more arithmetic per byte than a real model's rows: a pessimistic proxy.

Every mode also prints the verification's cost: a two-row pass of the main model (tokens [last, draft], with
hidden states, as a speculative step verifies) against a one-row decode pass, medians of alternating rounds.
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
from dsv3.model import native_decode
from dsv3.model.cache import LatentCache
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


def pad_dense_mlps(model: DeepSeekV3, extra_mb: float) -> DeepSeekV3:
    """A copy of `model` computing the same function while a decode step streams `extra_mb` more MB: the dense
    layers' MLPs (`intermediate_size`) get extra rows, random in gate_proj and up_proj, zero in down_proj's new
    columns, so each extra product adds exact zeros to the original sums."""
    cfg = model.config
    dense = [i for i in range(cfg.num_hidden_layers) if i not in cfg.moe_layer_indices]
    if not dense:
        raise SystemExit("--pad-mb needs a model with a dense layer (first_k_dense_replace > 0)")
    F = cfg.intermediate_size
    per_row = 3 * cfg.hidden_size * model.dtype.itemsize * len(dense)  # gate, up and down, every dense layer
    extra = max(64, round(extra_mb * 2**20 / per_row / 64) * 64)
    padded = DeepSeekV3(cfg.replace(intermediate_size=F + extra), dtype=model.dtype).eval()
    original = model.state_dict()
    with torch.no_grad():
        for name, t in padded.state_dict().items():
            src = original[name]
            if src.shape == t.shape:
                t.copy_(src)
            elif name.endswith("down_proj.weight"):
                t.zero_()
                t[:, :F] = src
            else:  # gate_proj / up_proj: the original rows first, the rest stay random
                t[:F] = src
    return padded


def verification_cost(model: DeepSeekV3, prompt: list[int], rounds: int = 8, reps: int = 10) -> tuple[float, float]:
    """Median seconds of a one-row decode pass and of a two-row verification pass (with hidden states, as
    `speculative_step` verifies) of the main model after `prompt`, alternating; each pass undone by truncation."""
    cache = LatentCache(model.config, 1, len(prompt) + 2, dtype=model.dtype)
    slot = cache.allocate()
    with torch.inference_mode():
        batch = cache.bind([slot], [len(prompt) - 2])
        model.hidden_states(torch.tensor([prompt[:-2]]), cache=batch)
        batch.commit()
        list(stream(model, [prompt], 2, stop_token_ids=[]))  # plans the native decode pass
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(rounds):
            for T in (1, 2):
                t0 = time.perf_counter()
                for _ in range(reps):
                    if native_decode.decode_logits(model, cache, [slot], prompt[-T:], T, T == 2) is None:
                        raise SystemExit("the one-call native decode pass does not apply to this model here")
                    cache.truncate(slot, len(prompt) - 2)
                times[T].append((time.perf_counter() - t0) / reps)
    return statistics.median(times[1]), statistics.median(times[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=120)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--perfect-draft", metavar="CHECKPOINT", help="time this checkpoint's shapes at acceptance 1.0")
    ap.add_argument("--quantize", choices=["int8"], help="with --perfect-draft: int8 weights")
    ap.add_argument("--pad-mb", type=float, help="the packaged model made to stream this many more MB a step")
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
        if args.pad_mb:
            before = list(stream(model, prompts[:1], args.tokens, stop_token_ids=[]))
            model = pad_dense_mlps(model, args.pad_mb).prepare_for_inference()
            if list(stream(model, prompts[:1], args.tokens, stop_token_ids=[])) != before:
                raise SystemExit("the padded model's greedy tokens differ from the packaged model's")
            print(f"padded: intermediate_size {model.config.intermediate_size}, greedy tokens unchanged", flush=True)
    one, two = verification_cost(model, prompts[0])
    print(f"verification: 2 rows {two * 1e3:.3f} ms vs 1 row {one * 1e3:.3f} ms = {two / one:.2f}x", flush=True)
    report: dict = {"verification_ms": {"one_row": one * 1e3, "two_rows": two * 1e3, "ratio": two / one}}
    runs = {
        "plain": lambda p, st: stream(model, p, args.tokens, stop_token_ids=[]),
        "mtp": lambda p, st: speculative_stream(model, p, args.tokens, stop_token_ids=[], stats=st),
    }
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
