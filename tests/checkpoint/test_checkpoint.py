"""Checkpoint layout, streaming load, atomic save, and clear errors for bad checkpoints."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv3
from dsv3 import CheckpointError
from dsv3.checkpoint.names import disk_to_memory, memory_to_disk


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path, max_shard_bytes=300_000)  # force several shards
    return model, path


def all_keys(path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def test_official_layout(saved):
    model, path = saved
    files = sorted(os.listdir(path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    keys = all_keys(path)
    assert set(keys.values()) == set(shards)
    L = model.config.num_hidden_layers
    # Per-expert official names, the MTP module at index L, the router bias.
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert f"model.layers.{L}.eh_proj.weight" in keys and f"model.layers.{L}.shared_head.head.weight" in keys
    assert f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "lm_head.weight" in keys
    assert not any(k.startswith("mtp.") or ".experts.gate_proj" in k for k in keys)
    # Stored tensor count matches the accounting with MTP.
    from dsv3 import accounting

    n = 0
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            n += sum(
                f.get_slice(k).get_shape().numel()
                if hasattr(f.get_slice(k).get_shape(), "numel")
                else int(torch.tensor(f.get_slice(k).get_shape()).prod())
                for k in f.keys()
            )
    assert n == accounting.total_parameters(model.config, mtp=True)


def test_round_trip_exact(saved):
    model, path = saved
    again = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))


def test_expert_rows_go_to_the_right_place(saved):
    model, path = saved
    keys = all_keys(path)
    key = "model.layers.2.mlp.experts.5.up_proj.weight"
    with safe_open(path / keys[key], "pt") as f:
        on_disk = f.get_tensor(key)
    assert torch.equal(on_disk, model.model.layers[2].mlp.experts.up_proj.weight[5])


def test_name_table_round_trip():
    assert disk_to_memory("model.layers.3.mlp.experts.17.gate_proj.weight", 61) == (
        "model.layers.3.mlp.experts.gate_proj.weight",
        17,
    )
    assert disk_to_memory("model.layers.61.mlp.experts.2.down_proj.weight_scale_inv", 61) == (
        "mtp.0.mlp.experts.down_proj.weight_scale_inv",
        2,
    )
    assert disk_to_memory("model.layers.61.enorm.weight", 61) == ("mtp.0.enorm.weight", None)
    assert memory_to_disk("mtp.0.eh_proj.weight", 61) == ["model.layers.61.eh_proj.weight"]
    assert memory_to_disk("model.layers.3.mlp.experts.up_proj.weight", 61, 2) == [
        "model.layers.3.mlp.experts.0.up_proj.weight",
        "model.layers.3.mlp.experts.1.up_proj.weight",
    ]


def test_mtp_loaded_or_skipped(saved):
    _, path = saved
    with_mtp = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32)
    without = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32, mtp=False)
    assert len(with_mtp.mtp) == 1 and len(without.mtp) == 0
    ids = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        assert torch.equal(with_mtp(ids), without(ids))  # layer 61 never enters the main stack


def test_bf16_load_keeps_router_bias_fp32(saved):
    model, path = saved
    m = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.bfloat16)
    gate = m.model.layers[1].mlp.gate
    assert m.lm_head.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, model.model.layers[1].mlp.gate.e_score_correction_bias)


def _copy_checkpoint(src, dst, edit):
    """Copy a checkpoint, letting edit(key, tensor) return a tensor, None (drop) or a dict (replace with)."""
    os.makedirs(dst)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        out = {}
        with safe_open(src / shard, "pt") as f:
            for k in f.keys():
                r = edit(k, f.get_tensor(k))
                if isinstance(r, dict):
                    out.update(r)
                elif r is not None:
                    out[k] = r
        save_file(out, dst / shard)
        new_map.update({k: shard for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": new_map}))
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_missing_tensor_is_named(saved, tmp_path):
    _, path = saved
    victim = "model.layers.1.self_attn.kv_b_proj.weight"
    _copy_checkpoint(path, tmp_path / "c", lambda k, t: None if k == victim else t)
    with pytest.raises(CheckpointError, match="missing.*" + victim.replace(".", r"\.")):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")


def test_missing_expert_is_named(saved, tmp_path):
    _, path = saved
    victim = "model.layers.2.mlp.experts.3.gate_proj.weight"
    _copy_checkpoint(path, tmp_path / "c", lambda k, t: None if k == victim else t)
    with pytest.raises(CheckpointError, match=r"experts.*\[3\]"):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, path = saved
    extra = {"model.layers.1.self_attn.rotary.inv_freq": torch.zeros(4)}
    _copy_checkpoint(path, tmp_path / "c", lambda k, t: {k: t, **extra} if k == "lm_head.weight" else t)
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.1.self_attn.rotary.inv_freq"):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")


def test_misshaped_tensor_is_named(saved, tmp_path):
    _, path = saved
    victim = "model.layers.0.mlp.up_proj.weight"
    _copy_checkpoint(path, tmp_path / "c", lambda k, t: t[:, :-1].contiguous() if k == victim else t)
    with pytest.raises(CheckpointError, match=victim.replace(".", r"\.") + ".*shape"):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")


def test_corrupt_shard_and_missing_dir(saved, tmp_path):
    _, path = saved
    _copy_checkpoint(path, tmp_path / "c", lambda k, t: t)
    shard = sorted(p for p in os.listdir(tmp_path / "c") if p.endswith(".safetensors"))[0]
    (tmp_path / "c" / shard).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=shard):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")
    with pytest.raises(CheckpointError, match="does not exist"):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "nope")


def test_crash_mid_save_leaves_previous_checkpoint(saved, tmp_path, monkeypatch):
    model, _path = saved
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_bytes=300_000)
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    import dsv3.checkpoint.save as save_mod

    calls = {"n": 0}
    real = save_mod.save_file

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr(save_mod, "save_file", failing)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    try:
        with pytest.raises(OSError, match="disk full"):
            model.save_pretrained(out, max_shard_bytes=300_000)
    finally:
        with torch.no_grad():
            model.lm_head.weight.sub_(1.0)
    after = {p: (out / p).read_bytes() for p in os.listdir(out)}
    assert after == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_meta_build_of_the_full_model_allocates_nothing():
    cfg = dsv3.ModelConfig.from_pretrained("deepseek-v3")
    with torch.device("meta"):
        model = dsv3.DeepSeekV3(cfg)
    assert model.num_parameters() == 671_026_419_200
    assert model.num_parameters(include_mtp=True) == 684_489_845_504
    assert all(p.is_meta for p in model.parameters())


def test_tied_embeddings_round_trip(tmp_path):
    cfg = dsv3.ModelConfig.from_pretrained("tiny", tie_word_embeddings=True, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg)
    model.save_pretrained(tmp_path / "t")
    assert "lm_head.weight" not in all_keys(tmp_path / "t")
    again = dsv3.DeepSeekV3.from_pretrained(tmp_path / "t", dtype=torch.float32)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    ids = torch.randint(0, 320, (1, 6))
    model.eval().prepare_for_inference(again.inference_options)  # the same kernels on both sides: exact equality
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
