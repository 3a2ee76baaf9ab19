#!/usr/bin/env bash
# llama.cpp for the anchor script on CPUs with AMX: the same source and flags as ../shared/anchors/llamacpp.sh,
# minus ggml's AMX buffer type, with which every q8_0 run of a dsv3 checkpoint aborts while its context is created
# (ggml-backend.cpp:1294: GGML_ASSERT(*cur_backend_id != -1)). bf16 runs the same either way (docs/benchmarks.md).
#
#   bash scripts/llamacpp_without_amx.sh          then     LLAMACPP_DIR=~/.cache/dsv3-llamacpp-noamx dsv3 bench --llamacpp ...
#
# Env: LLAMACPP_DIR (default ~/.cache/dsv3-llamacpp-noamx), PY (a python with pip; default .venv/bin/python).
set -euo pipefail
L=${LLAMACPP_DIR:-$HOME/.cache/dsv3-llamacpp-noamx}
PY=${PY:-.venv/bin/python}
VERSION=0.3.36          # the anchor script's llama-cpp-python sdist (llama.cpp commit 0c1e570)
SRC=$L/llama_cpp_python-$VERSION/vendor/llama.cpp
mkdir -p "$L"
if [[ ! -d $SRC ]]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$L/dl"
  tar -xzf "$L/dl/llama_cpp_python-$VERSION.tar.gz" -C "$L"
fi
# GGML_NATIVE=ON would turn AMX on with the rest of this CPU's ISA: name the ISA explicitly instead.
cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_OPENMP=ON \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF >/dev/null
cmake --build "$SRC/build" --target llama-bench llama-batched-bench llama-completion -j"$(nproc)" >/dev/null
echo "llama.cpp without AMX in $SRC/build/bin; use LLAMACPP_DIR=$L"
