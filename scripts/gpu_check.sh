#!/usr/bin/env bash
# GPU verification in one device call (see ../.library/device): build hippo_ext for sm_90a against
# the machine's own torch, then run the requested phases and leave logs under $OUT.
#   scripts/gpu_check.sh build tests bench      # correctness + microbenchmarks
#   scripts/gpu_check.sh sanitize               # compute-sanitizer memcheck + racecheck on CUDA tests
set -uo pipefail
OUT=${OUT:-/tmp/hippo_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
PY=python3
PYTEST="$PY -m pytest -p no:cacheprovider"
status=0

for phase in "$@"; do
  echo "=== $phase $(date -u +%H:%M:%S)"
  case "$phase" in
    build)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
      $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
      if ! $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
        grep -E "error|Error" "$OUT/build.log" | head -40; exit 1
      fi
      $PY -c "import hippo_ext; print('cuda kernels built:', hippo_ext.cuda_kernels_built())"
      ;;
    tests)
      $PYTEST tests -q -rs 2>&1 | tee "$OUT/tests.log" | grep -vE "^\s*$" | tail -40 || status=1
      ;;
    bench)
      $PYTEST benchmarks --benchmark-only -q --benchmark-json "$OUT/bench.json" \
        --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | tail -5
      $PY benchmarks/report.py "$OUT/bench.json" | tee "$OUT/bench.md"
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        sel=${SANITIZE_SELECT:-"cuda and not graph"}
        [ "$tool" = racecheck ] && sel=${RACECHECK_SELECT:-$sel}
        compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
          $PYTEST tests -q -x -k "$sel" >"$OUT/sanitize_$tool.log" 2>&1
        echo "$tool exit code: $?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
      done
      ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
exit $status
