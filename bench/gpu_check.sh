#!/usr/bin/env bash
# The prepared GPU check of the FP8 path and the GEMM backends (what it measures:
# bench/gpu_check.py's docstring; issue 14's checks (1)-(4) run first).
#
#   bash bench/gpu_check.sh                 # from the repository root; results under "$OUT"
#   GPU_CHECK_BUDGET=120 bash bench/gpu_check.sh --sections torch_backend_gemms,gemm_throughput
#   bash bench/gpu_check.sh --dry-run       # CPU rehearsal, small shapes (the test suite runs it)
#
# Needs torch with CUDA only (megatron-core and Transformer Engine are not required). If a
# megatron-core wheel was carried under $GPU_CHECK_WHEELS (default .gpu_wheels/), it is installed
# into a temporary directory (no network) and the model sections run too (the full-width layer,
# 50 training steps, the tiny model on the device, training-step throughput). Sections start while
# GPU_CHECK_BUDGET seconds (default 300) last; the whole run is killed after GPU_CHECK_TIMEOUT
# seconds (default 390), well inside an 8-minute call. results.json is rewritten after every
# section, so a killed run still leaves what it measured.
set -u
cd "$(dirname "$0")/.."
PY="$(command -v python3 || command -v python)"  # python3: the device image's interpreter with torch
for arg in "$@"; do  # --help: the options, nothing set up or written
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then exec "$PY" bench/gpu_check.py --help; fi
done
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT" || { echo "[gpu_check] cannot create OUT=$OUT" >&2; exit 2; }
SITE="$(mktemp -d)"  # outside $OUT: nothing of it travels back
trap 'rm -rf "$SITE"' EXIT
echo "[gpu_check] $(date -u +%H:%M:%S) python: $PY; out: $OUT"
WHEELS="${GPU_CHECK_WHEELS:-.gpu_wheels}"
if ls "$WHEELS"/megatron_core-*.whl >/dev/null 2>&1; then
  echo "[gpu_check] installing the carried megatron-core wheel (optional model sections)"
  "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "$WHEELS"/megatron_core-*.whl \
    > "$OUT/pip.log" 2>&1 || echo "[gpu_check] megatron-core wheel did not install (see pip.log)"
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "[gpu_check] nvidia-smi unavailable"
timeout -k 10 "${GPU_CHECK_TIMEOUT:-390}" "$PY" -u bench/gpu_check.py --out "$OUT" \
  --budget "${GPU_CHECK_BUDGET:-300}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
echo "[gpu_check] $(date -u +%H:%M:%S) exit code $rc; results in $OUT (results.json, summary.md)"
exit "$rc"
