"""The training losses against independent computations: balance loss by explicit loops, LM and MTP by hand."""

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.model.moe import Router
from dsv3.training.data import IGNORE, make_batch
from dsv3.training.losses import model_losses, router_balance_loss, sequence_balance_loss


def balance_by_loops(scores: list, topk: list, n_experts: int, k: int) -> list[float]:
    """V3 eq. 17-19 written out: per sequence, sum_i f_i P_i with f from the choices and P from s / sum_j s."""
    out = []
    for seq_scores, seq_topk in zip(scores, topk):
        T = len(seq_scores)
        total = 0.0
        for i in range(n_experts):
            chosen = sum(1 for t in range(T) if i in seq_topk[t])
            f_i = n_experts / (k * T) * chosen
            p_i = sum(seq_scores[t][i] / sum(seq_scores[t]) for t in range(T)) / T
            total += f_i * p_i
        out.append(total)
    return out


def test_balance_loss_matches_explicit_loops():
    scores = [
        [[0.9, 0.1, 0.5, 0.2], [0.8, 0.3, 0.6, 0.1], [0.7, 0.2, 0.1, 0.4]],
        [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [0.2, 0.9, 0.1, 0.3]],
    ]
    topk = [[[0, 2], [0, 2], [0, 3]], [[3, 2], [0, 1], [1, 3]]]
    got = sequence_balance_loss(torch.tensor(scores, dtype=torch.float64), torch.tensor(topk))
    want = balance_by_loops(scores, topk, n_experts=4, k=2)
    assert got.tolist() == pytest.approx(want, rel=1e-12)
    # One value by hand: sequence 0 picks expert 0 three times, 2 twice, 3 once -> f = (2, 0, 4/3, 2/3).
    p = [sum(s[i] / sum(s) for s in scores[0]) / 3 for i in range(4)]
    assert got[0].item() == pytest.approx(2 * p[0] + 4 / 3 * p[2] + 2 / 3 * p[3], rel=1e-12)


def test_perfectly_balanced_uniform_routing_gives_one():
    # Uniform affinities and every expert picked equally often: f_i = 1, P_i = 1/E -> sum = 1.
    scores = torch.full((1, 4, 4), 0.5)
    topk = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert sequence_balance_loss(scores, topk).item() == pytest.approx(1.0)


def test_router_balance_loss_uses_the_routers_own_choices(tiny_cfg):
    torch.manual_seed(0)
    router = Router(tiny_cfg).train()
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4, 0.2, 0.05, -0.1]))
    B, T = 3, 5
    x = torch.randn(B * T, tiny_cfg.hidden_size)
    topk, _ = router(x)
    got = router_balance_loss(router, B)
    scores = router.last_scores.detach().view(B, T, -1).tolist()
    E, K = tiny_cfg.n_routed_experts, tiny_cfg.num_experts_per_tok
    want = balance_by_loops(scores, topk.view(B, T, -1).tolist(), E, K)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # The gradient reaches the router weight through P; the bias is a buffer and gets none.
    got.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert not router.e_score_correction_bias.requires_grad and router.e_score_correction_bias.grad is None


def _packed_batch(B: int, T: int, vocab: int) -> "dsv3.training.data.Batch":
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, vocab, (B, T + 2), generator=g)
    # Document boundaries at different places in each row.
    docs = torch.stack([(torch.arange(T + 2) >= 3 + 2 * b).long() for b in range(B)])
    return make_batch(tokens, docs, seq_len=T, mtp_depths=1)


def test_model_losses_match_a_hand_computation(tiny_cfg):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg).train()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    B, T = 3, 10
    batch = _packed_batch(B, T, tiny_cfg.vocab_size)
    n = batch.num_targets()
    shares = model_losses(model, batch, routers, n, B, mtp_weight=0.3, balance_alpha=0.01)

    with torch.no_grad():
        hidden = model.hidden_states(batch.input_ids)
        lm = F.cross_entropy(model.logits(hidden).flatten(0, 1), batch.targets[:, 0].flatten(), ignore_index=IGNORE)
        # MTP depth 1 at the original positions: h from the main model, token t+1 in, token t+2 out.
        logits2, _ = model.mtp_logits(hidden, batch.tokens[:, 1 : T + 1], depth=0)
        targets2 = batch.tokens[:, 2 : T + 2].clone()
        targets2[batch.targets[:, 1] == IGNORE] = IGNORE
        mtp = F.cross_entropy(logits2.flatten(0, 1), targets2.flatten(), ignore_index=IGNORE)
        balance = 0.01 * sum(router_balance_loss(r, B).mean() for r in routers)
    assert (batch.targets[:, 1] == IGNORE).any() and (batch.targets[:, 1] != IGNORE).any()
    assert shares.lm.item() == pytest.approx(lm.item(), rel=1e-5)
    assert shares.mtp.item() == pytest.approx(mtp.item(), rel=1e-5)
    assert shares.balance.item() == pytest.approx(balance.item(), rel=1e-5)
    assert shares.total.item() == pytest.approx(lm.item() + 0.3 * mtp.item() + balance.item(), rel=1e-5)


def test_loss_shares_of_parts_add_up_to_the_whole(tiny_cfg):
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(tiny_cfg).train()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    batch = _packed_batch(4, 8, tiny_cfg.vocab_size)
    n = batch.num_targets()
    whole = model_losses(model, batch, routers, n, 4, 0.3, 0.01)
    parts = [model_losses(model, batch.rows(i, i + 2), routers, n, 4, 0.3, 0.01) for i in (0, 2)]
    for name in ("lm", "mtp", "balance"):
        assert sum(getattr(p, name).item() for p in parts) == pytest.approx(getattr(whole, name).item(), rel=1e-5)
