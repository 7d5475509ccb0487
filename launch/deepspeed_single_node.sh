#!/usr/bin/env bash
# One node, NPROC ranks, through the deepspeed launcher.
#   NPROC        ranks (default: the GPUs of this node, else 1)
#   MASTER_PORT  rendezvous port (default 29500)
# Example: NPROC=2 launch/deepspeed_single_node.sh configs/tiny_mnist5k.yaml deepspeed.zero_stage=2
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
avi_single_node "$@"
avi_run "${DEEPSPEED:-deepspeed}" --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
  --no_local_rank --module avi_scale.cli "$@"
