"""The model through the native kernels (matvec='native') against torch's kernels: same logits to bf16 precision."""

import pytest
import torch

import dsv3
from dsv3 import InferenceOptions
from dsv3.inference.generate import decode_step, prefill
from dsv3.kernels import native
from dsv3.model import native_decode
from dsv3.model.cache import LatentCache
from dsv3.model.moe import choose_strategy

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need x86-64 with AVX2 and a C compiler")

PROMPTS = [[5, 9, 13, 2], [7] * 11, [100, 3, 250]]


def _model(cfg: dsv3.ModelConfig, dtype: torch.dtype) -> dsv3.DeepSeekV3:
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)  # routing decided by the bias too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _decode_logits(
    model: dsv3.DeepSeekV3, options: InferenceOptions, dtype: torch.dtype, steps: int = 6, cache_dtype=None
):
    """Logits of a ragged batch of 3: prefill, then `steps` teacher-forced decode steps (the same tokens for both)."""
    model.prepare_for_inference(options)
    cache = LatentCache(model.config, 3, 32, dtype=cache_dtype or dtype)
    slots = [cache.allocate() for _ in PROMPTS]
    out = [prefill(model, cache, slots, PROMPTS)]
    for step in range(steps):
        out.append(decode_step(model, cache, slots, [11 + step, 40 + step, 7]))
    return torch.stack(out).float()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_native_decode_matches_torch_kernels(tiny_cfg, quantize):
    dtype = torch.bfloat16
    torch_out = _decode_logits(_model(tiny_cfg, dtype), InferenceOptions(matvec="mkl", quantize=quantize), dtype)
    model = _model(tiny_cfg, dtype)
    native_out = _decode_logits(model, InferenceOptions(matvec="native", quantize=quantize), dtype)
    experts = model.model.layers[1].mlp.experts
    rows = torch.zeros(tiny_cfg.num_experts_per_tok, tiny_cfg.hidden_size, dtype=dtype)
    with torch.no_grad():
        assert choose_strategy(experts, rows) == "native"  # what the decode steps above ran
    rel = (native_out - torch_out).norm() / torch_out.norm()
    assert rel < 0.02, rel
    agree = (native_out.argmax(-1) == torch_out.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_native_decode_in_fp32_is_exact_to_fp32_round_off(tiny_cfg):
    """fp32 weights: the native experts and attention kernels against torch's, within fp32 summation error."""
    dtype = torch.float32
    torch_out = _decode_logits(_model(tiny_cfg, dtype), InferenceOptions(matvec="mkl"), dtype)
    native_out = _decode_logits(_model(tiny_cfg, dtype), InferenceOptions(matvec="native"), dtype)
    assert torch.allclose(native_out, torch_out, atol=1e-5 * float(torch_out.abs().max()), rtol=0)


def test_a_float16_model_decodes_through_torch_where_the_kernels_do_not_apply(tiny_cfg):
    """The native kernels take bf16/fp32 activations only: an fp16 model (here with a bf16 cache) falls back."""
    dtype, cache = torch.float16, torch.bfloat16
    native_out = _decode_logits(_model(tiny_cfg, dtype), InferenceOptions(matvec="native"), dtype, 2, cache)
    torch_out = _decode_logits(_model(tiny_cfg, dtype), InferenceOptions(matvec="mkl"), dtype, 2, cache)
    assert torch.isfinite(native_out).all()
    assert torch.allclose(native_out, torch_out, atol=1e-3 * float(torch_out.abs().max()))


def _greedy_by_steps(model, cache, slots, tokens, limit, n_steps, stops):
    """`native_decode.decode_greedy`'s contract, one `decode_step` and argmax at a time."""
    out = {s: [] for s in slots}
    running = dict(zip(slots, tokens))
    while running:
        logits = decode_step(model, cache, list(running), list(running.values()))
        top = logits[:, :limit].argmax(-1).tolist()
        for s, t in zip(list(running), top):
            out[s].append(t)
            if t in stops or len(out[s]) == n_steps:
                del running[s]
            else:
                running[s] = t
    return [out[s] for s in slots]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_greedy_run_in_one_call_equals_step_by_step(tiny_cfg, quantize):
    """`decode_greedy`: the tokens, cache lengths and cache contents of one `decode_step` + argmax a step, rows
    leaving at a stop id or n_steps, with a vocabulary limit that changes the argmax; ragged rows, bf16."""
    model = _model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native", quantize=quantize))

    def fresh():
        cache = LatentCache(model.config, 4, 48, dtype=torch.bfloat16)
        slots = [cache.allocate() for _ in range(4)]
        prefill(model, cache, slots[:3], PROMPTS)  # slot 3 stays empty: rows need not be the first slots
        return cache, slots[:3]

    cache, slots = fresh()
    V = model.config.vocab_size
    free = _greedy_by_steps(model, cache, slots, [11, 40, 7], V, 12, set())
    limit = max(t for row in free for t in row)  # excludes a token the free run chose
    stops = {free[1][3], free[2][6]}
    cache, slots = fresh()
    expected = _greedy_by_steps(model, cache, slots, [11, 40, 7], limit, 12, stops)
    assert expected != free and min(map(len, expected)) < 12  # the limit and a stop both matter
    cache2, slots2 = fresh()
    got = native_decode.decode_greedy(model, cache2, slots2, [11, 40, 7], limit, 12, stops)
    assert got == expected
    assert torch.equal(cache2.lengths, cache.lengths)
    assert torch.equal(cache2.kv, cache.kv)


def test_greedy_run_past_the_cache_is_a_request_error(tiny_cfg):
    model = _model(tiny_cfg, torch.bfloat16)
    model.prepare_for_inference(InferenceOptions(matvec="native"))
    cache = LatentCache(model.config, 1, 8, dtype=torch.bfloat16)
    slot = cache.allocate()
    prefill(model, cache, [slot], [[5, 9, 13]])
    decode_step(model, cache, [slot], [4])  # plans the stack
    with pytest.raises(dsv3.RequestError, match="exceeds the cache length 8"):
        native_decode.decode_greedy(model, cache, [slot], [4], model.config.vocab_size, 10, set())
    assert int(cache.lengths[slot]) == 8  # the steps before the full cache ran
