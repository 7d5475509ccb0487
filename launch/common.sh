# Shared by the launch scripts (sourced, not run).  Every script takes the experiment YAML and
# dotlist overrides, checks them (avi_check_config), prints the command it starts, then replaces
# itself with it.
#   AVI_DRY_RUN=1     print the command only (after the check)
#   AVI_SKIP_CHECK=1  skip the check (e.g. when only the compute nodes can read the data)
#   PYTHON, DEEPSPEED, TORCHRUN   the interpreters/launchers to use (default: from PATH)

avi_usage() {
  echo "usage: $(basename "$0") CONFIG.yaml [key=value ...]" >&2
  echo "$1" >&2
  exit 2
}

avi_need_config() {
  [ $# -ge 1 ] || avi_usage "missing the experiment config"
  case "$1" in  # a bare name (cifar10_attentive) is a packaged config: the check resolves it
    */* | *.yaml | *.yml) [ -f "$1" ] || avi_usage "config file not found: $1" ;;
  esac
}

# GPUs on this node (0 without nvidia-smi)
avi_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# Ranks on this node: NPROC if set, else one per GPU, else 1
avi_node_ranks() {
  local gpus
  gpus=$(avi_gpu_count)
  echo "${NPROC:-$(( gpus > 0 ? gpus : 1 ))}"
}

# CPU-only nodes: DeepSpeed's CPU accelerator, and one compute thread per core per rank
# (the deepspeed launcher, unlike torchrun, leaves OMP_NUM_THREADS unset: ranks would oversubscribe).
avi_cpu_defaults() {
  local nproc_per_node=$1
  if [ "$(avi_gpu_count)" = 0 ]; then
    export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
    local cores
    cores=$(nproc)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))}"
  fi
}

# Validate the config, the data and the output directories in one process before anything starts
# (`avi-train --check`): a bad config is rejected here with the key named, and no rank, node or run
# directory is created.  usage: avi_check_config WORLD_SIZE CONFIG.yaml [key=value ...]
avi_check_config() {
  local world=$1
  shift
  if [ "${AVI_SKIP_CHECK:-0}" = 1 ]; then
    return 0
  fi
  if ! "${PYTHON:-python}" -m avi_scale.cli "$@" --check --world-size "$world"; then
    echo "$(basename "$0"): nothing launched: the config check above failed (AVI_SKIP_CHECK=1 skips it)" >&2
    exit 2
  fi
}

# One node of NPROC ranks (the single-node scripts): the config exists and passes the check for that
# world size, CPU defaults are set; leaves the rank count in $nproc.  usage: avi_single_node CONFIG.yaml [key=value ...]
avi_single_node() {
  avi_need_config "$@"
  nproc=$(avi_node_ranks)
  avi_check_config "$nproc" "$@"
  avi_cpu_defaults "$nproc"
}

avi_run() {
  printf 'launching:'
  printf ' %q' "$@"
  printf '\n'
  if [ "${AVI_DRY_RUN:-0}" = 1 ]; then
    exit 0
  fi
  exec "$@"
}
