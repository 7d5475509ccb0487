"""logging.backends: the engine's metrics in a CSV file, a W&B offline run and a real MLflow server.

W&B runs offline; the scalars are read back from the run file it writes (its record log: 32 KiB blocks of
length-prefixed chunks holding ``Record`` protos).  MLflow is a real ``mlflow server`` on 127.0.0.1 with a
SQLite store, queried through its REST API.  A fake W&B API key in the environment must land in no file.
"""

from __future__ import annotations

import csv
import json
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from avi_scale.engine.distributed import free_port

from helpers import VENV_BIN, launch_env, metric_rows

TINY_CONFIG = "engine"
SECRET = "wandb-secret-key-0123456789abcdef0123456789"
pytestmark = pytest.mark.slow


def _wandb_history(run_file: Path) -> list[dict]:
    """The ``history`` records of a W&B run file, as {metric: value}."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, header = run_file.read_bytes(), 32768, 7
    pos, pending, rows = header, b"", []
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        chunk = data[pos + header:pos + header + length]
        pos += header + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'store.db'}",
                             "--default-artifact-root", str(root / "artifacts")],
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=launch_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except (OSError, socket.timeout):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _api(url: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_csv_wandb_and_mlflow_receive_the_engines_metrics(config_file, mlflow_server, tmp_path):
    out = tmp_path / "run"
    cmd = [str(VENV_BIN / "avi-train"), str(config_file), f"train.output_dir={out}", "train.progress_bar=false",
           "logging.backends=[tensorboard,csv,wandb,mlflow]", "logging.wandb_mode=offline",
           "logging.group=tracking_test", f"logging.mlflow_tracking_uri={mlflow_server}"]
    env = launch_env(WANDB_API_KEY=SECRET, WANDB_SILENT="true", WANDB_DIR=str(out))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = metric_rows(out, "train")
    evals = metric_rows(out, "eval")
    assert train and evals
    # CSV: every train/eval scalar of metrics.jsonl, long form
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = {(int(r["step"]), r["metric"]): float(r["value"]) for r in rows}
    for t in train:
        assert logged[(t["step"], "train/loss")] == pytest.approx(t["loss"])
        assert logged[(t["step"], "train/kl_per_layer/01")] == pytest.approx(t["kl_per_layer"][0])
    assert logged[(evals[-1]["step"], "eval/val_nll")] == pytest.approx(evals[-1]["val_nll"])
    # W&B offline: the run file holds the same scalars at the same steps
    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    history = _wandb_history(run_file)
    losses = {int(h["_step"]): h["train/loss"] for h in history if "train/loss" in h}
    assert losses == pytest.approx({t["step"]: t["loss"] for t in train})
    # MLflow: the run in the experiment named by logging.group, its metric history over the REST API
    (experiment,) = [e for e in _api(mlflow_server, "experiments/search", {"max_results": 100})["experiments"]
                     if e["name"] == "tracking_test"]
    (run,) = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert json.loads((out / "trackers.json").read_text())["mlflow"] == run["info"]["run_id"]
    history = _api(mlflow_server, f"metrics/get-history?run_id={run['info']['run_id']}&metric_key=train/loss")
    assert {int(m["step"]): m["value"] for m in history["metrics"]} == pytest.approx(
        {t["step"]: t["loss"] for t in train})
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.num_layers"] == "2"
    # the API key is in no file the run wrote
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_bad_logging_settings_are_named(config_file, tmp_path):
    for override, message in (("logging.backends=[neptune]", "logging.backends: unknown backends ['neptune']"),
                              ("logging.mlflow_tracking_uri=http://me:pw@127.0.0.1:5000",
                               "logging.mlflow_tracking_uri: must not carry credentials")):
        proc = subprocess.run([str(VENV_BIN / "avi-train"), str(config_file), override, "--check"],
                              capture_output=True, text=True, env=launch_env())
        assert proc.returncode == 2 and message in proc.stderr
