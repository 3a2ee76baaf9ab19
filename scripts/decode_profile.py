"""Where a decode step's time goes: each phase's milliseconds, bytes and GB/s, beside the machine's bound.

    python scripts/decode_profile.py [--checkpoint DIR] [--context 128] [--steps 64] [--batch 1]
                                     [--quantize int8] [--threads 2] [--rounds 3]

Loads the native kernels' profiling build (`DSV3_NATIVE_PROFILE=1`: a clock read around each phase of
`dsv3_decode_step`, the arithmetic unchanged), decodes --steps tokens after a --context-token prompt as
`dsv3 bench`'s decode rows do, and prints per phase: wall milliseconds a step, the weight (and latent cache)
bytes it reads a step, and the rate, then the rate of `bench.measure_bandwidth` (the bound of the bench's
bandwidth row). "other" is the layers' time outside the named phases (norms, rope, residual adds, cache writes);
"outside" the step's time outside the native layers and head (Python, the embedding rows, the call itself).
Medians over --rounds. Run it on a quiet machine: it is a benchmark.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ["DSV3_NATIVE_PROFILE"] = "1"  # before dsv3 loads the kernels

import torch  # noqa: E402

from dsv3 import DeepSeekV3, InferenceOptions  # noqa: E402
from dsv3.bench import measure_bandwidth, ours_decode  # noqa: E402
from dsv3.config import ModelConfig  # noqa: E402
from dsv3.kernels import native  # noqa: E402


def phase_bytes(cfg: ModelConfig, batch: int, context: int, weight_bytes: float) -> dict[str, float]:
    """Bytes one decode step of `batch` rows reads in each phase: the projections' and experts' weights at
    `weight_bytes` each (bf16 2; int8 1 plus a float32 scale a row, counted as 1), the router in float32, the
    attention's absorbed W_UK / W_UV in bf16 (kept in the activations' dtype under int8 too) and each row's
    latent cache in bf16."""
    D, H, R, Dr = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    Dn, Dv, Fm = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.moe_intermediate_size
    moe = cfg.moe_layer_indices
    dense = cfg.num_hidden_layers - len(moe)
    n = cfg.num_hidden_layers
    q_in = (cfg.q_lora_rank or H * (Dn + Dr)) + R + Dr
    return {
        "q_in": n * q_in * D * weight_bytes,
        "q_b": n * (H * (Dn + Dr) * cfg.q_lora_rank * weight_bytes if cfg.q_lora_rank else 0),
        "attend": n * (H * (Dn + Dv) * R * 2 + batch * (context + 1) * (R + Dr) * 2),
        "o_proj": n * D * H * Dv * weight_bytes,
        "routed": len(moe) * (cfg.num_experts_per_tok * 3 * Fm * D * weight_bytes + cfg.n_routed_experts * D * 4),
        "shared": len(moe) * cfg.n_shared_experts * 3 * Fm * D * weight_bytes,
        "dense": dense * 3 * cfg.intermediate_size * D * weight_bytes,
        "head": cfg.vocab_size * D * weight_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(Path.home() / ".cache" / "dsv3" / "bench-small"))
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--quantize", choices=("int8",), default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.profile() is None:
        sys.exit("decode_profile: the native kernels' profiling build is not available here")
    model = DeepSeekV3.from_pretrained(args.checkpoint, dtype=torch.bfloat16)
    if args.quantize:
        model.prepare_for_inference(InferenceOptions(quantize=args.quantize))
    ours_decode(model, args.batch, args.context, 4)  # plans the native stack

    names = ("q_in", "q_b", "attend", "o_proj", "routed", "shared", "dense", "other", "head", "outside")
    per_round: dict[str, list[float]] = {name: [] for name in (*names, "step")}
    for _ in range(args.rounds):
        native.reset_profile()
        tokens_per_s = ours_decode(model, args.batch, args.context, args.steps)
        totals = native.profile()
        steps = totals["steps"]
        step = args.batch / tokens_per_s
        inside = sum(totals[name] for name in names[:7])
        for name in names:
            if name == "other":
                seconds = totals["layers"] - inside
            elif name == "outside":
                seconds = step * steps - totals["layers"] - totals["head"]
            else:
                seconds = totals[name]
            per_round[name].append(seconds / steps * 1e3)
        per_round["step"].append(step * 1e3)
    ms = {name: statistics.median(values) for name, values in per_round.items()}
    nbytes = phase_bytes(model.config, args.batch, args.context, 1.0 if args.quantize else 2.0)
    bound = measure_bandwidth() / 1e9

    print(f"decode batch {args.batch} after {args.context} tokens, {args.threads} threads, "
          f"{args.quantize or 'bf16'} weights, medians of {args.rounds} x {args.steps} steps")  # fmt: skip
    print(f"{'phase':8s} {'ms/step':>8s} {'share':>6s} {'MB/step':>8s} {'GB/s':>6s}")
    for name in names:
        mb = nbytes.get(name, 0.0) / 1e6
        rate = f"{mb / ms[name]:6.1f}" if mb and ms[name] > 0 else f"{'-':>6s}"
        print(f"{name:8s} {ms[name]:8.3f} {ms[name] / ms['step']:6.1%} {mb:8.1f} {rate}")
    total_mb = sum(nbytes.values()) / 1e6
    print(f"{'step':8s} {ms['step']:8.3f} {1:6.1%} {total_mb:8.1f} {total_mb / ms['step']:6.1f}")
    print(f"bound (bench.measure_bandwidth): {bound:.1f} GB/s; the step at {total_mb / ms['step'] / bound:.0%} of it")


if __name__ == "__main__":
    main()
