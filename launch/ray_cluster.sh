#!/usr/bin/env bash
# Run an avi-tune search on a Ray cluster that is already up (ray start, KubeRay, a cloud cluster).
#   launch/ray_cluster.sh ADDRESS configs/search/cifar10_depth_study.yaml [key=value ...] [--resume]
# ADDRESS: HOST:PORT of the head's GCS (e.g. 10.0.0.5:6379), `auto` on a cluster node, or ray://HOST:10001
# (Ray Client).  The search runs in this process and its trials on the cluster's nodes, which must have
# this project installed (pip install -e .) and see tune.storage (a shared directory or s3://).
# Other settings: PYTHON (default: from PATH), AVI_DRY_RUN=1 (print the command only).
set -euo pipefail
source "$(dirname "$0")/common.sh"
[ $# -ge 2 ] || { echo "usage: $(basename "$0") ADDRESS SEARCH.yaml [key=value ...] [--resume]" >&2; exit 2; }
address="$1"
shift
avi_need_config "$@"
avi_run "${PYTHON:-python}" -m avi_scale.tune.cli "$@" --address "$address"
