"""TP, EP and TP+EP over 2 and 4 gloo ranks against one process; sharded loading against the plan.

Each world size runs ONE spawn (process start-up is most of the cost on 2 cores) that goes through
every layout; the tests below assert on its results. Tolerance: fp32 logits within 1e-5 relative
error (max |a - b| / max |b|): a parallel run only changes the order of a few fp32 sums.
"""

from __future__ import annotations

import pytest
import spawn
import torch
import workers

import dsv3

# Spawns processes: part of the slow set (CI runs it; `pytest -m 'not slow'` skips it).
pytestmark = pytest.mark.slow

REL_TOL = 1e-5
WORLDS = [2, 4]


@pytest.fixture(scope="module", params=WORLDS, ids=lambda n: f"{n}ranks")
def parity(request):
    world = request.param
    return world, spawn.run(world, "workers:parity")


@pytest.mark.parametrize("layout", [name for name, *_ in workers.LAYOUTS])
def test_logits_match_one_process(parity, layout):
    world, results = parity
    for rank, res in enumerate(results):
        got = res[layout]
        assert got["logits_err"] < REL_TOL, (world, rank, layout, got["logits_err"])
        assert got["decode_err"] < REL_TOL, (world, rank, layout, got["decode_err"])
        assert got["mtp_err"] < REL_TOL, (world, rank, layout, got["mtp_err"])


@pytest.mark.parametrize("layout", [name for name, *_ in workers.LAYOUTS])
def test_greedy_tokens_match_one_process(parity, layout):
    world, results = parity
    ref = results[0]["ref_tokens"]
    assert results[0][layout]["tokens"] == ref, (world, layout)
    assert len({t for row in ref for t in row}) > 3  # not a degenerate run
    for res in results[1:]:
        assert res[layout]["tokens"] == []  # only rank 0 collects tokens


def test_rank_0_serves_requests_while_the_others_follow(parity):
    _world, results = parity
    ref = results[0]["ref_tokens"]
    assert results[0]["requests"] == [ref[:1], "rejected", ref[2:]]
    assert all(res["requests"] == [] for res in results[1:])


def test_fused_projections_are_rebuilt_from_the_shards(parity):
    """generate() fuses q_a+kv_a and gate+up of the reference; after the split, the fused tensors
    are rebuilt from the local shards (none left holding the full weights)."""
    _world, results = parity
    for res in results:
        assert res["ref_fused"] > 0
        for layout, *_ in workers.LAYOUTS:
            assert res[layout]["stale_derived"] == [], layout
            assert res[layout]["fused"] == res["ref_fused"], layout


def test_weights_are_split(parity):
    world, results = parity
    cfg = dsv3.ModelConfig.from_pretrained("tiny")
    q_rows = cfg.num_attention_heads * cfg.qk_head_dim
    for res in results:
        assert res["tp"]["local_q_rows"] == q_rows // world and res["tp"]["local_experts"] == cfg.n_routed_experts
        assert res["ep_all_to_all"]["local_q_rows"] == q_rows
        assert res["tp_ep"]["local_experts"] == cfg.n_routed_experts // world


def test_bytes_per_step_are_counted(parity):
    """One decode step of 3 tokens on tiny (D = 64, V = 320, fp32): the ledger's figures, worked out by hand."""
    world, results = parity
    R, step = world, results[0]
    ring = lambda n: 2 * (R - 1) * n // R
    tokens_D = 3 * 64 * 4
    # Embedding all-reduce, 3 layers x (o_proj + MLP/shared down_proj) all-reduces, logits gathered (V/R each).
    assert step["tp"]["bytes_per_step"] == {
        "tp.embed_all_reduce": ring(tokens_D),
        "tp.all_reduce": 6 * ring(tokens_D),
        "tp.logits_all_gather": (R - 1) * 3 * (320 // R) * 4,
    }
    # The official layout: the shared experts' down_proj and the routed experts reduce together, one
    # all-reduce per MoE layer (2 of them) instead of two.
    assert step["tp_ep"]["bytes_per_step"] == {
        "tp.embed_all_reduce": ring(tokens_D),
        "tp.all_reduce": 4 * ring(tokens_D),
        "ep.all_reduce": 2 * ring(tokens_D),
        "tp.logits_all_gather": (R - 1) * 3 * (320 // R) * 4,
    }
    # EP alone, all-reduce combine: one all-reduce per MoE layer, nothing else.
    assert step["ep_all_reduce"]["bytes_per_step"] == {"ep.all_reduce": 2 * ring(tokens_D)}
    for res in results:  # all-to-all: what each rank sends depends on the routing, but never nothing
        assert res["ep_all_to_all"]["bytes_per_step"]["ep.all_to_all"] > 0
        assert res["ep_all_to_all"]["bytes_per_step"]["ep.counts"] == 2 * (R - 1) * (8 // R) * 8


def test_ep_with_rank_local_tokens(parity):
    """Data-parallel attention: each rank its own sequence (different lengths), experts dispatched all-to-all."""
    _world, results = parity
    for rank, res in enumerate(results):
        assert res["ep_local_tokens"]["logits_err"] < REL_TOL, rank
        assert res["ep_local_tokens"]["a2a_bytes"] > 0


def test_sizes_that_do_not_divide_are_clear_errors(parity):
    world, results = parity
    errors = results[0]["errors"]
    assert f"num_attention_heads (3) is not divisible by tp ({world})" in errors["heads"]
    assert f"vocab_size (321) is not divisible by tp ({world})" in errors["vocab"]
    if world == 4:
        assert "n_routed_experts (6) is not divisible by ep (4)" in errors["experts"]
    else:
        assert errors["experts"] == "no error"  # 2 divides 6
    assert "same tokens on every rank" in errors["combine"]


# ---------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    model = workers.build()
    model.save_pretrained(root / "tiny")
    model.save_pretrained(root / "tiny_fp8", fp8=True)
    # Shards of whole 128-blocks at tp = 2: 2 heads x 128 q rows, 2 x 128 kv_b rows, 2 x 64 o_proj columns.
    aligned = workers.build(
        {
            "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 64,
            "v_head_dim": 64,
            "intermediate_size": 256,
            "moe_intermediate_size": 256,
        }
    )
    aligned.save_pretrained(root / "aligned_fp8", fp8=True)
    return root


@pytest.mark.parametrize("world", WORLDS)
def test_sharded_loading(checkpoints, world):
    # Every layout at 2 ranks; at 4, the official one only (process start-up dominates on 2 cores).
    aligned = str(checkpoints / "aligned_fp8") if world == 2 else None
    layouts = [(world, 1), (1, world), (world, world)] if world == 2 else [(world, world)]
    results = spawn.run(
        world, "workers:sharded_load", str(checkpoints / "tiny"), str(checkpoints / "tiny_fp8"), aligned, layouts
    )
    for rank, res in enumerate(results):
        for layout in (f"tp{tp}_ep{ep}" for tp, ep in layouts):
            assert res[layout]["err"] < REL_TOL, (rank, layout)
            # What a rank holds is exactly what the planner says a device needs for the weights.
            assert res[layout]["bytes"] == res[layout]["plan"], (rank, layout)
        assert res["fp8_dequant_err"] < REL_TOL, rank
        assert "falls inside a 128-wide FP8 scale block" in res["fp8_misaligned"]
        if aligned:
            assert res["fp8_kept_dtype"] == str(torch.float8_e4m3fn)
            assert res["fp8_kept_err"] < REL_TOL, rank
            assert res["fp8_kept_bytes"]["bytes"] == res["fp8_kept_bytes"]["plan"], rank
