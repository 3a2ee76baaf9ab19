"""The native CPU kernels against float64 references: every shape class, strided operands, bf16 rounding."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv3.kernels import native
from dsv3.kernels.int8 import dequantize_int8, quantize_int8

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need x86-64 with AVX2 and a C compiler")


def _close(got: torch.Tensor, exact: torch.Tensor) -> None:
    """fp32 outputs within fp32 summation error; bf16 outputs within one rounding (2**-8 relative) of exact."""
    exact = exact.double()
    if got.dtype == torch.bfloat16:
        assert bool(((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6 * exact.abs().max()).all())
    else:
        assert bool(((got.double() - exact).abs() <= 1e-5 * exact.abs().max()).all())


@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("N, K", [(1, 8), (7, 33), (40, 64), (33, 300), (130, 1000)])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_linear_bf16_weight_matches_float64(M, N, K, xdtype):
    torch.manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K).to(torch.bfloat16)
    x = torch.randn(M, K).to(xdtype)
    got = native.linear(x, w)
    assert got.shape == (M, N) and got.dtype == xdtype
    _close(got, x.double() @ w.double().T)


def _int16_rows(x: torch.Tensor) -> torch.Tensor:
    """What int8 weights multiply: each row rounded (half to even) to a multiple of max|row| / 32767, in float64."""
    x = x.double()
    step = x.abs().amax(dim=-1, keepdim=True) / 32767
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(x / step) * step


@pytest.mark.parametrize("M", [1, 2, 3, 9])
@pytest.mark.parametrize("N, K", [(5, 17), (64, 256), (129, 1032), (33, 4500)])
def test_linear_int8_weight_matches_float64(M, N, K):
    """int8 weights take int16 activation rows (K = 4500: the int32 sums are emptied into fp32 mid-row)."""
    torch.manual_seed(N + K + M)
    q, scale = quantize_int8(torch.randn(N, K) * torch.logspace(-2, 1, N)[:, None])
    x = torch.randn(2, M, K).to(torch.bfloat16)
    x[1, 0] *= 1e-3  # a row far smaller than the others keeps its own scale
    got = native.linear(x, q, scale)
    assert got.shape == (2, M, N)
    w = dequantize_int8(q, scale, torch.float64)
    _close(got, _int16_rows(x) @ w.T)
    # The accuracy cost against the unquantized activations: each is off by at most max|row| / 65534.
    exact = x.double() @ w.T
    bound = x.double().abs().amax(-1, keepdim=True) / 65534 * w.abs().sum(-1)
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2**-8 + bound + 1e-6 * exact.abs().max()).all())


@pytest.mark.parametrize("K", [8, 33, 300, 1040, 4500])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn])
def test_one_or_two_rows_get_the_bits_they_get_in_a_batch(K, wdtype):
    """One or two activation rows stream one weight row at a time (their own kernel); the fifth row of a batch
    of five, and the fifth and sixth of six, go through the pair kernel's one- and two-row paths. Both sum in
    the same order: the same bits, every weight type (K = 1040: a 16-column step after the 32-column ones;
    4500: int8's int32 sums emptied mid-row)."""
    torch.manual_seed(K)
    w = torch.randn(37, K)
    x = torch.randn(6, K)  # fp32 outputs: a different summation order shows (bf16 rounding would hide most)
    if wdtype == torch.int8:
        args = quantize_int8(w)
        kwargs = {}
    elif wdtype == torch.float8_e4m3fn:
        args = (w.to(wdtype),)
        kwargs = {"fp8": native.Fp8Grid.of(torch.rand(19, -(-K // 16)) + 0.5, (2, 16), torch.float32)}
    else:
        args = (w.to(wdtype),)
        kwargs = {}
    five, six = native.linear(x[:5], *args, **kwargs), native.linear(x, *args, **kwargs)
    assert torch.equal(native.linear(x[4:5], *args, **kwargs)[0], five[4])
    assert torch.equal(native.linear(x[4:6], *args, **kwargs), six[4:6])
    assert not torch.equal(native.linear(x[3:4], *args, **kwargs)[0], five[4])


def test_int8_rows_with_inf_or_nan_give_nan_rows_only():
    """A non-finite activation row cannot be scaled to int16: its outputs are NaN, its neighbours' are exact."""
    q, scale = quantize_int8(torch.randn(6, 40))
    x = torch.randn(3, 40)
    x[1, 7] = float("nan")
    x[2, 3] = float("inf")
    got = native.linear(x, q, scale)
    assert bool(got[1:].isnan().all())
    _close(got[0], _int16_rows(x[0]) @ dequantize_int8(q, scale, torch.float64).T)


def test_batched_linear_reads_strided_operands_in_place():
    """Views with a contiguous last dim (cache slots, head slices, transposed outputs) are read as they are."""
    torch.manual_seed(0)
    big_w = torch.randn(3, 50, 300).to(torch.bfloat16)
    w = big_w[:, 5:45, :288]  # [G=3, N=40, K=288], rows strided
    x = torch.randn(16, 3, 288)[:, :, :].transpose(0, 1)  # [3, 16, 288] with a non-contiguous batch dim
    storage = torch.zeros(3, 16, 60)
    out = storage[..., 10:50]  # a column window: written in place, its neighbours untouched
    native.batched_linear(x, w, out)
    _close(out, torch.einsum("gmk,gnk->gmn", x.double(), w.double()))
    assert bool(storage[..., :10].eq(0).all() and storage[..., 50:].eq(0).all())


@pytest.mark.parametrize("C", [16, 64, 20, 3])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_batched_matmul_matches_float64(C, wdtype):
    torch.manual_seed(C)
    G, M, S = 4, 5, 37
    x = torch.randn(G, M, S)
    w = torch.randn(G, S, C + 7).to(wdtype)[..., 2 : 2 + C]  # a column window of a wider tensor
    out = torch.empty(G, M, C, dtype=torch.bfloat16)
    native.batched_matmul(x, w, out)
    _close(out, x.double() @ w.double())


def _experts_reference(x, counts, gate, up, down):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        rows = x[start : start + n].double()
        h = F.silu(rows @ gate[e].double().T) * (rows @ up[e].double().T)
        out.append(h @ down[e].double().T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("counts", [[0, 1, 0, 0, 2, 3], [1, 1, 1, 1, 1, 1], [0, 0, 9, 0, 0, 0]])
def test_experts_bf16_match_float64(fused, counts):
    torch.manual_seed(sum(counts))
    E, D, Fh = 6, 72, 40  # neither a multiple of 16
    if fused:
        gate_up = torch.randn(E, 2 * Fh, D).to(torch.bfloat16)
        gate, up = gate_up[:, :Fh], gate_up[:, Fh:]
    else:
        gate, up = torch.randn(E, Fh, D).to(torch.bfloat16), torch.randn(E, Fh, D).to(torch.bfloat16)
    down = torch.randn(E, D, Fh).to(torch.bfloat16)
    counts_t = torch.tensor(counts)
    x = torch.randn(int(counts_t.sum()), D).to(torch.bfloat16)
    got = native.experts(x, counts_t, gate, up, down)
    exact = _experts_reference(x, counts_t, gate, up, down)
    assert got.dtype == torch.bfloat16
    # the intermediate stays fp32 (torch's path rounds it to bf16 twice): compare at bf16 output precision
    assert bool(((got.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-5 * exact.abs().max()).all())


def test_experts_int8_match_float64():
    torch.manual_seed(3)
    E, D, Fh = 5, 64, 48
    ws = [quantize_int8(torch.randn(E, o, i)) for o, i in ((Fh, D), (Fh, D), (D, Fh))]
    counts = torch.tensor([2, 0, 1, 0, 3])
    x = torch.randn(6, D)
    got = native.experts(x, counts, ws[0][0], ws[1][0], ws[2][0], ws[0][1], ws[1][1], ws[2][1])
    gate, up, down = [dequantize_int8(q, s, torch.float64) for q, s in ws]
    want, start = [], 0  # both products take int16 activation rows: x, then the SwiGLU rows
    for e, n in enumerate(counts.tolist()):
        rows = _int16_rows(x[start : start + n])
        want.append(_int16_rows(F.silu(rows @ gate[e].T) * (rows @ up[e].T)) @ down[e].T)
        start += n
    _close(got, torch.cat(want))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("D", [72, 33])
def test_experts_with_one_or_two_rows_each_get_the_bits_of_a_larger_batch(wdtype, D):
    """Where every active expert has one or two rows (decode), gate and up rows are read in pairs and the down
    projection's halves side by side; an expert with three rows sends the whole call the block-by-block way.
    Each row's arithmetic is the same either way: the shared rows' outputs are equal bit for bit (D = 33: an odd
    last row of the down projection)."""
    torch.manual_seed(D)
    E, Fh = 5, 40
    shapes = ((Fh, D), (Fh, D), (D, Fh))
    if wdtype == torch.int8:
        ws = [quantize_int8(torch.randn(E, o, i)) for o, i in shapes]
        args = [q for q, _ in ws] + [s for _, s in ws]
    else:
        args = [torch.randn(E, o, i).to(wdtype) for o, i in shapes]
    x = torch.randn(7, D)
    decode = native.experts(x[:4], torch.tensor([1, 2, 0, 1, 0]), *args)
    batch = native.experts(x, torch.tensor([1, 2, 0, 1, 3]), *args)
    assert torch.equal(decode, batch[:4])
    exact = batch[:4].double()  # and both are right, not merely equal (a swapped half would show here)
    gate, up, down = (
        (a.double() for a in args[:3])
        if wdtype != torch.int8
        else (dequantize_int8(q, s, torch.float64) for q, s in ws)
    )
    rows = x[:4].double() if wdtype != torch.int8 else _int16_rows(x[:4])
    want = []
    for r, e in zip(rows, [0, 1, 1, 3]):
        hidden = F.silu(r @ gate[e].T) * (r @ up[e].T)
        want.append((hidden if wdtype != torch.int8 else _int16_rows(hidden[None])[0]) @ down[e].T)
    assert bool(((exact - torch.stack(want)).abs() <= 1e-2 * torch.stack(want).abs().max()).all())


def test_nan_and_inf_propagate_like_torch():
    w = torch.ones(4, 16, dtype=torch.bfloat16)
    x = torch.ones(1, 16, dtype=torch.bfloat16)
    x[0, 3] = float("nan")
    assert bool(native.linear(x, w).isnan().all())
    x[0, 3] = float("inf")
    assert bool(native.linear(x, w).isinf().all())


def test_a_failed_build_falls_back_with_one_note(tmp_path):
    """No compiler: the process keeps torch's kernels and says so once; `matvec='native'` is then refused."""
    code = (
        "import torch; from dsv3.kernels import native; from dsv3.model.options import InferenceOptions;"
        "from dsv3.config import ModelConfig; from dsv3.errors import ConfigError\n"
        "assert not native.available()\n"
        "assert InferenceOptions().resolve(ModelConfig.from_pretrained('tiny')).matvec == 'mkl'\n"
        "try:\n    InferenceOptions(matvec='native').resolve(ModelConfig.from_pretrained('tiny'))\n"
        "except ConfigError as e:\n    print('refused:', e)\n"
    )
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), DSV3_CACHE=str(tmp_path / "cache"), PATH="/nonexistent")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "refused: matvec 'native' needs" in run.stdout
    notes = [line for line in run.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(notes) == 1


def test_build_is_cached_by_source_hash(tmp_path):
    first = native.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_module(dtype):
    from dsv3.model.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(72, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x = (torch.randn(3, 2, 72) * 3).to(dtype)
        ref = norm(x)  # torch ops (the module's options are UNPREPARED)
        got = native.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    else:  # fp32 sums in another order: at most one bf16 rounding step apart, and mostly identical
        assert bool(((got.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all())
        assert (got == ref).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_apply_rope_on_strided_views(dtype):
    from dsv3.model.rope import apply_rope

    torch.manual_seed(0)
    B, T, H, Dn, Dr = 2, 3, 4, 16, 8
    q = torch.randn(B, T, H, Dn + Dr).to(dtype)
    q_rope = q.split([Dn, Dr], dim=-1)[1]  # a view: rows and heads strided, as the attention passes it
    kv = torch.randn(B, T, 40 + Dr).to(dtype)
    k_rope = kv.split([40, Dr], dim=-1)[1]
    angles = torch.rand(B, T, Dr // 2) * 6
    cos, sin = angles.cos() * 1.3, angles.sin() * 1.3
    for x in (q_rope, k_rope):
        ref, got = apply_rope(x, cos, sin), native.rope(x, cos, sin)
        assert got.shape == x.shape and got.dtype == dtype
        tol = 1e-6 if dtype == torch.float32 else 2**-7
        assert bool(((got.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all())


def _torch_combine(h: torch.Tensor, order: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The torch ops `moe.combine` ran before it called the kernel: unsort, weight (in h's dtype), sum over k."""
    T, K = w.shape
    y = torch.empty_like(h)
    y[order] = h
    return (y.view(T, K, -1) * w[..., None].to(h.dtype)).sum(dim=1)


def _sequential_combine(h: torch.Tensor, order: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32: each product rounded, then added in k order (torch's own fp32 sum reorders the columns past its
    last full vector, so it is not the reference there)."""
    T, K = w.shape
    y = torch.empty_like(h)
    y[order] = h
    out = torch.zeros(T, h.shape[1])
    for k in range(K):
        out += y.view(T, K, -1)[:, k] * w[:, k : k + 1]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, K, D", [(1, 1, 8), (3, 2, 17), (40, 6, 1000), (600, 8, 64), (5, 64, 9)])
def test_combine_gets_the_bits_of_the_torch_ops(T, K, D, dtype):
    """Weight rounding, product rounding, the k order of the fp32 sum and no FMA: any of them changed flips bits."""
    from dsv3.model.moe import sort_by_expert

    torch.manual_seed(T * 1000 + K)
    h = (torch.randn(T * K, D) * 3).to(dtype)
    w = torch.rand(T, K) * 2.5
    order, _ = sort_by_expert(torch.randint(0, 16, (T, K)), 16)
    reference = _torch_combine if dtype == torch.bfloat16 else _sequential_combine
    assert torch.equal(native.combine(h, order, w), reference(h, order, w))


def test_combine_keeps_nan_and_inf_and_refuses_a_non_permutation():
    h = torch.tensor([[float("nan"), 1.0, float("inf")] * 3, [2.0, -1.0, 0.5] * 3], dtype=torch.bfloat16)
    h[0, 0] = torch.tensor(0x7F81, dtype=torch.int16).view(torch.bfloat16)  # a NaN with only its lowest bit set
    w = torch.tensor([[0.5, 0.25]])
    got = native.combine(h, torch.tensor([1, 0]), w)
    assert torch.isnan(got[0, 0]) and torch.isnan(got[0, 3]) and torch.isinf(got[0, 2])
    assert torch.equal(got[0, 1:3], _torch_combine(h, torch.tensor([1, 0]), w)[0, 1:3])
    with pytest.raises(ValueError, match="not a permutation"):
        native.combine(h, torch.tensor([0, 0]), w)


@pytest.mark.parametrize("V", [1, 7, 8, 9, 129280])
def test_argmax_rows_is_torchs_argmax(V):
    """The first maximum on ties, the first NaN over any number, -inf rows, -0.0 == 0.0, strided rows."""
    torch.manual_seed(V)
    rows = torch.randn(6, V + 3)[:, :V]  # rows 3 values apart: a row stride that is not V
    rows[1] = float("-inf")
    rows[2, V // 2 :] = rows[2].max() + 1  # a tie from the middle on: the first of it
    rows[3, V // 3] = float("nan")
    rows[3, V - 1] = float("nan")
    rows[4] = 0.0
    rows[4, V - 1] = -0.0
    rows[5, -1] = float("inf")
    assert native.argmax_rows(rows) == rows.argmax(dim=-1).tolist()
    with pytest.raises(ValueError):
        native.argmax_rows(rows.double())


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("M", [1, 3])
def test_linear_widened_holds_the_bits_of_the_bf16_result_widened(wdtype, M):
    """`widen=True` (the logits) stores fp32 copies of the bf16-rounded results: `linear(x, w).float()` bit for bit."""
    torch.manual_seed(M)
    N, K = 300, 256
    x = torch.randn(M, K).to(torch.bfloat16)
    w = torch.randn(N, K)
    scale, fp8 = None, None
    if wdtype == torch.int8:
        w, scale = quantize_int8(w, torch.float32)
    elif wdtype == torch.float8_e4m3fn:
        w = w.to(wdtype)
        fp8 = native.Fp8Grid.of(torch.rand(3, 2) + 0.5, (128, 128), torch.bfloat16)
    else:
        w = w.to(wdtype)
    got = native.linear(x, w, scale, fp8, widen=True)
    assert got.dtype == torch.float32
    assert torch.equal(got, native.linear(x, w, scale, fp8).float())
    if fp8 is None:  # fp32 activations: widening changes nothing
        assert torch.equal(native.linear(x.float(), w, scale, widen=True), native.linear(x.float(), w, scale))


@pytest.mark.parametrize("N, K, block, rows", [(300, 256, (128, 128), None), (45, 40, (16, 16), (5, 33)),
                                              (37, 70, (8, 32), (9, 37)), (130, 24, (128, 128), (0, 129))])  # fmt: skip
def test_dequantize_fp8_equals_dequantize_blocks_on_every_code(N, K, block, rows):
    """The one-pass native dequantization: value for value `dequantize_blocks` (bf16-rounded or fp32), every
    non-NaN e4m3fn code, scales of very different sizes, partial blocks both ways, row slices that start inside a
    block of the scale grid."""
    from dsv3.kernels.fp8 import dequantize_blocks

    torch.manual_seed(N)
    codes = torch.randint(0, 256, (N, K), dtype=torch.uint8)
    codes[codes == 0x7F], codes[codes == 0xFF] = 0, 0x80  # no NaN codes (quantize_blocks never makes them)
    codes.view(-1)[:254] = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    weight = codes.view(torch.float8_e4m3fn)
    grid = (-(-N // block[0]), -(-K // block[1]))
    scale = torch.exp(torch.randn(grid) * 4).float()  # e^-12 .. e^12
    assert native.fits_dequantize_fp8(weight, scale)
    n0, n1 = rows or (0, N)
    for dtype in (torch.bfloat16, torch.float32):
        got = native.dequantize_fp8(weight, scale, block, dtype == torch.bfloat16, rows)
        want = dequantize_blocks(weight, scale, block, dtype).float()[n0:n1]
        assert got.shape == want.shape and torch.equal(got, want)
    with pytest.raises(ValueError, match="rows outside"):
        native.dequantize_fp8(weight, scale, block, True, (0, N + 1))


@pytest.mark.parametrize(
    "M, N, K",
    [(1, 1, 1), (5, 17, 7), (6, 16, 256), (7, 15, 257), (121, 33, 300), (250, 300, 600), (13, 3100, 40)],
)
@pytest.mark.parametrize("xdtype, wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                            (torch.float32, torch.bfloat16)])  # fmt: skip
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_matches_float64_on_partial_tiles_and_blocks(M, N, K, xdtype, wdtype, threads):
    """Rows, columns and depth off the 6 x 16 tile and the 256-deep, 120-row, 3072-column blocks, on strided
    operands: every output within fp32 summation error of the float64 product."""
    torch.manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K + 5).to(xdtype)[:, 2 : K + 2]  # rows 5 elements apart from their ends
    w = torch.randn(N, K + 3).to(wdtype)[:, :K]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.gemm(x, w)
    finally:
        torch.set_num_threads(previous)
    assert got.shape == (M, N) and got.dtype == torch.float32
    exact = x.double() @ w.double().T
    assert bool(((got.double() - exact).abs() <= 1e-5 * exact.abs().max() + 1e-30).all())


def test_gemm_keeps_leading_dims_handles_empty_depth_and_propagates_nan_and_inf():
    x = torch.randn(2, 9, 20).bfloat16()
    w = torch.randn(40, 20).bfloat16()
    assert torch.allclose(native.gemm(x, w), (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(native.gemm(torch.randn(3, 0), torch.randn(4, 0)), torch.zeros(3, 4))
    assert native.gemm(torch.randn(0, 8), torch.randn(4, 8)).shape == (0, 4)
    x, w = torch.randn(8, 32), torch.randn(20, 32)
    x[1, 3], x[5, 0] = float("nan"), float("inf")
    got = native.gemm(x, w)
    assert bool(got[1].isnan().all()) and bool((got[5].isinf() | got[5].isnan()).all())
    assert torch.equal(got[5].isinf(), (x[5].double() @ w.double().T).isinf())  # inf * w with a mixed sign sum: nan
    keep = [0, 2, 3, 4, 6, 7]
    assert torch.allclose(got[keep], (x[keep].double() @ w.double().T).float(), rtol=1e-5, atol=1e-5)
