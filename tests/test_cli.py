"""The command line: outputs users rely on, and one clear line + exit 2 for their mistakes."""

import json
import os
import subprocess
import sys

import pytest
import torch

import dsv3
from dsv3.cli import main


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # a subprocess
def test_params_default_prints_seed_total():
    out = run_cli("params")
    assert out.returncode == 0, out.stderr
    assert "Total Parameters: 671,026,419,200" in out.stdout
    assert "|              embed_tokens.weight              | 926679040  |" in out.stdout
    assert "70,272" in out.stdout


def test_params_mtp_and_json(capsys):
    assert main(["params", "--mtp"]) == 0
    text = capsys.readouterr().out
    assert "684,489,845,504" in text and "13,463,426,304" in text and "11,610,068,224" in text
    assert main(["params", "tiny", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    with torch.device("meta"):
        expected = dsv3.DeepSeekV3(cfg).num_parameters()
    assert expected in data.values() or any(isinstance(v, dict) and expected in v.values() for v in data.values())


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init", "tiny", str(out), "--seed", "3", "--dtype", "fp32"]) == 0
    m = dsv3.DeepSeekV3.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(3)
    ref = dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"))
    assert torch.equal(m.lm_head.weight, ref.lm_head.weight)  # --seed decides the weights
    assert main(["init", "tiny", str(out)]) == 2  # refuses to overwrite without --force
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    "args, needle",
    [
        (["params", "no-such-model"], "no preset or config file"),
        (["init", "tiny", "/proc/definitely/not/writable"], "error"),
    ],
)
def test_user_errors_are_one_line(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in out.stderr


@pytest.mark.slow  # a subprocess
def test_bad_config_field_is_one_line(tmp_path):
    cfg = dict(dsv3.presets.TINY, n_group=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = run_cli("params", str(tmp_path / "config.json"))
    assert out.returncode == 2 and "n_group" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a subprocess
def test_python_dash_m_and_console_script_agree():
    exe = os.path.join(os.path.dirname(sys.executable), "dsv3")
    if not os.path.exists(exe):
        pytest.skip("console script not installed")
    a = subprocess.run([exe, "params", "tiny"], capture_output=True, text=True, timeout=60)
    b = run_cli("params", "tiny")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny model with the real vocabulary size, so tokenizer ids can be fed to it."""
    cfg = dsv3.ModelConfig.from_pretrained("tiny", vocab_size=129280)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("text") / "ckpt"
    dsv3.DeepSeekV3(cfg).save_pretrained(path)
    return path


def expected_text(path, prompt_ids, n):
    from dsv3.inference.generate import stream
    from dsv3.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    model = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.bfloat16)
    ids = [s[0] for s in stream(model, [prompt_ids], n, vocab_limit=tok.vocab_size)]
    return tok, tok.decode(ids, skip_special_tokens=True)


def test_generate_streams_the_greedy_text(text_ckpt, capsys):
    from dsv3.tokenizer import Tokenizer

    prompt = "The capital of France is"
    tok = Tokenizer.from_dir(text_ckpt)
    _, want = expected_text(text_ckpt, tok.encode(prompt, add_bos=True), 10)
    assert main(["generate", "--model", str(text_ckpt), "--prompt", prompt, "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # MTP speculative decoding prints the same greedy text.
    assert (
        main(
            [
                "generate",
                "--model",
                str(text_ckpt),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "10",
                "--speculative",
                "mtp",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == want + "\n"


def test_chat_uses_the_template_and_keeps_history(text_ckpt, monkeypatch, capsys):
    import io

    from dsv3.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(text_ckpt)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", "--model", str(text_ckpt), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode_chat([{"role": "user", "content": "hello"}])
    _, want = expected_text(text_ckpt, ids, 6)
    assert out == want + "\n"


@pytest.mark.slow  # a subprocess
def test_generate_with_a_small_vocab_model_is_a_clear_error(tmp_path):
    dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny")).save_pretrained(tmp_path / "c")
    out = run_cli("generate", "--model", str(tmp_path / "c"), "--prompt", "hello")
    assert out.returncode == 2 and "vocabulary" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # a subprocess
def test_closed_stdout_exits_quietly():
    """`dsv3 ... | head` closes the pipe early: exit 0 with nothing on stderr (it used to exit 2 with an error)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsv3", "params"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # before the child writes anything: its first write hits a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert err == ""
