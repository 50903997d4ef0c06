#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py's docstring says what it checks), on one H100/H200-class
# GPU in under 10 minutes: vLLM against lnkit's own greedy tokens on a Puzzle-like child and an LN-Super slice,
# BF16 vs FP8 decode throughput, 5 GRPO steps with vLLM rollouts and weight refits.
#
#   benchmarks/gpu_check.sh [options]        # options go to gpu_check.py (--help); summary in runs/gpu_check.json
#
# Python: $PYTHON, else .venv/bin/python, else python3. Exit status: gpu_check.py's (0 all passed, 1 a section
# failed, 2 no CUDA or no vLLM), 124 if the 10-minute timeout killed it. On a CPU machine run
# `python benchmarks/gpu_check.py --dry-run` instead.
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU (nvidia-smi missing or failing); on a CPU run: $PY benchmarks/gpu_check.py --dry-run" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! "$PY" -c 'import vllm' >/dev/null 2>&1; then
    echo "gpu_check: vLLM is not installed for $PY; install the gpu extra: $PY -m pip install -e '.[gpu]'" >&2
    echo "  (vLLM pins its own torch and transformers<5.21; lnkit works with both)" >&2
    exit 2
fi

status=0
timeout --kill-after=15 600 "$PY" benchmarks/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "gpu_check: stopped by the 10-minute timeout; the summary holds the jobs that finished" >&2
fi
exit "$status"
