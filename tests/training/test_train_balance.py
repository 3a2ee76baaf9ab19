"""Aux-loss-free balancing: the bias moves against the load, never gets a gradient; MaxVio by hand."""

import pytest
import torch

import dsv3
from dsv3.model.moe import Router
from dsv3.training.balance import max_violation, moe_routers, take_expert_counts, update_bias


def test_bias_moves_down_for_overloaded_and_up_for_underloaded(tiny_cfg):
    router = Router(tiny_cfg)
    router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.1, 0.0, 0.0, -0.1, 0.0, 0.0, 0.0]))
    # Mean load 4: experts 0 and 4 overloaded, 1 and 5 underloaded, the rest exactly at the mean.
    load = torch.tensor([10.0, 0.0, 4.0, 4.0, 7.0, 1.0, 4.0, 2.0])
    update_bias(router, load, gamma=0.01)
    want = torch.tensor([-0.01, 0.11, 0.0, 0.0, -0.11, 0.01, 0.0, 0.01])
    assert torch.allclose(router.e_score_correction_bias, want, atol=1e-7)
    assert router.e_score_correction_bias.dtype == torch.float32


def test_bias_is_a_buffer_without_gradient(tiny_cfg):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg).train()
    params = dict(model.named_parameters())
    for name, router in moe_routers(model):
        assert f"{name}.mlp.gate.e_score_correction_bias" not in params
        assert not router.e_score_correction_bias.requires_grad
    model(torch.randint(0, tiny_cfg.vocab_size, (2, 8))).mean().backward()
    for name, router in moe_routers(model):
        assert router.e_score_correction_bias.grad is None
        assert router.weight.grad is not None or name.startswith("mtp.")  # the MTP module did not run
    # A bias turned into something with a gradient is refused.
    router = moe_routers(model)[0][1]
    router.e_score_correction_bias.requires_grad_(True)
    with pytest.raises(AssertionError, match="gradient"):
        update_bias(router, torch.ones(tiny_cfg.n_routed_experts), 0.01)


def test_max_violation_by_hand():
    load = torch.tensor([[10.0, 0.0, 5.0, 5.0], [4.0, 4.0, 4.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    # max / mean - 1: 10/5 - 1 = 1; balanced -> 0; nothing routed -> 0.
    assert max_violation(load).tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_routers_are_found_in_model_order_and_counts_reset(tiny_cfg):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg).train()
    names = [n for n, _ in moe_routers(model)]
    assert names == ["model.layers.1", "model.layers.2", "mtp.0"]
    B, T = 2, 8
    hidden = model.hidden_states(torch.randint(0, tiny_cfg.vocab_size, (B, T)))
    model.mtp_logits(hidden, torch.randint(0, tiny_cfg.vocab_size, (B, T)))
    routers = [r for _, r in moe_routers(model)]
    counts = take_expert_counts(routers)
    # Every token picks num_experts_per_tok experts in every MoE layer.
    assert counts.sum(dim=1).tolist() == [B * T * tiny_cfg.num_experts_per_tok] * 3
    assert all(r.tokens_per_expert.sum() == 0 for r in routers)
