"""The compressed MLA cache: per layer and token, the post-norm latent and the rotated rope key.

That is `kv_lora_rank + qk_rope_head_dim` values (576 for V3), never per-head keys and values.

`LatentCache` is a bounded pool of sequence slots: a sequence takes a slot with `allocate()` and
gives it back with `free()`, so sequences of different lengths share one preallocated tensor.
A forward pass sees a `CacheBatch` (from `bind`): which slots its rows use, how many tokens each
already holds (`start`) and how many real new tokens each row brings (`n_new`, rows right-padded).

Legend: B batch rows, T new tokens per row, S cached length read, C = kv_lora_rank + qk_rope_head_dim.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..errors import RequestError


class LatentCache:
    """Preallocated latent KV for `num_slots` sequences of up to `max_len` tokens, all layers."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        num_layers: int | None = None,
        first_layer: int = 0,
    ) -> None:
        """`num_layers` layers starting at layer index `first_layer` (the MTP layers keep their own cache)."""
        layers = cfg.num_hidden_layers if num_layers is None else num_layers
        self.first_layer = first_layer
        self.kv_lora_rank = cfg.kv_lora_rank
        self.max_len = max_len
        # (layers, slots, max_len, C): one tensor so a slot's memory is reused as soon as it is freed.
        self.kv = torch.zeros(layers, num_slots, max_len, cfg.kv_cache_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)
        self._free = list(range(num_slots))

    @property
    def num_slots(self) -> int:
        return self.kv.shape[1]

    @property
    def slots_in_use(self) -> int:
        return self.num_slots - len(self._free)

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def allocate(self) -> int:
        """Take a free slot (emptied) or raise RequestError when the pool is full."""
        if not self._free:
            raise RequestError(f"latent cache is full ({self.num_slots} sequences)")
        slot = self._free.pop(0)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)
        self._free.sort()

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything after the first `length` tokens of a slot (rejected speculative tokens)."""
        self.lengths[slot] = min(int(self.lengths[slot]), length)

    def bind(self, slots: list[int] | torch.Tensor, n_new: list[int] | torch.Tensor) -> CacheBatch:
        """A view for one forward pass: row b appends n_new[b] tokens to slot slots[b]."""
        dev = self.lengths.device
        slots_t = torch.as_tensor(slots, dtype=torch.long, device=dev)
        n_new_t = torch.as_tensor(n_new, dtype=torch.long, device=dev)
        start = self.lengths[slots_t].clone()
        end = start + n_new_t
        longest = int(end.max()) if len(slots_t) else 0
        if longest > self.max_len:
            raise RequestError(f"sequence of {longest} tokens exceeds the cache length {self.max_len}")
        return CacheBatch(self, slots_t, start, n_new_t, longest)


class CacheBatch:
    """One forward pass's window on a LatentCache; `commit()` after the pass advances the lengths."""

    def __init__(
        self, cache: LatentCache, slots: torch.Tensor, start: torch.Tensor, n_new: torch.Tensor, read_len: int
    ) -> None:
        self.cache, self.slots, self.start, self.n_new, self.read_len = cache, slots, start, n_new, read_len
        s = slots.tolist()
        # Rows on consecutive slots (the usual generate() case) read a view instead of a gather.
        self._slot_range = (s[0], s[-1] + 1) if s and s == list(range(s[0], s[0] + len(s))) else None
        self._per_pass: dict[tuple, object] = {}  # attention masks and write indices, per pass
        self._starts_empty = not bool(start.any())

    def positions(self, num_tokens: int) -> torch.Tensor:
        """(B, T) absolute positions of the new tokens."""
        return self.start[:, None] + torch.arange(num_tokens, device=self.start.device)

    def update(self, layer: int, kv_new: torch.Tensor) -> torch.Tensor:
        """Write kv_new (B, T, C) for the real new tokens, return this layer's cache (B, S, C)."""
        store = self.cache.kv[layer - self.cache.first_layer]
        slot_idx, pos_idx, real = self._write_index(kv_new.shape[1], kv_new.device)
        rows = kv_new if real is None else kv_new[real]
        store.index_put_((slot_idx, pos_idx), rows.to(store.dtype))
        if self._slot_range is not None:
            lo, hi = self._slot_range
            return store[lo:hi, : self.read_len]
        return store[self.slots, : self.read_len]

    def _write_index(self, num_tokens: int, device: torch.device) -> tuple:
        """(slot, position) indices of the real new tokens, and which (b, t) they are (None: all of them).

        The same for every layer of the pass: computed once (each layer then writes with one op).
        """
        key = ("write", num_tokens, device)
        if key not in self._per_pass:
            T = num_tokens
            t = torch.arange(T, device=device)
            if bool((self.n_new == T).all()):
                B = self.slots.shape[0]
                entry = (self.slots[:, None].expand(B, T), self.start[:, None] + t, None)
            else:
                real = t[None, :] < self.n_new[:, None]  # (B, T): right padding is not written
                b_idx, t_idx = real.nonzero(as_tuple=True)
                entry = (self.slots[b_idx], self.start[b_idx] + t_idx, (b_idx, t_idx))
            self._per_pass[key] = entry
        return self._per_pass[key]

    def native_offsets(self, num_tokens: int, store: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot offsets (B,), write offsets (B*T,), -1 for padding): int64 element offsets into a layer's store.

        What `kernels.native.decode_layer` reads and writes; the same for every layer of the pass.
        """
        key = ("native", num_tokens, store.stride())
        if key not in self._per_pass:
            B, T = self.slots.shape[0], num_tokens
            slot_stride, pos_stride = store.stride(0), store.stride(1)
            write = torch.full((B, T), -1, dtype=torch.int64)
            slot_idx, pos_idx, real = self._write_index(T, store.device)
            offsets = slot_idx * slot_stride + pos_idx * pos_stride
            if real is None:
                write[:] = offsets
            else:
                write[real] = offsets
            self._per_pass[key] = ((self.slots * slot_stride).contiguous(), write.view(-1))
        return self._per_pass[key]

    def is_fresh(self, num_tokens: int) -> bool:
        """True when every row starts at position 0 and the pass reads exactly its T new tokens.

        Then causal attention over the T tokens is exact: a real query t of a right-padded row sees
        keys <= t, all real, and padded queries are never read.
        """
        return self._starts_empty and self.read_len == num_tokens

    def attention_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """(B, T, S) bool: query t of row b sees cached key j iff j <= start_b + t and j < start_b + n_new_b."""
        key = (num_tokens, device)
        if key not in self._per_pass:
            j = torch.arange(self.read_len, device=device)
            q_pos = self.positions(num_tokens).to(device)  # (B, T)
            end = (self.start + self.n_new).to(device)
            mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < end[:, None, None])
            # Key 0 always visible: a padded row with nothing cached must not softmax over nothing (NaN).
            mask[:, :, 0] = True
            self._per_pass[key] = mask
        return self._per_pass[key]

    def commit(self) -> None:
        """Advance each slot's length by its new tokens (call once, after the forward pass)."""
        self.cache.lengths[self.slots] = self.start + self.n_new


class StaticDecodeBatch:
    """One new token per row, no host sync, shapes fixed by (rows, read length): the cache a compiled decode step sees.

    `kv` is a LatentCache's whole store (layers, slots, max_len, C). Row b writes its new latent in
    place at (slots[b], start[b]) and reads the first S = mask.shape[-1] positions of its slot;
    mask (B, 1, S) is j <= start[b]. Padding rows repeat a real row (same slot, position and token),
    so their writes are the same values at the same place.
    """

    def __init__(
        self, kv: torch.Tensor, first_layer: int, slots: torch.Tensor, start: torch.Tensor, mask: torch.Tensor
    ) -> None:
        self.kv, self.first_layer, self.slots, self.start, self.mask = kv, first_layer, slots, start, mask

    def positions(self, num_tokens: int) -> torch.Tensor:
        return self.start[:, None]

    def update(self, layer: int, kv_new: torch.Tensor) -> torch.Tensor:
        store = self.kv[layer - self.first_layer]
        store.index_put_((self.slots, self.start), kv_new[:, 0].to(store.dtype))
        return store[self.slots, : self.mask.shape[-1]]

    def is_fresh(self, num_tokens: int) -> bool:
        return False

    def attention_mask(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        return self.mask
