"""MTP self-speculative decoding: identical greedy output, real acceptances, the sampling rule, batches."""

import importlib.util
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.inference.speculative import SpeculativeStats, speculative_stream

PROMPTS = [[5, 9, 13], [7] * 17, [100, 3, 250, 4, 8, 19, 40, 2, 77, 31, 64], [300]]


def random_model(dtype=None):
    torch.manual_seed(0)
    return dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained("tiny"), dtype=dtype).eval()


def mostly_bigram_model(attn_scale: float, dtype=None):
    """A model the MTP module can predict: the main stack is (nearly) a bigram model and the MTP block
    is an identity whose input is the embedding of token t+1, so MTP's guess for t+2 is the main
    model's bigram prediction from t+1. `attn_scale` > 0 lets attention perturb the main model, so
    some drafts are wrong."""
    m = random_model(dtype)
    D = m.config.hidden_size
    with torch.no_grad():
        for layer in list(m.model.layers) + list(m.mtp):
            layer.self_attn.o_proj.weight.mul_(attn_scale if layer in m.model.layers else 0.0)
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.weight.zero_()
                mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        mtp = m.mtp[0]
        mtp.embed_tokens.weight.copy_(m.model.embed_tokens.weight)
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :D] = torch.eye(D)
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(m.model.norm.weight)
        mtp.shared_head.head.weight.copy_(m.lm_head.weight * 1.0)
        m.lm_head.weight.mul_(20.0)  # confident predictions
        mtp.shared_head.head.weight.mul_(20.0)
    return m


def run(model, prompts, n, **kw):
    stats = SpeculativeStats()
    out = [[] for _ in prompts]
    for step in speculative_stream(model, prompts, n, stats=stats, **kw):
        for b, toks in step.items():
            out[b].extend(toks)
    return out, stats


def test_greedy_identical_with_random_weights():
    m = random_model()
    plain = dsv3.generate(m, PROMPTS, max_new_tokens=12, stop_token_ids=[])
    spec, stats = run(m, PROMPTS, 12, stop_token_ids=[])
    assert spec == plain
    assert stats.tokens == sum(len(o) for o in plain)


def test_prompts_longer_than_a_prefill_chunk(monkeypatch):
    """The main prefill runs in chunks, as prefill() does: 4-token chunks over ragged prompts change nothing."""
    import dsv3.inference.speculative as spec_mod

    m = mostly_bigram_model(3.0)
    whole, whole_stats = run(m, PROMPTS, 10, stop_token_ids=[])
    monkeypatch.setattr(spec_mod, "PREFILL_CHUNK_TOKENS", 4)
    chunked, chunked_stats = run(m, PROMPTS, 10, stop_token_ids=[])
    assert chunked == whole == dsv3.generate(m, PROMPTS, max_new_tokens=10, stop_token_ids=[])
    assert chunked_stats.accepted == whole_stats.accepted > 0


@pytest.mark.parametrize("attn_scale", [0.0, 3.0])
def test_greedy_identical_with_accepted_drafts(attn_scale):
    m = mostly_bigram_model(attn_scale)
    plain = dsv3.generate(m, PROMPTS, max_new_tokens=15, stop_token_ids=[])
    spec, stats = run(m, PROMPTS, 15, stop_token_ids=[])
    assert spec == plain
    assert stats.accepted > 0
    if attn_scale == 0.0:
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_step > 1.8
    else:
        assert 0.0 < stats.acceptance_rate < 1.0, stats


@pytest.mark.parametrize("attn_scale", [0.0, 3.0])
def test_bf16_speculative_steps_in_native_calls_give_the_module_paths_tokens(monkeypatch, attn_scale):
    """A bf16 model runs its greedy speculative steps as one native call each (`native.speculative_step`, once the
    plans exist), else as two (the draft, then the verification), else through the modules: the three give the same
    tokens, acceptances and steps as each other and as plain greedy decoding, with drafts accepted and rejected."""
    from dsv3.kernels import native
    from dsv3.model import native_decode

    if not native.available():
        pytest.skip("native kernels need x86-64 with AVX2 and a C compiler")
    m = mostly_bigram_model(attn_scale, torch.bfloat16)
    plain = dsv3.generate(m, PROMPTS, max_new_tokens=15, stop_token_ids=[])
    calls = []
    for name in ("speculative_step", "decode_step", "mtp_draft"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    runs = {"one call": run(m, PROMPTS, 15, stop_token_ids=[])}
    # The first step drafts over the prompts through the modules (generate planned the main stack: its verification
    # is one call); the second plans the MTP layer in two calls; then one call a step.
    steps = runs["one call"][1].steps
    assert calls == ["decode_step"] + ["mtp_draft", "decode_step"] + ["speculative_step"] * (steps - 2)
    monkeypatch.setattr(native_decode, "speculative_greedy", lambda *a: None)
    calls.clear()
    runs["two calls"] = run(m, PROMPTS, 15, stop_token_ids=[])
    assert calls == ["decode_step"] + ["mtp_draft", "decode_step"] * (steps - 1)
    monkeypatch.setattr(native_decode, "decode_logits", lambda *a: None)
    monkeypatch.setattr(native_decode, "draft_logits", lambda *a: None)
    runs["modules"] = run(m, PROMPTS, 15, stop_token_ids=[])
    (spec, stats), *others = runs.values()
    assert spec == plain and all(other == (spec, stats) for other in others)
    assert stats.accepted > 0
    if attn_scale:
        assert stats.accepted < stats.drafted


def test_bf16_greedy_speculative_steps_respect_a_vocabulary_limit():
    """A request's vocab_limit holds in the one-call step too: the same tokens as plain decoding with the limit,
    none at or past it (the bigram model's favourites are past it, so the limit changes the output)."""
    from dsv3.inference.generate import stream

    m = mostly_bigram_model(3.0, torch.bfloat16)
    unlimited = dsv3.generate(m, PROMPTS, max_new_tokens=12, stop_token_ids=[])
    limit = 150
    plain = [[] for _ in PROMPTS]
    for step in stream(m, PROMPTS, 12, stop_token_ids=[], vocab_limit=limit):
        for b, t in step.items():
            plain[b].append(t)
    spec, stats = run(m, PROMPTS, 12, stop_token_ids=[], vocab_limit=limit)
    assert spec == plain != unlimited and max(map(max, spec)) < limit
    assert stats.steps > 2


def test_generate_api_and_stop_and_budget():
    m = mostly_bigram_model(0.0)
    plain = dsv3.generate(m, PROMPTS, max_new_tokens=7, stop_token_ids=[])
    assert dsv3.generate(m, PROMPTS, max_new_tokens=7, stop_token_ids=[], speculative="mtp") == plain
    stop = plain[0][2]
    a = dsv3.generate(m, PROMPTS, max_new_tokens=7, stop_token_ids=[stop])
    b = dsv3.generate(m, PROMPTS, max_new_tokens=7, stop_token_ids=[stop], speculative="mtp")
    assert a == b and a[0][-1] == stop


def sampling_histograms(m, n_rows=600):
    prompts = [[5, 9, 13]] * n_rows
    plain = dsv3.generate(m, prompts, max_new_tokens=3, temperature=1.0, seed=1, stop_token_ids=[])
    spec = dsv3.generate(m, prompts, max_new_tokens=3, temperature=1.0, seed=2, stop_token_ids=[], speculative="mtp")
    tv = []
    for pos in (1, 2):
        h1 = torch.bincount(torch.tensor([o[pos] for o in plain]), minlength=320).float() / n_rows
        h2 = torch.bincount(torch.tensor([o[pos] for o in spec]), minlength=320).float() / n_rows
        tv.append(0.5 * (h1 - h2).abs().sum().item())
    return tv


def soft_model():
    m = mostly_bigram_model(3.0)
    with torch.no_grad():
        m.lm_head.weight.mul_(1.5)  # entropy ~2.4 nats: a handful of likely tokens
        m.mtp[0].shared_head.head.weight.mul_(0.5)  # a draft distribution q that differs from p
    return m


def test_sampling_matches_the_main_models_distribution():
    """The accept/reject rule keeps the main model's distribution: compare token histograms."""
    tv = sampling_histograms(soft_model())
    assert max(tv) < 0.12, tv  # sampling noise at 600 draws is ~0.05


def test_the_histogram_check_catches_a_broken_rule(monkeypatch):
    """Accepting every draft (a classic bug) must fail the same check."""
    import dsv3.inference.speculative as spec_mod

    real_rand = torch.rand
    monkeypatch.setattr(spec_mod.torch, "rand", lambda *a, **k: real_rand(*a, **k) * 0.0 - 1.0)
    tv = sampling_histograms(soft_model())
    monkeypatch.setattr(spec_mod.torch, "rand", real_rand)
    assert max(tv) > 0.12, tv


def test_needs_mtp_module(tmp_path):
    cfg = dsv3.ModelConfig.from_pretrained("tiny", num_nextn_predict_layers=0)
    m = dsv3.DeepSeekV3(cfg)
    with pytest.raises(dsv3.RequestError, match="MTP"):
        dsv3.generate(m, [[1, 2]], max_new_tokens=2, speculative="mtp")


def _mtp_check():
    path = Path(__file__).resolve().parents[2] / "scripts" / "mtp_check.py"
    spec = importlib.util.spec_from_file_location("mtp_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bandwidth_padding_keeps_the_function():
    """`mtp_check.py --pad-mb`: the padded model streams the asked-for extra bytes and computes the same logits,
    main and MTP (its extra gate/up rows are real work, only down_proj's new columns are zero)."""
    pad_dense_mlps = _mtp_check().pad_dense_mlps
    m = random_model(torch.float32)
    with torch.no_grad():
        for layer in m.model.layers:  # norms not all ones: the padding must not lean on them
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    padded = pad_dense_mlps(m, 0.5)
    F, D = m.config.intermediate_size, m.config.hidden_size
    extra = padded.config.intermediate_size - F
    assert extra % 64 == 0 and abs(extra * 3 * D * 4 - 0.5 * 2**20) <= 32 * 3 * D * 4
    added = sum(p.numel() for p in padded.parameters()) - sum(p.numel() for p in m.parameters())
    assert added == extra * 3 * D  # the one dense layer of `tiny`
    mlp = padded.model.layers[0].mlp
    assert mlp.gate_proj.weight[F:].any() and mlp.up_proj.weight[F:].any()
    assert not mlp.down_proj.weight[:, F:].any()
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        h_ref, h_pad = m.hidden_states(ids), padded.hidden_states(ids)
        torch.testing.assert_close(h_pad, h_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(padded.logits(h_pad), m.logits(h_ref), rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([PROMPTS[2][1:] + [0]])
        torch.testing.assert_close(padded.mtp_logits(h_pad, nxt)[0], m.mtp_logits(h_ref, nxt)[0], rtol=1e-5, atol=1e-5)


def test_bandwidth_padding_needs_a_dense_layer():
    cfg = dsv3.ModelConfig.from_pretrained("tiny").replace(first_k_dense_replace=0)
    with pytest.raises(SystemExit, match="dense layer"):
        _mtp_check().pad_dense_mlps(dsv3.DeepSeekV3(cfg).eval(), 1.0)
