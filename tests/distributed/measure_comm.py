"""Bytes each rank sends per decode step under every layout, on `small` (the figures in docs/distributed.md).

    .venv/bin/python tests/distributed/measure_comm.py [--layers 2] [--worlds 2 4] [--batch 1 8]

Loads a random bf16 `small` cut to `--layers` layers with `load_sharded` under each layout,
prefills 32 tokens per sequence, then counts what one decode step sends (`CommStats`). The
all-to-all figures depend on the routing (random weights spread it about evenly).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import spawn  # noqa: E402
from measure_memory import write_small  # noqa: E402

LAYOUTS = [  # (name, tp, ep, combine)
    ("tp", True, False, None),
    ("ep all_to_all", False, True, "all_to_all"),
    ("ep all_reduce", False, True, "all_reduce"),
    ("tp+ep (official)", True, True, None),
    ("tp+ep all_to_all", True, True, "all_to_all"),
]


def step_bytes(rank: int, world: int, ckpt: str, batches: list[int]) -> dict:
    import torch

    from dsv3.distributed import init_mesh, load_sharded
    from dsv3.inference.generate import decode_step, prefill
    from dsv3.model.cache import LatentCache

    out = {}
    for name, tp, ep, combine in LAYOUTS:
        mesh = init_mesh(world if tp else 1, world if ep else 1)
        model, stats = load_sharded(ckpt, mesh.tp_group, mesh.ep_group, dtype=torch.bfloat16, ep_combine=combine)
        for B in batches:
            cache = LatentCache(model.config, B, 64, dtype=torch.bfloat16)
            slots = [cache.allocate() for _ in range(B)]
            g = torch.Generator().manual_seed(B)
            prefill(model, cache, slots, torch.randint(2, 1000, (B, 32), generator=g).tolist())
            stats.reset()
            decode_step(model, cache, slots, list(range(2, 2 + B)))
            out[f"{name}|{B}"] = dict(stats.bytes)
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "small")
        write_small(ckpt, args.layers)
        for world in args.worlds:
            res = spawn.run(world, "measure_comm:step_bytes", ckpt, args.batch, timeout=900)
            print(f"\n{world} ranks: bytes sent per decode step, rank 0 (mean over ranks in brackets)")
            for key in res[0]:
                name, B = key.split("|")
                kinds = sorted(set().union(*(r[key] for r in res)))
                parts = []
                for k in kinds:
                    mean = sum(r[key].get(k, 0) for r in res) / world
                    parts.append(f"{k} {res[0][key].get(k, 0):,} [{mean:,.0f}]")
                total = sum(res[0][key].values())
                print(f"  {name:<18} batch {B:>2}: total {total:>9,}  " + "; ".join(parts))


if __name__ == "__main__":
    main()
