#!/usr/bin/env bash
# Several nodes through the deepspeed launcher and a hostfile ("hostname slots=N" per line,
# see hostfile.example).  Two modes:
#   pdsh (default): run once, on the first host; DeepSpeed starts every node over ssh + pdsh and
#     exports .deepspeed_env (see make_deepspeed_env.sh) to them.
#   per node without ssh: set NODE_RANK and run this script on every node yourself (same HOSTFILE,
#     MASTER_ADDR and MASTER_PORT everywhere); the environment is each node's own shell.
#   HOSTFILE     required
#   MASTER_ADDR  address of the first host, reachable from all (required)
#   MASTER_PORT  default 29500
#   NODE_RANK    set: --no_ssh per-node mode with this node's index in the hostfile
# Example: HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 launch/deepspeed_multinode.sh configs/cifar10_attentive.yaml
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$here/common.sh"
avi_need_config "$@"
[ -n "${HOSTFILE:-}" ] || avi_usage "set HOSTFILE (lines: 'hostname slots=N')"
[ -f "$HOSTFILE" ] || avi_usage "hostfile not found: $HOSTFILE"
[ -n "${MASTER_ADDR:-}" ] || avi_usage "set MASTER_ADDR to the first host's address"

slots=$(awk '$1 !~ /^#/ && NF { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); print $i; exit } }' "$HOSTFILE")
world=$(awk '$1 !~ /^#/ && NF { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); n = $i } total += n } END { print total + 0 }' "$HOSTFILE")
avi_check_config "$(( world > 0 ? world : 1 ))" "$@"
avi_cpu_defaults "${slots:-1}"
common=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" --no_local_rank)
if [ -n "${NODE_RANK:-}" ]; then
  avi_run "${DEEPSPEED:-deepspeed}" "${common[@]}" --no_ssh --node_rank "$NODE_RANK" --module avi_scale.cli "$@"
else
  avi_run "${DEEPSPEED:-deepspeed}" "${common[@]}" --launcher pdsh --module avi_scale.cli "$@"
fi
