"""Careless or hostile checkpoints: convert never destroys its input or unrelated files, a malformed
index is one CheckpointError (exit 2), index paths stay inside the checkpoint folder, and a config that
disagrees with the index fails before the model is built."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import dsv3
from dsv3.checkpoint.convert import convert_checkpoint
from dsv3.checkpoint.load import INDEX_NAME, checkpoint_files
from dsv3.cli import main
from dsv3.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile") / "ck"
    dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"), dtype=torch.float32).save_pretrained(
        path, max_shard_bytes=300_000
    )
    return path


def copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def tree(path) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


# ---------------------------------------------------------------------------------------------- convert overlap
@pytest.mark.parametrize("layout", ["dst_is_parent", "dst_inside_src", "same_dir_other_spelling", "symlink_to_src"])
def test_convert_refuses_any_overlap_and_deletes_nothing(tiny_ckpt, tmp_path, layout):
    root = tmp_path / "root"
    root.mkdir()
    (root / "unrelated.txt").write_text("precious")
    src = copy_ckpt(tiny_ckpt, root / "inner" / "ck")
    if layout == "dst_is_parent":
        dst = root  # the case: `convert DIR/inner/ck DIR --force`
    elif layout == "dst_inside_src":
        dst = src / "sub"
    elif layout == "same_dir_other_spelling":
        dst = root / "inner" / ".." / "inner" / "ck" / "."
    else:
        dst = tmp_path / "link"
        os.symlink(src, dst)
    before = tree(tmp_path)
    with pytest.raises(CheckpointError, match="is the input|inside|contains the input"):
        convert_checkpoint(src, dst, "fp8", force=True, progress=False)
    assert tree(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in ["root", "link"] if (tmp_path / n).exists())


def test_convert_refuses_src_inside_dst_through_a_symlink(tiny_ckpt, tmp_path):
    real = tmp_path / "real"
    src = copy_ckpt(tiny_ckpt, real / "ck")
    (real / "notes.txt").write_text("keep me")
    os.symlink(real, tmp_path / "alias")
    before = tree(tmp_path)
    with pytest.raises(CheckpointError):
        convert_checkpoint(src, tmp_path / "alias", "fp8", force=True, progress=False)
    assert tree(tmp_path) == before


def test_convert_cli_overlap_is_one_line_exit_2(tiny_ckpt, tmp_path, capsys):
    src = copy_ckpt(tiny_ckpt, tmp_path / "d" / "inner" / "ck")
    (tmp_path / "d" / "x.txt").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "d"), "--to", "fp8", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert (tmp_path / "d" / "x.txt").read_text() == "x" and (src / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- malformed index
def write_index(path, raw: bytes) -> None:
    (path / INDEX_NAME).write_bytes(raw)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"weight_map": ["a", "b"]}', "weight_map"),
        (b'{"weight_map": {"model.norm.weight": 5}}', "model.norm.weight"),
        (b'{"weight_map": {"model.norm.weight": null}}', "model.norm.weight"),
        (b'{"metadata": {}}', "weight_map"),
        (b"[1, 2]", "weight_map"),
        (b'{"weight_map": {"k": "\xff\xfe.safetensors"}}', "UTF-8|JSON"),
        (b"\xff\xfe{", "UTF-8|JSON"),
    ],
)
def test_malformed_index_is_a_checkpoint_error(tiny_ckpt, tmp_path, capsys, raw, message):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    write_index(ck, raw)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_files(str(ck))
    assert main(["convert", str(ck), str(tmp_path / "out"), "--to", "fp8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def _redirect_index(ck, target: str) -> None:
    index = json.loads((ck / INDEX_NAME).read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = target
    (ck / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_paths_are_confined_to_the_checkpoint(tiny_ckpt, tmp_path, kind):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))[0]
    (elsewhere / "x.safetensors").write_bytes((ck / shard).read_bytes())
    if kind == "dotdot":
        target = "../elsewhere/x.safetensors"
    elif kind == "absolute":
        target = str(elsewhere / "x.safetensors")
    else:
        os.symlink(elsewhere / "x.safetensors", ck / "escape.safetensors")
        target = "escape.safetensors"
    _redirect_index(ck, target)
    with pytest.raises(CheckpointError, match="outside"):
        checkpoint_files(str(ck))
    with pytest.raises(CheckpointError, match="outside"):
        dsv3.DeepSeekV3.from_pretrained(ck)


def test_a_symlink_inside_the_checkpoint_is_fine(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    shard = sorted(f for f in os.listdir(ck) if f.endswith(".safetensors"))[0]
    os.rename(ck / shard, ck / "real.bin")
    os.symlink("real.bin", ck / shard)
    assert set(checkpoint_files(str(ck)).values()) >= {str(ck / shard)}


# ---------------------------------------------------------------------------------------------- config vs index
def _set_config(ck, **changes) -> None:
    cfg = json.loads((ck / "config.json").read_text())
    cfg.update(changes)
    (ck / "config.json").write_text(json.dumps(cfg))


def test_more_layers_in_config_than_in_the_index_fails_before_building(tiny_ckpt, tmp_path, capsys):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    _set_config(ck, num_hidden_layers=20000)
    t0 = time.perf_counter()
    assert main(["generate", "--model", str(ck), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    assert time.perf_counter() - t0 < 10  # it took 26 s and 1.8 GB before
    err = capsys.readouterr().err
    assert "20000" in err and "layer" in err and err.count("\n") == 1


def test_fewer_layers_in_config_than_in_the_index_is_named(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    _set_config(ck, num_hidden_layers=1, first_k_dense_replace=1)
    with pytest.raises(CheckpointError, match="layer"):
        dsv3.DeepSeekV3.from_pretrained(ck)


def test_expert_count_disagreeing_with_the_index_fails_before_building(tiny_ckpt, tmp_path):
    ck = copy_ckpt(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    n = cfg["n_routed_experts"]
    _set_config(ck, n_routed_experts=n * 4)
    with pytest.raises(CheckpointError, match=f"expert.*{n * 4}|{n * 4}.*expert"):
        dsv3.DeepSeekV3.from_pretrained(ck)
