"""The wheel, installed into a fresh virtualenv outside the repository, runs the main job.

The wheel is built from this checkout; the new venv gets it with ``pip install --no-deps`` and finds its
dependencies (torch, DeepSpeed, ...) through a path file naming the project venv's site-packages, whose
own path files (the editable install's finder among them) are not read from there.  Every command runs
in a directory outside the checkout, so nothing can come from ``configs/`` or the source tree.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, launch_env

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=launch_env(PYTHONPATH=""))
    assert proc.returncode == 0, f"{cmd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root / "dist",
          REPO], cwd=root)
    (wheel,) = (root / "dist").glob("avi_scale-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root)
    (purelib,) = (venv / "lib").glob("python*/site-packages")
    (purelib / "project_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=root)
    return venv


def test_wheel_in_a_fresh_venv_runs_the_main_job_with_packaged_configs(wheel_venv, tmp_path):
    bin_ = wheel_venv / "bin"
    where = _run([bin_ / "python", "-c", "import avi_scale, data_tools; print(avi_scale.__file__); "
                  "print(data_tools.__file__)"], cwd=tmp_path).stdout.split()
    assert all(Path(p).is_relative_to(wheel_venv) for p in where), where  # the wheel's code, not the checkout's
    version = _run([bin_ / "avi-train", "--version"], cwd=tmp_path).stdout.strip()
    assert version.startswith("avi-train ") and version.split()[1][0].isdigit()
    printed = _run([bin_ / "avi-train", "cifar10_attentive", "--print-config"], cwd=tmp_path).stdout
    assert "num_layers: 16" in printed and "name: cifar10_attentive" in printed
    nvae = _run([bin_ / "avi-train", "cifar10_nvae16", "--print-config"], cwd=tmp_path).stdout  # base: inside
    assert "enabled: false" in nvae and "num_filters: 128" in nvae
    search = _run([bin_ / "avi-tune", "tiny_mnist5k_depth_lr", "--print-config"], cwd=tmp_path).stdout
    assert "search_space" in search
    bad = subprocess.run([str(bin_ / "avi-train"), "no_such_config"], cwd=tmp_path, capture_output=True,
                         text=True, env=launch_env())
    assert bad.returncode == 2 and "nor a packaged config" in bad.stderr and "tiny_mnist5k" in bad.stderr
    # the main job on embedded data: shards from the packaged MNIST digits, a short run, its export
    _run([bin_ / "avi-shards", "mnist5k", "--out", tmp_path / "data", "--no-progress"], cwd=tmp_path)
    out = tmp_path / "run"
    _run([bin_ / "avi-train", "tiny_mnist5k", f"data.train_urls={tmp_path / 'data'}", "train.steps=2",
          "train.eval_every=2", "train.eval_batches=1", "train.log_every=1", f"train.output_dir={out}",
          "train.progress_bar=false"], cwd=tmp_path, timeout=600)
    assert (out / "final" / "model.pt").is_file()
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["step"] == 2
    # the shared export (model.safetensors + config.yaml) loads by itself and through avi-eval
    shared = out / "final"
    params = _run([bin_ / "python", "-c", "import sys; from avi_scale.model import AttentiveVAE, count_parameters; "
                   "print(count_parameters(AttentiveVAE.from_pretrained(sys.argv[1])))", shared], cwd=tmp_path)
    assert int(params.stdout) == final["num_parameters"]
    _run([bin_ / "avi-eval", "nll", shared, "--data", tmp_path / "data", "--split", "val", "-K", "2",
          "--out", tmp_path / "eval", "--no-progress"], cwd=tmp_path, timeout=600)
    assert json.loads((tmp_path / "eval" / "nll.json").read_text())["count"] == 500  # the 10% held out
