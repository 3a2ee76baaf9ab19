#!/usr/bin/env python
"""Bounded load test of the OpenAI-compatible server: throughput and p50/p99 latency at 1, 4 and 16 clients.

By default it starts `dsv3 serve` itself on a free loopback port (a random-weight model: `--random`,
default `small`), or it talks to `--url` (loopback addresses only). Each concurrency level sends at most
`--requests` streamed /v1/completions requests (greedy, `--max-tokens` each) and stops early after
`--duration` seconds; both are capped, so a run can never hammer a machine for long.

    python scripts/load_test.py --random small --max-tokens 16 --requests 16
    python scripts/load_test.py --random tiny --vocab-size 129280 --dtype fp32 --requests 32
    python scripts/load_test.py --url http://127.0.0.1:8000 --model-name NAME --api-key KEY

Reports per level: requests done, generated tokens/s (all clients together), requests/s, and p50/p99
of the full request latency and of the time to first token.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import httpx

MAX_REQUESTS = 256  # per level, whatever the command line says
MAX_DURATION_S = 600.0  # per level
PROMPTS = [
    "The history of the printing press begins",
    "In a small village by the sea there lived",
    "Explain how a latent attention cache saves memory:",
    "def fibonacci(n):",
    "Les montagnes au loin étaient couvertes de",
    "Write a short poem about continuous batching.",
    "The quarterly report shows that revenue",
    "Once upon a time, in a data center far away,",
]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def token_prompts(n: int, count: int = 64) -> list[list[int]]:
    """`count` prompts of `n` token ids that differ from their first token on (no cached prefix to reuse)."""
    return [[1000 + (7 * i + 13 * j) % 20000 for j in range(n)] for i in range(count)]


def one_request(http: httpx.Client, model: str, prompt: str | list[int], max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed greedy completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, tokens = None, 0
    with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    return latency, first if first is not None else latency, tokens


def run_level(
    url: str,
    model: str,
    api_key: str | None,
    clients: int,
    requests: int,
    duration: float,
    max_tokens: int,
    prompts: list = PROMPTS,
) -> dict:
    """`requests` requests from `clients` threads, none started after `duration` seconds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = httpx.Client(base_url=url, headers=headers, timeout=600, limits=httpx.Limits(max_connections=clients + 4))
    lock = threading.Lock()
    next_id, results, errors = [0], [], []
    deadline = time.perf_counter() + duration

    def worker() -> None:
        while True:
            with lock:
                i = next_id[0]
                if i >= requests or time.perf_counter() > deadline:
                    return
                next_id[0] += 1
            try:
                res = one_request(http, model, prompts[i % len(prompts)], max_tokens)
                with lock:
                    results.append(res)
            except Exception as e:  # counted and reported, the run goes on
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    http.close()
    lat = [r[0] for r in results] or [float("nan")]
    ttft = [r[1] for r in results] or [float("nan")]
    tokens = sum(r[2] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "p50_s": statistics.median(lat),
        "p99_s": percentile(lat, 99),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": percentile(ttft, 99),
        "first_error": errors[0] if errors else None,
    }


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, str]:
    """`dsv3 serve` on 127.0.0.1:<free port>; returns (process, base URL, model name)."""
    cmd = [
        sys.executable,
        "-m",
        "dsv3.server.commands",
        "serve",
        "--random",
        args.random,
        "--port",
        "0",
        "--dtype",
        args.dtype,
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(4 * MAX_REQUESTS),
        "--max-len",
        str(args.max_len),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"load_test: the server exited with code {proc.wait()}")
        print(line.rstrip(), file=sys.stderr)
        if " at http://" in line:
            url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
            name = line.split("serving ", 1)[1].split(" at ", 1)[0].strip("'")
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, url, name
    proc.kill()
    raise SystemExit("load_test: the server did not start within 600 s")


def write_config(name: str, vocab_size: int) -> str:
    """A temporary config.json: preset/config `name` with another vocab_size."""
    import tempfile

    from dsv3.config import ModelConfig

    cfg = ModelConfig.from_pretrained(name).replace(vocab_size=vocab_size)
    out = os.path.join(tempfile.mkdtemp(prefix="dsv3-load-"), "config.json")
    with open(out, "w") as f:
        json.dump(cfg.to_dict(), f)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (loopback only); default: start one")
    p.add_argument("--model-name", help="model id to request (with --url)")
    p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"))
    p.add_argument("--random", default="small", help="preset or config.json of the server this script starts")
    p.add_argument(
        "--vocab-size",
        type=int,
        help="override the --random config's vocab_size (e.g. tiny at 129280, so the real tokenizer's ids fit)",
    )
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=16, help=f"requests per level (at most {MAX_REQUESTS})")
    p.add_argument("--duration", type=float, default=120.0, help=f"seconds per level (at most {MAX_DURATION_S:.0f})")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=0,
        help="send prompts of this many token ids (each different from its first token: no prefix reuse) instead "
        "of the short texts; with --max-tokens 1 and --concurrency 1 the TTFT columns are the server's time to "
        "first token for that prompt length (raise --max-len above it)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per level instead of a table")
    args = p.parse_args(argv)
    requests = max(1, min(args.requests, MAX_REQUESTS))
    duration = max(1.0, min(args.duration, MAX_DURATION_S))
    levels = [int(c) for c in args.concurrency.split(",")]
    if any(not 1 <= c <= 64 for c in levels):
        p.error("--concurrency levels must be in [1, 64]")

    proc, tmp_config = None, None
    if args.url:
        host = urllib.parse.urlparse(args.url).hostname or ""
        if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            p.error("--url must be a loopback address (127.0.0.1, ::1, localhost)")
        url, model = args.url.rstrip("/").removesuffix("/v1"), args.model_name
        if model is None:
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            model = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
    else:
        if args.vocab_size is not None:
            args.random = tmp_config = write_config(args.random, args.vocab_size)
        proc, url, model = start_server(args)
    try:
        one_request(
            httpx.Client(
                base_url=url, timeout=600, headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            ),
            model,
            PROMPTS[0],
            2,
        )  # warm-up, not measured
        if not args.json:
            print(
                f"{'clients':>7} {'requests':>8} {'errors':>6} {'tokens/s':>9} {'req/s':>7} {'p50 s':>7} "
                f"{'p99 s':>7} {'TTFT p50':>9} {'TTFT p99':>9}"
            )
        for clients in levels:
            prompts = token_prompts(args.prompt_tokens) if args.prompt_tokens > 0 else PROMPTS
            r = run_level(url, model, args.api_key, clients, requests, duration, args.max_tokens, prompts)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                print(
                    f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['tokens_per_s']:>9.1f} "
                    f"{r['requests_per_s']:>7.2f} {r['p50_s']:>7.2f} {r['p99_s']:>7.2f} {r['ttft_p50_s']:>9.2f} "
                    f"{r['ttft_p99_s']:>9.2f}",
                    flush=True,
                )
            if r["first_error"]:
                print(f"  first error: {r['first_error']}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # graceful: the server drains and exits 0
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if tmp_config is not None:
            shutil.rmtree(os.path.dirname(tmp_config), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
