#!/usr/bin/env bash
# The GPU path in one call (bench/gpu_check.py): extract + apply of 256 synthetic 1024x2048 images
# through Ray Data, ViT-B/14 + Segment_TR shapes in bf16, and what it prints. --cpu-smoke: tiny, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec timeout 480 "$PYTHON" -m bench.gpu_check "$@"
