"""The Ray Tune trial: one call of the engine's training loop, :func:`avi_scale.engine.train`.

A trial builds its config (the search's base config + its sampled values + where it writes), puts the
checkpoint Tune hands it where the engine resumes from, and trains:

* one process (``tune.workers_per_trial == 1``): ``train(cfg, report=...)`` runs in the trial's actor;
* several ranks: a Ray Train ``TorchTrainer`` started from the trial, whose workers call the same
  ``train`` inside the process group Ray Train set up; rank 0 hands each evaluation to the trial
  process through a Ray queue and waits until Tune has stored it.

Every evaluation of the engine (each ``train.eval_every`` steps and at the end) becomes one
``ray.tune.report(metrics, checkpoint=...)`` whose checkpoint is the engine's DeepSpeed checkpoint of
that step (a ``step00000120/`` tag directory, written by every rank).  Tune copies it into the trial's
storage, so schedulers can stop trials (ASHA), clone them (PBT) and restart them (``FailureConfig``,
``Tuner.restore``).

Restoring: the engine resumes from the newest complete checkpoint in ``<run dir>/checkpoints``.  When
Tune passes a checkpoint, :func:`place_checkpoint` decides what that directory holds: the trial's own
newer checkpoint stays (a crash after an unreported save loses nothing); a checkpoint of another trial
(PBT cloning) or a newer one replaces the directory; no checkpoint from Tune means a fresh start.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Optional

from avi_scale.config import ExperimentConfig, from_dict, to_dict
from avi_scale.tune.space import apply_overrides

MARKER = "tune_trial.json"  # written into each reported checkpoint: which trial reported it, at which step
_DROP = ("images", "checkpoint")  # engine metrics not sent to Tune as such (paths of PNGs; the tag directory)


def trial_run_dir(run_root: Optional[str], trial_id: str) -> Path:
    """Where a trial's engine run lives: ``<run_root>/<trial_id>``, or the trial's working directory."""
    if run_root:
        return Path(run_root) / trial_id
    return Path(os.getcwd()) / "run"


def trial_config(base: dict, overrides: dict[str, Any], run_dir: Optional[Path]) -> ExperimentConfig:
    """The config a trial trains: base + searched values, its own run directory, a checkpoint at each report.

    Every report must carry a checkpoint (ASHA and FailureConfig restart from it, PBT clones it), so
    ``train.checkpoint_every`` becomes ``train.eval_every`` unless it already divides it.
    """
    settings: dict[str, Any] = dict(overrides)
    if run_dir is not None:
        settings.update({"train.output_dir": str(run_dir), "train.checkpoint_dir": "", "train.resume": "auto"})
    cfg = apply_overrides(base, settings)
    every, eval_every = cfg.train.checkpoint_every, cfg.train.eval_every
    if eval_every < 1:
        raise ValueError("train.eval_every must be >= 1 in a search: Tune schedules trials by their evaluations")
    if every == 0 or eval_every % every != 0:
        cfg.train.checkpoint_every = eval_every
    cfg.train.progress_bar = False
    return cfg


def _complete_step(tag_dir: Path) -> int:
    from avi_scale.engine.checkpoint import COMPLETE

    marker = tag_dir / COMPLETE
    if not marker.is_file():
        raise RuntimeError(f"the checkpoint Tune restored ({tag_dir}) is not a complete avi-scale checkpoint "
                           f"(no {COMPLETE} file)")
    return int(json.loads(marker.read_text())["step"])


def place_checkpoint(checkpoint: Any, ckpt_dir: Path, trial_id: str) -> str:
    """Make ``ckpt_dir`` hold what this trial must resume from; returns what was done (for the log).

    ``checkpoint``: ``ray.tune.get_checkpoint()`` (None: Tune starts the trial from scratch).
    """
    from avi_scale.engine.checkpoint import LATEST, resolve, tag_for

    local = resolve(ckpt_dir) if ckpt_dir.is_dir() else None
    if checkpoint is None:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
            return f"fresh start (removed the checkpoints of an earlier attempt in {ckpt_dir})"
        return "fresh start"
    with checkpoint.as_directory() as d:
        src = Path(d)
        step = _complete_step(src)
        owner = json.loads((src / MARKER).read_text()).get("trial_id") if (src / MARKER).is_file() else None
        if owner == trial_id and local is not None and _complete_step(local) >= step:
            return f"resuming from this trial's own checkpoint {local} (Tune's is at step {step})"
        tmp = ckpt_dir.parent / f".{ckpt_dir.name}.incoming"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(src, tmp / tag_for(step))
        (tmp / LATEST).write_text(tag_for(step))
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, ckpt_dir)
    source = "this trial" if owner == trial_id else f"trial {owner}"
    return f"resuming from Tune's checkpoint of {source} at step {step}"


def tune_metrics(metrics: dict, run_dir: str) -> dict:
    """The engine's evaluation metrics as Tune records them (plain numbers and lists, plus paths)."""
    out = {k: v for k, v in metrics.items() if k not in _DROP}
    out["engine_checkpoint"] = metrics.get("checkpoint")
    out["run_dir"] = run_dir
    return out


def publish(metrics: dict, trial_id: str, run_dir: str) -> None:
    """``ray.tune.report`` one evaluation with the engine's checkpoint of that step."""
    from ray import tune

    path = metrics.get("checkpoint")
    checkpoint = None
    if path:
        (Path(path) / MARKER).write_text(json.dumps({"trial_id": trial_id, "step": metrics["step"]}) + "\n")
        checkpoint = tune.Checkpoint.from_directory(path)
    tune.report(tune_metrics(metrics, run_dir), checkpoint=checkpoint)


def run_trial(config: dict, *, base: dict, setup: dict) -> None:
    """The Tune function.  ``config``: the sampled values (dimension name -> value); ``base``: the search's
    resolved config dict; ``setup``: what :mod:`avi_scale.tune.search` fixed for every trial."""
    from ray import tune

    from avi_scale.tune.space import overrides_for, parse_space

    trial_id = tune.get_context().get_trial_id()
    dims = parse_space(base["tune"]["search_space"])
    run_dir = trial_run_dir(setup["run_root"], trial_id)
    cfg = trial_config(base, overrides_for(dims, config), run_dir)
    action = place_checkpoint(tune.get_checkpoint(), run_dir / "checkpoints", trial_id)
    print(f"avi-tune: trial {trial_id}: {action}; run directory {run_dir}", flush=True)
    if setup["workers"] > 1:
        _run_workers(cfg, setup, trial_id, run_dir)
    else:
        from avi_scale.engine import train

        train(cfg, report=lambda m: publish(m, trial_id, str(run_dir)))


# -- several ranks per trial: Ray Train workers -----------------------------------------------------
def worker_loop(loop_config: dict) -> None:
    """One Ray Train worker (one DeepSpeed rank): the engine's loop in Ray Train's process group."""
    import ray.train

    from avi_scale.engine import train

    cfg = from_dict(loop_config["config"])
    items, acks = loop_config["items"], loop_config["acks"]
    rank = ray.train.get_context().get_world_rank()

    def report(metrics: dict) -> None:
        # every rank gets the same metrics; rank 0 waits until Tune stored the checkpoint, the others
        # wait for rank 0 in the next collective, so no rank prunes the checkpoint before it is copied
        if rank == 0:
            items.put(metrics)
            acks.get()

    train(cfg, report=report)


def _run_workers(cfg: ExperimentConfig, setup: dict, trial_id: str, run_dir: Path) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    items: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    acks: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    resources = {"CPU": setup["cpus_per_worker"]}
    if setup["gpus_per_worker"] > 0:
        resources["GPU"] = setup["gpus_per_worker"]
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": to_dict(cfg), "items": items, "acks": acks},
        scaling_config=ScalingConfig(num_workers=setup["workers"], use_gpu=setup["gpus_per_worker"] > 0,
                                     resources_per_worker=resources),
        # retries are Tune's (the trial restarts from its checkpoint), so Ray Train itself does not retry
        run_config=RunConfig(name=f"attempt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             storage_path=str(run_dir / "ray_train"), failure_config=FailureConfig(max_failures=0)),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the trial's thread below, which raises it to Tune
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name=f"avi-tune-{trial_id}-trainer", daemon=True)
    thread.start()
    while True:
        try:
            metrics = items.get(timeout=0.5)
        except Empty:
            if thread.is_alive():
                continue
            break
        publish(metrics, trial_id, str(run_dir))
        acks.put(True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
