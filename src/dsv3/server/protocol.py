"""OpenAI's wire format: request and response types, and how generated text maps onto them.

Requests are validated strictly (a string where a number belongs is an error, not a coercion) and
unknown fields are ignored, as OpenAI does. Sampling fields left out or sent as null take OpenAI's
defaults. Features dsv3 does not implement (n > 1, logprobs, echo, penalties, best_of) are rejected
instead of silently ignored, so a client never gets an answer to a question it did not ask.

Tool calls: the model writes them in the DeepSeek-V3 markup (see `dsv3.tokenizer.TOOL_CALLS_BEGIN`);
`assistant_message` turns a finished text into an OpenAI message with `tool_calls`, and
`ToolCallStream` holds the markup back while streaming so it never leaks out as content.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..tokenizer import TOOL_CALLS_BEGIN, parse_tool_calls

# ---------------------------------------------------------------------------------------------------------------------
# Requests


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's, but vLLM's and SamplingParams'; 0 disables it
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first requested feature dsv3 does not serve, or None."""
        if self.n not in (None, 1):
            return "n", f"only n=1 is supported, got n={self.n}"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                return name, f"{name} is not supported"
        if self.logprobs not in (None, False):
            return "logprobs", "logprobs are not supported"
        return None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of not in (None, 1):
            return "best_of", "best_of is not supported"
        if self.suffix:
            return "suffix", "suffix is not supported"
        return super().unsupported()

    def single_prompt(self) -> str | list[int] | None:
        """The one prompt (a one-element batch is unwrapped), or None when several or none were sent."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return p
        return p[0] if len(p) == 1 else None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions; messages are checked by the tokenizer's `normalize_messages`."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)

    def unsupported(self) -> tuple[str, str] | None:
        if self.tool_choice not in (None, "auto", "none"):
            return "tool_choice", "tool_choice must be 'auto' or 'none'"
        return super().unsupported()

    @property
    def use_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"


# ---------------------------------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    """A /v1/completions answer; with `stream`, each chunk has this shape too (usage only on the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # a JSON object, as a string


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None

    def wire(self) -> dict[str, Any]:
        """The JSON object to send: a delta lists only the fields it carries, as OpenAI's do."""
        out = self.model_dump()
        for choice, model in zip(out["choices"], self.choices):
            choice["delta"] = model.delta.model_dump(exclude_none=True)
        return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv3"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------------------------------
# Text -> tool calls


def assistant_message(text: str, parse_tools: bool) -> tuple[ChatMessage, bool]:
    """The OpenAI message for a finished assistant text, and whether it holds tool calls.

    With `parse_tools`, well-formed V3 tool-call markup becomes `tool_calls` (content: the text before
    it, None when empty, as OpenAI sends); malformed markup stays in the content unchanged.
    """
    if parse_tools:
        content, calls = parse_tool_calls(text)
        if calls:
            return ChatMessage(content=content or None, tool_calls=[ToolCall(**c) for c in calls]), True
    return ChatMessage(content=text), False


class ToolCallStream:
    """Streaming side of `assistant_message`: `push(text)` returns what may be sent as content now.

    Text from the first TOOL_CALLS_BEGIN on is held back (and a trailing partial marker until the next
    push decides it); `finish()` returns (remaining content, tool calls) once generation has ended.
    """

    def __init__(self) -> None:
        self._pending = ""  # a possible start of the marker
        self._captured: str | None = None  # the text from the marker on

    def push(self, text: str) -> str:
        if self._captured is not None:
            self._captured += text
            return ""
        text = self._pending + text
        at = text.find(TOOL_CALLS_BEGIN)
        if at >= 0:
            self._pending, self._captured = "", text[at:]
            return text[:at]
        hold = next(
            (k for k in range(min(len(text), len(TOOL_CALLS_BEGIN) - 1), 0, -1) if text.endswith(TOOL_CALLS_BEGIN[:k])),
            0,
        )
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self._captured is None:
            return self._pending, []
        message, has_calls = assistant_message(self._captured, parse_tools=True)
        return ("", message.tool_calls or []) if has_calls else (self._captured, [])
