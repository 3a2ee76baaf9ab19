"""Structured outputs on random weights: the grammar's mask alone makes the answer parse (JSON, JSON schema,
forced tool calls), through the openai SDK including `.parse()`; unconstrained rows batched alongside are unchanged."""

from __future__ import annotations

import json
import threading

import openai
import pydantic
import pytest

import dsv3

MODEL = "tiny-test"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "member", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"enum": ["UTC", "CET"]}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_batch=8, max_queue=8, max_len=320)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def check_person(value: dict) -> None:
    assert set(value) == {"name", "age", "member", "role"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120 and isinstance(value["member"], bool)
    assert value["role"] in ("admin", "user", "guest")


def test_json_schema_answers_parse_on_random_weights(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(
        model=MODEL, messages=USER, response_format=fmt, n=4, temperature=1.0, seed=3, max_tokens=120
    )
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice
        check_person(json.loads(choice.message.content))
    # Greedy too, and streamed: the deltas join to the same JSON.
    greedy = client.chat.completions.create(
        model=MODEL, messages=USER, response_format=fmt, temperature=0, max_tokens=120
    )
    check_person(json.loads(greedy.choices[0].message.content))
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=USER, response_format=fmt, temperature=0, max_tokens=120, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy.choices[0].message.content


def test_sdk_parse_with_a_pydantic_model(client):
    class Verdict(pydantic.BaseModel):
        answer: bool
        confidence: int = pydantic.Field(ge=0, le=9)

    r = client.chat.completions.parse(model=MODEL, messages=USER, response_format=Verdict, temperature=0, max_tokens=60)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Verdict) and 0 <= parsed.confidence <= 9


def test_json_object_answer_is_an_object(client):
    r = client.chat.completions.create(
        model=MODEL, messages=USER, response_format={"type": "json_object"}, temperature=0, max_tokens=200, seed=1
    )
    choice = r.choices[0]
    if choice.finish_reason == "stop":  # the grammar ends the answer when the object closes
        assert isinstance(json.loads(choice.message.content), dict)
    else:  # cut by max_tokens: a prefix of an object
        assert choice.message.content.startswith("{")


def test_forced_tool_calls_parse_on_random_weights(client):
    for choice_arg, names in (
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What now?"}],
            tools=[WEATHER, TIME],
            tool_choice=choice_arg,
            n=3,
            temperature=1.0,
            seed=11,
            max_tokens=100,
        )
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            assert call.function.name in names
            args = json.loads(call.function.arguments)
            if call.function.name == "get_time":
                assert args["tz"] in ("UTC", "CET") and set(args) == {"tz"}
            else:
                assert set(args) == {"city", "days"} and 1 <= args["days"] <= 7
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=USER, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
        )
    assert e.value.param == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=USER, tool_choice="required")
    assert e.value.param == "tool_choice"


def test_unconstrained_rows_batched_with_constrained_ones_are_unchanged(model, client, tokenizer):
    messages = [{"role": "user", "content": "Plain text, please."}]
    ids = tokenizer.encode_chat(messages)
    want = [t for t in dsv3.generate(model, [ids], 24)[0] if t not in model.config.eos_token_ids]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    results = {}

    def constrained(i: int) -> None:
        r = client.chat.completions.create(
            model=MODEL, messages=USER, response_format=fmt, temperature=0, max_tokens=120
        )
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=constrained, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=24)
    for t in threads:
        t.join()
    assert plain.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)
    for text in results.values():
        check_person(json.loads(text))


def test_parallel_tool_calls_false_with_a_forced_call(client, server):
    # langchain-openai's with_structured_output(Schema, method="function_calling") sends the schema as the only
    # tool, tool_choice naming it and parallel_tool_calls false; bind_tools(tool_choice="any") may send it with
    # "required". A forced call is exactly one call, so false holds; with tool_choice auto nothing would hold it.
    for choice_arg in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Weather?"}],
            tools=[WEATHER],
            tool_choice=choice_arg,
            parallel_tool_calls=False,
            temperature=0,
            max_tokens=100,
        )
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city", "days"}
    plain = client.chat.completions.create(model=MODEL, messages=USER, parallel_tool_calls=False, max_tokens=2)
    assert plain.choices[0].message.tool_calls is None
    for extra in ({"tools": [WEATHER]}, {"tools": [WEATHER], "tool_choice": "auto"}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=USER, parallel_tool_calls=False, max_tokens=2, **extra)
        assert e.value.param == "parallel_tool_calls" and e.value.code == "unsupported"
    responses = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300).responses
    flat = {"type": "function", **WEATHER["function"]}
    forced = responses.create(
        model=MODEL,
        input="Weather?",
        tools=[flat],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        max_output_tokens=100,
        temperature=0,
    )
    (call,) = [item for item in forced.output if item.type == "function_call"]
    assert call.name == "get_weather" and forced.parallel_tool_calls is False
    with pytest.raises(openai.BadRequestError) as e:
        responses.create(model=MODEL, input="Weather?", tools=[flat], parallel_tool_calls=False, max_output_tokens=2)
    assert e.value.param == "parallel_tool_calls"
