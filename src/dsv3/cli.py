"""`dsv3 ...` / `python -m dsv3 ...`: argparse subcommands mapped to functions.

A user mistake (DsV3Error, a missing file) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from .errors import DsV3Error, RequestError


def _torch_dtype(name: str):
    import torch

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise RequestError(f"--dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


# ---------------------------------------------------------------------------------------------- params
def cmd_params(args: argparse.Namespace) -> int:
    from . import accounting
    from .config import ModelConfig

    cfg = ModelConfig.from_pretrained(args.config)
    if args.json:
        print(json.dumps(accounting.summary_dict(cfg, mtp=args.mtp), indent=2))
        return 0
    print(accounting.format_param_table(cfg, mtp=args.mtp))
    print()
    print(accounting.format_summary(cfg, mtp=args.mtp))
    return 0


# ---------------------------------------------------------------------------------------------- init
def cmd_init(args: argparse.Namespace) -> int:
    import torch

    from .config import ModelConfig
    from .model.transformer import DeepSeekV3

    cfg = ModelConfig.from_pretrained(args.config)
    if os.path.exists(args.out) and not args.force and os.listdir(args.out):
        raise DsV3Error(f"{args.out} exists and is not empty (use --force to replace it)")
    torch.manual_seed(args.seed)
    model = DeepSeekV3(cfg.replace(quantization_config=None), dtype=_torch_dtype(args.dtype))
    if args.random_bias:
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(args.out, fp8=args.fp8)
    n = model.num_parameters(include_mtp=True)
    print(f"wrote {args.out}: {n:,} parameters{' (fp8)' if args.fp8 else ''}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on a built-in default: account for the seed, then build/save/load/generate `small`."""
    import torch

    from . import accounting
    from .config import ModelConfig
    from .inference.generate import generate
    from .model.transformer import DeepSeekV3

    seed_cfg = ModelConfig.from_pretrained("deepseek-v3")
    print(accounting.format_param_table(seed_cfg))
    print()
    print(accounting.format_summary(seed_cfg))
    print()
    cfg = ModelConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = DeepSeekV3(cfg, dtype=torch.bfloat16)
    print(f"built {args.config!r}: {model.num_parameters():,} parameters in {time.perf_counter() - t0:.1f}s")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        t0 = time.perf_counter()
        model.save_pretrained(ckpt)
        shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        print(f"saved the official layout ({len(shards)} shard(s) + index) in {time.perf_counter() - t0:.1f}s")
        t0 = time.perf_counter()
        loaded = DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16)
        print(f"loaded it back in {time.perf_counter() - t0:.1f}s")
    prompts = [[0, 100, 200, 300, 400, 500, 600, 700], [0, 42, 43]]
    generate(loaded, prompts, max_new_tokens=2)  # warm-up
    t0 = time.perf_counter()
    out = generate(loaded, prompts, max_new_tokens=args.tokens, stop_token_ids=[])
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in out)
    for p, o in zip(prompts, out):
        print(f"prompt {p} -> {o}")
    print(f"generated {n} tokens for {len(prompts)} prompts in {dt:.2f}s ({n / dt:.1f} tokens/s, greedy, bf16)")
    return 0


# ---------------------------------------------------------------------------------------------- text generation
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _load_for_text(args: argparse.Namespace):
    """(model, parallel context or None, tokenizer); under torchrun each rank loads its own shard."""
    import torch

    from .model.transformer import DeepSeekV3
    from .tokenizer import Tokenizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    if _world_size() > 1:
        from .distributed.launch import parallel_model_from_args

        model, ctx = parallel_model_from_args(args.model, args.tp, args.ep, _torch_dtype(args.dtype), fp8=args.fp8)
    else:
        model = DeepSeekV3.from_pretrained(
            args.model, dtype=_torch_dtype(args.dtype), fp8=args.fp8, compile=args.compile, quantize=args.quantize
        )
        ctx = None
    return model, ctx, Tokenizer.from_dir(args.model)


def _run_text_command(args: argparse.Namespace, lead_fn, prog: str) -> int:
    """Load, then run `lead_fn(model, ctx, tok)`; under torchrun rank 0 leads and the other ranks follow."""

    def run() -> int:
        model, ctx, tok = _load_for_text(args)
        if ctx is None or not ctx.distributed:
            return lead_fn(model, ctx, tok)
        from .distributed.launch import lead_or_follow

        return lead_or_follow(model, ctx, lambda: lead_fn(model, ctx, tok))

    if _world_size() > 1:
        from .distributed.mesh import run_or_exit

        return run_or_exit(run, prog)
    return run()


def stream_text(model, tok, prompt_ids: list[int], args: argparse.Namespace, ctx=None):
    """Yield printable text pieces for one prompt, honouring stop strings; returns (n_tokens, seconds)."""
    from .errors import RequestError
    from .inference.generate import stream
    from .inference.sampling import SamplingParams
    from .tokenizer import StopStringMatcher, StreamDecoder

    vocab = model.config.vocab_size
    bad = [t for t in prompt_ids if t >= vocab]
    if bad:
        raise RequestError(
            f"the prompt encodes to token id {bad[0]}, outside this model's vocabulary of {vocab} "
            "(a test checkpoint smaller than the tokenizer?)"
        )
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    limit = min(vocab, tok.vocab_size)  # never sample the padded ids the tokenizer cannot decode
    if ctx is not None and ctx.distributed:
        if args.speculative:
            raise RequestError("--speculative is not supported under torchrun yet")
        from .distributed.launch import parallel_stream

        steps = parallel_stream(model, ctx, [prompt_ids], args.max_new_tokens, params, args.seed, vocab_limit=limit)
        tokens = (step[0] for step in steps if 0 in step)
    elif args.speculative == "mtp":
        from .inference.speculative import speculative_stream

        steps = speculative_stream(model, [prompt_ids], args.max_new_tokens, params, args.seed, vocab_limit=limit)
        tokens = (t for step in steps for t in step.get(0, []))
    else:
        steps = stream(model, [prompt_ids], args.max_new_tokens, params, args.seed, vocab_limit=limit)
        tokens = (step[0] for step in steps if 0 in step)
    decoder, stops = StreamDecoder(tok, skip_special_tokens=True), StopStringMatcher(args.stop or [])
    for t in tokens:
        text, stopped = stops.push(decoder.push(t))
        if text:
            yield text
        if stopped:
            return
    text, _ = stops.push(decoder.flush())
    yield text + stops.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    return _run_text_command(args, lambda model, ctx, tok: _generate_lead(model, ctx, tok, args), "dsv3 generate")


def _generate_lead(model, ctx, tok, args: argparse.Namespace) -> int:
    ids = tok.encode(args.prompt, add_bos=True)
    t0 = time.perf_counter()
    for piece in stream_text(model, tok, ids, args, ctx):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(f"[{time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat with the chat template; history kept; /reset clears it, /exit or EOF quits."""
    return _run_text_command(args, lambda model, ctx, tok: _chat_lead(model, ctx, tok, args), "dsv3 chat")


def _chat_lead(model, ctx, tok, args: argparse.Namespace) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tok.encode_chat(messages)
        if interactive:
            sys.stdout.write("assistant> ")
        reply = []
        for piece in stream_text(model, tok, ids, args, ctx):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def add_compile_arg(s: argparse.ArgumentParser) -> None:
    """--compile / --no-compile and --quantize: the InferenceOptions a command's model is prepared with."""
    s.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="int8: weight-only int8 with per-channel scales at load (all projections and lm_head; "
        "1-3%% logit error on the test configs, docs/benchmarks.md)",
    )
    s.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="decode through the compiled static-shape step (torch.compile, once per process and batch bucket: "
        "seconds to minutes); default --no-compile, eager (docs/benchmarks.md says why)",
    )


def _add_sampling_args(s: argparse.ArgumentParser, max_new: int) -> None:
    s.add_argument("--model", required=True, help="checkpoint directory (official layout)")
    s.add_argument("--max-new-tokens", type=int, default=max_new)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--speculative", choices=["mtp"], default=None, help="MTP self-speculative decoding")
    s.add_argument("--dtype", default="bf16", help="bf16 or fp32")
    s.add_argument("--fp8", action="store_true", help="keep FP8 checkpoint weights in FP8 in memory")
    add_compile_arg(s)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--tp", type=int, default=None, help="under torchrun: tensor-parallel size (1 or N; default N)")
    s.add_argument("--ep", type=int, default=None, help="under torchrun: expert-parallel size (1 or N; default N)")
    s.add_argument("--verbose", action="store_true")


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("params", help="the seed's parameter table, activated params, bytes, KV per token")
    s.add_argument("config", nargs="?", default="deepseek-v3", help="preset name, config.json or checkpoint dir")
    s.add_argument("--mtp", action="store_true", help="include the MTP module")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_params)

    s = sub.add_parser("init", help="write a random-weight checkpoint in the official layout")
    s.add_argument("config")
    s.add_argument("out")
    s.add_argument("--fp8", action="store_true", help="store the projections in FP8 with 128x128 block scales")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="bf16", help="bf16 or fp32 for the high-precision tensors")
    s.add_argument("--random-bias", action="store_true", help="random e_score_correction_bias (routing tests)")
    s.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("demo", help="account for the seed, then build, save, load and run the small preset")
    s.add_argument("--config", default="small")
    s.add_argument("--tokens", type=int, default=16)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("generate", help="complete a prompt, streamed to stdout")
    s.add_argument("--prompt", required=True)
    _add_sampling_args(s, max_new=64)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("chat", help="interactive chat with the DeepSeek-V3 chat template")
    s.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(s, max_new=512)
    s.set_defaults(fn=cmd_chat)

    # Subcommands that live with their own code (heavy imports stay inside their functions).
    from . import bench
    from .checkpoint import convert
    from .distributed.commands import add_commands as add_distributed_commands
    from .server.commands import add_commands as add_serve_commands
    from .training.commands import add_commands as add_training_commands

    bench.add_commands(sub)
    convert.add_commands(sub)
    add_serve_commands(sub)
    add_training_commands(sub)
    add_distributed_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except DsV3Error as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave: missing, unwritable, a directory
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
