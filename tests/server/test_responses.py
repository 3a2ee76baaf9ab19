"""/v1/responses as the openai SDK uses it (plain, streamed, function tools), /tokenize and /detokenize, and
the 404 for an unknown route."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from dsv3.inference import engine as engine_mod
from dsv3.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP

MODEL = "tiny-test"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_batch=4, max_queue=4, max_len=256)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_responses_answer_as_chat_does(client):
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}],
        max_tokens=8,
        temperature=0,
    )
    r = client.responses.create(model=MODEL, instructions="Be terse.", input="Hi!", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    same = client.responses.create(
        model=MODEL,
        input=[
            {"role": "developer", "content": "Be terse."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi!"}]},
        ],
        max_output_tokens=8,
        temperature=0,
    )
    assert same.output_text == r.output_text

    # Streamed: the SDK's event stream and its accumulating helper give the same text.
    events = list(
        client.responses.create(
            model=MODEL, instructions="Be terse.", input="Hi!", max_output_tokens=8, temperature=0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    # Cut by max_output_tokens: status incomplete, as OpenAI ends such a stream.
    assert events[-1].response.status == r.status and events[-1].response.output_text == r.output_text


def test_responses_function_tools(client, tokenizer, monkeypatch):
    # Random weights never write tool-call markup, so the sampler is scripted to write it.
    call = (
        f"{TOOL_CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{json.dumps({'city': 'Paris'})}\n```{TOOL_CALL_END}"
    )
    script = tokenizer.encode(f"{TOOL_CALLS_BEGIN}{call}{TOOL_CALLS_END}", add_bos=False) + [tokenizer.eos_id]
    steps: dict[torch.Generator, int] = {}

    def scripted(logits, params, generators):
        out = []
        for g in generators:
            steps[g] = steps.get(g, -1) + 1
            out.append(script[min(steps[g], len(script) - 1)])
        return out

    monkeypatch.setattr(engine_mod, "sample_tokens", scripted)
    r = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[TOOL], max_output_tokens=64)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert r.status == "completed"

    events = list(
        client.responses.create(model=MODEL, input="Weather?", tools=[TOOL], max_output_tokens=64, stream=True)
    )
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    assert [i.type for i in events[-1].response.output] == ["message", "function_call"]
    # The SDK's accumulating helper checks every event against its snapshot of the response.
    with client.responses.stream(model=MODEL, input="Weather?", tools=[TOOL], max_output_tokens=64) as stream:
        final = stream.get_final_response()
    assert [(i.type, getattr(i, "name", None)) for i in final.output] == [
        ("message", None),
        ("function_call", "get_weather"),
    ]

    # The next turn sends the call and its output back: they become the assistant's call and a tool message.
    follow = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
        tools=[TOOL],
        max_output_tokens=64,
    )
    assert follow.usage.input_tokens > r.usage.input_tokens


def test_responses_refuses_what_it_does_not_do(server):
    for field, value in (("previous_response_id", "resp_1"), ("reasoning", {"effort": "low"}), ("background", True)):
        r = httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, "input": "x", field: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_tokenize_detokenize_and_unknown_routes(server, tokenizer):
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "Hello world"}, timeout=60).json()
    assert (
        r["tokens"] == tokenizer.encode("Hello world") and r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    )
    bare = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode("Hello world", add_bos=False)
    messages = [{"role": "user", "content": "Hi"}]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": messages, "return_token_strs": True}).json()
    assert chat["tokens"] == tokenizer.encode_chat(messages)
    assert chat["token_strs"] == [tokenizer.decode([t]) for t in chat["tokens"]]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(r["tokens"])}
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    for route, body in (("/tokenize", {"prompt": "Hi"}), ("/detokenize", {"tokens": [5]})):
        other = httpx.post(f"{server.url}{route}", json={"model": "not-" + MODEL, **body})
        assert other.status_code == 400 and other.json()["error"]["code"] == "model_not_found", route

    missing = httpx.post(f"{server.url}/v1/embeddings", json={})
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["type"] == "not_found_error"
    for route in ("POST /v1/chat/completions", "POST /v1/responses", "POST /tokenize", "GET /v1/models"):
        assert route in error["message"]


def test_tokenizer_info_serves_lm_eval_remote_tokenizer(server, tokenizer):
    # lm-eval's `tokenizer_backend=remote` (lm_eval.utils.RemoteTokenizer) checks GET /tokenizer_info, reads the
    # special tokens' text there, and gets their ids and every encoding from POST /tokenize with
    # add_special_tokens false: its context/continuation split then matches the ids the server scores.
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=60)
    assert info.status_code == 200, info.text
    body = info.json()
    assert body["bos_token"] == tokenizer.bos_token and body["eos_token"] == tokenizer.eos_token
    assert body["chat_template"] == tokenizer.chat_template and body["model_max_length"] == 256
    for text, want in ((body["eos_token"], [tokenizer.eos_id]), (body["bos_token"], [tokenizer.bos_id])):
        r = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
        assert r.json()["tokens"] == want
    context, whole = "The sky is", "The sky is blue"
    enc = [
        httpx.post(f"{server.url}/tokenize", json={"prompt": t, "add_special_tokens": False}).json()["tokens"]
        for t in (context, whole)
    ]
    assert enc == [tokenizer.encode(context, add_bos=False), tokenizer.encode(whole, add_bos=False)]


def test_responses_structured_outputs(client):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model=MODEL,
        input="JSON please",
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}},
        max_output_tokens=40,
        temperature=0,
    )
    value = json.loads(r.output_text)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    city_schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}}
    forced = client.responses.create(
        model=MODEL,
        input="Weather?",
        tools=[{**TOOL, "parameters": {**city_schema, "required": ["city"], "additionalProperties": False}}],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=100,
        temperature=0,
    )
    (call,) = [item for item in forced.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city"}
