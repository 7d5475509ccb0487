#!/usr/bin/env bash
# The small-scale reproduction of the paper's claims (RESULTS.md), one command from the IDX files to
# the tables and figures:
#   MNIST_SRC=/path/to/mnist launch/reproduce_mnist.sh
# Stages (STAGES="shards train eval sweep compare" by default; each skips work already finished):
#   shards   avi-shards mnist: 55,000 train / 5,000 val / 10,000 test images -> $DATA
#   train    attentive vs local at 2 and 4 layers (configs/experiments/mnist_{att,loc}{2,4}.yaml),
#            seeds $SEEDS, one process per run with one thread, $JOBS runs at a time -> $OUT/<name>_s<seed>
#   eval     avi-eval nll on the 10,000 test images (importance-weighted, K = eval.iw_samples) per run
#   sweep    avi-tune configs/experiments/mnist_depth_sweep.yaml: 1, 2, 4, 8 layers x attentive/local
#   compare  avi-eval compare: the seed table, KL heat maps side by side, depth plot -> $OUT/compare
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
DATA="${DATA:-data/mnist}"
OUT="${OUT:-runs/experiments}"
SEEDS="${SEEDS:-1 2 3}"
JOBS="${JOBS:-2}"
STAGES="${STAGES:-shards train eval sweep compare}"
CONFIGS="${CONFIGS:-mnist_att4 mnist_loc4 mnist_att2 mnist_loc2}"
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { date '+%H:%M:%S'; }

if has shards && [ ! -f "$DATA/manifest.json" ]; then
  : "${MNIST_SRC:?set MNIST_SRC to a directory with the MNIST IDX files (train/t10k images and labels)}"
  echo "== $(stamp) shards: $MNIST_SRC -> $DATA"
  avi-shards mnist --src "$MNIST_SRC" --out "$DATA" --val-fraction 0.0833333 --shard-mb 8 --no-progress
fi

jobs_list=()
for name in $CONFIGS; do for seed in $SEEDS; do jobs_list+=("$name $seed"); done; done

train_one() {  # name seed
  local run="$OUT/$1_s$2"
  if [ -f "$run/final/model.pt" ]; then echo "   $run: trained"; return 0; fi
  echo "   $(stamp) train $run"
  avi-train "configs/experiments/$1.yaml" "train.seed=$2" "data.seed=$2" "train.output_dir=$run" \
    "data.train_urls=$DATA" > "$run.train.log" 2>&1 || { echo "FAILED: $run (see $run.train.log)"; return 1; }
}
eval_one() {  # name seed
  local run="$OUT/$1_s$2"
  if [ -f "$run/test/nll.json" ]; then echo "   $run: evaluated"; return 0; fi
  echo "   $(stamp) eval $run"
  avi-eval nll "$run" --data "$DATA" --split test --out "$run/test" --no-progress data.seed=0 > "$run.eval.log" 2>&1 \
    || { echo "FAILED: $run (see $run.eval.log)"; return 1; }
}
export -f train_one eval_one stamp
export OUT DATA

mkdir -p "$OUT"
if has train; then
  echo "== $(stamp) training ${#jobs_list[@]} runs, $JOBS at a time"
  printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c 'train_one $0 $1'
fi
if has eval; then
  echo "== $(stamp) test-set likelihood of ${#jobs_list[@]} runs"
  printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c 'eval_one $0 $1'
fi
if has sweep; then
  echo "== $(stamp) depth sweep (Ray Tune)"
  if [ -d runs/tune/mnist_depth_sweep ]; then resume=--resume; else resume=; fi
  avi-tune configs/experiments/mnist_depth_sweep.yaml --num-cpus "$JOBS" $resume "data.train_urls=$DATA" --verbose 0
fi
if has compare; then
  echo "== $(stamp) comparison"
  runs=()
  for name in $CONFIGS; do for seed in $SEEDS; do runs+=("$OUT/${name}_s$seed"); done; done
  avi-eval compare "${runs[@]}" --out "$OUT/compare"
fi
echo "== $(stamp) done"
