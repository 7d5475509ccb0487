#!/usr/bin/env bash
# One node, NPROC ranks, through torchrun (standalone rendezvous on a free port).
#   NPROC   ranks (default: the GPUs of this node, else 1)
# Example: NPROC=2 launch/torchrun_single_node.sh configs/tiny_mnist5k.yaml deepspeed.zero_stage=1
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
avi_single_node "$@"
avi_run "${TORCHRUN:-torchrun}" --standalone --nnodes 1 --nproc_per_node "$nproc" -m avi_scale.cli "$@"
