"""The CLI on the inputs that gave the server 500s: one error line (exit 2) or a normal answer, no traceback."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.cli import main


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    cfg = dsv3.ModelConfig.from_pretrained("tiny", vocab_size=129280)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("text") / "ckpt"
    dsv3.DeepSeekV3(cfg).save_pretrained(path)
    return path


def test_a_lone_surrogate_prompt_is_one_line(text_ckpt, capsys):
    # A non-UTF-8 byte in argv reaches Python as a lone surrogate (surrogateescape), e.g. U+DC80.
    assert main(["generate", "--model", str(text_ckpt), "--prompt", "a\udc80b", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "note:" not in line]  # the tokenizer fallback note may precede it
    assert len(errors) == 1 and errors[0].startswith("dsv3 generate: error:") and "surrogate" in errors[0]


def test_a_tiny_temperature_is_greedy(text_ckpt, capsys):
    args = ["generate", "--model", str(text_ckpt), "--prompt", "Hello", "--max-new-tokens", "6"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1e-40", "--seed", "1"]) == 0
    assert capsys.readouterr().out == greedy
