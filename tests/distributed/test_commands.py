"""The commands: `dist-generate` under torchrun against one process, a failing rank, and `plan`.

Launched as real processes (`python -m torch.distributed.run`, or plain processes with the env
torchrun would set), each bounded by a timeout: a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import workers
from spawn import free_port

from dsv3 import accounting
from dsv3.config import ModelConfig
from dsv3.distributed.commands import main

# Spawns processes: part of the slow set (CI runs it; `pytest -m 'not slow'` skips it).
pytestmark = pytest.mark.slow

CMD = [sys.executable, "-m", "dsv3.distributed.commands"]
PROMPTS = ["--prompt-ids", "0,5,17,33,101,7", "--prompt-ids", "0,300,301,2"]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DSV3_DIST_TIMEOUT="60", **extra)
    return env


def _torchrun(nproc: int, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        "-m",
        "dsv3.distributed.commands",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cmd") / "tiny"
    workers.build().save_pretrained(path)
    return str(path)


def test_dist_generate_under_torchrun_matches_one_process(ckpt):
    args = ["dist-generate", "--model", ckpt, *PROMPTS, "--max-new-tokens", "5", "--dtype", "fp32", "--stop-ids", ""]
    single = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=120, env=_env())
    assert single.returncode == 0, single.stderr
    lines = single.stdout.split()
    assert len(lines) == 2 and all(len(line.split(",")) == 5 for line in lines)
    parallel = _torchrun(2, [*args, "--tp", "2", "--ep", "2", "--comm-stats"])
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout.split() == lines  # rank 0 alone prints, the same tokens
    assert "ep.all_reduce" in parallel.stderr and "tp.all_reduce" in parallel.stderr


def test_bad_layout_is_one_clear_line(ckpt):
    out = _torchrun(2, ["dist-generate", "--model", ckpt, "--prompt-ids", "1,2", "--tp", "3"])
    assert out.returncode != 0
    assert "dsv3 dist-generate: error: --tp must be 1 or the number of processes (2), got 3" in out.stderr
    # Every rank hits it; rank 0 says it and the others wait a moment (torchrun ends them meanwhile).
    assert out.stderr.count("--tp must be 1") in (1, 2)
    assert "dsv3/distributed/" not in out.stderr  # no traceback from our code (torchrun adds its own report)


def test_sizes_that_do_not_divide_under_torchrun(tmp_path):
    path = tmp_path / "three_heads"
    workers.build({"num_attention_heads": 3, "num_key_value_heads": 3}).save_pretrained(path)
    out = _torchrun(2, ["dist-generate", "--model", str(path), "--prompt-ids", "1,2"])
    assert out.returncode != 0
    assert "dsv3 dist-generate: error: num_attention_heads (3) is not divisible by tp (2)" in out.stderr


def test_a_failing_rank_ends_the_run_with_its_message(ckpt, tmp_path):
    """Rank 1 cannot read its checkpoint; rank 0 loads and waits in a collective: both must exit, and rank 0
    because it saw the closed connection, not the collective timeout (set far beyond the test's own limit).

    Plain processes with torchrun's environment, no torchrun agent (which would kill the group
    itself): this is the ranks' own fail-fast, not the launcher's.
    """
    port = str(free_port())
    procs = []
    for rank, model in ((0, ckpt), (1, str(tmp_path / "missing"))):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env["DSV3_DIST_TIMEOUT"] = "3600"  # a timeout would outlast communicate() below: only the peer path ends it
        args = ["dist-generate", "--model", model, "--prompt-ids", "1,2,3", "--tp", "2", "--ep", "2"]
        procs.append(
            subprocess.Popen([*CMD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert procs[1].returncode == 2
    assert f"[rank 1] checkpoint directory '{tmp_path / 'missing'}' does not exist" in outs[1][1]
    assert procs[0].returncode == 1
    assert "a collective failed, another rank has probably failed" in outs[0][1]
    assert "timed out" not in outs[0][1].lower()


def test_plan_command(capsys):
    assert (
        main(
            [
                "plan",
                "deepseek-v3",
                "--devices",
                "8",
                "--device-memory",
                "141",
                "--context",
                "32768",
                "--batch",
                "16",
                "--dtype",
                "fp8",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    cfg = ModelConfig.from_pretrained("deepseek-v3")
    assert plan == accounting.plan_deployment(cfg, 8, 141, 32768, 16, dtype="fp8")
    assert (
        main(
            [
                "plan",
                "deepseek-v3",
                "--devices",
                "8",
                "--device-memory",
                "80",
                "--context",
                "4096",
                "--batch",
                "1",
                "--tp",
                "1",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "tp=1 ep=8" in text and "Verdict:" in text and "does not fit" in text


def test_plan_rejects_a_bad_layout(capsys):
    assert (
        main(["plan", "tiny", "--devices", "4", "--device-memory", "8", "--context", "64", "--batch", "1", "--tp", "3"])
        == 2
    )
    assert "tp (3) must divide the number of devices (4)" in capsys.readouterr().err


def test_torchrun_dsv3_generate_prints_the_single_process_text(tmp_path):
    """`torchrun -m dsv3 generate --tp N --ep N` (text in, text out) equals one process."""
    import torch

    import dsv3

    cfg = dsv3.ModelConfig.from_pretrained("tiny", vocab_size=129280)
    torch.manual_seed(0)
    path = str(tmp_path / "text")
    dsv3.DeepSeekV3(cfg).save_pretrained(path)
    args = ["generate", "--model", path, "--prompt", "Hello, world", "--max-new-tokens", "8", "--dtype", "fp32"]
    single = subprocess.run(
        [sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert single.returncode == 0, single.stderr
    cmd = [
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
        "--tp",
        "2",
        "--ep",
        "2",
    ]
    parallel = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert parallel.returncode == 0, parallel.stderr
    assert parallel.stdout == single.stdout and single.stdout.strip()
