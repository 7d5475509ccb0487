#!/usr/bin/env bash
# Write ./.deepspeed_env: the variables the deepspeed launcher exports to every node when it starts
# them through pdsh, slurm or mpi (it reads .deepspeed_env from the directory it runs in, then ~/).
# Not used in --no_ssh per-node mode, where each node keeps its own shell environment.
#   usage: launch/make_deepspeed_env.sh [VAR ...]
# Without arguments, the variables below that are set in this shell are written.  Values are
# written as they are: keep secrets (credentials) out of it and give nodes an instance role or a
# credentials file instead.
set -euo pipefail
defaults=(PYTHONPATH PATH VIRTUAL_ENV OMP_NUM_THREADS DS_ACCELERATOR TORCH_EXTENSIONS_DIR
          NCCL_SOCKET_IFNAME NCCL_IB_DISABLE NCCL_DEBUG GLOO_SOCKET_IFNAME
          AWS_ENDPOINT_URL AWS_DEFAULT_REGION AWS_PROFILE HF_HOME)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${defaults[@]}")
out=.deepspeed_env
: > "$out.tmp"
for name in "${names[@]}"; do
  if [ -n "${!name+x}" ]; then
    printf '%s=%s\n' "$name" "${!name}" >> "$out.tmp"
    echo "exporting $name"
  fi
done
mv "$out.tmp" "$out"
echo "wrote $(pwd)/$out ($(wc -l < "$out") variable(s))"
