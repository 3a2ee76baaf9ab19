"""The native kernels' profiling build (`DSV3_NATIVE_PROFILE=1`, scripts/decode_profile.py): it times every phase
of a decode step and computes what the plain build computes, bit for bit."""

import pytest
import torch

from dsv3.inference.generate import decode_step, prefill
from dsv3.kernels import native
from dsv3.model.cache import LatentCache

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need x86-64 with AVX2 and a C compiler")

LAYER_PHASES = ("q_in", "q_b", "attend", "o_proj", "routed", "shared", "dense")


def test_the_plain_build_has_no_profile(monkeypatch):
    plain = native.load(native.build())
    monkeypatch.setattr(native, "_library", lambda: plain)
    assert native.profile() is None
    native.reset_profile()  # a no-op there, not an error


def test_the_profiling_build_is_its_own_cached_build(tmp_path):
    assert native.build(tmp_path, profile=True) != native.build(tmp_path)
    assert native.build(tmp_path, profile=True) == native.build(tmp_path, profile=True)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_profiling_build_times_each_phase_and_keeps_the_logits(monkeypatch, native_tiny_model, quantize):
    """Three sequences of a tiny model (a dense layer, two MoE layers with a shared expert, q LoRA) decode four
    steps on each build: the same logits; the profile counts the four steps and gives every phase time."""
    prompts = [[5, 9, 13], [7], [11, 2]]
    builds = {"plain": native.load(native.build()), "profile": native.load(native.build(profile=True))}
    logits, profiles = {}, {}
    for name, lib in builds.items():
        monkeypatch.setattr(native, "_library", lambda lib=lib: lib)
        model = native_tiny_model(quantize)
        cache = LatentCache(model.config, len(prompts), 32, dtype=torch.bfloat16)
        slots = [cache.allocate() for _ in prompts]
        out = [prefill(model, cache, slots, prompts)]
        decode_step(model, cache, slots, [1, 2, 3])  # the first step plans the native stack
        native.reset_profile()
        for step in range(4):
            out.append(decode_step(model, cache, slots, [(3 * step + i) % 90 + 1 for i in range(len(prompts))]))
        logits[name], profiles[name] = torch.stack(out).float(), native.profile()
    assert torch.equal(logits["plain"], logits["profile"])
    assert profiles["plain"] is None
    times = profiles["profile"]
    assert times["steps"] == 4
    assert all(times[phase] > 0 for phase in (*LAYER_PHASES, "layers", "head")), times
    assert sum(times[phase] for phase in LAYER_PHASES) <= times["layers"]
