"""Bytes/s of one-row bf16 products over weights that cannot stay in cache: native kernels vs torch's two paths.

    python scripts/matvec_bandwidth.py [--rounds 5] [--gb 1.2] [--threads 2] [--shape 129280x1024 ...] [--pages 4k]

For each shape, enough copies of a random bf16 matrix to fill --gb are multiplied by one row in turn (so each
product reads its matrix from memory, not from a cache the previous repeat warmed, as `bench.measure_bandwidth`'s
repeats of one 512 MB matrix can on a CPU with a large L3); the paths alternate over the rounds and the medians
are printed: `native.linear` with this CPU's build and with the AVX2 build (where they differ), torch's MKL
path (oneDNN off) and oneDNN. The matrices are in 2 MiB pages, as the model's weights (--pages 4k: not). Run it on
a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from dsv3.kernels import native, pages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gb", type=float, default=1.2, help="bytes of weights streamed per product pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape", action="append", help="NxK (default: 129280x1024, lm_head; 2816x1024)")
    parser.add_argument(
        "--pages", choices=("huge", "4k"), default="huge", help="2 MiB pages as the model's weights, or not"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shape or ["129280x1024", "2816x1024"])]

    products = {}
    if native.available():
        libs = {native.isa(): native._library()}
        if native.isa() != "avx2":
            libs["avx2"] = native.load(native.build(target_isa="avx2"))
        for name, lib in libs.items():
            products[f"native-{name}"] = (lib, True)
    products["torch-mkl"] = (None, False)
    products["torch-onednn"] = (None, True)

    default_library = native._library
    for N, K in shapes:
        copies = max(3, int(args.gb * 1e9) // (N * K * 2))
        weights = [torch.randn(N, K).to(torch.bfloat16) for _ in range(copies)]
        if args.pages == "huge":  # where the model's weights live (kernels/pages.py)
            weights = [pages.copy_of(w) for w in weights]
        x = torch.randn(1, K).to(torch.bfloat16)
        rates = {name: [] for name in products}
        for _ in range(args.rounds):
            for name, (lib, onednn) in products.items():
                torch.backends.mkldnn.enabled = onednn
                if lib is not None:
                    native._library = lambda lib=lib: lib
                    product = native.linear
                else:
                    product = F.linear
                product(x, weights[0])
                start = time.perf_counter()
                for w in weights:
                    product(x, w)
                rates[name].append(N * K * 2 * copies / (time.perf_counter() - start) / 1e9)
                native._library = default_library
        torch.backends.mkldnn.enabled = True
        cells = "  ".join(f"{name} {statistics.median(r):.1f}" for name, r in rates.items())
        print(f"{N}x{K} ({copies} copies, {args.rounds} rounds): {cells} GB/s", flush=True)


if __name__ == "__main__":
    main()
