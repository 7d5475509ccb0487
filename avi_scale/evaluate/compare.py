"""Compare finished runs side by side: seeds of one experiment pooled, attentive vs local at equal depth.

``avi-eval compare RUN_DIR... --out DIR`` reads, per run, the saved ``config.yaml``, ``metrics.jsonl`` and
the test likelihood ``<run>/test/nll.json`` written by ``avi-eval nll RUN --out RUN/test``; runs sharing a
config ``name`` are seeds of one experiment.  It writes

* ``compare.md`` / ``compare.json``: per experiment the mean and the sample standard deviation over seeds
  (and the range) of the IW negative log-likelihood, the negative ELBO and the KL, the active layers and
  the training wall-clock; and the per-seed rows;
* ``kl_heatmaps.png``: the paper's Figure 7 for every experiment side by side (attentive and local of
  equal depth next to each other): each layer's share of the KL over training, mean over seeds;
* ``kl_per_layer.png``: the test-set KL of every layer, mean and spread over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from avi_scale.evaluate.figures import kl_matrix, read_metrics
from avi_scale.plots import cell_edges, pyplot, save_figure


class CompareError(ValueError):
    """A run directory lacks what the comparison needs; the message names the run and the file."""


@dataclass
class RunSummary:
    run_dir: str
    name: str
    num_layers: int
    attentive: bool
    seed: int
    parameters: Optional[int]
    iw_samples: int
    count: int
    nll: float
    nll_se: float
    neg_elbo: float
    kl_per_layer: list[float]
    active_layers: int
    train_seconds: Optional[float]
    steps: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    train_kl: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    @property
    def kl(self) -> float:
        return float(sum(self.kl_per_layer))


def load_run(run_dir: str | Path, nll_file: str = "test/nll.json") -> RunSummary:
    """One finished run: its config, test likelihood and training KL per layer."""
    from avi_scale.config import ConfigError, load_config

    run = Path(run_dir)
    cfg_path, nll_path, metrics_path = run / "config.yaml", run / nll_file, run / "metrics.jsonl"
    for p, what in ((cfg_path, "the run's config"), (nll_path, f"the test likelihood (avi-eval nll {run} --out "
                                                                 f"{nll_path.parent})"), (metrics_path, "the metrics")):
        if not p.is_file():
            raise CompareError(f"{run}: missing {p.name} ({what}): {p}")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as exc:
        raise CompareError(f"{run}: unreadable config.yaml: {exc}") from None
    try:
        nll = json.loads(nll_path.read_text())
        records = read_metrics(metrics_path)
    except (json.JSONDecodeError, ValueError) as exc:
        raise CompareError(f"{run}: unreadable {nll_path.name} or metrics.jsonl: {exc}") from None
    if len(nll.get("kl_per_layer", [])) != cfg.model.num_layers:
        raise CompareError(f"{nll_path}: kl_per_layer has {len(nll.get('kl_per_layer', []))} entries but the run's "
                           f"model has {cfg.model.num_layers} layers: is it this run's evaluation?")
    steps, kl = kl_matrix(records, "train")
    # training time: each logged window's mean step time times its steps (validation and saving excluded)
    train_rows = [r for r in records if r.get("kind") == "train" and isinstance(r.get("step_time_s"), (int, float))]
    prev, seconds = 0, 0.0
    for r in train_rows:
        seconds += r["step_time_s"] * (r["step"] - prev)
        prev = r["step"]
    final = [r for r in records if r.get("kind") == "final"]
    params = final[-1].get("num_parameters") if final else None
    m = cfg.model
    return RunSummary(
        run_dir=str(run), name=cfg.name, num_layers=m.num_layers,
        attentive=bool(m.prior_attention.enabled or m.posterior_attention.enabled), seed=cfg.train.seed,
        parameters=int(params) if isinstance(params, (int, float)) else None,
        iw_samples=int(nll["iw_samples"]), count=int(nll["count"]), nll=float(nll["nll"]),
        nll_se=float(nll["nll_se"]), neg_elbo=float(nll["neg_elbo"]),
        kl_per_layer=[float(v) for v in nll["kl_per_layer"]], active_layers=int(nll["active_layers"]),
        train_seconds=seconds if train_rows else None, steps=steps, train_kl=kl)


def _stats(values: Sequence[float]) -> dict:
    v = list(values)
    return dict(mean=statistics.fmean(v), std=statistics.stdev(v) if len(v) > 1 else float("nan"),
                min=min(v), max=max(v), n=len(v))


def group_runs(runs: Sequence[RunSummary]) -> dict[str, list[RunSummary]]:
    """{experiment name: its runs by seed}, ordered by depth, then attentive before local."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.name, []).append(r)
    for name, rs in groups.items():
        shapes = {(r.num_layers, r.attentive) for r in rs}
        if len(shapes) > 1:
            raise CompareError(f"runs named {name!r} differ in depth or attention: {sorted(shapes)}")
        seeds = [r.seed for r in rs]
        if len(set(seeds)) != len(seeds):
            raise CompareError(f"runs named {name!r} repeat a seed ({seeds}): "
                               + ", ".join(r.run_dir for r in rs))
        rs.sort(key=lambda r: r.seed)
    return dict(sorted(groups.items(), key=lambda kv: (kv[1][0].num_layers, not kv[1][0].attentive, kv[0])))


def summarise(groups: dict[str, list[RunSummary]]) -> list[dict]:
    rows = []
    for name, rs in groups.items():
        r0 = rs[0]
        secs = [r.train_seconds for r in rs if r.train_seconds is not None]
        rows.append(dict(
            name=name, num_layers=r0.num_layers, attentive=r0.attentive, seeds=[r.seed for r in rs],
            parameters=r0.parameters, iw_samples=r0.iw_samples, test_images=r0.count,
            nll=_stats([r.nll for r in rs]), neg_elbo=_stats([r.neg_elbo for r in rs]), kl=_stats([r.kl for r in rs]),
            active_layers=_stats([r.active_layers for r in rs]),
            kl_per_layer_mean=np.mean([r.kl_per_layer for r in rs], axis=0).tolist(),
            train_minutes=statistics.fmean(secs) / 60 if secs else None))
    return rows


def _pm(s: dict, digits: int = 2) -> str:
    if math.isnan(s["std"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(rows: list[dict], groups: dict[str, list[RunSummary]]) -> str:
    lines = ["| experiment | layers | attention | seeds | test NLL (IW) | test −ELBO | KL | active layers "
             "| params | training min/run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = r["parameters"] if r["parameters"] is not None else "?"
        minutes = f"{r['train_minutes']:.1f}" if r["train_minutes"] is not None else "?"
        lines.append(
            f"| `{r['name']}` | {r['num_layers']} | {'depth-wise' if r['attentive'] else 'local'} | {len(r['seeds'])} "
            f"| {_pm(r['nll'])} | {_pm(r['neg_elbo'])} | {_pm(r['kl'])} | {_pm(r['active_layers'], 1)} "
            f"| {params} | {minutes} |")
    lines += ["", "Nats per image, mean ± sample standard deviation over seeds; IW: importance-weighted with "
              f"K = {rows[0]['iw_samples']} on {rows[0]['test_images']} test images.", "",
              "| run | seed | test NLL (± s.e.) | test −ELBO | KL per layer (top first) |", "|---|---|---|---|---|"]
    for rs in groups.values():
        for r in rs:
            kls = ", ".join(f"{v:.1f}" for v in r.kl_per_layer)
            lines.append(f"| `{r.run_dir}` | {r.seed} | {r.nll:.2f} ± {r.nll_se:.2f} | {r.neg_elbo:.2f} | {kls} |")
    return "\n".join(lines) + "\n"


def kl_heatmaps(groups: dict[str, list[RunSummary]], path: str | Path) -> Path:
    """Each experiment's KL share per layer over training (mean over seeds), panels side by side."""
    plt = pyplot()
    depths = sorted({rs[0].num_layers for rs in groups.values()})
    cols = max(sum(1 for rs in groups.values() if rs[0].num_layers == d) for d in depths)
    heights = [0.45 * d + 1.6 for d in depths]
    fig, axes = plt.subplots(len(depths), cols, figsize=(4.4 * cols + 1.0, sum(heights)), dpi=120, squeeze=False,
                             layout="constrained", gridspec_kw={"height_ratios": heights})
    for ax in axes.flat:
        ax.set_visible(False)
    col = {d: 0 for d in depths}
    mesh = None
    for name, rs in groups.items():
        d = rs[0].num_layers
        ax = axes[depths.index(d), col[d]]
        col[d] += 1
        ax.set_visible(True)
        n = min(r.train_kl.shape[1] for r in rs)
        steps = rs[0].steps[:n].astype(np.float64)
        kl = np.mean([r.train_kl[:, :n] for r in rs], axis=0)
        total = kl.sum(axis=0, keepdims=True)
        share = np.divide(kl, total, out=np.zeros_like(kl), where=total > 0)
        mesh = ax.pcolormesh(cell_edges(steps), np.arange(d + 1) + 0.5, share, cmap="magma", vmin=0.0, vmax=1.0,
                             shading="flat")
        ax.set_ylim(d + 0.5, 0.5)
        ax.set_yticks(range(1, d + 1))
        ax.set_xlabel("training step")
        ax.set_ylabel("layer (1 = top)")
        final = np.mean([r.kl_per_layer for r in rs], axis=0)
        ax.set_title(f"{name} ({'attentive' if rs[0].attentive else 'local'}, {len(rs)} seeds)\n"
                     f"test KL per layer: {' / '.join(f'{v:.1f}' for v in final)}", fontsize=8)
    if mesh is not None:
        fig.colorbar(mesh, ax=axes, fraction=0.03, pad=0.02, label="KL_l / sum KL (train, mean over seeds)")
    return save_figure(fig, path)


def kl_per_layer_figure(groups: dict[str, list[RunSummary]], path: str | Path) -> Path:
    """Test-set KL per layer, one bar group per experiment, error bars = spread over seeds."""
    plt = pyplot()
    depths = sorted({rs[0].num_layers for rs in groups.values()})
    fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.6), dpi=120, squeeze=False,
                             layout="constrained")
    for i, d in enumerate(depths):
        ax = axes[0, i]
        members = [(n, rs) for n, rs in groups.items() if rs[0].num_layers == d]
        width = 0.8 / len(members)
        for j, (name, rs) in enumerate(members):
            kl = np.array([r.kl_per_layer for r in rs])
            x = np.arange(1, d + 1) + (j - (len(members) - 1) / 2) * width
            ax.bar(x, kl.mean(0), width, yerr=kl.std(0, ddof=1) if len(rs) > 1 else None, capsize=2,
                   label=f"{name} ({'attentive' if rs[0].attentive else 'local'})",
                   color="tab:red" if rs[0].attentive else "tab:blue", alpha=0.85 if j % 2 == 0 else 0.55)
        ax.set_xticks(range(1, d + 1))
        ax.set_xlabel("layer (1 = top)")
        ax.set_ylabel("test KL (nats / image)")
        ax.set_title(f"{d} layers", fontsize=9)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def compare(run_dirs: Sequence[str | Path], out: str | Path, nll_file: str = "test/nll.json") -> dict[str, Path]:
    if not run_dirs:
        raise CompareError("no run directories given")
    groups = group_runs([load_run(r, nll_file) for r in run_dirs])
    rows = summarise(groups)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "compare.md", "json": out / "compare.json"}
    files["markdown"].write_text(markdown(rows, groups))
    runs = {n: [{k: v for k, v in asdict(r).items() if k not in ("steps", "train_kl")} for r in rs]
            for n, rs in groups.items()}
    files["json"].write_text(json.dumps(dict(experiments=rows, runs=runs), indent=2) + "\n")
    files["kl_heatmaps"] = kl_heatmaps(groups, out / "kl_heatmaps.png")
    files["kl_per_layer"] = kl_per_layer_figure(groups, out / "kl_per_layer.png")
    return files
