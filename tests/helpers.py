"""Shared test scaffolding that is not a fixture: paths, the environment of launched commands, the tiny
training config, reading a run's metrics.  The fixtures built on these live in tests/conftest.py; the
helpers of tests/test_faults.py (fault injection) in tests/fault_helpers.py, the data builders and servers
in tests/data_fixtures.py.

* ``REPO``, ``VENV_BIN`` (the venv's ``bin``: deepspeed, torchrun, avi-*), ``PY`` (its python);
* :func:`launch_env`: this process's environment for a launched command, without the variables of an
  enclosing distributed launch (``LAUNCH_VARS``), venv tools first, CPU DeepSpeed, one thread per process;
* :func:`tiny_yaml`: the tiny AttentiveVAE config on given shards, in the variants of ``TINY_CONFIGS``;
* :func:`metric_rows`: the rows of one kind in a run's ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
VENV_BIN = Path(PY).parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")


def launch_env(**extra: str) -> dict:
    """The environment of a launched command: ``os.environ`` less ``LAUNCH_VARS``, ``VENV_BIN`` first on
    PATH, DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1, PYTHONUNBUFFERED=1, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# -- the tiny config: a 2-layer AttentiveVAE with 8 filters on real MNIST shards, a few CPU steps ------------
_TINY_TEMPLATE = """
name: {name}
model:
  num_layers: 2
  num_filters: 8
  latent_channels: 4
  num_blocks: 1
  num_preprocess_blocks: 1
  num_postprocess_blocks: 1
  prior_attention: {{key_dim: 4}}
  posterior_attention: {{key_dim: 4}}
  nonlocal_places: []
data:
  train_urls: {shards}
  shuffle_buffer: 50
optim:
  lr: 0.005
  warmup_steps: 1
train:
{train}
eval:
  num_samples: 4
"""
_TINY_TRAIN = {"steps": 4, "micro_batch_size": 4, "kl_warmup_steps": 2, "log_every": 1, "eval_every": 2,
               "eval_batches": 1, "checkpoint_every": 2, "keep_checkpoints": 3, "device": "cpu",
               "progress_bar": "false"}

# variant -> (config name, its train settings over _TINY_TRAIN)
TINY_CONFIGS = {
    # tests/test_engine.py: 4 steps, an evaluation every 2, per-batch logs
    "engine": ("engine_test", {"batch_log": "true"}),
    # tests/test_faults.py: 6 steps, no evaluation, deterministic kernels, 2 checkpoints kept
    "faults": ("fault_test", {"steps": 6, "eval_every": 0, "keep_checkpoints": 2, "deterministic": "true"}),
}


def tiny_yaml(shards: Path | str, variant: str) -> str:
    """The YAML text of the tiny config ``variant`` (a key of ``TINY_CONFIGS``) training on ``shards``."""
    name, train = TINY_CONFIGS[variant]
    lines = "\n".join(f"  {key}: {value}" for key, value in {**_TINY_TRAIN, **train}.items())
    return _TINY_TEMPLATE.format(name=name, shards=shards, train=lines)


def metric_rows(run_dir: Path, kind: str) -> list[dict]:
    """The rows of ``kind`` ("train", "eval", "final", ...) of ``run_dir/metrics.jsonl``, in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]
