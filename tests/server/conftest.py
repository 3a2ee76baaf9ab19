"""Fixtures for the server tests: the real tokenizer, a tiny random model over its full vocabulary, and
a uvicorn server on a free loopback port running in a thread of the test process."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

import dsv3
from dsv3.inference.engine import Engine
from dsv3.tokenizer import Tokenizer

MODEL_VOCAB = 129280  # the real padded vocabulary, so every id the tokenizer produces can be fed


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir()


@pytest.fixture(scope="session")
def model(tokenizer: Tokenizer) -> dsv3.DeepSeekV3:
    """`tiny` with the full vocabulary (about 17M parameters, mostly embedding and lm_head), fp32."""
    torch.manual_seed(0)
    cfg = dsv3.ModelConfig.from_pretrained("tiny").replace(vocab_size=MODEL_VOCAB)
    m = dsv3.DeepSeekV3(cfg, dtype=torch.float32).eval()
    # The server masks the padded ids (>= 128,815) the tokenizer cannot decode; offline `dsv3.generate`
    # does not. Zero lm_head rows give those ids logit 0, always below the largest of 128,815 random
    # logits, so greedy offline generation never picks them either and the two can be compared as is.
    with torch.no_grad():
        m.lm_head.weight[tokenizer.vocab_size :] = 0
    return m


class RunningServer:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, engine: Engine, limits) -> None:
        import uvicorn

        from dsv3.server.http import uvicorn_config

        self.engine = engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, limits, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.close()


@pytest.fixture(scope="session")
def start_server(model, tokenizer):
    """A factory: start_server(api_key=..., limits=..., **Engine kwargs) -> RunningServer, closed at the end."""
    from dsv3.server.app import ServerLimits, create_app

    servers: list[RunningServer] = []

    def start(*, api_key=None, limits=None, model_name="tiny-test", **engine_kwargs) -> RunningServer:
        engine = Engine(model, valid_ids=tokenizer.valid_ids_mask(model.config.vocab_size), **engine_kwargs)
        limits = limits or ServerLimits()
        app = create_app(engine, tokenizer, model_name, api_key=api_key, limits=limits)
        servers.append(RunningServer(app, engine, limits))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
