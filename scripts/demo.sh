#!/usr/bin/env bash
# The embedded-default main job on Fashion-MNIST (h = 5 classes per task):
# split, train one small WRN teacher on its 5 classes, then measure cross-task transfer:
# NCM accuracy on the other 5 classes with the teacher's embedding vs a random network's.
set -euo pipefail
cd "$(dirname "$0")/.."
R=refilled
OUT=runs/demo
SEED=${SEED:-0}
EPOCHS=${EPOCHS:-8}
PER_CLASS=${PER_CLASS:-1000}
.venv/bin/$R split --dataset fashion-mnist --ratio 0 --seed "$SEED" --classes-per-task 5 --out "$OUT/split_r0_seed$SEED.json"
if [ ! -f "$OUT/teacher_seed$SEED/summary.json" ]; then
  .venv/bin/$R train-teacher --split "$OUT/split_r0_seed$SEED.json" --arch wrn-16-2 --epochs "$EPOCHS" \
    --per-class "$PER_CLASS" --seed "$SEED" --profile demo --out "$OUT/teacher_seed$SEED"
fi
.venv/bin/$R ncm --split "$OUT/split_r0_seed$SEED.json" --task student --model "$OUT/teacher_seed$SEED/model.pt" \
  --per-class "$PER_CLASS" --seed "$SEED" --out "$OUT/ncm_teacher_seed$SEED.json"
.venv/bin/$R ncm --split "$OUT/split_r0_seed$SEED.json" --task student --random-init wrn-16-2 \
  --per-class "$PER_CLASS" --seed "$SEED" --out "$OUT/ncm_random_seed$SEED.json"
