"""`dsv3 bench --llamacpp SCRIPT`: the anchor script's tables are read, matched to rows, and divided into."""

import json
import subprocess
import sys

import torch

from dsv3.llamacpp import counterpart, parse_tables

# What the anchor script printed for a `small` checkpoint here (llama.cpp 0c1e570): llama-bench's markdown and
# llama-batched-bench's table, under the script's `## llama.cpp TYPE` headings.
ANCHOR_OUTPUT = """\
## llama.cpp bf16, 2 threads (bench-small)
| model                          |       size |     params | backend    | threads |            test |                  t/s |
| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: | -------------------: |
| deepseek2 ?B BF16              |   1.22 GiB |   654.53 M | CPU        |       2 |           pp512 |        266.80 ± 3.10 |
| deepseek2 ?B BF16              |   1.22 GiB |   654.53 M | CPU        |       2 |           tg128 |         33.04 ± 0.20 |
| deepseek2 ?B BF16              |   1.22 GiB |   654.53 M | CPU        |       2 |     tg16 @ d128 |         31.50 ± 0.40 |

build: 0c1e570 (1)
batch 8 decode (llama-batched-bench, 128-token prompts, 32 new tokens each): S_TG t/s is decode tokens/s
|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|   128 |     32 |    1 |    160 |    0.479 |   267.22 |    0.968 |    33.06 |    1.447 |   110.57 |
|   128 |     32 |    8 |   1280 |    3.827 |   267.56 |    2.341 |   109.35 |    6.168 |   207.52 |
## llama.cpp q8_0, 2 threads (bench-small)
| deepseek2 ?B Q8_0              |   654.00 MiB |   654.53 M | CPU        |       2 |           tg128 |         58.50 ± 1.00 |
"""


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python -m dsv3 bench ARGS` in a fresh process, its checkpoints cached under tmp_path."""
    return subprocess.run(
        [sys.executable, "-m", "dsv3", "bench", *args],
        capture_output=True,
        text=True,
        env={"DSV3_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
        timeout=600,
    )


def test_parse_tables_reads_every_figure():
    tables = parse_tables(ANCHOR_OUTPUT)
    assert tables == {
        "bf16": {"pp512": 266.8, "tg128": 33.04, "tg16 @ d128": 31.5, "batched b=1": 33.06, "batched b=8": 109.35},
        "q8_0": {"tg128": 58.5},
    }


def test_rows_meet_their_counterparts():
    tables = parse_tables(ANCHOR_OUTPUT)
    assert counterpart(tables, "decode b=1 after 128") == ("bf16 tg16 @ d128", 31.5)  # the same depth first
    assert counterpart(tables, "decode b=1 after 128, int8") == ("q8_0 tg128", 58.5)  # else the quick run's
    assert counterpart(tables, "decode b=8 after 128") == ("bf16 batched b=8", 109.35)
    assert counterpart(tables, "prefill 1x4096") is None  # not run
    assert counterpart(tables, "MTP speculative b=1 after 128") is None  # llama.cpp has no such row


def test_bench_divides_by_the_anchor_figures(tmp_path):
    """End to end with a stand-in anchor: the ratio printed and saved is dsv3's figure over the script's."""
    script = tmp_path / "anchor.sh"
    script.write_text(f"#!/usr/bin/env bash\ntest -f \"$1/config.json\" || exit 3\ncat <<'EOF'\n{ANCHOR_OUTPUT}EOF\n")
    out = tmp_path / "bench.json"
    run = _bench(
        tmp_path, "--config", "tiny", "--rows", "decode1", "--steps", "2", "--no-transformers", "--llamacpp",
        str(script), "--rounds", "2", "--json", str(out), "--threads", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["row"] == "decode b=1 after 128" and row["llamacpp"] == 31.5
    # the host, for comparing runs across machines
    assert result["meta"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["meta"]["native_kernels"] in ("avx2", "avx512", None)
    assert abs(row["llamacpp_ratio"] - row["dsv3"] / 31.5) < 1e-9
    assert "llama.cpp round 2/2" in run.stdout and "bf16 tg16 @ d128" in run.stdout
    assert (tmp_path / "cache" / "bench-tiny" / "config.json").is_file()  # the checkpoint llama.cpp was given


def test_rounds_give_the_bandwidth_row_the_median_decode_over_the_median_bound(tmp_path):
    """With --rounds, each round re-measures decode and the bound: the fraction saved is the ratio of the medians
    (it was round 1's fraction beside the median decode figure)."""
    script = tmp_path / "anchor.sh"
    script.write_text(f"#!/usr/bin/env bash\ncat <<'EOF'\n{ANCHOR_OUTPUT}EOF\n")
    out = tmp_path / "bench.json"
    run = _bench(
        tmp_path, "--config", "tiny", "--rows", "decode1,bandwidth", "--steps", "2", "--no-transformers", "--llamacpp",
        str(script), "--rounds", "2", "--json", str(out), "--threads", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    decode, bandwidth = rows["decode b=1 after 128"], rows["decode b=1 vs bandwidth bound"]
    assert bandwidth["dsv3"] == decode["dsv3"]  # the same rounds' decode figures, the same median
    assert abs(bandwidth["fraction"] - bandwidth["dsv3"] / bandwidth["bound"]) < 1e-12
    assert abs(bandwidth["bound"] - bandwidth["bandwidth_GBps"] * 1e9 / bandwidth["bytes_per_token"]) < 1e-6
    assert f"= {bandwidth['fraction']:.0%}" in run.stdout.split("llama.cpp round 2/2")[1]


def test_a_type_llama_cpp_aborts_on_is_left_out_and_the_others_compared(tmp_path):
    """As q8_0 aborts with ggml's AMX buffers while bf16 runs: the bf16 ratio still comes out, q8_0 gets a note."""
    script = tmp_path / "anchor.sh"
    bf16_part = ANCHOR_OUTPUT.split("## llama.cpp q8_0")[0]
    script.write_text(
        "#!/usr/bin/env bash\n"
        "if [[ $2 == q8_0 ]]; then echo 'GGML_ASSERT(*cur_backend_id != -1) failed' >&2; exit 134; fi\n"
        f"cat <<'EOF'\n{bf16_part}EOF\n"
    )
    out = tmp_path / "bench.json"
    run = _bench(
        tmp_path, "--config", "tiny", "--rows", "decode1,decode1_int8", "--steps", "1", "--no-transformers", "--llamacpp",
        str(script), "--json", str(out), "--threads", "1",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "llama.cpp q8_0 left out" in run.stdout and "GGML_ASSERT" in run.stdout
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["decode b=1 after 128"]["llamacpp"] == 31.5
    assert "llamacpp" not in rows["decode b=1 after 128, int8"]


def test_a_missing_anchor_script_is_one_error_line(tmp_path):
    run = _bench(
        tmp_path, "--config", "tiny", "--rows", "decode1", "--steps", "1", "--no-transformers", "--llamacpp",
        str(tmp_path / "nope.sh"),
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("dsv3 bench: error: --llamacpp: no such script")
    assert "decode b=1" not in run.stdout  # refused before anything was timed
