"""Whole decoder layers in one call into kernels.native, for decode-sized batches on CPU.

Why: a decode step of a small model is mostly overhead. Through the modules a layer costs ~13 native
calls and ~35 torch ops, each a few microseconds of Python and dispatch; `dsv3_decode_layer` runs the same
kernels in sequence in C, rounding the activations wherever the module path rounds them, so its output
equals `DecoderLayer.forward` on the native path (the tests compare them). `dsv3_decode_pass` runs a
whole stack of them in one call, building the pass's rotary angles, cache offsets and mask from the cache's
state itself: the Python between layers runs with cold caches (the step streams the weights through them)
and cost more than the small layers' C. `decode_logits` goes one step further for a plain decode step: one
call from token ids to logits, the cache's lengths advanced in C.

`plan(layer, x, cache)` says whether the layer can run this way and returns its weights as a
`native.LayerWeights` (pointers, rebuilt whenever a weight tensor moves); `plan_stack` says it for all
the layers of `DeepSeekV3.hidden_states` at once. Anything they do not cover (training, grad, hooks such
as tensor parallelism's, expert parallelism, mixed-precision weights, a cache in another dtype, the
expanded attention) keeps the module path.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as _module

from ..errors import RequestError
from ..kernels import native
from .linear import NATIVE_MAX_ROWS, Linear, fused_weight, uses_native
from .moe import MLP, MoE, expert_fp8_grids

if TYPE_CHECKING:
    from .cache import CacheBatch, LatentCache
    from .rope import RotaryEmbedding
    from .transformer import DecoderLayer, DeepSeekV3


def _projection(layer: Linear, dtype: torch.dtype) -> native.Projection | None:
    """The layer's weight as the kernels take it: bf16/fp32, int8 + per-row scales, or FP8 + block scales (bf16
    activations, fp8_compute 'dequant' or 'gemm': what `Linear.forward` computes natively too)."""
    if layer.is_fp8:
        if dtype != torch.bfloat16 or not layer.fits_native_fp8():
            return None
        if layer.options.fp8_compute == "gemm":
            grid = layer.native_gemm_grid(dtype)
        else:
            grid = native.Fp8Grid.of(layer.weight_scale_inv, layer.block_size, dtype)
        return native.Projection.of(layer.weight, fp8=grid)
    scale = layer.weight_scale if layer.is_int8 else None
    return native.Projection.of(layer.weight, scale) if native.fits_projection(layer.weight, scale) else None


def _mlp_weights(mlp: MLP, dtype: torch.dtype) -> tuple[native.Projection, native.Projection, native.Projection] | None:
    """(gate or fused gate/up, up or absent, down) of a SwiGLU MLP, or None where a weight does not fit."""
    fused = fused_weight(mlp._gate_up, mlp.gate_proj, mlp.up_proj)
    if fused is not None and native.fits_projection(fused):
        gate, up = native.Projection.of(fused), native.Projection()
    else:
        gate, up = _projection(mlp.gate_proj, dtype), _projection(mlp.up_proj, dtype)
    down = _projection(mlp.down_proj, dtype)
    return None if gate is None or up is None or down is None else (gate, up, down)


def _norm_fits(norm: nn.Module, dtype: torch.dtype) -> bool:
    return norm.weight.dtype == dtype and norm.weight.is_contiguous()


def _build(
    layer: DecoderLayer, x: torch.Tensor
) -> tuple[native.LayerWeights, list[torch.Tensor], list[torch.Tensor]] | None:
    """The layer's `native.LayerWeights` for activations like x, the derived tensors it points into (kept alive),
    and the layer's tensors those were copied from: the only ones whose in-place writes the plan would miss (the
    kernels read every other weight where it lies)."""
    dtype, attn = x.dtype, layer.self_attn
    norms = [layer.input_layernorm, layer.post_attention_layernorm, attn.kv_a_layernorm]
    if attn.q_lora_rank is not None:
        norms.append(attn.q_a_layernorm)
    if not all(_norm_fits(n, dtype) for n in norms):
        return None
    q_layer, kv_layer = attn._input_projections()
    fused = fused_weight(attn._x_proj, q_layer, kv_layer)
    if fused is not None and native.fits_projection(fused):
        q_in, kv_a = native.Projection.of(fused), native.Projection()
    else:
        q_in, kv_a = _projection(q_layer, dtype), _projection(kv_layer, dtype)
    q_b = _projection(attn.q_b_proj, dtype) if attn.q_lora_rank is not None else native.Projection()
    o_proj = _projection(attn.o_proj, dtype)
    if q_in is None or kv_a is None or q_b is None or o_proj is None:
        return None
    w_uk, w_uv_t = attn.absorbed_weights(dtype)
    keep = [w_uk, w_uv_t]
    copied = [*attn.kv_b_proj.parameters(), *attn.kv_b_proj.buffers()]
    H = w_uk.shape[0]
    w = native.LayerWeights(
        D=x.shape[-1], H=H, Dn=attn.nope_dim, Dr=attn.rope_dim, Dv=attn.v_dim, R=attn.kv_lora_rank,
        QR=attn.q_lora_rank or 0, xtype=native._TYPE[dtype],
        eps_in=layer.input_layernorm.eps, eps_post=layer.post_attention_layernorm.eps,
        eps_kv=attn.kv_a_layernorm.eps, norm_in=layer.input_layernorm.weight.data_ptr(),
        norm_post=layer.post_attention_layernorm.weight.data_ptr(), norm_kv=attn.kv_a_layernorm.weight.data_ptr(),
        q_in=q_in, kv_a=kv_a, q_b=q_b, o_proj=o_proj, w_uk=w_uk.data_ptr(), w_uv_t=w_uv_t.data_ptr(),
        softmax_scale=attn.softmax_scale,
    )  # fmt: skip
    if attn.q_lora_rank is not None:
        w.eps_q, w.norm_q = attn.q_a_layernorm.eps, attn.q_a_layernorm.weight.data_ptr()
    mlp = layer.mlp
    dense = mlp if isinstance(mlp, MLP) else mlp.shared_experts
    if dense is not None:
        weights = _mlp_weights(dense, dtype)
        if weights is None:
            return None
        w.mlp_gate, w.mlp_up, w.mlp_down = weights
    if isinstance(mlp, MoE):
        if not mlp._routes_natively(x.reshape(-1, x.shape[-1])):
            return None
        gate, experts = mlp.gate, mlp.experts
        g, u, d = experts.gate_proj, experts.up_proj, experts.down_proj
        bias = gate.e_score_correction_bias
        w.E, w.K, w.F = g.weight.shape[0], gate.top_k, g.weight.shape[1]
        w.router_w, w.bias = gate.weight.data_ptr(), None if bias is None else bias.data_ptr()
        w.scoring, w.method = native.SCORING_FUNCS[gate.scoring_func], native.ROUTING_METHODS[gate.topk_method]
        w.n_group, w.topk_group, w.norm_topk, w.scaling = (
            gate.n_group,
            gate.topk_group,
            gate.norm_topk_prob,
            gate.scaling,
        )
        w.gate, w.up, w.down = g.weight.data_ptr(), u.weight.data_ptr(), d.weight.data_ptr()
        w.etype, w.gu_es, w.down_es = native._TYPE[g.weight.dtype], g.weight.stride(0), d.weight.stride(0)
        if g.is_int8:
            scales = [p.weight_scale.float().contiguous() for p in (g, u, d)]
            keep += scales
            copied += [p.weight_scale for p, s in zip((g, u, d), scales) if s.data_ptr() != p.weight_scale.data_ptr()]
            w.gate_scale, w.up_scale, w.down_scale = (s.data_ptr() for s in scales)
        fp8 = expert_fp8_grids(experts, dtype)
        if fp8 is not None:
            w.expert_fp8 = (native.Fp8Grid * 3)(*fp8)
    return w, keep, copied


def _module_slots(m: nn.Module) -> list[tuple[dict, str, object]]:
    """(dict, name, value) for what a plan made from module m depends on: its `options` object and each parameter,
    buffer and child module it holds (checked by identity: `dict.get(name) is value`)."""
    d = m.__dict__
    slots: list[tuple[dict, str, object]] = [(d, "options", d.get("options"))]
    for owner in (d["_parameters"], d["_buffers"], d["_modules"]):
        slots += [(owner, name, value) for name, value in owner.items()]
    return slots


def _module_tensors(modules: tuple[nn.Module, ...] | list[nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers the modules hold themselves (not their children's), None entries left out."""
    return [t for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]


class _Built:
    """A layer's plan and what it was built from: every parameter, buffer, child module and `options` object of
    the layer's modules (which dict held it under which name), each tensor's storage and version, and the
    modules' hook dicts."""

    __slots__ = (
        "owners", "names", "values", "tensors", "ptrs", "versioned", "versions", "hooks", "dtype", "weights", "keep",
    )  # fmt: skip

    def __init__(self, layer: DecoderLayer, x: torch.Tensor) -> None:
        # Nothing here references the layer itself: _PLANS' values must not keep their keys alive.
        modules = tuple(layer.modules())
        self.dtype = x.dtype
        slots = [slot for m in modules for slot in _module_slots(m)]
        self.owners, self.names, self.values = (list(column) for column in zip(*slots))
        self.tensors = _module_tensors(modules)
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.hooks = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        made = _build(layer, x)
        self.weights, self.keep, copied = made if made is not None else (None, None, [])
        # Inference tensors (made under torch.inference_mode) have no version counter.
        self.versioned = [t for t in copied if not t.is_inference()]
        self.versions = [t._version for t in self.versioned]

    def current(self, dtype: torch.dtype) -> bool:
        """Whether nothing the plan depends on changed: the same objects in the same places, storages not moved,
        the sources of its copies (the absorbed attention weights) not written in place. About 70 identity
        checks and 30 integer reads a layer, iterated in C (`map`): every decode step checks them, with caches
        the step's weights have just flushed (~0.6 ms for `small`'s 8 layers when every tensor's version was
        read too)."""
        return (
            dtype == self.dtype
            and all(map(operator.is_, map(dict.get, self.owners, self.names), self.values))
            and list(map(_data_ptr, self.tensors)) == self.ptrs
            and list(map(_version, self.versioned)) == self.versions
        )


_data_ptr = torch.Tensor.data_ptr
_version = operator.attrgetter("_version")


class _Stack:
    """A layer stack's one-call plan and what its layers' plans were built from, in flat lists: a decode pass checks
    them with a few `map`s instead of a round of Python per layer (with cold caches, that round cost as much as
    the checks themselves)."""

    __slots__ = (
        "plans", "stack", "modules", "count", "owners", "names", "values", "tensors", "ptrs", "versioned",
        "versions", "hooks", "dtype", "queries", "layer_indices",
    )  # fmt: skip

    def __init__(self, layers: nn.ModuleList, plans: list[_Built]) -> None:
        self.plans = plans  # keeps each layer's derived tensors alive
        self.stack = native.LayerStack([b.weights for b in plans])
        self.dtype = plans[0].dtype
        self.modules, self.count = layers._modules, len(layers._modules)
        modules = [m for layer in layers for m in layer.modules()]
        # The layers in their places, each module's training flag (True and False are singletons), and each
        # layer's own slots; options were "native" when built and InferenceOptions is frozen.
        slots = [(layers._modules, name, layer) for name, layer in layers._modules.items()]
        slots += [(m.__dict__, "training", m.training) for m in modules]
        self.owners = [owner for owner, _, _ in slots] + [o for b in plans for o in b.owners]
        self.names = [name for _, name, _ in slots] + [n for b in plans for n in b.names]
        self.values = [value for _, _, value in slots] + [v for b in plans for v in b.values]
        self.tensors = [t for b in plans for t in b.tensors]
        self.ptrs = [p for b in plans for p in b.ptrs]
        self.versioned = [t for b in plans for t in b.versioned]
        self.versions = [v for b in plans for v in b.versions]
        self.hooks = [h for b in plans for h in b.hooks]
        self.layer_indices = [layer.self_attn.layer_idx for layer in layers]
        # Decode-sized passes have at most NATIVE_MAX_ROWS tokens a row: where absorbed attention is the cheaper.
        self.queries = frozenset(
            T for T in range(1, NATIVE_MAX_ROWS + 1) if all(layer.self_attn._absorbed_is_cheaper(T) for layer in layers)
        )

    def current(self, dtype: torch.dtype, tokens_per_row: int) -> bool:
        """Whether this plan still holds for activations of `dtype`: `_Built.current` for every layer at once, the
        same layers, no hooks, not training, and the tokens a row within what the plan was checked for."""
        return (
            dtype == self.dtype
            and tokens_per_row in self.queries
            and len(self.modules) == self.count
            and all(map(operator.is_, map(dict.get, self.owners, self.names), self.values))
            and list(map(_data_ptr, self.tensors)) == self.ptrs
            and list(map(_version, self.versioned)) == self.versions
            and not any(self.hooks)
        )


class _Head:
    """The model's embedding, final norm and lm_head as `native.decode_step` takes them (`weights`, None where the
    module path would not run them through the native kernels), and what that was built from."""

    __slots__ = ("weights", "owners", "names", "values", "tensors", "ptrs", "hooks")

    def __init__(self, model: DeepSeekV3, dtype: torch.dtype) -> None:
        embed, norm, head = model.model.embed_tokens, model.model.norm, model.lm_head
        d = embed.__dict__
        slots = [
            (model._modules, "model", model.model), (model._modules, "lm_head", head),
            (model.model._modules, "embed_tokens", embed), (model.model._modules, "norm", norm),
            (d, "forward", d.get("forward")), (d, "max_norm", d.get("max_norm")),  # tensor parallelism's embedding
        ]  # fmt: skip
        for m in (embed, norm, head):
            slots += [*_module_slots(m), (m.__dict__, "training", m.training)]
        self.owners, self.names, self.values = (list(column) for column in zip(*slots))
        self.tensors = _module_tensors((embed, norm, head))
        self.ptrs = [t.data_ptr() for t in self.tensors]
        self.hooks = [d for m in (model, embed, norm, head) for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.weights = None
        probe = torch.empty(1, 1, head.in_features, dtype=dtype)  # decode-sized rows: does Linear go native?
        fits = (
            not any(self.hooks)  # the module path runs them
            and embed.max_norm is None
            and "forward" not in embed.__dict__
            and embed.weight.dtype == dtype
            and embed.weight.is_contiguous()
            and embed.weight.device.type == "cpu"
            and _norm_fits(norm, dtype)
            and norm.options.matvec == "native"
            and head._native_operands(probe) is not None
        )
        projection = _projection(head, dtype) if fits else None
        if projection is not None:
            self.weights = native.HeadWeights(norm.weight.data_ptr(), norm.eps, projection)

    def current(self) -> bool:
        """Whether the same modules hold the same tensors in the same storage, with no hooks."""
        return (
            all(map(operator.is_, map(dict.get, self.owners, self.names), self.values))
            and list(map(_data_ptr, self.tensors)) == self.ptrs
            and not any(self.hooks)
        )


# layer -> its _Built. Outside the modules so that copying or pickling a model never meets the ctypes pointers.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# layer stack (ModuleList) -> its _Stack (which references the layers, never the ModuleList)
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> its _Head (which references the model's modules, never the model)
_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (`torch.nn.modules.module.register_module_forward_hook`,
    profilers and activation recorders use them): the module path calls them, the one-call kernels would not."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


def _pass_fits(x: torch.Tensor, cache: CacheBatch | None, matvec: str) -> bool:
    """What every layer of this pass shares: decode-sized CPU activations, no grad, a latent cache in x's dtype
    that the kernel can address, the kernels built, no global hooks."""
    return (
        cache is not None
        and not _global_hooks()
        and uses_native(x, matvec)
        and x.dtype in (torch.bfloat16, torch.float32)
        and hasattr(cache, "native_offsets")
        and cache.cache.kv.dtype == x.dtype
        and cache.cache.kv.is_contiguous()  # the kernel addresses it by element offsets
        and native.available()
    )


def _layer_plan(layer: DecoderLayer, x: torch.Tensor) -> native.LayerWeights | None:
    """`plan` once the pass fits: the layer's own conditions and its (re)built weights."""
    attn = layer.self_attn
    if layer.training or attn.options.matvec != "native" or not attn._absorbed_is_cheaper(x.shape[1]):
        return None
    built = _PLANS.get(layer)
    if built is None or not built.current(x.dtype):
        built = _PLANS[layer] = _Built(layer, x)
    if any(built.hooks):  # e.g. tensor parallelism's: the module path runs them
        return None
    return built.weights


def plan(layer: DecoderLayer, x: torch.Tensor, cache: CacheBatch | None) -> native.LayerWeights | None:
    """The layer's native weights when this forward can run as one `native.decode_layer` call, else None."""
    if not _pass_fits(x, cache, layer.self_attn.options.matvec):
        return None
    return _layer_plan(layer, x)


def plan_stack(layers: nn.ModuleList, x: torch.Tensor, cache: CacheBatch | None) -> native.LayerStack | None:
    """The whole stack as one `native.decode_pass` call when `plan` says yes for every layer, else None."""
    if not len(layers) or not _pass_fits(x, cache, layers[0].self_attn.options.matvec):
        return None
    made = _STACKS.get(layers)
    if made is not None and made.current(x.dtype, x.shape[1]):
        return made.stack
    for layer in layers:
        if _layer_plan(layer, x) is None:
            return None
    made = _STACKS[layers] = _Stack(layers, [_PLANS[layer] for layer in layers])
    return made.stack


def _layer_stores(cache: LatentCache, layer_indices: list[int]) -> list[int]:
    """The data pointer of each layer's latent store [slots, positions, R+Dr] in `cache` (model layer indices)."""
    kv = cache.kv
    layer_bytes = kv.stride(0) * kv.element_size()
    return [kv.data_ptr() + (i - cache.first_layer) * layer_bytes for i in layer_indices]


def forward_stack(
    layers: nn.ModuleList, stack: native.LayerStack, x: torch.Tensor, rotary: RotaryEmbedding, cache: CacheBatch
) -> torch.Tensor:
    """Every layer's `forward(x, cos, sin, cache)` in turn through `native.decode_pass` (after `plan_stack`), at the
    positions after each row's cached tokens (`cache.positions`)."""
    kv = cache.cache.kv
    indices = [layer.self_attn.layer_idx for layer in layers]
    if not 0 <= min(indices) - cache.cache.first_layer <= max(indices) - cache.cache.first_layer < len(kv):
        # as `CacheBatch.update` would fail
        raise IndexError(f"the cache holds {len(kv)} layers from layer {cache.cache.first_layer}, not these layers")
    stores = _layer_stores(cache.cache, indices)
    # Padding positions (up to T past a row's start) get angles too: cover the cache's length plus one pass.
    rope_cos, rope_sin = rotary.table(cache.cache.max_len + x.shape[1])
    return native.decode_pass(
        stack, x, rope_cos, rope_sin, stores, cache.slots, cache.start, cache.n_new, kv.stride()[1:3], cache.read_len
    )


def forward(
    layer: DecoderLayer, weights: native.LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    cache: CacheBatch,
) -> torch.Tensor:  # fmt: skip
    """`DecoderLayer.forward(x, cos, sin, cache)` through `native.decode_layer` (after `plan` returned weights)."""
    store = cache.cache.kv[layer.self_attn.layer_idx - cache.cache.first_layer]
    slot_offsets, write_offsets = cache.native_offsets(x.shape[1], store)
    mask = cache.attention_mask(x.shape[1], x.device)
    return native.decode_layer(
        weights, x, cos.float().contiguous(), sin.float().contiguous(), store, slot_offsets, write_offsets,
        cache.read_len, mask,
    )  # fmt: skip


def decode_logits(
    model: DeepSeekV3,
    cache: LatentCache,
    slots: list[int],
    tokens: list[int],
    tokens_per_row: int = 1,
    hidden: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """`model(ids, cache=batch)` and `batch.commit()` for T = tokens_per_row tokens a slot (`tokens`: row-major, B*T
    ids) as one `native.decode_step` call (embedding, the layers' stack, final norm and lm_head, the cache's lengths
    read and advanced in C): the last position's logits (B, V) for T = 1, all of them (B, T, V) otherwise; with
    `hidden`, (logits (B, T, V), `hidden_states` (B, T, D)). None where the module path must run: the stack not
    planned yet (its first pass plans it) or no longer current, a head the native kernels do not take, hooks, grad,
    more tokens than a decode-sized pass.

    Why: with the weights streamed through the caches every step, the ~40 torch ops and Python calls around the
    kernels of a step (binding the cache, angles, offsets, mask, norm, head) cost ~1-2 ms on `small`.
    """
    planned = _step_plans(model, cache, len(tokens), tokens_per_row)
    if planned is None:
        return None
    stack, head = planned
    kv = cache.kv
    rope_cos, rope_sin = model.rotary.table(cache.max_len + tokens_per_row)
    try:
        return native.decode_step(
            stack.stack, head.weights, tokens, model.model.embed_tokens.weight, rope_cos, rope_sin,
            _layer_stores(cache, stack.layer_indices), slots, cache.lengths, (cache.max_len, kv.stride(1), kv.stride(2)),
            tokens_per_row, hidden,
        )  # fmt: skip
    except OverflowError as e:
        raise RequestError(str(e)) from None


def _step_plans(model: DeepSeekV3, cache: LatentCache, rows: int, tokens_per_row: int) -> tuple[_Stack, _Head] | None:
    """The stack's and the head's plans for a one-call pass of `rows` token rows over `cache`, current; None where
    the module path must run (`decode_logits`' cases)."""
    stack = _STACKS.get(model.model.layers)
    if stack is None or not 0 < rows <= NATIVE_MAX_ROWS or not _cache_fits(cache, stack.dtype):
        return None
    first, last = (i - cache.first_layer for i in (stack.layer_indices[0], stack.layer_indices[-1]))
    if not 0 <= first <= last < len(cache.kv):  # the cache holds the stack's layers
        return None
    head = _HEADS.get(model)
    if head is None or not head.current():
        head = _HEADS[model] = _Head(model, stack.dtype)
    if head.weights is None or not stack.current(stack.dtype, tokens_per_row):  # the cheaper check first
        return None
    return stack, head


@torch.inference_mode()
def decode_greedy(
    model: DeepSeekV3,
    cache: LatentCache,
    slots: list[int],
    tokens: list[int],
    limit: int,
    n_steps: int,
    stops: Collection[int],
) -> list[list[int]] | None:
    """Up to `n_steps` greedy decode steps in one `native.decode_greedy` call: what `generate.decode_step` and an
    argmax over ids < `limit` give step after step, rows leaving the batch after an id in `stops` or n_steps tokens;
    each row's new tokens. None where `decode_logits` would be (the module path must run, or the first pass has not
    planned the stack yet).

    Why: between steps, `decode_logits`' checks and the call's Python cost ~0.7 ms on `small` with cold caches; no
    user code runs inside this call, so it checks the plans once for all its steps.
    """
    planned = _step_plans(model, cache, len(tokens), 1)
    if planned is None or n_steps <= 0:
        return None
    stack, head = planned
    kv = cache.kv
    rope_cos, rope_sin = model.rotary.table(cache.max_len + 1)
    try:
        return native.decode_greedy(
            stack.stack, head.weights, tokens, model.model.embed_tokens.weight, rope_cos, rope_sin,
            _layer_stores(cache, stack.layer_indices), slots, cache.lengths, (cache.max_len, kv.stride(1), kv.stride(2)),
            min(limit, head.weights.proj.rows), n_steps, sorted(stops),
        )  # fmt: skip
    except OverflowError as e:
        raise RequestError(str(e)) from None


def _cache_fits(cache: LatentCache, dtype: torch.dtype) -> bool:
    """Whether the one-call kernels can address this cache for activations of `dtype` in this mode (no grad, no
    global hooks)."""
    kv = cache.kv
    return (
        not torch.is_grad_enabled()
        and not _global_hooks()
        and not torch.compiler.is_compiling()
        and kv.dtype == dtype
        and kv.device.type == "cpu"
        and kv.is_contiguous()
        and cache.lengths.dtype == torch.int64
        and cache.lengths.is_contiguous()
    )


class _Mtp:
    """An MTP module as `native.mtp_draft` takes it (`weights`, with its decoder layer's `_Built`; None where the module
    path would not run it through the native kernels), and what that was built from."""

    __slots__ = ("built", "weights", "owners", "names", "values", "hooks", "hooked", "queries", "dtype")

    def __init__(self, model: DeepSeekV3, depth: int, dtype: torch.dtype) -> None:
        layer = model.mtp[depth]
        modules = tuple(layer.modules())
        d = layer.embed_tokens.__dict__
        slots = [(model._modules, "mtp", model.mtp), (model.mtp._modules, str(depth), layer)]
        slots += [(d, "forward", d.get("forward")), (d, "max_norm", d.get("max_norm"))]
        slots += [(m.__dict__, "training", m.training) for m in modules]
        self.owners, self.names, self.values = (list(column) for column in zip(*slots))
        self.hooks = [h for m in modules for h in (m._forward_hooks, m._forward_pre_hooks)]
        self.hooked, self.dtype = any(self.hooks), dtype
        self.queries = frozenset(T for T in range(1, NATIVE_MAX_ROWS + 1) if layer.self_attn._absorbed_is_cheaper(T))
        self.built, self.weights = None, None
        D = model.config.hidden_size
        probe = torch.empty(1, 1, D, dtype=dtype)
        cat_probe = torch.empty(1, 1, 2 * D, dtype=dtype)
        embed, head, head_norm = layer.embed_tokens, layer.shared_head.head, layer.shared_head.norm
        if (
            self.hooked
            or any(m.training for m in modules)  # as `_Stack`: a training module may compute differently
            or layer.self_attn.options.matvec != "native"
            or embed.max_norm is not None
            or "forward" in d
            or embed.weight.dtype != dtype
            or not embed.weight.is_contiguous()
            or embed.weight.device.type != "cpu"
            or not all(_norm_fits(n, dtype) for n in (layer.enorm, layer.hnorm, head_norm))
            or layer.eh_proj._native_operands(cat_probe) is None
            or head._native_operands(probe) is None
        ):
            return
        eh, out = _projection(layer.eh_proj, dtype), _projection(head, dtype)
        built = _Built(layer, probe)
        if eh is None or out is None or built.weights is None:
            return
        self.built = built
        self.weights = native.MtpWeights(
            embed.weight.data_ptr(), layer.enorm.weight.data_ptr(), layer.hnorm.weight.data_ptr(), layer.enorm.eps,
            layer.hnorm.eps, eh, native.HeadWeights(head_norm.weight.data_ptr(), head_norm.eps, out),
        )  # fmt: skip

    def current(self, dtype: torch.dtype) -> bool:
        """Whether the module, its children and their tensors are the ones this was built from, for the same dtype,
        with hooks where there were (none, for a plan with weights) and the same training flags."""
        return (
            dtype == self.dtype
            and all(map(operator.is_, map(dict.get, self.owners, self.names), self.values))
            and any(self.hooks) == self.hooked
            and (self.built is None or self.built.current(dtype))
        )


# model -> {depth: its _Mtp} (which references the model's modules, never the model)
_MTPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def draft_logits(
    model: DeepSeekV3,
    cache: LatentCache,
    slots: list[int],
    hidden: torch.Tensor,
    next_ids: torch.Tensor,
    n_new: list[int],
    depth: int = 0,
) -> torch.Tensor | None:
    """`model.mtp_logits(hidden, next_ids, cache=batch, depth=depth, logits_at=[n - 1 for n in n_new])[0]` and
    `batch.commit()` for `batch = cache.bind(slots, n_new)` (hidden (B, T, D), next_ids (B, T) right-padded) as one
    `native.mtp_draft` call, or None where the module path must run (as `decode_logits`: hooks, training, grad,
    weights or a cache the kernels do not take, more than a decode-sized pass)."""
    B, T, _ = hidden.shape
    kv = cache.kv
    mtp_layers = model.mtp
    if (
        not 0 < B * T <= NATIVE_MAX_ROWS
        or hidden.dtype != kv.dtype
        or hidden.device.type != "cpu"
        or not _cache_fits(cache, hidden.dtype)
        or not 0 <= depth < len(mtp_layers)
        or not 0 <= mtp_layers[depth].self_attn.layer_idx - cache.first_layer < len(kv)
    ):
        return None
    plans = _MTPS.setdefault(model, {})
    made = plans.get(depth)
    if made is None or not made.current(hidden.dtype):
        made = plans[depth] = _Mtp(model, depth, hidden.dtype)
    if made.weights is None or T not in made.queries:
        return None
    (store,) = _layer_stores(cache, [mtp_layers[depth].self_attn.layer_idx])
    rope_cos, rope_sin = model.rotary.table(cache.max_len + T)
    try:
        return native.mtp_draft(
            made.built.weights, made.weights, next_ids, n_new, hidden, mtp_layers[depth].embed_tokens.weight.shape[0],
            rope_cos, rope_sin, store, slots, cache.lengths, (cache.max_len, kv.stride(1), kv.stride(2)),
        )  # fmt: skip
    except OverflowError as e:
        raise RequestError(str(e)) from None


def speculative_greedy(
    model: DeepSeekV3,
    main_cache: LatentCache,
    mtp_cache: LatentCache,
    slots: list[int],
    last: list[int],
    pending: list[list[int]],
    pending_hidden: torch.Tensor,
    limit: int,
) -> tuple[list[list[int]], torch.Tensor] | None:
    """A greedy speculative step (`draft_logits`, then `decode_logits` over [last, draft] with hidden states, then
    the argmax rule) as one `native.speculative_step` call: each row's new tokens and the verified positions' hidden
    states (B, 2, D). None where the module path or the two-call path must run (as `draft_logits` and
    `decode_logits`: plans not made or not current, hooks, grad, caches the kernels do not take, big batches).

    Why: on a small model, the draft's and the verification's Python (plan checks, argmaxes, state) cost as much as
    their C, which a greedy step needs none of between the two passes.
    """
    B = len(slots)
    stack = _STACKS.get(model.model.layers)
    mtp_plans = _MTPS.get(model)
    made = mtp_plans.get(0) if mtp_plans else None
    kv, mkv = main_cache.kv, mtp_cache.kv
    if (
        stack is None
        or made is None
        or not 0 < 2 * B <= NATIVE_MAX_ROWS
        or pending_hidden.shape != (B, 2, model.config.hidden_size)
        or pending_hidden.dtype != stack.dtype
        or pending_hidden.device.type != "cpu"
        or not _cache_fits(main_cache, stack.dtype)
        or not _cache_fits(mtp_cache, stack.dtype)
        or (main_cache.max_len, kv.shape[1], kv.stride()[1:]) != (mtp_cache.max_len, mkv.shape[1], mkv.stride()[1:])
        or not 0 <= stack.layer_indices[0] - main_cache.first_layer
        or not stack.layer_indices[-1] - main_cache.first_layer < len(kv)
        or not 0 <= model.mtp[0].self_attn.layer_idx - mtp_cache.first_layer < len(mkv)
    ):
        return None
    head = _HEADS.get(model)
    if head is None or not head.current():
        head = _HEADS[model] = _Head(model, stack.dtype)
    if (
        head.weights is None
        or not made.current(stack.dtype)
        or made.weights is None
        or 2 not in made.queries
        or not stack.current(stack.dtype, 2)
    ):
        return None
    stores = _layer_stores(main_cache, stack.layer_indices)
    mtp_layer = model.mtp[0]
    (mtp_store,) = _layer_stores(mtp_cache, [mtp_layer.self_attn.layer_idx])
    rope_cos, rope_sin = model.rotary.table(main_cache.max_len + 2)
    try:
        return native.speculative_step(
            stack.stack, head.weights, model.model.embed_tokens.weight, stores, made.built.weights, made.weights,
            mtp_layer.embed_tokens.weight.shape[0], mtp_store, limit, slots, last, pending, pending_hidden, rope_cos,
            rope_sin, main_cache.lengths, mtp_cache.lengths, (main_cache.max_len, kv.stride(1), kv.stride(2)),
        )  # fmt: skip
    except OverflowError as e:
        raise RequestError(str(e)) from None
