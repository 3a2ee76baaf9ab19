"""Structured outputs by constrained decoding: JSON (any object, or a JSON schema) and forced tool calls.

A request's grammar is compiled by llguidance into a matcher over the tokenizer's ids; the engine asks
the matcher, at each step of that request alone, which ids may come next and masks the others out of
the row's logits before sampling (`inference.engine.TokenConstraint`). The text therefore parses
whatever the weights are, as long as the token budget lets the grammar finish (finish_reason "length"
says it did not, as with OpenAI). Rows without a grammar never reach this code.

Why llguidance: the candidates were xgrammar, llguidance and outlines-core, measured on this CPU
with the DeepSeek-V3 tokenizer (128,815 ids, docs/serving.md has the figures and the command).
llguidance and xgrammar both compute a step's mask in well under a millisecond after a one-time
tokenizer setup of seconds; outlines-core builds a whole-vocabulary index per schema first. llguidance
is one small wheel with no dependencies (xgrammar pulls triton and a TVM runtime) and reads the
tokenizer.json directly, so `dsv3 serve` needs neither transformers nor a GPU stack for it.

Tool calls are forced in the DeepSeek-V3 markup the chat template teaches (see `dsv3.tokenizer`):
`tool_choice` "required" allows exactly one call to any of the tools, a named function one call to it,
each call's arguments constrained by the tool's `parameters` schema.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import torch

from ..errors import RequestError
from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP, Tokenizer

_tokenizers: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()  # the llguidance view of each
_tokenizers_lock = threading.Lock()
_JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a model cannot pad the answer with whitespace


def _ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's tokenizer for `tokenizer`, built once per tokenizer (seconds: it indexes every token)."""
    import llguidance

    with _tokenizers_lock:
        if tokenizer not in _tokenizers:
            _tokenizers[tokenizer] = llguidance.LLTokenizer(
                tokenizer._tok.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_id
            )
        return _tokenizers[tokenizer]


def prepare(tokenizer: Tokenizer) -> None:
    """Build llguidance's view of `tokenizer` now (seconds), so the first structured request does not wait for it."""
    _ll_tokenizer(tokenizer)


class GrammarConstraint:
    """One request's grammar as an engine `TokenConstraint`: the ids allowed next, advanced token by token."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        # byte -> its 8 bits, least significant first (llguidance's order): a gather unpacks a whole mask in
        # tens of microseconds where shifting the bytes with torch ops takes tens of milliseconds.
        self._bits_of_byte = (torch.arange(256)[:, None] >> torch.arange(8) & 1).bool()

    def allowed(self, vocab_size: int) -> torch.Tensor:
        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        mask = self._bits_of_byte[bits.long()].flatten()[: self._n_vocab]
        if vocab_size > self._n_vocab:  # the model's padded ids: never text
            mask = torch.cat([mask, torch.zeros(vocab_size - self._n_vocab, dtype=torch.bool)])
        return mask[:vocab_size]

    def accept(self, token: int) -> None:
        if token < self._n_vocab:
            self._matcher.consume_token(token)

    def is_finished(self) -> bool:
        return self._matcher.is_stopped()


class Grammar:
    """A compiled grammar; `constraint()` makes a fresh matcher for one request (n > 1: one per choice)."""

    def __init__(self, tokenizer: Tokenizer, grammar: str) -> None:
        import llguidance

        self._ll_tokenizer = _ll_tokenizer(tokenizer)
        self._grammar = grammar
        self._n_vocab = tokenizer.vocab_size
        error = llguidance.LLMatcher.validate_grammar(grammar, self._ll_tokenizer)
        if error:
            raise RequestError(f"the schema cannot be compiled to a grammar: {error}")
        self._llguidance = llguidance

    def constraint(self) -> GrammarConstraint:
        matcher = self._llguidance.LLMatcher(self._ll_tokenizer, self._grammar)
        if matcher.is_error():
            raise RequestError(f"the grammar cannot be used: {matcher.get_error()}")
        return GrammarConstraint(matcher, self._n_vocab)


def json_grammar(tokenizer: Tokenizer, schema: dict[str, Any] | None) -> Grammar:
    """JSON text matching `schema` (None: any JSON object, response_format json_object)."""
    import llguidance

    body = {"type": "object"} if schema is None else schema
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(body), defaults=_JSON_OPTIONS)
    except (ValueError, TypeError, RuntimeError) as e:
        raise RequestError(f"the JSON schema is not supported: {e}") from None
    return Grammar(tokenizer, grammar)


def tool_call_grammar(tokenizer: Tokenizer, tools: list[dict[str, Any]], name: str | None) -> Grammar:
    """Exactly one call, in the V3 markup, to the function `name` (None: any of `tools`), arguments per its schema."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise RequestError(f"tool_choice names the function {name!r}, which is not in tools")
    ids = {
        m: tokenizer.token_to_id(m)
        for m in (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP)
    }
    if None in ids.values():
        raise RequestError("this tokenizer has no tool-call tokens: tool_choice cannot force a call")
    special = {m: f"<[{i}]>" for m, i in ids.items()}
    rules = [
        f'start: {special[TOOL_CALLS_BEGIN]} {special[TOOL_CALL_BEGIN]} "function" {special[TOOL_SEP]} call '
        f"{special[TOOL_CALL_END]} {special[TOOL_CALLS_END]}",
        "call: " + " | ".join(f"call_{k}" for k in range(len(chosen))),
    ]
    for k, fn in enumerate(chosen):
        schema = {**(fn.get("parameters") or {"type": "object"}), "x-guidance": _JSON_OPTIONS}
        rules.append(f'call_{k}: {json.dumps(fn["name"] + chr(10) + "```json" + chr(10))} args_{k} "\\n```"')
        rules.append(f"args_{k}: %json {json.dumps(schema)}")
    return Grammar(tokenizer, "%llguidance {}\n" + "\n".join(rules))
