"""generate(): ragged batches, cache vs recomputation, sampling options, stops, bad requests."""

import pytest
import torch

import dsv3
from dsv3 import RequestError
from dsv3.inference.generate import stream
from dsv3.inference.sampling import SamplingParams, filtered_probs


@pytest.fixture(scope="module")
def model():
    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4.0)  # sharper logits: fewer near-ties between greedy candidates
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return m


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


PROMPTS = [[5, 9, 13], [7] * 17, [100, 3, 250, 4, 8, 19, 40, 2, 77, 31, 64], [300]]


def test_cached_greedy_equals_recomputation(model):
    for p in PROMPTS:
        assert dsv3.generate(model, [p], max_new_tokens=10, stop_token_ids=[])[0] == greedy_by_recomputation(
            model, p, 10
        )


def test_ragged_batch_equals_one_by_one(model):
    batched = dsv3.generate(model, PROMPTS, max_new_tokens=9, stop_token_ids=[])
    single = [dsv3.generate(model, [p], max_new_tokens=9, stop_token_ids=[])[0] for p in PROMPTS]
    assert batched == single


def test_chunked_prefill_equals_single_chunk(model):
    from dsv3.inference.generate import prefill
    from dsv3.model.cache import LatentCache

    caches = [LatentCache(model.config, 4, 40, dtype=torch.float32) for _ in range(2)]
    outs = []
    for cache, chunk in zip(caches, [2048, 4]):
        slots = [cache.allocate() for _ in PROMPTS]
        outs.append(prefill(model, cache, slots, PROMPTS, chunk=chunk))
    # fp32 round-off only (chunks of 4 take the absorbed-attention kernels, whole prompts the expanded path)
    assert torch.allclose(outs[0], outs[1], atol=1e-5 * float(outs[0].abs().max()))
    assert torch.equal(caches[0].lengths, caches[1].lengths)


def test_stops_at_eos_and_others_continue(model):
    first = dsv3.generate(model, [PROMPTS[0]], max_new_tokens=1, stop_token_ids=[])[0][0]
    out = dsv3.generate(model, [PROMPTS[0], PROMPTS[2]], max_new_tokens=6, stop_token_ids=[first])
    assert out[0] == [first]  # the stop token is included, then the row leaves the batch
    expected_row1 = dsv3.generate(model, [PROMPTS[2]], max_new_tokens=6, stop_token_ids=[first])[0]
    assert out[1] == expected_row1 and len(out[1]) >= 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    a = dsv3.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7, stop_token_ids=[])
    b = dsv3.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=7, stop_token_ids=[])
    c = dsv3.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, seed=8, stop_token_ids=[])
    assert a == b and a != c
    greedy = dsv3.generate(model, PROMPTS, max_new_tokens=8, stop_token_ids=[])
    assert (
        dsv3.generate(model, PROMPTS, max_new_tokens=8, temperature=1.0, top_k=1, seed=3, stop_token_ids=[]) == greedy
    )


def test_top_p_keeps_smallest_prefix():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert p.tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0])
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=3))
    assert p.tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])


def test_stream_yields_each_step(model):
    steps = list(stream(model, PROMPTS[:2], max_new_tokens=3, stop_token_ids=[]))
    assert len(steps) == 3 and all(set(s) == {0, 1} for s in steps)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[]], {}, "empty"),
        ([[1, 2, 999]], {}, "outside"),
        ([[1, 2]], {"max_new_tokens": -1}, "max_new_tokens"),
        ([[1] * 500], {"max_new_tokens": 20}, "context"),
        ([[1, 2]], {"temperature": -1.0}, "temperature"),
        ([[1, 2]], {"top_p": 0.0}, "top_p"),
        ([], {}, "no prompts"),
    ],
)
def test_bad_requests(model, prompts, kwargs, match):
    with pytest.raises(RequestError, match=match):
        dsv3.generate(model, prompts, **kwargs)


def test_bf16_generation_is_finite_and_matches_fp32_mostly(model):
    m16 = dsv3.DeepSeekV3(model.config, dtype=torch.bfloat16)
    m16.load_state_dict(model.state_dict())
    m16.eval()
    with torch.no_grad():
        logits = m16(torch.tensor([PROMPTS[2]]))
    assert torch.isfinite(logits).all()
    out16 = dsv3.generate(m16, [PROMPTS[2]], max_new_tokens=4, stop_token_ids=[])[0]
    out32 = dsv3.generate(model, [PROMPTS[2]], max_new_tokens=4, stop_token_ids=[])[0]
    assert out16[0] == out32[0]


@pytest.fixture(scope="module")
def bf16_model(model):
    """The fixture's weights in bf16: the dtype the one-call native decode takes by default."""
    torch.manual_seed(0)
    m = dsv3.DeepSeekV3(model.config, dtype=torch.bfloat16).eval()
    m.load_state_dict(model.state_dict())
    return m


@pytest.mark.parametrize("run", [2, 5, 1 << 30])
def test_greedy_runs_yield_the_steps_of_stream(bf16_model, run, monkeypatch):
    """generate()'s runs of greedy steps in one native call: step for step what `stream` yields (ragged rows, a
    stop id mid-run, a vocabulary limit), the runs shown to be taken where the kernels are."""
    from dsv3.inference.generate import _steps
    from dsv3.inference.request import GenerationRequest
    from dsv3.kernels import native
    from dsv3.model import native_decode

    model = bf16_model
    free = dsv3.generate(model, PROMPTS, max_new_tokens=13, stop_token_ids=[])
    request = GenerationRequest(PROMPTS, 13, stop_token_ids=[free[2][4]], vocab_limit=max(free[0]))
    expected = list(stream(model, request))
    assert [len(s) for s in expected] != [len(PROMPTS)] * 13  # a row left early
    taken = []
    greedy = native_decode.decode_greedy
    monkeypatch.setattr(native_decode, "decode_greedy", lambda *a: taken.append(greedy(*a)) or taken[-1])
    assert list(_steps(model, request, greedy_run=run)) == expected
    assert any(t is not None for t in taken) == native.available()


def test_sampled_rows_decode_step_by_step(bf16_model, monkeypatch):
    """A request with a sampled row never takes the greedy runs: the same draws as `stream`."""
    from dsv3.inference.generate import _steps
    from dsv3.inference.request import GenerationRequest
    from dsv3.model import native_decode

    sampling = [SamplingParams(), SamplingParams(temperature=0.9, top_k=20), SamplingParams(), SamplingParams()]
    request = GenerationRequest(PROMPTS, 9, sampling, seed=3, stop_token_ids=[])
    expected = list(stream(bf16_model, request))
    monkeypatch.setattr(native_decode, "decode_greedy", lambda *a: pytest.fail("a greedy run with a sampled row"))
    assert list(_steps(bf16_model, request, greedy_run=1 << 30)) == expected
