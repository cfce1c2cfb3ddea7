#!/usr/bin/env bash
# Every method of Table 2 for one (ratio, student arch) on Fashion-MNIST (h = 5), over seeds,
# then mean ± std; plus REFILLED with our earlier adaptive weight (refilled-true-class:
# weighting true-class, tau2 = 2, tau^2 scale) beside the authors' default. Settings come from
# the environment; VARIANTS and BASELINES choose the rows.
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/refilled
OUT=${OUT:-runs/compare}
RATIO=${RATIO:-0.6}
SEEDS=${SEEDS:-"0 1 2"}
TEACHER_ARCH=${TEACHER_ARCH:-wrn-16-2}; TEACHER_PER_CLASS=${TEACHER_PER_CLASS:-1000}; TEACHER_EPOCHS=${TEACHER_EPOCHS:-8}
ARCH=${ARCH:-wrn-16-1}; PER_CLASS=${PER_CLASS:-150}
STAGE1_EPOCHS=${STAGE1_EPOCHS:-15}; EPOCHS=${EPOCHS:-20}; LAM=${LAM:-2}
EVAL_EVERY=${EVAL_EVERY:-1}
VARIANTS=${VARIANTS:-"refilled-emb refilled-minus refilled refilled-true-class"}
BASELINES=${BASELINES:-"student rkd aml"}
common="--profile compare --eval-every $EVAL_EVERY"
run() { local out=$1; shift; [ -f "$out/summary.json" ] || "$@" --out "$out"; }

for s in $SEEDS; do
  d=$OUT/seed$s
  $R split --dataset fashion-mnist --ratio 0 --seed "$s" --classes-per-task 5 --out "$d/split_r0.json" >/dev/null
  $R split --dataset fashion-mnist --ratio "$RATIO" --seed "$s" --classes-per-task 5 --out "$d/split_r$RATIO.json" >/dev/null
  run "$d/teacher" $R train-teacher --split "$d/split_r0.json" --arch "$TEACHER_ARCH" --epochs "$TEACHER_EPOCHS" \
    --per-class "$TEACHER_PER_CLASS" --seed "$s" --profile compare
  # cross-task transfer: the teacher's embedding vs a random network's on the 5 classes it never saw
  $R ncm --split "$d/split_r0.json" --task student --model "$d/teacher/model.pt" --per-class "$TEACHER_PER_CLASS" \
    --seed "$s" --out "$d/ncm_teacher_unseen.json"
  $R ncm --split "$d/split_r0.json" --task student --random-init "$TEACHER_ARCH" --per-class "$TEACHER_PER_CLASS" \
    --seed "$s" --out "$d/ncm_random_unseen.json"
  sp="$d/split_r$RATIO.json"; t="$d/teacher/model.pt"
  args="--split $sp --arch $ARCH --per-class $PER_CLASS --seed $s $common"
  $R ncm --split "$sp" --task student --model "$t" --per-class "$PER_CLASS" --seed "$s" --out "$d/ncm_teacher_student_task.json"
  run "$d/stage1" $R train-stage1 $args --teacher "$t" --epochs "$STAGE1_EPOCHS"
  for v in $VARIANTS; do
    if [ "$v" = refilled-true-class ]; then set_v="--variant refilled --weighting true-class --tau 2 --kl-scale tau2"
    else set_v="--variant $v"; fi
    run "$d/$v" $R train-stage2 $args --teacher "$t" --init "$d/stage1/model.pt" $set_v --lam "$LAM" --epochs "$EPOCHS"
  done
  for m in $BASELINES; do
    if [ "$m" = student ]; then tt=""; else tt="--teacher $t"; fi
    run "$d/$m" $R train-baseline $args --method "$m" $tt --epochs "$EPOCHS"
  done
done
.venv/bin/python scripts/summarize.py "$OUT"
