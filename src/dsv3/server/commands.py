"""`dsv3 serve`: the OpenAI-compatible server on a checkpoint, by default the shipped `stdlib-mini` model.

Without `--model` the server loads the small model trained on the Python standard library that ships
with the package (`dsv3.pretrained`). `--model random:CONFIG` (or `--random CONFIG`) builds a preset
with random weights in memory instead: every endpoint works, but the text it writes is random. fastapi and uvicorn are imported only when
the command runs (the `serve` extra), so the rest of the CLI works without them.

Under `torchrun --nproc-per-node N -m dsv3 serve --model DIR --tp T --ep E`, rank 0 listens and runs
the engine; every prefill and decode step is replayed on the other ranks' shards
(`dsv3.distributed.serving`), so continuous batching works as in one process and the tokens at
temperature 0 are one process's. Ctrl-C (or SIGTERM to torchrun) stops rank 0's server, which then
releases the other ranks.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import signal
import socket
import sys
import threading

from ..errors import ConfigError, DsV3Error

_LOOPBACK_NAMES = ("localhost",)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `serve` on the CLI's subparsers."""
    s = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve /v1/models, /v1/completions and /v1/chat/completions (OpenAI format, streaming), "
        "/health and /metrics. Without --model, the stdlib-mini model shipped with dsv3; with "
        "--model random:CONFIG or --random CONFIG, a random-weight model built in memory (it works end to end "
        "but writes random text).",
    )
    s.add_argument(
        "--model",
        metavar="DIR",
        help="checkpoint directory (config.json, safetensors, tokenizer), or random:CONFIG "
        "(default: the shipped stdlib-mini model)",
    )
    s.add_argument(
        "--random",
        metavar="CONFIG",
        default=None,
        help="serve a random-weight model of this preset or config.json (same as --model random:CONFIG)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the random weights (random models)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("DSV3_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $DSV3_API_KEY, else none)",
    )
    s.add_argument(
        "--model-name",
        metavar="NAME",
        help="the model id clients send (default: the checkpoint's directory name, or dsv3-PRESET-random)",
    )
    s.add_argument("--dtype", default="bf16", help="bf16 or fp32")
    from ..model.options import add_inference_arguments  # the flags are spelled the same for every command

    add_inference_arguments(s)
    s.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot; more get 429")
    s.add_argument(
        "--max-len",
        type=int,
        default=4096,
        help="tokens per sequence, prompt + completion (capped by the model's context)",
    )
    s.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens a request may ask for (default: what the context leaves after the prompt)",
    )
    s.add_argument(
        "--default-max-tokens",
        type=int,
        default=None,
        help="chat's max_tokens when a request sends none (default: the rest of the context, up to the limit)",
    )
    s.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="prefill at most this many prompt tokens per engine step, between the running requests' decode "
        "steps (0: whole prompts at once; default 512)",
    )
    s.add_argument(
        "--no-prefix-reuse",
        action="store_true",
        help="do not keep finished sequences' caches for prompts that start with the same tokens",
    )
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 above)")
    s.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="encode special-token text in chat messages as control tokens (trusted clients only: it lets a "
        "message forge turns); by default it is plain text",
    )
    s.add_argument(
        "--max-connections", type=int, default=512, help="open connections; past it requests get 503 (default 512)"
    )
    s.add_argument(
        "--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive (default 10)"
    )
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request's body (408; default 30)")
    s.add_argument("--keep-alive", type=float, default=5.0, help="idle keep-alive connections close after (default 5)")
    s.add_argument(
        "--malloc-arena-max",
        type=int,
        default=2,
        help="cap glibc's malloc arenas (fewer arenas: less memory kept after bursts; 0: glibc's default)",
    )
    s.add_argument(
        "--idle-trim",
        type=float,
        default=10.0,
        help="after this many idle seconds, return free heap memory to the OS (0: never; default 10)",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--tp", type=int, default=None, help="under torchrun: tensor-parallel size (1 or N; default N)")
    s.add_argument("--ep", type=int, default=None, help="under torchrun: expert-parallel size (1 or N; default N)")
    s.set_defaults(fn=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, bind the socket, serve until interrupted; user mistakes raise DsV3Error."""
    from ..distributed.mesh import launched_world_size

    if launched_world_size() > 1:
        from ..distributed.mesh import run_or_exit

        return run_or_exit(lambda: _serve(args), "dsv3 serve")
    return _serve(args)


def _serve(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_len", "max_tokens_limit", "default_max_tokens", "max_body_bytes", "max_connections"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DsV3Error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("header_timeout", "body_timeout", "keep_alive"):
        value = getattr(args, name)
        if not 0 < value < float("inf"):
            raise DsV3Error(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
    if args.prefill_chunk < 0:
        raise DsV3Error(f"--prefill-chunk must be at least 0, got {args.prefill_chunk}")
    if args.max_queue < 0:
        raise DsV3Error(f"--max-queue must be at least 0, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise DsV3Error(f"--port must be in [0, 65535], got {args.port}")
    if args.malloc_arena_max < 0 or not 0 <= args.idle_trim < float("inf"):
        raise DsV3Error("--malloc-arena-max and --idle-trim must be >= 0")
    if args.api_key == "":
        raise DsV3Error("--api-key must not be empty")
    try:
        import uvicorn

        from .app import ServerLimits, create_app
        from .http import uvicorn_config
    except ImportError as e:
        raise DsV3Error(
            f"dsv3 serve needs fastapi and uvicorn ({e.name} is missing): pip install 'dsv3[serve]'"
        ) from None
    from .memory import IdleTrimmer, limit_arenas

    if args.malloc_arena_max:
        limit_arenas(args.malloc_arena_max)  # before the engine, tokenizer and threadpool threads start
    import torch

    from ..config import ModelConfig
    from ..inference.engine import Engine, ModelRunner
    from ..model.options import InferenceOptions
    from ..model.transformer import DeepSeekV3
    from ..pretrained import resolve_model
    from ..tokenizer import Tokenizer

    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
    if args.dtype not in table:
        raise DsV3Error(f"--dtype must be bf16 or fp32, got {args.dtype!r}")
    from ..distributed.mesh import launched_world_size

    parallel = launched_world_size() > 1
    if args.random is not None and args.model is not None:
        raise DsV3Error("give --model or --random, not both")
    choice = resolve_model(f"random:{args.random}" if args.random is not None else args.model)
    if parallel and choice.is_random:
        # A ConfigError: every rank hits it, and run_or_exit lets rank 0 alone say it.
        raise ConfigError(
            "under torchrun, dsv3 serve needs a checkpoint --model (each rank loads its part of a checkpoint)"
        )
    # Bind before loading the model: a busy port is reported in a second, not after minutes of loading.
    # Under torchrun rank 0 alone listens (RANK is set before the process group is joined).
    sock = _listen(args.host, args.port) if os.environ.get("RANK", "0") == "0" else None
    runner, ctx = ModelRunner, None
    try:
        if parallel:
            from ..distributed.launch import parallel_model_from_args
            from ..distributed.serving import ReplicatedRunner, follow_engine

            model, ctx = parallel_model_from_args(choice.checkpoint, args.tp, args.ep, table[args.dtype])
            if not ctx.is_main:
                follow_engine(model.eval(), ctx)  # until rank 0 releases the group
                return 0
            runner = functools.partial(ReplicatedRunner, ctx=ctx)
            tokenizer = Tokenizer.from_dir(choice.checkpoint)
        elif not choice.is_random:
            model = DeepSeekV3.from_pretrained(choice.checkpoint, dtype=table[args.dtype])
            tokenizer = Tokenizer.from_dir(choice.checkpoint)
        else:
            cfg = ModelConfig.from_pretrained(choice.random_config)
            torch.manual_seed(args.seed)
            model = DeepSeekV3(cfg, dtype=table[args.dtype])
            tokenizer = Tokenizer.from_dir(None)
            _note(f"serving a random-weight {choice.random_config!r} model: it writes random text")
        name = args.model_name or choice.name
        model.eval().prepare_for_inference(InferenceOptions(compile=args.compile, quantize=args.quantize))
        cfg = model.config
        if cfg.vocab_size < tokenizer.vocab_size:
            _note(
                f"the model has {cfg.vocab_size} token ids but the tokenizer {tokenizer.vocab_size}: "
                "prompts using the ids above are refused"
            )
        engine = Engine(
            model,
            max_batch=args.max_batch,
            max_len=min(args.max_len, cfg.max_position_embeddings),
            max_queue=args.max_queue,
            valid_ids=tokenizer.valid_ids_mask(cfg.vocab_size),
            runner=runner,
            prefill_chunk=args.prefill_chunk or None,
            prefix_reuse=not args.no_prefix_reuse,
        )
        # Index the tokenizer for structured outputs now, not on the first request that asks for one.
        threading.Thread(target=_prepare_grammars, args=(tokenizer,), daemon=True).start()
        try:
            limits = ServerLimits(
                max_body_bytes=args.max_body_bytes,
                max_tokens=args.max_tokens_limit,
                default_max_tokens=args.default_max_tokens,
                header_timeout_s=args.header_timeout,
                body_timeout_s=args.body_timeout,
                keep_alive_s=args.keep_alive,
                max_connections=args.max_connections,
            )
            app = create_app(
                engine,
                tokenizer,
                name,
                api_key=args.api_key,
                limits=limits,
                allow_special_tokens_in_content=args.allow_special_tokens_in_content,
            )
            host, port = sock.getsockname()[:2]
            if not _is_loopback(args.host) and args.api_key is None:
                _note(f"listening on {args.host} without --api-key: anyone who can reach it can use it")
            _note(f"serving {name!r} at http://{_url_host(host)}:{port}/v1 (Ctrl-C to stop)")
            server = uvicorn.Server(uvicorn_config(app, limits, log_level=args.log_level, timeout_graceful_shutdown=5))
            if parallel:
                # A failed collective stops the server; release() below then raises it for run_or_exit.
                engine.runner.on_failure(lambda e: setattr(server, "should_exit", True))
                # uvicorn re-raises the signal it shut down on: SIGTERM must not kill this rank before
                # it releases the others, so it is taken like Ctrl-C.
                signal.signal(signal.SIGTERM, signal.default_int_handler)
            trimmer = None
            if args.idle_trim:
                stats = engine.stats
                trimmer = IdleTrimmer(
                    busy=lambda: (s := stats()).requests_active + s.requests_queued > 0,
                    served=lambda: sum(stats().requests_finished.values()),
                    idle_s=args.idle_trim,
                ).start()
            try:
                server.run(sockets=[sock])
            except KeyboardInterrupt:
                pass  # uvicorn re-raises the Ctrl-C it shut down on; stopping the server that way is no error
            finally:
                if trimmer is not None:
                    trimmer.close()
        finally:
            engine.close()
        if parallel:
            engine.runner.release()  # the other ranks leave follow_engine (or the failure is raised here)
    finally:
        if sock is not None:
            sock.close()
    return 0


def _prepare_grammars(tokenizer: object) -> None:
    try:
        from .structured import prepare

        prepare(tokenizer)
    except ImportError:
        pass  # without llguidance, structured-output requests are refused with a 400 saying so


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise DsV3Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise DsV3Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _note(message: str) -> None:
    print(f"dsv3 serve: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.server.commands serve ...`: this command alone, with the CLI's error handling."""
    parser = argparse.ArgumentParser(prog="dsv3")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except DsV3Error as e:
        print(f"dsv3 serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
