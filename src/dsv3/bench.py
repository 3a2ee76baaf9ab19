"""`dsv3 bench`: dsv3 and HuggingFace transformers side by side, in ONE process, on the same weights.

Rows (SPEC section 5; `ROW_HELP`, shown by `dsv3 bench --help`): prefill 1x512 (and 1x4096), time to
first token through `dsv3.generate` vs transformers' `generate` (what users call), decode batch 1
and batch 8 after a 128-token prompt, decode batch 1 after a 4096-token prompt, decode batch 1
with int8 weights, MTP speculative decode, and decode batch 1 as a
fraction of the memory-bandwidth bound = (measured bandwidth of a large bf16 matrix-vector product)
/ (bytes of weights touched per decoded token). Figures are ratios measured side by side; absolute
times drift on shared machines.

Under `torchrun --nproc-per-node N -m dsv3 bench --tp T --ep E` every rank builds the same random
model (same seed), shards it (`dsv3.distributed.parallelize`) and runs the dsv3 rows in lockstep
(the inputs are fixed, nothing is sampled, so the collectives pair up); rank 0 prints. The
transformers side runs in one process only, so it is skipped there, and so is the bandwidth row
(its bytes-per-token bound is a one-process figure).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import accounting
from .config import ModelConfig
from .distributed.mesh import launched_world_size
from .inference.generate import decode_step, prefill
from .inference.speculative import SpeculativeStats, speculative_stream
from .model.cache import LatentCache
from .model.transformer import DeepSeekV3

ROWS = (
    "prefill512",
    "prefill4096",
    "ttft512",
    "decode1",
    "decode8",
    "decode1_long",
    "decode1_int8",
    "ttft512_int8",
    "mtp",
    "bandwidth",
)
# What each row times, for `dsv3 bench --help` (both sides on the same random weights, one process).
ROW_HELP = {
    "prefill512": "prefill 1x512: dsv3 prefill() into the latent cache vs transformers forward (all positions' logits)",
    "prefill4096": "the same with a 4096-token prompt",
    "ttft512": "time to first token after a 512-token prompt through what users call: dsv3.generate("
    "max_new_tokens=1) vs transformers generate(max_new_tokens=1), which keeps only the last logits; "
    "reported as prompt tokens/s (512 / TTFT)",
    "decode1": "decode batch 1 after a 128-token prompt: dsv3 decode_step vs transformers forward with its cache",
    "decode8": "the same with batch 8",
    "decode1_long": "decode batch 1 after a 4096-token prompt (and both caches' bytes)",
    "decode1_int8": "decode batch 1 after 128 with dsv3's weight-only int8 (InferenceOptions(quantize='int8'), "
    "lm_head included) vs transformers bf16",
    "ttft512_int8": "time to first token after a 512-token prompt with dsv3's int8 weights (dsv3.generate) vs "
    "transformers bf16 generate, as prompt tokens/s",
    "mtp": "MTP speculative decoding, batch 1 after 128 (acceptance and tokens/step; dsv3 only)",
    "bandwidth": "decode batch 1 as a fraction of the bound: bf16 matrix-vector bandwidth (a 512 MB matrix in 2 MiB "
    "pages, as the weights) / weight bytes per token",
}


def measure_bandwidth(mb: int = 512, repeats: int = 10) -> float:
    """Bytes/s streamed by a large bf16 matrix-vector product (the decode roofline on this machine).

    The best of torch's two CPU paths (oneDNN on and off) and of dsv3's native kernel where it runs:
    the bound is what the machine can do, not what one backend does. The matrix lives in memory of the
    kind the model's weights get (`kernels.pages`: 2 MiB pages where Linux allows), since the page size
    alone moves this figure by a third on a VM (docs/benchmarks.md: 27-29 GB/s against 17-22 in 4 KiB
    pages, the same product, any size from 256 MB to 2 GB).
    """
    from .kernels import native, pages

    cols = 8192
    rows = mb * (1 << 20) // (2 * cols)
    w = pages.empty((rows, cols), torch.bfloat16)
    w.normal_()
    x = torch.randn(1, cols).to(torch.bfloat16)
    previous = torch.backends.mkldnn.enabled
    products = [lambda: torch.nn.functional.linear(x, w)] * 2
    if native.available():
        products.append(lambda: native.linear(x, w))
    best = float("inf")
    try:
        for i, product in enumerate(products):
            torch.backends.mkldnn.enabled = i == 0
            for _ in range(2):
                product()
            for _ in range(repeats):
                t0 = time.perf_counter()
                product()
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.backends.mkldnn.enabled = previous
    return w.numel() * 2 / best


def decode_weight_bytes(cfg: ModelConfig) -> int:
    """bf16 bytes of weights one decoded token touches: all activated parameters but the embedding table."""
    return accounting.activated_parameters(cfg) * 2


def _prompt(n: int, vocab: int, b: int = 0) -> list[int]:
    """n fixed prompt ids for row b: (7i + b) % 1000 + 2, folded into a vocabulary smaller than that (tiny)."""
    return [(7 * i + b) % 1000 % (vocab - 2) + 2 for i in range(n)]


def _timed(fn: Callable[[], object], repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------- dsv3 side
def ours_prefill(model: DeepSeekV3, n: int) -> float:
    cache = LatentCache(model.config, 1, n + 1, dtype=torch.bfloat16)
    prompt = [[2 + i % (model.config.vocab_size - 2) for i in range(n)]]

    def run():
        cache.lengths.zero_()
        prefill(model, cache, [0], prompt)

    run()
    return n / _timed(run, repeats=2)


def ours_decode(model: DeepSeekV3, batch: int, context: int, steps: int) -> float:
    cache = LatentCache(model.config, batch, context + steps + 8, dtype=torch.bfloat16)
    slots = [cache.allocate() for _ in range(batch)]
    prefill(model, cache, slots, [_prompt(context, model.config.vocab_size, b) for b in range(batch)])
    tokens = [5] * batch
    for _ in range(3):
        decode_step(model, cache, slots, tokens)
    t0 = time.perf_counter()
    for _ in range(steps):
        decode_step(model, cache, slots, tokens)
    return batch * steps / (time.perf_counter() - t0)


def ours_mtp(model: DeepSeekV3, context: int, steps: int) -> tuple[float, SpeculativeStats]:
    prompt = [_prompt(context, model.config.vocab_size)]
    stats = SpeculativeStats()
    list(speculative_stream(model, prompt, 4, stop_token_ids=[]))  # warm-up
    t0 = time.perf_counter()
    n = 0
    for step in speculative_stream(model, prompt, steps, stop_token_ids=[], stats=stats):
        n += sum(len(v) for v in step.values())
    return n / (time.perf_counter() - t0), stats


def ours_ttft(model: DeepSeekV3, n: int) -> float:
    """Prompt tokens/s to the first new token through dsv3.generate, the public API (best of 2 after a warm-up)."""
    from .inference.generate import generate

    prompt = [_prompt(n, model.config.vocab_size)]
    run = lambda: generate(model, prompt, max_new_tokens=1)
    run()
    return n / _timed(run, repeats=2)


def int8_copy(model: DeepSeekV3) -> DeepSeekV3:
    """An int8 copy of the model, as `from_pretrained(quantize='int8')` makes it (the bf16 model is left as it is)."""
    import copy

    from .model.options import InferenceOptions

    return copy.deepcopy(model).prepare_for_inference(InferenceOptions(quantize="int8"))


# ---------------------------------------------------------------------------------------------- transformers side
def hf_ttft(hf, n: int) -> float:
    """Prompt tokens/s to the first new token through transformers' generate (it computes only the last logits)."""
    ids = torch.tensor([_prompt(n, hf.config.vocab_size)])
    run = lambda: hf.generate(ids, max_new_tokens=1, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        run()
        return n / _timed(run, repeats=2)


def hf_prefill(hf, n: int) -> float:
    ids = torch.tensor([[2 + i % (hf.config.vocab_size - 2) for i in range(n)]])
    with torch.inference_mode():
        hf(ids, use_cache=True)
        return n / _timed(lambda: hf(ids, use_cache=True), repeats=2)


def hf_decode(hf, batch: int, context: int, steps: int) -> tuple[float, int]:
    """(tokens/s, KV cache bytes at the end) for transformers' own cached decoding."""
    ids = torch.tensor([_prompt(context, hf.config.vocab_size, b) for b in range(batch)])
    with torch.inference_mode():
        out = hf(ids, use_cache=True)
        cache = out.cache
        tok = torch.full((batch, 1), 5)
        for _ in range(3):
            hf(tok, cache=cache, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(steps):
            hf(tok, cache=cache, use_cache=True)
        dt = time.perf_counter() - t0
    cache_bytes = sum(
        t.numel() * t.element_size()
        for layer in getattr(cache, "layers", [])
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(t, torch.Tensor)
    )
    return batch * steps / dt, cache_bytes


# ---------------------------------------------------------------------------------------------- driver
def bench_model(cfg: ModelConfig) -> DeepSeekV3:
    """The benchmark's random bf16 model: seed 0, a random routing bias (the same weights every run)."""
    torch.manual_seed(0)
    model = DeepSeekV3(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


def bench_checkpoint(config: str) -> Path:
    """The benchmark model saved under the dsv3 cache (`$DSV3_CACHE`, default ~/.cache/dsv3): what llama.cpp converts."""
    from .kernels.native import cache_dir

    path = cache_dir().parent / f"bench-{Path(config).stem}"
    bench_model(ModelConfig.from_pretrained(config)).save_pretrained(path)
    return path


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def with_llamacpp(
    args: argparse.Namespace, rows: tuple[str, ...], first: dict, log: Callable[[str], None] = print
) -> dict:
    """Alternate dsv3 rounds with llama.cpp rounds on the same weights; add llama.cpp's medians and ratios to `first`.

    Round 1 is `first` (already measured), then llama.cpp; each further round re-runs the dsv3 rows
    (without transformers) and then llama.cpp again. dsv3 figures become the median over the rounds; so does the
    bandwidth row's bound, and its fraction is the two medians' ratio.
    """
    from . import llamacpp

    threads = args.threads or torch.get_num_threads()
    quick = not {"prefill4096", "decode8", "decode1_long"} & set(rows)
    types = tuple(t.strip() for t in args.llamacpp_types.split(",") if t.strip())
    ckpt = bench_checkpoint(args.config)
    ours: dict[str, list[dict]] = {r["row"]: [r] for r in first["rows"]}
    anchors = []
    for round_no in range(args.rounds):
        if round_no:
            again = run_bench(args.config, rows, args.steps, args.threads, with_hf=False, log=_silent)
            for r in again["rows"]:
                ours.setdefault(r["row"], []).append(r)
        log(f"llama.cpp round {round_no + 1}/{args.rounds}: {', '.join(types)} on {ckpt} ({threads} threads)")
        anchors.append(llamacpp.run_anchor_by_type(args.llamacpp, ckpt, types, threads, quick, log))
    log("")
    log(f"{'row':34s} {'dsv3':>9s} {'llama.cpp':>10s}  {'ratio':>7s}  llama.cpp test")
    for r in first["rows"]:
        rounds = ours[r["row"]]
        r["dsv3"] = _median([x["dsv3"] for x in rounds])
        if "fraction" in r:  # the bandwidth row: its bound is re-measured each round too, and the fraction follows
            r["bound"] = _median([x["bound"] for x in rounds])
            r["bandwidth_GBps"] = _median([x["bandwidth_GBps"] for x in rounds])
            r["fraction"] = r["dsv3"] / r["bound"]
            if args.rounds > 1:
                log(f"{'decode b=1 / bandwidth bound':34s} {r['dsv3']:9.1f} of {r['bound']:.1f} = {r['fraction']:.0%}")
            continue
        values = [v for v in (llamacpp.counterpart(a, r["row"]) for a in anchors) if v is not None]
        if not values:
            continue
        ref = _median([v for _, v in values])
        r.update(llamacpp=ref, llamacpp_test=values[0][0], llamacpp_ratio=r["dsv3"] / ref)
        log(f"{r['row']:34s} {r['dsv3']:9.1f} {ref:10.1f}  {r['dsv3'] / ref:6.2f}x  {values[0][0]}")
    first["meta"].update(llamacpp_rounds=args.rounds, llamacpp_raw=anchors, llamacpp_checkpoint=str(ckpt))
    return first


def run_bench(
    config: str = "small",
    rows: tuple[str, ...] = ROWS,
    steps: int = 16,
    threads: int | None = None,
    with_hf: bool = True,
    log: Callable[[str], None] = print,
    tp: int | None = None,
    ep: int | None = None,
) -> dict:
    """Run the rows and return {"rows": [...], "meta": {...}}; `log` gets one line per finished row.

    Under torchrun (WORLD_SIZE > 1) every rank must call this with the same arguments: the model is
    sharded over tp / ep (each 1 or N, default N) and the rows run in lockstep; only rank 0 logs.
    """
    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig.from_pretrained(config)
    model = bench_model(cfg)
    layout = None
    hf = None
    if launched_world_size() <= 1:
        # Loaded from a checkpoint, as users load a model (the loader puts large weights in huge pages,
        # kernels/pages.py); transformers reads the same files.
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = DeepSeekV3.from_pretrained(tmp, dtype=torch.bfloat16)
            if with_hf:
                from transformers import DeepseekV3ForCausalLM
                from transformers.utils import logging as hf_logging

                hf_logging.set_verbosity_error()
                hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).eval()
    model.prepare_for_inference()
    if launched_world_size() > 1:
        from .distributed.launch import parallelize

        ctx = parallelize(model, tp, ep)  # same seed on every rank: the same weights, then each keeps its part
        layout = {"world": ctx.mesh.world_size, "tp": ctx.mesh.tp, "ep": ctx.mesh.ep}
        if not ctx.is_main:
            log = _silent
        log(
            f"torchrun: {layout['world']} ranks, tp={layout['tp']} ep={layout['ep']}; dsv3 rows only "
            "(the transformers comparison and the bandwidth row run in one process)"
        )
        with_hf = False
        # One-process rows: the bandwidth bound, and rows that copy (int8) or re-drive (generate) the model.
        rows = tuple(r for r in rows if r not in ("bandwidth", "decode1_int8", "ttft512", "ttft512_int8"))
    results = []

    def add(name: str, ours: float, ref: float | None, unit: str = "tokens/s", **extra) -> None:
        row = {
            "row": name,
            "dsv3": ours,
            "transformers": ref,
            "ratio": (ours / ref) if ref else None,
            "unit": unit,
            **extra,
        }
        results.append(row)
        ref_s = f"{ref:9.1f}" if ref else "        -"
        ratio_s = f"{ours / ref:6.2f}x" if ref else "     -"
        log(f"{name:34s} dsv3 {ours:9.1f}  transformers {ref_s}  ratio {ratio_s}  {unit}")

    with torch.inference_mode():
        if "prefill512" in rows:
            add("prefill 1x512", ours_prefill(model, 512), hf_prefill(hf, 512) if hf else None)
        if "prefill4096" in rows:
            add("prefill 1x4096", ours_prefill(model, 4096), hf_prefill(hf, 4096) if hf else None)
        if "ttft512" in rows:
            n = min(512, cfg.max_position_embeddings - 1)  # room for the one new token (tiny's context is 512)
            add(f"TTFT 1x{n} (generate)", ours_ttft(model, n), hf_ttft(hf, n) if hf else None, unit="prompt tokens/s")
        if "decode1" in rows:
            ref = hf_decode(hf, 1, 128, steps)[0] if hf else None
            add("decode b=1 after 128", ours_decode(model, 1, 128, steps), ref)
        if "decode8" in rows:
            ref = hf_decode(hf, 8, 128, steps)[0] if hf else None
            add("decode b=8 after 128", ours_decode(model, 8, 128, steps), ref)
        if "decode1_long" in rows:
            ref, hf_cache = hf_decode(hf, 1, 4096, max(4, steps // 2)) if hf else (None, None)
            ours = ours_decode(model, 1, 4096, steps)
            latent = cfg.kv_cache_dim * cfg.num_hidden_layers * 2 * (4096 + steps)
            add("decode b=1 after 4096", ours, ref, cache_bytes_dsv3=latent, cache_bytes_transformers=hf_cache)
            gc.collect()
        quantized = int8_copy(model) if {"decode1_int8", "ttft512_int8"} & set(rows) else None
        if "decode1_int8" in rows:
            ref = next((r["transformers"] for r in results if r["row"] == "decode b=1 after 128"), None)
            if ref is None and hf:
                ref = hf_decode(hf, 1, 128, steps)[0]
            add("decode b=1 after 128, int8", ours_decode(quantized, 1, 128, steps), ref)
        if "ttft512_int8" in rows:
            n = min(512, cfg.max_position_embeddings - 1)
            ref = next((r["transformers"] for r in results if r["row"] == f"TTFT 1x{n} (generate)"), None)
            if ref is None and hf:
                ref = hf_ttft(hf, n)
            add(f"TTFT 1x{n} (generate), int8", ours_ttft(quantized, n), ref, unit="prompt tokens/s")
        del quantized
        gc.collect()
        if "mtp" in rows and cfg.num_nextn_predict_layers:
            tps, st = ours_mtp(model, 128, steps * 2)
            add(
                "MTP speculative b=1 after 128",
                tps,
                None,
                acceptance=st.acceptance_rate,
                tokens_per_step=st.tokens_per_step,
            )
            log(
                f"{'':34s} acceptance {st.acceptance_rate:.2f}, {st.tokens_per_step:.2f} tokens/step "
                "(random weights: the MTP head has not learnt the main model)"
            )
        if "bandwidth" in rows:
            bw = measure_bandwidth()
            need = decode_weight_bytes(cfg)
            bound = bw / need
            ours = next((r["dsv3"] for r in results if r["row"] == "decode b=1 after 128"), None)
            if ours is None:
                ours = ours_decode(model, 1, 128, steps)
            results.append(
                {
                    "row": "decode b=1 vs bandwidth bound",
                    "dsv3": ours,
                    "bound": bound,
                    "fraction": ours / bound,
                    "bandwidth_GBps": bw / 1e9,
                    "bytes_per_token": need,
                }
            )
            log(
                f"{'decode b=1 / bandwidth bound':34s} {ours:.1f} of {bound:.1f} tokens/s = {ours / bound:.0%} "
                f"({need / 1e6:.0f} MB/token at {bw / 1e9:.1f} GB/s, the best bf16 matvec here)"
            )
    from .kernels import native

    meta = {"config": config, "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": steps}
    # Which host this was (runs are compared across hosts): torch's CPU capability and the native kernels' build.
    meta["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    meta["native_kernels"] = native.isa() if native.available() else None
    if layout is not None:
        meta["parallel"] = layout
    return {"rows": results, "meta": meta}


def _silent(line: str) -> None:
    pass


def cmd_bench(args: argparse.Namespace) -> int:
    rows = tuple(r.strip() for r in args.rows.split(",")) if args.rows else ROWS
    unknown = set(rows) - set(ROWS)
    if unknown:
        from .errors import RequestError

        raise RequestError(f"unknown bench rows {sorted(unknown)} (rows: {', '.join(ROWS)})")
    if launched_world_size() > 1:
        from .distributed.mesh import run_or_exit

        return run_or_exit(lambda: _bench(args, rows), "dsv3 bench")
    return _bench(args, rows)


def _bench(args: argparse.Namespace, rows: tuple[str, ...]) -> int:
    if args.rounds < 1:
        from .errors import RequestError

        raise RequestError(f"--rounds must be at least 1, got {args.rounds}")
    if args.llamacpp and launched_world_size() > 1:
        from .errors import RequestError

        raise RequestError("--llamacpp runs in one process (llama.cpp is timed on one machine, not under torchrun)")
    if args.llamacpp and not os.path.isfile(args.llamacpp):
        from .errors import RequestError

        raise RequestError(
            f"--llamacpp: no such script {args.llamacpp!r} (the anchor is ../shared/anchors/llamacpp.sh)"
        )
    result = run_bench(
        args.config, rows, args.steps, args.threads, with_hf=not args.no_transformers, tp=args.tp, ep=args.ep
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 alone writes the results
    if args.llamacpp:
        result = with_llamacpp(args, rows, result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def add_commands(sub) -> None:
    rows_help = "\n".join(f"  {name:13s} {text}" for name, text in ROW_HELP.items())
    s = sub.add_parser(
        "bench",
        help="dsv3 vs transformers side by side (SPEC section 5)",
        description="dsv3 vs transformers side by side, one process, the same random weights; "
        "speed rows are tokens/s (higher is better) with the ratio dsv3 / transformers.",
        epilog=f"rows:\n{rows_help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--config", default="small", help="preset or config.json (default: the benchmark preset)")
    s.add_argument("--rows", default="", help=f"comma-separated subset of {','.join(ROWS)}")
    s.add_argument("--steps", type=int, default=16, help="decode steps timed per row")
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--json", default=None, help="also write the results here")
    s.add_argument("--no-transformers", action="store_true", help="dsv3 rows only")
    s.add_argument(
        "--llamacpp",
        metavar="SCRIPT",
        default=None,
        help="also time llama.cpp on the same weights with this anchor script (../shared/anchors/llamacpp.sh: builds "
        "llama.cpp once, converts the benchmark model to GGUF) and print dsv3 / llama.cpp per row; quick "
        "(pp512, tg128) unless a 4096 or batch-8 row is asked for",
    )
    s.add_argument(
        "--llamacpp-types",
        default="bf16,q8_0",
        help="GGUF types for --llamacpp (int8 rows use q8_0), run one at a time: a type llama.cpp fails on is left "
        "out with a note",
    )
    s.add_argument(
        "--rounds", type=int, default=1, help="with --llamacpp: alternate this many dsv3 and llama.cpp rounds (medians)"
    )
    s.add_argument("--tp", type=int, default=None, help="under torchrun: tensor-parallel size (1 or N; default N)")
    s.add_argument("--ep", type=int, default=None, help="under torchrun: expert-parallel size (1 or N; default N)")
    s.set_defaults(fn=cmd_bench)
