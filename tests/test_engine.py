"""The training engine: DeepSpeed ZeRO 0-3 on CPU, launchers, exact resume, export, stabilisers, CLI.

Every run trains the real AttentiveVAE (tiny) on real MNIST digits sharded by ``avi-shards mnist5k``.
Multi-process tests start the real ``deepspeed`` launcher and ``torchrun`` through the scripts in
``launch/`` with 2 CPU ranks (gloo); they are marked slow.  ZeRO-1 and ZeRO-3 run through the
single-node deepspeed launcher, ZeRO-2 through its two-node no-ssh form, ZeRO-0 through torchrun.

The reference for "2 ranks equal 1 process on the same global batch" is a single process with
2 accumulated micro-batches: the engine assigns data slots and posterior noise per (step, slot), so
both layouts compute the same global batch with the same noise.  They differ only by float
summation order; parameters whose gradient is pure float noise (conv biases and gains right before
a BatchNorm, whose true gradient is 0) then take different Adamax steps of size ~lr * noise / eps,
hence a parameter tolerance of 2e-4 (lr = 5e-3: a wrong batch, missing averaging or a lost step
moves parameters by ~1e-3 and more) next to a 1e-5 relative check of every logged loss and grad norm.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from avi_scale.config import load_config
from avi_scale.engine import TrainingDiverged, load_exported, train
from avi_scale.engine.checkpoint import resolve
from avi_scale.engine.export import consolidated_state_dict
from avi_scale.engine.deepspeed_config import build_ds_config
from avi_scale.engine.distributed import free_port
from avi_scale.engine import noise_seed
from avi_scale.engine.schedule import kl_beta, learning_rate

from helpers import PY, REPO, launch_env, metric_rows

# one_thread, shards, config_file (TINY_CONFIG): tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")
TINY_CONFIG = "engine"
PARAM_ATOL = 2e-4
METRIC_RTOL = 1e-5


# -- fixtures and helpers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _launch(script: str, config_file: Path, out: Path, *overrides: str, env: dict | None = None,
            timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = ["bash", str(REPO / "launch" / script), str(config_file), f"train.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env or launch_env(NPROC="2", MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.startswith("launching: ")
    return proc


def _assert_same_training(run: Path, reference: Path, atol: float = PARAM_ATOL) -> None:
    """Same logged losses/grad norms, parameters identical on every rank, close to the reference."""
    mine, ref = metric_rows(run, "train"), metric_rows(reference, "train")
    assert [r["step"] for r in mine] == [r["step"] for r in ref]
    for a, b in zip(mine, ref):
        for key in ("loss", "neg_elbo", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=METRIC_RTOL), (key, a["step"])
    final = metric_rows(run, "final")[-1]
    assert len(final["param_sha256"]) == 2 and final["params_consistent"]
    assert len(set(final["param_sha256"])) == 1
    got = torch.load(run / "final" / "model.pt", weights_only=False)["state_dict"]
    want = torch.load(reference / "final" / "model.pt", weights_only=False)["state_dict"]
    assert got.keys() == want.keys()
    for name in _param_names(run):
        assert torch.allclose(got[name], want[name], rtol=0, atol=atol), name
    init = _initial_state(reference)
    moved = max((want[n] - init[n]).abs().max().item() for n in _param_names(run))
    assert moved > 10 * atol  # the tolerance is far below what training changed


def _param_names(run: Path) -> list[str]:
    """Names of the trained parameters of a run's model (BatchNorm statistics are buffers, excluded)."""
    from avi_scale.model import AttentiveVAE

    return [n for n, _ in AttentiveVAE(load_config(run / "config.yaml").model).named_parameters()]


def _initial_state(run: Path) -> dict:
    """The weights every rank starts from: the model built right after seeding with train.seed."""
    from avi_scale.model import AttentiveVAE

    cfg = load_config(run / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    return AttentiveVAE(cfg.model).state_dict()


# -- pure functions ---------------------------------------------------------------------------------------
def test_schedules():
    cfg = load_config(None, ["optim.lr=0.01", "optim.min_lr=0.0001", "optim.warmup_steps=10",
                             "train.kl_warmup_steps=20", "train.kl_beta_min=0.1"])
    o, t = cfg.optim, cfg.train
    assert learning_rate(0, o, 110) == pytest.approx(1e-4)
    assert learning_rate(5, o, 110) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert learning_rate(10, o, 110) == pytest.approx(1e-2)
    assert learning_rate(60, o, 110) == pytest.approx(1e-4 + 0.5 * (1e-2 - 1e-4))
    assert learning_rate(110, o, 110) == pytest.approx(1e-4)
    lrs = [learning_rate(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    cfg = load_config(None, ["optim.warmup_steps=0", "optim.cosine_restarts=true", "optim.restart_period_steps=10",
                             "optim.restart_mult=2"])
    o = cfg.optim
    assert learning_rate(0, o, 100) == pytest.approx(o.lr)
    assert learning_rate(9, o, 100) < learning_rate(10, o, 100) == pytest.approx(o.lr)  # first restart
    assert learning_rate(20, o, 100) == pytest.approx(o.min_lr + 0.5 * (o.lr - o.min_lr))  # middle of period 2
    assert learning_rate(30, o, 100) == pytest.approx(o.lr)  # second period is 20 steps long
    assert kl_beta(0, t) == pytest.approx(0.1)
    assert kl_beta(10, t) == pytest.approx(0.55)
    assert kl_beta(20, t) == kl_beta(1000, t) == 1.0


def test_deepspeed_config_is_explicit():
    cfg = load_config(None, ["train.micro_batch_size=8", "train.gradient_accumulation_steps=3",
                             "deepspeed.zero_stage=3", "train.precision=bf16", "train.device=cpu"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed's own default would clip at 1.0
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "optimizer" not in ds and "scheduler" not in ds
    assert '"auto"' not in json.dumps(ds)
    clipped = build_ds_config(load_config(None, ["optim.gradient_clipping=2.5"]), 1)
    assert clipped["gradient_clipping"] == 2.5 and "offload_optimizer" not in clipped["zero_optimization"]


# -- the CLI ----------------------------------------------------------------------------------------------
def test_cli_help_is_lazy_and_print_config(config_file):
    code = ("import sys\nfrom avi_scale.cli import train_main\n"
            "try:\n    train_main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'deepspeed', 'webdataset') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, env=launch_env(), capture_output=True)
    out = subprocess.run([sys.executable, "-m", "avi_scale.cli", str(config_file), "train.steps=7",
                          "--local_rank=0", "--print-config", "model.num_layers=3"],
                         env=launch_env(), capture_output=True, text=True, check=True).stdout
    assert "steps: 7" in out and "num_layers: 3" in out
    bad = subprocess.run([sys.executable, "-m", "avi_scale.cli", str(config_file), "train.stepz=7"],
                         env=launch_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "train.stepz" in bad.stderr


def test_cli_dry_run_starts_nothing(config_file, tmp_path):
    out = tmp_path / "dry"
    proc = subprocess.run([sys.executable, "-m", "avi_scale.cli", str(config_file), f"train.output_dir={out}",
                           "--dry-run"], env=launch_env(WORLD_SIZE="2"), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "data[train]: 4 shard(s), 4000 images, 28x28x1" in text and "data[val]: 1 shard(s), 500 images" in text
    assert "parameters" in text and "GFLOP" in text and '"train_batch_size": 8' in text
    assert not out.exists()
    bad = subprocess.run([sys.executable, "-m", "avi_scale.cli", str(config_file), "model.image_size=32",
                          "--dry-run"], env=launch_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "28x28x1" in bad.stderr


# -- single process ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(config_file, runs) -> tuple[Path, list[dict]]:
    """One process, 2 accumulated micro-batches, ZeRO-3: the same global batches as 2 ranks x 1."""
    reports: list[dict] = []
    cfg = load_config(config_file, [f"train.output_dir={runs / 'reference'}", "train.gradient_accumulation_steps=2",
                                    "deepspeed.zero_stage=3"])
    result = train(cfg, report=reports.append)
    assert result["finished"] and result["step"] == 4 and result["params_consistent"]
    return runs / "reference", reports


def test_single_process_run_outputs_and_report_hook(reference):
    run, reports = reference
    assert [r["step"] for r in reports] == [2, 4]
    for r in reports:
        assert r["val_nll"] == r["val_neg_elbo"] > 0 and len(r["val_kl_per_layer"]) == 2
        assert r["checkpoint"] == str(run / "checkpoints" / f"step{r['step']:08d}")
        assert "grad_norm" in r and "lr" in r  # the latest training metrics ride along
    train_rows = metric_rows(run, "train")
    n_params = metric_rows(run, "final")[-1]["num_parameters"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        assert len(r["kl_per_layer"]) == 2 and r["kl"] == pytest.approx(sum(r["kl_per_layer"]))
        assert r["images_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1 and r["mem_mb"] > 0 and r["peak_mem_mb"] > 0 and r["tflops"] > 0
        assert r["skipped_steps"] == 0 and r["beta"] <= 1
        # ZeRO-3 fp32 on one rank: the weight partition (it is the master copy) + 2 Adamax moments
        assert r["model_state_mb"] == pytest.approx(3 * 4 * n_params / 2**20, rel=0.01)
    assert train_rows[0]["beta"] == pytest.approx(0.1) and train_rows[-1]["beta"] == 1.0
    assert (run / "config.yaml").is_file() and json.loads((run / "ds_config.json").read_text())["gradient_clipping"] == 0.0
    for name in ("samples.png", "reconstructions.png"):
        assert (run / "final" / name).stat().st_size > 100 and (run / "images" / "step00000002" / name).is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004" and resolve(ckpts) == ckpts / "step00000004"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000002", "step00000004"]
    assert all((p / "COMPLETE").is_file() for p in ckpts.glob("step*"))


def test_export_loads_into_plain_model_with_the_same_loss(reference, config_file):
    """ZeRO-3 checkpoint -> zero_to_fp32 -> plain AttentiveVAE; its EMA weights give the loss the engine
    reported for the EMA weights swapped into the ZeRO-3 partitions."""
    run, reports = reference
    model, cfg = load_exported(run / "final" / "model.pt", use_ema=True)
    from avi_scale.data import build_loader

    loader = build_loader(cfg.data, "val", cfg.train.micro_batch_size, 0, 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i == cfg.train.eval_batches:
                break
            torch.manual_seed(noise_seed(cfg.train.seed, "eval", 0, i))
            out = model(x, beta=1.0)
            total += out.neg_elbo.double().sum().item()
            count += x.shape[0]
    assert total / count == pytest.approx(reports[-1]["val_neg_elbo"], rel=1e-5)
    raw, client = consolidated_state_dict(run / "checkpoints" / "step00000004")
    assert client["step"] == 4 and client["ema"]["num_updates"] == 4
    plain = load_exported(run / "final" / "model.pt", use_ema=False)[0].state_dict()
    assert all(torch.equal(raw[k], plain[k]) for k in plain)


def test_activation_checkpointing_gives_the_same_gradients(config_file, runs):
    results = {}
    for ckpt in (False, True):
        out = runs / f"ac_{ckpt}"
        cfg = load_config(config_file, [f"train.output_dir={out}", f"model.activation_checkpointing={ckpt}",
                                        "train.steps=2", "train.eval_every=0", "train.checkpoint_every=0",
                                        "train.batch_log=false"])
        train(cfg)
        results[ckpt] = out
    plain, ckpt = (metric_rows(results[k], "train") for k in (False, True))
    for a, b in zip(plain, ckpt):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    pa = torch.load(results[False] / "final" / "model.pt", weights_only=False)["state_dict"]
    pb = torch.load(results[True] / "final" / "model.pt", weights_only=False)["state_dict"]
    assert all(torch.allclose(pa[k], pb[k], rtol=0, atol=1e-6) for k in _param_names(results[False]))


@pytest.mark.parametrize("stage", [0, 2])
def test_nan_step_is_skipped_and_counted(config_file, runs, stage):
    """ZeRO-0: the engine's step guard; ZeRO-2: DeepSpeed's own non-finite check. Either way the
    step changes nothing (weights, optimizer moments and step counts, EMA) and is counted."""
    out = runs / f"nan_{stage}"
    cfg = load_config(config_file, [f"train.output_dir={out}", f"deepspeed.zero_stage={stage}", "train.steps=3",
                                    "train.debug_nan_steps=[1]", "train.checkpoint_every=1", "train.eval_every=0",
                                    "train.batch_log=false"])
    result = train(cfg)
    assert result["skipped_steps"] == 1 and result["step"] == 3
    rows = metric_rows(out, "train")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]
    assert rows[1]["images_per_s"] > 0 and "loss" not in rows[1] and rows[1]["grad_norm"] is None  # nothing averaged
    tags = {s: out / "checkpoints" / f"step{s:08d}" for s in (1, 2, 3)}
    states = {s: consolidated_state_dict(tag) for s, tag in tags.items()}
    names = _param_names(out)
    assert all(torch.equal(states[1][0][k], states[2][0][k]) for k in names)
    assert any(not torch.equal(states[2][0][k], states[3][0][k]) for k in names)
    assert [states[s][1]["ema"]["num_updates"] for s in (1, 2, 3)] == [1, 1, 2]
    optim = {s: _optimizer_tensors(tag) for s, tag in tags.items()}
    assert optim[1] and optim[1].keys() == optim[2].keys() == optim[3].keys()
    assert all(torch.equal(optim[1][k], optim[2][k]) for k in optim[1])  # moments and step counts kept
    assert any(not torch.equal(optim[2][k], optim[3][k]) for k in optim[2])


def _optimizer_tensors(tag_dir: Path) -> dict:
    """Every Adamax moment and step count in a DeepSpeed checkpoint (ZeRO-0 or ZeRO 1-2 layout)."""
    found: dict = {}

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, (*path, str(k)))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, (*path, str(i)))
        elif torch.is_tensor(obj) and path[-1] in ("exp_avg", "exp_inf", "step"):
            found[path] = obj

    for f in sorted(tag_dir.glob("*.pt")):
        blob = torch.load(f, map_location="cpu", weights_only=False)
        walk(blob.get("optimizer") or blob.get("optimizer_state_dict"), (f.name,))
    return found


def test_consecutive_skips_stop_with_a_clear_error_and_a_checkpoint(config_file, runs):
    """A grad-norm threshold below every real norm: each step is skipped; after 2 the run stops."""
    out = runs / "diverged"
    cfg = load_config(config_file, [f"train.output_dir={out}", "train.skip_threshold=1e-6",
                                    "train.max_consecutive_skips=2", "train.eval_every=0", "train.batch_log=false"])
    with pytest.raises(TrainingDiverged, match=r"2 consecutive steps skipped .* checkpoint .* saved at .*step00000002"):
        train(cfg)
    tag = resolve(out / "checkpoints")
    assert tag is not None and tag.name == "step00000002"
    sd, client = consolidated_state_dict(tag)
    assert client["skipped_steps"] == 2 and client["ema"]["num_updates"] == 0
    init = _initial_state(out)
    assert all(torch.equal(sd[k], init[k]) for k in _param_names(out))



def test_bf16_zero1_trains(config_file, runs):
    out = runs / "bf16"
    cfg = load_config(config_file, [f"train.output_dir={out}", "train.precision=bf16", "deepspeed.zero_stage=1",
                                    "train.steps=2", "train.eval_every=0", "train.batch_log=false"])
    result = train(cfg)
    assert result["skipped_steps"] == 0 and torch.isfinite(torch.tensor(result["loss"]))
    model, _ = load_exported(out / "final" / "model.pt")
    assert all(p.dtype == torch.float32 for p in model.parameters())


# -- several processes --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3_run(config_file, runs, reference) -> Path:
    out = runs / "zero3"
    _launch("deepspeed_single_node.sh", config_file, out, "deepspeed.zero_stage=3")
    return out


@pytest.mark.slow
def test_deepspeed_launcher_zero1_matches_single_process(config_file, runs, reference):
    out = runs / "zero1"
    proc = _launch("deepspeed_single_node.sh", config_file, out, "deepspeed.zero_stage=1")
    assert "--num_gpus 2" in proc.stdout and "--no_local_rank" in proc.stdout
    _assert_same_training(out, reference[0])


@pytest.mark.slow
def test_deepspeed_launcher_zero3_matches_single_process(zero3_run, reference):
    _assert_same_training(zero3_run, reference[0])


@pytest.mark.slow
def test_deepspeeds_own_zero_to_fp32_script_consolidates_a_two_rank_zero3_checkpoint(zero3_run, tmp_path):
    """The script DeepSpeed drops into every checkpoint folder, run as its documentation says (in this
    environment: it imports safetensors and huggingface_hub), gives the weights of our export."""
    ckpt = zero3_run / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    for flags, name in (([], "pytorch_model.bin"), (["--safe_serialization"], "model.safetensors")):
        out = tmp_path / name
        proc = subprocess.run([PY, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "-t", tag, *flags],
                              capture_output=True, text=True, env=launch_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if name.endswith(".bin"):
            state = torch.load(out / name, weights_only=True)
        else:
            from safetensors.torch import load_file

            state = load_file(str(out / name))
        model, _ = load_exported(zero3_run / "final" / "model.pt", use_ema=False)
        expected = model.state_dict()  # parameters and BatchNorm statistics
        assert set(state) == set(expected)
        for key, value in state.items():
            assert torch.equal(value.to(expected[key].dtype), expected[key]), key


@pytest.mark.slow
def test_torchrun_matches_single_process(config_file, runs, reference):
    out = runs / "torchrun"
    proc = _launch("torchrun_single_node.sh", config_file, out, "deepspeed.zero_stage=0")
    assert "--nproc_per_node 2" in proc.stdout
    _assert_same_training(out, reference[0])


@pytest.mark.slow
def test_resume_replays_the_uninterrupted_run_exactly(config_file, runs, zero3_run):
    """Stop a 2-rank ZeRO-3 run after step 2, resume it: the same weights, EMA and optimizer path at
    step 4 as the uninterrupted run, and every rank saw the same images in the same order."""
    out = runs / "resumed"
    _launch("deepspeed_single_node.sh", config_file, out, "deepspeed.zero_stage=3", "train.stop_after=2")
    first = metric_rows(out, "final")[-1]
    assert first["step"] == 2 and not first["finished"] and not (out / "final" / "model.pt").exists()
    proc = _launch("deepspeed_single_node.sh", config_file, out, "deepspeed.zero_stage=3")
    assert f"resumed from {out / 'checkpoints' / 'step00000002'} at step 2" in proc.stdout + proc.stderr
    got = torch.load(out / "final" / "model.pt", weights_only=False)
    want = torch.load(zero3_run / "final" / "model.pt", weights_only=False)
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(got[key][k], want[key][k]) for k in want[key]), key
    assert [r["step"] for r in metric_rows(out, "train")] == [1, 2, 3, 4]
    assert [r["loss"] for r in metric_rows(out, "train")] == [r["loss"] for r in metric_rows(zero3_run, "train")]
    seen = []
    for rank in (0, 1):
        name = f"batches/rank{rank:05d}.jsonl"
        resumed, straight = ((d / name).read_text() for d in (out, zero3_run))
        assert resumed == straight
        rows = [json.loads(line) for line in resumed.splitlines()]
        assert [r["step"] for r in rows] == [0, 1, 2, 3] and {r["slot"] for r in rows} == {rank}
        seen += [i for r in rows for i in r["ids"]]
    assert len(seen) == 2 * 4 * 4 and len(set(seen)) == len(seen)  # 4 steps x 2 slots x 4 images, none twice


def _netns_pair(tag: str):
    """Two network namespaces joined by a veth pair, or None when namespaces are unavailable."""
    if shutil.which("ip") is None:
        return None
    names = (f"avi{tag}a", f"avi{tag}b")
    ok = subprocess.run(["ip", "netns", "add", names[0]], capture_output=True).returncode == 0
    if not ok:
        return None
    cmds = [["ip", "netns", "add", names[1]],
            ["ip", "link", "add", f"v{tag}a", "type", "veth", "peer", "name", f"v{tag}b"],
            ["ip", "link", "set", f"v{tag}a", "netns", names[0]], ["ip", "link", "set", f"v{tag}b", "netns", names[1]],
            ["ip", "-n", names[0], "addr", "add", "10.213.7.1/24", "dev", f"v{tag}a"],
            ["ip", "-n", names[1], "addr", "add", "10.213.7.2/24", "dev", f"v{tag}b"]]
    for ns, dev in ((names[0], f"v{tag}a"), (names[1], f"v{tag}b")):
        cmds += [["ip", "-n", ns, "link", "set", "lo", "up"], ["ip", "-n", ns, "link", "set", dev, "up"]]
    for cmd in cmds:
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            for ns in names:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            return None
    return [(names[0], f"v{tag}a", "10.213.7.1"), (names[1], f"v{tag}b", "10.213.7.2")]


@pytest.mark.slow
def test_two_nodes_without_ssh_train_together(config_file, runs, reference, tmp_path):
    """Two 'nodes' (network namespaces joined by a veth pair, else loopback), each started by
    ``deepspeed --no_ssh --node_rank N`` through launch/deepspeed_multinode.sh: 2 ranks through the
    deepspeed launcher with ZeRO-2 (stages 1 and 3 run through its single-node form above)."""
    out = runs / "two_nodes"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    nodes = _netns_pair(str(os.getpid() % 100000))
    port = str(free_port())
    try:
        master = nodes[0][2] if nodes else "127.0.0.1"
        procs = []
        for rank in (0, 1):
            env = launch_env(HOSTFILE=str(hostfile), MASTER_ADDR=master, MASTER_PORT=port, NODE_RANK=str(rank))
            cmd = ["bash", str(REPO / "launch" / "deepspeed_multinode.sh"), str(config_file),
                   f"train.output_dir={out}", "deepspeed.zero_stage=2"]
            if nodes:
                env["GLOO_SOCKET_IFNAME"] = nodes[rank][1]
                cmd = ["ip", "netns", "exec", nodes[rank][0], *cmd]
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        logs = [p.communicate(timeout=400)[0] for p in procs]
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log[-4000:]
        assert "--no_ssh --node_rank 0" in logs[0] and "--no_ssh --node_rank 1" in logs[1]
    finally:
        for ns in (n[0] for n in nodes or ()):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    _assert_same_training(out, reference[0])


# -- launch scripts (printing only) --------------------------------------------------------------------------
def test_launch_scripts_print_what_they_start(config_file, tmp_path):
    env = launch_env(AVI_DRY_RUN="1", NPROC="3", MASTER_PORT="29999")
    out = subprocess.run(["bash", "launch/deepspeed_single_node.sh", str(config_file), "train.steps=5"], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("launching: deepspeed --num_gpus 3 --master_port 29999 --no_local_rank --module avi_scale.cli")
    assert out.rstrip().endswith(f"{config_file} train.steps=5")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    env.update(HOSTFILE=str(hostfile), MASTER_ADDR="10.0.0.1")
    out = subprocess.run(["bash", "launch/deepspeed_multinode.sh", str(config_file)], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "--hostfile" in out and "--launcher pdsh" in out and "--master_addr 10.0.0.1" in out
    missing = subprocess.run(["bash", "launch/deepspeed_multinode.sh", str(config_file)], cwd=REPO,
                             env=launch_env(AVI_DRY_RUN="1"), capture_output=True, text=True)
    assert missing.returncode == 2 and "HOSTFILE" in missing.stderr

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-001\\ngpu-002\\n'\n")
    (fake_bin / "scontrol").chmod(0o755)
    slurm = launch_env(AVI_DRY_RUN="1", SLURM_JOB_NODELIST="gpu-[001-002]", SLURM_NTASKS_PER_NODE="4(x2)",
                 SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(REPO),
                 PATH=f"{fake_bin}{os.pathsep}{launch_env()['PATH']}", HOSTFILE=str(tmp_path / "slurm-hosts"))
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm_deepspeed.sbatch"), str(config_file)], cwd=tmp_path, env=slurm,
                         capture_output=True, text=True, check=True).stdout
    assert (tmp_path / "slurm-hosts").read_text() == "gpu-001 slots=4\ngpu-002 slots=4\n"
    assert "--launcher slurm" in out and "--master_addr gpu-001" in out and "launch/train_entry.py" in out
    out = subprocess.run(["bash", str(REPO / "launch" / "slurm_torchrun.sbatch"), str(config_file), "train.steps=3"], cwd=tmp_path, env=slurm,
                         capture_output=True, text=True, check=True).stdout
    assert "launching: srun --ntasks-per-node=1" in out and "--nnodes 2" in out
    assert "--rdzv_endpoint gpu-001:29500" in out and out.rstrip().endswith("train.steps=3")

    env = launch_env(NCCL_DEBUG="INFO")
    subprocess.run(["bash", str(REPO / "launch" / "make_deepspeed_env.sh"), "NCCL_DEBUG", "NOT_SET_ANYWHERE"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    assert (tmp_path / ".deepspeed_env").read_text() == "NCCL_DEBUG=INFO\n"
