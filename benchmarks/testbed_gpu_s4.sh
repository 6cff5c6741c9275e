#!/bin/bash
# One GPU call of the session-4 testbed training: a DiT training session (benchmarks/testbed_train.py, stage dit,
# high-noise sigma share), then the dense quality eval of the exported weights (64 held-out captions, 256x256x16),
# everything packed under $OUT as 15 MB tar parts (the device returns at most 8 files of 16 MiB).
#
# Usage, from the repo root on the device machine (diffusers wheel in .whl/):
#   bash benchmarks/testbed_gpu_s4.sh MINUTES TOTAL_MINUTES NAME [HIGH_SIGMA_SHARE] [DIRECTION_CONTRAST]
# Resumes from .runs/tb: the full optimizer state when ckpt.pt is there (a warm machine of the previous call), the
# exported weights alone when only .runs/tb/export travelled (carry it), else the shipped dit_accel/testbed/weights.
set -u
MIN=$1; TOTAL=$2; NAME=$3; SHARE=${4:-0.3}; CONTRAST=${5:-0}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
RUN=.runs/tb
if [ -f $RUN/export/model_index.json ]; then RESUME=$RUN; else RESUME=dit_accel/testbed/weights; fi
echo "resume from $RESUME (ckpt.pt present: $([ -f $RUN/ckpt.pt ] && echo yes || echo no))"
R=/tmp/$NAME; mkdir -p $R $RUN
pack() { rm -f $OUT/$NAME.tar.*; tar cf - -C $R . | split -b 15m - $OUT/$NAME.tar.; }
timeout $(( ${MIN%.*} * 60 + 150 )) python3 benchmarks/testbed_train.py --stage dit --out $RUN --resume $RESUME \
  --minutes $MIN --total-minutes $TOTAL --high-sigma-share $SHARE --direction-contrast $CONTRAST \
  > $R/train_stdout.txt 2>&1
echo "train exit $?"; grep -E '"dit_session"|exported|Error|error' $R/train_stdout.txt | tail -n 4
cp -r $RUN/export $R/export; cp $RUN/loss_log.jsonl $R/
pack
timeout 120 python3 benchmarks/testbed_quality.py --weights $RUN/export --sections eval --out $R \
  --name testbed_quality_$NAME > $R/quality_stdout.txt 2>&1
echo "quality exit $?"; tail -n 3 $R/quality_stdout.txt
python3 - "$R/testbed_quality_$NAME.json" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print("generated", {k: round(v, 3) for k, v in d["eval"]["generated"].items()})
except Exception as exc:  # the tail of the call's output is all we see: say what is missing
    print("no quality json:", exc)
EOF
pack
ls -la $OUT
