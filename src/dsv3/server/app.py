"""The OpenAI-compatible HTTP app: maps OpenAI JSON onto `Engine.submit` and the engine's tokens back.

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `POST /v1/responses`
(all with `stream`), vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, `GET /health`,
`GET /metrics`; any other path is a 404 that lists these. Everything the model does happens in the engine's
loop; the app only tokenizes, checks limits, and detokenizes (StreamDecoder, then stop strings, then tool-call
markup).

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
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import RequestError
from ..inference.engine import (
    CANCELLED,
    STOP,
    Engine,
    EngineClosedError,
    QueueFullError,
    RequestHandle,
    TokenConstraint,
    TokenLogprob,
)
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
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    ToolCallDelta,
    ToolCallStream,
    TopLogprob,
    Usage,
    assistant_message,
    new_id,
)
from .responses import ResponseBuilder, ResponsesRequest
from .structured import Grammar

_R = TypeVar("_R", bound=BaseModel)
_log = logging.getLogger("dsv3.server")


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds, so one client cannot exhaust memory or hold the engine for long."""

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the engine's max_len - 1
    max_tokens: int | None = None  # the largest max_tokens accepted (None: what the context leaves)
    default_max_tokens: int | None = None  # chat's default (None: the rest of the context, up to max_tokens)
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
        if exc.status_code == 404:
            routes = ", ".join(
                f"{method} {r.path}" for r in app.routes if isinstance(r, APIRoute) for method in sorted(r.methods)
            )
            message = f"no route {request.method} {request.url.path}; this server answers {routes}"
            return ApiError(404, message, code="unknown_route", type_="not_found_error").response()
        return ApiError(exc.status_code, str(exc.detail)).response()

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
            if first["type"] == "extra_forbidden":
                raise ApiError(
                    400, f"unrecognized request argument supplied: {where}{more}", param=param, code="unknown_field"
                ) from None
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

    def sampling_params(req: SamplingRequest) -> SamplingParams:
        bias = req.bias_pairs()
        if isinstance(bias, str):
            raise ApiError(400, bias, param="logit_bias")
        vocab = engine.model.config.vocab_size
        if any(t >= vocab for t, _ in bias):
            raise ApiError(400, f"logit_bias names a token id outside [0, {vocab})", param="logit_bias")
        return SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=max(req.top_k or 0, 0),
            top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=bias,
            min_tokens=req.min_tokens or 0,
        )

    def budget(ids: list[int], requested: int | None, default: int | None, prompt_param: str) -> int:
        """The request's max new tokens; ApiError when the prompt or the budget does not fit."""
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
        cap = room if limits.max_tokens is None else min(room, limits.max_tokens)
        if requested is None:
            return cap if default is None else min(default, cap)
        if limits.max_tokens is not None and requested > limits.max_tokens:
            raise ApiError(
                400, f"max_tokens is {requested}; this server allows at most {limits.max_tokens}", param="max_tokens"
            )
        if requested > room:
            raise ApiError(
                400,
                f"this model's context is {engine.max_len} tokens, but {len(ids)} prompt tokens "
                f"+ max_tokens {requested} were requested",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def submit_all(
        req: SamplingRequest,
        prompts: list[list[int]],
        max_new: list[int],
        prompt_param: str,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        constraint: Callable[[], TokenConstraint] | None = None,
    ) -> list[RequestHandle]:
        """n requests per prompt (choice index = prompt index * n + i; a seed s gives choice i seed s + i).

        If one cannot be queued, those already queued are cancelled and the error is raised.
        """
        params = sampling_params(req)
        n = req.n or 1
        handles: list[RequestHandle] = []
        try:
            for ids, budget_ in zip(prompts, max_new):
                for i in range(n):
                    handles.append(
                        engine.submit(
                            ids,
                            params,
                            max_new_tokens=budget_,
                            stop_token_ids=[] if req.ignore_eos else None,
                            seed=None if req.seed is None else _choice_seed(req.seed, i),
                            logprobs=logprobs,
                            prompt_logprobs=prompt_logprobs,
                            constraint=constraint() if constraint is not None else None,
                        )
                    )
        except BaseException as e:
            for h in handles:
                h.cancel()
            if isinstance(e, QueueFullError):
                raise ApiError(429, str(e), code="queue_full", type_="rate_limit_error") from None
            if isinstance(e, EngineClosedError):
                raise ApiError(503, str(e), type_="server_error") from None
            if isinstance(e, RequestError):
                raise ApiError(400, str(e), param=prompt_param) from None
            raise
        return handles

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
        prompts = req.prompts()
        if not prompts:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompts) * (req.n or 1) > engine.max_batch + engine.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n or 1} is more than this server holds", param="n")
        # BOS first, as the model was trained; a prompt given as ids is taken as is.
        try:
            ids = [await run_in_threadpool(tokenizer.encode, p) if isinstance(p, str) else list(p) for p in prompts]
        except RequestError as e:
            raise ApiError(400, str(e), param="prompt") from None
        requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        if requested == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 generates nothing; it is allowed only with echo (scoring)", "max_tokens")
        max_new = [budget(x, requested, 16, "prompt") for x in ids]  # 16: OpenAI's default
        echo_logprobs = req.logprobs if req.echo else None
        handles = submit_all(req, ids, max_new, "prompt", logprobs=req.logprobs, prompt_logprobs=echo_logprobs)
        n = req.n or 1
        outputs = [
            _TextOutput(
                tokenizer,
                h,
                req.stop_strings(),
                echo=(
                    prompts[k // n]
                    if isinstance(prompts[k // n], str)
                    else tokenizer.decode(ids[k // n], skip_special_tokens=True)
                )
                if req.echo
                else None,
            )
            for k, h in enumerate(handles)
        ]
        usage = Usage.of(sum(len(x) for x in ids), 0)
        rid = new_id("cmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(_completion_chunks(rid, model_name, outputs, usage if include_usage else None, req.logprobs))
        texts = await _collect(request, outputs)
        choices = [
            CompletionChoice(
                index=k,
                text=text,
                finish_reason=out.finish_reason,
                logprobs=_legacy_logprobs(tokenizer, out, pieces) if req.logprobs is not None else None,
            )
            for k, (out, (text, pieces)) in enumerate(zip(outputs, texts))
        ]
        return JSONResponse(
            Completion(id=rid, model=model_name, choices=choices, usage=_usage(usage, handles)).model_dump()
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        req = await parse(request, ChatCompletionRequest)
        check(req)
        if (req.n or 1) > engine.max_batch + engine.max_queue:
            raise ApiError(400, f"n={req.n} is more than this server holds", param="n")
        # OpenAI's "developer" role is the system prompt under its newer name.
        messages = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in req.messages
        ]
        try:
            ids = await run_in_threadpool(
                tokenizer.encode_chat,
                messages,
                req.tools if req.use_tools else None,
                special_tokens_in_content=allow_special_tokens_in_content,
            )
        except RequestError as e:
            raise ApiError(400, str(e), param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_new = budget(ids, requested, limits.default_max_tokens, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        grammar = await _grammar_for(tokenizer, req)
        constraint = grammar.constraint if grammar is not None else None
        handles = submit_all(req, [ids], [max_new], "messages", logprobs=top, constraint=constraint)
        outputs = [_TextOutput(tokenizer, h, req.stop_strings()) for h in handles]
        usage = Usage.of(len(ids), 0)
        rid = new_id("chatcmpl")
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(
                _chat_chunks(rid, model_name, outputs, req.use_tools, usage if include_usage else None, top is not None)
            )
        texts = await _collect(request, outputs)
        choices = []
        for k, (out, (text, pieces)) in enumerate(zip(outputs, texts)):
            message, has_calls = assistant_message(text, req.use_tools)
            choices.append(
                ChatChoice(
                    index=k,
                    message=message,
                    finish_reason="tool_calls" if has_calls else out.finish_reason,
                    logprobs=_chat_logprobs(tokenizer, out, pieces) if top is not None else None,
                )
            )
        return JSONResponse(
            ChatCompletion(id=rid, model=model_name, choices=choices, usage=_usage(usage, handles)).model_dump()
        )

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        authorize(request)
        req = await parse(request, ResponsesRequest)
        if req.model != model_name:
            raise ApiError(
                400,
                f"model {req.model!r} does not exist; this server serves {model_name!r}",
                "model",
                "model_not_found",
            )
        problem = req.unsupported()
        if problem is not None:
            raise ApiError(400, problem[1], param=problem[0], code="unsupported")
        try:
            messages = req.chat_messages()
            ids = await run_in_threadpool(tokenizer.encode_chat, messages, req.chat_tools())
        except RequestError as e:
            raise ApiError(400, str(e), param="input") from None
        chat = ChatCompletionRequest.model_construct(
            model=req.model,
            messages=messages,
            temperature=req.temperature,
            top_p=req.top_p,
            tools=req.chat_tools(),
            tool_choice=req.chat_tool_choice(),
            response_format=req.chat_response_format(),
        )
        problem = chat.unsupported()  # a forced call without tools, JSON and a forced call together
        if problem is not None:
            raise ApiError(400, problem[1], param="text" if problem[0] == "response_format" else problem[0])
        max_new = budget(ids, req.max_output_tokens, limits.default_max_tokens, "input")
        grammar = await _grammar_for(tokenizer, chat)
        constraint = grammar.constraint if grammar is not None else None
        (handle,) = submit_all(chat, [ids], [max_new], "input", constraint=constraint)
        out = _TextOutput(tokenizer, handle, [])
        builder = ResponseBuilder(req, model_name)
        if req.stream:

            async def texts() -> AsyncIterator[str]:
                async for piece in out.pieces():
                    yield piece.text

            async def events() -> AsyncIterator[str]:
                try:
                    async for event in builder.events(
                        texts(), lambda: (out.finish_reason, (len(ids), len(handle.tokens)))
                    ):
                        yield event
                except ApiError as e:
                    yield f"event: error\ndata: {json.dumps({'type': 'error', **json.loads(e.response().body)['error']})}\n\n"
                finally:
                    handle.cancel()

            return _sse(events())
        ((text, _),) = await _collect(request, [out])
        return JSONResponse(builder.finished(text, out.finish_reason, (len(ids), len(handle.tokens))))

    # vLLM's tokenizer endpoints (no /v1 prefix, as vLLM serves them).

    def require_served_model(name: str | None) -> None:
        """The tokenizer endpoints' `model` field is optional; when given it must name the served model (400)."""
        if name is not None and name != model_name:
            raise ApiError(400, f"model {name!r} does not exist", param="model", code="model_not_found")

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        authorize(request)
        req = await parse(request, TokenizeRequest)
        require_served_model(req.model)
        try:
            if req.messages is not None:
                ids = await run_in_threadpool(tokenizer.encode_chat, req.messages, req.tools, req.add_generation_prompt)
            elif req.prompt is not None:
                ids = await run_in_threadpool(tokenizer.encode, req.prompt, req.add_special_tokens)
            else:
                raise ApiError(400, "send a prompt or messages", param="prompt", code="missing_field")
        except RequestError as e:
            raise ApiError(400, str(e), param="messages" if req.messages is not None else "prompt") from None
        body: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids, "token_strs": None}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.decode([t]) for t in ids]
        return JSONResponse(body)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        authorize(request)
        req = await parse(request, DetokenizeRequest)
        require_served_model(req.model)
        vocab = engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": await run_in_threadpool(tokenizer.decode, req.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        # vLLM's; lm-eval's tokenizer_backend=remote needs it (the special tokens' text, the chat template) and
        # then tokenizes through /tokenize, so a client needs no copy of the tokenizer files.
        authorize(request)
        return JSONResponse(
            {
                "bos_token": tokenizer.bos_token,
                "eos_token": tokenizer.eos_token,
                "pad_token": tokenizer.pad_token,
                "add_bos_token": tokenizer.add_bos_token,
                "chat_template": tokenizer.chat_template,
                "model_max_length": engine.max_len,
            }
        )

    return app


# ---------------------------------------------------------------------------------------------------------------------
# Structured outputs


async def _grammar_for(tokenizer: Tokenizer, req: ChatCompletionRequest) -> Grammar | None:
    """The grammar a chat request's response_format or tool_choice asks for (compiled off the event loop), or None."""
    forced = req.forced_tool()
    wants_json, schema = req.json_schema()
    if forced is None and not wants_json:
        return None
    from .structured import json_grammar, tool_call_grammar  # llguidance: only when a request needs it

    try:
        if forced is not None:
            return await run_in_threadpool(tool_call_grammar, tokenizer, req.tools or [], forced or None)
        return await run_in_threadpool(json_grammar, tokenizer, schema)
    except RequestError as e:
        raise ApiError(400, str(e), param="tool_choice" if forced is not None else "response_format") from None
    except ImportError:
        raise ApiError(
            400,
            "structured outputs need llguidance on the server (pip install 'dsv3[serve]')",
            param="tool_choice" if forced is not None else "response_format",
            code="unsupported",
        ) from None


# ---------------------------------------------------------------------------------------------------------------------
# Tokens -> text


def _choice_seed(seed: int, i: int) -> int:
    """Choice i's seed: seed + i, wrapped into the range torch.Generator takes."""
    return seed + i if seed + i < 2**64 else seed + i - 2**64


def _usage(prompt: Usage, handles: list[RequestHandle]) -> Usage:
    """Prompt tokens counted once per prompt (not per choice), completion tokens over every choice."""
    return Usage.of(prompt.prompt_tokens, sum(len(h.tokens) for h in handles))


@dataclass
class _Piece:
    """Text that became final, and the indices (into the handle's tokens) of the tokens that made it."""

    text: str
    tokens: list[int]


class _TextOutput:
    """One choice's text: the engine's tokens through StreamDecoder and StopStringMatcher.

    The stop id that ends a request is not text (nor a logprobs entry). A stop string cancels the
    request (freeing its slot at once) and is cut from the text, with finish_reason "stop". `echo` is
    the prompt's text, put before the completion (/v1/completions' echo).
    """

    def __init__(self, tokenizer: Tokenizer, handle: RequestHandle, stops: list[str], echo: str | None = None) -> None:
        self.handle = handle
        self.echo = echo
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
        self.matcher = StopStringMatcher(stops)

    async def pieces(self) -> AsyncIterator[_Piece]:
        """Text as it becomes final; raises ApiError if the engine failed or dropped the request."""
        h = self.handle
        pending: list[int] = []
        try:
            async with aclosing(h.__aiter__()) as tokens:
                index = -1
                async for token in tokens:
                    index += 1
                    if token in h.stop_token_ids:
                        continue
                    pending.append(index)
                    piece, stopped = self.matcher.push(self.decoder.push(token))
                    if piece:
                        yield _Piece(piece, pending)
                        pending = []
                    if stopped:
                        h.cancel(STOP)  # frees the slot now; counted as a stop, not a cancellation
                        if pending:
                            yield _Piece("", pending)
                        return
        except RequestError as e:
            raise ApiError(500, str(e), type_="server_error") from None
        if h.finish_reason == CANCELLED:
            raise ApiError(503, "the request was cancelled: the server is shutting down", type_="server_error")
        piece, _ = self.matcher.push(self.decoder.flush())
        piece += self.matcher.flush()
        if piece or pending:
            yield _Piece(piece, pending)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.matcher.stopped or self.handle.finish_reason == STOP else "length"


async def _collect(request: Request, outputs: list[_TextOutput]) -> list[tuple[str, list[_Piece]]]:
    """Each choice's whole text and pieces; if the client disconnects first, cancel every request."""

    async def read_all(out: _TextOutput) -> tuple[str, list[_Piece]]:
        pieces = [piece async for piece in out.pieces()]
        return (out.echo or "") + "".join(p.text for p in pieces), pieces

    reader = asyncio.ensure_future(asyncio.gather(*(read_all(out) for out in outputs)))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not reader.done():
            for out in outputs:
                out.handle.cancel()
            reader.cancel()
        watcher.cancel()
    if not reader.done() or reader.cancelled():
        raise ApiError(499, "client closed the request")  # nobody reads this; it is counted in /metrics
    try:
        return reader.result()
    finally:
        for out in outputs:  # one choice failed: the others are not waited for
            out.handle.cancel()


# ---------------------------------------------------------------------------------------------------------------------
# Logprobs


def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def _legacy_logprobs(
    tokenizer: Tokenizer, out: _TextOutput, pieces: list[_Piece], with_prompt: bool = True, start: int | None = None
) -> CompletionLogprobs:
    """/v1/completions' logprobs object for these pieces (first, with echo and `with_prompt`, the prompt's tokens).

    `text_offset` is where each token's text starts in the choice's text: for a prompt token, the sum
    of the lengths of the texts of the tokens before it (special tokens count as empty, as vLLM does);
    for a generated token, the same within its piece, from the piece's start (`start`: where the first
    piece starts; by default, right after the echo).
    """
    h = out.handle
    result = CompletionLogprobs()

    def add(token: int, lp: TokenLogprob | None, at: int) -> int:
        result.tokens.append(_token_text(tokenizer, token))
        result.token_logprobs.append(None if lp is None else lp.logprob)
        result.top_logprobs.append(None if lp is None else _top_dict(tokenizer, lp))
        result.text_offset.append(at)
        return at + len(tokenizer.decode([token], skip_special_tokens=True))

    if with_prompt and out.echo is not None:
        at = 0
        for token, lp in zip(h.prompt, h.prompt_scores or [None] * len(h.prompt)):
            at = add(token, lp, at)
    at = len(out.echo or "") if start is None else start
    for p in pieces:
        end, inside = at + len(p.text), at
        for i in p.tokens:
            inside = min(add(h.tokens[i], h.token_logprobs[i], inside), end)
        at = end
    return result


def _top_dict(tokenizer: Tokenizer, lp: TokenLogprob) -> dict[str, float]:
    """The legacy {token text: logprob} of the alternatives; ids with the same text keep the likeliest's value."""
    top: dict[str, float] = {}
    for t, v in lp.top:  # best first
        top.setdefault(_token_text(tokenizer, t), v)
    return top


def _chat_logprobs(tokenizer: Tokenizer, out: _TextOutput, pieces: list[_Piece]) -> ChatLogprobs:
    """Chat's logprobs object (`content`: one entry per generated token) for these pieces."""

    def top(token: int, logprob: float) -> TopLogprob:
        text = _token_text(tokenizer, token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    h = out.handle
    content = []
    for p in pieces:
        for i in p.tokens:
            lp = h.token_logprobs[i]
            head = top(h.tokens[i], lp.logprob)
            content.append(ChatTokenLogprob(**head.model_dump(), top_logprobs=[top(t, v) for t, v in lp.top]))
    return ChatLogprobs(content=content)


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


async def _merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """The events of several streams as they come (each stream's own order kept)."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for event in only:
                yield event
        return
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async with aclosing(stream) as events:
                async for event in events:
                    await queue.put(event)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            event = await queue.get()
            if event is None:
                running -= 1
            else:
                yield event
    finally:
        for t in tasks:
            t.cancel()


async def _completion_chunks(
    rid: str, model: str, outputs: list[_TextOutput], usage: Usage | None, logprobs: int | None
) -> AsyncIterator[str]:
    tokenizer = outputs[0].decoder.tokenizer

    def chunk(k: int, text: str, finish: str | None = None, lp: CompletionLogprobs | None = None) -> str:
        choice = CompletionChoice(index=k, text=text, finish_reason=finish, logprobs=lp)
        return _event(Completion(id=rid, model=model, choices=[choice]).model_dump(exclude={"usage"}))

    async def one(k: int, out: _TextOutput) -> AsyncIterator[str]:
        echoed = out.echo is None
        offset = len(out.echo or "")

        def echo_chunk() -> str:
            lp = _legacy_logprobs(tokenizer, out, []) if logprobs is not None else None
            return chunk(k, out.echo, lp=lp)

        async for piece in out.pieces():
            if not echoed:  # the prompt's logprobs are ready once the first token is
                yield echo_chunk()
                echoed = True
            lp = None
            if logprobs is not None:
                lp = _legacy_logprobs(tokenizer, out, [piece], with_prompt=False, start=offset)
            offset += len(piece.text)
            yield chunk(k, piece.text, lp=lp)
        if not echoed:
            yield echo_chunk()
        yield chunk(k, "", out.finish_reason)

    try:
        async for event in _merged([one(k, out) for k, out in enumerate(outputs)]):
            yield event
        if usage is not None:
            total = _usage(usage, [out.handle for out in outputs])
            yield _event(Completion(id=rid, model=model, choices=[], usage=total).model_dump())
        yield _DONE
    except ApiError as e:
        yield _event(json.loads(e.response().body))
    finally:
        for out in outputs:
            out.handle.cancel()  # no-op when finished; frees the slot when the client went away mid-stream


async def _chat_chunks(
    rid: str, model: str, outputs: list[_TextOutput], use_tools: bool, usage: Usage | None, logprobs: bool
) -> AsyncIterator[str]:
    tokenizer = outputs[0].decoder.tokenizer

    def chunk(k: int, delta: ChatDelta, finish: str | None = None, lp: ChatLogprobs | None = None) -> str:
        choice = ChatChunkChoice(index=k, delta=delta, finish_reason=finish, logprobs=lp)
        return _event(ChatCompletionChunk(id=rid, model=model, choices=[choice]).wire())

    async def one(k: int, out: _TextOutput) -> AsyncIterator[str]:
        tools = ToolCallStream() if use_tools else None
        yield chunk(k, ChatDelta(role="assistant", content=""))
        held: list[_Piece] = []  # pieces whose text the tool-call parser holds back: their logprobs wait too
        async for piece in out.pieces():
            content = tools.push(piece.text) if tools is not None else piece.text
            held.append(piece)
            if content or (logprobs and not tools):
                lp = _chat_logprobs(tokenizer, out, held) if logprobs else None
                held = []
                yield chunk(k, ChatDelta(content=content), lp=lp)
        calls = []
        if tools is not None:
            rest, calls = tools.finish()
            lp = _chat_logprobs(tokenizer, out, held) if logprobs and held else None
            if rest or lp is not None:
                yield chunk(k, ChatDelta(content=rest), lp=lp)
            if calls:
                yield chunk(
                    k,
                    ChatDelta(
                        tool_calls=[ToolCallDelta(index=i, id=c.id, function=c.function) for i, c in enumerate(calls)]
                    ),
                )
        yield chunk(k, ChatDelta(), "tool_calls" if calls else out.finish_reason)

    try:
        async for event in _merged([one(k, out) for k, out in enumerate(outputs)]):
            yield event
        if usage is not None:
            total = _usage(usage, [out.handle for out in outputs])
            yield _event(ChatCompletionChunk(id=rid, model=model, choices=[], usage=total).wire())
        yield _DONE
    except ApiError as e:
        yield _event(json.loads(e.response().body))
    finally:
        for out in outputs:
            out.handle.cancel()


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
