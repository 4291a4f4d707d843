#!/usr/bin/env bash
# One prepared GPU check for a lent accelerator (see bench/gpu_check.py for what it measures).
# Run from the repository root:  OUT=/some/dir bash bench/gpu_check.sh
# Needs: torch with CUDA. Optional: megatron-core wheel under .gpu_wheels/ (installed into a
# private target directory, no network), for the model sections.
set -u
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
SITE="$OUT/.site"
if ls .gpu_wheels/megatron_core-*.whl >/dev/null 2>&1; then
  python -m pip install --quiet --no-deps --no-index --target "$SITE" .gpu_wheels/megatron_core-*.whl \
    > "$OUT/pip.log" 2>&1 || echo "megatron-core wheel did not install (see pip.log)"
fi
export PYTHONPATH="$PWD:$SITE:${PYTHONPATH:-}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
timeout "${GPU_CHECK_TIMEOUT:-420}" python bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rm -rf "$SITE"
