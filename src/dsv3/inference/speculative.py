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

`speculative_step()` is one draft + verify + accept pass over the running rows (a plain function of the
model, the two caches and the rows' state, like `decode_step`); `speculative_stream()` is the loop around it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import RequestError
from ..kernels import native
from ..model import native_decode
from ..model.cache import LatentCache
from ..model.transformer import DeepSeekV3
from .request import GenerationRequest
from .sampling import SamplingParams, filtered_probs

PREFILL_CHUNK_TOKENS = 4096  # prefill()'s chunk: the prompt goes through the model this many tokens at a time


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


@dataclass
class DraftState:
    """One running sequence: its cache slot (the same in both caches), the last sampled token (fed next),
    and the MTP layer's pending inputs: main-model hidden states h_t (n, D) and the tokens t+1 beside them."""

    slot: int
    last: int
    mtp_hidden: torch.Tensor
    mtp_next: list[int]


def _right_padded(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out.to(device)


def _pick(x: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """x (B, T, ...) -> (B, ...) taking column cols[b] of row b."""
    return x[torch.arange(x.shape[0], device=x.device), torch.as_tensor(list(cols), device=x.device)]


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One id from `probs`; a one-hot distribution (greedy rows) is read, not sampled: the same id, without
    torch.multinomial's pass over the vocabulary (~5 ms for 129,280 ids on the benchmark CPU)."""
    if int(torch.count_nonzero(probs)) == 1:
        return int(probs.argmax())
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


def _argmax_rows(x: torch.Tensor) -> list[int]:
    """`x.argmax(-1).tolist()` for float32 rows (B, V): `native.argmax_rows` where it applies (the same rules)."""
    if native.available() and x.device.type == "cpu" and x.stride(-1) == 1 and x.dtype == torch.float32:
        return native.argmax_rows(x)
    return x.argmax(dim=-1).tolist()


def _draft_logits(model: DeepSeekV3, mtp_cache: LatentCache, rows: list[DraftState]) -> torch.Tensor:
    """The MTP layer over each row's pending positions; the logits (B, V) of the last one. The cache advances."""
    dev, D = model.device, model.config.hidden_size
    slots, n_mtp = [r.slot for r in rows], [len(r.mtp_next) for r in rows]
    h_in = torch.zeros(len(rows), max(n_mtp), D, dtype=rows[0].mtp_hidden.dtype, device=dev)
    for i, r in enumerate(rows):
        h_in[i, : n_mtp[i]] = r.mtp_hidden
    next_ids = _right_padded([r.mtp_next for r in rows], dev)
    logits = native_decode.draft_logits(model, mtp_cache, slots, h_in, next_ids, n_mtp)  # the same in one call
    if logits is None:
        batch = mtp_cache.bind(slots, n_mtp)
        logits, _ = model.mtp_logits(h_in, next_ids, cache=batch, logits_at=[n - 1 for n in n_mtp])
        batch.commit()
    return logits


def _verify(
    model: DeepSeekV3, main_cache: LatentCache, rows: list[DraftState], drafts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[last, draft] through the main model for every row in one pass: (logits (B, 2, V), hidden (B, 2, D))."""
    slots = [r.slot for r in rows]
    tokens = [t for r, d in zip(rows, drafts) for t in (r.last, d)]
    made = native_decode.decode_logits(model, main_cache, slots, tokens, 2, True)
    if made is not None:
        return made
    batch = main_cache.bind(slots, [2] * len(rows))
    ids = torch.tensor([[r.last, d] for r, d in zip(rows, drafts)], dtype=torch.long, device=model.device)
    hidden = model.hidden_states(ids, cache=batch)
    batch.commit()
    return model.logits(hidden), hidden


def _greedy_step(
    model: DeepSeekV3,
    main_cache: LatentCache,
    mtp_cache: LatentCache,
    rows: list[DraftState],
    request: GenerationRequest,
) -> list[list[int]] | None:
    """`speculative_step` for greedy rows with at most 2 pending MTP positions each, in one native call (None where
    it does not apply); advances the caches and the rows' state."""
    pending = torch.zeros(len(rows), 2, model.config.hidden_size, dtype=rows[0].mtp_hidden.dtype)
    for i, r in enumerate(rows):
        pending[i, : len(r.mtp_next)] = r.mtp_hidden
    V = model.config.vocab_size
    limit = min(request.vocab_limit or V, V)
    made = native_decode.speculative_greedy(
        model, main_cache, mtp_cache, [r.slot for r in rows], [r.last for r in rows], [r.mtp_next for r in rows],
        pending, limit,
    )  # fmt: skip
    if made is None:
        return None
    new, hidden = made
    for i, (r, tokens) in enumerate(zip(rows, new)):
        r.mtp_hidden, r.mtp_next, r.last = hidden[i, : len(tokens)], tokens, tokens[-1]
    return new


@torch.inference_mode()
def speculative_step(
    model: DeepSeekV3,
    main_cache: LatentCache,
    mtp_cache: LatentCache,
    rows: list[DraftState],
    params: list[SamplingParams],
    gens: list[torch.Generator],
    request: GenerationRequest,
    stats: SpeculativeStats,
) -> list[list[int]]:
    """Draft with the MTP layer, verify [last, draft] in one main pass, accept or correct: each row's 1 or 2
    new tokens. Advances both caches and each row's state.

    Greedy rows skip the probabilities: their q and p are one-hot, so the rule reduces to "accept iff the main
    model's argmax is the draft", the bonus and the correction are argmaxes too (no draws from their generators).
    """
    B = len(rows)
    greedy = [p.temperature == 0 for p in params]
    if model.device.type == "cpu" and all(greedy) and all(len(r.mtp_next) <= 2 for r in rows):
        made = _greedy_step(model, main_cache, mtp_cache, rows, request)
        if made is not None:
            stats.steps += 1
            stats.drafted += B
            stats.accepted += sum(len(new) == 2 for new in made)
            return made
    # 1. Draft: the MTP layer over each row's pending positions; the draft comes from the last one.
    draft_logits = request.limit_vocab(_draft_logits(model, mtp_cache, rows))
    top = _argmax_rows(draft_logits) if any(greedy) else [0] * B
    q = [None if greedy[i] else filtered_probs(draft_logits[i], params[i]) for i in range(B)]
    drafts = [top[i] if greedy[i] else _draw(q[i], gens[i]) for i in range(B)]

    # 2. Verify [last, draft] for every row in one pass of the main model.
    vlogits, vh = _verify(model, main_cache, rows, drafts)
    vlogits = request.limit_vocab(vlogits)
    stats.steps += 1
    stats.drafted += B
    pairs = _argmax_rows(vlogits.reshape(2 * B, -1)) if any(greedy) else [0] * 2 * B

    # 3. Accept or correct, then the bonus token.
    out = []
    for i, (r, d) in enumerate(zip(rows, drafts)):
        if greedy[i]:
            accepted = pairs[2 * i] == d
            new = [d, pairs[2 * i + 1]] if accepted else [pairs[2 * i]]
        else:
            p_now = filtered_probs(vlogits[i, 0], params[i])
            accepted = float(torch.rand(1, generator=gens[i])) * float(q[i][d]) < float(p_now[d])
            if accepted:
                new = [d, _draw(filtered_probs(vlogits[i, 1], params[i]), gens[i])]
            else:
                residual = (p_now - q[i]).clamp(min=0)
                new = [_draw(residual / residual.sum() if residual.sum() > 0 else p_now, gens[i])]
        if accepted:
            stats.accepted += 1
            r.mtp_hidden, r.mtp_next = vh[i, :2], new
        else:
            main_cache.truncate(r.slot, int(main_cache.lengths[r.slot]) - 1)  # d's entry
            r.mtp_hidden, r.mtp_next = vh[i, :1], new
        r.last = new[-1]
        out.append(new)
    return out


@torch.inference_mode()
def speculative_stream(
    model: DeepSeekV3,
    prompts: Sequence[Sequence[int]] | GenerationRequest,
    max_new_tokens: int = 32,
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    vocab_limit: int | None = None,
    stats: SpeculativeStats | None = None,
) -> Iterator[dict[int, list[int]]]:
    """Yield, per verification step, {row: new tokens (1 or 2)} for the rows still running.

    Takes a `GenerationRequest` or its fields, as `stream()` does.
    """
    if not model.mtp:
        raise RequestError("speculative decoding needs the MTP module (num_nextn_predict_layers > 0, loaded)")
    if not isinstance(prompts, GenerationRequest):
        prompts = GenerationRequest(prompts, max_new_tokens, sampling, seed, stop_token_ids, vocab_limit)
    request = prompts.validate(model.config, reserve=1)
    stats = stats if stats is not None else SpeculativeStats()
    if request.max_new_tokens == 0:
        return
    model.prepare_for_inference()
    cfg, dev, dtype = model.config, model.device, model.dtype
    prompts, budget, stops = request.prompts, request.max_new_tokens, request.stop_set
    gens = request.generators()
    max_len = max(len(p) for p in prompts) + budget + 2
    main_cache = LatentCache(cfg, len(prompts), max_len, dtype=dtype, device=dev)
    mtp_cache = LatentCache(
        cfg, len(prompts), max_len, dtype=dtype, device=dev, num_layers=1, first_layer=cfg.num_hidden_layers
    )
    slots = [main_cache.allocate() for _ in prompts]
    assert [mtp_cache.allocate() for _ in prompts] == slots  # row b uses slot b in both caches

    # Prefill the main model over the prompts in chunks, as prefill() does (bounded activations), keeping
    # every position's hidden state: the MTP layer reads them all.
    lens = [len(p) for p in prompts]
    ids, chunks = _right_padded(prompts, dev), []
    for lo in range(0, ids.shape[1], PREFILL_CHUNK_TOKENS):
        hi = min(lo + PREFILL_CHUNK_TOKENS, ids.shape[1])
        batch = main_cache.bind(slots, [max(0, min(n, hi) - lo) for n in lens])
        chunks.append(model.hidden_states(ids[:, lo:hi], cache=batch))
        batch.commit()
    hidden = torch.cat(chunks, dim=1)
    last_logits = request.limit_vocab(model.logits(_pick(hidden, [n - 1 for n in lens])[:, None])[:, 0])
    first = [_draw(filtered_probs(last_logits[b], request.sampling[b]), gens[b]) for b in range(len(prompts))]
    produced = [[t] for t in first]
    yield {b: [t] for b, t in enumerate(first)}
    stats.tokens += len(first)
    # MTP inputs for positions 0..n-1: (h_t, token t+1), the last one using the token just sampled.
    states = {
        b: DraftState(slots[b], first[b], hidden[b, : lens[b]], prompts[b][1:] + [first[b]])
        for b in range(len(prompts))
        if first[b] not in stops and budget > 1
    }
    while states:
        active = list(states)
        new = speculative_step(
            model, main_cache, mtp_cache, [states[b] for b in active], request.row_params(active),
            [gens[b] for b in active], request, stats,
        )  # fmt: skip
        step: dict[int, list[int]] = {}
        for b, tokens in zip(active, new):
            kept = []
            for t in tokens:  # the budget and a stop id may cut an accepted pair short
                if len(produced[b]) >= budget:
                    break
                kept.append(t)
                produced[b].append(t)
                if t in stops:
                    break
            step[b] = kept
            stats.tokens += len(kept)
            if kept != tokens or kept[-1] in stops or len(produced[b]) >= budget:
                del states[b]
        yield step
