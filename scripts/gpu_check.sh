#!/usr/bin/env bash
# What a person with a GPU runs first: CUDA tests, the benchmark, and a short real
# Fashion-MNIST training on CUDA and on the CPU (same accuracy within seed noise).
# Needs only python with torch (+ torchvision and numpy, which come with it); no pip, no
# network, no apt. Runs from the repository root with PYTHONPATH=src. About 5 minutes on
# one H100 (estimated: not yet run on one); every stage has a time limit (30 + 120 + 210 + 110 s)
# so the whole script stays under 8 minutes.
#
# Data: the four Fashion-MNIST IDX files (.gz or not) must be in $DATA_ROOT/fashion-mnist/
# (default data/raw/fashion-mnist, which git ignores). Bring them along: copy the folder
# to the GPU machine, or with this project's remote runner pass
#   carry: ["data/raw/fashion-mnist"]     (30 MB)
# Without them the training stage is reported as failed and the rest still runs.
#
# Output: everything under $OUT (default runs/gpu_check): gpu_check.log, bench.csv,
# fmnist/epochs<E>_per<N>/ (split, runs, accuracy.csv). Exit status: the number of failed stages.
#
#   OUT=/tmp/check scripts/gpu_check.sh            # all stages
#   STAGES="tests bench" scripts/gpu_check.sh      # a subset: env tests bench fmnist
# Knobs of the training stage: SEEDS (0 1 2), DEVICES (cuda cpu), EPOCHS (4), PER_CLASS
# (1000 training images per class), TRAIN_ARGS (extra train-teacher flags, e.g. --no-checksum).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3 || command -v python)}
OUT=${OUT:-runs/gpu_check}
DATA_ROOT=${DATA_ROOT:-data/raw}
STAGES=${STAGES:-env tests bench fmnist}
SEEDS=${SEEDS:-0 1 2}
DEVICES=${DEVICES:-cuda cpu}      # the training stage's devices (compared when both ran)
EPOCHS=${EPOCHS:-4}
PER_CLASS=${PER_CLASS:-1000}
TRAIN_ARGS=${TRAIN_ARGS:-}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

began=$(date +%s)
failed=0
results=()

stage() {   # stage NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo
  echo "=== $name (limit ${limit}s) ==="
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    results+=("ok    $name (${dt}s)")
  else
    [ $rc -eq 124 ] && echo "$name: timed out after ${limit}s"
    results+=("FAIL  $name (${dt}s, exit $rc)")
    failed=$((failed + 1))
  fi
}

wants() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

echo "gpu_check: $(date -u +%FT%TZ) in $(pwd), python $PY, output $OUT"

if wants env; then
  stage "environment" 30 "$PY" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
for mod in ("torchvision", "numpy", "PIL", "pytest", "tqdm"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '')}")
    except ImportError:
        print(f"  {mod}: not installed" + (" (needed)" if mod in ("numpy",) else " (optional)"))
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
import refilled.step, refilled.bench, refilled.train   # importable with what is installed
EOF
fi

if wants tests; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    stage "CUDA tests (pytest) + CPU step tests" 120 \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_step.py tests/test_train.py
  else
    stage "CUDA tests (no pytest: standalone runner)" 120 "$PY" tests/test_cuda.py
  fi
fi

if wants bench; then
  stage "benchmark (full configuration, concurrency 1 2 4)" 210 "$PY" -c "
import sys
from refilled.bench import main
sys.exit(main(['--device', 'cuda', '--config', 'full', '--seconds', '1', '--concurrent', '1', '2', '4', '--out', '$OUT/bench.csv']))
"
fi

fmnist() {
  local dir="$OUT/fmnist/epochs${EPOCHS}_per${PER_CLASS}" root="$DATA_ROOT"   # a rerun with other knobs starts afresh
  if ! ls "$root"/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1; then
    echo "Fashion-MNIST not found in $root/fashion-mnist: bring the four IDX files (see the top of this script)"
    return 3
  fi
  mkdir -p "$dir"
  "$PY" -m refilled.cli split --dataset fashion-mnist --ratio 0 --seed 0 --classes-per-task 5 \
    --out "$dir/split.json" || return 1
  local device seed
  for device in $DEVICES; do
    for seed in $SEEDS; do
      "$PY" -m refilled.cli train-teacher --split "$dir/split.json" --arch wrn-16-1 --epochs "$EPOCHS" --per-class "$PER_CLASS" $TRAIN_ARGS \
        --batch-size 128 --lr 0.05 --schedule cosine --eval-every "$EPOCHS" --seed "$seed" --device "$device" \
        --data-root "$root" --profile gpu_check --out "$dir/teacher_${device}_seed${seed}" || return 1
    done
  done
  "$PY" - "$dir" $SEEDS <<'EOF'
import json, math, os, sys
from pathlib import Path
d, seeds = Path(sys.argv[1]), sys.argv[2:]
acc = {dev: [] for dev in ("cuda", "cpu")}
rows = ["device,seed,test_acc,seconds"]
for dev in acc:
    for seed in seeds:    # the seeds of this call only, not what an earlier call left in $OUT
        p = d / f"teacher_{dev}_seed{seed}" / "summary.json"
        if not p.exists():
            continue
        s = json.loads(p.read_text())
        acc[dev].append(100 * s["test_acc"])
        rows.append(f"{dev},{s['seed']},{s['test_acc']:.4f},{s['seconds']}")
(d / "accuracy.csv").write_text("\n".join(rows) + "\n")
def ms(v):
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd
print(f"Fashion-MNIST teacher (5 classes, {os.environ['PER_CLASS']} images per class, WRN-(16,1), "
      f"{os.environ['EPOCHS']} epochs), test accuracy per seed:")
for dev, v in acc.items():
    if v:
        m, sd = ms(v)
        label = "CUDA (graph, bf16)" if dev == "cuda" else "CPU  (eager, fp32)"
        print(f"  {label}  {m:.2f} ± {sd:.2f} %   {['%.2f' % a for a in v]}")
if not (acc["cuda"] and acc["cpu"]):
    sys.exit(0)
(mg, sg), (mc, sc) = ms(acc["cuda"]), ms(acc["cpu"])
n = min(len(acc["cuda"]), len(acc["cpu"]))
# within seed noise: |difference of means| < 3 standard errors of the difference (at least 1.5 points)
tol = max(1.5, 3 * math.sqrt(sg ** 2 / n + sc ** 2 / n))
diff = mg - mc
print(f"  difference {diff:+.2f} points, tolerance ±{tol:.2f}: {'same within seed noise' if abs(diff) < tol else 'DIFFERENT'}")
sys.exit(0 if abs(diff) < tol else 1)
EOF
}

if wants fmnist; then
  export -f fmnist
  export PY OUT DATA_ROOT SEEDS DEVICES EPOCHS PER_CLASS TRAIN_ARGS
  stage "Fashion-MNIST: CUDA vs CPU accuracy" 110 bash -c fmnist
fi

total=$(( $(date +%s) - began ))
echo
echo "=== summary ($total s; the budget is 480 s) ==="
for r in "${results[@]}"; do echo "  $r"; done
[ -f "$OUT/bench.csv" ] && echo "  benchmark table: $OUT/bench.csv"
[ $total -gt 480 ] && echo "  WARNING: over the 8-minute budget"
exit $failed
