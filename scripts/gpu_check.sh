#!/usr/bin/env bash
# What a person with a GPU runs first: the environment, the CUDA tests, the benchmark and a
# short real Fashion-MNIST training on CUDA and on the CPU (same accuracy within seed noise).
# Needs only python with torch (+ torchvision and numpy, which come with it); no pip, no
# network, no apt. Runs from the repository root with PYTHONPATH=src.
#
#   scripts/gpu_check.sh --prepare     on your machine, first: Fashion-MNIST into
#                                      $DATA_ROOT/fashion-mnist, checked; prints what to carry
#   scripts/gpu_check.sh --plan        the stages, their estimated seconds and deadlines; exits
#   scripts/gpu_check.sh [--budget S]  on the GPU machine: the stages, within S seconds (480)
#
# One budget (--budget S, default 480 s) for the whole run. The stages run in order of value,
# each with its own limit, cut to what the budget has left (its deadline):
#   env            versions, the GPU, the TF32 settings and the variables that force TF32
#   tests          tests/test_cuda.py: every catalog method captured = eager, the augmentation
#   bench-targets  the README's target rows (CE, stage 1, REFILLED for WRN-(40,2) and
#                  WRN-(16,1)) and one concurrency round (2 jobs)
#   fmnist         Fashion-MNIST, WRN-(16,1): CUDA vs CPU test accuracy per seed
#   bench-rest     every other bench row (0.5 s timing, no eager column) and the 1- and 4-job
#                  concurrency rounds; it gets what the budget has left
# The bench writes each row to bench.csv the moment it is measured: a stage stopped at its
# deadline still leaves its finished rows. The estimates are guesses for a H100/H200-class
# GPU: this script has not yet run on a GPU.
#
# Data: the four Fashion-MNIST IDX files (.gz or not) in $DATA_ROOT/fashion-mnist/ (default
# data/raw/fashion-mnist, which git ignores: name it in the device tool's carry). Without
# them the script refuses to start (one line); STAGES without fmnist needs no data.
#
# Output: everything under $OUT (default runs/gpu_check): gpu_check.log, bench.csv,
# fmnist/epochs<E>_per<N>/ (split, runs with their summary.json, accuracy.csv). Exit status:
# the number of failed or unstarted stages; 2 for bad arguments, missing data or a plan
# that does not fit (--plan: 1).
#
#   OUT=/tmp/check scripts/gpu_check.sh                 # all stages
#   STAGES="tests bench-targets" scripts/gpu_check.sh   # a subset (run in the order above)
# Knobs of the training stage: SEEDS (0 1 2), DEVICES (cuda cpu), EPOCHS (4), PER_CLASS
# (1000 training images per class), TRAIN_ARGS (extra train-teacher flags, e.g. --no-checksum).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '7,10p' "$0" | sed 's/^# //'; }
ACTION=run
BUDGET=${BUDGET:-480}
while [ $# -gt 0 ]; do
  case $1 in
    --prepare) ACTION=prepare ;;
    --plan) ACTION=plan ;;
    --budget) [ $# -ge 2 ] || { echo "gpu_check: --budget needs a number of seconds" >&2; exit 2; }
              BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#--budget=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case $BUDGET in
  ''|*[!0-9]*) echo "gpu_check: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python      # your machine, after make setup
else PY=$(command -v python3 || command -v python); fi
OUT=${OUT:-runs/gpu_check}
DATA_ROOT=${DATA_ROOT:-data/raw}
STAGES=${STAGES:-env tests bench-targets fmnist bench-rest}
SEEDS=${SEEDS:-0 1 2}
DEVICES=${DEVICES:-cuda cpu}      # the training stage's devices (compared when both ran)
EPOCHS=${EPOCHS:-4}
PER_CLASS=${PER_CLASS:-1000}
TRAIN_ARGS=${TRAIN_ARGS:-}
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# ---- the stages, in order of value: estimated seconds and limit (0: what the budget leaves) ----
# The bench stages' estimates come from `refilled.tools.bench --plan` with their own arguments.
BENCH_ARGS="--device cuda --config full --out $OUT/bench.csv"
BENCH_TARGETS="$BENCH_ARGS --part targets --seconds 1 --concurrent 2"
BENCH_REST="$BENCH_ARGS --part rest --append --seconds 0.5 --eager no --concurrent 1 4"
ORDER=(env tests bench-targets fmnist bench-rest)
declare -A ESTIMATE=([env]=10 [tests]=90 [bench-targets]=0 [fmnist]=80 [bench-rest]=0)
declare -A LIMIT=([env]=30 [tests]=150 [bench-targets]=150 [fmnist]=110 [bench-rest]=0)
FASHION_FILES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
BENCH_PLAN_LINES=""

wants() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

have_fashion() {   # the four files, .gz or not
  local f
  for f in $FASHION_FILES; do
    [ -f "$DATA_ROOT/fashion-mnist/$f" ] || [ -f "$DATA_ROOT/fashion-mnist/$f.gz" ] || return 1
  done
}

bench_estimates() {   # ESTIMATE of the two bench stages, from refilled.tools.bench --plan
  local lines
  lines=$("$PY" - "$BENCH_TARGETS" "$BENCH_REST" <<'EOF'
import contextlib, io, re, sys
from refilled.tools.bench import main
for args in sys.argv[1:]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):   # without --append: as if bench.csv were empty
        main([a for a in args.split() if a != "--append"] + ["--plan"])
    print(re.search(r"estimated (\d+) s", buf.getvalue()).group(1), buf.getvalue().strip())
EOF
) || { echo "gpu_check: could not compute the bench estimates with $PY (is torch installed?)" >&2; return 1; }
  ESTIMATE[bench-targets]=$(sed -n 1p <<<"$lines" | cut -d' ' -f1)
  ESTIMATE[bench-rest]=$(sed -n 2p <<<"$lines" | cut -d' ' -f1)
  BENCH_PLAN_LINES=$(cut -d' ' -f2- <<<"$lines")
}

print_plan() {   # the stages with estimates, limits and deadlines; returns 1 if they do not fit
  local name end=0 e_sum=0 fixed=0 limit shown
  echo "plan for a budget of ${BUDGET} s (estimates for a H100/H200-class GPU, not measured):"
  printf "  %-14s %9s %7s %9s\n" stage estimate limit deadline
  for name in "${ORDER[@]}"; do
    wants "$name" || continue
    limit=${LIMIT[$name]}
    if [ "$limit" -eq 0 ]; then end=$BUDGET; shown=rest
    else end=$((end + limit)); fixed=$((fixed + limit)); shown="${limit}s"; fi
    [ $end -gt "$BUDGET" ] && end=$BUDGET
    e_sum=$((e_sum + ESTIMATE[$name]))
    printf "  %-14s %8ss %7s %8ss\n" "$name" "${ESTIMATE[$name]}" "$shown" "$end"
  done
  if wants bench-targets || wants bench-rest; then
    sed 's/^/  bench /' <<<"$BENCH_PLAN_LINES"
    echo "  bench-targets: refilled.tools.bench $BENCH_TARGETS"
    echo "  bench-rest:    refilled.tools.bench $BENCH_REST"
  fi
  echo "  total estimate ${e_sum} s; fixed limits ${fixed} s; budget ${BUDGET} s"
  if [ $e_sum -gt "$BUDGET" ] || [ $fixed -gt "$BUDGET" ]; then
    echo "  DOES NOT FIT the budget: raise --budget or leave stages out (STAGES=...)"
    return 1
  fi
  echo "  fits the budget"
}

prepare() {
  local dir="$DATA_ROOT/fashion-mnist" rel
  rel=$(realpath -m --relative-to=. "$dir")
  case $rel in
    ../*|/*) echo "gpu_check --prepare: $dir is outside the working tree, where the device tool's carry" \
                  "cannot reach; use a DATA_ROOT inside it (default data/raw)"; return 2 ;;
  esac
  echo "gpu_check --prepare: Fashion-MNIST into $dir"
  scripts/get_fashion_mnist.sh "$DATA_ROOT" \
    || { echo "gpu_check --prepare: could not obtain Fashion-MNIST in $dir (see above)"; return 2; }
  "$PY" -m refilled.cli data check --dataset fashion-mnist --root "$DATA_ROOT" \
    || { echo "gpu_check --prepare: $dir failed 'refilled data check'"; return 2; }
  echo
  echo "ready. The data is git-ignored: name it in the device tool's carry (the code travels by itself):"
  echo "  carry: [\"$rel\"]   ($(du -sm "$dir" | cut -f1) MB)"
  echo "then run there, with a time limit that leaves room for a second run:"
  echo "  DATA_ROOT=$DATA_ROOT scripts/gpu_check.sh --budget $BUDGET"
  echo "and bring back \$OUT (default runs/gpu_check): gpu_check.log, bench.csv, fmnist/*/teacher_*/summary.json"
}

case $ACTION in
  prepare) prepare; exit $? ;;
  plan) bench_estimates || exit 2; print_plan; exit $? ;;
esac

if wants fmnist && ! have_fashion; then
  echo "gpu_check: Fashion-MNIST not found in $DATA_ROOT/fashion-mnist (the four IDX files): run scripts/gpu_check.sh --prepare on your machine and carry $DATA_ROOT/fashion-mnist"
  exit 2
fi

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1

began=$(date +%s)
failed=0
results=()

stage() {   # stage NAME COMMAND...: its limit, cut to what the budget has left
  local name=$1; shift
  local left=$((BUDGET - ($(date +%s) - began))) limit=${LIMIT[$name]}
  if [ "$limit" -eq 0 ] || [ "$limit" -gt $left ]; then limit=$left; fi
  echo
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: not started, ${left}s of the ${BUDGET}s budget left ==="
    results+=("SKIP  $name (budget spent)")
    failed=$((failed + 1))
    return
  fi
  echo "=== $name (limit ${limit}s, estimate ${ESTIMATE[$name]}s) ==="
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    results+=("ok    $name (${dt}s)")
  else
    [ $rc -eq 124 ] && echo "$name: stopped at its deadline (${limit}s)"
    results+=("FAIL  $name (${dt}s, exit $rc)")
    failed=$((failed + 1))
  fi
}

echo "gpu_check: $(date -u +%FT%TZ) in $(pwd), python $PY, output $OUT, stages: $STAGES"
if { wants bench-targets || wants bench-rest; } && ! bench_estimates; then
  echo "(the plan below lacks the bench estimates)"
fi
print_plan || true

if wants env; then
  stage env "$PY" - <<'EOF'
import importlib, os, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
for mod in ("torchvision", "numpy", "PIL", "pytest", "tqdm"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '')}")
    except ImportError:
        print(f"  {mod}: not installed" + (" (needed)" if mod in ("numpy",) else " (optional)"))
# TF32: what torch does for float32 matmuls and convolutions, and the variables that force it anyway
print(f"TF32: torch.backends.cuda.matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, "
      f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
      f"float32_matmul_precision={torch.get_float32_matmul_precision()}")
for var in ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "NVIDIA_TF32_OVERRIDE"):
    print(f"  {var}={os.environ.get(var) or '(unset)'}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible: this script is for a GPU machine")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
import refilled.training.step, refilled.tools.bench, refilled.training.loop   # importable with what is installed
EOF
fi

if wants tests; then
  if "$PY" -c "import pytest" 2>/dev/null; then
    stage tests "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
  else
    stage tests "$PY" tests/test_cuda.py      # no pytest: the file's own runner
  fi
fi

if wants bench-targets; then
  rm -f "$OUT/bench.csv"    # this run's rows only; bench-rest appends to them
  stage bench-targets "$PY" -m refilled.tools.bench $BENCH_TARGETS
fi

fmnist() {
  local dir="$OUT/fmnist/epochs${EPOCHS}_per${PER_CLASS}" root="$DATA_ROOT"   # a rerun with other knobs starts afresh
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
steps = {dev: [] for dev in acc}     # how each run's steps ran (summary.json "steps", refilled.training.step)
rows = ["device,seed,test_acc,seconds,steps,captures,fallbacks"]
for dev in acc:
    for seed in seeds:    # the seeds of this call only, not what an earlier call left in $OUT
        p = d / f"teacher_{dev}_seed{seed}" / "summary.json"
        if not p.exists():
            continue
        s = json.loads(p.read_text())
        acc[dev].append(100 * s["test_acc"])
        st = s.get("steps") or {"mode": "not recorded"}
        steps[dev].append(st)
        rows.append(f"{dev},{s['seed']},{s['test_acc']:.4f},{s['seconds']},{st['mode']},{st.get('captures', '')},"
                    f"{st.get('fallbacks', '')}")
(d / "accuracy.csv").write_text("\n".join(rows) + "\n")
def how(records):
    """What the runs' summaries say of their steps, e.g. 'graph; 3 captures, 0 fallbacks'."""
    modes = "/".join(sorted({r["mode"] for r in records}))
    if any("captures" not in r for r in records):
        return modes
    captures, fallbacks = sum(r["captures"] for r in records), sum(r["fallbacks"] for r in records)
    return f"{modes}; {captures} captures, {fallbacks} fallbacks"
def ms(v):
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd
print(f"Fashion-MNIST teacher (5 classes, {os.environ['PER_CLASS']} images per class, WRN-(16,1), "
      f"{os.environ['EPOCHS']} epochs), test accuracy per seed:")
for dev, v in acc.items():
    if v:
        m, sd = ms(v)
        label = f"CUDA (steps: {how(steps[dev])}; bf16)" if dev == "cuda" else f"CPU (steps: {how(steps[dev])}; fp32)"
        print(f"  {label}  {m:.2f} ± {sd:.2f} %   {['%.2f' % a for a in v]}")
not_graph = [r for r in steps["cuda"] if r["mode"] != "graph"]
if not_graph:
    print(f"  NOTE: {len(not_graph)} of {len(steps['cuda'])} CUDA runs did not replay every step from a graph: "
          + "; ".join(r.get("capture_disabled", r["mode"]) for r in not_graph))
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
  stage fmnist bash -c fmnist
fi

if wants bench-rest; then
  stage bench-rest "$PY" -m refilled.tools.bench $BENCH_REST
fi

total=$(( $(date +%s) - began ))
echo
echo "=== summary ($total s of the ${BUDGET} s budget) ==="
for r in "${results[@]}"; do echo "  $r"; done
[ -f "$OUT/bench.csv" ] && echo "  benchmark table: $OUT/bench.csv ($(( $(wc -l < "$OUT/bench.csv") - 1 )) rows)"
exit $failed
