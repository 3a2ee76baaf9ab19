"""Documents, tokenizers and packing: targets are the tokens k+1 ahead and never cross a document."""

import json
import math

import pytest
import torch

from dsv3.errors import ConfigError, RequestError
from dsv3.training.data import (
    IGNORE,
    BatchOrder,
    ByteTokenizer,
    Corpus,
    PackedWindows,
    iter_documents,
    load_tokenizer,
    make_batch,
)

X = IGNORE


def test_mtp_targets_are_two_ahead_and_masked_at_document_ends():
    # Two packed documents: [BOS 10 11 12 EOS] [BOS 20 21 EOS]; one window of T=6 with one MTP depth.
    tokens = torch.tensor([[0, 10, 11, 12, 1, 0, 20, 21]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    batch = make_batch(tokens, docs, seq_len=6, mtp_depths=1)
    assert batch.input_ids.tolist() == [[0, 10, 11, 12, 1, 0]]
    # Next token: the last text token predicts EOS, EOS -> next BOS is masked.
    assert batch.targets[0, 0].tolist() == [10, 11, 12, 1, X, 20]
    # Two ahead (MTP depth 1): masked wherever token t+2 is in the other document.
    assert batch.targets[0, 1].tolist() == [11, 12, 1, X, X, 21]
    # MTP module 1 embeds token t+1 at position t.
    assert batch.mtp_input_ids(1).tolist() == [[10, 11, 12, 1, 0, 20]]
    assert batch.num_targets().tolist() == [5, 4]


def test_packed_windows_from_a_corpus_cover_every_token_once():
    tok = ByteTokenizer()
    corpus = Corpus.from_documents(iter([("a", "abc"), ("b", "de"), ("c", "fghij")]), tok)
    a, b, c, d, e, _f = (ord(ch) + 2 for ch in "abcdef")
    assert corpus.tokens[:9].tolist() == [0, a, b, c, 1, 0, d, e, 1]
    assert corpus.doc_ids.tolist() == [0] * 5 + [1] * 4 + [2] * 7
    windows = PackedWindows(corpus, seq_len=4, mtp_depths=2)
    assert len(windows) == (16 - 3) // 4
    batch = windows.batch(torch.arange(len(windows)))
    assert batch.tokens.shape == (3, 4 + 3)
    # Window i starts at stream position 4i: inputs tile the stream.
    assert torch.equal(batch.input_ids.flatten(), corpus.tokens[:12])
    # Depth 2 (three ahead) at stream position 1 ('a'): token 4 is EOS of the same document.
    assert batch.targets[0, 2, 1].item() == 1
    # Depth 2 at position 2 ('b'): token 5 is the next BOS -> masked.
    assert batch.targets[0, 2, 2].item() == IGNORE
    # Every next-token target is its successor unless that starts a new document.
    for t in range(12):
        want = corpus.tokens[t + 1].item() if corpus.doc_ids[t + 1] == corpus.doc_ids[t] else IGNORE
        assert batch.targets[t // 4, 0, t % 4].item() == want


def test_byte_tokenizer_layout():
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 258)
    ids = tok.encode("é!")
    assert ids == [0xC3 + 2, 0xA9 + 2, ord("!") + 2]
    assert tok.decode(ids) == "é!"


def test_unigram_entropy_counts_targets_only():
    corpus = Corpus.from_documents(iter([("x", "ab"), ("y", "a")]), ByteTokenizer())
    # Targets (every token but the BOSes): a b EOS a EOS -> p = 2/5, 1/5, 2/5.
    want = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    assert corpus.unigram_entropy() == pytest.approx(want, rel=1e-12)


def test_documents_from_folders_files_and_jsonl(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text("second")
    (root / "a.py").write_text("first")
    (root / "sub" / "c.py").write_text("third")
    (root / ".hidden" / "d.py").write_text("never")
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / "latin.txt").write_bytes(b"caf\xe9")  # not UTF-8: skipped inside a folder
    (root / "docs.jsonl").write_text(json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n")
    texts = [t for _, t in iter_documents([str(root)])]
    assert texts == ["first", "second", "j1", "j2", "third"]
    assert [t for _, t in iter_documents([str(root)], glob="*.py")] == ["first", "third"]
    single = [t for _, t in iter_documents([str(root / "b.txt"), str(root / "sub")])]
    assert single == ["second", "third"]


def test_bad_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(RequestError, match=r"bad.jsonl:2"):
        list(iter_documents([str(bad)]))
    with pytest.raises(RequestError, match="no such file"):
        list(iter_documents([str(tmp_path / "missing")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RequestError, match="no text documents"):
        Corpus.from_documents(iter_documents([str(tmp_path / "empty")]), ByteTokenizer())
    short = Corpus.from_documents(iter([("x", "abc")]), ByteTokenizer())
    with pytest.raises(RequestError, match="fewer than one sequence"):
        PackedWindows(short, seq_len=64, mtp_depths=1)


def test_tokenizer_choice_respects_the_vocabulary():
    assert load_tokenizer("byte", 320).name == "byte"
    assert load_tokenizer("auto", 320).name == "byte"
    assert load_tokenizer("auto", 129280).name == "deepseek"
    with pytest.raises(ConfigError, match="vocab_size=128815"):
        load_tokenizer("deepseek", 320)
    with pytest.raises(ConfigError, match="vocab_size"):
        load_tokenizer("byte", 100)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(num_windows=7, seed=3)
    first = order.windows(0, 7)
    assert sorted(first.tolist()) == list(range(7))
    second = order.windows(7, 7)
    assert sorted(second.tolist()) == list(range(7)) and not torch.equal(first, second)
    # A fresh object (a resumed run) gives the same windows for the same positions, whatever came before.
    assert torch.equal(BatchOrder(7, 3).windows(5, 6), torch.cat([first[5:], second[:4]]))
    assert not torch.equal(BatchOrder(7, 4).windows(0, 7), first)


def test_corpus_fingerprint_tracks_content():
    a = Corpus.from_documents(iter([("x", "abc"), ("y", "d")]), ByteTokenizer())
    b = Corpus.from_documents(iter([("x", "abc"), ("y", "d")]), ByteTokenizer())
    c = Corpus.from_documents(iter([("x", "abcd")]), ByteTokenizer())
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
