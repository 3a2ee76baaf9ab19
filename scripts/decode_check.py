"""Decode batch 1 (bf16 after 128 and 4096 tokens, int8 after 128) against llama.cpp, the engines alternating.

    python scripts/decode_check.py [--rounds 3] [--checkpoint ~/.cache/dsv3/bench-small]

dsv3 stays loaded in this process (bf16 and an int8 copy, both as `from_pretrained` loads them) and times
what `dsv3 bench` times (`bench.ours_decode`: 16 `decode_step`s after the prompt); between its rounds
`llama-bench -p 0 -n 16 -d D -r 3` runs on the GGUFs that `../shared/anchors/llamacpp.sh CKPT bf16 q8_0`
made of the same checkpoint (built and converted by a `dsv3 bench --llamacpp` run first). A shorter check
than `dsv3 bench --llamacpp --rounds N` for the three decode rows whose ratios sit near their goals.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

import dsv3
from dsv3.bench import ours_decode

LLAMACPP = Path(os.environ.get("LLAMACPP_DIR", Path.home() / ".cache" / "dsv3-llamacpp"))
BENCH = LLAMACPP / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "build" / "bin" / "llama-bench"


def llama(gguf: Path, depths: str, threads: int) -> dict[int, float]:
    """{depth: tokens/s} of llama-bench's 16-token decode after each depth."""
    cmd = [str(BENCH), "-m", str(gguf), "-t", str(threads), *"-p 0 -n 16 -r 3 -o json -d".split(), depths]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {r["n_depth"]: r["avg_ts"] for r in json.loads(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(Path.home() / ".cache" / "dsv3" / "bench-small"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint).expanduser()
    gguf = LLAMACPP / "gguf" / ckpt.name
    bf16 = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16)
    int8 = dsv3.DeepSeekV3.from_pretrained(ckpt, dtype=torch.bfloat16, quantize="int8")
    pairs: dict[str, list[tuple[float, float]]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            ours = {
                "bf16 after 128": ours_decode(bf16, 1, 128, 16),
                "bf16 after 4096": ours_decode(bf16, 1, 4096, 16),
                "int8 vs q8_0 after 128": ours_decode(int8, 1, 128, 16),
            }
            theirs_bf16 = llama(Path(f"{gguf}-bf16.gguf"), "128,4096", args.threads)
            theirs_q8 = llama(Path(f"{gguf}-q8_0.gguf"), "128", args.threads)
            theirs = {
                "bf16 after 128": theirs_bf16[128],
                "bf16 after 4096": theirs_bf16[4096],
                "int8 vs q8_0 after 128": theirs_q8[128],
            }
            for row in ours:
                pairs.setdefault(row, []).append((ours[row], theirs[row]))
            print(time.strftime("%H:%M:%S"), {r: (round(ours[r], 1), round(theirs[r], 1)) for r in ours}, flush=True)
    for row, v in pairs.items():
        o, t = statistics.median(x for x, _ in v), statistics.median(y for _, y in v)
        per_round = [round(x / y, 2) for x, y in v]
        print(f"{row:24s} dsv3 {o:6.1f}  llama.cpp {t:6.1f}  ratio {o / t:.2f}x  per round {per_round}")


if __name__ == "__main__":
    main()
