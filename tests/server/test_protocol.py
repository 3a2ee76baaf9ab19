"""OpenAI wire types without a server: request checks, tool-call markup -> tool_calls, metrics text."""

from __future__ import annotations

import json
import re

import pytest
from pydantic import ValidationError

from dsv3.inference.engine import EngineStats
from dsv3.server.metrics import render_metrics
from dsv3.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ToolCallStream,
    assistant_message,
)
from dsv3.tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP


def call(name: str, args: dict) -> str:
    return f"{TOOL_CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{json.dumps(args)}\n```{TOOL_CALL_END}"


TWO_CALLS = (
    f"Let me check.{TOOL_CALLS_BEGIN}{call('get_weather', {'city': 'Paris'})}\n"
    f"{call('get_time', {'tz': 'CET'})}{TOOL_CALLS_END}"
)


def test_tool_call_markup_becomes_tool_calls():
    message, has_calls = assistant_message(TWO_CALLS, parse_tools=True)
    assert has_calls and message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert all(c.type == "function" and c.id.startswith("call_") for c in message.tool_calls)
    assert len({c.id for c in message.tool_calls}) == 2

    only_call, _ = assistant_message(TOOL_CALLS_BEGIN + call("f", {}) + TOOL_CALLS_END, parse_tools=True)
    assert only_call.content is None and only_call.tool_calls[0].function.arguments == "{}"


def test_malformed_or_unrequested_markup_stays_content():
    broken = f"x{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}f\n```json\nnot json\n```{TOOL_CALL_END}"
    for text, parse in ((broken, True), (TWO_CALLS, False), ("plain text", True)):
        message, has_calls = assistant_message(text, parse_tools=parse)
        assert not has_calls and message.content == text and message.tool_calls is None


@pytest.mark.parametrize("piece_len", [1, 3, 1000])
def test_tool_call_stream_holds_markup_back(piece_len):
    s = ToolCallStream()
    pieces = [TWO_CALLS[i : i + piece_len] for i in range(0, len(TWO_CALLS), piece_len)]
    streamed = "".join(s.push(p) for p in pieces)
    rest, calls = s.finish()
    assert streamed == "Let me check." and rest == ""
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]

    # A partial marker that never completes is released; malformed markup comes back as content.
    s = ToolCallStream()
    text = "a<｜tool▁calls" + "b"
    assert "".join(s.push(c) for c in text) + s.finish()[0] == text
    s = ToolCallStream()
    bad = f"hi{TOOL_CALLS_BEGIN}oops"
    assert s.push(bad) == "hi" and s.finish() == (f"{TOOL_CALLS_BEGIN}oops", [])


def test_request_checks():
    ok = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "stop": "x"})
    assert ok.prompts() == ["hi"] and ok.stop_strings() == ["x"] and ok.unsupported() is None
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]}).prompts() == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"model": "m", "prompt": "a", "n": 2, "echo": True}).unsupported() is None
    assert CompletionRequest.model_validate({"model": "m", "prompt": "a", "suffix": "b"}).unsupported()[0] == "suffix"
    bias = CompletionRequest.model_validate({"model": "m", "prompt": "a", "logit_bias": {"7": -100, "12": 2.5}})
    assert bias.bias_pairs() == ((7, -100.0), (12, 2.5))
    for bad in (
        {"prompt": "a"},
        {"model": "m", "prompt": 3},
        {"model": "m", "prompt": "a", "max_tokens": "5"},
        {"model": "m", "prompt": "a", "max_tokens": -1},
        {"model": "m", "prompt": "a", "temperature": 3},
        {"model": "m", "prompt": "a", "top_p": 0},
        {"model": "m", "prompt": [True]},
        {"model": "m", "prompt": "a", "logprobs": True},  # legacy logprobs is a count: true is not 1
        {"model": "m", "prompt": "a", "no_such_field": 1},
    ):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
    )
    assert chat.use_tools
    assert not chat.model_copy(update={"tool_choice": "none"}).use_tools
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})


def test_metrics_are_prometheus_text():
    stats = EngineStats(
        requests_total=5,
        requests_rejected=1,
        requests_finished={"stop": 2, "length": 2},
        requests_active=1,
        requests_queued=0,
        prompt_tokens=40,
        tokens_generated=77,
        tokens_per_second=12.5,
        batch_size=1,
        max_batch_size=3,
        cache_slots_in_use=1,
        cache_slots=4,
    )
    text = render_metrics(stats, {200: 4, 429: 1})
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) dsv3_\w+ .+", line)
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    assert samples["dsv3_requests_total"] == 5 and samples["dsv3_generated_tokens_total"] == 77
    assert samples["dsv3_generation_tokens_per_second"] == 12.5 and samples["dsv3_batch_size_max"] == 3
    assert samples['dsv3_requests_finished_total{reason="stop"}'] == 2
    assert samples['dsv3_http_responses_total{code="429"}'] == 1
    assert samples["dsv3_cache_slots_in_use"] == 1 and samples["dsv3_queue_depth"] == 0
