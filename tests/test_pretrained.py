"""The model shipped with dsv3 (`stdlib-mini`): its tokenizer, its quality, and the commands that use it by default.

A trained model says what random weights cannot: that the MTP head drafts tokens the main model
accepts, that FP8 storage keeps the held-out loss, that the demo and the chat write readable text.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.cli import build_parser, chat_loop, main
from dsv3.pretrained import packaged_model_dir, resolve_model
from dsv3.tokenizer import Tokenizer
from dsv3.training.data import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent


def _recipe():
    spec = importlib.util.spec_from_file_location("train_default_model", REPO / "scripts" / "train_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return _recipe()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(packaged_model_dir())


@pytest.fixture(scope="module")
def model() -> dsv3.DeepSeekV3:
    torch.set_num_threads(1)  # a 1.5M-parameter model: a second thread only adds waiting
    return dsv3.DeepSeekV3.from_pretrained(packaged_model_dir(), dtype=torch.bfloat16).eval()


@pytest.fixture(scope="module")
def reference() -> dict:
    """Held-out windows with the loss and argmax of the bf16 model the shipped FP8 one was quantized from
    (written by `scripts/train_default_model.py report`, which alone has the unquantized weights)."""
    return json.loads((REPO / "tests" / "data" / "stdlib_mini_reference.json").read_text())


@pytest.fixture(scope="module")
def held_out_ids(reference) -> torch.Tensor:
    """4 windows of 257 tokens from stdlib files the recipe never trains on, (4, 257)."""
    return torch.tensor(reference["windows"])


def _loss(model: dsv3.DeepSeekV3, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids[:, :-1]).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


# ---------------------------------------------------------------------------------------------- files
def test_the_package_holds_a_plain_v3_checkpoint_under_10_mb():
    path = packaged_model_dir()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["n_shared_experts"] >= 1 and cfg["q_lora_rank"]
    assert cfg["first_k_dense_replace"] == 1 and cfg["scoring_func"] == "sigmoid" and cfg["n_group"] > 1
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert any(k.endswith("weight_scale_inv") for k in index["weight_map"])
    assert any(k.startswith(f"model.layers.{cfg['num_hidden_layers']}.") for k in index["weight_map"])  # MTP
    assert sum(f.stat().st_size for f in path.iterdir()) <= 10 * 2**20


def test_the_recipe_writes_the_shipped_tokenizer(recipe, tmp_path):
    recipe.write_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((packaged_model_dir() / name).read_text())


@pytest.mark.parametrize(
    "text", ["def f(x):\n\treturn x + 1\n", "héllo wörld ✓ 日本語 🐍", "\x00\x01 \r\n  \x7f", "", "<|User|> <User>"]
)
def test_the_tokenizer_gives_the_training_byte_ids(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert ids == ByteTokenizer().encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_bos=True) == [0, *ids]


def test_the_chat_template_is_the_training_chat_format(tok, recipe):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
    ids = tok.encode_chat(chat)
    byte = ByteTokenizer()
    assert ids == [0, 258, *byte.encode("hi"), 259, *byte.encode("ok"), 1, 258, *byte.encode("?"), 259]
    # The recipe's chat documents (the packer adds BOS and EOS) tokenize to the same ids.
    doc = f"{recipe.USER}hi{recipe.ASSISTANT}ok{recipe.EOS}{recipe.USER}?{recipe.ASSISTANT}"
    assert [0, *tok.encode(doc, add_bos=False)] == ids
    assert tok.decode(ids, skip_special_tokens=True) == "<｜User｜>hi<｜Assistant｜>ok<｜User｜>?<｜Assistant｜>"


def test_training_reads_a_tokenizer_folder(tmp_path):
    from dsv3.errors import ConfigError, RequestError
    from dsv3.training.data import load_tokenizer

    tok = load_tokenizer(str(packaged_model_dir()), model_vocab_size=320)
    assert tok.name == str(packaged_model_dir()) and (tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 260)
    assert tok.encode("<｜User｜>é") == [258, 0xC3 + 2, 0xA9 + 2]  # markers are single ids, as at inference
    with pytest.raises(ConfigError, match="vocab_size"):
        load_tokenizer(str(packaged_model_dir()), model_vocab_size=259)
    with pytest.raises(RequestError, match="tokenizer folder"):
        load_tokenizer(str(tmp_path / "missing"), model_vocab_size=320)


def test_held_out_files_are_never_in_the_training_data(recipe):
    files = recipe.stdlib_files()
    held = {rel for rel, _ in files if recipe.is_held_out(rel)}
    assert 0.02 < len(held) / len(files) < 0.10  # about 1 in 20
    assert all(recipe.is_held_out(rel) == (rel in held) for rel, _ in files)


# ---------------------------------------------------------------------------------------------- quality
def test_held_out_loss_is_far_below_the_unigram_baseline(model, held_out_ids):
    counts = torch.bincount(held_out_ids[:, 1:].reshape(-1), minlength=320).double()
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * p.log()).sum())  # the best any context-free model does on these very bytes
    loss = _loss(model, held_out_ids)
    assert loss < unigram - 1.0, (loss, unigram)


# The measured gap on these windows is in docs/training.md; the margin leaves room for rounding differences.
FP8_LOSS_MARGIN = 0.02  # nats/token


def test_fp8_as_shipped_keeps_the_bf16_loss_and_greedy_choices(model, reference, held_out_ids):
    assert abs(_loss(model, held_out_ids) - reference["bf16_loss"]) < FP8_LOSS_MARGIN
    with torch.no_grad():
        argmax = model(held_out_ids[:, :-1]).argmax(-1)
    assert (argmax == torch.tensor(reference["bf16_argmax"])).float().mean() > 0.95


def test_fp8_kept_in_memory_matches_the_dequantized_weights(model, held_out_ids):
    fp8 = dsv3.DeepSeekV3.from_pretrained(packaged_model_dir(), dtype=torch.bfloat16, fp8=True).eval()
    # Same stored FP8 values either way; only the bf16 rounding of the products differs.
    assert abs(_loss(fp8, held_out_ids) - _loss(model, held_out_ids)) < 0.01


def test_mtp_drafts_are_accepted_and_the_greedy_text_is_unchanged(model, held_out_ids):
    from dsv3.inference.speculative import SpeculativeStats, speculative_stream

    prompts = [held_out_ids[0, :64].tolist(), held_out_ids[1, :64].tolist()]
    plain = dsv3.generate(model, prompts, max_new_tokens=32)
    stats = SpeculativeStats()
    spec: list[list[int]] = [[], []]
    for step in speculative_stream(model, prompts, 32, stats=stats):
        for b, toks in step.items():
            spec[b].extend(toks)
    assert spec == plain
    assert stats.acceptance_rate > 0.3, stats  # a random MTP head is accepted ~1/320 of the time


# ---------------------------------------------------------------------------------------------- commands
def test_model_names():
    assert resolve_model(None).checkpoint == str(packaged_model_dir())
    assert resolve_model("random:small").random_config == "small" and resolve_model("random:small").is_random
    assert resolve_model("random:tiny").name == "dsv3-tiny-random"
    assert resolve_model("/x/ckpt/").name == "ckpt"
    with pytest.raises(dsv3.errors.RequestError):
        resolve_model("random:")


def test_demo_prints_readable_text():
    out = subprocess.run(
        [sys.executable, "-m", "dsv3", "demo", "--tokens", "60"], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    assert "Total Parameters: 671,026,419,200" in out.stdout  # the seed accounting is still there
    assert "logits identical" in out.stdout  # the save/load round trip
    text = out.stdout.split("--- continuation of 'class Stack:\\n    ':\n", 1)[1].split("\n---", 1)[0]
    assert text.startswith("class Stack:\n") and len(text) > 40
    printable = sum(c.isprintable() or c in "\n\t" for c in text) / len(text)
    assert printable > 0.98 and any(len(w) >= 3 and w.isalpha() for w in text.split()), text


def test_generate_defaults_to_the_shipped_model(capsys, model, tok):
    prompt = "import sys\n"
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "24", "--threads", "1"]) == 0
    want = dsv3.generate(model, [tok.encode(prompt, add_bos=True)], max_new_tokens=24)[0]
    assert capsys.readouterr().out == tok.decode(want, skip_special_tokens=True) + "\n"


def _chat_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["chat", *argv])


def _chat(model, tok, args, lines):
    out, err = io.StringIO(), io.StringIO()
    feed = iter(lines)
    assert chat_loop(model, tok, args, lambda: next(feed, None), out, err) == 0
    return out.getvalue(), err.getvalue()


def test_chat_budgets_each_reply_by_the_context(model, tok, monkeypatch):
    # The default --max-new-tokens (512) is the whole context: each reply gets what its prompt leaves.
    import dsv3.cli

    budgets = []

    def fake_stream_text(model, tok, ids, args, ctx=None, max_new_tokens=None):
        budgets.append((len(ids), max_new_tokens))
        yield "reply"

    monkeypatch.setattr(dsv3.cli, "stream_text", fake_stream_text)
    args = _chat_args()
    assert args.max_new_tokens == 512 == model.config.max_position_embeddings
    out, err = _chat(model, tok, args, ["What does json.dumps do?", "And json.loads?"])
    assert out == "reply\nreply\n" and err == ""
    first = tok.encode_chat([{"role": "user", "content": "What does json.dumps do?"}])
    second = tok.encode_chat(
        [
            {"role": "user", "content": "What does json.dumps do?"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "And json.loads?"},
        ]
    )
    assert budgets == [(len(first), 512 - len(first)), (len(second), 512 - len(second))]


def test_chat_drops_the_oldest_turns_when_the_history_outgrows_the_context(model, tok):
    question = "Tell me about the os.path module and how to join paths, split them and test them. " * 2
    out, err = _chat(model, tok, _chat_args("--max-new-tokens", "24"), [question] * 5)
    assert len(out.splitlines()) >= 5 and "turn failed" not in err
    assert "dropped the oldest" in err and "512-token context" in err


def test_a_failing_turn_says_why_and_the_chat_goes_on(model, tok):
    out, err = _chat(model, tok, _chat_args("--max-new-tokens", "8"), ["hi", "x" * 600, "ok"])
    assert err.count("turn failed") == 1 and "512-token context" in err
    # The failed message left no trace, and the history before it is kept.
    hi = [{"role": "user", "content": "hi"}]
    first = tok.decode(dsv3.generate(model, [tok.encode_chat(hi)], max_new_tokens=8)[0], skip_special_tokens=True)
    history = [*hi, {"role": "assistant", "content": first}, {"role": "user", "content": "ok"}]
    last = tok.decode(dsv3.generate(model, [tok.encode_chat(history)], max_new_tokens=8)[0], skip_special_tokens=True)
    assert out == f"{first}\n{last}\n"


def test_chat_command_runs_on_the_shipped_model(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/exit\nnever read\n"))
    assert main(["chat", "--max-new-tokens", "8", "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("\n") >= 1


def test_random_models_stay_available(monkeypatch, capsys):
    # random:tiny is built in memory with the DeepSeek-V3 tokenizer, whose ids outgrow tiny's 320: that turn
    # fails with the reason, and the chat goes on to its end.
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", "random:tiny", "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert "random-weight 'tiny'" in err and "turn failed" in err and "vocabulary of 320" in err


def test_serve_without_model_answers_a_chat_with_the_shipped_model():
    import os
    import signal
    import time

    import openai

    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv3", "serve", "--port", "0", "--log-level", "warning"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        url, lines, deadline = None, [], time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line, f"the server exited: {''.join(lines)}"
            lines.append(line)
            if " at http://" in line:
                url = line.split(" at ", 1)[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        (card,) = client.models.list().data
        assert card.id == "stdlib-mini"
        question = "What does json.dumps do?"
        r = client.chat.completions.create(
            model=card.id, messages=[{"role": "user", "content": question}], max_tokens=40, temperature=0
        )
        tok = Tokenizer.from_dir(packaged_model_dir())
        model = dsv3.DeepSeekV3.from_pretrained(packaged_model_dir(), dtype=torch.bfloat16)
        ids = dsv3.generate(model, [tok.encode_chat([{"role": "user", "content": question}])], max_new_tokens=40)[0]
        assert r.choices[0].message.content == tok.decode(ids, skip_special_tokens=True)
        assert len(r.choices[0].message.content) > 10
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
