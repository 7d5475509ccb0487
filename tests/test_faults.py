"""Faults and bad input (issue #7), each injected through the real components and its outcome asserted.

Every test is marked ``faults`` (``pytest -m faults`` runs them alone).  What is real and what is simulated:

* rank kills: the real ``deepspeed`` launcher (launch/deepspeed_single_node.sh) with 2 gloo CPU ranks.  A
  rank is stopped at a chosen point by ``tests/fault_inject/sitecustomize.py`` (loaded through
  ``PYTHONPATH``; the product code is unchanged) and then killed from this process with SIGKILL;
* NaN/Inf: the same injection multiplies one rank's loss by NaN/inf, or the gradient flowing back from
  it by inf, at chosen steps of a 2-rank run;
* a full disk: a real ENOSPC, from a small tmpfs mounted in a user + mount namespace (``unshare``) over
  the checkpoint directory; an unwritable directory: a read-only bind mount in such a namespace (chmod
  does not stop root), and a file where a directory must go;
* data: real shards written by ``avi-shards`` and then damaged; S3: the moto server, really stopped and
  restarted (listener closed, open connections reset), with boto3 and the loaders' own retries;
* Ray Tune: ``avi-tune`` processes with a local Ray; a trial process and then the driver are SIGKILLed.

Runs use the tiny model of tests/helpers.py (its "faults" variant), a few steps each.  The suite uses ~5
CPU-minutes (about 4 minutes on a quiet 2-core machine, twice that when other jobs share the cores); the
multi-process tests are also marked ``slow``.  The figures are in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules beside this file

from data_fixtures import (  # noqa: E402
    AWS_ENV,
    FAST_IO,
    digits,
    make_bucket,
    moto_auth,
    png_bytes,
    rewrite_shard,
    tar_members,
)
from fault_helpers import (  # noqa: E402
    Job,
    RestartableMotoServer,
    full_disk_command,
    job_env,
    kill,
    namespaces_available,
    readonly_dir_command,
    wait_gone,
)
from helpers import REPO, VENV_BIN, metric_rows  # noqa: E402

from avi_scale.config import DataConfig, load_config  # noqa: E402
from avi_scale.data import ManifestError, ShardError, StorageError, build_loader  # noqa: E402
from avi_scale.engine.checkpoint import (  # noqa: E402
    COMPLETE,
    LATEST,
    UnsafeCheckpointError,
    resolve,
    safe_load,
    tag_for,
)
from avi_scale.engine.export import consolidated_state_dict, load_exported  # noqa: E402
from avi_scale.engine.distributed import free_port  # noqa: E402

# quiet_exit, one_thread, shards, config_file (TINY_CONFIG), s3_endpoint, aws_env: tests/conftest.py
pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("quiet_exit", "one_thread")]
TINY_CONFIG = "faults"
SECRET = AWS_ENV["AWS_SECRET_ACCESS_KEY"]


# -- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def needs_namespaces():
    if not namespaces_available():
        pytest.skip("unshare --user --map-root-user --mount is not available here (no unprivileged user "
                    "namespaces): no read-only mount or small tmpfs to inject the fault with")


def _launch(config_file: Path, out: Path, log: Path, *overrides: str, faults=(), fault_dir=None,
            script: str = "deepspeed_single_node.sh", check: bool = True) -> Job:
    """``NPROC=2 launch/<script> CONFIG train.output_dir=OUT ...`` in the background; ``check=False`` sets
    AVI_SKIP_CHECK=1 (for reruns of a command whose config the script has already checked)."""
    cmd = ["bash", str(REPO / "launch" / script), str(config_file), f"train.output_dir={out}", *overrides]
    extra = {} if check else {"AVI_SKIP_CHECK": "1"}
    return Job(cmd, log, job_env(faults, fault_dir, NPROC="2", MASTER_PORT=str(free_port()), **extra))


def _avi_train(config_file: Path, *overrides: str, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "avi-train"), str(config_file), *overrides], cwd=REPO,
                          env=env or job_env(), capture_output=True, text=True, timeout=timeout)


def _params(path: Path) -> dict:
    return safe_load(path)


def _train_here(config_file: Path, *overrides: str) -> dict:
    """The engine's loop in this process (no start-up cost); the CLI is exercised by the subprocess runs."""
    from avi_scale.engine import train

    return train(load_config(config_file, list(overrides)))


# -- kill -9 of one rank --------------------------------------------------------------------------------------
KILL_STEPS, KILL_EVERY = 9, 3  # a 2-rank ZeRO-2 run of 9 steps, checkpoints at 3, 6, 9
KILL_OVERRIDES = (f"train.steps={KILL_STEPS}", f"train.checkpoint_every={KILL_EVERY}", "deepspeed.zero_stage=2",
                  "train.batch_log=true")


def _kill_plan(seed: int = 3) -> list[dict]:
    """Two SIGKILLs of a random rank at random steps (before that step's backward pass), and one inside the
    save of a random checkpoint (after the rank wrote its first file), in step order."""
    rng = random.Random(seed)
    mid = rng.sample([s for s in range(2, KILL_STEPS) if s % KILL_EVERY], 2)
    save = rng.choice([s for s in range(KILL_EVERY, KILL_STEPS, KILL_EVERY) if s not in mid])
    plan = [{"step": s, "kind": "pause"} for s in mid] + [{"step": save, "kind": "pause_in_save"}]
    for fault in plan:
        fault["rank"] = rng.choice([0, 1])
    return sorted(plan, key=lambda f: f["step"])


@pytest.fixture(scope="module")
def killed_runs(config_file, tmp_path_factory) -> dict:
    """An uninterrupted 2-rank run, and the same command killed (SIGKILL of one rank) at each point of
    :func:`_kill_plan` and rerun after each kill until it finishes (the reruns skip the launch script's
    config check, which the first launch of that config passed: it only costs time here)."""
    base = tmp_path_factory.mktemp("kill")
    reference = base / "reference"
    job = _launch(config_file, reference, base / "reference.log", *KILL_OVERRIDES)
    assert job.wait() == 0, job.output()[-4000:]

    out, ckpts = base / "killed", base / "killed" / "checkpoints"
    record: dict = {"reference": reference, "run": out, "plan": _kill_plan(), "kills": []}
    expected_resume = None
    for i, fault in enumerate(record["plan"]):
        fault_dir = base / f"fault{i}"
        fault_dir.mkdir()
        job = _launch(config_file, out, base / f"attempt{i}.log", *KILL_OVERRIDES, faults=[fault], fault_dir=fault_dir,
                      check=False)
        try:
            pid = job.wait_paused(fault_dir, fault)
            tree = job.pids()
            seen = {"fault": fault, "resumed_from": expected_resume,
                    "tags": sorted(p.name for p in ckpts.glob("step*")) if ckpts.is_dir() else [],
                    "latest": (ckpts / LATEST).read_text() if (ckpts / LATEST).is_file() else None}
            if fault["kind"] == "pause_in_save":
                tag_dir = ckpts / tag_for(fault["step"])
                seen["partial_files"] = sorted(p.name for p in tag_dir.iterdir())
            kill(pid)
            seen["returncode"] = job.wait(timeout=120)
            seen["left_running"] = wait_gone(tree, timeout=60)
        except BaseException:
            job.kill_tree()
            raise
        seen["output"] = job.output()
        step = fault["step"]
        done = step - KILL_EVERY if fault["kind"] == "pause_in_save" else KILL_EVERY * ((step - 1) // KILL_EVERY)
        expected_resume = done or None
        seen["resolved"] = resolve(ckpts) if ckpts.is_dir() else None
        seen["expected"] = expected_resume
        record["kills"].append(seen)
        if i == 0:  # a line torn in the middle, as a full disk or a crash mid-write leaves it
            with open(out / "metrics.jsonl", "a") as f:
                f.write('{"kind": "train", "step": 99, "lo')
            with open(out / "batches" / "rank00000.jsonl", "a") as f:
                f.write('{"step": 99, "slot": 0, "ids": ["ab')
    final = _launch(config_file, out, base / "final.log", *KILL_OVERRIDES, check=False)
    record["final_rc"] = final.wait()
    record["final_output"] = final.output()
    record["final_resumed_from"] = expected_resume
    return record


@pytest.mark.slow
def test_kill9_of_a_rank_at_random_steps_resumes_to_the_uninterrupted_result(killed_runs):
    """Each SIGKILL stops the whole job (the launcher ends the other rank); rerunning the same command
    resumes from the latest complete checkpoint; after the last rerun the weights, EMA, losses and the
    images every rank saw, in order, equal the uninterrupted run's (deterministic mode)."""
    rec = killed_runs
    ckpts = rec["run"] / "checkpoints"
    for seen in rec["kills"]:
        assert seen["returncode"] != 0 and not seen["left_running"], seen
        want = ckpts / tag_for(seen["expected"]) if seen["expected"] else None
        assert seen["resolved"] == want, seen
        if seen["resumed_from"]:
            step = seen["resumed_from"]
            assert f"resumed from {ckpts / tag_for(step)} at step {step}" in seen["output"]
    assert rec["final_rc"] == 0, rec["final_output"][-4000:]
    if rec["final_resumed_from"]:
        assert f"resumed from {ckpts / tag_for(rec['final_resumed_from'])}" in rec["final_output"]

    run, ref = rec["run"], rec["reference"]
    got, want = _params(run / "final" / "model.pt"), _params(ref / "final" / "model.pt")
    for key in ("state_dict", "ema_state_dict"):
        assert got[key].keys() == want[key].keys()
        assert all(torch.equal(got[key][k], want[key][k]) for k in want[key]), key
    mine, theirs = metric_rows(run, "train"), metric_rows(ref, "train")
    assert [r["step"] for r in mine] == list(range(1, KILL_STEPS + 1))
    assert [(r["loss"], r["grad_norm"]) for r in mine] == [(r["loss"], r["grad_norm"]) for r in theirs]
    assert metric_rows(run, "final")[-1]["params_consistent"]
    seen_ids = []
    for rank in (0, 1):
        name = f"batches/rank{rank:05d}.jsonl"
        assert (run / name).read_text() == (ref / name).read_text()
        log = [json.loads(line) for line in (run / name).read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(KILL_STEPS))
        seen_ids += [i for r in log for i in r["ids"]]
    assert len(seen_ids) == KILL_STEPS * 2 * 4 == len(set(seen_ids))  # none repeated, none skipped


@pytest.mark.slow
def test_kill9_during_a_checkpoint_save_keeps_the_previous_checkpoint_latest(killed_runs):
    """Killed inside the save of step k after its first file was written: step k's directory exists with
    part of the files and no COMPLETE marker, ``latest`` still names step k-3, and the rerun loads that one."""
    (seen,) = [s for s in killed_runs["kills"] if s["fault"]["kind"] == "pause_in_save"]
    step = seen["fault"]["step"]
    ckpts = killed_runs["run"] / "checkpoints"
    assert tag_for(step) in seen["tags"] and COMPLETE not in seen["partial_files"]
    assert any(name.endswith(".pt") for name in seen["partial_files"])
    if seen["fault"]["rank"] == 0:  # it wrote the model states (its first file) and stopped
        assert "mp_rank_00_model_states.pt" in seen["partial_files"]
    assert seen["latest"] == tag_for(step - KILL_EVERY)
    assert seen["resolved"] == ckpts / tag_for(step - KILL_EVERY)
    later = [s for s in killed_runs["kills"] if s["fault"]["step"] > step]
    output = later[0]["output"] if later else killed_runs["final_output"]
    assert f"resumed from {ckpts / tag_for(step - KILL_EVERY)} at step {step - KILL_EVERY}" in output


# -- numerics ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nan_and_inf_on_one_rank_are_skipped_counted_and_stop_the_run(config_file, tmp_path):
    """2 ranks, ZeRO-1: a NaN batch on rank 1 (step 2: NaN activations, BatchNorm statistics and loss), inf
    gradients from rank 0 (step 4), an inf loss on rank 0 (step 6) and inf gradients from rank 1 (step 7).
    Each step is skipped on both ranks and counted and changes nothing (weights, EMA, BatchNorm
    statistics); the second in a row (step 7) stops the run with exit status 3, a clear message and a
    checkpoint holding the last good state (that of step 5)."""
    faults = [{"rank": 1, "step": 2, "kind": "nan_input"}, {"rank": 0, "step": 4, "kind": "inf_grad"},
              {"rank": 0, "step": 6, "kind": "inf_loss"}, {"rank": 1, "step": 7, "kind": "inf_grad"}]
    out = tmp_path / "run"
    job = _launch(config_file, out, tmp_path / "job.log", "train.steps=8", "train.checkpoint_every=5",
                  "train.max_consecutive_skips=2", "deepspeed.zero_stage=1", faults=faults, fault_dir=tmp_path)
    rc = job.wait()
    text = job.output()
    assert rc == 3, text[-4000:]
    assert "training diverged: 2 consecutive steps skipped (last: step 7" in text
    assert "step 2: skipped (loss finite: False" in text and "step 4: skipped (loss finite: True" in text
    train = metric_rows(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1, 2, 2, 3]
    assert [("loss" in r) for r in train] == [True, False, True, False, True, False]
    tag = resolve(out / "checkpoints")
    assert tag == out / "checkpoints" / tag_for(7)
    last, client = consolidated_state_dict(tag)
    good, good_client = consolidated_state_dict(out / "checkpoints" / tag_for(5))
    assert client["skipped_steps"] == 4 and client["consecutive_skips"] == 2
    assert client["ema"]["num_updates"] == good_client["ema"]["num_updates"] == 3  # steps 1, 3, 5
    assert last.keys() == good.keys() and all(torch.equal(last[k], good[k]) for k in good)  # buffers included
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())


# -- full disk, unwritable directories ------------------------------------------------------------------------
def test_full_disk_at_a_save_fails_clearly_and_keeps_the_last_checkpoint(config_file, tmp_path, needs_namespaces):
    """A real ENOSPC: the checkpoint directory is a tmpfs with room for the existing step-2 checkpoint and
    half of another.  The save of step 4 fails: exit status 4, a message naming the error and the intact
    checkpoint; ``latest`` still names step 2 and a rerun with space resumes from it."""
    run, ckfs, saved = tmp_path / "run", tmp_path / "ckfs", tmp_path / "saved"
    ckfs.mkdir()
    saved.mkdir()
    common = [f"train.output_dir={run}", "train.steps=6", "train.stop_after=4"]
    _train_here(config_file, *common, "train.stop_after=2")
    ckpts = run / "checkpoints"
    used = sum(p.stat().st_size for p in ckpts.rglob("*") if p.is_file())
    one = sum(p.stat().st_size for p in (ckpts / tag_for(2)).iterdir())
    size_kb = (used + one // 2) // 1024 + 8
    cmd = [str(VENV_BIN / "avi-train"), str(config_file), *common, f"train.checkpoint_dir={ckfs}"]
    full = subprocess.run(full_disk_command(ckfs, size_kb, ckpts, saved, cmd), cwd=REPO, env=job_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 4, full.stdout[-2000:] + full.stderr[-4000:]
    assert f"resumed from {ckfs / tag_for(2)} at step 2" in full.stdout + full.stderr
    message = re.search(r"avi-train: could not save checkpoint step00000004 .*", full.stderr).group(0)
    assert "MiB free there: the filesystem is full" in message, message
    assert f"The last complete checkpoint, {ckfs / tag_for(2)}, is intact and 'latest' still names it" in message
    assert (saved / LATEST).read_text() == tag_for(2) and resolve(saved) == saved / tag_for(2)
    assert not (saved / tag_for(4) / COMPLETE).exists()
    again = _train_here(config_file, *common, f"train.checkpoint_dir={saved}")  # space again: resume from it
    assert again["step"] == 4 and again["checkpoint"] == str(saved / tag_for(4))
    assert resolve(saved) == saved / tag_for(4)
    assert [r["step"] for r in metric_rows(run, "train")] == [1, 2, 3, 4]


def test_unwritable_output_is_rejected_before_training(config_file, tmp_path):
    """``train.output_dir`` under a read-only directory (a read-only bind mount: chmod does not stop root)
    or below a regular file: the launch script's check rejects it and starts no rank, creating nothing.
    The engine itself (no launch script) probes both directories on every rank before building anything:
    an output or checkpoint directory below a file is an ``OutputDirError`` naming the key."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [(blocker / "run", None, "a path component")]
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    if namespaces_available():
        cases.append((readonly / "run", lambda cmd: readonly_dir_command(readonly, cmd), "is not writable"))
    elif os.geteuid() != 0:
        readonly.chmod(0o555)
        cases.append((readonly / "run", None, "is not writable"))
    for out, wrap, why in cases:
        wrap = wrap or (lambda cmd: cmd)
        script = ["bash", str(REPO / "launch" / "deepspeed_single_node.sh"), str(config_file),
                  f"train.output_dir={out}"]
        launched = subprocess.run(wrap(script), cwd=REPO, env=job_env(NPROC="2"), capture_output=True, text=True,
                                  timeout=120)
        assert launched.returncode == 2 and "launching:" not in launched.stdout, launched.stdout + launched.stderr
        assert f"train.output_dir={out}" in launched.stderr and why in launched.stderr
        assert "nothing launched" in launched.stderr and not out.exists()
    # the engine's own probe (avi-train started without a launch script, Ray Tune trials): every rank
    # creates and writes its directories before anything is built
    from avi_scale.engine import OutputDirError

    out = blocker / "run"
    with pytest.raises(OutputDirError, match=re.escape(f"train.output_dir={out} is not writable: Not a directory")):
        _train_here(config_file, f"train.output_dir={out}")
    run = tmp_path / "ok"
    with pytest.raises(OutputDirError, match=re.escape(f"train.checkpoint_dir={blocker / 'ckpt'} is not writable")):
        _train_here(config_file, f"train.output_dir={run}", f"train.checkpoint_dir={blocker / 'ckpt'}")
    assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()


# -- config -------------------------------------------------------------------------------------------------------
BAD_CONFIGS = [  # (overrides, YAML train_urls line replaced by, key named, what is allowed / why)
    (["deepspeed.bf16.enabled=true"], None, "deepspeed.bf16", "allowed keys of deepspeed: zero_stage"),
    (["train.micro_batch_size=four"], None, "train.micro_batch_size", "could not be converted to Integer"),
    (["train.precision=fp16"], None, "train.precision", "fp16 needs a GPU (use bf16 or fp32 on CPU)"),
    (["deepspeed.offload_param=true"], None, "deepspeed.offload_param", "needs deepspeed.zero_stage=3"),
    (["train.micro_batch_size=2500"], None, "train.micro_batch_size",
     "fewer than one global batch of 5000 = 2 rank(s)"),
    ([], "", "data.train_urls", "required for training"),
    ([], "  train_urls: ???", "data.train_urls", "required value ('???' in"),
]


@pytest.mark.parametrize("script", ["deepspeed_single_node.sh", "torchrun_single_node.sh"])
def test_bad_config_is_rejected_by_the_launch_scripts_before_any_process(config_file, tmp_path, script):
    """Unknown key, wrong type, impossible combinations (fp16 on CPU; ZeRO-3 parameter offload at stage 0; a
    global batch larger than the training split at 2 ranks), missing required field (absent; left at
    ``???``): the script's single-process check exits 2 naming the key and what is allowed; no launcher
    starts and no run directory appears.  (The schema has one ``train.precision``, so fp16 and bf16 cannot
    both be on, and the global batch is derived from the micro-batch, so they cannot disagree; DeepSpeed's
    own ``bf16``/``fp16`` sections are unknown keys.)"""
    cases = BAD_CONFIGS if script == "deepspeed_single_node.sh" else BAD_CONFIGS[:1] + BAD_CONFIGS[-1:]
    for i, (overrides, urls_line, key, allowed) in enumerate(cases):
        config = config_file
        if urls_line is not None:
            config = tmp_path / f"config{i}.yaml"
            config.write_text(re.sub(r"(?m)^  train_urls: .*$", urls_line, config_file.read_text()))
        out = tmp_path / f"run{i}"
        cmd = ["bash", str(REPO / "launch" / script), str(config), f"train.output_dir={out}", *overrides]
        proc = subprocess.run(cmd, cwd=REPO, env=job_env(NPROC="2"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (overrides, proc.stdout, proc.stderr)
        assert key in proc.stderr and allowed in proc.stderr, (overrides, proc.stderr)
        assert "launching:" not in proc.stdout and "nothing launched" in proc.stderr
        assert not out.exists()


# -- data -------------------------------------------------------------------------------------------------------
def _corrupt_every(data: Path, n: int) -> set[str]:
    """Replace the PNG of every n-th sample of every training shard by garbage; returns the keys."""
    broken: set[str] = set()
    for shard in sorted(data.glob("train-*.tar")):
        index = {}

        def change(name: str, content: bytes):
            key = name.split(".")[0]
            index.setdefault(key, len(index))
            if name.endswith(".png") and index[key] % n == n - 1:
                broken.add(key)
                return name, b"\x89PNG garbage"
            return name, content

        rewrite_shard(shard, change)
    return broken


def test_corrupt_training_samples_fail_naming_shard_and_sample_or_are_skipped_and_counted(config_file, shards,
                                                                                          tmp_path, caplog, capsys):
    """Every third training image is not a PNG.  ``avi-train`` stops with exit status 2 and a message naming the
    shard, the sample and the member; with ``data.skip_corrupt=true`` it trains, logs each skip and the count,
    writes the count to metrics.jsonl and the checkpoint, and keeps it across a resume."""
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    broken = _corrupt_every(data, 3)
    common = [f"data.train_urls={data}", "train.steps=6", "train.checkpoint_every=3"]
    failed = _avi_train(config_file, *common, f"train.output_dir={tmp_path / 'strict'}")
    assert failed.returncode == 2, failed.stderr[-4000:]
    named = re.search(r"avi-train: shard (\S+/train-00000\d\.tar), sample '(\w+)', member 'png': not a decodable image",
                      failed.stderr)
    assert named and named.group(2) in broken and Path(named.group(1)).parent == data, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr

    def skips_logged() -> int:
        logged = [r.getMessage() for r in caplog.records if r.name == "avi_scale.data"]
        caplog.clear()
        return sum(m.startswith("skipping 1 sample(s): shard ") and "not a decodable image" in m for m in logged)

    out = tmp_path / "skipping"
    caplog.set_level("WARNING", logger="avi_scale.data")
    _train_here(config_file, *common, f"train.output_dir={out}", "data.skip_corrupt=true", "train.stop_after=3")
    at3 = metric_rows(out, "train")[-1]["skipped_samples"]
    client = safe_load(out / "checkpoints" / tag_for(3) / "mp_rank_00_model_states.pt")["avi_scale"]
    assert at3 > 0 and client["skipped_samples"] == at3 and skips_logged() == at3
    assert f"{at3} corrupt training sample(s) skipped so far" in capsys.readouterr().out
    before = [r["skipped_samples"] for r in metric_rows(out, "train")]
    result = _train_here(config_file, *common, f"train.output_dir={out}", "data.skip_corrupt=true")
    counts = [r["skipped_samples"] for r in metric_rows(out, "train")]
    assert counts[:3] == before and counts[2] == at3 and counts == sorted(counts)  # carried over the resume
    assert counts[-1] == at3 + skips_logged() and result["skipped_samples"] == counts[-1]
    assert metric_rows(out, "final")[-1]["skipped_samples"] == counts[-1]
    final_client = safe_load(out / "checkpoints" / tag_for(6) / "mp_rank_00_model_states.pt")["avi_scale"]
    assert final_client["skipped_samples"] == counts[-1]


def _digits_dir(tmp_path: Path, name: str = "digits") -> Path:
    from data_tools.cli import main as avi_shards

    images, labels = digits()
    src = tmp_path / f"{name}.npz"
    np.savez(src, images=images[:300], labels=labels[:300])
    out = tmp_path / name
    assert avi_shards(["numpy", "--train", str(src), "--name", name, "--shard-samples", "40", "--out", str(out),
                       "--no-progress"]) == 0
    return out


def _cfg(urls: str, **changes) -> DataConfig:
    return DataConfig(**{"train_urls": urls, "binarize": False, "shuffle_buffer": 0, **FAST_IO, **changes})


def _read(urls: str, split: str, **changes) -> tuple[list, object]:
    loader = build_loader(_cfg(urls, **changes), split, 8, 0, 1, train=False)
    return [y for _, y in loader], loader


def test_missing_label_empty_shard_and_disagreeing_manifest(tmp_path):
    """Not covered by tests/test_data.py: a sample without its label, an empty shard (0 bytes, or a valid tar
    without members), a manifest that disagrees with a shard (an extra sample; a different image shape).
    Each is an error naming the shard (and the sample where there is one), or a counted skip with
    ``data.skip_corrupt``."""
    base = _digits_dir(tmp_path)
    manifest = json.loads((base / "manifest.json").read_text())
    first_test = manifest["splits"]["test"]["shards"][0]["name"]

    data = tmp_path / "nolabel"
    shutil.copytree(base, data)
    key = tar_members(data / first_test)[6][0].split(".")[0]
    rewrite_shard(data / first_test, lambda n, c: None if n == f"{key}.cls" else (n, c))
    with pytest.raises(ShardError, match=rf"{first_test}, sample '{key}': no 'cls' member \(it has: png\)"):
        _read(str(data), "test")
    labels, loader = _read(str(data), "test", skip_corrupt=True)
    assert sum(len(y) for y in labels) == manifest["splits"]["test"]["count"] - 1 and loader.skipped == 1

    for empty in (b"", bytes(1024)):  # no bytes at all; a tar holding only its end-of-archive blocks
        data = tmp_path / f"empty{len(empty)}"
        shutil.copytree(base, data)
        (data / first_test).write_bytes(empty)
        count = manifest["splits"]["test"]["shards"][0]["count"]
        why = (r"is truncated or corrupt: unexpected end of data at byte 0 .*before the first sample"
               if not empty else rf"is truncated: it holds 0 samples, the manifest says {count}")
        with pytest.raises(ShardError, match=rf"shard \S+/{first_test} {why}"):
            _read(str(data), "test")
        labels, loader = _read(str(data), "test", skip_corrupt=True)
        assert sum(len(y) for y in labels) == manifest["splits"]["test"]["count"] - count and loader.skipped == count

    data = tmp_path / "extra"
    shutil.copytree(base, data)
    members = tar_members(data / first_test)
    extra = [(n.replace(members[0][0].split(".")[0], "extra_0"), c) for n, c in members[:2]]
    rewrite_shard(data / first_test, lambda n, c: (n, c))
    with tarfile.open(data / first_test, "a") as archive:  # appended after the listed samples
        for name, content in extra:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    with pytest.raises(ShardError, match=rf"{first_test} holds {count + 1} samples but the manifest says {count} "
                                         r"\(stale manifest\?\)"):
        _read(str(data), "test")

    data = tmp_path / "shape"
    shutil.copytree(base, data)
    wrong = json.loads((data / "manifest.json").read_text())
    wrong["image"]["shape"] = [28, 28, 1]
    (data / "manifest.json").write_text(json.dumps(wrong))
    with pytest.raises(ShardError, match=r"shard \S+-000000\.tar, sample '\w+', member 'png': image is 8x8 \(HxW\), "
                                         r"the manifest says 28x28"):
        _read(str(data), "test")
    bad = dict(wrong, splits={"test": dict(wrong["splits"]["test"], count=5)})
    (data / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError,
                       match=r"manifest.json: split 'test': 'count' differs from the sum of its shard counts"):
        _read(str(data), "test")


class _Payload:
    """Unpickling this creates the file ``marker`` (``open(marker, "w")``): proof that something unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_payloads_are_never_unpickled(tmp_path, config_file):
    """A shard sample carrying ``.pyd``/``.pickle`` members whose unpickling would create a file: the loaders
    read the image and label and ignore them, ``avi-shards verify`` flags them, a pickle in place of the PNG
    is an undecodable image.  The CIFAR converter (the one unpickling in the data path) refuses the same
    payload, and so do our checkpoint readers (``torch.load(weights_only=True)``) and the engine's resume."""
    from data_tools.cli import main as avi_shards
    from data_tools.sources import SourceError, read_cifar

    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Payload(marker))
    base = _digits_dir(tmp_path)
    first_test = json.loads((base / "manifest.json").read_text())["splits"]["test"]["shards"][0]["name"]
    before, _ = _read(str(base), "test")
    key = tar_members(base / first_test)[0][0].split(".")[0]

    members = tar_members(base / first_test)
    with tarfile.open(base / first_test, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, content in members:
            for n, c in [(name, content)] + ([(f"{key}.pyd", payload), (f"{key}.pickle", payload)]
                                              if name == f"{key}.cls" else []):
                info = tarfile.TarInfo(n)
                info.size = len(c)
                archive.addfile(info, io.BytesIO(c))
    after, _ = _read(str(base), "test", num_workers=1)
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    assert avi_shards(["verify", str(base), "--split", "test"]) == 1
    rewrite_shard(base / first_test, lambda n, c: (n, payload) if n == f"{key}.png" else (n, c))
    with pytest.raises(ShardError, match=rf"sample '{key}', member 'png': not a decodable image"):
        _read(str(base), "test")

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (cifar / name).write_bytes(payload)
    with pytest.raises(SourceError, match=r"not a CIFAR python batch \(UnpicklingError: refusing to load global"):
        read_cifar(str(cifar), 10).splits["train"]

    tampered = tmp_path / "model.pt"
    torch.save({"state_dict": {}, "ema_state_dict": {}, "config": {}, "step": 0, "extra": _Payload(marker)}, tampered)
    with pytest.raises(pickle.UnpicklingError):
        load_exported(tampered)
    run = tmp_path / "run"
    _train_here(config_file, f"train.output_dir={run}", "train.steps=2", "train.checkpoint_every=1",
                "train.stop_after=1")
    states = run / "checkpoints" / tag_for(1) / "mp_rank_00_model_states.pt"
    blob = safe_load(states)
    blob["avi_scale"]["extra"] = _Payload(marker)
    torch.save(blob, states)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states\.pt is not a checkpoint file that "
                                                    r"torch.load\(weights_only=True\) accepts"):
        consolidated_state_dict(states.parent)
    with pytest.raises(UnsafeCheckpointError, match="refusing to hand it to DeepSpeed's loader"):
        _train_here(config_file, f"train.output_dir={run}", "train.steps=2")  # the engine's resume
    assert not marker.exists()


def test_our_code_loads_checkpoints_weights_only_and_unpickles_nothing_else():
    """Every ``torch.load`` call in avi_scale/ and data_tools/ passes ``weights_only=True``; nothing calls
    ``pickle.load(s)``, ``np.load(allow_pickle=True)`` or ``torch.load`` otherwise; the one unpickler is
    data_tools' arrays-only CIFAR reader (a ``pickle.Unpickler`` subclass that overrides ``find_class``)."""
    import ast

    loads, unsafe, unpicklers = [], [], []
    for path in sorted([*(REPO / "avi_scale").rglob("*.py"), *(REPO / "data_tools").rglob("*.py")]):
        where = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                kwargs = {k.arg: k.value for k in node.keywords}
                def flag(name: str, kwargs=kwargs) -> bool:
                    return isinstance(kwargs.get(name), ast.Constant) and kwargs[name].value is True

                if (owner, node.func.attr) == ("torch", "load"):
                    loads.append(where)
                    if not flag("weights_only"):
                        unsafe.append((where, node.lineno, "torch.load without weights_only=True"))
                elif owner in ("pickle", "cPickle", "dill", "cloudpickle") and node.func.attr in ("load", "loads"):
                    unsafe.append((where, node.lineno, f"{owner}.{node.func.attr}"))
                elif (owner, node.func.attr) in (("np", "load"), ("numpy", "load")) and flag("allow_pickle"):
                    unsafe.append((where, node.lineno, "np.load(allow_pickle=True)"))
            elif isinstance(node, ast.ClassDef) and any(ast.unparse(b).endswith("Unpickler") for b in node.bases):
                overrides = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
                unpicklers.append((where, node.name, "find_class" in overrides))
    assert loads and not unsafe, unsafe
    assert unpicklers == [("data_tools/sources.py", "_ArraysOnlyUnpickler", True)], unpicklers


# -- S3 ---------------------------------------------------------------------------------------------------------
def test_s3_server_stopped_mid_epoch_restarts_or_fails_after_the_retry_budget(aws_env, tmp_path, caplog):
    """The moto server stops (listener closed, connections reset) while a training epoch streams from it.
    Restarted during the loader's back-off, the epoch completes with exactly the local data's batches.
    Stopped for good, the loader raises a StorageError naming the shard after its retries, within seconds."""
    import logging

    from data_tools.cli import main as avi_shards

    server = RestartableMotoServer()
    server.start()
    try:
        make_bucket(server.url, "avi-restart")
        images, labels = digits()
        src = tmp_path / "digits.npz"
        np.savez(src, images=images[:600], labels=labels[:600])
        common = ["numpy", "--train", str(src), "--val-fraction", "0", "--test-fraction", "0", "--shard-samples", "40",
                  "--no-progress"]
        assert avi_shards([*common, "--out", str(tmp_path / "local")]) == 0
        assert avi_shards([*common, "--out", "s3://avi-restart/digits", "--endpoint-url", server.url]) == 0
        local = list(build_loader(_cfg(str(tmp_path / "local")), "train", 8, 0, 1))

        retried = threading.Event()

        class Watch(logging.Handler):
            def emit(self, record):
                if "retrying" in record.getMessage():
                    retried.set()

        watcher = Watch(logging.WARNING)
        logging.getLogger("avi_scale.data").addHandler(watcher)
        restarter = threading.Thread(target=lambda: retried.wait(60) and server.start(), daemon=True)
        try:
            cfg = _cfg("s3://avi-restart/digits", s3_endpoint_url=server.url, io_retries=8, io_backoff_s=0.2)
            got = []
            for i, batch in enumerate(build_loader(cfg, "train", 8, 0, 1)):
                got.append(batch)
                if i == 12:  # mid-epoch (shards of 40 samples: the loader opens a new one every 5 batches)
                    server.stop()
                    restarter.start()
        finally:
            logging.getLogger("avi_scale.data").removeHandler(watcher)
        restarter.join(timeout=60)
        assert retried.is_set() and server.starts == 2
        assert len(got) == len(local) == 600 // 8
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, local))

        loader = build_loader(_cfg("s3://avi-restart/digits", s3_endpoint_url=server.url, io_retries=4,
                                   io_backoff_s=0.1), "train", 8, 0, 1)
        it = iter(loader)
        for _ in range(3):
            next(it)
        server.stop()
        start = time.monotonic()
        gave_up = r"giving up on s3://avi-restart/digits/train-\d{6}\.tar .*after 4 failed"
        with pytest.raises(StorageError, match=gave_up):
            for _ in it:
                pass
        assert time.monotonic() - start < 15
    finally:
        server.stop()
    assert SECRET not in caplog.text


def _grep_secret(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


def test_s3_bucket_credentials_and_secrets_through_avi_train(s3_endpoint, aws_env, config_file, tmp_path):
    """Through the launch script and avi-train: a missing bucket and refused credentials are rejected before
    any rank starts, naming the bucket / the refusal; a URL carrying credentials is refused by the config;
    a run that trains from S3 leaves the secret key nowhere: not in its output, run directory, config,
    metrics or checkpoints."""
    from data_tools.cli import main as avi_shards

    make_bucket(s3_endpoint, "avi-faults")
    assert avi_shards(["mnist5k", "--out", "s3://avi-faults/mnist5k", "--endpoint-url", s3_endpoint,
                       "--no-progress"]) == 0
    env = job_env(NPROC="2", **aws_env)
    script = ["bash", str(REPO / "launch" / "deepspeed_single_node.sh"), str(config_file),
              f"data.s3_endpoint_url={s3_endpoint}"]
    outputs = []
    missing = subprocess.run([*script, "data.train_urls=s3://no-such-bucket/mnist5k",
                              f"train.output_dir={tmp_path / 'a'}"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
    outputs.append(missing.stdout + missing.stderr)
    assert missing.returncode == 2 and "S3 bucket 'no-such-bucket' does not exist" in missing.stderr, missing.stderr
    assert "launching:" not in missing.stdout and not (tmp_path / "a").exists()
    moto_auth(s3_endpoint, enforce=True)
    try:
        refused = subprocess.run([*script, "data.train_urls=s3://avi-faults/mnist5k",
                                  f"train.output_dir={tmp_path / 'b'}"], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=120)
    finally:
        moto_auth(s3_endpoint, enforce=False)
    outputs.append(refused.stdout + refused.stderr)
    assert refused.returncode == 2 and "S3 refused access to s3://avi-faults/mnist5k/manifest.json" in refused.stderr
    assert "credentials from env" in refused.stderr and "launching:" not in refused.stdout
    leaky = _avi_train(config_file, f"data.s3_endpoint_url=http://testing:{SECRET}@{s3_endpoint.split('://')[1]}",
                       env=job_env(**aws_env))
    outputs.append(leaky.stdout + leaky.stderr)
    assert leaky.returncode == 2 and "data.s3_endpoint_url: must not carry credentials" in leaky.stderr

    run = tmp_path / "run"
    trained = _avi_train(config_file, "data.train_urls=s3://avi-faults/mnist5k", f"data.s3_endpoint_url={s3_endpoint}",
                         f"train.output_dir={run}", "train.steps=2", env=job_env(**aws_env))
    outputs.append(trained.stdout + trained.stderr)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert (run / "final" / "model.pt").is_file() and (run / "checkpoints" / tag_for(2) / COMPLETE).is_file()
    assert not _grep_secret(run) and all(SECRET not in text for text in outputs)


# -- Ray Tune -----------------------------------------------------------------------------------------------------
def _trial_results(experiment: Path, trial_id: str) -> list[dict]:
    path = experiment / f"trial_{trial_id}" / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _experiment_state(experiment: Path) -> dict:
    """trial id -> (status, whether Tune's saved state knows a checkpoint of it), from the newest snapshot."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        saved = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # being rewritten
        return {}
    out = {}
    for trial_json, meta_json in saved.get("trial_data", []):
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        last = meta.get("last_result") or {}
        out[trial["trial_id"]] = (trial["status"], bool(last.get("checkpoint_dir_name")))
    return out


@pytest.mark.slow
def test_tune_killed_trial_is_retried_and_killed_driver_resumes(shards, tmp_path):
    """``avi-tune``, two trials (lr 1e-2, then 5e-3) run one at a time, one retry per trial.  The first
    trial's process is SIGKILLed at step 6, after its step-4 report: Tune retries it from that checkpoint
    and it finishes.  The driver itself is SIGKILLed while the second trial is at step 6, once Tune's saved
    state records the first as finished and the second's step-4 checkpoint; its Ray processes die with it.
    ``--resume`` finishes the second trial from its checkpoint and leaves the first alone."""
    search = REPO / "configs" / "search" / "tiny_mnist5k_depth_lr.yaml"
    store = tmp_path / "store"
    experiment = store / "tiny_mnist5k_depth_lr"
    args = [sys.executable, "-m", "avi_scale.tune.cli", str(search), f"data.train_urls={shards}",
            f"tune.storage={store}", "tune.scheduler=fifo", "tune.max_concurrent=1", "tune.max_failures=1",
            "train.steps=8", "model.num_layers=1", "tune.search_space={optim.lr: {grid_search: [1.0e-2, 5.0e-3]}}",
            "--num-cpus", "2", "--verbose", "0"]
    faults = [{"rank": 0, "step": 6, "kind": "pause", "name": "first", "when": {"optim.lr": 1e-2}},
              {"rank": 0, "step": 6, "kind": "pause", "name": "second", "when": {"optim.lr": 5e-3}}]
    env = dict(TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions_tune"), RAY_AUTH_MODE="disabled")
    temps = [tempfile.mkdtemp(prefix="ray", dir="/tmp") for _ in range(2)]
    tree: dict[int, str] = {}
    job = resumed = None
    try:
        job = Job(args + ["--ray-temp-dir", temps[0]], tmp_path / "first.log", job_env(faults, tmp_path, **env))
        kill(job.wait_paused(tmp_path, faults[0]))
        job.wait_paused(tmp_path, faults[1])
        runs = sorted(p.name for p in (experiment / "runs").iterdir())
        by_lr = {load_config(experiment / "runs" / t / "config.yaml").optim.lr: t for t in runs}
        first, second = by_lr[1e-2], by_lr[5e-3]
        job.wait_for("Tune's saved state with the first trial finished and the second's checkpoint", lambda: (
            _experiment_state(experiment).get(first, ("", False))[0] == "TERMINATED"
            and _experiment_state(experiment).get(second, ("", False))[1]), timeout=120)
        first_results = _trial_results(experiment, first)
        first_metrics = (experiment / "runs" / first / "metrics.jsonl").read_text()
        tree = job.tree()
        kill(job.proc.pid)
        assert job.wait(timeout=60) == -signal.SIGKILL
        # the driver's Ray processes die with it (fate sharing): GCS, raylet, the trial's worker; Ray's two
        # per-node agents notice the raylet's death at once but exit only after giving up on the dead GCS
        agents = [pid for pid, cmd in tree.items() if "Agent" in cmd]
        left = wait_gone([pid for pid in tree if pid not in agents], timeout=60)
        assert not left, f"processes of the killed search still run: {[tree[p] for p in left]}"
        resumed = Job(args + ["--resume", "--ray-temp-dir", temps[1]], tmp_path / "resumed.log", job_env(**env))
        agents_left = wait_gone(agents, timeout=240)  # meanwhile the search resumes
        rc = resumed.wait(timeout=400)
    finally:  # leave nothing running and no Ray directories behind, also when failing
        for started in (job, resumed):
            if started is not None and started.proc.poll() is None:
                started.kill_tree()
        for pid in wait_gone(list(tree), timeout=0):
            kill(pid)
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
    assert rc == 0, resumed.output()[-5000:]
    assert not agents_left, f"Ray agents of the killed search still run: {[tree[p] for p in agents_left]}"

    import csv

    with open(experiment / "results.csv", newline="") as f:
        table = {t["trial_id"]: t for t in csv.DictReader(f)}
    assert set(table) == {first, second} and all(t["status"] == "finished" for t in table.values())
    events = {t: (experiment / "runs" / t / "tune_events.log").read_text().splitlines() for t in table}
    # the first trial: killed (no chance to log), retried by Tune from its step-4 checkpoint, finished; the
    # resumed search did not run it again
    assert "fresh start" in events[first][0] and "resuming from" in events[first][1] and "step 4" in events[first][1]
    assert "finished" in events[first][2] and len(events[first]) == 3, events[first]
    assert "died" in (experiment / f"trial_{first}" / "error.txt").read_text().lower()
    assert _trial_results(experiment, first) == first_results
    assert (experiment / "runs" / first / "metrics.jsonl").read_text() == first_metrics
    # the second: started, then continued by --resume from its checkpoint, not from scratch
    assert "fresh start" in events[second][0] and "resuming from" in events[second][1], events[second]
    assert "step 4" in events[second][1] and "finished" in events[second][-1]
    for t in table:
        evals = [r["step"] for r in metric_rows(experiment / "runs" / t, "eval")]
        assert evals == [4, 8], (t, evals)
