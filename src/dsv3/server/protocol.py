"""OpenAI's wire format: request and response types, and how generated text maps onto them.

Requests are validated strictly (a string where a number belongs is an error, not a coercion) and
an unknown field is refused, as OpenAI does. Sampling fields left out or sent as null take OpenAI's
defaults. Every field of OpenAI's request schemas is either honoured or, when it asks for something
dsv3 does not implement (suffix, audio, a reasoning effort...), refused with a 400 naming it, so a
client never gets an answer to a question it did not ask.

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
    # OpenAI answers an unknown field with 400 "Unrecognized request argument supplied"; so does dsv3, so
    # that a field this server does not know (a vendor extension, a typo) is never silently ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, the usage still comes once, at the end


_MAX_N = 16  # choices per request (n x prompts): each takes a cache slot


class SamplingRequest(_Strict):
    """Fields common to /v1/completions and /v1/chat/completions.

    Besides OpenAI's, vLLM's sampling extensions are honoured: top_k, min_p, repetition_penalty,
    ignore_eos, min_tokens. A field that would change the answer in a way dsv3 does not implement is
    accepted only at its no-op value (see `unsupported`).
    """

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo on /v1/completions (scoring)
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # not OpenAI's, but vLLM's and SamplingParams'; 0 and -1 disable it
    min_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=_MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(None, ge=0)
    user: str | None = None  # an end-user id for the caller's own records: no effect on the answer

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first requested feature dsv3 does not serve, or None."""
        return None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def bias_pairs(self) -> tuple[tuple[int, float], ...] | str:
        """logit_bias as (id, bias) pairs, or a message saying what is wrong with it."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                return (
                    f"logit_bias maps token ids (as strings of digits) to numbers in [-100, 100]; got {key!r}: {bias}"
                )
            pairs.append((int(key), float(bias)))
        return tuple(pairs)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: one prompt or a batch of prompts, each as text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)  # legacy: the number of alternatives (0: the token's alone)
    max_completion_tokens: int | None = Field(None, ge=0)  # the chat name, sent here by some benchmark clients

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1, self.n or 1):
            return "best_of", "best_of (ranking more samples than are returned) is not supported; use n"
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported"
        return super().unsupported()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, a single one as a batch of one."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# Chat fields that are accepted only at their no-op value: (field, what the value must be, message).
_CHAT_NOOP_ONLY = {
    "audio": (None, "audio output is not supported"),
    "function_call": (None, "function_call is deprecated and not supported; use tools and tool_choice"),
    "functions": (None, "functions is deprecated and not supported; use tools"),
    "moderation": (None, "moderation is not supported"),
    "prediction": (None, "predicted outputs are not supported"),
    "reasoning_effort": (None, "reasoning_effort is not supported: this is not a reasoning model"),
    "verbosity": (None, "verbosity is not supported"),
    "web_search_options": (None, "web search is not supported"),
    "store": ((None, False), "store is not supported: answers are not stored"),
    "service_tier": ((None, "auto", "default"), "only the default service_tier is served"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
}
# parallel_tool_calls=false ("at most one call") holds by construction when no tool can be called or when
# tool_choice forces one (its grammar writes exactly one call); with tool_choice auto nothing enforces it.
PARALLEL_TOOL_CALLS_MESSAGE = (
    "parallel_tool_calls=false is supported only with tool_choice 'required' or a named function "
    "(which make exactly one call) or without tools"
)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions; messages are checked by the tokenizer's `normalize_messages`."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    # Accepted with no effect on the answer: metadata and cache hints (prefix reuse is automatic).
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    # Accepted only at their no-op values (_CHAT_NOOP_ONLY).
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    moderation: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    store: Any = None
    parallel_tool_calls: Any = None
    service_tier: Any = None
    modalities: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        for name, (ok, message) in _CHAT_NOOP_ONLY.items():
            value = getattr(self, name)
            if value not in (ok if isinstance(ok, tuple) else (ok,)):
                return name, message
        if self.forced_tool() is False:
            return (
                "tool_choice",
                "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {...}}",
            )
        if self.forced_tool() is not None and not self.tools:
            return "tool_choice", "tool_choice forces a tool call, but no tools were given"
        if self.parallel_tool_calls not in (None, True) and (
            self.parallel_tool_calls is not False or (self.use_tools and self.forced_tool() is None)
        ):
            return "parallel_tool_calls", PARALLEL_TOOL_CALLS_MESSAGE
        kind = (self.response_format or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            return "response_format", f"response_format type must be text, json_object or json_schema; got {kind!r}"
        if kind == "json_schema" and not isinstance(
            (self.response_format.get("json_schema") or {}).get("schema"), dict
        ):
            return "response_format", "response_format json_schema needs json_schema.schema, a JSON schema object"
        if kind != "text" and self.forced_tool() is not None:
            return "response_format", "a JSON response_format and a forced tool call cannot be combined"
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    @property
    def use_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tool(self) -> str | bool | None:
        """What tool_choice forces: None (nothing), "" (a call to any tool), a function's name; False if malformed."""
        c = self.tool_choice
        if c in (None, "auto", "none"):
            return None
        if c == "required":
            return ""
        if (
            isinstance(c, dict)
            and c.get("type") == "function"
            and isinstance((c.get("function") or {}).get("name"), str)
        ):
            return c["function"]["name"]
        return False

    def json_schema(self) -> tuple[bool, dict[str, Any] | None]:
        """(whether the answer must be JSON, its schema or None for any object) from response_format."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return True, None
        if kind == "json_schema":
            return True, self.response_format["json_schema"]["schema"]
        return False, None


class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool = True  # the BOS, for a prompt
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


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


class CompletionLogprobs(BaseModel):
    """The legacy logprobs object: per token, its text, logprob, likeliest alternatives and text offset."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # None for the first prompt token (nothing predicts it)
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
