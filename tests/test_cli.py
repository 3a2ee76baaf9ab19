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
    assert expected in data.values() or any(
        isinstance(v, dict) and expected in v.values() for v in data.values()
    )


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["init", "tiny", str(out), "--seed", "3", "--dtype", "fp32"]) == 0
    m = dsv3.DeepSeekV3.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(3)
    ref = dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"))
    assert torch.equal(m.lm_head.weight, ref.lm_head.weight)  # --seed decides the weights
    assert main(["init", "tiny", str(out)]) == 2  # refuses to overwrite without --force
    assert "--force" in capsys.readouterr().err


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


def test_bad_config_field_is_one_line(tmp_path):
    cfg = dict(dsv3.presets.TINY, n_group=3)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = run_cli("params", str(tmp_path / "config.json"))
    assert out.returncode == 2 and "n_group" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_python_dash_m_and_console_script_agree():
    exe = os.path.join(os.path.dirname(sys.executable), "dsv3")
    if not os.path.exists(exe):
        pytest.skip("console script not installed")
    a = subprocess.run([exe, "params", "tiny"], capture_output=True, text=True, timeout=60)
    b = run_cli("params", "tiny")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
