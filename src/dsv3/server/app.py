"""The OpenAI-compatible HTTP app: maps OpenAI JSON onto `Engine.submit` and the engine's tokens back.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both with `stream`),
`GET /health`, `GET /metrics`. Everything the model does happens in the engine's loop; the app only
tokenizes, checks limits, and detokenizes (StreamDecoder, then stop strings, then tool-call markup).

Every error is OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 400 for a bad
request, 401 without the API key (when one is set; /health and /metrics stay open for probes and
scrapers), 413 for a body over the limit, 429 when the engine's queue is full, 503 while shutting
down. A client that disconnects has its request cancelled, which frees its cache slot at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import RequestError
from ..inference.engine import CANCELLED, STOP, Engine, EngineClosedError, QueueFullError, RequestHandle
from ..inference.sampling import SamplingParams
from ..tokenizer import StopStringMatcher, StreamDecoder, Tokenizer
from .metrics import CONTENT_TYPE, render_metrics
from .protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    ToolCallDelta,
    ToolCallStream,
    Usage,
    assistant_message,
    new_id,
)

_R = TypeVar("_R", bound=BaseModel)
_log = logging.getLogger("dsv3.server")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds, so one client cannot exhaust memory or hold the engine for long."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the engine's max_len - 1
    max_tokens: int = 2048  # the largest max_tokens accepted; also the default for chat
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    # Connection limits (applied by `server.http.uvicorn_config`; see docs/reliability.md).
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris)
    body_timeout_s: float = 30.0  # its body within this after the headers (408 otherwise)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections; past it new requests get 503


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with this HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 408:  # the rest of the body may still be on its way: this connection cannot be reused
            headers = {"Connection": "close"}
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    model_name: str,
    api_key: str | None = None,
    limits: ServerLimits = ServerLimits(),
    allow_special_tokens_in_content: bool = False,
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; the caller owns (and closes) the engine.

    Special-token text in chat messages is encoded as plain text unless `allow_special_tokens_in_content`
    (trusted clients only: it lets a message forge turns).
    """
    app = FastAPI(title="dsv3", description="OpenAI-compatible DeepSeek-V3 server", docs_url=None, redoc_url=None)
    responses: Counter[int] = Counter()
    created = int(time.time())
    max_prompt = limits.max_prompt_tokens if limits.max_prompt_tokens is not None else engine.max_len - 1
    app.add_middleware(_CountResponses, counter=responses)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type_=kind).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()

    expected_key = api_key.encode("utf-8") if api_key is not None else b""

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        # Header values are bytes on the wire (starlette decodes them as latin-1): a UTF-8 key is compared as
        # the bytes the client sent. The scheme is case-insensitive (RFC 9110).
        scheme, _, token = request.headers.get("authorization", "").encode("latin-1").strip().partition(b" ")
        token_ok = hmac.compare_digest(token.strip(), expected_key)
        if not (token_ok and scheme.lower() == b"bearer"):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def parse(request: Request, kind: type[_R]) -> _R:
        body = await _read_body(request, limits.max_body_bytes, limits.body_timeout_s)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
            raise ApiError(400, f"the body is not valid JSON: {type(e).__name__}: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        where = _lone_surrogate(data)
        if where is not None:
            raise ApiError(
                400,
                f"invalid '{'.'.join(map(str, where))}': the string holds a lone UTF-16 surrogate (not valid Unicode)",
                param=str(where[0]),
                code="invalid_value",
            )
        try:
            return kind.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            param = str(first["loc"][0]) if first["loc"] else None
            where = ".".join(str(x) for x in first["loc"])
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise ApiError(
                400,
                f"invalid '{where}': {first['msg']}{more}",
                param=param,
                code="missing_field" if first["type"] == "missing" else "invalid_value",
            ) from None

    def check(req: SamplingRequest) -> None:
        if req.model != model_name:
            raise ApiError(
                400,
                f"model {req.model!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )
        problem = req.unsupported()
        if problem is not None:
            raise ApiError(400, problem[1], param=problem[0], code="unsupported")
        stops = req.stop_strings()
        if len(stops) > limits.max_stop_strings or any(len(s) > limits.max_stop_chars for s in stops):
            raise ApiError(
                400,
                f"at most {limits.max_stop_strings} stop strings of up to {limits.max_stop_chars} characters each",
                param="stop",
            )

    def submit(
        req: SamplingRequest, ids: list[int], requested: int | None, default: int, prompt_param: str
    ) -> RequestHandle:
        if not ids:
            raise ApiError(400, "the prompt is empty", param=prompt_param)
        if len(ids) > max_prompt:
            raise ApiError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        room = engine.max_len - len(ids)
        if requested is None:
            max_new = min(default, limits.max_tokens, room)
        elif requested > limits.max_tokens:
            raise ApiError(
                400, f"max_tokens is {requested}; this server allows at most {limits.max_tokens}", param="max_tokens"
            )
        elif requested > room:
            raise ApiError(
                400,
                f"this model's context is {engine.max_len} tokens, but {len(ids)} prompt tokens "
                f"+ max_tokens {requested} were requested",
                param="max_tokens",
                code="context_length_exceeded",
            )
        else:
            max_new = requested
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
        )
        try:
            return engine.submit(ids, params, max_new_tokens=max_new, seed=req.seed)
        except QueueFullError as e:
            raise ApiError(429, str(e), code="queue_full", type_="rate_limit_error") from None
        except EngineClosedError as e:
            raise ApiError(503, str(e), type_="server_error") from None
        except RequestError as e:
            raise ApiError(400, str(e), param=prompt_param) from None

    # --- routes ------------------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(engine.stats(), responses), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(ModelList(data=[ModelCard(id=model_name, created=created)]).model_dump())

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> JSONResponse:
        authorize(request)
        if name != model_name:
            raise ApiError(
                404, f"model {name!r} does not exist", param="model", code="model_not_found", type_="not_found_error"
            )
        return JSONResponse(ModelCard(id=model_name, created=created).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        req = await parse(request, CompletionRequest)
        check(req)
        prompt = req.single_prompt()
        if prompt is None:
            raise ApiError(400, "send exactly one prompt per request", param="prompt")
        # BOS first, as the model was trained; a prompt given as ids is taken as is.
        try:
            ids = await run_in_threadpool(tokenizer.encode, prompt) if isinstance(prompt, str) else list(prompt)
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt") from None
        handle = submit(req, ids, req.max_tokens, default=16, prompt_param="prompt")  # 16: OpenAI's default
        text = _TextOutput(tokenizer, handle, req.stop_strings())
        rid = new_id("cmpl")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_chunks(rid, model_name, handle, text, usage))
        body = await _collect(request, handle, text)
        return JSONResponse(
            Completion(
                id=rid,
                model=model_name,
                choices=[CompletionChoice(text=body, finish_reason=text.finish_reason)],
                usage=Usage.of(len(handle.prompt), len(handle.tokens)),
            ).model_dump()
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = await parse(request, ChatCompletionRequest)
        check(req)
        try:
            ids = await run_in_threadpool(
                tokenizer.encode_chat,
                req.messages,
                req.tools if req.use_tools else None,
                special_tokens_in_content=allow_special_tokens_in_content,
            )
        except RequestError as e:
            raise ApiError(400, str(e), param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        handle = submit(req, ids, requested, default=limits.max_tokens, prompt_param="messages")
        text = _TextOutput(tokenizer, handle, req.stop_strings())
        rid = new_id("chatcmpl")
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_chat_chunks(rid, model_name, handle, text, req.use_tools, usage))
        body = await _collect(request, handle, text)
        message, has_calls = assistant_message(body, req.use_tools)
        return JSONResponse(
            ChatCompletion(
                id=rid,
                model=model_name,
                choices=[ChatChoice(message=message, finish_reason="tool_calls" if has_calls else text.finish_reason)],
                usage=Usage.of(len(handle.prompt), len(handle.tokens)),
            ).model_dump()
        )

    return app


# ---------------------------------------------------------------------------------------------------------------------
# Tokens -> text


class _TextOutput:
    """One request's text: the engine's tokens through StreamDecoder and StopStringMatcher.

    The stop id that ends a request is not text. A stop string cancels the request (freeing its slot
    at once) and is cut from the text, with finish_reason "stop".
    """

    def __init__(self, tokenizer: Tokenizer, handle: RequestHandle, stops: list[str]) -> None:
        self.handle = handle
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.matcher = StopStringMatcher(stops)

    async def pieces(self) -> AsyncIterator[str]:
        """Text as it becomes final; raises ApiError if the engine failed or dropped the request."""
        h = self.handle
        try:
            async with aclosing(h.__aiter__()) as tokens:
                async for token in tokens:
                    if token in h.stop_token_ids:
                        continue
                    piece, stopped = self.matcher.push(self.decoder.push(token))
                    if piece:
                        yield piece
                    if stopped:
                        h.cancel(STOP)  # frees the slot now; counted as a stop, not a cancellation
                        return
        except RequestError as e:
            raise ApiError(500, str(e), type_="server_error") from None
        if h.finish_reason == CANCELLED:
            raise ApiError(503, "the request was cancelled: the server is shutting down", type_="server_error")
        piece, _ = self.matcher.push(self.decoder.flush())
        piece += self.matcher.flush()
        if piece:
            yield piece

    @property
    def finish_reason(self) -> str:
        return "stop" if self.matcher.stopped or self.handle.finish_reason == STOP else "length"


async def _collect(request: Request, handle: RequestHandle, text: _TextOutput) -> str:
    """The whole text of a non-streamed answer; if the client disconnects first, cancel the request."""

    async def read_all() -> str:
        return "".join([piece async for piece in text.pieces()])

    reader = asyncio.ensure_future(read_all())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not reader.done():
            handle.cancel()
            reader.cancel()
        watcher.cancel()
    if not reader.done() or reader.cancelled():
        raise ApiError(499, "client closed the request")  # nobody reads this; it is counted in /metrics
    return reader.result()


async def _disconnected(request: Request) -> None:
    # After the body is read, the server's next message for this request is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body, or ApiError 413 past `limit` bytes (read on and discarded, so the client sees the 413),
    or 408 when it has not all arrived within `timeout_s` (a slow-body client holds no handler for long)."""
    too_big = ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > 64 * limit:
        raise too_big  # not worth draining: close the connection instead
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > 64 * limit:
                    break
    except ClientDisconnect:
        raise ApiError(499, "client closed the request") from None
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    if size > limit:
        raise too_big
    return b"".join(chunks)


def _lone_surrogate(data: Any) -> list[str | int] | None:
    """The path (keys and indices) of the first string in `data` holding a lone UTF-16 surrogate, or None.

    JSON's "\\ud800" escapes decode to such strings; they are not text (they cannot be encoded as UTF-8,
    so the tokenizer and the JSON answer would fail on them), so the request is refused naming the field.
    """
    stack: list[tuple[list[str | int], Any]] = [([], data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return path or ["body"]
        elif isinstance(value, dict):
            for k in reversed(list(value)):
                if _SURROGATE.search(k):
                    return [*path, "<key>"] if path else ["body"]
                stack.append(([*path, k], value[k]))
        elif isinstance(value, list):
            stack.extend(([*path, i], v) for i, v in reversed(list(enumerate(value))))
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


# ---------------------------------------------------------------------------------------------------------------------
# Server-sent events


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


_DONE = "data: [DONE]\n\n"


async def _completion_chunks(
    rid: str, model: str, handle: RequestHandle, text: _TextOutput, usage: bool
) -> AsyncIterator[str]:
    def chunk(piece: str, finish: str | None = None) -> str:
        return _event(
            Completion(id=rid, model=model, choices=[CompletionChoice(text=piece, finish_reason=finish)]).model_dump(
                exclude={"usage"}
            )
        )

    try:
        async for piece in text.pieces():
            yield chunk(piece)
        yield chunk("", text.finish_reason)
        if usage:
            yield _event(
                Completion(
                    id=rid, model=model, choices=[], usage=Usage.of(len(handle.prompt), len(handle.tokens))
                ).model_dump()
            )
        yield _DONE
    except ApiError as e:
        yield _event(json.loads(e.response().body))
    finally:
        handle.cancel()  # no-op when finished; frees the slot when the client went away mid-stream


async def _chat_chunks(
    rid: str, model: str, handle: RequestHandle, text: _TextOutput, use_tools: bool, usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: ChatDelta, finish: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return _event(ChatCompletionChunk(id=rid, model=model, choices=[choice]).wire())

    tools = ToolCallStream() if use_tools else None
    try:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for piece in text.pieces():
            content = tools.push(piece) if tools is not None else piece
            if content:
                yield chunk(ChatDelta(content=content))
        calls = []
        if tools is not None:
            rest, calls = tools.finish()
            if rest:
                yield chunk(ChatDelta(content=rest))
            if calls:
                yield chunk(
                    ChatDelta(
                        tool_calls=[ToolCallDelta(index=i, id=c.id, function=c.function) for i, c in enumerate(calls)]
                    )
                )
        yield chunk(ChatDelta(), "tool_calls" if calls else text.finish_reason)
        if usage:
            yield _event(
                ChatCompletionChunk(
                    id=rid, model=model, choices=[], usage=Usage.of(len(handle.prompt), len(handle.tokens))
                ).wire()
            )
        yield _DONE
    except ApiError as e:
        yield _event(json.loads(e.response().body))
    finally:
        handle.cancel()


# ---------------------------------------------------------------------------------------------------------------------
# Middleware


class _CountResponses:
    """Counts responses by status code for /metrics (an unhandled exception counts as 500)."""

    def __init__(self, app: ASGIApp, counter: Counter[int]) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def counting_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter[message["status"]] += 1
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception as exc:
            if started:  # mid-stream: nothing else can be sent; the server closes the connection
                self.counter[500] += 1
                raise
            # Answered here, not by starlette's ServerErrorMiddleware, which re-raises after answering and
            # so makes uvicorn drop the keep-alive connection under the client's next pooled request.
            _log.error("internal error answering %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            response = ApiError(500, f"internal error: {type(exc).__name__}", type_="server_error").response()
            await response(scope, receive, counting_send)
