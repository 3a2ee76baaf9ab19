"""Training runs after crashes and tampering: stale temporaries of a killed save are removed (only
provably stale ones), resume falls back past a corrupt latest checkpoint, train.json is type-checked."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from train_helpers import FAST, read_metrics, run_cli

from dsv3.errors import CheckpointError


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    run_cli(
        "train", *FAST, "--data", corpus, "--out", out, "--steps", "3", "--save-every", "1", "--keep-checkpoints", "3"
    )
    return out


@pytest.fixture()
def run3(base_run, tmp_path):
    """A fresh copy of a finished 3-step run with checkpoints at steps 1, 2 and 3."""
    return shutil.copytree(base_run, str(tmp_path / "run"))


def test_stale_temporaries_of_a_killed_save_are_removed(run3, corpus):
    ck = os.path.join(run3, "checkpoints")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead, alive = dead_pid(), other.pid
    stale = [
        f"..tmp-step-00000002.tmp-{dead}",  # save_pretrained's temporary inside the trainer's
        f".tmp-step-00000002.tmp-{dead}",  # the trainer's temporary
        f".tmp-step-00000002.tmp-{dead}.old-{dead}",
        ".tmp-step-00000002",  # the old trainer's name (no pid)
    ]
    kept = [
        f"..tmp-step-00000002.tmp-{alive}",  # a live process may still be writing it
        "notes",  # not ours
        f".tmp-other-{dead}",
    ]
    for name in stale + kept:
        os.makedirs(os.path.join(ck, name, "inner"))
        with open(os.path.join(ck, name, "inner", "big.bin"), "wb") as f:
            f.write(b"x" * 1000)
    try:
        run_cli("train", "--out", run3, "--resume", "--steps", "4")
    finally:
        other.kill()
        other.wait()
    names = set(os.listdir(ck))
    assert not names & set(stale)
    assert set(kept) <= names
    assert "step-00000004" in names


def test_resume_falls_back_past_a_corrupt_latest_checkpoint(run3, capsys):
    ck = os.path.join(run3, "checkpoints")
    latest = os.path.join(ck, "step-00000003")
    shard = sorted(f for f in os.listdir(latest) if f.endswith(".safetensors"))[0]
    with open(os.path.join(latest, shard), "r+b") as f:
        f.truncate(100)
    run_cli("train", "--out", run3, "--resume", "--steps", "4")
    err = capsys.readouterr().err
    assert "step-00000003" in err and "step-00000002" in err  # the note: which one failed, which one is used
    assert [r["step"] for r in read_metrics(run3)] == [1, 2, 3, 4]
    assert os.path.isdir(os.path.join(ck, "step-00000004"))
    assert os.path.isdir(os.path.join(ck, "step-00000002"))  # the good one is not pruned for the corrupt one


def test_resume_with_a_corrupt_trainer_state_falls_back(run3, capsys):
    with open(os.path.join(run3, "checkpoints", "step-00000003", "trainer_state.pt"), "wb") as f:
        f.write(b"garbage")
    run_cli("train", "--out", run3, "--resume", "--steps", "3")
    assert "step-00000002" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run3)] == [1, 2, 3]


def test_every_checkpoint_corrupt_is_one_error(run3):
    ck = os.path.join(run3, "checkpoints")
    for step in os.listdir(ck):
        with open(os.path.join(ck, step, "trainer_state.pt"), "wb") as f:
            f.write(b"garbage")
    with pytest.raises(CheckpointError, match="trainer state"):
        run_cli("train", "--out", run3, "--resume", "--steps", "4")


@pytest.mark.parametrize(
    "key, value",
    [
        ("steps", "10"),
        ("lr", "fast"),
        ("seq_len", 32.5),
        ("bf16", "no"),
        ("data", "one-path"),
        ("data", [1, 2]),
        ("min_lr", [0.1]),
        ("keep_checkpoints", True),
        ("tokenizer", 5),
    ],
)
def test_train_json_is_type_checked_on_resume(run3, key, value):
    path = os.path.join(run3, "train.json")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    info["options"][key] = value
    with open(path, "w", encoding="utf-8") as f:
        json.dump(info, f)
    with pytest.raises(CheckpointError, match=f"train.json.*{key}"):
        run_cli("train", "--out", run3, "--resume", "--steps", "4")


def test_train_json_not_an_object_is_one_error(run3):
    with open(os.path.join(run3, "train.json"), "w", encoding="utf-8") as f:
        f.write("[1, 2]")
    with pytest.raises(CheckpointError, match="train.json"):
        run_cli("train", "--out", run3, "--resume", "--steps", "4")
