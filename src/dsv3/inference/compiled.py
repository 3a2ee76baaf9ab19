"""The compiled decode step: `decode_step` as one static-shape graph per batch bucket (`torch.compile`).

What makes it compilable (SPEC section 5's warning: a naive `torch.compile` of the eager model ran at
half eager's speed, breaking its graph at every data-dependent branch):

- a fixed batch bucket (1, 2, 4, 8, ... rows): a batch of B rows runs in the smallest bucket >= B,
  the extra rows repeating row 0 (same slot, position and token: their cache writes are the same
  values at the same place), so a freed and re-used slot or a shrinking batch never recompiles;
- the latent cache written in place (`StaticDecodeBatch`: index_put at each row's position) and
  read up to S keys, S rounded up to a multiple of `READ_QUANTUM` and marked dynamic, with a mask
  for the keys past each row's length (ragged rows);
- routed experts by the "gather" strategy (`moe.choose_strategy` picks it while compiling): each
  assignment's expert weights gathered, no host sync, no shape that depends on the routing.

The same function is what a GPU captures as a CUDA graph (torch.compile's "reduce-overhead", on for
CUDA models): no host sync, no Python-side branch on values. Untested on a GPU (none was lent to
this work).

Compiling costs seconds to minutes per bucket, once per process (inductor's on-disk FX graph cache,
on by default, makes later processes faster); a progress line says so when it happens. Eager
`decode_step` stays the reference the tests hold this to.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable

import torch

from ..errors import RequestError
from ..model.cache import LatentCache, StaticDecodeBatch
from ..model.transformer import DeepSeekV3

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
READ_QUANTUM = 64  # keys read per row are rounded up to this: fewer distinct shapes, at most 63 masked keys


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class CompiledDecoder:
    """`decode(cache, slots, tokens)` == `generate.decode_step(model, cache, slots, tokens)`, through torch.compile."""

    def __init__(self, model: DeepSeekV3, cuda_graphs: bool = False, log: Callable[[str], None] = _stderr) -> None:
        """`cuda_graphs`: capture the step as a CUDA graph (torch.compile's "reduce-overhead"; GPU only, untested)."""
        self.model, self.log, self.cuda_graphs = model, log, cuda_graphs
        # emulate_precision_casts: round to bf16 wherever eager does, so greedy tokens match the eager reference.
        # (torch.compile takes a `mode` or `options`, not both: "reduce-overhead" is its triton.cudagraphs option.)
        options = {"emulate_precision_casts": True, "triton.cudagraphs": cuda_graphs}
        self._compiled = torch.compile(self._step, fullgraph=True, dynamic=False, options=options)
        self._buckets_seen: set[int] = set()

    def _step(
        self,
        ids: torch.Tensor,
        kv: torch.Tensor,
        first_layer: int,
        slots: torch.Tensor,
        start: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        batch = StaticDecodeBatch(kv, first_layer, slots, start, mask)
        return self.model(ids, cache=batch)[:, -1]

    def _prepare_weights(self) -> None:
        """What the eager path derives lazily from the weights, derived once before tracing."""
        dtype = self.model.model.embed_tokens.weight.dtype
        for layer in self.model.model.layers:
            layer.self_attn.absorbed_weights(dtype)

    @torch.inference_mode()
    def __call__(self, cache: LatentCache, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Append one token per slot; return the next-token logits (B, V)."""
        B = len(slots)
        bucket = next((b for b in BATCH_BUCKETS if b >= B), B)
        dev = cache.lengths.device
        pad = bucket - B
        slots_t = torch.tensor(list(slots) + [slots[0]] * pad, dtype=torch.long, device=dev)
        ids = torch.tensor(list(tokens) + [tokens[0]] * pad, dtype=torch.long, device=dev)[:, None]
        start = cache.lengths[slots_t]
        longest = int(start.max()) + 1
        if longest > cache.max_len:
            raise RequestError(f"sequence of {longest} tokens exceeds the cache length {cache.max_len}")
        S = min(-(-longest // READ_QUANTUM) * READ_QUANTUM, cache.max_len)
        mask = torch.arange(S, device=dev)[None, None, :] <= start[:, None, None]
        kv = cache.kv
        if self.cuda_graphs:  # a graph that writes its input in place is only replayed if the input stays put
            torch._dynamo.mark_static_address(kv)
        torch._dynamo.maybe_mark_dynamic(mask, 2)
        torch._dynamo.maybe_mark_dynamic(kv, 1)
        torch._dynamo.maybe_mark_dynamic(kv, 2)
        if bucket not in self._buckets_seen:
            self._prepare_weights()
            self.log(
                f"dsv3: compiling the decode step for batch bucket {bucket} (once per process; --no-compile: eager)"
            )
            t0 = time.perf_counter()
            logits = self._compiled(ids, kv, cache.first_layer, slots_t, start, mask)
            self._buckets_seen.add(bucket)
            self.log(f"dsv3: decode step for batch bucket {bucket} compiled in {time.perf_counter() - t0:.1f} s")
        else:
            logits = self._compiled(ids, kv, cache.first_layer, slots_t, start, mask)
        cache.lengths[slots_t[:B]] = start[:B] + 1
        return logits[:B]


_DECODERS: weakref.WeakKeyDictionary[DeepSeekV3, CompiledDecoder] = weakref.WeakKeyDictionary()


def compiled_decoder(model: DeepSeekV3) -> CompiledDecoder:
    """The model's CompiledDecoder, built on first use: compile time is paid once per process and bucket."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        cuda = model.model.embed_tokens.weight.device.type == "cuda"
        decoder = _DECODERS[model] = CompiledDecoder(model, cuda_graphs=cuda)
    return decoder
