"""Ray Tune searches (avi_scale.tune) on CPU with a local Ray (num_cpus=2) and real MNIST digits.

Every trial is a real run of the engine's training loop (``avi_scale.engine.train``) on shards written by
``avi-shards mnist5k``, with a tiny model (1-2 latent layers, 4 filters, batches of 16, 8-12 steps,
an evaluation and checkpoint every 4 steps): ASHA stops weak trials, PBT clones checkpoints, a crashed
trial is retried from its checkpoint, an interrupted search (SIGINT to ``avi-tune``) is resumed with
``--resume``, and a trial can be a 2-rank Ray Train job.  Every test that starts Ray shuts it down.

Ray's worker processes inherit this process's environment: the ``worker_env`` fixture puts the venv's
``bin`` first on PATH and gives these tests their own TORCH_EXTENSIONS_DIR, so DeepSpeed's CPU
shared-memory op is built once by the venv's ninja and then reused (a shared cache that processes with
another ninja on PATH also build into is rebuilt, ~1 minute, whenever the ninja changes).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from avi_scale.config import ConfigError, load_config
from avi_scale.tune.search import plan_search

from helpers import LAUNCH_VARS, REPO, VENV_BIN

SEARCH = REPO / "configs" / "search" / "tiny_mnist5k_depth_lr.yaml"
STUDY = REPO / "configs" / "search" / "cifar10_depth_study.yaml"


# -- fixtures and helpers (shards: tests/conftest.py) ------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def worker_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.setenv("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions_tune"))
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("DS_ACCELERATOR", "cpu")
        mp.setenv("RAY_AUTH_MODE", "disabled")
        for key in LAUNCH_VARS:
            mp.delenv(key, raising=False)
        yield


@pytest.fixture
def ray_local():
    import ray

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert not ray.is_initialized()


def _search(shards: Path, store: Path, *overrides: str, path: Path = SEARCH):
    return load_config(path, [f"data.train_urls={shards}", f"tune.storage={store}", *overrides])


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _events(run_dir: str | Path) -> list[str]:
    return (Path(run_dir) / "tune_events.log").read_text().splitlines()


def _trial_dir(experiment: Path, trial_id: str) -> Path:
    return experiment / f"trial_{trial_id}"


def _result_lines(experiment: Path, trial_id: str) -> list[dict]:
    return [json.loads(line) for line in (_trial_dir(experiment, trial_id) / "result.json").read_text().splitlines()]


# -- no Ray: the command line, the search space, bad input -------------------------------------------
def test_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys\nfrom avi_scale.tune.cli import tune_main\n"
            "try:\n    tune_main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print('HEAVY', sorted(m for m in ('ray', 'torch', 'deepspeed', 'webdataset') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: avi-tune" in out and "--resume" in out and "search_space" in out
    assert "HEAVY []" in out


def test_search_space_maps_onto_ray_domains(shards):
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

    from avi_scale.config import apply_overrides
    from avi_scale.tune.space import overrides_for, param_space, parse_space

    space = {
        "model.num_layers": [1, 2],
        "optim.lr": {"loguniform": [1e-4, 1e-2]},
        "optim.weight_decay": {"uniform": [0.0, 3e-4]},
        "train.kl_warmup_steps": {"randint": [2, 6]},
        "optim.eps": {"qloguniform": [1e-4, 1e-2, 1e-4]},
        "model.num_filters": {"grid_search": [4, 8]},
        "model": {"latent_channels": {"choice": [4, 8]}},
        "model.prior_attention.enabled,model.posterior_attention.enabled": {"grid_search": [True, False]},
    }
    dims = parse_space(space)
    ps = param_space(dims)
    assert isinstance(ps["model.num_layers"], Categorical) and ps["model.num_layers"].categories == [1, 2]
    assert isinstance(ps["optim.lr"], Float) and isinstance(ps["optim.lr"].get_sampler(), LogUniform)
    assert (ps["optim.lr"].lower, ps["optim.lr"].upper) == (1e-4, 1e-2)
    assert isinstance(ps["train.kl_warmup_steps"], Integer) and ps["train.kl_warmup_steps"].upper == 6
    assert ps["model.num_filters"] == {"grid_search": [4, 8]}
    assert isinstance(ps["model.latent_channels"], Categorical)  # nested mapping -> dotted key
    for _ in range(20):
        lr = ps["optim.lr"].sample()
        assert 1e-4 <= lr <= 1e-2
        assert 2 <= ps["train.kl_warmup_steps"].sample() < 6
    # a sampled point (numpy scalars, as Ray produces them) becomes a valid config; a comma-joined
    # entry sets each of its keys
    import numpy as np

    point = {"model.num_layers": np.int64(2), "optim.lr": np.float64(3e-3), "optim.weight_decay": 1e-4,
             "train.kl_warmup_steps": 3, "optim.eps": 2e-3, "model.num_filters": 8, "model.latent_channels": 4,
             "model.prior_attention.enabled,model.posterior_attention.enabled": False}
    over = overrides_for(dims, point)
    assert over["model.prior_attention.enabled"] is False and over["model.posterior_attention.enabled"] is False
    base = load_config(SEARCH.parent.parent / "tiny_mnist5k.yaml", [f"data.train_urls={shards}"])
    from avi_scale.config import to_dict

    cfg = apply_overrides(to_dict(base), over)
    assert (cfg.model.num_layers, cfg.optim.lr, cfg.model.num_filters) == (2, 3e-3, 8)
    assert type(cfg.model.num_layers) is int and not cfg.model.posterior_attention.enabled


def test_search_files_resolve(shards, tmp_path):
    plan = plan_search(_search(shards, tmp_path / "store"))
    assert plan.num_trials() == 4 and plan.depth_search and plan.end_step == 12
    assert [d.name for d in plan.dims] == ["optim.lr", "model.num_layers"]
    assert plan.experiment_path == str(tmp_path / "store" / "tiny_mnist5k_depth_lr")
    assert plan.run_root == str(tmp_path / "store" / "tiny_mnist5k_depth_lr" / "runs")
    study = plan_search(load_config(STUDY, [f"data.train_urls={shards}"]))  # the paper's Table 1 grid
    assert study.num_trials() == 10 and study.cfg.tune.workers_per_trial == 4
    assert study.cfg.model.num_filters == 128  # from its base, cifar10_attentive.yaml
    attention = study.dims[1]
    assert attention.keys == ("model.prior_attention.enabled", "model.posterior_attention.enabled")
    assert list(study.dims[0].args) == [2, 4, 8, 16, 30]
    # a search file on top of another one: its search space replaces the base's; dotlist entries add to it
    derived = tmp_path / "derived.yaml"
    derived.write_text(f"base: {SEARCH}\ntune:\n  scheduler: fifo\n  search_space:\n"
                       "    optim.lr: {grid_search: [1.0e-2, 3.0e-3, 1.0e-3]}\n")
    plan = plan_search(_search(shards, tmp_path, "tune.search_space.model.num_filters=[4,8]", path=derived))
    assert [d.name for d in plan.dims] == ["optim.lr", "model.num_filters"] and plan.cfg.tune.scheduler == "fifo"
    plan = plan_search(_search(shards, tmp_path, "tune.search_space.optim.lr={loguniform: [1.0e-4, 1.0e-2]}"))
    assert [(d.name, d.kind) for d in plan.dims] == [("model.num_layers", "grid_search"), ("optim.lr", "loguniform")]


BAD = [
    ({"model.num_layerz": [1, 2]}, [], "unknown config key 'model.num_layerz'"),
    ({"model.num_layers": {"uniform": [1, 4]}}, [], "uniform draws floats but model.num_layers is int"),
    ({"optim.lr": {"loguniform": [0, 1e-2]}}, [], "loguniform needs low > 0"),
    ({"optim.lr": {"loguniform": [1e-2, 1e-3]}}, [], "loguniform needs low < high"),
    ({"optim.lr": {"loguniform": [1e-3]}}, [], "loguniform takes [low, high]"),
    ({"optim.lr": {"logunifrom": [1e-3, 1e-2]}}, [], "optim.lr is a value, not a section"),
    ({"optim.lr": 1e-3}, [], "fixed values belong in the config sections"),
    ({"train.output_dir": ["a", "b"]}, [], "set by avi-tune for every trial"),
    ({"model.num_layers": [0, 2]}, [], "value 0 gives an invalid config: model.num_layers: must be >= 1"),
    ({"model.num_layers": [1, 2]}, ["tune.scheduler=pbt"], "tune.scheduler=pbt: no searched key can change"),
    ({"optim.lr": [1e-3]}, ["tune.metric=val_elbo"], "tune.metric: 'val_elbo' is not reported by the engine"),
    ({"optim.lr": [1e-3]}, ["train.eval_every=0"], "train.eval_every: must be >= 1 in a search"),
    ({"optim.lr": {"grid_search": [1e-3]}}, ["tune.search_alg=hyperopt"], "tune.search_alg=hyperopt"),
    ({"optim.lr": [1e-3]}, ["tune.reduction_factor=1"], "tune.reduction_factor: must be > 1"),
]


@pytest.mark.parametrize("space,extra,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_search_input_is_named(shards, tmp_path, space, extra, message):
    import yaml

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"base": str(SEARCH), "tune": {"search_space": space}}))
    with pytest.raises(ConfigError) as err:
        plan_search(_search(shards, tmp_path, *extra, path=path))
    assert message in str(err.value)


def test_cli_reports_bad_input_and_refuses_to_overwrite_a_search(shards, tmp_path, capsys):
    from avi_scale.tune.cli import tune_main

    assert tune_main([str(tmp_path / "missing.yaml")]) == 2
    assert "search file not found" in capsys.readouterr().err
    assert tune_main([str(SEARCH), f"data.train_urls={shards}", "tune.max_concurrent=-1"]) == 2
    assert "tune.max_concurrent: must be >= 0" in capsys.readouterr().err
    assert tune_main([str(SEARCH), f"data.train_urls={shards}", f"tune.storage={tmp_path}", "--resume"]) == 2
    assert "--resume: no avi-tune search to resume at" in capsys.readouterr().err
    (tmp_path / "tiny_mnist5k_depth_lr").mkdir()
    (tmp_path / "tiny_mnist5k_depth_lr" / "avi_search.yaml").write_text("name: x\n")
    assert tune_main([str(SEARCH), f"data.train_urls={shards}", f"tune.storage={tmp_path}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert tune_main([str(SEARCH), f"data.train_urls={shards}", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "search 'tiny_mnist5k_depth_lr': 4 trial(s)" in out and f"train_urls: {shards}" in out


# -- with a local Ray -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_asha_depth_lr_search_stops_weak_trials_and_writes_results(shards, tmp_path, ray_local):
    from avi_scale.tune import run_search

    store = tmp_path / "store"
    outcome = run_search(_search(shards, store), verbose=0, log=lambda m: None)
    experiment = store / "tiny_mnist5k_depth_lr"
    rows = outcome.rows
    assert not outcome.interrupted and outcome.num_errors == 0 and len(rows) == 4
    statuses = {r.trial_id: r.status for r in rows}
    assert set(statuses.values()) <= {"finished", "stopped early"}
    stopped = [r for r in rows if r.status == "stopped early"]
    finished = [r for r in rows if r.status == "finished"]
    assert stopped and finished, statuses
    assert all(r.last_step < 12 for r in stopped) and all(r.last_step == 12 for r in finished)
    assert {(r.params["model.num_layers"], r.params["optim.lr"]) for r in rows} == {(1, 1e-2), (2, 1e-2), (1, 1e-6), (2, 1e-6)}
    # every trial trained its own values through the engine: resolved config and metrics in its run dir
    for r in rows:
        run_cfg = load_config(Path(r.run_dir) / "config.yaml")
        assert (run_cfg.model.num_layers, run_cfg.optim.lr) == (r.params["model.num_layers"], r.params["optim.lr"])
        assert run_cfg.train.checkpoint_every == 4 and Path(r.run_dir).parent == experiment / "runs"
        evals = [json.loads(line) for line in (Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals if e["kind"] == "eval"] == list(range(4, r.last_step + 1, 4))
        reported = _result_lines(experiment, r.trial_id)
        assert [x["step"] for x in reported] == list(range(4, r.last_step + 1, 4))
        assert all(x["val_bpd"] > 0 and x["engine_checkpoint"].endswith(f"step{x['step']:08d}") for x in reported)
        assert r.best == min(x["val_nll"] for x in reported)
    assert all((Path(r.run_dir) / "final" / "model.pt").is_file() for r in finished)
    # the best trial is the best value of any report; its Tune checkpoint is the engine's, tagged
    best = outcome.best
    assert best is rows[0] and best.best == min(r.best for r in rows)
    tune_ckpt = Path(best.checkpoint)
    assert (tune_ckpt / "COMPLETE").is_file() and (tune_ckpt / "mp_rank_00_model_states.pt").is_file()
    assert json.loads((tune_ckpt / "tune_trial.json").read_text())["trial_id"] == best.trial_id
    # the results: CSV and Markdown of every trial, the best config ready for avi-train, the depth plot
    files = outcome.files
    assert set(files) == {"csv", "markdown", "best_config", "depth_plot"}
    table = _csv_rows(files["csv"])
    assert [t["trial_id"] for t in table] == [r.trial_id for r in rows]
    assert {"status", "optim.lr", "model.num_layers", "best_val_nll", "best_step", "val_bpd"} <= set(table[0])
    assert float(table[0]["best_val_nll"]) == pytest.approx(best.best, rel=1e-4)
    md = files["markdown"].read_text()
    assert all(f"| {r.trial_id} | {r.status} |" in md for r in rows) and "## val_nll by depth" in md
    best_cfg = load_config(files["best_config"])
    assert best_cfg.model.num_layers == best.params["model.num_layers"] and best_cfg.optim.lr == best.params["optim.lr"]
    assert best_cfg.data.train_urls == str(shards) and best_cfg.train.output_dir == "runs/tiny_mnist5k_depth_lr-best"
    assert best_cfg.train.steps == 12 and best_cfg.tune.search_space == {}
    assert files["depth_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert files["csv"].parent == experiment and (experiment / "avi_search.yaml").is_file()


@pytest.mark.slow
def test_crashed_trial_is_retried_from_its_checkpoint(shards, tmp_path, ray_local):
    """The engine's fault injection makes step 5's loss NaN and one skipped step fatal: the trial raises
    TrainingDiverged after checkpointing step 6.  With a retry Tune restarts it and it finishes; without
    one it ends as an error."""
    from avi_scale.tune import run_search

    crash = ["train.steps=8", "train.debug_nan_steps=[5]", "train.max_consecutive_skips=1", "tune.scheduler=fifo",
             "tune.search_space={model.num_layers: [1]}"]
    outcome = run_search(_search(shards, tmp_path / "retry", "tune.max_failures=1", *crash), verbose=0,
                         log=lambda m: None)
    (row,) = outcome.rows
    assert outcome.num_errors == 0 and row.status == "finished" and row.last_step == 8
    events = _events(row.run_dir)
    assert "fresh start" in events[0] and "failed: TrainingDiverged" in events[1]
    assert "resuming from this trial's own checkpoint" in events[2] and "step00000006" in events[2]
    assert "finished" in events[-1] and len(events) == 4
    assert "TrainingDiverged" in (_trial_dir(tmp_path / "retry" / "tiny_mnist5k_depth_lr", row.trial_id) / "error.txt").read_text()
    rows = [json.loads(line) for line in (Path(row.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8] and rows[-1]["skipped_steps"] == 1

    outcome = run_search(_search(shards, tmp_path / "no_retry", "tune.max_failures=0", *crash), verbose=0,
                         log=lambda m: None)
    (row,) = outcome.rows
    assert outcome.num_errors == 1 and row.status == "error" and "consecutive steps skipped" in row.error
    assert len([e for e in _events(row.run_dir) if "failed: TrainingDiverged" in e]) == 1
    assert "| error |" in outcome.files["markdown"].read_text()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Consider boosting PBT performance")
def test_pbt_clones_the_better_trials_checkpoint(shards, tmp_path, ray_local):
    """Synchronous PBT over two learning rates: at the first perturbation (step 4) the weak trial
    (lr 1e-6) takes over the strong one's (lr 1e-2) engine checkpoint and trains on from its step."""
    from avi_scale.tune import run_search

    cfg = _search(shards, tmp_path / "store", "train.steps=8", "tune.scheduler=pbt", "tune.perturbation_interval=4",
                  "tune.quantile_fraction=0.5", "tune.resample_probability=0.0", "tune.pbt_synch=true",
                  "tune.search_space={optim.lr: {grid_search: [1.0e-2, 1.0e-6]}}")
    outcome = run_search(cfg, verbose=0, log=lambda m: None)
    assert outcome.num_errors == 0 and len(outcome.rows) == 2
    assert all(r.status == "finished" and r.last_step == 8 for r in outcome.rows)
    experiment = tmp_path / "store" / "tiny_mnist5k_depth_lr"
    # grid order: trial ..._00000 started with lr 1e-2, ..._00001 with lr 1e-6 (Ray's PBT log agrees)
    strong, weak = sorted(outcome.rows, key=lambda r: r.trial_id)
    policy = [json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()]
    assert policy[0][0].startswith("1_") and policy[0][1].startswith("0_") and policy[0][4] == {"optim.lr": 1e-2}
    clones = sorted((line, r.trial_id) for r in outcome.rows for line in _events(r.run_dir) if "checkpoint of trial" in line)
    first_event, cloner = clones[0]
    assert cloner == weak.trial_id and f"checkpoint of trial {strong.trial_id} at step 4" in first_event, clones
    # the clone's engine run continued from step 4 with the strong trial's weights and its own new config
    # (synchronous PBT also pauses both trials at step 8, the end: a restart there evaluates step 8 again)
    rows = [json.loads(line) for line in (Path(weak.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    assert evals[:2] == [4, 8] and set(evals) == {4, 8}
    run_cfg = load_config(Path(weak.run_dir) / "config.yaml")
    assert run_cfg.optim.lr in (1e-2, 1e-6) and run_cfg.optim.lr == weak.params["optim.lr"]


@pytest.mark.slow
def test_trial_with_two_ray_train_workers(shards, tmp_path, ray_local):
    from avi_scale.tune import run_search

    cfg = _search(shards, tmp_path / "store", "train.steps=8", "tune.scheduler=fifo", "tune.workers_per_trial=2",
                  "tune.cpus_per_trial=1", "tune.cpus_per_worker=0.5", "tune.search_space={model.num_layers: [1]}")
    outcome = run_search(cfg, verbose=0, log=lambda m: None)
    (row,) = outcome.rows
    assert outcome.num_errors == 0 and row.status == "finished" and row.last_step == 8
    for step in (4, 8):
        complete = json.loads((Path(row.run_dir) / "checkpoints" / f"step{step:08d}" / "COMPLETE").read_text())
        assert complete == {**complete, "step": step, "world_size": 2}
    assert (Path(row.checkpoint) / "COMPLETE").is_file() and "2 rank(s)" in _events(row.run_dir)[0]
    final = [json.loads(line) for line in (Path(row.run_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "final" and final["params_consistent"] and len(final["param_sha256"]) == 2


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(shards, tmp_path):
    """avi-tune is stopped with SIGINT while its second of three trials (run one at a time) trains;
    ``--resume`` continues that trial from its checkpoint, runs the third and leaves the first alone."""
    store = tmp_path / "store"
    experiment = store / "tiny_mnist5k_depth_lr"
    args = [sys.executable, "-m", "avi_scale.tune.cli", str(SEARCH), f"data.train_urls={shards}",
            f"tune.storage={store}", "tune.scheduler=fifo", "tune.max_concurrent=1",
            "tune.search_space={optim.lr: {grid_search: [1.0e-2, 5.0e-3, 2.0e-3]}}", "model.num_layers=1",
            "--num-cpus", "2", "--verbose", "0"]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        with open(tmp_path / "first.log", "w") as log:
            proc = subprocess.Popen(args + ["--ray-temp-dir", temp], stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.time() + 420
            second = None
            while second is None and time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
                runs = sorted((experiment / "runs").glob("*")) if (experiment / "runs").is_dir() else []
                done = [r for r in runs if (r / "final" / "model.pt").is_file()]
                busy = [r for r in runs if r not in done and (r / "checkpoints" / "step00000004" / "COMPLETE").is_file()
                        and list(_trial_dir(experiment, r.name).glob("checkpoint_*"))]
                if len(done) == 1 and busy:
                    second = busy[0]
            assert second is not None, (tmp_path / "first.log").read_text()[-3000:]
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(temp, ignore_errors=True)
    # the third trial may not exist yet (the search creates trials as slots free up)
    first = {t["trial_id"]: t for t in _csv_rows(experiment / "results.csv")}
    assert 2 <= len(first) <= 3 and first[second.name]["status"] == "unfinished"
    assert sorted(t["status"] for t in first.values()) == ["finished"] + ["unfinished"] * (len(first) - 1)
    (done_id,) = [tid for tid, t in first.items() if t["status"] == "finished"]
    done_results = _result_lines(experiment, done_id)
    done_metrics = (experiment / "runs" / done_id / "metrics.jsonl").read_text()
    second_eval = [line for line in (second / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line]
    assert len(second_eval) >= 1
    assert "--resume" in (tmp_path / "first.log").read_text()

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        resumed = subprocess.run(args + ["--resume", "--ray-temp-dir", temp], capture_output=True, text=True,
                                 env=env, timeout=420)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    final = {t["trial_id"]: t for t in _csv_rows(experiment / "results.csv")}
    assert len(final) == 3 and set(first) <= set(final) and all(t["status"] == "finished" for t in final.values())
    # the finished trial was not run again: its Tune results and engine metrics are untouched
    assert _result_lines(experiment, done_id) == done_results
    assert (experiment / "runs" / done_id / "metrics.jsonl").read_text() == done_metrics
    assert len(_events(experiment / "runs" / done_id)) == 2
    # the interrupted trial went on from a checkpoint rather than from scratch: its evaluations from
    # before the interruption are kept as they were, and it went on to the end
    events = _events(second)
    assert "fresh start" in events[0] and any("resuming from" in e for e in events[1:]), events
    assert not any("fresh start" in e for e in events[1:])
    # (when Ctrl+C came after its last step but before Tune got that report, the trial resumes from its
    # own step-12 checkpoint and the engine evaluates step 12 once more)
    after = (second / "metrics.jsonl").read_text().splitlines()
    assert all(line in after for line in second_eval)
    assert [json.loads(line)["step"] for line in after if '"kind": "eval"' in line] in ([4, 8, 12], [4, 8, 12, 12])
    (third,) = set(final) - {done_id, second.name}
    assert "fresh start" in _events(experiment / "runs" / third)[0]


@pytest.mark.slow
def test_search_stored_in_s3(shards, tmp_path, ray_local, monkeypatch):
    """tune.storage=s3://... on a local S3-compatible server: Tune keeps the experiment, the engine
    checkpoints and (as artifacts) each trial's run directory there; the tables are written locally."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from avi_scale.tune import run_search

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="avi-tune-test")
        cfg = _search(shards, "s3://avi-tune-test/searches", "train.steps=8", "tune.scheduler=fifo",
                      f"tune.results_dir={tmp_path / 'results'}", "tune.search_space={model.num_layers: [1]}")
        outcome = run_search(cfg, verbose=0, log=lambda m: None)
        (row,) = outcome.rows
        assert outcome.num_errors == 0 and row.status == "finished"
        prefix = f"searches/tiny_mnist5k_depth_lr/trial_{row.trial_id}/"
        assert row.run_dir == f"s3://avi-tune-test/{prefix}run" and row.checkpoint.startswith("avi-tune-test/" + prefix)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="avi-tune-test")["Contents"]}
        assert "searches/tiny_mnist5k_depth_lr/avi_search.yaml" in keys
        assert {f"{prefix}checkpoint_000001/COMPLETE", f"{prefix}checkpoint_000001/mp_rank_00_model_states.pt",
                f"{prefix}run/metrics.jsonl", f"{prefix}run/final/model.pt", f"{prefix}run/tune_events.log"} <= keys
        assert not any(k.startswith(f"{prefix}run/checkpoints") for k in keys)  # stored once, as Tune checkpoints
        assert load_config(outcome.files["best_config"]).model.num_layers == 1
        assert outcome.files["csv"] == tmp_path / "results" / "results.csv"
    finally:
        server.stop()


def test_depth_table_and_plot_compare_attentive_and_local(shards, tmp_path):
    """The depth summary of the paper-style study: best finished trial per (layers, attention) cell."""
    from avi_scale.config import to_dict
    from avi_scale.tune.results import FINISHED, STOPPED, TrialRow, depth_table, write_results
    from avi_scale.config import apply_overrides
    from avi_scale.tune.space import overrides_for

    plan = plan_search(load_config(STUDY, [f"data.train_urls={shards}", f"tune.results_dir={tmp_path}"]))
    base = to_dict(plan.cfg)
    attn = plan.dims[1].name
    rows = []
    for i, (layers, on, value, status) in enumerate([(2, True, 3.1, FINISHED), (2, False, 3.3, FINISHED),
                                                     (4, True, 2.9, FINISHED), (4, False, 3.0, FINISHED),
                                                     (4, True, 2.7, STOPPED), (2, True, 3.0, FINISHED)]):
        params = {"model.num_layers": layers, attn: on}
        cfg = apply_overrides(base, overrides_for(plan.dims, params))
        rows.append(TrialRow(trial_id=f"t{i}", status=status, params=params, best=value, best_step=100,
                             last_step=plan.end_step if status == FINISHED else 100, config=cfg))
    assert depth_table(rows, plan) == {True: {2: 3.0, 4: 2.9}, False: {2: 3.3, 4: 3.0}}
    files = write_results(sorted(rows, key=lambda r: r.best), plan)
    md = files["markdown"].read_text()
    assert "| 2 | 3 | 3.3 |" in md and "| 4 | 2.9 | 3 |" in md
    assert files["depth_plot"].stat().st_size > 1000
    best = load_config(files["best_config"])  # the stopped trial has the lowest value and is still the best one
    assert best.model.num_layers == 4 and best.model.prior_attention.enabled and best.model.posterior_attention.enabled


def test_launch_scripts_print_what_they_start(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-001\\ngpu-002\\ngpu-003\\n'\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(AVI_DRY_RUN="1", SLURM_JOB_NODELIST="gpu-[001-003]", SLURM_JOB_NUM_NODES="3", SLURM_CPUS_PER_TASK="8",
               SLURM_SUBMIT_DIR=str(REPO), PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    search = "configs/search/cifar10_depth_study.yaml"
    out = subprocess.run(["bash", str(REPO / "launch" / "ray_slurm.sbatch"), search, "tune.storage=/shared/tune", "--resume"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("launching: srun --nodes=3 --ntasks-per-node=1 --kill-on-bad-exit=1 ray symmetric-run "
                          "--address gpu-001:6379 --min-nodes 3 --num-cpus 8")
    assert out.rstrip().endswith(f"-- python -m avi_scale.tune.cli {search} tune.storage=/shared/tune --resume --address auto")
    out = subprocess.run(["bash", str(REPO / "launch" / "ray_slurm.sbatch"), search], cwd=tmp_path, env={**env, "RAY_MODE": "head-workers"},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith("launching: srun --nodes=1 --ntasks=1 -w gpu-001 ray start --head") and out[0].endswith("--block &")
    assert "--exclude=gpu-001 ray start --address=gpu-001:6379" in out[1]
    assert out[2] == f"launching: python -m avi_scale.tune.cli {search} --address auto"
    out = subprocess.run(["bash", str(REPO / "launch" / "ray_cluster.sh"), "10.0.0.5:6379", str(STUDY), "tune.max_concurrent=2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert out == f"launching: python -m avi_scale.tune.cli {STUDY} tune.max_concurrent=2 --address 10.0.0.5:6379\n"
    bad = subprocess.run(["bash", str(REPO / "launch" / "ray_cluster.sh"), "auto"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: ray_cluster.sh ADDRESS SEARCH.yaml" in bad.stderr


def test_each_trial_is_its_own_tracker_run_grouped_under_the_search(shards, tmp_path):
    from avi_scale.config import to_dict
    from avi_scale.tune.trainable import trial_config

    plan = plan_search(_search(shards, tmp_path / "store", "logging.backends=[csv,mlflow]"))
    cfg = trial_config(to_dict(plan.cfg), {"optim.lr": 0.01, "model.num_layers": 1}, tmp_path / "t1", None, "abc12")
    assert cfg.logging.backends == ["csv", "mlflow"]
    assert (cfg.logging.group, cfg.logging.run_name) == (plan.name, f"{plan.name}_abc12")
