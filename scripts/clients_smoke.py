#!/usr/bin/env python
"""langchain-openai and the openai SDK against a running `dsv3 serve`: each call, what it returned, pass/fail.

Not part of the project's dependencies: run it with a Python that has `langchain-openai` (it brings
`openai` and `pydantic`), e.g. a separate virtual environment, against a server started elsewhere:

    dsv3 serve --port 8000 &
    python scripts/clients_smoke.py --url http://127.0.0.1:8000

Checks: ChatOpenAI `invoke` and `stream`; `bind_tools(..., tool_choice="any")` returns a tool call;
`with_structured_output(Model)` with `method="json_schema"` and `method="function_calling"` returns a
`Model`; the openai SDK's `chat.completions.parse(response_format=Model)` returns a parsed `Model`.
The structured answers must parse whatever the model is (the server decodes them under a grammar), so
the schemas bound their strings (`maxLength`): a weak model's string then cannot outrun `max_tokens`.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

PROMPT = "What does json.dumps do?"


class StdlibFunction(BaseModel):
    """A function of the Python standard library."""

    module: str = Field(description="the module that defines it", max_length=24)
    name: str = Field(description="the function's name", max_length=24)
    returns_value: bool = Field(description="whether it returns a value")


class LookUp(BaseModel):
    """Look up the documentation of a function of the Python standard library."""

    module: str = Field(max_length=24)
    name: str = Field(max_length=24)


def main(argv: list[str] | None = None) -> int:
    """Run every check against --url and print one line per check; 0 when all passed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (without /v1)")
    ap.add_argument("--model", default=None, help="the model id (default: the first of /v1/models)")
    ap.add_argument("--api-key", default="unused")
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args(argv)

    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key=args.api_key, max_retries=0, timeout=300)
    model = args.model or client.models.list().data[0].id
    chat = ChatOpenAI(
        base_url=f"{args.url}/v1",
        api_key=args.api_key,
        model=model,
        max_tokens=args.max_tokens,
        temperature=0,
        max_retries=0,
        timeout=300,
    )
    print(f"server {args.url}, model {model!r}, openai {openai.__version__}")

    def invoke() -> str:
        msg = chat.invoke(PROMPT)
        assert isinstance(msg.content, str) and msg.content, "empty answer"
        return f"{len(msg.content)} chars, usage {msg.usage_metadata}, text {msg.content[:60]!r}"

    def stream() -> str:
        chunks = [c.content for c in chat.stream(PROMPT)]
        text = "".join(chunks)
        assert len(chunks) > 1 and text, "not streamed"
        return f"{len(chunks)} chunks, {len(text)} chars, text {text[:60]!r}"

    def tool_call() -> str:
        msg = chat.bind_tools([LookUp], tool_choice="any").invoke(PROMPT)
        assert len(msg.tool_calls) >= 1, f"no tool call: {msg!r}"
        call = msg.tool_calls[0]
        assert call["name"] == "LookUp", call
        LookUp.model_validate(call["args"])
        return f"tool_calls {[{'name': c['name'], 'args': c['args']} for c in msg.tool_calls]}"

    def structured(method: str) -> Callable[[], str]:
        def run() -> str:
            got = chat.with_structured_output(StdlibFunction, method=method).invoke(PROMPT)
            assert isinstance(got, StdlibFunction), f"{type(got).__name__}: {got!r}"
            return repr(got)

        return run

    def sdk_parse() -> str:
        completion = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            response_format=StdlibFunction,
            max_tokens=args.max_tokens,
            temperature=0,
        )
        msg = completion.choices[0].message
        assert isinstance(msg.parsed, StdlibFunction), f"not parsed: {msg!r}"
        return f"{msg.parsed!r} (finish_reason {completion.choices[0].finish_reason})"

    checks: list[tuple[str, Callable[[], str]]] = [
        ("ChatOpenAI.invoke", invoke),
        ("ChatOpenAI.stream", stream),
        ('bind_tools(tool_choice="any")', tool_call),
        ('with_structured_output(method="json_schema")', structured("json_schema")),
        ('with_structured_output(method="function_calling")', structured("function_calling")),
        ("openai chat.completions.parse", sdk_parse),
    ]
    failed = 0
    for name, check in checks:
        t0 = time.perf_counter()
        try:
            result = check()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - report every check, whatever fails
            result, status = f"{type(e).__name__}: {e}", "FAILED"
            failed += 1
        print(f"{status:6} {name} ({time.perf_counter() - t0:.1f} s): {result}")
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
