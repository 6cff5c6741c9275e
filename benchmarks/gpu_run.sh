#!/usr/bin/env bash
# One GPU entry point for every study under benchmarks/ (and the testbed's training): installs the wheels the GPU
# machine lacks, then runs STUDY's script with the arguments that produced its committed result.
#
#   bash benchmarks/gpu_run.sh STUDY [EXTRA ARGS...]        # from the repository root, on the GPU machine
#   bash benchmarks/gpu_run.sh list                          # the studies and their commands
#
# Before: on the CPU machine, `bash ../shared/tools/gpu-wheels.sh` (or any way to get diffusers 0.42.1 and the
# optional peers xformers, sageattention, cache-dit as wheels) fills .whl/, which travels with the working tree.
# Results go to $OUT (the device machine's returned folder) when it is set, else to benchmarks/results/.
# EXTRA ARGS are appended to the study's command (e.g. `--tiny --device cpu` for a CPU smoke run of the plumbing).
# Every command runs under `timeout` (TIMEOUT_S, default 560 s): the device takes at most 10 minutes per call,
# and the scripts that handle SIGTERM write the rows they have.
set -uo pipefail
STUDY=${1:-list}
shift || true
OUT=${OUT:-benchmarks/results}
TIMEOUT_S=${TIMEOUT_S:-560}
mkdir -p "$OUT"

setup() {
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
  else
    echo "gpu_run: no wheels in .whl/ (fine where diffusers is installed)" >&2
    export PYTHONPATH=$PWD
  fi
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader 2> /dev/null || echo "gpu_run: no nvidia-smi" >&2
}

run() {  # the command, under timeout, echoed first
  echo "+ $*"
  timeout -k 15 "$TIMEOUT_S" "$@"
  local rc=$?
  echo "gpu_run: exit $rc"
  return $rc
}

# The eval report whose per-preset densities the sparse_speed preset rows are timed at.
PRESET_REPORT=benchmarks/results/eval_presets_gpu/report.json

case "$STUDY" in
  list)
    sed -n '/^  [a-z0-9_]*)$/{s/)//;s/^  //;p}' "$0" | grep -v '^list$\|^\*$'
    exit 0 ;;
  attention_kernel)
    setup; run python3 benchmarks/attention_kernel.py --check --sweep --full --out "$OUT" "$@" ;;
  attention_kernel_fp8)
    # the 8-bit path: checks, launch sweep, the device cost table (cost_table.json), the full grid vs cuDNN
    setup; run python3 benchmarks/attention_kernel_fp8.py --check --sweep --cost --full --out "$OUT" "$@" ;;
  fp8_accuracy)
    # the 8-bit path's error vs float32 (torch reference and Triton kernel) on random q/k/v at issue 17's shapes
    # (256 query blocks of each against all keys) and on the testbed's captured q/k/v at 256x256 x 16, 20 steps
    setup; run python3 benchmarks/fp8_accuracy.py --device cuda --shapes 12x32760x128,12x32760x64,40x75600x128 \
      --random-query-blocks 64 --num-steps 20 --steps 0,5,10,15,19 --layers 0,1,2,3,4,5 --query-blocks 0 \
      --out "$OUT/fp8_accuracy.json" "$@" ;;
  bench)
    # the eight models at real size, one call (about 9 minutes)
    setup; run python3 -m dit_accel.bench --time-budget-s 500 --out "$OUT/bench.json" "$@" ;;
  bench_testbed)
    setup; run python3 -m dit_accel.bench --testbed-quality --out "$OUT/presets_testbed.json" "$@" ;;
  adaptive_testbed)
    # issue 23's testbed criteria in one call (< 9 minutes on an H200): the presets (presets_testbed.json), then
    # calibration to 30 dB on 8 prompts twice + 16 held-out (calibration_testbed.json) and fp8 vs bf16 (fp8_testbed.json)
    setup
    TIMEOUT_S=150 run python3 -m dit_accel.bench --testbed-quality --out "$OUT/presets_testbed.json"
    TIMEOUT_S=360 run python3 benchmarks/adaptive_testbed.py --device cuda --time-budget 90 --out-dir "$OUT" --no-progress "$@" ;;
  attention_kernel_permuted)
    setup; run python3 benchmarks/attention_kernel_permuted.py --check --time --out "$OUT" "$@" ;;
  caching_compare)
    setup; run python3 benchmarks/caching_compare.py --out "$OUT/caching_compare.json" "$@" ;;
  combined_quality)
    setup; run python3 benchmarks/combined_quality.py --out-dir "$OUT" "$@" ;;
  compile_check)
    # Wan2.1-1.3B 480p compiled vs eager, dynamo counters; split with --variants if it nears the time limit
    setup; run python3 benchmarks/compile_check.py --out "$OUT/compile_check.json" "$@" ;;
  dense_backends)
    setup; run python3 benchmarks/dense_backends.py --out "$OUT" "$@" ;;
  draft_map_tune)
    setup; run python3 benchmarks/draft_map_tune.py --out "$OUT" --then-sparse-speed "$@" ;;
  e2e_speed)
    setup; run python3 benchmarks/e2e_speed.py --out "$OUT" "$@" ;;
  eval_presets)
    setup; run python3 -m dit_accel.eval --model testbed --config dense --config preset:quality \
      --config preset:balanced --config preset:fast --config preset:turbo --height 256 --width 256 --frames 16 \
      --steps 20 --num-prompts 16 --warmup 1 --device cuda --flow block --no-progress --output "$OUT/eval_presets_gpu" "$@" ;;
  overhead_probe)
    setup; run python3 benchmarks/overhead_probe.py --out "$OUT/overhead_probe.json" "$@" ;;
  sparse_quality)
    setup; run python3 benchmarks/sparse_quality.py --out "$OUT" "$@" ;;
  sparse_speed)
    # Each shipped preset's sparse attention call at its testbed sparse-call density, the planning breakdown and
    # fixed-density rows, cuDNN dense in the same process; one process per Wan shape (each within the time limit).
    setup
    common=(--labels draft/balanced,combo-reuse/balanced --breakdown --skip-calibrate
            --fixed-densities 0.9,0.8,0.7,0.6,0.5,0.4,0.3 --preset-densities "$PRESET_REPORT" --out "$OUT")
    TIMEOUT_S=200 run python3 benchmarks/sparse_speed.py --shapes wan2.1-1.3b-480p --name sparse_speed_presets_wan13b \
      "${common[@]}" "$@"
    TIMEOUT_S=260 run python3 benchmarks/sparse_speed.py --shapes wan2.1-14b-720p --name sparse_speed_presets_wan14b \
      "${common[@]}" "$@"
    python3 benchmarks/sparse_speed.py --summary "$OUT"/sparse_speed_presets_wan1*.json ;;
  testbed_attention_structure)
    setup; run python3 benchmarks/testbed_attention_structure.py --out "$OUT/testbed_attention_structure.json" "$@" ;;
  testbed_motion_probe)
    setup; run python3 benchmarks/testbed_motion_probe.py --seeds 4 --out "$OUT/testbed_motion_probe.json" "$@" ;;
  testbed_quality)
    setup; run python3 benchmarks/testbed_quality.py --sections eval,large --out "$OUT" "$@" ;;
  train_testbed)
    # One DiT training call resumed from the shipped weights (or from .runs/tb when it travelled), then the dense
    # quality of the exported weights; the weights come back as 15 MB tar parts (the device returns at most 8
    # files of 16 MiB). Arguments: MINUTES TOTAL_MINUTES [more train_testbed.py options].
    setup
    minutes=${1:?train_testbed needs MINUTES TOTAL_MINUTES}; total=${2:?train_testbed needs MINUTES TOTAL_MINUTES}
    shift 2
    runs=.runs/tb
    if [ -f $runs/export/model_index.json ]; then resume=$runs; else resume=dit_accel/testbed/weights; fi
    TIMEOUT_S=$(( ${minutes%.*} * 60 + 150 )) run python3 training/train_testbed.py --stage dit --out $runs \
      --resume $resume --minutes "$minutes" --total-minutes "$total" "$@"
    TIMEOUT_S=150 run python3 benchmarks/testbed_quality.py --weights $runs/export --sections eval --out "$OUT"
    cp $runs/loss_log.jsonl "$OUT/"
    tar cf - -C $runs export | split -b 15m - "$OUT/export.tar." ;;
  *)
    echo "gpu_run: unknown study '$STUDY'; one of:" >&2
    bash "$0" list >&2
    exit 2 ;;
esac
