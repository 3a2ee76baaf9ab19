"""Training data: text documents -> token ids -> packed fixed-length windows that keep document boundaries.

Documents. `--data` names files, folders (walked recursively, sorted, hidden names skipped; a file is
text when it has no NUL byte and decodes as UTF-8) or `.jsonl` files (one document per line, from
its `text` field). Each document becomes `[BOS] ids [EOS]`, and all documents are concatenated into
one token stream with a parallel stream of document indices.

Tokenizers. `deepseek` is the real DeepSeek-V3 tokenizer (`dsv3.tokenizer`, 128,815 ids, BOS 0,
EOS 1). `byte` maps UTF-8 byte b to id b + 2, with BOS = 0 and EOS = 1 (the V3 config's ids), so
it needs a vocabulary of 258; it lets a tiny model train on a laptop-sized budget.

Packing (DeepSeek-V3 section 4.1 packs documents without cross-document attention masks, as here).
Window i holds stream tokens [i*T, i*T + T + D + 1) for sequence length T and D MTP depths: the
model reads the first T, and target depth k (0 = next token, k >= 1 = MTP module k) at position t
is token t+k+1 of the window, or IGNORE when that token belongs to another document. So the
next-token target at a document's last text token is its EOS, the target at its EOS is masked,
and no MTP target crosses a boundary. Windows advance by T, so every token is a target once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ConfigError, RequestError

IGNORE = -100  # target id that cross_entropy skips

BYTE_BOS, BYTE_EOS, BYTE_OFFSET = 0, 1, 2
TOKENIZERS = ("auto", "deepseek", "byte")


# ---------------------------------------------------------------------------------------------- tokenizers
class TextTokenizer(Protocol):
    name: str
    bos_id: int
    eos_id: int
    vocab_size: int  # ids are 0..vocab_size-1

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as ids: byte b -> b + 2; BOS 0, EOS 1."""

    name = "byte"
    bos_id, eos_id = BYTE_BOS, BYTE_EOS
    vocab_size = 256 + BYTE_OFFSET

    def encode(self, text: str) -> list[int]:
        return [b + BYTE_OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < self.vocab_size).decode("utf-8", "replace")


class DeepSeekTokenizer:
    """The packaged DeepSeek-V3 tokenizer, without BOS (the packer adds BOS and EOS per document)."""

    name = "deepseek"

    def __init__(self) -> None:
        from ..tokenizer import Tokenizer

        self._tok = Tokenizer.from_dir(None)
        self.bos_id, self.eos_id, self.vocab_size = self._tok.bos_id, self._tok.eos_id, self._tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_bos=False)


class DirTokenizer:
    """The tokenizer of a checkpoint-style folder (tokenizer.json + tokenizer_config.json), without BOS.

    Special-token text in a document (e.g. chat markers) becomes the special id, as at inference, so
    chat-formatted training text is tokenized exactly as `apply_chat_template` output is.
    """

    def __init__(self, path: str) -> None:
        from ..tokenizer import Tokenizer

        self.name = os.path.abspath(path)  # a resumed run finds the same folder again
        self._tok = Tokenizer.from_dir(path)
        self.bos_id, self.eos_id = self._tok.bos_id, self._tok.eos_id
        # ids are 0..vocab_size-1; a tokenizer.json may leave holes, so the largest id counts, not how many.
        self.vocab_size = int(self._tok.valid_ids_mask(1 << 20).nonzero().max()) + 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_bos=False)


def load_tokenizer(name: str, model_vocab_size: int) -> TextTokenizer:
    """The tokenizer `name`: auto (deepseek when the model's vocabulary holds its ids, else byte), deepseek,
    byte, or a folder holding tokenizer.json and tokenizer_config.json."""
    if name not in TOKENIZERS and os.path.isdir(name):
        tok: TextTokenizer = DirTokenizer(name)
    elif name not in TOKENIZERS:
        raise RequestError(f"--tokenizer must be one of {', '.join(TOKENIZERS)} or a tokenizer folder, got {name!r}")
    elif name == "auto":
        tok = DeepSeekTokenizer()
        if tok.vocab_size > model_vocab_size:
            tok = ByteTokenizer()
    else:
        tok = DeepSeekTokenizer() if name == "deepseek" else ByteTokenizer()
    if tok.vocab_size > model_vocab_size:
        raise ConfigError(
            f"the {tok.name} tokenizer has {tok.vocab_size} ids but the config's vocab_size is {model_vocab_size} "
            f"(use --set vocab_size={tok.vocab_size} or another --tokenizer)"
        )
    return tok


# ---------------------------------------------------------------------------------------------- documents
def iter_documents(paths: Sequence[str], glob: str | None = None) -> Iterator[tuple[str, str]]:
    """(source, text) for every document under `paths`, in a fixed order (see the module doc)."""
    for path in paths:
        if os.path.isdir(path):
            for file in _walk(path, glob):
                text = _read_text(file)
                if text is None:
                    continue  # binary files inside a folder are skipped, not an error
                yield from _documents_of(file, text)
        elif os.path.isfile(path):
            text = _read_text(path)
            if text is None:
                raise RequestError(f"--data {path}: not a UTF-8 text file")
            yield from _documents_of(path, text)
        else:
            raise RequestError(f"--data {path}: no such file or directory")


def _walk(root: str, glob: str | None) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or (glob and not fnmatch.fnmatch(name, glob)):
                continue
            yield os.path.join(dirpath, name)


def _read_text(path: str) -> str | None:
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _documents_of(path: str, text: str) -> Iterator[tuple[str, str]]:
    if not path.endswith(".jsonl"):
        if text:
            yield path, text
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise RequestError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise RequestError(f"{path}:{n}: each JSONL line must be an object with a string 'text' field")
        if obj["text"]:
            yield f"{path}:{n}", obj["text"]


# ---------------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """All documents as one stream: tokens[i] and the index of the document it belongs to."""

    tokens: torch.Tensor  # (N,) int64
    doc_ids: torch.Tensor  # (N,) int64, non-decreasing
    num_docs: int

    @classmethod
    def from_documents(cls, docs: Iterator[tuple[str, str]], tokenizer: TextTokenizer) -> Corpus:
        """Tokenize each document as [BOS] ids [EOS] and concatenate."""
        pieces: list[torch.Tensor] = []
        for _source, text in docs:
            pieces.append(torch.tensor([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]))
        if not pieces:
            raise RequestError("--data holds no text documents")
        lengths = torch.tensor([len(p) for p in pieces])
        doc_ids = torch.repeat_interleave(torch.arange(len(pieces)), lengths)
        return cls(tokens=torch.cat(pieces), doc_ids=doc_ids, num_docs=len(pieces))

    def __len__(self) -> int:
        return self.tokens.numel()

    def fingerprint(self) -> str:
        """A short hash of the token stream and its boundaries: a resumed run checks it sees the same data."""
        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(self.doc_ids.numpy().tobytes())
        return h.hexdigest()[:16]

    def unigram_entropy(self) -> float:
        """Entropy in nats of the empirical distribution of the target tokens (every token but each BOS)."""
        is_target = torch.ones_like(self.tokens, dtype=torch.bool)
        is_target[0] = False
        is_target[1:] = self.doc_ids[1:] == self.doc_ids[:-1]
        p = torch.bincount(self.tokens[is_target]).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())


class PackedWindows:
    """Fixed-length windows over a Corpus: `len(self)` windows of seq_len + depths + 1 tokens, stride seq_len."""

    def __init__(self, corpus: Corpus, seq_len: int, mtp_depths: int) -> None:
        self.corpus, self.seq_len, self.mtp_depths = corpus, seq_len, mtp_depths
        self.window_len = seq_len + mtp_depths + 1
        self.num_windows = max(0, (len(corpus) - mtp_depths - 1) // seq_len)
        if self.num_windows == 0:
            raise RequestError(
                f"--data has {len(corpus)} tokens, fewer than one sequence of --seq-len {seq_len} "
                f"(+{mtp_depths + 1} look-ahead)"
            )

    def __len__(self) -> int:
        return self.num_windows

    def batch(self, window_idx: torch.Tensor) -> Batch:
        """The Batch of the windows `window_idx` (B,)."""
        offsets = window_idx[:, None] * self.seq_len + torch.arange(self.window_len)  # (B, T+D+1)
        return make_batch(self.corpus.tokens[offsets], self.corpus.doc_ids[offsets], self.seq_len, self.mtp_depths)


@dataclass
class Batch:
    """Model inputs and masked targets for B sequences of length T with D MTP depths."""

    tokens: torch.Tensor  # (B, T+D+1) the window; MTP module k reads tokens[:, k:k+T]
    targets: torch.Tensor  # (B, D+1, T): targets[:, k, t] = tokens[:, t+k+1], or IGNORE across a document boundary

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens[:, : self.seq_len]

    @property
    def seq_len(self) -> int:
        return self.targets.shape[-1]

    def mtp_input_ids(self, k: int) -> torch.Tensor:
        """Token ids MTP module k (1-based) embeds at position t: token t+k, (B, T)."""
        return self.tokens[:, k : k + self.seq_len]

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(self.tokens[start:stop], self.targets[start:stop])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.targets.to(device))

    def num_targets(self) -> torch.Tensor:
        """Unmasked targets per depth, (D+1,)."""
        return (self.targets != IGNORE).sum(dim=(0, 2))


def make_batch(tokens: torch.Tensor, doc_ids: torch.Tensor, seq_len: int, mtp_depths: int) -> Batch:
    """Targets of depth 0..D from windows tokens/doc_ids (B, T+D+1), masked where they leave the document."""
    T = seq_len
    here = doc_ids[:, :T]
    targets = [
        torch.where(doc_ids[:, k + 1 : k + 1 + T] == here, tokens[:, k + 1 : k + 1 + T], IGNORE)
        for k in range(mtp_depths + 1)
    ]
    return Batch(tokens=tokens, targets=torch.stack(targets, dim=1))


class BatchOrder:
    """Which windows make up global batch s: a fresh seeded permutation of all windows per epoch."""

    def __init__(self, num_windows: int, seed: int) -> None:
        self.num_windows, self.seed = num_windows, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            # One generator per (seed, epoch): the order never depends on what was drawn before a resume.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_windows, generator=g)
        return self._perm

    def windows(self, start: int, count: int) -> torch.Tensor:
        """Window indices of global sequence positions [start, start + count), (count,)."""
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, self.num_windows)
            out.append(self._permutation(epoch)[i])
        return torch.stack(out)

    def epochs(self, sequences: int) -> float:
        return sequences / self.num_windows
