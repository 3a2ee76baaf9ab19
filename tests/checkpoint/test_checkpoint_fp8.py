"""FP8 checkpoints end to end: load (dequantize while streaming, or keep FP8), run (dequant or FP8 GEMM),
save, convert, transformers parity, and a clear error for every kind of bad FP8 input.

Models: `tiny` (every matrix smaller than one 128x128 block: one partial block each), `edge` (hidden
200, expert hidden 136, ...: whole blocks plus partial edge blocks) and `tiny` with 16x24 blocks
from `weight_block_size` (many partial blocks, non-square). Each has an MTP layer, whose `eh_proj`
is FP8 too. Weights are N(0, 0.02) (embeddings N(0, 1)), norms 1 + N(0, 0.3), router logits and
`e_score_correction_bias` spread so routing depends on them: small enough that no layer amplifies
a rounding error into a different model, large enough that every layer contributes. Parameter
values are bf16 numbers, as in the official release (only the routing bias is float32).

Bounds, and why:
- dequantize while streaming vs an independent dequantization: exact (same fp32 product,
  rounded once), asserted with torch.equal on weights and 1e-5 on logits;
- FP8 kept in memory, dequantized on the fly: fp32 compute is the same arithmetic (1e-5); bf16
  compute is bit-identical to a model whose weights were dequantized to bf16 at load, and within
  BF16_REL = 1% of the largest fp32 logit (bf16 keeps 8 significant bits: 2**-9 = 0.2% per
  rounding, several roundings deep; measured 0.45-0.6%) at every position whose experts were the
  same in both runs, and in relative RMS over all positions;
- FP8 GEMM (activations quantized per token per 128 channels): per layer, every output is within the
  worst-case e4m3 rounding of its inputs, sum_k (|x_k|/16 + s_g/1024) |W_nk| (s_g: the activation
  group's scale), a bound that holds by construction; end to end, logits within GEMM_REL = 1% of the
  dequantized model where routing agrees (measured 0.1-0.25%), and an RMS error under 2x the one
  that quantizing the weights themselves costs (activation and weight blocks have the same 3-bit
  mantissa; measured 0.6-0.85x); greedy tokens agree wherever the reference's top-1 margin exceeds
  twice the bound. Dividing by the scales instead of multiplying breaks all of these by orders of
  magnitude (tested).

A near-tie between two experts' scores can go the other way under any rounding change: that is a
discrete switch, not a tolerance, so such tokens (at most 10% allowed, 0-2.5% seen) are counted and
left out of the per-position bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv3
from dsv3 import CheckpointError, accounting
from dsv3.checkpoint import convert as convert_mod
from dsv3.checkpoint.convert import add_commands, convert_checkpoint
from dsv3.checkpoint.names import disk_to_memory, is_fp8_quantizable
from dsv3.kernels import fp8 as fp8_kernels
from dsv3.kernels.fp8 import FP8_DTYPE, act_quant, dequantize_blocks, quantize_blocks
from dsv3.model.linear import ExpertLinear, Linear
from dsv3.model.moe import Router
from dsv3.model.options import InferenceOptions

BF16_REL = 1e-2
GEMM_REL = 1e-2
EDGE = {
    "hidden_size": 200,
    "intermediate_size": 300,
    "moe_intermediate_size": 136,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "q_lora_rank": 136,
    "kv_lora_rank": 144,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 8,
    "n_group": 4,
    "topk_group": 2,
    "num_experts_per_tok": 2,
    "vocab_size": 300,
}
FP8_16x24 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 24]}
CONFIGS = {"tiny": {}, "edge": EDGE, "blocks16x24": {"quantization_config": FP8_16x24}}


def build(name: str, dtype: torch.dtype = torch.float32) -> dsv3.DeepSeekV3:
    """A random model whose every weight matters (see module doc), in `dtype`."""
    cfg = dsv3.ModelConfig.from_pretrained("tiny", **CONFIGS[name])
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("gate.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in n:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
        # bf16 values (as the official release has them) whatever the dtype: converting to bf16 is then lossless.
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16))
    return model.to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def rms_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def routed_logits(model: dsv3.DeepSeekV3, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, the experts each MoE layer chose per token, sorted) for one forward pass."""
    routes: list[torch.Tensor] = []

    def keep(module, args, out) -> None:
        routes.append(out[0].sort(dim=-1).values)

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            return model(ids), routes
    finally:
        for h in hooks:
            h.remove()


def same_routing(a: list[torch.Tensor], b: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """(B, T) bool: every MoE layer chose the same experts for this token in both runs."""
    return torch.stack([(x == y).all(dim=-1) for x, y in zip(a, b)]).all(dim=0).view(shape)


def per_position_err(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """(B, T): the largest logit error at each position, relative to the largest reference logit."""
    return (got.float() - want.float()).abs().amax(dim=-1) / want.float().abs().max()


def disk_state(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by official key."""
    out = {}
    for shard in sorted(p for p in os.listdir(path) if p.endswith(".safetensors")):
        with safe_open(os.path.join(path, shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bits (fp8 compared as bytes: no NaN-equality pitfalls)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype == FP8_DTYPE:
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
        else:
            assert torch.equal(a[k], b[k]), k


def expand_dequantize(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Independent of dsv3.kernels: torch's own fp8 cast times the scale repeated out to every element, in fp32."""
    per_element = s.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: w.shape[0], : w.shape[1]]
    return w.float() * per_element


def rewrite(src, dst, edit=lambda k, t: t, config_edit=None, split=None) -> None:
    """Copy a checkpoint; edit(key, tensor) returns a tensor, None (drop) or a dict (replace with);
    split(key) -> shard name overrides where a key goes; config_edit(dict) changes config.json in place."""
    os.makedirs(dst)
    weight_map, shards = {}, {}
    for key, t in disk_state(src).items():
        r = edit(key, t)
        items = r.items() if isinstance(r, dict) else [] if r is None else [(key, r)]
        for k, v in items:
            name = split(k) if split else "model-00001-of-00001.safetensors"
            shards.setdefault(name, {})[k] = v.contiguous()
            weight_map[k] = name
    for name, tensors in shards.items():
        save_file(tensors, os.path.join(dst, name))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", params=sorted(CONFIGS))
def fp8_ckpt(request, tmp_path_factory):
    """(name, fp32 original, FP8 checkpoint path); small shards so weights and scales spread over several."""
    model = build(request.param)
    path = tmp_path_factory.mktemp(request.param) / "fp8"
    model.save_pretrained(path, fp8=True, max_shard_bytes=150_000)
    return request.param, model, path


@pytest.fixture(scope="module")
def loaded(fp8_ckpt):
    """The checkpoint loaded twice in fp32: weights dequantized while loading, and kept in FP8 (mode "dequant")."""
    _, _, path = fp8_ckpt
    return (
        dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32),
        dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32, fp8=True),
    )


@contextlib.contextmanager
def fp8_mode(model: dsv3.DeepSeekV3, mode: str):
    """Every FP8 Linear computes in `mode` inside the block (through prepare_for_inference, the one place)."""
    previous = model.inference_options
    model.prepare_for_inference(InferenceOptions(fp8_compute=mode))
    fp8_layers = [m for m in model.modules() if isinstance(m, Linear) and m.is_fp8]
    assert fp8_layers and all(m.options.fp8_compute == mode for m in fp8_layers)
    try:
        yield model
    finally:
        model.prepare_for_inference(previous)


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "fp8"
    build("tiny").save_pretrained(path, fp8=True, max_shard_bytes=150_000)
    return path


def prompts(vocab: int, n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------------------------- (a) dequantize while loading
def test_layout_on_disk(fp8_ckpt):
    """Exactly the official set is FP8 (kv_a_proj_with_mqa and the MTP eh_proj included), scales per block."""
    _name, model, path = fp8_ckpt
    disk = disk_state(path)
    block = model.config.fp8_block_size or (128, 128)
    fp8_keys = {k for k, t in disk.items() if t.dtype == FP8_DTYPE}
    assert fp8_keys == {k for k in disk if is_fp8_quantizable(k)}
    L = model.config.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in fp8_keys
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8_keys
    assert not fp8_keys & {"lm_head.weight", "model.embed_tokens.weight", f"model.layers.{L}.shared_head.head.weight"}
    for k in fp8_keys:
        rows, cols = disk[k].shape
        assert disk[k + "_scale_inv"].shape == (-(-rows // block[0]), -(-cols // block[1])), k
        assert disk[k + "_scale_inv"].dtype == torch.float32
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(block)


def test_dequantize_while_loading_matches_independent_dequant(fp8_ckpt):
    _name, model, path = fp8_ckpt
    cfg = model.config
    block = cfg.fp8_block_size or (128, 128)
    disk = disk_state(path)
    # The independent model: dequantized by expand_dequantize of the saved tensors, stacked by hand, strict load.
    state: dict[str, torch.Tensor] = {}
    for key, t in disk.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype == FP8_DTYPE:
            t = expand_dequantize(t, disk[key + "_scale_inv"], block)
        mem, row = disk_to_memory(key, cfg.num_hidden_layers)
        if row is None:
            state[mem] = t.float()
        else:
            state.setdefault(mem, {})[row] = t.float()
    state = {k: torch.stack([v[e] for e in sorted(v)]) if isinstance(v, dict) else v for k, v in state.items()}
    ref = dsv3.DeepSeekV3(cfg.replace(quantization_config=None)).eval()
    ref.load_state_dict(state, strict=True)

    loaded = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32)
    assert len(loaded.mtp) == 1
    got = loaded.state_dict()
    for k, v in ref.state_dict().items():
        assert got[k].dtype == torch.float32 and torch.equal(got[k], v), k
    ids = prompts(cfg.vocab_size, 2, 24, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ref(ids), rtol=0, atol=1e-5)
        h = loaded.hidden_states(ids)
        got_mtp, _ = loaded.mtp_logits(h[:, :-1], ids[:, 1:])
        ref_mtp, _ = ref.mtp_logits(ref.hidden_states(ids)[:, :-1], ids[:, 1:])
        torch.testing.assert_close(got_mtp, ref_mtp, rtol=0, atol=1e-5)
        # Non-vacuous: the FP8 model is not the original one (quantization moved the logits).
        assert rel_err(loaded(ids), model(ids)) > 1e-4


# ---------------------------------------------------------------------------------------------- (b) FP8 in memory
def test_fp8_in_memory_dequant_on_the_fly(fp8_ckpt, loaded):
    _name, model, path = fp8_ckpt
    cfg = model.config
    ref32, kept32 = loaded
    kept16 = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.bfloat16, fp8=True)
    ref16 = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.bfloat16)
    for m in (kept32, kept16):
        fp8_modules = {n for n, mod in m.named_modules() if isinstance(mod, (Linear, ExpertLinear)) and mod.is_fp8}
        assert "mtp.0.eh_proj" in fp8_modules and "model.layers.1.mlp.experts.down_proj" in fp8_modules
        assert {n for n, mod in m.named_modules() if isinstance(mod, Linear) and not mod.is_fp8} == {
            "lm_head",
            "mtp.0.shared_head.head",
        }
        assert m.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ids = prompts(cfg.vocab_size, 4, 32, seed=4)
    want32, routes32 = routed_logits(ref32, ids)
    got16, routes16 = routed_logits(kept16, ids)
    with torch.no_grad():
        torch.testing.assert_close(kept32(ids), want32, rtol=0, atol=1e-5)
        assert torch.equal(got16, ref16(ids))  # same bf16 weights (one fp32 product, rounded once), same ops
    # bf16 vs fp32: rounding, except where a near-tie between two experts went the other way (a discrete
    # change, not a tolerance): those tokens are counted, and left out of the per-position bound.
    agree = same_routing(routes16, routes32, ids.shape)
    assert agree.float().mean() >= 0.9
    assert per_position_err(got16, want32)[agree].max() < BF16_REL
    assert rms_err(got16, want32) < BF16_REL


def test_fp8_in_memory_bytes_match_accounting(fp8_ckpt):
    """About 1 byte per FP8 parameter: parameters + checkpoint buffers are exactly the accounting's FP8 bytes."""
    name, _, path = fp8_ckpt
    bf16 = build(name, torch.bfloat16)
    saved = path.parent / "from_bf16"
    if not saved.exists():
        bf16.save_pretrained(saved, fp8=True)
    kept = dsv3.DeepSeekV3.from_pretrained(saved, dtype=torch.bfloat16, fp8=True)
    held = sum(t.numel() * t.element_size() for t in kept.state_dict().values())
    # The router weight is bf16 on disk (as the accounting counts it) but kept float32 in memory: +2 bytes each.
    router = sum(m.weight.numel() for m in kept.modules() if isinstance(m, Router))
    assert held == accounting.weight_bytes(kept.config, "fp8", mtp=True) + 2 * router
    assert held < 0.75 * accounting.weight_bytes(kept.config, "bf16", mtp=True)


def test_loaded_model_keeps_no_shard_mapped(tiny_fp8):
    """safetensors' get_tensor is zero-copy: a tensor kept as stored would keep its whole shard mapped, and
    every page read from it for other tensors resident, for the model's lifetime (RSS ~ model + checkpoint)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    for fp8 in (False, True):
        model = dsv3.DeepSeekV3.from_pretrained(tiny_fp8, dtype=None, fp8=fp8)  # stored dtypes: nothing converted
        gc.collect()
        with open("/proc/self/maps") as f:
            assert not [line for line in f if str(tiny_fp8) in line]
        assert model.model.embed_tokens.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- (c) FP8 GEMM
def test_fp8_gemm_layers_within_activation_rounding(fp8_ckpt, loaded, monkeypatch):
    """Each FP8 Linear in "gemm" mode, fed the reference model's own inputs, is within e4m3 rounding of them."""
    _name, model, _path = fp8_ckpt
    cfg = model.config
    ref, kept = loaded
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def hook(module, args, out) -> None:  # returns None: the output is left alone
            inputs.setdefault(name, args[0].detach())

        return hook

    hooks = [mod.register_forward_hook(keep_input(n)) for n, mod in ref.named_modules() if isinstance(mod, Linear)]
    ids = prompts(cfg.vocab_size, 2, 20, seed=5)
    with torch.no_grad():
        ref.mtp_logits(ref.hidden_states(ids)[:, :-1], ids[:, 1:])  # the MTP layer (eh_proj) too
    for h in hooks:
        h.remove()
    modules = dict(kept.named_modules())
    fp8_names = [n for n in inputs if modules[n].is_fp8]
    assert "mtp.0.eh_proj" in fp8_names and "model.layers.0.self_attn.kv_b_proj" in fp8_names

    def worst_ratio() -> float:
        worst = 0.0
        for n in fp8_names:
            x, w = inputs[n], dict(ref.named_modules())[n].weight  # w: the dequantized fp32 weight
            with torch.no_grad():
                got, want = modules[n](x), x @ w.T
            s = act_quant(x, 128)[1].repeat_interleave(128, -1)[..., : x.shape[-1]]  # each element's group scale
            bound = (x.abs() / 16 + s / 1024) @ w.abs().T + 1e-5 * (x.abs() @ w.abs().T) + 1e-12
            worst = max(worst, ((got - want).abs() / bound).max().item())
        return worst

    with fp8_mode(kept, "gemm"):
        ratio = worst_ratio()
        assert 0.01 < ratio <= 1.0  # within the bound, and activations really were quantized
        monkeypatch.setattr(fp8_kernels, "dequantize_blocks", divide_instead)
        assert worst_ratio() > 10.0


def divide_instead(weight_fp8, scale_inv, block=(128, 128), dtype=torch.bfloat16):
    """The classic bug: q / scale_inv instead of q * scale_inv."""
    return dequantize_blocks(weight_fp8, 1.0 / scale_inv.float(), block, dtype)


def test_fp8_gemm_model_close_to_dequantized_and_greedy_agrees(fp8_ckpt, loaded, monkeypatch):
    _name, model, _path = fp8_ckpt
    cfg = model.config
    ref, kept = loaded
    ids = prompts(cfg.vocab_size, 4, 32, seed=6)
    # Greedy continuations of a prompt pool: the reference's, and its logits along them (teacher forcing).
    pool = prompts(cfg.vocab_size, 32, 8, seed=7).tolist()
    ref_new = dsv3.generate(ref, pool, max_new_tokens=6, stop_token_ids=[])
    seqs = torch.tensor([p + a for p, a in zip(pool, ref_new)])
    (want, routes), (want_seq, seq_routes) = routed_logits(ref, ids), routed_logits(ref, seqs)
    with torch.no_grad():
        orig = model(ids)
    with fp8_mode(kept, "gemm"):
        (got, got_routes), (got_seq, got_seq_routes) = routed_logits(kept, ids), routed_logits(kept, seqs)
        got_new = dsv3.generate(kept, pool, max_new_tokens=6, stop_token_ids=[])
        monkeypatch.setattr(fp8_kernels, "dequantize_blocks", divide_instead)
        with torch.no_grad():
            divided = kept(ids)
    # As for bf16: a near-tie between experts may go the other way (counted, left out of the bound).
    agree = same_routing(got_routes, routes, ids.shape)
    assert agree.float().mean() >= 0.9
    assert per_position_err(got, want)[agree].max() < GEMM_REL
    assert rms_err(got, want) < 2 * rms_err(orig, want), (rms_err(got, want), rms_err(orig, want))
    assert rel_err(divided, want) > 10 * GEMM_REL  # the classic bug is far outside the bound
    # Greedy: wherever the reference's top-1 leads by more than twice the bound (and routing agrees), no
    # error within the bound can change the argmax.
    want_seq, got_seq = want_seq[:, 7:-1], got_seq[:, 7:-1]  # the 6 positions that chose the new tokens
    top2 = want_seq.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * GEMM_REL * want_seq.abs().max()  # (prompts, steps)
    clear_routed = clear & same_routing(got_seq_routes, seq_routes, seqs.shape)[:, 7:-1]
    assert clear_routed.float().mean() > 0.5
    assert torch.equal(got_seq.argmax(-1)[clear_routed], want_seq.argmax(-1)[clear_routed])
    # Free-running (latent cache, absorbed decode): prompts whose reference continuation is clear at every
    # step (chosen from the reference alone) get exactly the same tokens; near-ties elsewhere may differ.
    decisive = clear.all(dim=-1).tolist()
    assert sum(decisive) >= 5
    assert all(a == b for a, b, d in zip(ref_new, got_new, decisive) if d)
    assert sum(a == b for a, b in zip(ref_new, got_new)) >= 0.75 * len(pool)


# ---------------------------------------------------------------------------------------------- (d) transformers parity
def test_parity_with_transformers_on_our_dequantized_checkpoint(fp8_ckpt, tmp_path):
    """Our FP8 checkpoint -> `convert --to bf16` -> transformers (fp32) vs our model loading the FP8 checkpoint.

    transformers is not given the FP8 checkpoint itself: its dequantizer infers the block as
    dim / scale-grid size, wrong for partial edge blocks (a [200, 300] weight becomes 100x100 blocks).
    """
    pytest.importorskip("transformers")
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    _name, model, path = fp8_ckpt
    convert_checkpoint(path, tmp_path / "bf16", "bf16", progress=False)
    hf_logging.set_verbosity_error()  # it does not know the MTP layer and says so at length
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ours = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.bfloat16).float()  # FP8 -> bf16 as converted, fp32 math
    ids = prompts(model.config.vocab_size, 2, 40, seed=8)
    with torch.no_grad():
        ref, got = hf(ids).logits.float(), ours(ids)
    assert rel_err(got, ref) < 1e-4
    prompt = prompts(model.config.vocab_size, 1, 9, seed=9)
    with torch.no_grad():
        hf_new = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert dsv3.generate(ours, prompt.tolist(), max_new_tokens=8, stop_token_ids=[])[0] == hf_new[0, 9:].tolist()


# ---------------------------------------------------------------------------------------------- round trips
def test_bf16_fp8_bf16_round_trip_is_the_block_dequantization(tmp_path):
    model = build("blocks16x24", torch.bfloat16)  # many partial blocks, few operations
    block = model.config.fp8_block_size
    model.save_pretrained(tmp_path / "bf16", max_shard_bytes=400_000)
    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8", block_size=block, progress=False)
    # The converter writes what the saver writes, bit for bit.
    model.save_pretrained(tmp_path / "saved_fp8", fp8=True)
    assert_same_tensors(disk_state(tmp_path / "fp8"), disk_state(tmp_path / "saved_fp8"))
    convert_checkpoint(tmp_path / "fp8", tmp_path / "back", "bf16", progress=False)
    dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16).save_pretrained(tmp_path / "back2")
    original = disk_state(tmp_path / "bf16")
    expected = {}
    for k, t in original.items():
        expected[k] = dequantize_blocks(*quantize_blocks(t, block), block) if is_fp8_quantizable(k) else t
    assert_same_tensors(disk_state(tmp_path / "back"), expected)
    assert_same_tensors(disk_state(tmp_path / "back2"), expected)
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_fp8_fp8_round_trip_is_bit_identical(tiny_fp8, tmp_path):
    kept = dsv3.DeepSeekV3.from_pretrained(tiny_fp8, dtype=None, fp8=True)  # stored dtypes, FP8 kept
    kept.save_pretrained(tmp_path / "again", fp8=True)
    assert_same_tensors(disk_state(tmp_path / "again"), disk_state(tiny_fp8))
    convert_checkpoint(tiny_fp8, tmp_path / "converted", "fp8", progress=False)
    assert_same_tensors(disk_state(tmp_path / "converted"), disk_state(tiny_fp8))
    for out in ("again", "converted"):
        cfg = json.loads((tmp_path / out / "config.json").read_text())
        assert cfg["quantization_config"] == json.loads((tiny_fp8 / "config.json").read_text())["quantization_config"]


def test_scale_fmt_survives_a_save(tiny_fp8, tmp_path):
    """V3.1 checkpoints add `scale_fmt` to quantization_config; re-saving an FP8 model keeps it."""
    rewrite(tiny_fp8, tmp_path / "v31", config_edit=lambda c: c["quantization_config"].update(scale_fmt="ue8m0"))
    dsv3.DeepSeekV3.from_pretrained(tmp_path / "v31", fp8=True).save_pretrained(tmp_path / "out", fp8=True)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


# ---------------------------------------------------------------------------------------------- convert
def test_convert_shard_by_shard_with_tokenizer_and_index(tiny_fp8, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    rewrite(tiny_fp8, src, split=lambda k: f"model-0000{1 + hash(k) % 3}-of-00003.safetensors")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "notes.txt"):
        (src / f).write_text("{}")
    written = []
    real = convert_mod.save_file
    monkeypatch.setattr(
        convert_mod, "save_file", lambda t, f, metadata=None: (written.append(set(t)), real(t, f, metadata=metadata))
    )
    counts = convert_checkpoint(src, tmp_path / "out", "bf16", progress=True)
    assert "convert to bf16" in capsys.readouterr().err  # the tqdm bar, on stderr
    # One output shard per input shard, holding that shard's tensors (their scales consumed, wherever they were).
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    per_shard = [
        {k for k, s in index.items() if s == shard and not k.endswith("_scale_inv")}
        for shard in sorted(set(index.values()))
    ]
    assert written == per_shard and counts["shards"] == 3
    out = tmp_path / "out"
    new_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(new_index["weight_map"]) == set().union(*per_shard)
    assert sorted(set(new_index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert new_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in disk_state(out).values())
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} < set(
        os.listdir(out)
    ) and "notes.txt" not in os.listdir(out)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    # Scales in other shards were found: the result is what loading in bf16 and saving makes of the original.
    dsv3.DeepSeekV3.from_pretrained(tiny_fp8, dtype=torch.bfloat16).save_pretrained(tmp_path / "saved")
    assert_same_tensors(disk_state(out), disk_state(tmp_path / "saved"))


def test_scales_in_another_shard_load_in_both_modes(tiny_fp8, tmp_path):
    src = tmp_path / "split"
    rewrite(tiny_fp8, src, split=lambda k: "scales.safetensors" if k.endswith("_scale_inv") else "weights.safetensors")
    ids = prompts(320, 1, 12, seed=10)
    with torch.no_grad():
        want = dsv3.DeepSeekV3.from_pretrained(tiny_fp8, dtype=torch.float32)(ids)
        for fp8 in (False, True):
            torch.testing.assert_close(
                dsv3.DeepSeekV3.from_pretrained(src, dtype=torch.float32, fp8=fp8)(ids), want, rtol=0, atol=1e-5
            )


def test_convert_block_size_comes_from_the_config(tmp_path):
    model = build("tiny", torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    convert_checkpoint(tmp_path / "bf16", tmp_path / "fp8", "fp8", block_size=(16, 24), progress=False)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert cfg["weight_block_size"] == [16, 24] and cfg["fmt"] == "e4m3" and cfg["quant_method"] == "fp8"
    disk = disk_state(tmp_path / "fp8")
    assert disk["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (4, 6)  # [64, 128] in 16x24 blocks
    loaded = dsv3.DeepSeekV3.from_pretrained(tmp_path / "fp8", dtype=torch.float32, fp8=True)
    assert loaded.model.layers[0].mlp.down_proj.block_size == (16, 24)
    with pytest.raises(CheckpointError, match="re-blocking"):
        convert_checkpoint(tmp_path / "fp8", tmp_path / "x", "fp8", block_size=(128, 128))


def test_convert_refuses_to_overwrite_and_cleans_up(tiny_fp8, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="exists.*--force"):
        convert_checkpoint(tiny_fp8, out, "bf16")
    with pytest.raises(CheckpointError, match="is the input"):
        convert_checkpoint(tiny_fp8, tiny_fp8, "bf16", force=True)
    with pytest.raises(CheckpointError, match="unknown conversion target 'int4'"):
        convert_checkpoint(tiny_fp8, tmp_path / "x", "int4")

    def disk_full(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(convert_mod, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(tiny_fp8, out, "bf16", force=True)
    assert os.listdir(out) == ["keep.txt"] and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    monkeypatch.undo()
    convert_checkpoint(tiny_fp8, out, "bf16", force=True, progress=False)
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_convert_command(tiny_fp8, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="dsv3")
    add_commands(parser.add_subparsers(dest="command"))
    (tmp_path / "out").mkdir()  # an existing but empty directory is not "overwriting"
    args = parser.parse_args(["convert", str(tiny_fp8), str(tmp_path / "out"), "--to", "bf16"])
    assert args.fn(args) == 0
    assert "dequantized" in capsys.readouterr().out
    assert dsv3.DeepSeekV3.from_pretrained(tmp_path / "out").lm_head.weight.dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", str(tiny_fp8), str(tmp_path / "o2"), "--to", "int4"])


# ---------------------------------------------------------------------------------------------- bad input
Q_A = "model.layers.0.self_attn.q_a_proj.weight"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


def _drop(victim):
    return lambda k, t: None if k == victim else t


def _misshape(victim):
    return lambda k, t: torch.cat([t, t]) if k == victim else t


BAD = {
    # case: (tensor edit, config edit, regex for the one-line error of from_pretrained and of convert)
    "missing scale": (_drop(Q_A + "_scale_inv"), None, f"{Q_A} has no {Q_A}_scale_inv"),
    "missing expert scale": (_drop(EXPERT + "_scale_inv"), None, f"{EXPERT} has no {EXPERT}_scale_inv"),
    "mis-shaped scale": (_misshape(Q_A + "_scale_inv"), None, f"{Q_A}_scale_inv.*shape"),
    "mis-shaped expert scale": (_misshape(EXPERT + "_scale_inv"), None, f"{EXPERT}_scale_inv.*shape"),
    "orphan scale": (
        lambda k, t: {k: t, "model.layers.0.self_attn.x_proj.weight_scale_inv": torch.ones(1, 1)} if k == Q_A else t,
        None,
        "x_proj.weight_scale_inv has no weight",
    ),
    "scale beside a bf16 weight": (
        lambda k, t: {k: t, "lm_head.weight_scale_inv": torch.ones(3, 1)} if k == "lm_head.weight" else t,
        None,
        "lm_head.weight has a weight_scale_inv but",
    ),
    "unknown fmt": (None, lambda c: c["quantization_config"].update(fmt="e5m2"), "fmt 'e5m2' is not supported"),
    "bad block size": (None, lambda c: c["quantization_config"].update(weight_block_size=[128]), "weight_block_size"),
    # A valid block size that is not the one the scales were made with: every scale is then mis-shaped.
    "other block size": (
        None,
        lambda c: c["quantization_config"].update(weight_block_size=[16, 16]),
        r"weight_scale_inv.*shape",
    ),
    "fp8 in a bf16 config": (None, lambda c: c.pop("quantization_config"), r"model\..*weight.*quantization_config"),
    "fp8 without scales in a bf16 config": (
        lambda k, t: None if k.endswith("_scale_inv") else t,
        lambda c: c.pop("quantization_config"),
        r"(FP8 tensor model\.\S+ has no|model\.\S+ is F8_E4M3 but)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fp8_checkpoint_is_one_clear_error(tiny_fp8, tmp_path, case):
    edit, config_edit, message = BAD[case]
    bad = tmp_path / "bad"
    rewrite(tiny_fp8, bad, edit or (lambda k, t: t), config_edit)
    for load in (
        lambda: dsv3.DeepSeekV3.from_pretrained(bad),
        lambda: dsv3.DeepSeekV3.from_pretrained(bad, fp8=True),
        lambda: convert_checkpoint(bad, tmp_path / "out", "bf16"),
        lambda: convert_checkpoint(bad, tmp_path / "out8", "fp8"),
    ):
        with pytest.raises(CheckpointError, match=message) as info:
            load()
        assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # nothing written


def test_scaled_weight_of_any_name_is_fp8(tiny_fp8, tmp_path):
    """lm_head and even the embedding, quantized with a scale beside them, load as FP8 (dequantized where needed)."""
    extra = {"lm_head.weight", "model.embed_tokens.weight"}

    def quantize_more(k, t):
        if k in extra:
            q, s = quantize_blocks(t, (128, 128))
            return {k: q, k + "_scale_inv": s}
        return t

    rewrite(tiny_fp8, tmp_path / "more", quantize_more)
    disk = disk_state(tmp_path / "more")
    deq = dsv3.DeepSeekV3.from_pretrained(tmp_path / "more", dtype=torch.float32)
    kept = dsv3.DeepSeekV3.from_pretrained(tmp_path / "more", dtype=torch.float32, fp8=True)
    for k in extra:
        want = expand_dequantize(disk[k], disk[k + "_scale_inv"], (128, 128))
        assert torch.equal(deq.state_dict()[k], want)
    assert kept.lm_head.is_fp8 and kept.model.embed_tokens.weight.dtype == torch.float32  # no FP8 embedding lookup
    ids = prompts(320, 1, 10, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), deq(ids), rtol=0, atol=1e-5)
    convert_checkpoint(tmp_path / "more", tmp_path / "bf16", "bf16", progress=False)
    assert torch.equal(disk_state(tmp_path / "bf16")["lm_head.weight"], deq.lm_head.weight.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- the fast dequantization
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "shape, block",
    [
        ((256, 384), (128, 128)),
        ((200, 300), (128, 128)),
        ((3, 130, 260), (128, 128)),
        ((37, 50), (16, 24)),
        ((5, 260), (1, 128)),
        ((1, 7), (128, 128)),
    ],
)
def test_dequantize_blocks_is_bit_identical_to_the_reference(shape, block, dtype):
    """Every code (NaN codes included), with scales from subnormal to huge, rounds to the reference's bits."""
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    q.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[: q.numel()]
    q = q.view(FP8_DTYPE)
    grid = (*shape[:-2], -(-shape[-2] // block[0]), -(-shape[-1] // block[1]))
    s = torch.exp(torch.randn(grid, generator=g) * 8)  # e**+-24 and beyond: products over- and underflow dtype
    s.view(-1)[:4] = torch.tensor([1e-38, 3.0, 1e30, 2.0**-20])[: s.numel()]
    got = fp8_kernels.dequantize_blocks(q, s, block, dtype)
    want = fp8_kernels.dequantize_blocks_reference(q, s, block, dtype)
    assert got.dtype == dtype and got.shape == q.shape
    assert got.is_contiguous()
    assert torch.equal(got.view(-1).view(torch.int8), want.contiguous().view(-1).view(torch.int8))
