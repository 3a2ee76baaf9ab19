"""The AVX-512 build of the native kernels against the AVX2 build: the same bits, product by product and logit
by logit (the 16-lane kernels are documented as lane-for-lane the 8-lane arithmetic)."""

import pytest
import torch

from dsv3.inference.generate import decode_step, prefill
from dsv3.kernels import native
from dsv3.kernels.int8 import quantize_int8
from dsv3.model.cache import LatentCache

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need x86-64 with AVX2 and a C compiler")


def test_isa_follows_the_cpu_and_the_override(monkeypatch):
    monkeypatch.delenv("DSV3_NATIVE_ISA", raising=False)
    capability = torch.backends.cpu.get_cpu_capability()
    assert native.isa() == ("avx512" if capability.startswith(("AVX512", "AMX", "AVX10")) else "avx2")
    monkeypatch.setenv("DSV3_NATIVE_ISA", "avx2")
    assert native.isa() == "avx2"


def test_each_isa_is_its_own_cached_build(tmp_path):
    avx2 = native.build(tmp_path, target_isa="avx2")
    assert native.build(tmp_path, target_isa="avx2") == avx2
    if native.isa() == "avx512":
        assert native.build(tmp_path, target_isa="avx512") != avx2


needs_avx512 = pytest.mark.skipif(
    native.isa() != "avx512", reason="this CPU runs the AVX2 build only: nothing to compare it with"
)


@pytest.fixture(scope="module")
def builds():
    """(AVX-512 library, AVX2 library), both built into the usual cache."""
    return native.load(native.build(target_isa="avx512")), native.load(native.build(target_isa="avx2"))


def _both(monkeypatch, builds, fn):
    """fn() run once on each build."""
    results = []
    for lib in builds:
        monkeypatch.setattr(native, "_library", lambda lib=lib: lib)
        results.append(fn())
    return results


def _weight(wdtype: torch.dtype, N: int, K: int):
    """(args, kwargs) of `native.linear` for a random weight of this type, scales on every row."""
    w = torch.randn(N, K) * torch.logspace(-1, 1, N)[:, None]
    if wdtype == torch.int8:
        return quantize_int8(w), {}
    if wdtype == torch.float8_e4m3fn:
        grid = native.Fp8Grid.of(torch.rand(-(-N // 2), -(-K // 16)) + 0.5, (2, 16), torch.bfloat16)
        return (w.to(wdtype),), {"fp8": grid}
    return (w.to(wdtype),), {}


@needs_avx512
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("K", [7, 8, 24, 40, 1000, 1040, 2053])
def test_linear_gets_the_same_bits_from_both_builds(monkeypatch, builds, wdtype, K):
    """Every row count from 1 to 12 and 17 (one, two, three, four-row tiles, eight-row tiles and their tails)
    and column counts with 16-, 8- and 1-column tails; fp32 outputs, where a changed order would show."""
    torch.manual_seed(K)
    args, kwargs = _weight(wdtype, 37, K)
    x = torch.randn(17, K)
    for M in [*range(1, 13), 17]:
        a, b = _both(monkeypatch, builds, lambda M=M: native.linear(x[:M], *args, **kwargs))
        assert torch.equal(a, b), (M, (a - b).abs().max())
    # bf16 activations and outputs, the model's case
    xb = x.to(torch.bfloat16)
    a, b = _both(monkeypatch, builds, lambda: native.linear(xb, *args, **kwargs))
    assert torch.equal(a, b)


@needs_avx512
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8])
def test_experts_get_the_same_bits_from_both_builds(monkeypatch, builds, wdtype):
    torch.manual_seed(1)
    E, D, Fh = 6, 72, 40
    counts = torch.tensor([0, 1, 9, 2, 0, 4])
    x = torch.randn(int(counts.sum()), D)
    if wdtype == torch.int8:
        (gate, gs), (up, us), (down, ds) = (
            quantize_int8(torch.randn(E * n, k)) for n, k in ((Fh, D), (Fh, D), (D, Fh))
        )
        gate, up, down = gate.view(E, Fh, D), up.view(E, Fh, D), down.view(E, D, Fh)
        scales = {"gate_scale": gs.view(E, Fh), "up_scale": us.view(E, Fh), "down_scale": ds.view(E, D)}
    else:
        gate, up, down = (torch.randn(E, n, k).to(wdtype) for n, k in ((Fh, D), (Fh, D), (D, Fh)))
        scales = {}
    a, b = _both(monkeypatch, builds, lambda: native.experts(x, counts, gate, up, down, **scales))
    assert torch.equal(a, b)


@needs_avx512
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_ragged_batch_of_nine_decodes_to_the_same_logits_on_both_builds(
    monkeypatch, builds, native_tiny_model, quantize
):
    """Nine sequences: the projections and lm_head run an eight-row tile and a one-row tail every step."""
    prompts = [[5 + i, 9, 13 * i % 50 + 1][: 1 + i % 3] for i in range(9)]

    def logits():
        model = native_tiny_model(quantize)
        cache = LatentCache(model.config, len(prompts), 32, dtype=torch.bfloat16)
        slots = [cache.allocate() for _ in prompts]
        out = [prefill(model, cache, slots, prompts)]
        for step in range(4):
            out.append(decode_step(model, cache, slots, [(3 * step + i) % 90 + 1 for i in range(len(prompts))]))
        return torch.stack(out).float()

    a, b = _both(monkeypatch, builds, logits)
    assert torch.equal(a, b)
