"""`dsv3 serve` as a user runs it: option errors are one line, and a real process serves and stops on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import openai
import pytest

import dsv3
from dsv3.server.commands import add_commands, main

# Spawns processes: part of the slow set (CI runs it; `pytest -m 'not slow'` skips it).
pytestmark = pytest.mark.slow


def test_defaults_listen_on_loopback():
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.model, args.random, args.dtype) == ("127.0.0.1", 8000, None, None, "bf16")
    assert callable(args.fn)


def test_user_errors_are_one_line(capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = str(busy.getsockname()[1])
    cases = [
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--dtype", "fp16"], "--dtype"),
        (["--port", port], "cannot listen"),
        (["--api-key", ""], "--api-key"),
    ]
    try:
        for argv, needle in cases:
            assert main(["serve", *argv]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("dsv3 serve: error:") and needle in err[0], err
    finally:
        busy.close()


def test_serve_process_answers_and_stops_on_ctrl_c(tmp_path):
    cfg = dsv3.ModelConfig.from_pretrained("tiny").replace(vocab_size=129280, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv3.server.commands",
            "serve",
            "--random",
            str(tmp_path / "config.json"),
            "--port",
            "0",
            "--dtype",
            "fp32",
            "--api-key",
            "sk-cli",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        url, lines, deadline = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, f"the server exited: {''.join(lines)}"
            lines.append(line)
            if " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
        assert url and url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=url, api_key="sk-cli", max_retries=0, timeout=60)
        (card,) = client.models.list().data
        assert card.id == "dsv3-config-random"
        r = client.completions.create(model=card.id, prompt="Hello", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
