"""MTP self-speculative decoding: the MTP module drafts one token, the main model verifies it.

Per step and sequence, with L tokens already in the main cache and x the last sampled token:
1. draft: the MTP module at position L-1 reads (h_{L-1}, x) and proposes d ~ q;
2. verify: the main model runs [x, d] at positions L, L+1 in ONE pass, giving p_L (for token L+1)
   and p_{L+1} (for token L+2);
3. accept d with probability min(1, p_L(d) / q(d)) (the standard rule of Leviathan et al. 2023 /
   Chen et al. 2023; at temperature 0 this is "argmax p_L == d"), then add a bonus token from
   p_{L+1}: two tokens for one main pass. On rejection, draw from norm(max(0, p_L - q)) and drop
   d's cache entry. The output distribution is exactly the main model's; greedy output is
   identical to plain greedy decoding.
The MTP layer attends over its own latent cache at the ORIGINAL positions, one entry per position
t holding (h_t, token t+1), so it is fed 1 or 2 positions per step (ragged across the batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import RequestError
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .generate import check_prompts, model_device, model_dtype, per_row_sampling, row_generators
from .sampling import SamplingParams, filtered_probs


@dataclass
class SpeculativeStats:
    steps: int = 0  # verification passes of the main model
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0


def _right_padded(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)


def _pick(x: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """x (B, T, ...) -> (B, ...) taking column cols[b] of row b."""
    return x[torch.arange(x.shape[0], device=x.device), torch.as_tensor(list(cols), device=x.device)]


@torch.inference_mode()
def speculative_stream(
    model: DeepSeekV3,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    vocab_limit: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[dict[int, list[int]]]:
    """Yield, per verification step, {row: new tokens (1 or 2)} for the rows still running."""
    if not model.mtp:
        raise RequestError("speculative decoding needs the MTP module (num_nextn_predict_layers > 0, loaded)")
    prompts = [list(p) for p in prompts]
    check_prompts(model, prompts, max_new_tokens + 1)
    params = per_row_sampling(len(prompts), sampling)
    stats = stats if stats is not None else SpeculativeStats()
    if max_new_tokens == 0:
        return
    model.prepare_for_inference()
    cfg, dev, dtype = model.config, model_device(model), model_dtype(model)
    gens = row_generators(len(prompts), seed)
    stops = set(cfg.eos_token_ids if stop_token_ids is None else stop_token_ids)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 2
    main_cache = LatentCache(cfg, len(prompts), max_len, dtype=dtype, device=dev)
    mtp_cache = LatentCache(
        cfg, len(prompts), max_len, dtype=dtype, device=dev, num_layers=1, first_layer=cfg.num_hidden_layers
    )
    slots = [main_cache.allocate() for _ in prompts]
    assert [mtp_cache.allocate() for _ in prompts] == slots  # row b uses slot b in both caches

    def mask_vocab(logits: torch.Tensor) -> torch.Tensor:
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            return logits[..., :vocab_limit]  # ids past the limit can never be sampled
        return logits

    def draw(probs: torch.Tensor, b: int) -> int:
        return int(torch.multinomial(probs.cpu(), 1, generator=gens[b]).item())

    # Prefill the main model over the prompts, keeping every position's hidden state for the MTP layer.
    lens = [len(p) for p in prompts]
    batch = main_cache.bind(slots, lens)
    hidden = model.hidden_states(_right_padded(prompts, dev), cache=batch)
    batch.commit()
    last_logits = mask_vocab(model.logits(_pick(hidden, [n - 1 for n in lens])[:, None])[:, 0])
    x = [draw(filtered_probs(last_logits[b], params[b]), b) for b in range(len(prompts))]
    produced = [[t] for t in x]
    yield {b: [t] for b, t in enumerate(x)}
    stats.tokens += len(x)
    active = [b for b in range(len(prompts)) if x[b] not in stops and max_new_tokens > 1]
    # MTP inputs for positions 0..n-1: (h_t, token t+1), the last one using the token just sampled.
    mtp_hidden = {b: hidden[b, : lens[b]] for b in active}
    mtp_next = {b: prompts[b][1:] + [x[b]] for b in active}

    while active:
        # 1. Draft: the MTP layer over each row's pending positions; the draft comes from the last one.
        n_mtp = [len(mtp_next[b]) for b in active]
        h_in = torch.zeros(len(active), max(n_mtp), cfg.hidden_size, dtype=hidden.dtype, device=dev)
        for i, b in enumerate(active):
            h_in[i, : n_mtp[i]] = mtp_hidden[b]
        mbatch = mtp_cache.bind([slots[b] for b in active], n_mtp)
        draft_logits, _ = model.mtp_logits(h_in, _right_padded([mtp_next[b] for b in active], dev), cache=mbatch)
        mbatch.commit()
        draft_logits = mask_vocab(_pick(draft_logits, [n - 1 for n in n_mtp]))
        q = [filtered_probs(draft_logits[i], params[b]) for i, b in enumerate(active)]
        drafts = [draw(q[i], b) for i, b in enumerate(active)]

        # 2. Verify [x, d] for every row in one pass of the main model.
        vbatch = main_cache.bind([slots[b] for b in active], [2] * len(active))
        ids = torch.tensor([[x[b], d] for b, d in zip(active, drafts)], dtype=torch.long, device=dev)
        vh = model.hidden_states(ids, cache=vbatch)
        vbatch.commit()
        vlogits = mask_vocab(model.logits(vh))
        stats.steps += 1

        # 3. Accept or correct, then the bonus token.
        step: dict[int, list[int]] = {}
        still = []
        for i, b in enumerate(active):
            d = drafts[i]
            p_now = filtered_probs(vlogits[i, 0], params[b])
            stats.drafted += 1
            accept = float(torch.rand(1, generator=gens[b])) * float(q[i][d]) < float(p_now[d])
            if accept:
                stats.accepted += 1
                new = [d, draw(filtered_probs(vlogits[i, 1], params[b]), b)]
                mtp_hidden[b], mtp_next[b] = vh[i, :2], new
            else:
                residual = (p_now - q[i]).clamp(min=0)
                new = [draw(residual / residual.sum() if residual.sum() > 0 else p_now, b)]
                main_cache.truncate(slots[b], int(main_cache.lengths[slots[b]]) - 1)  # d's entry
                mtp_hidden[b], mtp_next[b] = vh[i, :1], new
            kept = []
            for t in new:
                if len(produced[b]) >= max_new_tokens:
                    break
                kept.append(t)
                produced[b].append(t)
                if t in stops:
                    break
            step[b] = kept
            stats.tokens += len(kept)
            x[b] = new[-1]
            if kept and kept[-1] not in stops and len(produced[b]) < max_new_tokens and kept == new:
                still.append(b)
        yield step
        active = still
