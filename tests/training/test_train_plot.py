"""`dsv3 plot`: PNGs of one run or several, and a clear error for a run without metrics."""

import os

import pytest
from train_helpers import FAST, run_cli

from dsv3.errors import RequestError
from dsv3.training.plot import moving_average, read_metrics


def test_plot_writes_pngs_for_one_and_two_runs(corpus, tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_cli("train", *FAST, "--data", corpus, "--out", a, "--steps", "3", "--save-every", "0")
    run_cli(
        "train", *FAST, "--data", corpus, "--out", b, "--steps", "3", "--save-every", "0", "--bias-update-speed", "0"
    )
    assert run_cli("plot", a) == 0
    names = sorted(os.listdir(os.path.join(a, "plots")))
    assert names == ["expert_load.png", "loss.png", "maxvio.png"]
    for name in names:
        with open(os.path.join(a, "plots", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    out = str(tmp_path / "both")
    run_cli("plot", a, b, "--out", out)
    assert sorted(os.listdir(out)) == ["expert_load-a.png", "expert_load-b.png", "loss.png", "maxvio.png"]
    assert os.path.join(out, "maxvio.png") in capsys.readouterr().out


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(RequestError, match="no metrics.jsonl"):
        run_cli("plot", str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(RequestError, match="empty"):
        run_cli("plot", str(tmp_path))


def test_a_line_cut_short_at_the_end_is_ignored(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.0}]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(RequestError, match=":1"):
        read_metrics(str(tmp_path))


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
