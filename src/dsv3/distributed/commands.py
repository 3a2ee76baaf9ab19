"""`dsv3 plan` (what fits where under TP/EP) and `dsv3 dist-generate` (token ids in, token ids out, any layout).

`add_commands(subparsers)` registers both on the dsv3 CLI. `python -m dsv3.distributed.commands ...`
runs them on their own (what `torchrun -m` needs until the CLI has them).

    dsv3 plan deepseek-v3 --devices 8 --device-memory 141 --context 32768 --batch 16 --dtype fp8
    torchrun --nproc-per-node 4 -m dsv3 dist-generate --model DIR --prompt-ids 0,5,9 --tp 4 --ep 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import DsV3Error, RequestError


# ---------------------------------------------------------------------------------------------- plan
def cmd_plan(args: argparse.Namespace) -> int:
    from .. import accounting
    from ..config import ModelConfig

    cfg = ModelConfig.from_pretrained(args.config)
    plan = accounting.plan_deployment(
        cfg,
        args.devices,
        args.device_memory,
        args.context,
        args.batch,
        dtype=args.dtype,
        tp=args.tp,
        ep=args.ep,
        mtp=args.mtp,
    )
    print(json.dumps(plan, indent=2) if args.json else accounting.format_plan(plan))
    return 0


# ---------------------------------------------------------------------------------------------- dist-generate
def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise RequestError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise RequestError("--prompt-ids is empty")
    return ids


def _dist_generate(args: argparse.Namespace) -> int:
    from ..inference.sampling import SamplingParams
    from .launch import parallel_model_from_args, parallel_stream

    prompts = [_prompt_ids(p) for p in args.prompt_ids]
    model, ctx = parallel_model_from_args(
        args.model, args.tp, args.ep, args.dtype, device=args.device, fp8=args.fp8, ep_combine=args.ep_combine
    )
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    out: list[list[int]] = [[] for _ in prompts]
    steps, t0, prefill_bytes, decode_from = 0, time.perf_counter(), 0, {}
    ctx.stats.reset()
    for step in parallel_stream(model, ctx, prompts, args.max_new_tokens, params, args.seed, args.stop_ids):
        if steps == 0:  # the first tokens come from the prefill; what follows is decoding
            prefill_bytes = ctx.stats.total_bytes
            decode_from = dict(ctx.stats.bytes)
        steps += 1
        for b, t in step.items():
            out[b].append(t)
    elapsed = time.perf_counter() - t0
    if not ctx.is_main:
        return 0
    for o in out:
        print(",".join(map(str, o)))
    if args.comm_stats and ctx.distributed:
        decode_steps = max(steps - 1, 1)
        m = ctx.mesh
        print(f"layout: {m.world_size} ranks, tp={m.tp} ep={m.ep}; {steps} steps in {elapsed:.2f}s", file=sys.stderr)
        print(f"bytes sent by rank 0: prefill {prefill_bytes:,}; per decode step:", file=sys.stderr)
        for kind, n in sorted(ctx.stats.bytes.items()):
            per_step = (n - decode_from.get(kind, 0)) // decode_steps
            print(f"  {kind:<22} {per_step:>12,}", file=sys.stderr)
    return 0


def cmd_dist_generate(args: argparse.Namespace) -> int:
    from .mesh import run_or_exit

    return run_or_exit(lambda: _dist_generate(args), "dsv3 dist-generate")


# ---------------------------------------------------------------------------------------------- parser
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan` and `dist-generate` on the dsv3 CLI's subparsers."""
    s = subparsers.add_parser("plan", help="what fits where: weights, KV cache and activations per device under TP/EP")
    s.add_argument("config", help="preset name, config.json or checkpoint dir")
    s.add_argument("--devices", type=int, required=True)
    s.add_argument("--device-memory", type=float, required=True, metavar="GB", help="memory per device, GiB")
    s.add_argument("--context", type=int, required=True, metavar="T", help="tokens per sequence")
    s.add_argument("--batch", type=int, required=True, metavar="B", help="sequences served at once")
    s.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp8", "int4"], help="weight format (int4: Kimi-K2-Thinking's)"
    )
    s.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks (default: --devices)")
    s.add_argument("--ep", type=int, default=None, help="expert-parallel ranks (default: --devices)")
    s.add_argument("--mtp", action="store_true", help="include the MTP module (speculative decoding)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_plan)

    s = subparsers.add_parser(
        "dist-generate", help="greedy/sampled token ids from token ids, under torchrun with --tp/--ep (or alone)"
    )
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument(
        "--prompt-ids",
        action="append",
        required=True,
        metavar="IDS",
        help="comma-separated token ids; repeat for a batch",
    )
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--tp", type=int, default=None, help="1 or the number of processes (default: the number)")
    s.add_argument("--ep", type=int, default=None, help="1 or the number of processes (default: the number)")
    s.add_argument(
        "--ep-combine",
        choices=["all_to_all", "all_reduce"],
        default=None,
        help="expert combine (default: all_reduce with --tp, all_to_all without)",
    )
    s.add_argument("--dtype", default="bf16", help="bf16 or fp32")
    s.add_argument("--fp8", action="store_true", help="keep FP8 weights in FP8 (shards must align to 128 blocks)")
    s.add_argument("--device", default=None, help="cpu or cuda (default: cuda:LOCAL_RANK when available)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--stop-ids",
        type=lambda t: _prompt_ids(t) if t else [],
        default=None,
        help="comma-separated stop ids (default: the config's EOS; '' for none)",
    )
    s.add_argument("--comm-stats", action="store_true", help="print bytes sent per decode step (stderr)")
    s.set_defaults(fn=cmd_dist_generate)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point with the CLI's error convention (one line on stderr, exit 2)."""
    parser = argparse.ArgumentParser(prog="dsv3")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (DsV3Error, FileNotFoundError, PermissionError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
