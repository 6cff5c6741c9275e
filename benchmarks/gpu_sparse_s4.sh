#!/bin/bash
# One GPU call for issue 5's open items (sparse_NOTES.md, session 4), at the Wan2.1-1.3B 480p (32,760 tokens) and
# Wan2.1-14B 720p (75,600 tokens) attention shapes, cuDNN dense timed in the same process:
#  1. the planning share of the sparse call after the session-3 plan polish: draft/balanced planned every call,
#     combo-reuse/balanced (the presets' setting) on a refresh call, a reuse call and amortised over 50 steps, and
#     the breakdown of a refresh plan (map / selection / BlockMask) -- the command of sparse_speed_gpu_s4_polish;
#  2. each shipped preset's sparse attention call at the density the testbed calibration gave its sparse calls
#     (`preset` rows: plan amortised as the presets run it + tokens in tile order once per forward + our kernel at
#     that density, vs cuDNN dense), and fixed-density kernel rows 0.9..0.3 to read other densities off.
# The exact-mass calibration timing is skipped (~11 s at 14B, off in every preset). One process per shape, each
# under `timeout` (SIGTERM makes sparse_speed.py write the rows it has, "complete": false); ~2-3 min expected on an
# H100 or H200, 6 min at most. Writes 4 files under $OUT: sparse_speed_gpu_s4_presets_{13b,14b}.{json,log}.
#
# Usage, from the repo root on the device machine (diffusers wheel in .whl/):
#   bash benchmarks/gpu_sparse_s4.sh ["<densities>"]
# <densities> (default: the committed eval report below) are the presets' SPARSE-CALL densities on the testbed:
#   a `dit-accel eval` report.json (the sparse calls' mean is derived from its attention_summary), or
#   "quality=0.68,balanced=0.62,fast=0.56,turbo=0.455", or four numbers in the order quality,balanced,fast,turbo.
#   Not the README presets table's 0.79/0.78/0.74/0.68: those are means over all self-attention calls, with the
#   safety valves' dense calls (a third of the testbed's) counting 1.0.
# EXTRA_ARGS is appended to both runs (a CPU smoke test of this script: EXTRA_ARGS="--tiny --device cpu --reps 2").
set -u
DENS=${1:-benchmarks/results/eval_gpu_presets_v3_s4/report.json}
OUT=${OUT:-/tmp/gpu_sparse_s4_out}
mkdir -p "$OUT"
if ! ls .whl/diffusers-*.whl > /dev/null 2>&1; then echo "no diffusers wheel in .whl/: nothing run"; exit 2; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader 2> /dev/null || echo "no nvidia-smi"
COMMON=(--labels draft/balanced,combo-reuse/balanced --breakdown --skip-calibrate
        --fixed-densities 0.9,0.8,0.7,0.6,0.5,0.4,0.3 --preset-densities "$DENS" --out "$OUT")
run() {  # NAME TIMEOUT_S SHAPE
  local start=$SECONDS
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of words
  timeout -k 15 "$2" python3 benchmarks/sparse_speed.py --shapes "$3" --name "$1" "${COMMON[@]}" ${EXTRA_ARGS:-} \
    > "$OUT/$1.log" 2>&1
  echo "$1: exit $? after $((SECONDS - start)) s"
  grep -E "Traceback|Error|error:|interrupted" "$OUT/$1.log" | tail -n 4
}
run sparse_speed_gpu_s4_presets_13b 150 wan2.1-1.3b-480p
run sparse_speed_gpu_s4_presets_14b 190 wan2.1-14b-720p
ls -la "$OUT"
python3 benchmarks/sparse_speed.py --summary "$OUT"/sparse_speed_gpu_s4_presets_*.json
