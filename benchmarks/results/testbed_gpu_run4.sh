#!/bin/bash
# GPU call "run4" of the testbed engineer (session 2): retrain the colour-slot attribute classifier, measure its
# ceiling on real held-out videos, then the quality eval (64 held-out captions, 256x256x16) and the attention
# structure on the DiT weights of d8170a3 (8,542 steps).
# Usage on the device: bash benchmarks/results/testbed_gpu_run4.sh MINUTES [NAME] [ATTENTION 1|0]
# run4: MINUTES=4 (first colour-slot classifier); run5: MINUTES=4.5 run5 0 (tied slot heads + track MLP).
MIN=${1:-4}; NAME=${2:-run4}; ATT=${3:-1}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
R=/tmp/$NAME; mkdir -p $R; rm -rf .runs/clf
pack() { tar cf - -C $R . | split -b 15m - $OUT/$NAME.tar.; }
timeout 420 python3 benchmarks/testbed_train.py --stage classifier --out .runs/clf --classifier-minutes $MIN > $R/classifier_stdout.txt 2>&1
tail -n 6 $R/classifier_stdout.txt
cp -r .runs/clf/export/classifier $R/ && cp .runs/clf/classifier_ceiling.json .runs/clf/loss_log.jsonl $R/
pack
rm -rf /tmp/w && cp -r dit_accel/testbed/weights /tmp/w && rm -rf /tmp/w/classifier && cp -r .runs/clf/export/classifier /tmp/w/classifier
timeout 150 python3 benchmarks/testbed_quality.py --weights /tmp/w --sections eval --out $R --name testbed_quality_s2 2>&1 | tail -n 4
rm -f $OUT/$NAME.tar.*; pack
[ "$ATT" = 1 ] && timeout 200 python3 benchmarks/testbed_attention_structure.py --num-prompts 4 --out $R/testbed_attention_structure_s2.json 2>&1 | tail -n 6
rm -f $OUT/$NAME.tar.*; pack
ls -la $R $OUT
