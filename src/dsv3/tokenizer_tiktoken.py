"""A checkpoint's `tiktoken.model` (Kimi-K2, Moonlight) as a backend of `dsv3.tokenizer.Tokenizer`.

The file holds one `base64(token bytes) rank` line per byte-level BPE token; the id of a token is its
rank. What the file does not hold comes from the checkpoint's own remote code, which dsv3 never runs,
so it is fixed here as Kimi's `tokenization_kimi.py` defines it:
- the pre-tokenization pattern (`KIMI_PATTERN`: Han runs, cased words with English contractions,
  numbers of up to 3 digits, punctuation runs, whitespace);
- `NUM_RESERVED_SPECIAL_TOKENS` (256) special ids right after the BPE ranks; their text comes from
  `added_tokens_decoder` in tokenizer_config.json, the rest are `<|reserved_token_{id}|>`.

`TiktokenBackend` offers the few methods of a `tokenizers.Tokenizer` that `Tokenizer` calls.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CheckpointError

TIKTOKEN_FILE = "tiktoken.model"
NUM_RESERVED_SPECIAL_TOKENS = 256
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class AddedToken(NamedTuple):
    content: str
    special: bool


class Encoded(NamedTuple):
    ids: list[int]


def read_ranks(path: Path) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken BPE file; a malformed line is a CheckpointError naming it."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"tokenizer: cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(f"tokenizer: {path} line {n} is not 'base64-token rank'") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"tokenizer: {path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


class TiktokenBackend:
    """tiktoken BPE with the checkpoint's special tokens, answering as a `tokenizers.Tokenizer` would."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        try:
            import tiktoken
        except ImportError:
            raise CheckpointError(f"tokenizer: {path} needs the 'tiktoken' package (pip install tiktoken)") from None
        ranks = read_ranks(path)
        base = len(ranks)
        named = _added_tokens(config)
        self._added = {
            i: named.get(i, AddedToken(f"<|reserved_token_{i}|>", True))
            for i in range(base, base + NUM_RESERVED_SPECIAL_TOKENS)
        }
        outside = sorted(i for i in named if i not in self._added)
        if outside:
            raise CheckpointError(
                f"tokenizer: added token id {outside[0]} is outside the special range {base}..{base + 255} "
                f"after the {base:,} ranks of {path.name}"
            )
        self._special_ids = {t.content: i for i, t in self._added.items()}
        self._ranks = ranks
        try:
            self._enc = tiktoken.Encoding(
                name=path.parent.name or "checkpoint",
                pat_str=KIMI_PATTERN,
                mergeable_ranks=ranks,
                special_tokens=self._special_ids,
            )
        except ValueError as e:
            raise CheckpointError(f"tokenizer: {path}: {e}") from None

    def get_vocab(self, with_added_tokens: bool = True) -> dict[str, int]:
        # Token bytes as latin-1 text: one distinct string per token, as the byte-level vocabulary is.
        vocab = {token.decode("latin-1"): i for token, i in self._ranks.items()}
        if with_added_tokens:
            vocab.update(self._special_ids)
        return vocab

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._added)

    def token_to_id(self, token: str) -> int | None:
        if token in self._special_ids:
            return self._special_ids[token]
        return self._ranks.get(token.encode("utf-8"))

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoded:
        # Special-token text in `text` becomes its id, as `tokenizers` does for added tokens.
        return Encoded(self._enc.encode(text, allowed_special="all"))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._added]
        return self._enc.decode(ids)  # invalid UTF-8 becomes U+FFFD, as with `tokenizers`


def _added_tokens(config: dict[str, Any]) -> dict[int, AddedToken]:
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError("tokenizer: added_tokens_decoder in tokenizer_config.json must be an object")
    out = {}
    for key, tok in decoder.items():
        content = tok.get("content") if isinstance(tok, dict) else None
        if not isinstance(content, str) or not str(key).isdigit():
            raise CheckpointError(f"tokenizer: added_tokens_decoder entry {key!r} must be an id with a 'content'")
        out[int(key)] = AddedToken(content, bool(tok.get("special", True)))
    return out
