"""The OpenAI-compatible server end to end, driven by the official `openai` client over loopback.

One tiny random model (full vocabulary) behind a real uvicorn server: greedy answers must equal
offline `dsv3.generate` on the same prompt ids, whatever else is batched; limits, cancellation and
errors are checked through /metrics and OpenAI's error objects.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import dsv3
from dsv3.inference import engine as engine_mod
from dsv3.inference.generate import stream as offline_stream
from dsv3.inference.sampling import SamplingParams
from dsv3.server.app import ServerLimits
from dsv3.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

API_KEY = "sk-test-0123456789"
MODEL = "tiny-test"
MAX_LEN = 192  # tokens per sequence in the main server
MAX_TOKENS = 128  # the main server's max_tokens limit


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(
        api_key=API_KEY,
        max_batch=16,
        max_queue=16,
        max_len=MAX_LEN,
        limits=ServerLimits(max_body_bytes=64 * 1024, max_tokens=MAX_TOKENS),
    )


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    # max_retries=0: the client would otherwise retry 429s and timeouts behind the test's back.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(model, tokenizer):
    """offline(prompts ids, max_tokens per prompt) -> [(text, finish_reason, completion_tokens)] via dsv3.generate."""
    eos = set(model.config.eos_token_ids)

    def run(prompts: list[list[int]], budgets: list[int]) -> list[tuple[str, str, int]]:
        outs = dsv3.generate(model, prompts, max_new_tokens=max(budgets))  # greedy, stops at EOS
        answers = []
        for out, budget in zip(outs, budgets):
            out = out[:budget]
            stopped = bool(out) and out[-1] in eos
            answers.append(
                (
                    tokenizer.decode(out[:-1] if stopped else out, skip_special_tokens=True),
                    "stop" if stopped else "length",
                    len(out),
                )
            )
        return answers

    return run


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def wait_for_metric(server, name: str, want: float, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m.get(name) == want:
            return m
        assert time.monotonic() < deadline, f"{name} is {m.get(name)}, waited for {want}"
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------------------


def test_models_health_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_completions_match_offline_generate(client, tokenizer, offline):
    prompt = "The quick brown fox jumps over"
    ids = tokenizer.encode(prompt)
    ((text, finish, n),) = offline([ids], [12])
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text

    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n and len({c.id for c in chunks}) == 1


def test_chat_matches_offline_generate(client, tokenizer, offline):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
    ids = tokenizer.encode_chat(messages)
    ((text, finish, n),) = offline([ids], [10])
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion"
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert choice.message.tool_calls is None and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def test_seeded_sampling_matches_offline_and_repeats(client, model, tokenizer):
    prompt = "Once upon a time"
    ids = tokenizer.encode(prompt)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    # Offline with the server's mask of the ids the tokenizer cannot decode (sampling could pick them).
    # inference_mode: the logits stream() gets are inference tensors (an in-place mask needs the mode).
    with torch.inference_mode():
        want = [
            t
            for step in offline_stream(model, [ids], 10, params, seed=42, vocab_limit=tokenizer.vocab_size)
            for t in step.values()
        ]
    want_text = tokenizer.decode([t for t in want if t not in model.config.eos_token_ids], skip_special_tokens=True)
    args = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0.9, top_p=0.95, seed=42)
    assert client.completions.create(**args).choices[0].text == want_text
    assert "".join(c.choices[0].text for c in client.completions.create(**args, stream=True)) == want_text


def test_stop_strings_cut_the_text(server, client, tokenizer, offline):
    prompt = "Stop strings are matched on text"
    ((text, _, _),) = offline([tokenizer.encode(prompt)], [16])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    want = text[: text.find(stop)]
    for stops in (stop, ["never-seen-\u2603", stop]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stops)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
        chunks = list(
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=stops, stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    wait_for_metric(server, "dsv3_cache_slots_in_use", 0)


def test_sixteen_concurrent_clients_each_get_their_own_answer(server, client, tokenizer, offline):
    prompts = [f"Request {i}:" + " word" * (3 * i) for i in range(16)]
    budgets = [6 + (i * 5) % 11 for i in range(16)]
    want = offline([tokenizer.encode(p) for p in prompts], budgets)
    start = threading.Barrier(16)

    def ask(i: int) -> tuple[str, str]:
        start.wait()
        if i % 2:
            chunks = list(
                client.completions.create(
                    model=MODEL, prompt=prompts[i], max_tokens=budgets[i], temperature=0, stream=True
                )
            )
            return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=budgets[i], temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == [(text, finish) for text, finish, _ in want]
    wait_for_metric(server, "dsv3_cache_slots_in_use", 0)
    m = wait_for_metric(server, "dsv3_batch_size", 0)  # idle again
    assert m["dsv3_batch_size_max"] > 1
    assert m["dsv3_requests_active"] == 0 and m["dsv3_queue_depth"] == 0


def test_client_disconnect_frees_the_slot(server, client, monkeypatch):
    # Each decode step takes at least 10 ms here, so MAX_TOKENS tokens outlast the client's 0.5 s timeout below
    # however fast the step itself is (the tiny model's steps got fast enough to finish first).
    real_step, steps = engine_mod.decode_step, []
    monkeypatch.setattr(engine_mod, "decode_step", lambda *a: steps.append(time.sleep(0.01)) or real_step(*a))
    before = metrics(server)
    stream = client.completions.create(
        model=MODEL, prompt="A very long story", max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert metrics(server)["dsv3_cache_slots_in_use"] == 1
    stream.close()  # the client goes away mid-stream
    m = wait_for_metric(server, "dsv3_cache_slots_in_use", 0)
    cancelled = 'dsv3_requests_finished_total{reason="cancelled"}'
    assert m[cancelled] == before[cancelled] + 1
    assert m["dsv3_generated_tokens_total"] < before["dsv3_generated_tokens_total"] + MAX_TOKENS

    # A non-streamed request whose client times out is cancelled as well.
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(
            model=MODEL, prompt="Another long story", max_tokens=MAX_TOKENS, temperature=0
        )
    m = wait_for_metric(server, "dsv3_cache_slots_in_use", 0)
    assert m[cancelled] == before[cancelled] + 2
    assert client.completions.create(model=MODEL, prompt="still there?", max_tokens=2).usage.completion_tokens >= 1
    assert steps  # the engine's steps went through the slowed function


def test_flood_past_the_queue_gets_429_while_admitted_requests_finish(start_server, tokenizer, offline):
    small = start_server(max_batch=2, max_queue=2, max_len=96)  # room for 4 requests, no API key
    flood = openai.OpenAI(base_url=f"{small.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [f"Flood request number {i}" for i in range(10)]
    want = offline([tokenizer.encode(p) for p in prompts], [40] * 10)
    start = threading.Barrier(10)

    def ask(i: int):
        start.wait()
        t0 = time.monotonic()
        try:
            r = flood.completions.create(model=MODEL, prompt=prompts[i], max_tokens=40, temperature=0)
            return "ok", r.choices[0].text, time.monotonic() - t0
        except openai.RateLimitError as e:
            assert e.status_code == 429 and e.code == "queue_full"
            return "429", None, time.monotonic() - t0

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(ask, range(10)))
    ok = [(i, text, dt) for i, (kind, text, dt) in enumerate(results) if kind == "ok"]
    rejected = [dt for kind, _, dt in results if kind == "429"]
    assert len(ok) >= 4 and rejected and len(ok) + len(rejected) == 10
    assert all(text == want[i][0] for i, text, _ in ok)
    assert max(rejected) < max(dt for _, _, dt in ok)  # refused at once, not after waiting
    m = wait_for_metric(small, "dsv3_cache_slots_in_use", 0)
    assert m["dsv3_requests_rejected_total"] == len(rejected) and m['dsv3_http_responses_total{code="429"}'] == len(
        rejected
    )
    assert flood.completions.create(model=MODEL, prompt="after the flood", max_tokens=3).choices[0].text is not None


BAD_REQUESTS = [  # (path, body: bytes or JSON, status, param)
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi",', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000, 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a"] * 9, "n": 4}, 400, "n"),  # 36 choices > 32 places
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": [0] * MAX_LEN}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [0] * 150, "max_tokens": 100}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [0, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [[5, 6], []]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["x"] * 17}, 400, "stop"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "high"},
        400,
        "reasoning_effort",
    ),
    (
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "messages",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": "a" * 70_000}, 413, None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    for path, body, status, param in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = http.post(path, content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body if isinstance(body, bytes) else str(body)[:200], r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405)):
        r = http.request(method, path)
        assert r.status_code == status and "message" in r.json()["error"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", suffix="!")
    assert e.value.status_code == 400 and e.value.param == "suffix"
    m = metrics(server)
    assert m['dsv3_http_responses_total{code="400"}'] >= len([b for b in BAD_REQUESTS if b[2] == 400])
    assert m['dsv3_http_responses_total{code="413"}'] >= 1 and m["dsv3_cache_slots_in_use"] == 0
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok?"}], max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1


def call_markup(name: str, args: dict) -> str:
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{json.dumps(args)}\n```{TOOL_CALL_END}"


def test_tool_calls_reach_the_client(client, tokenizer, monkeypatch):
    # Random weights never write tool-call markup, so the sampler is scripted to write it.
    script = tokenizer.encode(
        f"Checking.{TOOL_CALLS_BEGIN}{call_markup('get_weather', {'city': 'Paris'})}{TOOL_CALLS_END}", add_bos=False
    ) + [tokenizer.eos_id]
    steps: dict[torch.Generator, int] = {}

    def scripted(logits, params, generators):
        out = []
        for g in generators:
            steps[g] = steps.get(g, -1) + 1
            out.append(script[min(steps[g], len(script) - 1)])
        return out

    monkeypatch.setattr(engine_mod, "sample_tokens", scripted)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert r.usage.completion_tokens == len(script)

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, tools=tools, max_tokens=64, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Checking."
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # Without tools in the request the markup is plain content.
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64).choices[0]
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None
    assert plain.message.content.startswith(f"Checking.{TOOL_CALLS_BEGIN}")
