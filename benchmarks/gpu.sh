#!/usr/bin/env bash
# The GPU benchmark in one go (benchmarks/gpu.py: every option, what each row measures); --dry runs the same code
# paths on the CPU with a tiny CLIP (tests/test_benchmarks_gpu.py, so CI keeps it working).
#
#   bash benchmarks/gpu.sh [--out benchmarks/results/gpu_h200.json] [--budget_s 410] [--rows NAME ...]
#   bash benchmarks/gpu.sh --dry --out /tmp/gpu_dry.json
#
# Python: $PYTHON (default python3). Needs jax (with its CUDA plugin), flax, optax, torch, transformers, tokenizers,
# regex, numpy, scipy; and ml-collections (configs/base.py), ftfy and wcwidth (the CLIP tokenizer). On a machine
# that lacks the last three and cannot download, bring them as wheels (pure Python but wcwidth's, manylinux x86_64
# for CPython 3.12; 0.9 MB in all), fetched where pip can reach PyPI, in the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     ml-collections==1.1.0 ftfy==6.3.1 wcwidth==0.9.4
#
# and on the GPU machine, from the repository root (results under $OUT):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site; nvidia-smi; \
#     PYTHONUNBUFFERED=1 bash benchmarks/gpu.sh --out $OUT/gpu_h200.json 2>&1 | tee $OUT/log.txt
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
