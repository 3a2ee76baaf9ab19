"""Every published member of the DeepSeek-V3 family, shrunk, against transformers both ways.

V3, R1, V3-0324, V3.1, Kimi-K2-Instruct and Moonlight-16B-A3B run as transformers' DeepseekV3ForCausalLM;
DeepSeek-V2-Lite-Chat and V2.5 as DeepseekV2ForCausalLM. Each real config.json (dsv3.presets) is shrunk
to a few layers and small widths with every structural key kept (hf_reference.shrink), given random
weights that matter (random correction bias, non-unit norms), and compared in fp32:
- their save_pretrained -> our loader (with the checkpoint's own model_type and architectures);
- our save_pretrained -> their from_pretrained;
logits within 1e-5 relative error and identical greedy tokens, both ways.
"""

import json

import pytest
import torch
from hf_reference import family_configs, hf_load, make_hf_family_model, randomize_, shrink

import dsv3

pytest.importorskip("transformers")

REL_TOL = 1e-5
FAMILY = family_configs()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _same_greedy_tokens(hf, ours) -> tuple[list[int], list[int]]:
    prompt = _ids(hf.config.vocab_size, (1, 11), 3)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = dsv3.generate(ours, [prompt[0].tolist()], max_new_tokens=12, stop_token_ids=[])[0]
    return got, ref[0, prompt.shape[1] :].tolist()


@pytest.fixture(scope="module", params=sorted(FAMILY))
def theirs_to_ours(request, tmp_path_factory):
    name = request.param
    real = FAMILY[name]
    hf = make_hf_family_model(shrink(real), seed=len(name))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    # The checkpoint says what the published one says (transformers writes deepseek_v3 for Kimi-K2).
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=real["model_type"], architectures=real["architectures"])
    (path / "config.json").write_text(json.dumps(config))
    ours = dsv3.DeepSeekV3.from_pretrained(path, dtype=torch.float32)
    return name, hf, ours


@pytest.fixture(scope="module", params=sorted(FAMILY))
def ours_to_theirs(request, tmp_path_factory):
    name = request.param
    real = FAMILY[name]
    cfg = dsv3.ModelConfig.from_dict(shrink(real))
    torch.manual_seed(0)
    ours = dsv3.DeepSeekV3(cfg, dtype=torch.float32).eval()
    randomize_(ours, seed=len(name) + 7)
    path = tmp_path_factory.mktemp(name + "-ours")
    ours.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    assert (saved["model_type"], saved["architectures"]) == (real["model_type"], real["architectures"])
    hf = hf_load(path, real["model_type"])
    return name, hf, ours


def test_their_checkpoint_runs_exactly_here(theirs_to_ours):
    name, hf, ours = theirs_to_ours
    # 160 tokens > YaRN's (shrunk) original context of 128: the interpolated band is exercised.
    ids = _ids(hf.config.vocab_size, (2, 160), 1)
    with torch.no_grad():
        ref, got = hf(ids).logits.float(), ours(ids)
    assert rel_err(got, ref) <= REL_TOL, name
    got_tokens, ref_tokens = _same_greedy_tokens(hf, ours)
    assert got_tokens == ref_tokens, name


def test_our_checkpoint_runs_exactly_in_transformers(ours_to_theirs):
    name, hf, ours = ours_to_theirs
    ids = _ids(hf.config.vocab_size, (2, 160), 5)
    with torch.no_grad():
        ref, got = hf(ids).logits.float(), ours(ids)
    assert rel_err(got, ref) <= REL_TOL, name
    got_tokens, ref_tokens = _same_greedy_tokens(hf, ours)
    assert got_tokens == ref_tokens, name


def test_the_routing_rule_matters(theirs_to_ours):
    """Guard against a vacuous parity: a different routing rule must change the logits."""
    name, hf, ours = theirs_to_ours
    routers = [m for m in ours.modules() if isinstance(m, dsv3.model.moe.Router)]
    ids = _ids(hf.config.vocab_size, (1, 48), 2)
    method = routers[0].topk_method
    with torch.no_grad():
        before = ours(ids)
        if method == "noaux_tc":
            saved = [r.e_score_correction_bias.clone() for r in routers]
            for r in routers:
                r.e_score_correction_bias.zero_()
        else:  # V2: greedy <-> group-limited, or greedy over all experts vs the top-1 group
            for r in routers:
                r.topk_method = "greedy" if method == "group_limited_greedy" else "group_limited_greedy"
                r.n_group, r.topk_group = (r.n_group, r.topk_group) if method != "greedy" else (2, 1)
        after = ours(ids)
        if method == "noaux_tc":
            for r, b in zip(routers, saved):
                r.e_score_correction_bias.copy_(b)
        else:
            cfg = ours.config
            for r in routers:
                r.topk_method, r.n_group, r.topk_group = method, cfg.n_group, cfg.topk_group
    assert rel_err(after, before) > 1e-3, name


def test_v2_routers_have_no_correction_bias(theirs_to_ours):
    name, _, ours = theirs_to_ours
    v2 = ours.config.model_type == "deepseek_v2"
    has_bias = any(n.endswith("e_score_correction_bias") for n, _ in ours.named_buffers())
    assert has_bias is not v2, name


def test_latent_norms_use_eps_1e6_whatever_rms_norm_eps():
    """Moonlight's rms_norm_eps is 1e-5; the reference builds q_a_layernorm / kv_a_layernorm with 1e-6."""
    cfg = dsv3.ModelConfig.from_dict({**shrink(FAMILY["moonlight-16b-a3b"]), "q_lora_rank": 40})
    assert cfg.rms_norm_eps == 1e-5
    attn = dsv3.DeepSeekV3(cfg).model.layers[0].self_attn
    assert attn.kv_a_layernorm.eps == 1e-6 and attn.q_a_layernorm.eps == 1e-6
    assert dsv3.DeepSeekV3(cfg).model.layers[0].input_layernorm.eps == 1e-5
