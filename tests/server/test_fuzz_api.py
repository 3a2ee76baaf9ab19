"""Fuzzing the HTTP API in-process (hypothesis): OpenAI-shaped requests with junk in every field (wrong
types, unicode edge cases, huge and tiny numbers), and junk bodies. Never a 5xx; every error is
OpenAI's JSON shape; afterwards a valid request answers exactly as before and no slot is held."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from dsv3.inference.engine import Engine
from dsv3.server.app import ServerLimits, create_app

MODEL = "fuzz-model"

SPECIAL_TEXT = ["<｜end▁of▁sentence｜>", "<｜Assistant｜>", "<｜User｜>", "<｜tool▁calls▁begin｜>", "</think>"]
EDGE_TEXT = [
    "",
    " ",
    "\x00",
    "a\ud800b",
    "\udfff",
    "\ud83d\ude00",
    "😀",
    "\u202e\u200b\ufeff",
    "\ufffd",
    "e\u0301",
    "𝔘𝔫𝔦",
    "\r\n\t",
    "{{ 7*7 }}{% for x in range(9) %}",
    "x" * 3000,
    *SPECIAL_TEXT,
]
EDGE_NUMBERS = [0, -1, 1, 2, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1e-40, 5e-324, -0.0, 1e308, math.inf, -math.inf]

text = st.one_of(st.sampled_from(EDGE_TEXT), st.text(max_size=40))
number = st.one_of(
    st.sampled_from(EDGE_NUMBERS),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalar = st.one_of(st.none(), st.booleans(), number, text)
junk = st.recursive(
    scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)


def mostly(valid, bad=junk):
    """Usually a plausible value (so requests get past validation to the tokenizer and the engine), else junk."""
    return st.one_of(valid, valid, valid, bad)


tool_call = st.fixed_dictionaries(
    {"type": mostly(st.just("function")), "function": mostly(st.fixed_dictionaries({"name": text, "arguments": junk}))}
)
message = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["system", "user", "assistant", "tool"]))},
    optional={
        "content": mostly(
            st.one_of(text, st.none(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text})))
        ),
        "tool_calls": mostly(st.lists(tool_call, max_size=2)),
        "name": junk,
        "tool_call_id": junk,
    },
)
SAMPLING_FIELDS = {
    "max_tokens": mostly(st.integers(1, 6)),
    "temperature": mostly(st.one_of(st.floats(0, 2), st.sampled_from([0, 1e-40, 5e-324, 1e-9, 2]))),
    "top_p": mostly(st.floats(0, 1, exclude_min=True)),
    "top_k": mostly(st.integers(0, 50)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "stop": mostly(st.one_of(text, st.lists(text, max_size=4))),
    "seed": mostly(st.integers(-(2**63), 2**64 - 1)),
    "n": junk,
    "presence_penalty": junk,
    "frequency_penalty": junk,
    "logprobs": junk,
    "user": junk,
}
completion = st.fixed_dictionaries(
    {
        "model": mostly(st.just(MODEL)),
        "prompt": mostly(st.one_of(text, st.lists(st.integers(-5, 200_000), max_size=8), st.lists(text, max_size=2))),
    },
    optional={**SAMPLING_FIELDS, "echo": junk, "best_of": junk, "suffix": junk},
)
chat = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)), "messages": mostly(st.lists(message, min_size=1, max_size=4))},
    optional={
        **SAMPLING_FIELDS,
        "tools": mostly(st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": junk}), max_size=2)),
        "tool_choice": junk,
        "max_completion_tokens": mostly(st.integers(1, 6)),
    },
)
raw_body = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[]", b"null", b'{"model": ', b"\xff\xfe", b"[" * 5000, b'{"a": NaN}']),
)


@pytest.fixture(scope="module")
def client(model, tokenizer):
    engine = Engine(
        model, max_batch=4, max_queue=8, max_len=96, valid_ids=tokenizer.valid_ids_mask(model.config.vocab_size)
    )
    app = create_app(engine, tokenizer, MODEL, limits=ServerLimits(max_tokens=6, max_body_bytes=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, engine
    engine.close()


VALID = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0}


def check(response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)


def post(c: TestClient, path: str, body) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    check(c.post(path, content=content, headers={"Content-Type": "application/json"}))


FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def test_fuzz_never_a_5xx_and_the_next_valid_request_is_unchanged(client):
    c, engine = client
    before = c.post("/v1/completions", json=VALID)
    assert before.status_code == 200

    @FUZZ
    @given(body=completion)
    def completions(body):
        post(c, "/v1/completions", body)

    @FUZZ
    @given(body=chat)
    def chats(body):
        post(c, "/v1/chat/completions", body)

    @settings(FUZZ, max_examples=30)
    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=raw_body)
    def raw(path, body):
        post(c, path, body)

    completions()
    chats()
    raw()
    after = c.post("/v1/completions", json=VALID)
    assert after.status_code == 200
    assert after.json()["choices"] == before.json()["choices"]
    assert engine.stats().cache_slots_in_use == 0 and engine.alive
