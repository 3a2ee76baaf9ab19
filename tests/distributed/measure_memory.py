"""Per-rank peak memory of sharded loading against one process (the figures in docs/distributed.md).

    .venv/bin/python tests/distributed/measure_memory.py [--layers 2] [--worlds 2 4]

Writes a bf16 checkpoint of the `small` preset cut to `--layers` layers (1 dense + MoE, no MTP),
then loads it in fresh processes: once whole (`DeepSeekV3.from_pretrained`), then under each
layout with `load_sharded`, and every weight is read once (safetensors hands out views of the
mmap'ed file, whose pages count only once touched). A rank's figure is its peak RSS (VmHWM) minus
its RSS just before loading, so the interpreter and torch are not counted; `tensor bytes` is what
the loaded model holds. Takes about a minute on 2 cores for the default (about 0.66 GB of weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import spawn  # noqa: E402


def single(rank: int, world: int, ckpt: str) -> dict:
    """One process, the plain loader (called through spawn.run with world 1)."""
    import torch
    from workers import _tensor_bytes, touch_all, warm_up

    import dsv3

    before = warm_up(ckpt)
    model = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16)
    return {"peak_growth": touch_all(model) - before, "tensor_bytes": _tensor_bytes(model)}


def write_small(ckpt: str, layers: int) -> None:
    """A random bf16 checkpoint of `small` cut to `layers` layers (the first dense, the rest MoE), no MTP."""
    import torch

    import dsv3

    cfg = dsv3.ModelConfig.from_pretrained("small", num_hidden_layers=layers, num_nextn_predict_layers=0)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    # Shards of 64 MiB: like the official layout, where one file is a small part of the model (V3:
    # 163 files of about 4 GiB), so a rank's transient (the file it is reading) is a small part too.
    dsv3.DeepSeekV3(cfg, dtype=torch.bfloat16).save_pretrained(ckpt, max_shard_bytes=64 << 20)
    files = [f for f in os.listdir(ckpt) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in files) / 2**20
    print(
        f"checkpoint: small with {layers} layers, no MTP, bf16 ({size:,.0f} MiB in {len(files)} shards, "
        f"written in {time.perf_counter() - t0:.0f}s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "small")
        write_small(ckpt, args.layers)
        one = spawn.run(1, "measure_memory:single", ckpt, timeout=600)[0]
        mib = lambda n: f"{n / 2**20:8.1f} MiB"
        print(
            f"{'layout':<22} {'rank':>4} {'tensor bytes':>14} {'peak RSS growth':>16} {'x (single / N)':>15} "
            f"{'x own tensors':>14}"
        )
        print(
            f"{'1 process':<22} {0:>4} {mib(one['tensor_bytes'])} {mib(one['peak_growth']):>16} {1.0:>15.2f} "
            f"{one['peak_growth'] / one['tensor_bytes']:>14.2f}"
        )
        for world in args.worlds:
            for tp, ep in ((world, world), (world, 1), (1, world)):
                res = spawn.run(world, "workers:peak_memory", ckpt, tp, ep, timeout=600)
                for rank, r in enumerate(res):
                    ratio = r["peak_growth"] / (one["peak_growth"] / world)
                    name = f"{world} ranks tp={tp} ep={ep}"
                    print(
                        f"{name:<22} {rank:>4} {mib(r['tensor_bytes'])} {mib(r['peak_growth']):>16} {ratio:>15.2f} "
                        f"{r['peak_growth'] / r['tensor_bytes']:>14.2f}"
                    )


if __name__ == "__main__":
    main()
