"""A Ray Tune search over the one config schema: load, check, run or resume, and write the results.

A search YAML is an experiment config (loaded by :func:`avi_scale.config.load_config`, usually on top
of a ``base:`` config file) whose ``tune:`` section says what to search and how; see docs/tune.md.  The search keeps
its resolved config in ``<storage>/<name>/avi_search.yaml``: ``--resume`` continues exactly that search
(Ray's saved trial parameters refer to it), whatever the YAML says now.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from avi_scale.config import ConfigError, ExperimentConfig, TuneConfig, from_dict, to_dict, to_yaml
from avi_scale.tune.space import PBT_MUTABLE_KEYS, Dimension, check_space, param_space, parse_space

TIME_ATTR = "step"  # schedulers count training steps (reported with every evaluation)
STATE_FILE = "avi_search.yaml"


def is_uri(path: str) -> bool:
    return "://" in path


def _absolute(path: str) -> str:
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


# -- planning --------------------------------------------------------------------------------------------
@dataclass
class SearchPlan:
    """A checked search: the resolved config (absolute paths) and everything derived from it."""

    cfg: ExperimentConfig
    dims: list[Dimension]
    name: str
    storage: str  # absolute directory or URI
    experiment_path: str
    run_root: Optional[str]  # parent of the trials' engine run directories (None: their working directories)
    results_dir: Path
    end_step: int
    grace_period: int
    perturbation_interval: int

    @property
    def depth_search(self) -> bool:
        return any("model.num_layers" in d.keys for d in self.dims)

    def num_trials(self) -> int:
        grid = 1
        for d in self.dims:
            if d.kind == "grid_search":
                grid *= len(d.args)
        return grid * self.cfg.tune.num_samples


def _require_package(alg: str, package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"tune.search_alg={alg} needs the {package!r} package, which is not installed "
                          f"(pip install {package}); or use tune.search_alg=random")


def _check_training(cfg: ExperimentConfig) -> None:
    """What a search needs of the run each trial is: data at absolute paths, evaluations Tune can see."""
    t, tu, d = cfg.train, cfg.tune, cfg.data
    for key in ("train_urls", "val_urls", "test_urls"):  # trials run in other working directories
        value = getattr(d, key)
        if value and not is_uri(value):
            setattr(d, key, _absolute(value))
    if not d.train_urls:
        raise ConfigError("data.train_urls: a search needs training data (a dataset directory or shard pattern)")
    if t.eval_every < 1:
        raise ConfigError("train.eval_every: must be >= 1 in a search (each evaluation is a Tune report; "
                          "schedulers act on them)")
    if t.stop_after and t.stop_after % t.eval_every:
        raise ConfigError(f"train.stop_after: {t.stop_after} is not a multiple of train.eval_every ({t.eval_every}); "
                          "in a search the last step must be an evaluation, so that Tune sees the end")
    if tu.metric.startswith("val_"):
        from avi_scale.data import split_urls

        try:
            split_urls(d, "val")
        except ValueError as exc:
            raise ConfigError(f"tune.metric={tu.metric} needs a validation split: {exc}") from None


def _check_schedule(tu: TuneConfig, dims: list[Dimension], end: int, grace: int, interval: int) -> None:
    """The scheduler and search algorithm can act on this space within ``end`` training steps."""
    if tu.scheduler == "asha" and grace > end:
        raise ConfigError(f"tune.grace_period: {grace} steps is beyond the end of training (step {end})")
    if tu.scheduler == "pbt":
        if not any(dim.pbt_mutable for dim in dims):
            raise ConfigError("tune.scheduler=pbt: no searched key can change when a trial clones another's "
                              f"checkpoint; search at least one of {list(PBT_MUTABLE_KEYS)}")
        if interval >= end:
            raise ConfigError(f"tune.perturbation_interval: {interval} steps leaves no perturbation before the end "
                              f"of training (step {end})")
    if tu.search_alg != "random":
        _require_package(tu.search_alg, tu.search_alg)
        grids = [dim.name for dim in dims if dim.kind == "grid_search"]
        if grids:
            raise ConfigError(f"tune.search_alg={tu.search_alg} samples its own points: grid_search is not "
                              f"supported (entries {grids}); use lists (choice) instead")
        if not dims:
            raise ConfigError(f"tune.search_alg={tu.search_alg} needs a non-empty tune.search_space")


def _locations(tu: TuneConfig, name: str) -> tuple[str, str, Optional[str], Path]:
    """(storage, experiment path, trials' run root or None, results directory), all absolute."""
    storage = _absolute(tu.storage)
    experiment_path = f"{storage.rstrip('/')}/{name}" if is_uri(storage) else str(Path(storage) / name)
    if tu.trial_output_root:
        if is_uri(tu.trial_output_root):
            raise ConfigError("tune.trial_output_root: must be a (shared) filesystem directory, not a URI")
        run_root: Optional[str] = _absolute(tu.trial_output_root)
    elif not is_uri(storage):
        run_root = str(Path(experiment_path) / "runs")
    else:
        run_root = None
    if tu.workers_per_trial > 1 and run_root is None:
        raise ConfigError("tune.workers_per_trial > 1 with remote tune.storage: set tune.trial_output_root to a "
                          "directory every node shares (the ranks write one DeepSpeed checkpoint together)")
    if tu.results_dir and is_uri(tu.results_dir):
        raise ConfigError("tune.results_dir: must be a local directory")
    if tu.results_dir:
        results_dir = Path(_absolute(tu.results_dir))
    elif not is_uri(storage):
        results_dir = Path(experiment_path)
    else:
        results_dir = Path(_absolute(f"runs/tune-results/{name}"))
    return storage, experiment_path, run_root, results_dir


def plan_search(cfg: ExperimentConfig) -> SearchPlan:
    """Check a search before anything starts; ConfigError naming the key on every problem.

    The config's own checks ran when it was loaded; these are the ones that only a search needs."""
    cfg = copy.deepcopy(cfg)
    t, tu = cfg.train, cfg.tune
    _check_training(cfg)
    dims = parse_space(tu.search_space)
    check_space(dims, to_dict(cfg))
    end = t.stop_after or t.steps
    grace = tu.grace_period or t.eval_every
    interval = tu.perturbation_interval or t.eval_every
    _check_schedule(tu, dims, end, grace, interval)
    name = tu.name or cfg.name
    if not tu.name:  # the config's name names the experiment's directory: the rule of tune.name applies to it
        tu.name = name
        tu.check()
    storage, experiment_path, run_root, results_dir = _locations(tu, name)
    tu.storage, tu.trial_output_root, tu.results_dir = storage, run_root or "", str(results_dir)
    return SearchPlan(cfg=cfg, dims=dims, name=name, storage=storage, experiment_path=experiment_path,
                      run_root=run_root, results_dir=results_dir, end_step=end, grace_period=grace,
                      perturbation_interval=interval)


# -- storage helpers (local directory or pyarrow URI) ----------------------------------------------------
def write_text(location: str, text: str) -> None:
    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(text.encode())
    else:
        p = Path(location)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def read_text(location: str) -> Optional[str]:
    if is_uri(location):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    p = Path(location)
    return p.read_text() if p.is_file() else None


# -- Ray Tune objects ------------------------------------------------------------------------------------
def trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _setup(plan: SearchPlan) -> dict:
    tu = plan.cfg.tune
    return {"run_root": plan.run_root, "experiment_path": plan.experiment_path, "workers": tu.workers_per_trial,
            "cpus_per_worker": tu.cpus_per_worker, "gpus_per_worker": tu.gpus_per_worker}


def make_trainable(plan: SearchPlan) -> Any:
    from ray import tune

    from avi_scale.tune.trainable import run_trial

    tu = plan.cfg.tune
    fn = tune.with_parameters(run_trial, base=to_dict(plan.cfg), setup=_setup(plan))
    resources = {"cpu": tu.cpus_per_trial}
    if tu.gpus_per_trial:
        resources["gpu"] = tu.gpus_per_trial
    return tune.with_resources(fn, resources)


def make_scheduler(plan: SearchPlan) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    tu = plan.cfg.tune
    if tu.scheduler == "asha":
        return ASHAScheduler(time_attr=TIME_ATTR, max_t=plan.end_step, grace_period=plan.grace_period,
                             reduction_factor=tu.reduction_factor)
    if tu.scheduler == "pbt":
        mutations = {d.name: d.mutation() for d in plan.dims if d.pbt_mutable}
        return PopulationBasedTraining(time_attr=TIME_ATTR, perturbation_interval=plan.perturbation_interval,
                                       hyperparam_mutations=mutations, quantile_fraction=tu.quantile_fraction,
                                       resample_probability=tu.resample_probability, synch=tu.pbt_synch)
    return FIFOScheduler()


def make_search_alg(plan: SearchPlan) -> Any:
    tu = plan.cfg.tune
    if tu.search_alg == "optuna":
        _require_package("optuna", "optuna")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=tu.seed)
    if tu.search_alg == "hyperopt":
        _require_package("hyperopt", "hyperopt")
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=tu.seed)
    from ray.tune.search import BasicVariantGenerator

    # the variant generator limits concurrency itself (Tune ignores max_concurrent_trials for it)
    return BasicVariantGenerator(random_state=tu.seed, max_concurrent=tu.max_concurrent)


def make_tuner(plan: SearchPlan, verbose: int = 1) -> Any:
    from ray import tune

    tu = plan.cfg.tune
    tune_config = tune.TuneConfig(
        metric=tu.metric, mode=tu.mode, search_alg=make_search_alg(plan), scheduler=make_scheduler(plan),
        num_samples=tu.num_samples, reuse_actors=False,
        max_concurrent_trials=(tu.max_concurrent or None) if tu.search_alg != "random" else None,
        trial_name_creator=trial_name, trial_dirname_creator=trial_name)
    run_config = tune.RunConfig(
        name=plan.name, storage_path=plan.storage, verbose=verbose,
        failure_config=tune.FailureConfig(max_failures=tu.max_failures),
        # without a run root the engine runs in the trials' working directories: upload them with the results
        sync_config=tune.SyncConfig(sync_artifacts=plan.run_root is None),
        # PBT keeps every checkpoint: a trial may clone one its donor has moved past in the meantime
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None if tu.scheduler == "pbt" else tu.keep_checkpoints))
    return tune.Tuner(make_trainable(plan), param_space=param_space(plan.dims), tune_config=tune_config,
                      run_config=run_config)


# -- running ---------------------------------------------------------------------------------------------
@dataclass
class SearchOutcome:
    plan: SearchPlan
    rows: list  # results.TrialRow, best first
    files: dict[str, Path]
    interrupted: bool  # some trials neither finished nor failed (Ctrl+C): resume with --resume
    num_errors: int

    @property
    def best(self):
        return self.rows[0] if self.rows and math.isfinite(self.rows[0].best) else None


def config_differences(a: ExperimentConfig, b: ExperimentConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict) and not prefix.endswith("search_space"):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else k)
        elif x != y:
            out.append(prefix)

    walk(dataclasses.asdict(a), dataclasses.asdict(b), "")
    return out


def _resumable_plan(plan: SearchPlan, resume: bool, retry_errored: bool, restart_errored: bool,
                    log: Callable[[str], None]) -> SearchPlan:
    """The plan to run: the saved one when resuming (whatever the YAML says now), else ``plan`` if no
    search of that name exists yet."""
    if (retry_errored or restart_errored) and not resume:
        raise ConfigError("--retry-errored/--restart-errored continue an existing search: add --resume")
    if retry_errored and restart_errored:
        raise ConfigError("choose one of --retry-errored (from the last checkpoint) and --restart-errored (from scratch)")
    from ray import tune

    saved_text = read_text(f"{plan.experiment_path}/{STATE_FILE}")
    if resume:
        if saved_text is None or not tune.Tuner.can_restore(plan.experiment_path):
            raise ConfigError(f"--resume: no avi-tune search to resume at {plan.experiment_path}")
        saved = plan_search(from_dict(yaml.safe_load(saved_text)))
        changed = config_differences(saved.cfg, plan.cfg)
        if changed:
            log(f"avi-tune: resuming the search as it was started; ignoring changes to {', '.join(changed)}")
        return saved
    if saved_text is not None or tune.Tuner.can_restore(plan.experiment_path):
        raise ConfigError(f"a search named {plan.name!r} already exists at {plan.experiment_path}: continue it "
                          "with --resume, or choose another tune.name")
    return plan


def run_search(cfg: ExperimentConfig, *, resume: bool = False, retry_errored: bool = False,
               restart_errored: bool = False, address: Optional[str] = None, num_cpus: Optional[int] = None,
               num_gpus: Optional[int] = None, ray_temp_dir: Optional[str] = None, verbose: int = 1,
               log: Callable[[str], None] = print) -> SearchOutcome:
    """Run (or, with ``resume``, continue) the search ``cfg`` describes and write its results.

    Uses the Ray instance this process is connected to; otherwise connects to ``address`` or starts a
    local one (``num_cpus``/``num_gpus``/``ray_temp_dir``) and shuts it down at the end.
    """
    from avi_scale.tune.results import UNFINISHED, collect, write_results

    import ray
    from ray import tune

    plan = _resumable_plan(plan_search(cfg), resume, retry_errored, restart_errored, log)

    if not is_uri(plan.storage):
        # Tune snapshots the experiment state (trial statuses, the searcher) at most every 10 s by default;
        # a driver killed outright (SIGKILL, OOM killer, a node lost) leaves the last snapshot, and
        # --resume reruns the trials that finished after it.  On local storage a snapshot is cheap: take
        # one at least every second.  (TUNE_GLOBAL_CHECKPOINT_S set by the user wins.)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=ray_temp_dir)
        started = True
    try:
        if resume:
            tuner = tune.Tuner.restore(plan.experiment_path, trainable=make_trainable(plan), resume_unfinished=True,
                                       resume_errored=retry_errored, restart_errored=restart_errored)
        else:
            write_text(f"{plan.experiment_path}/{STATE_FILE}", to_yaml(plan.cfg))
            tuner = make_tuner(plan, verbose)
        log(f"avi-tune: {'resuming' if resume else 'starting'} search {plan.name!r} at {plan.experiment_path} "
            f"({plan.num_trials()} trial(s), scheduler {plan.cfg.tune.scheduler}, metric {plan.cfg.tune.metric} "
            f"{plan.cfg.tune.mode})")
        grid = tuner.fit()
        rows = collect(grid, plan)
        # after Ctrl+C Ray marks the trials it stopped as terminated in memory (its saved state keeps
        # them running, so that a restore continues them): a trial that neither reached the end nor was
        # stopped by the scheduler, or a trial the search has not created yet, means it was interrupted
        interrupted = any(r.status == UNFINISHED for r in rows) or len(rows) < plan.num_trials()
        files = write_results(rows, plan)
        return SearchOutcome(plan=plan, rows=rows, files=files, interrupted=interrupted, num_errors=grid.num_errors)
    finally:
        if started:
            ray.shutdown()
