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
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(args.out, fp8=args.fp8)
    n = model.num_parameters(include_mtp=True)
    print(f"wrote {args.out}: {n:,} parameters{' (fp8)' if args.fp8 else ''}")
    return 0


# ---------------------------------------------------------------------------------------------- demo
DEMO_PROMPTS = ("def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    ")


def _complete(model, prompts: list[list[int]], max_new_tokens: int, vocab_limit: int, args) -> list[list[int]]:
    from .inference.generate import generate

    return generate(
        model, prompts, max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        vocab_limit=vocab_limit,
    )  # fmt: skip


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on a built-in default: account for the seed, then load/save/load/generate the shipped model."""
    import torch

    from . import accounting
    from .config import ModelConfig
    from .model.transformer import DeepSeekV3
    from .pretrained import resolve_model
    from .tokenizer import Tokenizer

    # One thread by default: the shipped model's matrices are 128 wide, and on busy cores a second
    # OpenMP thread made decoding several times slower, never faster (docs/training.md).
    torch.set_num_threads(args.threads)
    seed_cfg = ModelConfig.from_pretrained("deepseek-v3")
    print(accounting.format_param_table(seed_cfg))
    print()
    print(accounting.format_summary(seed_cfg))
    print()
    choice = resolve_model(f"random:{args.config}" if args.config else args.model)
    t0 = time.perf_counter()
    if choice.is_random:
        torch.manual_seed(0)
        model = DeepSeekV3(ModelConfig.from_pretrained(choice.random_config), dtype=torch.bfloat16)
        tok = Tokenizer.from_dir(None)
        print(
            f"built {choice.random_config!r} with random weights: {model.num_parameters():,} parameters in "
            f"{time.perf_counter() - t0:.1f}s (its text is random)"
        )
    else:
        model = DeepSeekV3.from_pretrained(choice.checkpoint, dtype=torch.bfloat16)
        tok = Tokenizer.from_dir(choice.checkpoint)
        fp8 = " (FP8 projections on disk)" if model.config.quantization_config else ""
        print(
            f"loaded {choice.name!r}{fp8}: {model.num_parameters(include_mtp=True):,} parameters in "
            f"{time.perf_counter() - t0:.1f}s"
        )
    probe = torch.tensor([tok.encode(DEMO_PROMPTS[0], add_bos=True)])
    probe = probe.clamp(max=model.config.vocab_size - 1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        t0 = time.perf_counter()
        model.save_pretrained(ckpt)
        shards = sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))
        print(
            f"saved it in the official layout, bf16 ({len(shards)} shard(s) + index) in {time.perf_counter() - t0:.1f}s"
        )
        t0 = time.perf_counter()
        loaded = DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16)
        dt = time.perf_counter() - t0
        with torch.no_grad():
            same = torch.equal(model(probe), loaded(probe))
        print(f"loaded it back in {dt:.1f}s: logits {'identical' if same else 'DIFFERENT'}")
    limit = min(loaded.config.vocab_size, tok.vocab_size)
    prompts = [tok.encode(p, add_bos=True) for p in DEMO_PROMPTS]
    if any(max(p) >= loaded.config.vocab_size for p in prompts):
        raise RequestError(f"the demo prompts do not fit the vocabulary of {loaded.config.vocab_size} ids")
    _complete(loaded, prompts, 2, limit, args)  # warm-up
    t0 = time.perf_counter()
    out = _complete(loaded, prompts, args.tokens, limit, args)
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in out)
    for text, o in zip(DEMO_PROMPTS, out):
        print(f"--- continuation of {text!r}:")
        print(text + tok.decode(o, skip_special_tokens=True))
    how = f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}" if args.temperature else "greedy"
    print(f"--- generated {n} tokens for {len(prompts)} prompts in {dt:.2f}s ({n / dt:.1f} tokens/s, {how}, bf16)")
    return 0 if same else 1


# ---------------------------------------------------------------------------------------------- text generation


def _load_for_text(args: argparse.Namespace):
    """(model, parallel context or None, tokenizer); under torchrun each rank loads its own shard."""
    import torch

    from .config import ModelConfig
    from .distributed.mesh import launched_world_size
    from .model.transformer import DeepSeekV3
    from .pretrained import resolve_model
    from .tokenizer import Tokenizer

    torch.set_num_threads(args.threads or torch.get_num_threads())
    choice = resolve_model(args.model)
    if choice.is_random:
        if launched_world_size() > 1:
            raise RequestError("under torchrun, --model must be a checkpoint directory (each rank loads its part)")
        torch.manual_seed(0 if args.seed is None else args.seed)
        cfg = ModelConfig.from_pretrained(choice.random_config)
        print(f"dsv3: a random-weight {choice.random_config!r} model: it writes random text", file=sys.stderr)
        return DeepSeekV3(cfg, dtype=_torch_dtype(args.dtype)), None, Tokenizer.from_dir(None)
    if launched_world_size() > 1:
        from .distributed.launch import parallel_model_from_args

        model, ctx = parallel_model_from_args(
            choice.checkpoint, args.tp, args.ep, _torch_dtype(args.dtype), fp8=args.fp8
        )
    else:
        model = DeepSeekV3.from_pretrained(
            choice.checkpoint,
            dtype=_torch_dtype(args.dtype),
            fp8=args.fp8,
            compile=args.compile,
            quantize=args.quantize,
        )
        ctx = None
    return model, ctx, Tokenizer.from_dir(choice.checkpoint)


def _run_text_command(args: argparse.Namespace, lead_fn, prog: str) -> int:
    """Load, then run `lead_fn(model, ctx, tok)`; under torchrun rank 0 leads and the other ranks follow."""

    def run() -> int:
        model, ctx, tok = _load_for_text(args)
        if ctx is None or not ctx.distributed:
            return lead_fn(model, ctx, tok)
        from .distributed.launch import lead_or_follow

        return lead_or_follow(model, ctx, lambda: lead_fn(model, ctx, tok))

    from .distributed.mesh import launched_world_size

    if launched_world_size() > 1:
        from .distributed.mesh import run_or_exit

        return run_or_exit(run, prog)
    return run()


def stream_text(
    model, tok, prompt_ids: list[int], args: argparse.Namespace, ctx=None, max_new_tokens: int | None = None
):
    """Yield printable text pieces for one prompt (at most `max_new_tokens`, default --max-new-tokens tokens),
    honouring stop strings."""
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
    n_new = args.max_new_tokens if max_new_tokens is None else max_new_tokens
    limit = min(vocab, tok.vocab_size)  # never sample the padded ids the tokenizer cannot decode
    if ctx is not None and ctx.distributed:
        if args.speculative:
            raise RequestError("--speculative is not supported under torchrun yet")
        from .distributed.launch import parallel_stream

        steps = parallel_stream(model, ctx, [prompt_ids], n_new, params, args.seed, vocab_limit=limit)
        tokens = (step[0] for step in steps if 0 in step)
    elif args.speculative == "mtp":
        from .inference.speculative import speculative_stream

        steps = speculative_stream(model, [prompt_ids], n_new, params, args.seed, vocab_limit=limit)
        tokens = (t for step in steps for t in step.get(0, []))
    else:
        steps = stream(model, [prompt_ids], n_new, params, args.seed, vocab_limit=limit)
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
    interactive = sys.stdin.isatty()

    def read_line() -> str | None:
        try:
            return input("you> " if interactive else "")
        except EOFError:
            return None

    return chat_loop(model, tok, args, read_line, sys.stdout, sys.stderr, ctx, "assistant> " if interactive else "")


def chat_loop(model, tok, args: argparse.Namespace, read_line, out, err, ctx=None, reply_prefix: str = "") -> int:
    """Chat until `read_line()` returns None or /exit, writing replies to `out` and notes to `err`.

    Each reply may use what the prompt leaves of the model's context (at most --max-new-tokens). When the
    history leaves less than a quarter of the context (or --max-new-tokens, if smaller), the oldest turns
    are dropped, with a note; a turn that fails (a message too long for the context, a token outside the
    vocabulary) is reported and forgotten, and the chat goes on. /reset clears the history.
    """
    context = model.config.max_position_embeddings
    reserve = max(1, min(args.max_new_tokens, context // 4))
    system = [{"role": "system", "content": args.system}] if args.system else []
    turns: list[dict[str, str]] = []  # user, assistant, user, ... (the system prompt is always kept)
    while True:
        line = read_line()
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            turns = []
            continue
        if not line.strip():
            continue
        message = {"role": "user", "content": line}
        need = 2 if args.speculative else 1  # room for one new token (a speculative step looks one further)
        alone = len(tok.encode_chat(system + [message]))
        if alone + need > context:
            err.write(
                f"[turn failed: this message makes a {alone}-token prompt and leaves no room for a reply in the "
                f"{context}-token context; send a shorter one]\n"
            )
            continue
        turns.append(message)
        ids = tok.encode_chat(system + turns)
        dropped = 0
        while len(ids) + reserve > context and len(turns) > 1:
            turns = turns[2:]  # the oldest user message and its reply
            dropped += 1
            ids = tok.encode_chat(system + turns)
        if dropped:
            err.write(f"[dropped the oldest {dropped} exchange(s): the history outgrew the {context}-token context]\n")
        out.write(reply_prefix)
        reply: list[str] = []
        room = context - len(ids) - (need - 1)
        try:
            for piece in stream_text(model, tok, ids, args, ctx, max_new_tokens=min(args.max_new_tokens, room)):
                reply.append(piece)
                out.write(piece)
                out.flush()
        except DsV3Error as e:
            out.write("\n")
            err.write(f"[turn failed: {e}]\n")
            turns.pop()
            continue
        out.write("\n")
        out.flush()
        turns.append({"role": "assistant", "content": "".join(reply)})


def _add_sampling_args(s: argparse.ArgumentParser, max_new: int) -> None:
    from .model.options import add_inference_arguments

    s.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (official layout), or random:CONFIG for random weights of a preset "
        "(default: the shipped stdlib-mini model)",
    )
    s.add_argument("--max-new-tokens", type=int, default=max_new)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--speculative", choices=["mtp"], default=None, help="MTP self-speculative decoding")
    s.add_argument("--dtype", default="bf16", help="bf16 or fp32")
    s.add_argument("--fp8", action="store_true", help="keep FP8 checkpoint weights in FP8 in memory")
    add_inference_arguments(s)
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

    s = sub.add_parser(
        "demo", help="account for the seed, then load, save, reload the shipped model and generate text with it"
    )
    s.add_argument("--model", default=None, help="checkpoint directory or random:CONFIG (default: stdlib-mini)")
    s.add_argument(
        "--config", default=None, help="a preset with random weights instead (same as --model random:CONFIG)"
    )
    s.add_argument("--tokens", type=int, default=120, help="tokens generated per prompt")
    s.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the shipped model is tiny)")
    # Sampled, not greedy: greedy decoding of a model this small soon repeats one byte (a run of spaces).
    s.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same text every run)")
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
    except BrokenPipeError:
        # The reader went away (`dsv3 generate ... | head`): stop quietly. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again. Before OSError, of which it is a subclass.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # a path the user gave: missing, unwritable, a directory
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return 130
