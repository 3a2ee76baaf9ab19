"""Loading and saving what the family's checkpoints hold: rotary inv_freq tensors, INT4, V3.1's ue8m0 scales."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import CheckpointError
from dsv3.presets import KIMI_K2_THINKING, TINY


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"), dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model.save_pretrained(path)
    return model, path


def _rewrite_single_shard(src, dst, edit) -> None:
    """Copy a one-shard checkpoint, letting `edit` change its tensor dict."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    (shard,) = set(index["weight_map"].values())
    tensors = edit(load_file(src / shard))
    save_file(tensors, dst / shard, metadata={"format": "pt"})
    index["weight_map"] = {k: shard for k in tensors}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_rotary_inv_freq_tensors_are_skipped_with_a_note(saved, tmp_path, capsys):
    model, path = saved
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.arange(4.0) for i in range(3)}
    _rewrite_single_shard(path, tmp_path / "c", lambda t: {**t, **inv_freq})
    loaded = dsv3.DeepSeekV3.from_pretrained(tmp_path / "c", dtype=torch.float32)
    err = capsys.readouterr().err
    assert "skipped 3 rotary_emb.inv_freq tensor(s)" in err and len(err.strip().splitlines()) == 1
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(0))
    plain = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32)  # without the extra tensors, same options
    with torch.no_grad():
        assert torch.equal(loaded(ids), plain(ids))
        assert torch.allclose(plain(ids), model(ids), atol=1e-5)


def test_other_unknown_tensors_stay_refused(saved, tmp_path):
    _, path = saved
    extra = {"model.layers.0.self_attn.rotary_emb.cos_cached": torch.zeros(4)}
    _rewrite_single_shard(path, tmp_path / "c", lambda t: {**t, **extra})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.rotary_emb.cos_cached"):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")


def test_int4_checkpoint_is_refused_by_name(saved, tmp_path):
    _, path = saved
    _rewrite_single_shard(path, tmp_path / "c", lambda t: t)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config.update(model_type="kimi_k2", quantization_config=KIMI_K2_THINKING["quantization_config"])
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="INT4 weights .*compressed-tensors.*Kimi-K2-Thinking.*cannot be loaded"):
        dsv3.DeepSeekV3.from_pretrained(tmp_path / "c")


def _scales(path) -> list[torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = []
    for shard in sorted(set(index["weight_map"].values())):
        out += [t for k, t in load_file(path / shard).items() if k.endswith("weight_scale_inv")]
    return out


@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_fp8_save_follows_scale_fmt(tmp_path, scale_fmt):
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}
    if scale_fmt:
        q["scale_fmt"] = scale_fmt
    cfg = dsv3.ModelConfig.from_dict({**TINY, "quantization_config": q})
    assert cfg.fp8_scale_fmt == scale_fmt
    torch.manual_seed(1)
    model = dsv3.DeepSeekV3(cfg, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "c", fp8=True)
    scales = torch.cat([s.flatten() for s in _scales(tmp_path / "c")])
    powers_of_two = torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    assert powers_of_two is (scale_fmt == "ue8m0")
    saved_q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert saved_q.get("scale_fmt") == scale_fmt
    # Rounding the scale up keeps every value in range: the dequantized weights stay close.
    loaded = dsv3.DeepSeekV3.from_pretrained(tmp_path / "c", dtype=torch.float32)
    w, back = model.model.layers[0].self_attn.o_proj.weight, loaded.model.layers[0].self_attn.o_proj.weight
    assert ((back - w).abs().max() / w.abs().max()).item() < 0.07


def test_v2_lite_shaped_checkpoint_converts_to_fp8_and_runs(tmp_path):
    """The 32 GB CPU recipe of docs/family.md on a shrunk V2-Lite: bf16 -> `convert --to fp8` -> load with fp8."""
    from hf_reference import family_configs, randomize_, shrink

    from dsv3.checkpoint.convert import convert_checkpoint

    cfg = dsv3.ModelConfig.from_dict(shrink(family_configs()["deepseek-v2-lite-chat"]))
    model = dsv3.DeepSeekV3(cfg, dtype=torch.bfloat16).eval()
    randomize_(model, seed=3)
    model.save_pretrained(tmp_path / "bf16")
    (tmp_path / "bf16" / "tiktoken.model").write_text("aGk= 0\n")  # copied along, whatever it holds
    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8")
    assert (tmp_path / "fp8" / "tiktoken.model").read_text() == "aGk= 0\n"
    fp8 = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, fp8=True)
    assert fp8.model.layers[1].mlp.experts.gate_proj.is_fp8 and fp8.config.model_type == "deepseek_v2"
    # FP8 weights computed as stored give what their dequantized bf16 copy gives.
    dequantized = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    ids = torch.randint(2, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = dequantized(ids).float(), fp8(ids).float()
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.02
