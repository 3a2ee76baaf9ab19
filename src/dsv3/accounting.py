"""Exact accounting of a ModelConfig: parameter table, activated parameters, bytes, KV cache, FLOPs, plans.

Pure functions of the config (no torch): the 671B model is accounted in milliseconds. Everything is
derived from one list of tensor specs in the official checkpoint layout (`_specs`), so the table,
the totals, the byte counts and the per-device plan cannot disagree.

Names are checkpoint names without the leading `model.` of the main stack, as in the seed's table
(`layers.3.mlp.experts.17.gate_proj.weight`), plus `lm_head.weight`; the MTP module is
`layers.{num_hidden_layers + k}.*` as on disk.

Conventions, decided here once:
- Activated parameters per token exclude the embedding table (a lookup, not a matmul) and include
  lm_head, every attention and dense-MLP weight, norms, the router, the shared experts and
  `num_experts_per_tok` routed experts of each MoE layer. This is DeepSeek's own convention: it
  gives 36.6B for V3 ("37B activated"; README_WEIGHTS.md: "36.6B (including 0.9B for the output
  Head)") and 2.4B for V2-Lite. The MTP module is not counted.
- Checkpoint dtypes follow the official FP8 release: every attention / MLP / expert `*_proj.weight`
  (and the MTP `eh_proj`) is FP8 with a float32 `weight_scale_inv` of [ceil(out/b0), ceil(in/b1)];
  embeddings, lm_head and norms are bf16; the router `gate.weight` is bf16 (the official code builds
  it under a bf16 default dtype and computes with it cast to float32); `e_score_correction_bias`
  is float32. A "bf16" checkpoint is the same with the FP8 weights in bf16 and no scales.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .config import ModelConfig
from .errors import ConfigError

BF16_BYTES = 2
FP32_BYTES = 4
DEFAULT_FP8_BLOCK = (128, 128)
WEIGHT_DTYPES = ("bf16", "fp8", "int4")
PREFILL_CHUNK_TOKENS = 4096  # plan: activations are sized for one prefill chunk of this many tokens
SUMMARY_FLOPS_CONTEXT = 4096  # format_summary / summary_dict quote forward FLOPs at this context
GIB = 1 << 30

# `_Spec.split`: how tensor parallelism (over `tp` ranks) and expert parallelism (over `ep` ranks) shard a tensor:
#   replicated  every rank holds all of it (latent projections, norms, router, eh_proj)
#   head_rows   output rows split by attention heads (q_b_proj / q_proj, kv_b_proj)
#   head_cols   input columns split by attention heads (o_proj)
#   rows, cols  column- / row-parallel linear (dense MLP and shared experts: gate/up, down)
#   vocab       vocab-parallel rows (embed_tokens, lm_head, shared_head.head)
#   expert      routed expert weights: whole experts are dealt out over the ep ranks


class _Spec(NamedTuple):
    """One checkpoint tensor; routed experts are one template standing for `experts` tensors."""

    name: str  # for a template, `{e}` stands for the expert index
    shape: tuple[int, ...]
    split: str
    fp8: bool  # an FP8 checkpoint stores it as float8 + weight_scale_inv
    kind: str = "weight"  # "weight" | "norm" | "router" | "bias" | "embed": dtype and activation rules
    experts: int = 0  # > 0: a template for this many routed experts


# --------------------------------------------------------------------------- the checkpoint layout
def _attention_specs(cfg: ModelConfig, p: str) -> list[_Spec]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    specs = []
    if cfg.q_lora_rank is None:
        specs.append(_Spec(f"{p}self_attn.q_proj.weight", (H * cfg.qk_head_dim, D), "head_rows", True))
    else:
        r = cfg.q_lora_rank
        specs += [
            _Spec(f"{p}self_attn.q_a_proj.weight", (r, D), "replicated", True),
            _Spec(f"{p}self_attn.q_a_layernorm.weight", (r,), "replicated", False, "norm"),
            _Spec(f"{p}self_attn.q_b_proj.weight", (H * cfg.qk_head_dim, r), "head_rows", True),
        ]
    kv = cfg.kv_lora_rank
    specs += [
        # The latent and the ONE shared rope key: small, so every TP rank computes it whole.
        _Spec(f"{p}self_attn.kv_a_proj_with_mqa.weight", (kv + cfg.qk_rope_head_dim, D), "replicated", True),
        _Spec(f"{p}self_attn.kv_a_layernorm.weight", (kv,), "replicated", False, "norm"),
        _Spec(f"{p}self_attn.kv_b_proj.weight", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), kv), "head_rows", True),
        _Spec(f"{p}self_attn.o_proj.weight", (D, H * cfg.v_head_dim), "head_cols", True),
    ]
    return specs


def _swiglu_specs(prefix: str, dim: int, hidden: int) -> list[_Spec]:
    return [
        _Spec(f"{prefix}gate_proj.weight", (hidden, dim), "rows", True),
        _Spec(f"{prefix}up_proj.weight", (hidden, dim), "rows", True),
        _Spec(f"{prefix}down_proj.weight", (dim, hidden), "cols", True),
    ]


def _moe_specs(cfg: ModelConfig, p: str) -> list[_Spec]:
    D, E, F = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    specs = [
        _Spec(f"{p}mlp.experts.{{e}}.gate_proj.weight", (F, D), "expert", True, experts=E),
        _Spec(f"{p}mlp.experts.{{e}}.up_proj.weight", (F, D), "expert", True, experts=E),
        _Spec(f"{p}mlp.experts.{{e}}.down_proj.weight", (D, F), "expert", True, experts=E),
        _Spec(f"{p}mlp.gate.weight", (E, D), "replicated", False, "router"),
    ]
    if cfg.uses_correction_bias:  # V3's aux-loss-free routing; DeepSeek-V2 has no bias
        specs.append(_Spec(f"{p}mlp.gate.e_score_correction_bias", (E,), "replicated", False, "bias"))
    if cfg.n_shared_experts:
        specs += _swiglu_specs(f"{p}mlp.shared_experts.", D, F * cfg.n_shared_experts)
    return specs


def _layer_specs(cfg: ModelConfig, i: int, moe: bool) -> list[_Spec]:
    p, D = f"layers.{i}.", cfg.hidden_size
    mlp = _moe_specs(cfg, p) if moe else _swiglu_specs(f"{p}mlp.", D, cfg.intermediate_size)
    return [
        *_attention_specs(cfg, p),
        *mlp,
        _Spec(f"{p}input_layernorm.weight", (D,), "replicated", False, "norm"),
        _Spec(f"{p}post_attention_layernorm.weight", (D,), "replicated", False, "norm"),
    ]


def _main_specs(cfg: ModelConfig) -> list[_Spec]:
    V, D = cfg.vocab_size, cfg.hidden_size
    specs = [_Spec("embed_tokens.weight", (V, D), "vocab", False, "embed")]
    for i in range(cfg.num_hidden_layers):
        specs += _layer_specs(cfg, i, cfg.is_moe_layer(i))
    specs.append(_Spec("norm.weight", (D,), "replicated", False, "norm"))
    if not cfg.tie_word_embeddings:
        specs.append(_Spec("lm_head.weight", (V, D), "vocab", False))
    return specs


def _mtp_layer_specs(cfg: ModelConfig, k: int) -> list[_Spec]:
    """MTP module k, `layers.{L+k}.*`, with its own stored copy of embed_tokens and the head."""
    V, D = cfg.vocab_size, cfg.hidden_size
    i = cfg.num_hidden_layers + k
    p = f"layers.{i}."
    return [
        _Spec(f"{p}embed_tokens.weight", (V, D), "vocab", False, "embed"),
        _Spec(f"{p}enorm.weight", (D,), "replicated", False, "norm"),
        _Spec(f"{p}hnorm.weight", (D,), "replicated", False, "norm"),
        _Spec(f"{p}eh_proj.weight", (D, 2 * D), "replicated", True),
        *_layer_specs(cfg, i, moe=True),  # MoE whatever its index
        _Spec(f"{p}shared_head.norm.weight", (D,), "replicated", False, "norm"),
        _Spec(f"{p}shared_head.head.weight", (V, D), "vocab", False),
    ]


def _mtp_specs(cfg: ModelConfig) -> list[_Spec]:
    return [s for k in range(cfg.num_nextn_predict_layers) for s in _mtp_layer_specs(cfg, k)]


def _specs(cfg: ModelConfig, mtp: bool = False) -> list[_Spec]:
    return _main_specs(cfg) + (_mtp_specs(cfg) if mtp else [])


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _copies(s: _Spec) -> int:
    return s.experts or 1


# --------------------------------------------------------------------------- parameters
def parameter_table(cfg: ModelConfig, mtp: bool = False) -> list[tuple[str, int]]:
    """Every tensor of the official checkpoint as (name, numel), in the seed's order; MTP layers last."""
    rows: list[tuple[str, int]] = []
    run: list[_Spec] = []  # consecutive expert templates, expanded expert-major (expert 0's gate/up/down, ...)

    def flush() -> None:
        if run:
            sizes = [(s.name, _numel(s.shape)) for s in run]
            for e in range(run[0].experts):
                rows.extend((name.replace("{e}", str(e)), n) for name, n in sizes)
            run.clear()

    for s in _specs(cfg, mtp):
        if s.experts:
            run.append(s)
        else:
            flush()
            rows.append((s.name, _numel(s.shape)))
    flush()
    return rows


def total_parameters(cfg: ModelConfig, mtp: bool = False) -> int:
    """Parameters stored in the checkpoint: 671,026,419,200 for V3; with `mtp`, the MTP layers' too."""
    return sum(_numel(s.shape) * _copies(s) for s in _specs(cfg, mtp))


def mtp_parameters(cfg: ModelConfig) -> dict[str, int]:
    """MTP parameters: `stored` in the checkpoint, and `unique` (less its copies of embed_tokens and the head)."""
    stored = sum(_numel(s.shape) * _copies(s) for s in _mtp_specs(cfg))
    duplicated = 2 * cfg.vocab_size * cfg.hidden_size * cfg.num_nextn_predict_layers
    return {"stored": stored, "unique": stored - duplicated}


def activated_parameters(cfg: ModelConfig) -> int:
    """Parameters used per token by the main model: all but the embedding table and the unchosen routed experts.

    Included: attention, dense MLPs, norms, router weight and bias, shared experts,
    `num_experts_per_tok` routed experts per MoE layer, lm_head. Excluded: the embedding table (a row
    lookup) and the MTP module. DeepSeek's convention: 36,625,618,432 (the "37B") for V3.
    """
    total = 0
    for s in _main_specs(cfg):
        if s.kind == "embed":
            continue
        total += _numel(s.shape) * (min(cfg.num_experts_per_tok, s.experts) if s.experts else 1)
    return total


# --------------------------------------------------------------------------- bytes and FLOPs
def _block(cfg: ModelConfig) -> tuple[int, int]:
    return cfg.fp8_block_size or DEFAULT_FP8_BLOCK


def _int4_group(cfg: ModelConfig) -> int:
    return cfg.int4_group_size or 0  # 0: not an INT4 config, and "int4" is refused (_check_dtype)


def _tensor_bytes(s: _Spec, shape: tuple[int, ...], dtype: str, block: tuple[int, int], group: int = 0) -> int:
    """Bytes of one tensor of `shape` (the spec's own, or a shard of it) stored as `dtype`.

    "int4" is Kimi-K2-Thinking's layout (compressed-tensors, pack-quantized): routed experts only, two
    weights per byte plus one bf16 scale per `group` weights of a row; every other tensor in bf16. Its
    small `weight_shape` tensors (two integers per expert projection) are not counted.
    """
    n = _numel(shape)
    if s.kind == "bias":
        return n * FP32_BYTES
    if dtype == "int4" and s.experts:
        out, inp = shape
        return n // 2 + out * -(-inp // group) * BF16_BYTES
    if dtype == "fp8" and s.fp8:
        out, inp = shape
        scales = -(-out // block[0]) * -(-inp // block[1])  # edge blocks are partial, and still get a scale
        return n + scales * FP32_BYTES
    return n * BF16_BYTES


def _check_dtype(dtype: str, cfg: ModelConfig) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight dtype {dtype!r} is not supported (supported: {', '.join(WEIGHT_DTYPES)})")
    # INT4 is a layout one checkpoint ships (which tensors, which group size), not a generic dtype.
    if dtype == "int4" and cfg.int4_group_size is None:
        raise ConfigError(
            "weight dtype 'int4' needs an INT4 config (quantization_config.quant_method 'compressed-tensors', "
            "as Kimi-K2-Thinking's)"
        )


def weight_bytes(cfg: ModelConfig, dtype: str = "bf16", mtp: bool = False) -> int:
    """Bytes of the checkpoint's tensors in `dtype` ("bf16", "fp8" with block scales, "int4": `_tensor_bytes`)."""
    _check_dtype(dtype, cfg)
    block, group = _block(cfg), _int4_group(cfg)
    return sum(_tensor_bytes(s, s.shape, dtype, block, group) * _copies(s) for s in _specs(cfg, mtp))


def int4_bytes_per_expert_weight(cfg: ModelConfig) -> float:
    """Bytes per routed-expert weight in the INT4 layout: 1/2 plus a bf16 scale per group (0.5625 for group 32)."""
    _check_dtype("int4", cfg)
    return 0.5 + BF16_BYTES / _int4_group(cfg)


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = BF16_BYTES) -> int:
    """Latent KV cache bytes per token over all layers: (kv_lora_rank + qk_rope_head_dim) * layers * dtype_bytes."""
    return cfg.kv_cache_dim * cfg.num_hidden_layers * dtype_bytes


def flops_per_token(cfg: ModelConfig, context_len: int) -> int:
    """Forward FLOPs of the main model for one token attending to `context_len` keys (a multiply-add is 2).

    2 * every activated matrix parameter (the norms, the bias and the embedding lookup do no matmul)
    plus, per layer, the attention itself in its plain multi-head form: 2 * heads * qk_head_dim *
    context for the scores and 2 * heads * v_head_dim * context for the weighted values. Softmax,
    norms and activations are left out. The weight-absorbed decode does the same work in a
    different order and is not counted separately.
    """
    matmul = 0
    for s in _main_specs(cfg):
        if s.kind == "embed" or len(s.shape) != 2:
            continue
        matmul += _numel(s.shape) * (min(cfg.num_experts_per_tok, s.experts) if s.experts else 1)
    H = cfg.num_attention_heads
    attention = 2 * H * (cfg.qk_head_dim + cfg.v_head_dim) * context_len * cfg.num_hidden_layers
    return 2 * matmul + attention


# --------------------------------------------------------------------------- the seed's table
def _center(text: str, width: int) -> str:
    """Center as the seed's table (prettytable) does: odd slack goes right for odd-length text, else left."""
    slack = width - len(text)
    left = slack // 2 + (1 if slack % 2 and len(text) % 2 == 0 else 0)
    return " " * left + text + " " * (slack - left)


def _fold_row(text: str, aligned_with: str, width: int) -> str:
    """A fold row, left-aligned where the centered `aligned_with` row starts (how the seed's are laid out)."""
    centered = _center(aligned_with, width)
    left = len(centered) - len(centered.lstrip(" "))
    left = max(1, min(left, width - len(text) - 1))
    return " " * left + text + " " * (width - left - len(text))


def _fold_text(what: str, first: int, last: int) -> str:
    span = f"{what}{first}" if first == last else f"{what}{first} to {what}{last}"
    return f"... {span} ..."


def _row(s: _Spec) -> tuple[str, str, str | None]:
    return s.name, str(_numel(s.shape)), None


def _layer_rows(specs: list[_Spec]) -> list[tuple[str, str, str | None]]:
    """A layer's rows in the seed's order; routed experts 0 and 1 in full, then one fold row for the rest."""
    templates = [s for s in specs if s.experts]
    rows = []
    for s in specs:
        if not s.experts:
            rows.append(_row(s))
        elif s is templates[0]:
            E = s.experts
            for e in range(min(E, 2)):
                rows += [(t.name.replace("{e}", str(e)), str(_numel(t.shape)), None) for t in templates]
            if E > 2:
                # The seed aligns this row with where `...experts.2.up_proj.weight` would be centered.
                rows.append((_fold_text("mlp.experts.", 2, E - 1), "...", s.name.replace("{e}.gate", "2.up")))
    return rows


def _table_rows(cfg: ModelConfig, mtp: bool) -> list[tuple[str, str, str | None]]:
    """(name or fold text, count or '...', for a fold row: the name it aligns with) for the printed table.

    Shown in full: the embedding, every layer up to and including the first MoE layer (layer 0 if
    there is none), the final norm and each MTP layer; the remaining main layers fold into one row.
    lm_head is left out, as in the seed's table (the total counts it).
    """
    V, D, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    moe_layers = cfg.moe_layer_indices
    last_shown = moe_layers[0] if moe_layers else 0
    rows = [("embed_tokens.weight", str(V * D), None)]
    for i in range(last_shown + 1):
        rows += _layer_rows(_layer_specs(cfg, i, cfg.is_moe_layer(i)))
    if last_shown + 1 < L:
        first = last_shown + 1
        # The seed aligns this row with where `layers.{first}.input_layernorm.weight` would be centered.
        rows.append((_fold_text("layers.", first, L - 1), "...", f"layers.{first}.input_layernorm.weight"))
    rows.append(("norm.weight", str(D), None))
    if mtp:
        for k in range(cfg.num_nextn_predict_layers):
            rows += _layer_rows(_mtp_layer_specs(cfg, k))
    return rows


def format_param_table(cfg: ModelConfig, mtp: bool = False) -> str:
    """`Total Parameters: N` and the seed's table (byte-identical for `deepseek-v3`), experts and layers folded."""
    all_rows = parameter_table(cfg, mtp)
    rows = _table_rows(cfg, mtp)
    # Widths come from every tensor name, shown or folded, as in the seed (layers.60.mlp.shared_experts...).
    name_w = 2 + max([len("Modules")] + [len(n) for n, _ in all_rows] + [len(n) for n, _, _ in rows])
    num_w = 2 + max([len("Parameters")] + [len(str(n)) for _, n in all_rows])
    border = f"+{'-' * name_w}+{'-' * num_w}+"
    lines = [
        f"Total Parameters: {total_parameters(cfg, mtp):,}",
        "",
        border,
        f"|{_center('Modules', name_w)}|{_center('Parameters', num_w)}|",
        border,
    ]
    for name, count, aligned_with in rows:
        cell = _fold_row(name, aligned_with, name_w) if aligned_with else _center(name, name_w)
        lines.append(f"|{cell}|{_center(count, num_w)}|")
    lines.append(border)
    if not cfg.tie_word_embeddings:
        n = cfg.vocab_size * cfg.hidden_size
        lines.append(f"(the total includes lm_head.weight, {n:,}, which the table leaves out as the seed's does)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- summary
def _human(n: float) -> str:
    """Bytes in GiB, or MiB / KiB when smaller."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 1024:,.2f} KiB"


def summary_dict(cfg: ModelConfig, mtp: bool = False) -> dict[str, int]:
    """The figures of `dsv3 params --json`: parameters, activated, weight bytes, KV bytes/token, FLOPs/token."""
    d = {
        "total_parameters": total_parameters(cfg),
        "activated_parameters": activated_parameters(cfg),
        "weight_bytes_bf16": weight_bytes(cfg, "bf16", mtp),
        "weight_bytes_fp8": weight_bytes(cfg, "fp8", mtp),
        **(
            {"weight_bytes_int4": weight_bytes(cfg, "int4", mtp), "int4_group_size": _int4_group(cfg)}
            if cfg.int4_group_size
            else {}
        ),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "flops_per_token_context": SUMMARY_FLOPS_CONTEXT,
        "flops_per_token": flops_per_token(cfg, SUMMARY_FLOPS_CONTEXT),
    }
    if mtp:
        m = mtp_parameters(cfg)
        d.update(
            mtp_parameters_stored=m["stored"],
            mtp_parameters_unique=m["unique"],
            total_parameters_with_mtp=total_parameters(cfg, mtp=True),
        )
    return d


def format_summary(cfg: ModelConfig, mtp: bool = False) -> str:
    """Human-readable `summary_dict`: counts with thousands commas, bytes also in GiB (MiB, KiB when small)."""
    d = summary_dict(cfg, mtp)
    incl = " (incl. MTP)" if mtp else ""
    rows = [
        ("Total parameters", f"{d['total_parameters']:,}"),
        ("Activated per token", f"{d['activated_parameters']:,} (excl. the embedding table, incl. lm_head)"),
    ]
    if mtp:
        rows += [
            ("MTP parameters", f"{d['mtp_parameters_stored']:,} stored, {d['mtp_parameters_unique']:,} unique"),
            ("Total with MTP", f"{d['total_parameters_with_mtp']:,} stored"),
        ]
    rows += [
        (f"Weight bytes, bf16{incl}", f"{d['weight_bytes_bf16']:,} ({_human(d['weight_bytes_bf16'])})"),
        (f"Weight bytes, fp8{incl}", f"{d['weight_bytes_fp8']:,} ({_human(d['weight_bytes_fp8'])})"),
    ]
    if "weight_bytes_int4" in d:
        per_weight = int4_bytes_per_expert_weight(cfg)
        rows.append(
            (
                f"Weight bytes, int4{incl}",
                f"{d['weight_bytes_int4']:,} ({_human(d['weight_bytes_int4'])}; routed experts at {per_weight:g} "
                f"bytes/weight, group {d['int4_group_size']}, the rest bf16)",
            )
        )
    rows += [
        (
            "KV cache per token",
            f"{d['kv_cache_bytes_per_token']:,} bytes "
            f"(bf16 latent, {cfg.kv_cache_dim} values x {cfg.num_hidden_layers} layers)",
        ),
        ("Forward FLOPs per token", f"{d['flops_per_token']:,} (at context {SUMMARY_FLOPS_CONTEXT:,})"),
    ]
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{label + ':':<{width}} {value}" for label, value in rows)


# --------------------------------------------------------------------------- deployment plan
def check_parallel_split(cfg: ModelConfig, tp: int = 1, ep: int = 1) -> None:
    """Raise ConfigError naming the first size that `tp` or `ep` does not divide: the splits
    `dsv3.distributed.apply_tp` / `apply_ep` make (no padding), so a plan never promises one they refuse."""
    sizes = [("num_attention_heads", cfg.num_attention_heads), ("vocab_size", cfg.vocab_size)]
    moe = cfg.num_moe_layers > 0 or cfg.num_nextn_predict_layers > 0
    if cfg.num_moe_layers < cfg.num_hidden_layers:
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if cfg.n_shared_experts and moe:
        sizes.append(("moe_intermediate_size * n_shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts))
    for name, n in sizes:
        if n % tp:
            raise ConfigError(f"{name} ({n}) is not divisible by tp ({tp}); use a tp that divides it")
    if moe and cfg.n_routed_experts % ep:
        raise ConfigError(
            f"n_routed_experts ({cfg.n_routed_experts}) is not divisible by ep ({ep}); use an ep that divides it"
        )


def _local_shape(s: _Spec, cfg: ModelConfig, tp: int) -> tuple[int, ...]:
    """The shard of `s` on a TP rank (splits are even: `check_parallel_split`)."""
    H = cfg.num_attention_heads
    heads = -(-H // tp)
    if s.split == "head_rows":
        return (heads * (s.shape[0] // H), s.shape[1])
    if s.split == "head_cols":
        return (s.shape[0], heads * (s.shape[1] // H))
    if s.split in ("rows", "vocab"):
        return (-(-s.shape[0] // tp), *s.shape[1:])
    if s.split == "cols":
        return (s.shape[0], -(-s.shape[1] // tp))
    return s.shape  # replicated; routed experts are whole on their ep rank


def _weights_per_device(cfg: ModelConfig, tp: int, ep: int, dtype: str, mtp: bool) -> int:
    block, group = _block(cfg), _int4_group(cfg)
    total = 0
    for s in _specs(cfg, mtp):
        copies = -(-s.experts // ep) if s.experts else 1  # EP rank 0 holds ceil(E/ep) experts of each layer
        total += copies * _tensor_bytes(s, _local_shape(s, cfg, tp), dtype, block, group)
    return total


def _activation_bytes(cfg: ModelConfig, tp: int, ep: int, context: int, mtp: bool) -> int:
    """Peak per-layer working set of one prefill chunk on one device (bf16 activations, fp32 router scores).

    T = min(context, PREFILL_CHUNK_TOKENS) tokens of one sequence, h = ceil(heads/tp) local heads:
      residual stream and its normed copy      2 * T * hidden
      attention (the larger of the two halves of the layer):
        q latent, q, latent KV of the chunk    T * (q_lora_rank + h * qk_head_dim + kv_lora_rank + rope_dim)
        keys and values of the whole context   context * h * (qk_head_dim + v_head_dim), expanded from the
                                               latent for a plain (non-absorbed) prefill; a fused attention
                                               kernel is assumed, so no T x context score matrix
        attention output                       T * h * v_head_dim
      dense MLP / shared experts               3 * T * ceil(intermediate/tp)  (gate, up, their product)
      routed experts, balanced load            T * k * ceil(E/ep) / E token copies * (2 * hidden + 3 * moe_inter)
      router scores (fp32)                     T * E
    """
    D, T = cfg.hidden_size, min(context, PREFILL_CHUNK_TOKENS)
    h = -(-cfg.num_attention_heads // tp)
    attention = (
        T * ((cfg.q_lora_rank or 0) + h * cfg.qk_head_dim + cfg.kv_cache_dim + h * cfg.v_head_dim)
        + context * h * (cfg.qk_head_dim + cfg.v_head_dim)
    ) * BF16_BYTES
    mlp = 0
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        mlp = 3 * T * -(-cfg.intermediate_size // tp) * BF16_BYTES
    if cfg.num_moe_layers or (mtp and cfg.num_nextn_predict_layers):
        E = cfg.n_routed_experts
        local = -(-E // ep)
        copies = -(-T * cfg.num_experts_per_tok * local // E)
        shared = 3 * T * -(-cfg.moe_intermediate_size * cfg.n_shared_experts // tp)
        routed = copies * (2 * D + 3 * cfg.moe_intermediate_size)
        mlp = max(mlp, (shared + routed) * BF16_BYTES + T * E * FP32_BYTES)
    return 2 * T * D * BF16_BYTES + max(attention, mlp)


def plan_deployment(
    cfg: ModelConfig,
    devices: int,
    device_memory_gb: float,
    context: int,
    batch: int,
    dtype: str = "bf16",
    tp: int | None = None,
    ep: int | None = None,
    mtp: bool = False,
) -> dict:
    """Memory per device for serving `batch` sequences of `context` tokens on `devices` devices under TP/EP.

    `device_memory_gb` is in GiB (2**30 bytes). Layout (the official one when tp = ep = devices):
    - tensor parallel over `tp` ranks (default: devices) splits the attention heads (q_b_proj/q_proj
      and kv_b_proj by output rows, o_proj by input columns), the dense MLPs and shared experts
      (gate/up by rows, down by columns) and the vocab of embed_tokens and lm_head; the latent
      projections (q_a_proj, kv_a_proj_with_mqa), norms, router and MTP eh_proj are replicated;
    - expert parallel over `ep` ranks (default: devices) deals out each layer's routed experts;
    - devices / tp attention replicas (data parallel) share the batch: each serves ceil(batch/dp)
      sequences, and its latent KV cache (bf16, whatever the weight dtype) is replicated on each of
      its tp ranks.
    A tp or ep that does not divide the sizes it splits is refused, as apply_tp / apply_ep refuse it
    (`check_parallel_split`); every rank then holds the same shapes. FP8 scales are counted on the
    shard's own shape. Activations are the
    peak of one prefill chunk (`_activation_bytes`) plus fp32 logits for the local batch, ceil(V/tp)
    wide. With `mtp` the MTP layers' weights and KV cache are included (for speculative decoding).
    """
    _check_dtype(dtype, cfg)
    tp = devices if tp is None else tp
    ep = devices if ep is None else ep
    for name, value in (("devices", devices), ("context", context), ("batch", batch), ("tp", tp), ("ep", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("tp", tp), ("ep", ep)):
        if devices % value:
            raise ConfigError(f"{name} ({value}) must divide the number of devices ({devices})")
    if not device_memory_gb > 0 or not math.isfinite(device_memory_gb):
        raise ConfigError(f"device memory must be a positive number of GiB, got {device_memory_gb!r}")
    if context > cfg.max_position_embeddings:
        raise ConfigError(f"context {context} exceeds max_position_embeddings ({cfg.max_position_embeddings})")
    check_parallel_split(cfg, tp, ep)

    dp = devices // tp
    local_batch = -(-batch // dp)
    kv_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    kv_per_seq = context * cfg.kv_cache_dim * kv_layers * BF16_BYTES
    logits_per_seq = -(-cfg.vocab_size // tp) * FP32_BYTES
    memory = int(device_memory_gb * GIB)

    weights = _weights_per_device(cfg, tp, ep, dtype, mtp)
    fixed_activations = _activation_bytes(cfg, tp, ep, context, mtp)
    kv_cache = local_batch * kv_per_seq
    activations = fixed_activations + local_batch * logits_per_seq
    total = weights + kv_cache + activations
    free = memory - total
    # The largest batch that fits: what is left after weights and the chunk, per sequence of every replica.
    room = memory - weights - fixed_activations
    max_batch = max(0, room // (kv_per_seq + logits_per_seq)) * dp
    plan = {
        "devices": devices,
        "tp": tp,
        "ep": ep,
        "dp": dp,
        "dtype": dtype,
        "mtp": mtp,
        "context": context,
        "batch": batch,
        "batch_per_replica": local_batch,
        "heads_per_device": -(-cfg.num_attention_heads // tp),
        "experts_per_device": -(-cfg.n_routed_experts // ep),
        "device_memory_bytes": memory,
        "weights_bytes": weights,
        "kv_cache_bytes": kv_cache,
        "activation_bytes": activations,
        "total_bytes": total,
        "free_bytes": free,
        "fits": free >= 0,
        "max_batch": max_batch,
    }
    plan["verdict"] = _verdict(plan, cfg)
    return plan


def _verdict(plan: dict, cfg: ModelConfig) -> str:
    def gib(n: int) -> str:
        return f"{n / GIB:,.1f} GiB"

    mem, ctx = plan["device_memory_bytes"], plan["context"]
    if plan["fits"]:
        return (
            f"fits: {gib(plan['total_bytes'])} of {gib(mem)} per device, {gib(plan['free_bytes'])} free "
            f"(up to batch {plan['max_batch']:,} at context {ctx:,})"
        )
    if plan["weights_bytes"] > mem:
        hint = ""
        if plan["dtype"] == "bf16":
            fp8 = _weights_per_device(cfg, plan["tp"], plan["ep"], "fp8", plan["mtp"])
            hint = f"; in fp8 they would take {gib(fp8)}" if fp8 < mem else ""
        return (
            f"does not fit: the weights alone need {gib(plan['weights_bytes'])} per device, {gib(mem)} available{hint}"
        )
    if plan["max_batch"]:
        return (
            f"does not fit: needs {gib(plan['total_bytes'])} per device, {gib(mem)} available; "
            f"the largest batch that fits at context {ctx:,} is {plan['max_batch']:,}"
        )
    return (
        f"does not fit: needs {gib(plan['total_bytes'])} per device, {gib(mem)} available; "
        f"not even one sequence of {ctx:,} tokens fits beside the weights"
    )


def format_plan(plan: dict) -> str:
    """`plan_deployment`'s result as a few aligned lines in GiB, ending with the verdict."""

    def gib(n: int) -> str:
        return f"{n / GIB:>10,.2f} GiB"

    devices = f"{plan['devices']} device{'s' if plan['devices'] > 1 else ''}"
    layout = (
        f"{devices}, tp={plan['tp']} ep={plan['ep']} (attention replicas: {plan['dp']}), "
        f"{plan['dtype']} weights{' + MTP' if plan['mtp'] else ''}"
    )
    return "\n".join(
        [
            f"Layout:       {layout}",
            f"Per device:   {plan['heads_per_device']} attention heads, {plan['experts_per_device']} routed experts "
            f"per MoE layer, {plan['batch_per_replica']} of {plan['batch']} sequences x {plan['context']:,} tokens",
            f"Weights:      {gib(plan['weights_bytes'])}",
            f"KV cache:     {gib(plan['kv_cache_bytes'])}",
            f"Activations:  {gib(plan['activation_bytes'])}",
            f"Total:        {gib(plan['total_bytes'])}",
            f"Memory:       {gib(plan['device_memory_bytes'])}",
            f"Free:         {gib(plan['free_bytes'])}",
            f"Verdict:      {plan['verdict']}",
        ]
    )
