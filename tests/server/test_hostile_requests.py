"""Hostile and careless requests against a real uvicorn server: never a 500, the keep-alive connection
survives every 4xx/5xx answer, limits close slow or idle connections, and a dead engine loop is an
error instead of a hang. Requests here go over raw sockets so that connection reuse is observable."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from dsv3.inference.engine import EngineClosedError
from dsv3.server.app import ServerLimits

MODEL = "tiny-test"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_batch=4, max_queue=8, max_len=128, limits=ServerLimits(max_tokens=32))


class Connection:
    """One keep-alive HTTP/1.1 connection; `request` raises ConnectionError if the server closed it."""

    def __init__(self, port: int, timeout: float = 60) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n".encode()
        for k, v in (headers or {}).items():
            head += k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
        if body is not None:
            head += b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        self.sock.sendall(head + b"\r\n" + (body or b""))
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        raw_head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(fields.get("content-length", 0))
        while len(self.buf) < length:
            self._fill()
        body_out, self.buf = self.buf[:length], self.buf[length:]
        return status, fields, body_out

    def post_json(self, path: str, obj, headers: dict | None = None):
        return self.request("POST", path, json.dumps(obj).encode(), headers)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def chat(content, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def assert_openai_error(status: int, body: bytes, want_status: int, param: str | None = None) -> dict:
    assert status == want_status, body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


BAD_TOOL_CALLS = [5, True, "x", {"a": 1}, [5], [None], [{"function": 5}], [{"function": {"name": 5}}]]


@pytest.mark.parametrize("tool_calls", BAD_TOOL_CALLS, ids=repr)
def test_malformed_assistant_tool_calls_are_400_and_the_connection_lives(server, tool_calls):
    conn = Connection(server.port)
    try:
        messages = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": tool_calls},
            {"role": "user", "content": "again"},
        ]
        status, _, body = conn.post_json(
            "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 2}
        )
        assert_openai_error(status, body, 400, "messages")
        status, _, body = conn.post_json("/v1/chat/completions", chat("still there?"))
        assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path, obj, param",
    [
        ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": ["\udfff"], "max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", chat("a\ud800b"), "messages"),
        ("/v1/chat/completions", chat([{"type": "text", "text": "x\udc80"}]), "messages"),
        ("/v1/chat/completions", chat("ok", stop=["\ud83d"]), "stop"),
        ("/v1/chat/completions", {**chat("ok"), "model": "m\ud800"}, "model"),
    ],
)
def test_lone_surrogates_are_400_naming_the_field(server, path, obj, param):
    conn = Connection(server.port)
    try:
        status, _, body = conn.post_json(path, obj)  # json.dumps writes the lone surrogate as \\ud800
        error = assert_openai_error(status, body, 400, param)
        assert "surrogate" in error["message"]
        status, _, _ = conn.post_json("/v1/completions", {"model": MODEL, "prompt": "fine", "max_tokens": 2})
        assert status == 200
    finally:
        conn.close()


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-9])
def test_tiny_temperatures_are_greedy(server, temperature):
    conn = Connection(server.port)
    try:
        req = {"model": MODEL, "prompt": "The capital of France", "max_tokens": 6}
        status, _, greedy = conn.post_json("/v1/completions", {**req, "temperature": 0})
        assert status == 200
        status, _, tiny = conn.post_json("/v1/completions", {**req, "temperature": temperature, "seed": 3})
        assert status == 200, tiny
        assert json.loads(tiny)["choices"][0]["text"] == json.loads(greedy)["choices"][0]["text"]
    finally:
        conn.close()


def test_an_internal_error_is_a_500_that_keeps_the_connection(server, tokenizer, monkeypatch):
    conn = Connection(server.port)
    try:

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(tokenizer, "encode", broken)
        status, _, body = conn.post_json("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        error = assert_openai_error(status, body, 500)
        assert error["type"] == "server_error" and "boom" not in error["message"]
        monkeypatch.undo()
        for _ in range(2):  # the same socket keeps answering
            status, _, body = conn.post_json("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert status == 200, body
    finally:
        conn.close()


def test_keep_alive_survives_4xx_with_httpx_reusing_one_connection(server):
    seen = set()

    def remember(request):
        stream = request.extensions.get("network_stream")
        if stream is not None:
            seen.add(id(stream.get_extra_info("socket")))

    with httpx.Client(base_url=server.url, limits=httpx.Limits(max_connections=1), timeout=60) as http:
        http.event_hooks["request"] = []
        answers = []
        for body in [b"{not json", json.dumps({"model": "nope", "prompt": "x"}).encode(), b"[]"] * 2:
            r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
            answers.append(r.status_code)
            remember(r)
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        remember(r)
    assert answers == [400] * 6 and r.status_code == 200
    assert len(seen) == 1


# ---------------------------------------------------------------------------------------------- auth
@pytest.mark.parametrize("key", ["clé-ключ-鍵", "plain-ascii-key"])
def test_api_keys_non_ascii_and_lower_case_bearer(start_server, key):
    srv = start_server(api_key=key, max_batch=1, max_queue=1, max_len=64)
    conn = Connection(srv.port)
    try:
        for auth in (b"Bearer " + key.encode(), b"bearer " + key.encode(), b"BEARER  " + key.encode()):
            status, _, body = conn.request("GET", "/v1/models", headers={"Authorization": auth})
            assert status == 200, (auth, body)
        for auth in (
            b"Bearer wrong",
            b"Basic " + key.encode(),
            b"Bearer",
            key.encode(),
            b"Bearer " + key.encode()[:-1],
        ):
            status, _, body = conn.request("GET", "/v1/models", headers={"Authorization": auth})
            assert_openai_error(status, body, 401)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- metrics
def finished(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out = {}
    for line in text.splitlines():
        if line.startswith("dsv3_requests_finished_total{"):
            reason = line.split('"')[1]
            out[reason] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_stop_string_finish_is_counted_as_stop(start_server, tokenizer):
    srv = start_server(max_batch=2, max_queue=2, max_len=128)
    conn = Connection(srv.port)
    try:
        req = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
        status, _, body = conn.post_json("/v1/completions", req)
        text = json.loads(body)["choices"][0]["text"]
        assert status == 200 and len(text) >= 2
        before = finished(srv.port)
        status, _, body = conn.post_json("/v1/completions", {**req, "stop": [text[1:3]]})
        assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "stop"
        deadline = time.monotonic() + 10
        while finished(srv.port).get("stop", 0) == before.get("stop", 0) and time.monotonic() < deadline:
            time.sleep(0.05)
        after = finished(srv.port)
        assert after["stop"] == before.get("stop", 0) + 1
        assert after.get("cancelled", 0) == before.get("cancelled", 0)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- engine health
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_is_an_error_not_a_hang(start_server):
    srv = start_server(max_batch=1, max_queue=4, max_len=64)
    engine = srv.engine

    def die():
        raise SystemExit  # what a fatal error does to the loop thread: it ends, silently

    engine._drop_cancelled = die  # the loop calls it first when there is work
    conn = Connection(srv.port, timeout=20)
    try:
        status, _, body = conn.post_json("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert status in (500, 503), body  # the request that met the dying loop fails, it does not hang
        engine._thread.join(10)
        assert not engine._thread.is_alive()
        with pytest.raises(EngineClosedError):
            engine.submit([1, 2, 3])
        status, _, body = conn.post_json("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert_openai_error(status, body, 503)
        status, _, body = conn.request("GET", "/health")
        assert status == 503
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- connection limits
def test_slow_and_idle_connections_are_closed(start_server):
    limits = ServerLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=1)
    srv = start_server(max_batch=1, max_queue=1, max_len=64, limits=limits)

    def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
        deadline = time.monotonic() + seconds
        sock.settimeout(0.1)
        sent = 0
        while time.monotonic() < deadline:
            if sent < len(trickle):
                try:
                    sock.sendall(trickle[sent : sent + 1])
                except OSError:
                    return True
                sent += 1
            try:
                if sock.recv(4096) == b"":
                    return True
            except TimeoutError:
                pass
            except OSError:
                return True
        return False

    idle = socket.create_connection(("127.0.0.1", srv.port))
    slow_headers = socket.create_connection(("127.0.0.1", srv.port))
    slow_body = socket.create_connection(("127.0.0.1", srv.port))
    try:
        t0 = time.monotonic()
        slowloris = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200
        results = {}
        threads = [
            threading.Thread(target=lambda: results.__setitem__("idle", closed_within(idle, 8))),
            threading.Thread(target=lambda: results.__setitem__("headers", closed_within(slow_headers, 8, slowloris))),
        ]
        slow_body.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        for t in threads:
            t.start()
        slow_body.settimeout(8)
        answer = slow_body.recv(65536)
        for t in threads:
            t.join()
        assert results == {"idle": True, "headers": True}
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - t0 < 8
        # The server still serves normal requests.
        assert httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    finally:
        for s in (idle, slow_headers, slow_body):
            s.close()
