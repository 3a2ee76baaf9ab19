"""llama.cpp on the same weights: run the anchor script (`../shared/anchors/llamacpp.sh`) and read its tables.

The script builds llama.cpp once, converts a checkpoint to GGUF with llama.cpp's own converter and
times it with `llama-bench` (markdown rows `| model | ... | test | t/s |`, test names like `pp512`,
`tg128`, `tg16 @ d128`) and `llama-batched-bench` (rows `| PP | TG | B | N_KV | T_PP s | S_PP t/s |
T_TG s | S_TG t/s | ...`). `dsv3 bench --llamacpp SCRIPT` uses this module to put llama.cpp's
figure beside each dsv3 row (`ROW_COUNTERPART`) and print the ratio.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import RequestError

# dsv3 bench row -> (GGUF type, llama.cpp test). Decode rows compare with decoding at the same depth
# (`tg16 @ d128`: 16 tokens after a 128-token context); the quick run has only `tg128` (decoding 128
# tokens from an empty context), used when the depth rows were not run.
ROW_COUNTERPART: dict[str, tuple[str, tuple[str, ...]]] = {
    "prefill 1x512": ("bf16", ("pp512",)),
    "prefill 1x4096": ("bf16", ("pp4096",)),
    "TTFT 1x512 (generate)": ("bf16", ("pp512",)),
    "decode b=1 after 128": ("bf16", ("tg16 @ d128", "tg128")),
    "decode b=8 after 128": ("bf16", ("batched b=8",)),
    "decode b=1 after 4096": ("bf16", ("tg16 @ d4096",)),
    "decode b=1 after 128, int8": ("q8_0", ("tg16 @ d128", "tg128")),
    "TTFT 1x512 (generate), int8": ("q8_0", ("pp512",)),
}


def parse_tables(text: str) -> dict[str, dict[str, float]]:
    """{gguf type: {test: tokens/s}} from the script's output (sections start with `## llama.cpp TYPE`)."""
    out: dict[str, dict[str, float]] = {}
    current: dict[str, float] | None = None
    for line in text.splitlines():
        if line.startswith("## llama.cpp "):
            current = out.setdefault(line.split()[2].rstrip(","), {})
            continue
        if current is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"(pp|tg)\d+( @ d\d+)?", cells[-2]):
            current[cells[-2]] = float(cells[-1].split("±")[0])  # llama-bench: ... | test | t/s ± sd |
        elif len(cells) == 10 and cells[2].isdigit():
            current[f"batched b={cells[2]}"] = float(cells[7])  # llama-batched-bench: S_TG t/s at batch B
    return out


def run_anchor(
    script: str, checkpoint: Path, types: tuple[str, ...], threads: int, quick: bool, reps: int = 3
) -> dict[str, dict[str, float]]:
    """Run the anchor script on `checkpoint` for `types` and return its figures (RequestError if it fails)."""
    if not os.path.isfile(script):
        raise RequestError(f"--llamacpp: no such script {script!r} (the anchor is ../shared/anchors/llamacpp.sh)")
    env = dict(os.environ, THREADS=str(threads), REPS=str(reps), QUICK="1" if quick else "0")
    env.setdefault("PY", sys.executable)  # the converter needs torch, transformers, safetensors: this venv has them
    run = subprocess.run(["bash", script, str(checkpoint), *types], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RequestError(f"--llamacpp: {script} failed (exit {run.returncode}): {tail}")
    return parse_tables(run.stdout)


def run_anchor_by_type(
    script: str,
    checkpoint: Path,
    types: tuple[str, ...],
    threads: int,
    quick: bool,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """`run_anchor` one GGUF type at a time: a type whose run fails is left out with one line to `log`, and the
    others are still compared; RequestError when the script is missing or every type fails.

    Why: llama.cpp can abort on one type only (q8_0 with ggml's AMX buffers on an AMX CPU, while bf16 runs),
    and the script stops at its first failure: run together, one type's abort lost every figure."""
    if not os.path.isfile(script):
        raise RequestError(f"--llamacpp: no such script {script!r} (the anchor is ../shared/anchors/llamacpp.sh)")
    tables: dict[str, dict[str, float]] = {}
    failures = []
    for gguf in types:
        try:
            tables.update(run_anchor(script, checkpoint, (gguf,), threads, quick))
        except RequestError as e:
            failures.append(f"{gguf}: {e}")
            log(f"llama.cpp {gguf} left out: {e}")
    if not tables:
        raise RequestError("; ".join(failures) or "--llamacpp: no GGUF types given")
    return tables


def counterpart(tables: dict[str, dict[str, float]], row: str) -> tuple[str, float] | None:
    """("TYPE test", tokens/s) of llama.cpp's figure for a dsv3 bench row, or None when it was not run."""
    if row not in ROW_COUNTERPART:
        return None
    gguf, tests = ROW_COUNTERPART[row]
    for test in tests:
        value = tables.get(gguf, {}).get(test)
        if value is not None:
            return f"{gguf} {test}", value
    return None
