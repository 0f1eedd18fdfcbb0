#!/usr/bin/env bash
# The GPU check on a fresh GPU machine, from the repository root: ./benchmarks/gpu_check.sh [OUT_DIR] (docs/gpu.md)
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" benchmarks/gpu_check.py --out "${1:-gpu_check_out}" "${@:2}"
