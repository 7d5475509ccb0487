"""deepspeed.extra: the user's own DeepSpeed JSON sections reach DeepSpeed, conflicts are named, the merged
JSON is saved with the run."""

import json
import subprocess

import pytest

from avi_scale.config import ConfigError, load_config
from avi_scale.engine.deepspeed_config import build_ds_config

from helpers import VENV_BIN, launch_env

TINY_CONFIG = "engine"


def test_extra_sections_merge_and_conflicts_name_both_keys():
    cfg = load_config(None, ["deepspeed.zero_stage=2", "deepspeed.extra={comms_logger: {enabled: true}, "
                             "zero_optimization: {round_robin_gradients: true, stage: 2}}"])
    ds = build_ds_config(cfg, 2)
    assert ds["comms_logger"] == {"enabled": True}
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 2 * cfg.train.micro_batch_size  # everything derived is still there
    with pytest.raises(ConfigError, match=r"deepspeed\.extra\.zero_optimization\.stage=3 conflicts with 2, which "
                                          r"the config derives from deepspeed\.zero_stage"):
        build_ds_config(load_config(None, ["deepspeed.zero_stage=2",
                                           "deepspeed.extra={zero_optimization: {stage: 3}}"]), 1)
    with pytest.raises(ConfigError, match=r"deepspeed\.extra\.gradient_clipping=1\.0 conflicts with 0\.0, "
                                          r"which the config derives from optim\.gradient_clipping"):
        build_ds_config(load_config(None, ["deepspeed.extra={gradient_clipping: 1.0}"]), 1)
    with pytest.raises(ConfigError, match="the engine sets itself"):
        build_ds_config(load_config(None, ["deepspeed.extra={steps_per_print: 10}"]), 1)


def test_extra_reaches_deepspeed_and_is_saved_with_the_run(config_file, tmp_path):
    out, profile = tmp_path / "run", tmp_path / "flops.txt"
    extra = f"deepspeed.extra={{flops_profiler: {{enabled: true, profile_step: 1, output_file: '{profile}'}}}}"
    common = [str(VENV_BIN / "avi-train"), str(config_file), f"train.output_dir={out}", "train.steps=2",
              "train.eval_every=0", "train.progress_bar=false"]
    bad = subprocess.run([*common, "deepspeed.extra={train_batch_size: 1024}", "--check"], capture_output=True,
                         text=True, env=launch_env())
    assert bad.returncode == 2 and "deepspeed.extra.train_batch_size=1024 conflicts with" in bad.stderr
    subprocess.run([*common, extra], check=True, capture_output=True, text=True, env=launch_env(), timeout=300)
    saved = json.loads((out / "ds_config.json").read_text())
    assert saved["flops_profiler"]["profile_step"] == 1 and saved["zero_optimization"]["stage"] == 0
    assert "flops" in profile.read_text().lower()  # DeepSpeed's own profiler ran, at the step asked for
