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
from typing import Any, Callable, Optional

from avi_scale.config import ExperimentConfig, apply_overrides, from_dict, to_dict

EVENTS = "tune_events.log"  # in each trial's run directory: one line per start, restore and end
MARKER = "tune_trial.json"  # written into each reported checkpoint: which trial reported it, at which step
_DROP = ("images", "checkpoint")  # engine metrics not sent to Tune as such (paths of PNGs; the tag directory)


def trial_dirs(setup: dict, trial_id: str) -> tuple[Path, Path, str]:
    """(engine run directory, engine checkpoint directory, where the run directory is kept for good).

    With ``run_root`` (local storage or ``tune.trial_output_root``): ``<run_root>/<trial_id>`` and its
    ``checkpoints/``.  Otherwise (remote storage) the run lives in ``run/`` of the trial's working
    directory, which Tune uploads as artifacts to ``<experiment>/trial_<id>/run``; the engine
    checkpoints sit beside the working directory, as Tune stores each reported one itself.
    """
    if setup["run_root"]:
        run_dir = Path(setup["run_root"]) / trial_id
        return run_dir, run_dir / "checkpoints", str(run_dir)
    work = Path(os.getcwd())
    return work / "run", work.parent / f"{work.name}.checkpoints", f"{setup['experiment_path']}/trial_{trial_id}/run"


def trial_config(base: dict, overrides: dict[str, Any], run_dir: Optional[Path],
                 ckpt_dir: Optional[Path] = None, trial_id: str = "") -> ExperimentConfig:
    """The config a trial trains: base + searched values, its own run directory, a checkpoint at each report,
    and its own tracker run (``logging.run_name`` ``<search>_<trial id>``, grouped under the search's name).

    Every report must carry a checkpoint (ASHA and FailureConfig restart from it, PBT clones it), so
    ``train.checkpoint_every`` becomes ``train.eval_every`` unless it already divides it.
    """
    settings: dict[str, Any] = dict(overrides)
    if run_dir is not None:
        settings.update({"train.output_dir": str(run_dir), "train.resume": "auto",
                         "train.checkpoint_dir": "" if ckpt_dir is None or ckpt_dir == run_dir / "checkpoints"
                         else str(ckpt_dir)})
    cfg = apply_overrides(base, settings)
    every, eval_every = cfg.train.checkpoint_every, cfg.train.eval_every
    if eval_every < 1:
        raise ValueError("train.eval_every must be >= 1 in a search: Tune schedules trials by their evaluations")
    if every == 0 or eval_every % every != 0:
        cfg.train.checkpoint_every = eval_every
    cfg.train.progress_bar = False
    search = cfg.tune.name or cfg.name
    cfg.logging.group = cfg.logging.group or search
    if trial_id:
        cfg.logging.run_name = f"{cfg.logging.run_name or search}_{trial_id}"
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
    source = "this trial" if owner == trial_id else (f"trial {owner}" if owner else "an unknown trial")
    return f"resuming from Tune's checkpoint of {source} at step {step}"


def tune_metrics(metrics: dict, run_dir: str) -> dict:
    """The engine's evaluation metrics as Tune records them (plain numbers and lists, plus paths)."""
    out = {k: v for k, v in metrics.items() if k not in _DROP}
    out["engine_checkpoint"] = metrics.get("checkpoint")
    out["run_dir"] = run_dir
    return out


class Reports:
    """The engine's ``report`` hook: forwards each evaluation at once, except the one at the end of training.

    The engine reports its final evaluation before it writes the consolidated export and returns; Tune
    may end a trial from inside that report (ASHA stops every trial at ``max_t``), which would cut the
    run short.  So the last evaluation is held and sent by :meth:`flush` once ``train`` has returned.
    """

    def __init__(self, send: Callable[[dict], None], cfg: ExperimentConfig):
        self.send = send
        self.end_step = cfg.train.stop_after or cfg.train.steps
        self.held: Optional[dict] = None

    def __call__(self, metrics: dict) -> None:
        if metrics["step"] >= self.end_step:
            self.held = metrics
        else:
            self.send(metrics)

    def flush(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.send(held)


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
    run_dir, ckpt_dir, location = trial_dirs(setup, trial_id)
    cfg = trial_config(base, overrides_for(dims, config), run_dir, ckpt_dir, trial_id)
    action = place_checkpoint(tune.get_checkpoint(), ckpt_dir, trial_id)
    log_event(run_dir, f"trial {trial_id} starts ({setup['workers']} rank(s)): {action}")
    try:
        if setup["workers"] > 1:
            _run_workers(cfg, setup, trial_id, run_dir, location)
        else:
            from avi_scale.engine import train

            reports = Reports(lambda m: publish(m, trial_id, location), cfg)
            train(cfg, report=reports)
            reports.flush()
    except SystemExit:  # Tune ends a trial from inside ray.tune.report (ASHA stop, PBT pause, Ctrl+C)
        log_event(run_dir, f"trial {trial_id} stopped by Tune")
        raise
    except BaseException as exc:
        log_event(run_dir, f"trial {trial_id} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise
    log_event(run_dir, f"trial {trial_id} finished")


def log_event(run_dir: Path, message: str) -> None:
    """A line in ``<run dir>/tune_events.log`` (and the trial's stdout): the trial's starts, restores, ends."""
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
    print(f"avi-tune: {line}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / EVENTS, "a") as f:
        f.write(line + "\n")


# -- several ranks per trial: Ray Train workers -----------------------------------------------------
def worker_loop(loop_config: dict) -> None:
    """One Ray Train worker (one DeepSpeed rank): the engine's loop in Ray Train's process group."""
    import ray.train

    from avi_scale.engine import train

    cfg = from_dict(loop_config["config"])
    items, acks = loop_config["items"], loop_config["acks"]
    rank = ray.train.get_context().get_world_rank()

    def send(metrics: dict) -> None:
        # every rank gets the same metrics; rank 0 waits until Tune stored the checkpoint, the others
        # wait for rank 0 in the next collective, so no rank prunes the checkpoint before it is copied
        if rank == 0:
            items.put(metrics)
            acks.get()

    reports = Reports(send, cfg)
    train(cfg, report=reports)
    reports.flush()


def _run_workers(cfg: ExperimentConfig, setup: dict, trial_id: str, run_dir: Path, location: str) -> None:
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
        publish(metrics, trial_id, location)
        acks.put(True)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
