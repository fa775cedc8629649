#!/usr/bin/env bash
# GPU verification in one device call (see ../.library/device): build hippo_ext for sm_90a against
# the machine's own torch, then run the requested phases and leave logs under $OUT.
#   scripts/gpu_check.sh build tests bench      # the test suite (one process per file) + microbenchmarks
#   scripts/gpu_check.sh toolchain build probe  # compilers seen; does an op's C++ error reach Python
#   scripts/gpu_check.sh sanitize               # compute-sanitizer memcheck + racecheck on CUDA tests
#   scripts/gpu_check.sh build profile          # runtime step breakdown, decode_attention split sweep
#   scripts/gpu_check.sh build runtime          # runtime step times (bench_runtime.py --quick)
#   scripts/gpu_check.sh build fast runtime     # CUDA tests of the step's ops and the runtime, then
#                                               # runtime step times (RUNTIME_VARIANTS picks columns)
#   scripts/gpu_check.sh build attention        # decode_attention microbenchmark against SDPA
#   scripts/gpu_check.sh build gemm             # decode-width GEMMs: cuBLAS, the FMA kernel, fused ops
#   scripts/gpu_check.sh build ncu              # Nsight Compute on decode_attention's split kernel
#   scripts/gpu_check.sh build speculative      # HIPPO decoding: CUDA tests, time per round
#   scripts/gpu_check.sh build speculative_tests  # ... its CUDA tests alone
#   scripts/gpu_check.sh build e2e              # hippo demo and hippo bench --preset 7b (short sweep)
#   scripts/gpu_check.sh build fast ptx         # ... then the CUDA tests again on PTX compiled by the
#                                               # driver (what Blackwell runs); rebuilds: run it last
# What comes back: the device tool returns at most 8 files from $OUT, so $OUT holds two:
# summary.txt (everything this script prints) and logs.tgz (every log, JSON and table, kept in
# $LOGS and packed again after each phase, so a run cut short keeps what the finished phases
# wrote). Each phase prints its wall time. A failing phase sets the exit status; only a failed
# or unusable build stops the phases after it.
# Knobs: OUT (/tmp/hippo_out), LOGS (a new /tmp folder), TEST_TIMEOUT (s per test file),
# SANITIZE_FILES, SANITIZE_SELECT and RACECHECK_SELECT (-k selections among their -m cuda
# tests), SANITIZE_TIMEOUT (s per tool), RUNTIME_ARGS, RUNTIME_TIMEOUT, ATTENTION_KNOBS
# (';'-separated env settings, e.g. "HIPPO_DECODE_ATTENTION_STAGES=2": the hippo rows again under
# each), ATTENTION_TIMEOUT, GEMM_TIMEOUT, BUILD_TIMEOUT, SPECULATIVE_ARGS, SPECULATIVE_TIMEOUT,
# E2E_ARGS.
set -uo pipefail
PHASES="build toolchain probe tests fast ptx bench sanitize profile attention gemm ncu speculative
speculative_tests runtime e2e"
usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; echo "Phases: "$PHASES; }
case " ${*:--h} " in *" -h "*|*" --help "*) usage; exit 0 ;; esac
# Every phase named is checked before any runs: a misspelt last phase found after the build and
# the tests would have spent their device time for nothing.
for phase in "$@"; do
  [[ " "$(echo $PHASES)" " == *" $phase "* ]] || { echo "unknown phase $phase"; usage; exit 2; }
done
OUT=${OUT:-/tmp/hippo_out}
LOGS=${LOGS:-$(mktemp -d /tmp/hippo_logs.XXXXXX)}
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
PY=python3
PYTEST="$PY -m pytest -p no:cacheprovider"
status=0

fail() { echo "FAILED: $*"; status=1; }

pack() {  # every log into one file of $OUT, replaced whole (a run cut mid-pack keeps the last)
  tar czf "$OUT/logs.tgz.part" -C "$LOGS" . && mv -f "$OUT/logs.tgz.part" "$OUT/logs.tgz"
}

# The CUDA tests of several files at once, one process each (correctness only: sharing the GPU
# costs nothing), then one line per file. $1: extra pytest options.
run_parallel_cuda_tests() {
  local extra=$1 f; shift
  for f in "$@"; do
    timeout "${TEST_TIMEOUT:-300}" $PYTEST "tests/$f.py" -rfE -q $extra -m cuda >"$LOGS/$f.log" 2>&1 &
  done
  wait
  for f in "$@"; do
    echo "$f: $(tail -1 "$LOGS/$f.log")"; grep -E "^(FAILED|ERROR)|Error:|near-tie" "$LOGS/$f.log" | head -8
    # a summary line without failures, or the file failed (a timeout leaves no summary line)
    if ! tail -1 "$LOGS/$f.log" | grep -qE "(passed|skipped|deselected)" \
        || tail -1 "$LOGS/$f.log" | grep -qE "[0-9]+ (failed|error)"; then
      fail "$f"
    fi
  done
}

main() {
for phase in "$@"; do
  echo "=== $phase $(date -u +%H:%M:%S)"
  started=$SECONDS
  case "$phase" in
    build)
      # Seen on the lent H100/H200 image (2026-11-26): an extension built with its CXX
      # (/opt/gcc/bin/g++, a wrapper) segfaults whenever an op raises a C++ error; the system
      # g++ of the same version works. Prefer the system compiler.
      if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
      $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
      if ! timeout "${BUILD_TIMEOUT:-480}" $PY setup.py build_ext --inplace >"$LOGS/build.log" 2>&1; then
        grep -E "error|Error" "$LOGS/build.log" | head -40; pack; return 1
      fi
      # Without CUDA kernels for this GPU the runtime quietly runs HF's modules and SDPA, and
      # every timing after this would measure those: stop here instead.
      $PY -c "
import sys, hippo_ext
reason = hippo_ext.kernels_unsupported('cuda')
print('cuda kernels built:', hippo_ext.cuda_kernels_built(), '| run here:', reason or 'yes')
sys.exit(reason is not None)" || { echo "BUILD UNUSABLE"; pack; return 1; }
      ;;
    toolchain)
      echo "CC=${CC:-} CXX=${CXX:-}"; which -a gcc g++ c++ | tr '\n' ' '; echo
      for c in $(which -a g++ c++ | sort -u) ${CXX:-}; do echo "$c: $($c --version | head -1)"; done
      $PY -c "import torch; print(torch.__config__.show())" | grep -iE "gcc|compiler" | head -3
      ;;
    probe)
      # A C++ error raised by an op must reach Python as a RuntimeError (on CPU and on CUDA).
      $PY - <<'PY' || fail probe
import torch, hippo_ext
for dev in ("cpu", "cuda"):
    try:
        hippo_ext.kv_compact_(torch.zeros(1, device=dev), torch.zeros(1, dtype=torch.long, device=dev))
    except RuntimeError as e:
        print(dev, "raised RuntimeError:", str(e).splitlines()[0][:100])
PY
      ;;
    tests)
      # One process per file, so that a crash in one file cannot hide the others' results.
      for f in tests/test_*.py; do
        name=$(basename "$f" .py)
        # The packaging and build-system tests (sdist, CMake builds) need no GPU, and the
        # microbenchmarks' smoke test would time the full GPU shapes: CI runs both; `bench`
        # runs the microbenchmarks here.
        case "$name" in test_build|test_microbenchmarks) continue ;; esac
        timeout "${TEST_TIMEOUT:-150}" $PYTEST "$f" -rfE -v >"$LOGS/$name.log" 2>&1
        code=$?; echo "$name exit $code: $(tail -1 "$LOGS/$name.log")"
        [ $code = 0 ] || [ $code = 5 ] || fail "$name"
        grep -E "^(FAILED|ERROR)|Fatal" "$LOGS/$name.log" | head -10; grep -B1 "Fatal" "$LOGS/$name.log" | head -2
        if grep -q "Fatal Python error" "$LOGS/$name.log"; then  # rerun without the error-path tests
          timeout "${TEST_TIMEOUT:-150}" $PYTEST "$f" -rfE -v -k "not bad and not reject and not mismatch and not device_mix and not unsupported" >"$LOGS/${name}_noerr.log" 2>&1
          echo "$name (no error-path tests) exit $?: $(tail -1 "$LOGS/${name}_noerr.log")"
          grep -E "^(FAILED|ERROR)|Fatal" "$LOGS/${name}_noerr.log" | head -10
        fi
      done
      ;;
    fast)
      # The CUDA tests of everything a runtime step runs (and of the other ops: selection,
      # verification, compaction; GPU preprocessing; a pipeline used inside inference mode),
      # one process per file, all at once (correctness only, so sharing the GPU costs nothing;
      # no timing phase runs beside them). Every other file with CUDA tests is `speculative`'s.
      run_parallel_cuda_tests "" test_normalization test_activation test_rotary_embedding \
        test_linear test_fused_linear test_decode_attention test_runtime test_video_llm_ar \
        test_token_selection test_verification test_kv_compaction test_device_support \
        test_pipeline test_preprocess_vs_hf test_torch_state
      ;;
    ptx)
      # The code a Blackwell GPU runs: the compute_80 PTX of the default build, compiled by the
      # driver (an sm_80 cubin cannot run on a 9.x GPU either, so a PTX-only build exercises that
      # path here, PDL off as on Blackwell). Rebuilds in place: run it last.
      if ! TORCH_CUDA_ARCH_LIST="8.0+PTX" timeout "${BUILD_TIMEOUT:-480}" $PY setup.py build_ext \
          --inplace >"$LOGS/build_ptx.log" 2>&1; then
        grep -E "error|Error" "$LOGS/build_ptx.log" | head -20; fail "ptx build"; pack; continue
      fi
      $PY -c "import hippo_ext; print('kernels do not run here:', hippo_ext.kernels_unsupported('cuda') or 'no, they do')"
      for f in test_decode_attention test_video_llm_ar test_verification test_device_support; do
        timeout "${TEST_TIMEOUT:-300}" $PYTEST "tests/$f.py" -rfE -q -m cuda -x >"$LOGS/ptx_$f.log" 2>&1 \
          || fail "ptx $f"
        echo "ptx $f: $(tail -1 "$LOGS/ptx_$f.log")"; grep -E "^(FAILED|ERROR)|Error:" "$LOGS/ptx_$f.log" | head -8
      done
      ;;
    bench)
      $PYTEST benchmarks --benchmark-only -q --benchmark-json "$LOGS/bench.json" \
        --benchmark-columns=median,iqr,rounds 2>&1 | tee "$LOGS/bench.log" | tail -5 || fail bench
      $PY benchmarks/report.py "$LOGS/bench.json" | tee "$LOGS/bench.md"
      ;;
    sanitize)
      # The CUDA-marked tests (-m cuda; a -k "cuda" also matched CPU tests named cuda_* and
      # test_build's CMake build) of the kernels' own files, without graph captures and the full
      # model shapes: every launch is many times slower under the tools.
      files=${SANITIZE_FILES:-"tests/test_normalization.py tests/test_activation.py tests/test_rotary_embedding.py tests/test_linear.py tests/test_fused_linear.py tests/test_decode_attention.py tests/test_token_selection.py tests/test_verification.py tests/test_kv_compaction.py"}
      for tool in memcheck racecheck; do
        sel=${SANITIZE_SELECT:-"not graph and not model_shapes and not model_vocab"}
        [ "$tool" = racecheck ] && sel=${RACECHECK_SELECT:-$sel}
        timeout "${SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 99 \
          --print-limit 20 $PYTEST $files -q -x -m cuda -k "$sel" >"$LOGS/sanitize_$tool.log" 2>&1
        code=$?; echo "$tool exit code: $code"; [ $code = 0 ] || fail "$tool"
        grep -E "ERROR SUMMARY|passed|failed" "$LOGS/sanitize_$tool.log" | tail -3
      done
      ;;
    profile)
      # Where the runtime's steps spend GPU time (decode vs verify), and decode_attention's
      # sensitivity to the split length: the open questions in benchmarks/RESULTS.md.
      for model in 7b 0.5b; do
        PYTHONPATH=python:. $PY benchmarks/profile_runtime_step.py --model $model --tokens 1,9 \
          2>&1 | tee "$LOGS/profile_$model.txt" | grep -E "^##|Name|gemm|gemv|decode_attention|Self CUDA" | head -40
      done
      # Skinny GEMMs: cuBLAS vs skinny_linear at M = 1, 5, 9, 17 against the weight floor
      $PYTEST benchmarks/bench_linear.py --benchmark-only -q --benchmark-json "$LOGS/linear.json" >/dev/null 2>&1
      $PY benchmarks/report.py "$LOGS/linear.json" | cut -d'|' -f2,5,6,7
      # The norm / gating inside the GEMM (one kernel) against add_rms_norm or silu_and_mul + cuBLAS
      $PYTEST benchmarks/bench_fused_linear.py --benchmark-only -q --benchmark-json "$LOGS/fused_linear.json" >/dev/null 2>&1
      $PY benchmarks/report.py "$LOGS/fused_linear.json" | cut -d'|' -f2,5,6,7
      for blocks in 3 16; do  # the skinny kernel's split plan (default 8 blocks per SM)
        HIPPO_SKINNY_BLOCKS_PER_SM=$blocks $PYTEST benchmarks/bench_linear.py --benchmark-only -q \
          -k hippo --benchmark-json "$LOGS/linear_b$blocks.json" >/dev/null 2>&1
        echo "skinny blocks/SM $blocks:"; $PY benchmarks/report.py "$LOGS/linear_b$blocks.json" | grep hippo | cut -d'|' -f2,5,7
      done
      # decode_attention's split plans and block shapes (default: balanced, 1 block/SM, 8 warps
      # for 2+ row tiles, wide registers)
      for knobs in "" HIPPO_DECODE_ATTENTION_WARPS=4 HIPPO_DECODE_ATTENTION_FUSED_MERGE=1 \
                   HIPPO_DECODE_ATTENTION_WIDE_REGISTERS=0 \
                   "HIPPO_DECODE_ATTENTION_WIDE_REGISTERS=0 HIPPO_DECODE_ATTENTION_WARPS=4" \
                   HIPPO_DECODE_ATTENTION_BLOCKS_PER_SM=2 \
                   HIPPO_DECODE_ATTENTION_BALANCED=0 HIPPO_DECODE_ATTENTION_CHUNK=512; do
        env $knobs $PYTEST benchmarks/bench_decode_attention.py --benchmark-only -q -k hippo \
          --benchmark-json "$LOGS/attention_knobs.json" >/dev/null 2>&1
        echo "decode_attention ${knobs:-default}:"
        $PY benchmarks/report.py "$LOGS/attention_knobs.json" | grep hippo | cut -d'|' -f2,5
      done
      ;;
    attention)
      # decode_attention at issue 3's shapes against SDPA (masked and at the exact length), in
      # one run; then its own rows under each ATTENTION_KNOBS setting
      timeout "${ATTENTION_TIMEOUT:-180}" $PYTEST benchmarks/bench_decode_attention.py \
        --benchmark-only -q --benchmark-json "$LOGS/attention.json" >"$LOGS/attention.log" 2>&1
      code=$?; echo "attention benchmark exit $code"; [ $code = 0 ] || fail attention
      $PY benchmarks/report.py "$LOGS/attention.json" | tee "$LOGS/attention.md"
      IFS=';' read -ra knob_list <<<"${ATTENTION_KNOBS:-}"
      n=0
      for knobs in "${knob_list[@]}"; do
        n=$((n + 1))
        env $knobs timeout "${ATTENTION_TIMEOUT:-180}" $PYTEST benchmarks/bench_decode_attention.py \
          --benchmark-only -q -k hippo --benchmark-json "$LOGS/attention_$n.json" \
          >"$LOGS/attention_$n.log" 2>&1 || fail "attention under $knobs"
        echo "decode_attention under $knobs (graph per call, us):"
        $PY benchmarks/report.py "$LOGS/attention_$n.json" | grep hippo | cut -d'|' -f2,5
      done
      ;;
    gemm)
      # The decode step's GEMMs at M = 1 (HIPPO_BENCH_ROWS overrides), in one run: cuBLAS, the
      # tensor-core and FMA kernels (planned K slices and one slice), and the fused ops against
      # the ops around cuBLAS
      HIPPO_BENCH_ROWS=${HIPPO_BENCH_ROWS:-1} timeout "${GEMM_TIMEOUT:-240}" $PYTEST \
        benchmarks/bench_linear.py benchmarks/bench_fused_linear.py --benchmark-only -q \
        --benchmark-json "$LOGS/gemm.json" >"$LOGS/gemm.log" 2>&1
      code=$?; echo "gemm benchmark exit $code"; [ $code = 0 ] || fail gemm
      $PY benchmarks/report.py "$LOGS/gemm.json" | tee "$LOGS/gemm.md"
      ;;
    ncu)
      # Nsight Compute on decode_attention's split kernel at the benchmark shapes: occupancy,
      # stall reasons, excess sectors (the numbers RESULTS.md's next steps rest on).
      PYTHONPATH=.:python timeout 150 ncu --clock-control none -k regex:split_kernel \
        --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SourceCounters $PY scripts/ncu_decode_attention.py >"$LOGS/ncu.txt" 2>&1
      code=$?; echo "ncu exit $code"; [ $code = 0 ] || fail ncu
      grep -E "split_kernel|Duration|DRAM Throughput|Warp Cycles Per Issued|Achieved Occupancy|excessive" "$LOGS/ncu.txt" | head -60
      ;;
    speculative_tests|speculative)
      # HIPPO decoding on the GPU: its CUDA tests (graphs, two streams, bf16 near-ties, sampling
      # distribution-exact), then (`speculative` only) time per round, sequential vs parallel,
      # at a 7B/0.5B agreement pair with 32 frames.
      run_parallel_cuda_tests "-s" test_speculative_cuda test_speculative_greedy \
        test_speculative_sampling test_preserve test_streaming test_stop_strings test_encoded_video \
        test_prefix_reuse
      if [ "$phase" = speculative ]; then
        PYTHONPATH=python:. timeout "${SPECULATIVE_TIMEOUT:-400}" $PY benchmarks/bench_speculative.py --preset 7b \
          --json "$LOGS/speculative.json" ${SPECULATIVE_ARGS:-} 2>&1 | tee "$LOGS/speculative.md" | tail -30 \
          || fail speculative
      fi
      ;;
    e2e)
      # hippo demo, then the end-to-end benchmark (7B/0.5B agreement pair, 32 frames, three
      # agreement levels; E2E_ARGS widens it, e.g. "--frames 32 64").
      PYTHONPATH=python:. timeout 120 $PY -m hippo demo 2>&1 | tee "$LOGS/demo.txt" | grep -vE "^methods"
      [ "${PIPESTATUS[0]}" = 0 ] || fail demo
      PYTHONPATH=python:. timeout 450 $PY -m hippo bench --preset 7b --frames 32 \
        --eps 0.002 0.006 0.02 ${E2E_ARGS:-} --out-dir "$LOGS/e2e" 2>&1 | tee "$LOGS/e2e.md" | tail -20 \
        || fail e2e
      ;;
    runtime)
      # RUNTIME_VARIANTS narrows the option columns, e.g. "GEMM prologues,no PDL"
      # (RUNTIME_ARGS adds options, e.g. "--no-hf"); the table is written as it fills, so a
      # timeout still leaves the rows measured so far.
      PYTHONPATH=python:. timeout "${RUNTIME_TIMEOUT:-420}" $PY benchmarks/bench_runtime.py --quick \
        ${RUNTIME_VARIANTS:+--variants "$RUNTIME_VARIANTS"} ${RUNTIME_ARGS:-} 2>&1 \
        | tee "$LOGS/runtime.md" | tail -25 || fail runtime
      ;;
    *) echo "unknown phase $phase"; pack; return 2 ;;
  esac
  echo "=== $phase took $((SECONDS - started)) s"
  pack
done
return $status
}

main "$@" 2>&1 | tee -a "$OUT/summary.txt"
exit "${PIPESTATUS[0]}"
