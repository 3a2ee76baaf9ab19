"""`torchrun --nproc-per-node 2 -m dsv3 serve|bench --tp 2 --ep 2`: the same answers as one process.

The server runs as a real torchrun job (rank 0 serves HTTP, rank 1 replays its engine's passes) and
is checked from outside with the `openai` client against offline `dsv3.generate`; then Ctrl-C to
torchrun must end every process. Each step is bounded by a timeout: a hang fails the test.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from spawn import free_port

import dsv3
from dsv3.tokenizer import Tokenizer

# Spawns processes: part of the slow set (CI runs it; `pytest -m 'not slow'` skips it).
pytestmark = pytest.mark.slow

PROMPTS = [("Hello, world", 8), ("The capital of France is", 5), ("1 2 3 4 5 6 7 8 9", 12)]  # (text, max_tokens)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DSV3_DIST_TIMEOUT="60")
    return env


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "dsv3",
        *args,
    ]


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """`tiny` over the real vocabulary, fp32; the padded ids the tokenizer cannot decode get zero lm_head rows.

    The server masks those ids, offline `dsv3.generate` does not: with logit 0 (below the largest of
    128,815 random logits) greedy decoding never picks them, so the two can be compared as they are.
    """
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.from_pretrained("tiny", vocab_size=129280)
    model = dsv3.DeepSeekV3(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[Tokenizer.from_dir().vocab_size :] = 0
    path = str(tmp_path_factory.mktemp("serve") / "tiny")
    model.save_pretrained(path)
    return path


def test_torchrun_serve_matches_one_process_and_stops_on_ctrl_c(ckpt):
    tok = Tokenizer.from_dir(ckpt)
    model = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.float32)
    eos = set(model.config.eos_token_ids)
    want = []
    for text, budget in PROMPTS:
        ids = tok.encode(text, add_bos=True)  # as the server encodes a completion prompt
        (out,) = dsv3.generate(model, [ids], max_new_tokens=budget)  # greedy, stops at EOS (included)
        stopped = bool(out) and out[-1] in eos
        want.append((tok.decode(out[:-1] if stopped else out, skip_special_tokens=True), len(ids), len(out)))
    scored = tok.encode(PROMPTS[0][0], add_bos=True)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([scored]))[0, :, : tok.vocab_size], dim=-1)
    want_scores = [float(lp[t - 1, scored[t]]) for t in range(1, len(scored))]
    del model

    proc = subprocess.Popen(
        _torchrun(
            "serve",
            "--model",
            ckpt,
            "--tp",
            "2",
            "--ep",
            "2",
            "--port",
            "0",
            "--dtype",
            "fp32",
            "--max-batch",
            "2",
            "--max-len",
            "128",
            "--log-level",
            "warning",
        ),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    log: list[str] = []

    def pump() -> None:  # read stderr in a thread, so a silent hang cannot block the test on readline()
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    workers: list[int] = []
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, f"the server exited: {''.join(log)}"
            log.append(line)
            if " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
            assert r.status == 200 and json.load(r) == {"status": "ok"}

        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)

        def complete(item: tuple[str, int]):
            return client.completions.create(model="tiny", prompt=item[0], max_tokens=item[1], temperature=0)

        # Concurrent: they share decode steps, and with 2 slots the third reuses a freed one (rank 1 must free it too).
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(complete, PROMPTS))
        got = [(a.choices[0].text, a.usage.prompt_tokens, a.usage.completion_tokens) for a in answers]
        assert got == want
        # Scoring (echo, prompt logprobs): a prefill that projects every position, replayed on rank 1 too.
        r = client.completions.create(model="tiny", prompt=scored, max_tokens=0, echo=True, logprobs=1)
        assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(want_scores, abs=1e-3)

        proc.send_signal(signal.SIGINT)  # torchrun passes it on; rank 0 stops serving and releases rank 1
        proc.wait(timeout=40)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "a rank outlived torchrun"
        while (line := lines.get(timeout=10)) is not None:
            log.append(line)
        assert "dsv3 serve: error" not in "".join(log), "".join(log)
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_torchrun_bench_prints_dsv3_rows_on_rank_0(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dsv3.ModelConfig.from_pretrained("tiny").to_dict()))
    out = subprocess.run(
        _torchrun(
            "bench",
            "--config",
            str(config),
            "--rows",
            "decode1",
            "--steps",
            "2",
            "--tp",
            "2",
            "--ep",
            "2",
            "--json",
            str(tmp_path / "bench.json"),
        ),
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("decode b=1 after 128") == 1, out.stdout  # rank 0 alone prints
    assert "dsv3 rows only" in out.stdout
    result = json.loads((tmp_path / "bench.json").read_text())
    (row,) = result["rows"]
    assert row["row"] == "decode b=1 after 128" and row["dsv3"] > 0 and row["transformers"] is None
    assert result["meta"]["parallel"] == {"world": 2, "tp": 2, "ep": 2}
