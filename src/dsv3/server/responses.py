"""POST /v1/responses: OpenAI's Responses API over the chat path (text in and out, instructions, function tools).

The request becomes chat messages (`instructions` the system prompt, `input` the turns, function
calls and their outputs the assistant's tool calls and tool messages) and is generated exactly as a
chat completion; the answer becomes a `response` object whose `output` holds one message item and
one `function_call` item per tool call. Streaming sends the typed events the openai SDK's
`responses.create(stream=True)` and `responses.stream()` read: response.created / in_progress,
output_item.added, content_part.added, output_text.delta..., the matching `.done` events, and
response.completed (or response.incomplete when max_output_tokens ran out).

Nothing is stored, so `previous_response_id`, `conversation` and `background` are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import Field

from ..errors import RequestError
from .protocol import PARALLEL_TOOL_CALLS_MESSAGE, ToolCall, ToolCallStream, _Strict, assistant_message, new_id

# Fields accepted only at these no-op values, and why the others are refused.
_NOOP_ONLY = {
    "previous_response_id": (None, "previous_response_id needs stored responses; this server stores none"),
    "conversation": (None, "conversations are not stored by this server"),
    "background": ((None, False), "background responses are not supported"),
    "reasoning": (None, "reasoning options are not supported: this is not a reasoning model"),
    "include": ((None, []), "include is not supported"),
    "prompt": (None, "prompt templates are not supported"),
    "max_tool_calls": (None, "max_tool_calls is not supported"),
    "truncation": ((None, "disabled"), "only truncation 'disabled' is supported"),
    "service_tier": ((None, "auto", "default"), "only the default service_tier is served"),
    "top_logprobs": ((None, 0), "top_logprobs is not supported on /v1/responses; use /v1/chat/completions"),
    "stream_options": (None, "stream_options is not supported on /v1/responses"),
    "moderation": (None, "moderation is not supported"),
    "image": (None, "image generation is not supported"),
    "access_programs": (None, "access_programs is not supported"),
    "context_management": (None, "context_management is not supported"),
    "background_options": (None, "background responses are not supported"),
}


class ResponsesRequest(_Strict):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    store: bool | None = None  # OpenAI's default is true; nothing is stored here either way
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    previous_response_id: Any = None
    conversation: Any = None
    background: Any = None
    reasoning: Any = None
    include: Any = None
    prompt: Any = None
    max_tool_calls: Any = None
    parallel_tool_calls: Any = None
    truncation: Any = None
    service_tier: Any = None
    top_logprobs: Any = None
    stream_options: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    context_management: Any = None
    background_options: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        for name, (ok, message) in _NOOP_ONLY.items():
            if getattr(self, name) not in (ok if isinstance(ok, tuple) else (ok,)):
                return name, message
        if self.chat_tool_choice() is False:
            return "tool_choice", "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}"
        forced = self.chat_tool_choice() not in (None, "auto", "none")
        if self.parallel_tool_calls not in (None, True) and (
            self.parallel_tool_calls is not False or (self.use_tools and not forced)
        ):
            return "parallel_tool_calls", PARALLEL_TOOL_CALLS_MESSAGE
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt.get("type") not in ("text", "json_object", "json_schema") or (
            fmt.get("type") == "json_schema" and not isinstance(fmt.get("schema"), dict)
        ):
            return "text", "text.format must be text, json_object or json_schema with a schema"
        if any(t.get("type") != "function" for t in self.tools or []):
            return "tools", "only function tools are supported"
        return None

    @property
    def use_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def chat_tool_choice(self) -> str | dict[str, Any] | None | bool:
        """tool_choice in the chat API's shape (the Responses API names a function flat); False if malformed."""
        c = self.tool_choice
        if c is None or c in ("auto", "none", "required"):
            return c
        if isinstance(c, dict) and c.get("type") == "function" and isinstance(c.get("name"), str):
            return {"type": "function", "function": {"name": c["name"]}}
        return False

    def chat_response_format(self) -> dict[str, Any] | None:
        """text.format in the chat API's response_format shape."""
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt["type"] == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "schema"), "schema": fmt["schema"]}}
        return {"type": fmt["type"]}

    def chat_tools(self) -> list[dict[str, Any]] | None:
        """The Responses API's flat function tools as chat tools ({"type", "function": {...}})."""
        if not self.use_tools:
            return None
        keys = ("name", "description", "parameters")
        return [{"type": "function", "function": {k: t[k] for k in keys if k in t}} for t in self.tools or []]

    def chat_messages(self) -> list[dict[str, Any]]:
        """`instructions` and `input` as chat messages; a malformed item is a RequestError."""
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*messages, {"role": "user", "content": self.input}]
        for n, item in enumerate(self.input):
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "assistant", "system", "developer"):
                    raise RequestError(f"input[{n}].role must be user, assistant, system or developer; got {role!r}")
                messages.append({"role": "system" if role == "developer" else role, "content": _text(item, n)})
            elif kind == "function_call":
                call = {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")},
                }
                if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
                    messages[-1].setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output")
                content = output if isinstance(output, str) else json.dumps(output)
                messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
            else:
                raise RequestError(f"input[{n}] has type {kind!r}; text messages and function calls are supported")
        return messages


def _text(item: dict[str, Any], n: int) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in ("input_text", "output_text", "text") for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"input[{n}].content must be a string or a list of text parts")


# ---------------------------------------------------------------------------------------------------------------------
# The response object


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = (
        [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" else []
    )
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": "fc_" + call.id.removeprefix("call_"),
        "call_id": call.id,
        "name": call.function.name,
        "arguments": call.function.arguments if status == "completed" else "",
        "status": status,
    }


class ResponseBuilder:
    """The `response` object of one request, in progress or finished."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.req, self.model = req, model
        self.id = new_id("resp")
        self.message_id = new_id("msg")
        self.created = int(time.time())

    def body(
        self,
        status: str,
        output: list[dict[str, Any]] | None = None,
        usage: tuple[int, int] | None = None,
        length_cut: bool = False,
    ) -> dict[str, Any]:
        req = self.req
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": output or [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if length_cut else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata or {},
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "text": req.text or {"format": {"type": "text"}},
            "truncation": "disabled",
            "store": False,
            "usage": None
            if usage is None
            else {
                "input_tokens": usage[0],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage[1],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage[0] + usage[1],
            },
        }

    def finished(self, text: str, finish_reason: str, usage: tuple[int, int]) -> dict[str, Any]:
        """The finished response for the whole generated `text`."""
        message, _ = assistant_message(text, self.req.use_tools)
        output = []
        if message.content or not message.tool_calls:
            output.append(_message_item(self.message_id, message.content or "", "completed"))
        output += [_call_item(c) for c in message.tool_calls or []]
        cut = finish_reason == "length"
        return self.body("incomplete" if cut else "completed", output, usage, cut)

    async def events(self, pieces: AsyncIterator[str], outcome: Any) -> AsyncIterator[str]:
        """The streamed events; `pieces` is the text as it becomes final, `outcome()` -> (finish_reason, usage)."""
        seq = 0

        def event(kind: str, **fields: Any) -> str:
            nonlocal seq
            seq += 1
            data = {"type": kind, "sequence_number": seq - 1, **fields}
            return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

        yield event("response.created", response=self.body("in_progress"))
        yield event("response.in_progress", response=self.body("in_progress"))
        tools = ToolCallStream() if self.req.use_tools else None
        where = dict(item_id=self.message_id, output_index=0, content_index=0)
        yield event(
            "response.output_item.added", output_index=0, item=_message_item(self.message_id, "", "in_progress")
        )
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", **where, part=part)
        text = ""
        async for piece in pieces:
            content = tools.push(piece) if tools is not None else piece
            if content:
                text += content
                yield event("response.output_text.delta", **where, delta=content, logprobs=[])
        calls: list[ToolCall] = []
        if tools is not None:
            rest, calls = tools.finish()
            if rest:
                text += rest
                yield event("response.output_text.delta", **where, delta=rest, logprobs=[])
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part={**part, "text": text})
        message = _message_item(self.message_id, text, "completed")
        yield event("response.output_item.done", output_index=0, item=message)
        output = [message]
        for i, call in enumerate(calls, start=1):
            item = _call_item(call, "in_progress")
            yield event("response.output_item.added", output_index=i, item=item)
            args = call.function.arguments
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=i, delta=args)
            yield event(
                "response.function_call_arguments.done",
                item_id=item["id"],
                output_index=i,
                arguments=args,
                name=call.function.name,
            )
            done = _call_item(call)
            yield event("response.output_item.done", output_index=i, item=done)
            output.append(done)
        finish_reason, usage = outcome()
        cut = finish_reason == "length" and not calls
        final = self.body("incomplete" if cut else "completed", output, usage, cut)
        yield event("response.incomplete" if cut else "response.completed", response=final)
