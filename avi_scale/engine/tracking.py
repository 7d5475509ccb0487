"""Experiment trackers behind one interface: TensorBoard, CSV, Weights & Biases and MLflow (``logging.backends``).

Rank 0's :class:`~avi_scale.engine.metrics.MetricsWriter` hands every record (``train``/``eval`` rows of
``metrics.jsonl``) and image grid to each tracker the config names.  Scalars are named ``<kind>/<key>``,
per-layer lists ``<kind>/<key>/<NN>`` (01 = the top layer), as in TensorBoard.  A resumed run continues
the same tracker run: W&B and MLflow run ids are kept in ``<output_dir>/trackers.json``.

Secrets never pass through the config: W&B reads ``WANDB_API_KEY`` (or its netrc), MLflow
``MLFLOW_TRACKING_TOKEN``/``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` from the environment,
and the config refuses a tracking URI with credentials in it.  Each backend's package is imported only
when it is named (``pip install wandb`` / ``mlflow``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, tag: str, grid: np.ndarray, step: int) -> None: ...
    def close(self) -> None: ...


def flatten(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """A metrics record -> ``{"<kind>/<key>": number}`` (lists: ``<kind>/<key>/<NN>``); non-numbers dropped."""
    out: dict[str, float] = {}
    for key, v in values.items():
        if key == "step":
            continue
        if isinstance(v, (list, tuple)):
            for i, u in enumerate(v):
                if isinstance(u, (int, float)) and not isinstance(u, bool):
                    out[f"{kind}/{key}/{i + 1:02d}"] = float(u)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{kind}/{key}"] = float(v)
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, initial_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=initial_step or None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, v in values.items():
            self._tb.add_scalar(key, v, step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        self._tb.add_image(tag, grid, step, dataformats="HWC")

    def close(self) -> None:
        self._tb.close()


class CSVTracker:
    """``metrics.csv`` in long form (step, metric, value): the columns never change as metrics come and go."""

    def __init__(self, run_dir: Path, initial_step: int):
        path = run_dir / "metrics.csv"
        kept: list[list[str]] = []
        if path.exists() and initial_step > 0:  # a resumed run keeps what was logged up to its step
            with open(path, newline="") as f:
                kept = [row for row in list(csv.reader(f))[1:] if len(row) == 3 and row[0].isdigit()
                        and int(row[0]) <= initial_step]
        self._file = open(path, "w", newline="", buffering=1)
        self._csv = csv.writer(self._file)
        self._csv.writerows([["step", "metric", "value"], *kept])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._csv.writerows([step, key, repr(v)] for key, v in values.items())

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:  # images: the PNGs and TensorBoard
        pass

    def close(self) -> None:
        self._file.close()


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if math.isfinite(v)}


class WandbTracker:
    def __init__(self, run_dir: Path, settings: Any, name: str, run_id: Optional[str], config: dict):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=settings.wandb_project, entity=settings.wandb_entity or None, name=name,
                              group=settings.group or None, dir=str(run_dir), id=run_id, resume="allow",
                              mode=settings.wandb_mode or None, config=config)
        self.run_id = self.run.id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(_finite(values), step=step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        self.run.log({tag: self._wandb.Image(grid)}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, settings: Any, name: str, run_id: Optional[str], params: dict[str, Any]):
        import mlflow

        self._mlflow = mlflow
        if settings.mlflow_tracking_uri:
            mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        experiment = mlflow.set_experiment(settings.group or name)
        if run_id is None:
            run = mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name)
            mlflow.log_params(params)
        else:
            run = mlflow.start_run(run_id=run_id)
        self.run_id = run.info.run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._mlflow.log_metrics(_finite(values), step=step)

    def image(self, tag: str, grid: np.ndarray, step: int) -> None:
        self._mlflow.log_image(grid, key=tag, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def _flat_params(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return out


def build_trackers(settings: Any, run_dir: Path, initial_step: int, run_name: str, config: dict) -> list[Tracker]:
    """The trackers ``settings`` (a :class:`~avi_scale.config.LoggingConfig`) names, for rank 0's run in
    ``run_dir``; a resumed run (``initial_step > 0``) continues the W&B/MLflow runs recorded there."""
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() and initial_step > 0 else {}
    name = settings.run_name or run_name
    trackers: list[Tracker] = []
    for backend in settings.backends:
        if backend == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, initial_step))
        elif backend == "csv":
            trackers.append(CSVTracker(run_dir, initial_step))
        elif backend == "wandb":
            tracker = WandbTracker(run_dir, settings, name, ids.get("wandb"), config)
            ids["wandb"] = tracker.run_id
            trackers.append(tracker)
        elif backend == "mlflow":
            tracker = MLflowTracker(settings, name, ids.get("mlflow"), _flat_params(config))
            ids["mlflow"] = tracker.run_id
            trackers.append(tracker)
    if ids:
        ids_path.write_text(json.dumps(ids) + "\n")
    return trackers
