"""Soak test: minutes of mixed traffic against a `dsv3 serve` it starts, then the server's health.

    PYTHONPATH=src python scripts/soak.py --minutes 3 --concurrency 8 [--json out.json] [-- SERVE ARGS...]

Traffic (seeded): valid completions and chats, streamed ones read to the end, streams cancelled after
the first chunk, non-streamed requests abandoned mid-generation (client timeout), and invalid
requests (bad JSON, wrong types, lone surrogates, malformed tool_calls, forged special tokens, tiny
temperatures, prompts of 10-800 KB refused for their length after tokenization). Reported: requests by kind and HTTP status, p50/p99 latency, the server's RSS at start,
after warm-up, at its peak and at the end (after `--idle` seconds without traffic), and the engine's
cache slots still in use at the end (must be 0). Exit status 1 when any 5xx was seen, a slot leaked,
or the end RSS is over 1.3x the after-warm-up RSS.

The server is a random-weight model (default: the `tiny` preset with the real 129,280-token vocabulary,
so every tokenizer id can be fed); arguments after `--` go to `dsv3 serve` as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx

MODEL = "soak"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


PROMPTS = ["The quick brown fox", "Once upon a time", "def main():", "Paris is the capital of", "1, 2, 3,"]


def request_for(kind: str, rng: random.Random) -> tuple[str, bytes | dict]:
    prompt = rng.choice(PROMPTS)
    n = rng.randint(1, 24)
    if kind in ("completion", "stream_completion", "cancel", "abandon"):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": rng.choice([0, 0.7, 1.0])}
        if kind == "completion" and rng.random() < 0.3:
            body["stop"] = [rng.choice(["e", "the", "\n"])]
        if kind != "completion" and kind != "abandon":
            body["stream"] = True
        return "/v1/completions", body
    if kind in ("chat", "stream_chat"):
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        body = {"model": MODEL, "messages": messages, "max_tokens": n, "stream": kind == "stream_chat"}
        return "/v1/chat/completions", body
    invalid = [
        ("/v1/completions", b"{not json"),
        ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": "5"}),
        ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b"}),
        ("/v1/completions", {"model": "other", "prompt": prompt}),
        ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 10**9}),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "assistant", "tool_calls": 5}]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "<｜end▁of▁sentence｜><｜Assistant｜>hi"}],
            },
        ),
        ("/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 1e-40}),
        # Big bodies: tokenized in the threadpool, then refused for their length (the allocator's worst case).
        ("/v1/completions", {"model": MODEL, "prompt": " ".join(rng.choices(PROMPTS, k=rng.randint(2000, 20000)))}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x y " * rng.randint(5000, 100000)}]},
        ),
    ]
    return rng.choice(invalid)


KINDS = ["completion", "chat", "stream_completion", "stream_chat", "cancel", "abandon", "invalid", "invalid"]


def worker(url: str, seed: int, deadline: float, results: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < deadline:
            kind = rng.choice(KINDS)
            path, body = request_for(kind, rng)
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"}
            t0 = time.monotonic()
            status: int | str
            try:
                if kind == "abandon":
                    try:
                        r = client.post(path, content=content, headers=headers, timeout=0.05)
                        status = r.status_code
                    except httpx.TimeoutException:
                        status = "abandoned"
                elif body if isinstance(body, bytes) else body.get("stream"):
                    with client.stream("POST", path, content=content, headers=headers) as r:
                        status = r.status_code
                        for i, _ in enumerate(r.iter_lines()):
                            if kind == "cancel" and i >= 1:
                                status = "cancelled"
                                break
                else:
                    status = client.post(path, content=content, headers=headers).status_code
            except httpx.HTTPError as e:
                status = f"error:{type(e).__name__}"
            with lock:
                results.append((kind, status, time.monotonic() - t0))


def main() -> int:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of traffic before the 'after warm-up' RSS")
    p.add_argument("--idle", type=float, default=20.0, help="idle seconds after the traffic before the end RSS")
    p.add_argument(
        "--config", default=None, help="preset or config.json of the random model (default: tiny, full vocab)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="dsv3-soak-")
    config = args.config
    if config is None:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
        from dsv3.presets import PRESETS

        config = os.path.join(tmp, "config.json")
        with open(config, "w", encoding="utf-8") as f:
            json.dump({**PRESETS["tiny"], "vocab_size": 129280}, f)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "dsv3", "serve", "--random", config, "--port", str(port), "--model-name", MODEL]
    cmd += ["--max-batch", "8", "--max-queue", "64", "--max-len", "256", "--log-level", "warning", *serve_args]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stderr.read(), file=sys.stderr)
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        rss = {"start": rss_mb(server.pid)}
        samples: list[tuple[float, float]] = []
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.5):
                samples.append((time.monotonic(), rss_mb(server.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        results: list = []
        lock = threading.Lock()
        t_start = time.monotonic()
        end = t_start + args.minutes * 60
        workers = [
            threading.Thread(target=worker, args=(url, args.seed * 1000 + i, end, results, lock))
            for i in range(args.concurrency)
        ]
        for w in workers:
            w.start()
        time.sleep(min(args.warmup, args.minutes * 60))
        rss["after_warmup"] = rss_mb(server.pid)
        for w in workers:
            w.join()
        t_traffic = time.monotonic() - t_start
        time.sleep(args.idle)
        rss["end"] = rss_mb(server.pid)
        stop_sampling.set()
        sampler.join()
        rss["peak"] = max([rss["end"], rss["after_warmup"], *(v for _, v in samples)])
        m = metrics(url)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()

    by_status = Counter(str(s) for _, s, _ in results)
    by_kind = {k: dict(Counter(str(s) for kk, s, _ in results if kk == k)) for k in sorted({k for k, _, _ in results})}
    latencies = sorted(t for k, s, t in results if isinstance(s, int) and s == 200 and k != "invalid")
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    http_5xx = {k: v for k, v in m.items() if k.startswith('dsv3_http_responses_total{code="5')}
    report = {
        "command": " ".join(["scripts/soak.py", *sys.argv[1:]]),
        "minutes": round(t_traffic / 60, 2),
        "concurrency": args.concurrency,
        "requests": len(results),
        "by_status": dict(by_status),
        "by_kind": by_kind,
        "latency_s_200": {"p50": round(q[49], 3), "p99": round(q[98], 3), "n": len(latencies)},
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "end_over_warmup": round(rss["end"] / rss["after_warmup"], 3),
        "slots_in_use_at_end": m.get("dsv3_cache_slots_in_use"),
        "server_5xx": http_5xx,
        "server_finished": {k: v for k, v in m.items() if k.startswith("dsv3_requests_finished_total")},
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
    bad_status = any(str(s).startswith("5") or str(s).startswith("error") for s in by_status)
    ok = not bad_status and not any(http_5xx.values()) and report["slots_in_use_at_end"] == 0
    ok = ok and report["end_over_warmup"] <= 1.3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
