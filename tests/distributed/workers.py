"""What each rank runs in the distributed tests (called by spawn.run; results go back as JSON).

Every rank builds the same random model (fixed seed), so each can compare its parallel copy with
the single-process one by itself. The weights are made to matter: random routing biases (they
change which experts are chosen) and norm weights that are not all ones.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import dsv3
from dsv3 import accounting
from dsv3.distributed import (
    CommStats,
    apply_ep,
    apply_tp,
    init_mesh,
    lead_or_follow,
    load_sharded,
    parallel_generate,
    parallel_stream,
)
from dsv3.distributed.launch import ParallelContext
from dsv3.inference.generate import decode_step, generate, prefill
from dsv3.model.cache import LatentCache

PROMPTS = [[0, 5, 17, 33, 101, 7, 250, 12, 9], [0, 44, 3], [0, 300, 301, 302, 2, 64]]
NEW_TOKENS = 6

# (name, tp, ep, combine, tokens); T and E are each 1 or N.
LAYOUTS = [
    ("tp", True, False, None, "replicated"),
    ("ep_all_to_all", False, True, "all_to_all", "replicated"),
    ("ep_all_reduce", False, True, "all_reduce", "replicated"),
    ("tp_ep", True, True, None, "replicated"),  # the official layout: all-reduce combine
    ("tp_ep_all_to_all", True, True, "all_to_all", "replicated"),
]


def build(cfg_overrides: dict | None = None, dtype: torch.dtype = torch.float32) -> dsv3.DeepSeekV3:
    cfg = dsv3.ModelConfig.from_pretrained("tiny", **(cfg_overrides or {}))
    torch.manual_seed(0)
    model = dsv3.DeepSeekV3(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif "norm" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _logits_with_cache(model: dsv3.DeepSeekV3, ids: torch.Tensor) -> torch.Tensor:
    """Prefill all but the last token, then one decode step (the absorbed path): logits (B, V)."""
    cache = LatentCache(model.config, ids.shape[0], ids.shape[1] + 1, dtype=torch.float32)
    slots = [cache.allocate() for _ in range(ids.shape[0])]
    prefill(model, cache, slots, ids[:, :-1].tolist())
    return decode_step(model, cache, slots, ids[:, -1].tolist())


def _mtp_logits(model: dsv3.DeepSeekV3, ids: torch.Tensor) -> torch.Tensor:
    """The MTP module's logits (token t+2 from h_t and token t+1): its embedding and head are split too."""
    return model.mtp_logits(model.hidden_states(ids[:, :-1]), ids[:, 1:])[0]


def parity(rank: int, world: int) -> dict:
    """Every layout against one process: full-sequence logits, cached decode logits, greedy tokens, bytes."""
    ref = build()
    ids = torch.randint(0, ref.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref_logits = ref(ids)
        ref_decode = _logits_with_cache(ref, ids)
        ref_mtp = _mtp_logits(ref, ids)
    ref_tokens = generate(ref, PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    out = {"ref_tokens": ref_tokens, "ref_fused": len(fused_tensors(ref))}
    for name, tp, ep, combine, tokens in LAYOUTS:
        model = copy.deepcopy(ref)
        group = dist.group.WORLD
        stats = apply_tp(model, group if tp else None)
        apply_ep(model, group if ep else None, combine=combine, tokens=tokens, stats=stats)
        with torch.no_grad():
            logits = model(ids)
            dec = _logits_with_cache(model, ids)
            mtp = _mtp_logits(model, ids)
        mesh = init_mesh(world if tp else 1, world if ep else 1)
        ctx = ParallelContext(mesh, stats)
        tokens_out = parallel_generate(model, ctx, PROMPTS if rank == 0 else None, NEW_TOKENS, stop_token_ids=[])
        # Bytes this rank sends for one decode step of the 3 sequences.
        cache = LatentCache(model.config, 3, 16, dtype=torch.float32)
        slots = [cache.allocate() for _ in range(3)]
        prefill(model, cache, slots, [p[:4] for p in PROMPTS])
        stats.reset()
        decode_step(model, cache, slots, [1, 2, 3])
        out[name] = {
            "logits_err": rel_err(logits, ref_logits),
            "decode_err": rel_err(dec, ref_decode),
            "mtp_err": rel_err(mtp, ref_mtp),
            "tokens": tokens_out,
            "bytes_per_step": dict(stats.bytes),
            "local_experts": model.model.layers[1].mlp.experts.num_experts,
            "local_q_rows": model.model.layers[0].self_attn.q_b_proj.weight.shape[0],
            "stale_derived": stale_derived(model),
            "fused": len(fused_tensors(model)),
        }
        if name == "tp_ep":
            out["requests"] = _requests(model, ctx)
    out["ep_local_tokens"] = _ep_local_tokens(ref, rank, world)
    out["errors"] = errors(rank, world)
    return out


def fused_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return [v for m in model.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]


def stale_derived(model: torch.nn.Module) -> list[str]:
    """Tensors a module keeps beside its parameters (fused projections) that no longer back them."""
    stale = []
    for mname, module in model.named_modules():
        storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in storages:
                stale.append(f"{mname}.{name}")
    return stale


def _requests(model: dsv3.DeepSeekV3, ctx: ParallelContext) -> list:
    """A server's life on rank 0 while the others `follow`: requests, a rejected one, one abandoned early."""
    got: list = []

    def lead() -> int:
        got.append(parallel_generate(model, ctx, PROMPTS[:1], NEW_TOKENS, stop_token_ids=[]))
        try:
            parallel_generate(model, ctx, [[10**6]], 2)
        except dsv3.RequestError:
            got.append("rejected")
        steps = parallel_stream(model, ctx, PROMPTS[1:2], 5, stop_token_ids=[])
        next(steps)
        steps.close()  # the client went away after one token
        got.append(parallel_generate(model, ctx, PROMPTS[2:], NEW_TOKENS, stop_token_ids=[]))
        return 0

    lead_or_follow(model, ctx, lead)
    return got


def _ep_local_tokens(ref: dsv3.DeepSeekV3, rank: int, world: int) -> dict:
    """Data-parallel attention + EP all-to-all: each rank runs its OWN sequence, experts shared."""
    ids = torch.randint(0, ref.config.vocab_size, (world, 10), generator=torch.Generator().manual_seed(3))
    # Routing is lopsided on purpose for rank 0 (a long sequence) against short ones elsewhere.
    with torch.no_grad():
        ref_logits = ref(ids)
        model = copy.deepcopy(ref)
        stats = apply_ep(model, dist.group.WORLD, combine="all_to_all", tokens="local")
        mine = ids[rank : rank + 1, : 10 - 3 * (rank > 0)]
        logits = model(mine)
    return {
        "logits_err": rel_err(logits, ref_logits[rank : rank + 1, : mine.shape[1]]),
        "a2a_bytes": stats.bytes.get("ep.all_to_all", 0),
    }


def errors(rank: int, world: int) -> dict:
    """Sizes that do not divide: each apply_* raises a ConfigError naming the size."""
    out = {}
    cases = {
        "heads": ({"num_attention_heads": 3, "num_key_value_heads": 3}, apply_tp),
        "experts": ({"n_routed_experts": 6, "n_group": 2, "topk_group": 1}, apply_ep),
        "vocab": ({"vocab_size": 321}, apply_tp),
    }
    for name, (overrides, fn) in cases.items():
        model = build(overrides)
        try:
            fn(model, dist.group.WORLD)
            out[name] = "no error"
        except dsv3.ConfigError as e:
            out[name] = str(e)
    try:
        apply_ep(build(), dist.group.WORLD, combine="all_reduce", tokens="local")
        out["combine"] = "no error"
    except dsv3.ConfigError as e:
        out["combine"] = str(e)
    return out


def _tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the checkpoint tensors a model holds (parameters + routing biases), shared ones once."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *(b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def sharded_load(rank: int, world: int, ckpt: str, fp8_ckpt: str, aligned_ckpt: str | None, layouts: list) -> dict:
    """load_sharded under each (tp, ep) of `layouts`: logits as the in-memory model's, bytes as the plan's."""
    cfg = dsv3.ModelConfig.from_pretrained(ckpt)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    out = {}
    ref = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        ref_logits = ref(ids)
    for tp, ep in layouts:
        mesh = init_mesh(tp, ep)
        model, _ = load_sharded(ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.float32)
        with torch.no_grad():
            err = rel_err(model(ids), ref_logits)
        bf16, _ = load_sharded(ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.bfloat16)
        plan = accounting.plan_deployment(cfg, world, 80, 64, 1, dtype="bf16", tp=tp, ep=ep, mtp=True)
        out[f"tp{tp}_ep{ep}"] = {"err": err, "bytes": _tensor_bytes(bf16), "plan": plan["weights_bytes"]}
    # FP8 checkpoint, dequantized while loading: splits that fall inside 128-row scale blocks.
    ref8 = dsv3.DeepSeekV3.from_pretrained(fp8_ckpt, dtype=torch.float32)
    mesh = init_mesh(world, world)
    model8, _ = load_sharded(fp8_ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.float32)
    with torch.no_grad():
        out["fp8_dequant_err"] = rel_err(model8(ids), ref8(ids))
    try:
        load_sharded(fp8_ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.float32, fp8=True)
        out["fp8_misaligned"] = "no error"
    except dsv3.ConfigError as e:
        out["fp8_misaligned"] = str(e)
    if aligned_ckpt is None:
        return out
    # FP8 kept in FP8, on a config whose shards are whole 128-blocks.
    acfg = dsv3.ModelConfig.from_pretrained(aligned_ckpt)
    aids = torch.randint(0, acfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    aref = dsv3.DeepSeekV3.from_pretrained(aligned_ckpt, dtype=torch.float32, fp8=True)
    amodel, _ = load_sharded(aligned_ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.float32, fp8=True)
    with torch.no_grad():
        out["fp8_kept_err"] = rel_err(amodel(aids), aref(aids))
    out["fp8_kept_dtype"] = str(amodel.model.layers[1].mlp.experts.gate_proj.weight.dtype)
    abf16, _ = load_sharded(aligned_ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.bfloat16, fp8=True)
    plan = accounting.plan_deployment(acfg, world, 80, 64, 1, dtype="fp8", tp=world, ep=world, mtp=True)
    out["fp8_kept_bytes"] = {"bytes": _tensor_bytes(abf16), "plan": plan["weights_bytes"]}
    return out


def peak_memory(rank: int, world: int, ckpt: str, tp: int, ep: int) -> dict:
    """Peak RSS growth while loading this rank's part of `ckpt` (bf16) and touching it, and the bytes it holds."""
    before = warm_up(ckpt)
    mesh = init_mesh(tp, ep)
    model, _ = load_sharded(ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.bfloat16)
    return {"peak_growth": touch_all(model) - before, "tensor_bytes": _tensor_bytes(model)}


def warm_up(ckpt: str) -> int:
    """Build the model once on meta, so the one-time cost of loading torch's code for it (~75 MB of
    library pages, whatever the model size) is not counted as loading; then the RSS in bytes."""
    with torch.device("meta"):
        dsv3.DeepSeekV3(dsv3.ModelConfig.from_pretrained(ckpt))
    return proc_status("VmRSS")


def touch_all(model: torch.nn.Module) -> int:
    """Read every weight once (a tensor may still be a view of the mmap'ed file), then the peak RSS in bytes."""
    with torch.no_grad():
        for t in model.state_dict().values():
            t.sum()  # reduces in place: no float copy of a large table
    return proc_status("VmHWM")


def proc_status(field: str) -> int:
    """A memory figure of /proc/self/status in bytes. VmHWM, not getrusage's maxrss: a spawned child's
    maxrss starts at its parent's peak (the high-water mark survives fork + exec), VmHWM does not."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


__all__ = ["CommStats", "errors", "parity", "peak_memory", "sharded_load"]
