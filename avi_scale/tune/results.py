"""What a search leaves behind: a table of every trial, the best config as a YAML, and the depth plot.

In ``tune.results_dir`` (default: the experiment directory):

* ``results.csv`` / ``results.md``: every trial's searched values, status (finished, stopped early by
  the scheduler, error, unfinished), best value of ``tune.metric`` and the step it was reached at,
  val_nll/val_bpd at that step, its run directory; best trial first.
* ``best_config.yaml``: the best trial's full config (base + its values), ready for ``avi-train``.
* depth searches (``model.num_layers`` searched): ``depth.png``, the metric against the number of
  latent layers with one line for attentive models (depth-wise attention on) and one for local ones
  (off), from trials that ran to the end -- the shape of Table 1 of the paper -- and the same numbers
  as a table in ``results.md``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from avi_scale.config import ConfigError, ExperimentConfig, TuneConfig, apply_overrides, save_config
from avi_scale.plots import PLOT_DPI, pyplot, save_figure
from avi_scale.tune.space import overrides_for

FINISHED, STOPPED, ERROR, UNFINISHED = "finished", "stopped early", "error", "unfinished"


@dataclass
class TrialRow:
    trial_id: str
    status: str
    params: dict[str, Any]
    best: float  # best value of tune.metric over the trial's reports (nan: none)
    best_step: Optional[int]
    last_step: Optional[int]
    at_best: dict[str, float] = field(default_factory=dict)  # val_nll / val_bpd at the best report
    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None  # Tune's latest checkpoint of the trial
    error: Optional[str] = None
    config: Optional[ExperimentConfig] = None  # base + the trial's values (None: the values do not apply)

    @property
    def attentive(self) -> Optional[bool]:
        if self.config is None:
            return None
        m = self.config.model
        return m.prior_attention.enabled or m.posterior_attention.enabled


def _trial_id(result: Any) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    name = Path(str(result.path)).name
    return name[len("trial_"):] if name.startswith("trial_") else name


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def collect(grid: Any, plan: Any) -> list[TrialRow]:
    """One row per trial of a Ray ``ResultGrid``, best first (trials without a value last)."""
    from avi_scale.config import to_dict

    metric, mode = plan.cfg.tune.metric, plan.cfg.tune.mode
    base = to_dict(plan.cfg)
    rows: list[TrialRow] = []
    for result in grid:
        params = dict(result.config or {})
        df = result.metrics_dataframe
        best, best_step, at_best = math.nan, None, {}
        last_step = None
        if df is not None and len(df) and metric in df.columns:
            series = df[metric].astype(float)
            if series.notna().any():
                idx = series.idxmin() if mode == "min" else series.idxmax()
                best = float(series[idx])
                row = df.loc[idx]
                best_step = int(row["step"]) if "step" in df.columns else None
                at_best = {k: float(row[k]) for k in ("val_nll", "val_bpd") if k in df.columns and _finite(row[k])}
        if df is not None and len(df) and "step" in df.columns:
            last_step = int(df["step"].max())
        metrics = result.metrics or {}
        try:
            config = apply_overrides(base, overrides_for(plan.dims, params))
        except ConfigError:  # values the base config refuses together (the trial failed; its error says why)
            config = None
        end = (config.train.stop_after or config.train.steps) if config is not None else plan.end_step
        if result.error is not None:
            status = ERROR
        elif last_step is not None and last_step >= end:
            status = FINISHED
        elif metrics.get("done"):
            status = STOPPED
        else:
            status = UNFINISHED
        checkpoint = result.checkpoint.path if result.checkpoint is not None else None
        error = None
        if result.error is not None:
            error = str(result.error).strip().splitlines()[-1][:300] if str(result.error).strip() else type(result.error).__name__
        rows.append(TrialRow(trial_id=_trial_id(result), status=status, params=params, best=best, best_step=best_step,
                             last_step=last_step, at_best=at_best, run_dir=metrics.get("run_dir"),
                             checkpoint=checkpoint, error=error, config=config))
    sign = 1.0 if mode == "min" else -1.0
    rows.sort(key=lambda r: (not math.isfinite(r.best), sign * r.best if math.isfinite(r.best) else 0.0, r.trial_id))
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.5g}"
    return str(v)


def _columns(plan: Any) -> list[str]:
    metric = plan.cfg.tune.metric
    extra = [k for k in ("val_nll", "val_bpd") if k != metric]
    return (["trial_id", "status"] + [d.name for d in plan.dims]
            + [f"best_{metric}", "best_step", "last_step"] + extra + ["run_dir", "error"])


def _values(row: TrialRow, plan: Any) -> list[Any]:
    metric = plan.cfg.tune.metric
    extra = [row.at_best.get(k) for k in ("val_nll", "val_bpd") if k != metric]
    return ([row.trial_id, row.status] + [row.params.get(d.name) for d in plan.dims]
            + [row.best, row.best_step, row.last_step] + extra + [row.run_dir, row.error])


def depth_table(rows: list[TrialRow], plan: Any) -> dict[bool, dict[int, float]]:
    """{attentive: {num_layers: best metric}} over trials that ran to the end (best per cell)."""
    mode = plan.cfg.tune.mode
    table: dict[bool, dict[int, float]] = {}
    for r in rows:
        if r.status != FINISHED or r.config is None or not math.isfinite(r.best):
            continue
        cell = table.setdefault(bool(r.attentive), {})
        layers = r.config.model.num_layers
        old = cell.get(layers)
        if old is None or (r.best < old if mode == "min" else r.best > old):
            cell[layers] = r.best
    return table


def _depth_plot(table: dict[bool, dict[int, float]], plan: Any, path: Path) -> Path:
    plt = pyplot()
    metric = plan.cfg.tune.metric
    fig, ax = plt.subplots(figsize=(6.6, 4.8), dpi=PLOT_DPI)
    styles = {True: ("attentive (depth-wise attention)", "tab:red", "o"), False: ("local (no attention)", "tab:blue", "s")}
    layers_all: set[int] = set()
    for attentive in (True, False):
        cell = table.get(attentive)
        if not cell:
            continue
        xs = sorted(cell)
        layers_all.update(xs)
        label, color, marker = styles[attentive]
        ax.plot(xs, [cell[x] for x in xs], marker=marker, color=color, label=label)
    ax.set_xticks(sorted(layers_all))
    ax.set_xlabel("variational layers (model.num_layers)")
    unit = {"val_bpd": "bits/dim", "bpd": "bits/dim"}.get(metric, "nats")
    ax.set_ylabel(f"{metric} ({unit}, {'lower' if plan.cfg.tune.mode == 'min' else 'higher'} is better)")
    ax.set_title(f"{plan.name}\n{metric} vs depth (trials run to step {plan.end_step})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _markdown(rows: list[TrialRow], plan: Any, table: Optional[dict[bool, dict[int, float]]]) -> str:
    tu = plan.cfg.tune
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"# Search `{plan.name}`", "",
             f"- experiment: `{plan.experiment_path}`",
             f"- metric: `{tu.metric}` ({tu.mode}), scheduler: {tu.scheduler}, search algorithm: {tu.search_alg}",
             f"- trials: {len(rows)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"]
    best = rows[0] if rows and math.isfinite(rows[0].best) else None
    if best is not None:
        lines.append(f"- best: trial `{best.trial_id}`, {tu.metric} = {_fmt(best.best)} at step {best.best_step}")
    lines += ["", "## Trials", ""]
    cols = _columns(plan)
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        cells = [_fmt(v).replace("|", "\\|").replace("\n", " ") for v in _values(r, plan)]
        lines.append("| " + " | ".join(cells) + " |")
    if table is not None:
        depths = sorted({k for cell in table.values() for k in cell})
        lines += ["", f"## {tu.metric} by depth (trials run to step {plan.end_step})", "",
                  "| num_layers | attentive | local |", "|---|---|---|"]
        for n in depths:
            lines.append(f"| {n} | {_fmt(table.get(True, {}).get(n))} | {_fmt(table.get(False, {}).get(n))} |")
    return "\n".join(lines) + "\n"


def write_best_config(best: TrialRow, plan: Any, path: Path) -> Path:
    """The best trial's config as a YAML for avi-train (its own output directory, no tune section)."""
    cfg = best.config
    assert cfg is not None
    cfg.train.output_dir = f"runs/{plan.name}-best"
    cfg.tune = TuneConfig()
    save_config(cfg, path)
    values = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    header = [f"# best trial {best.trial_id} of the avi-tune search {plan.name!r} ({plan.experiment_path})",
              f"# {plan.cfg.tune.metric} = {_fmt(best.best)} at step {best.best_step}; searched values: {values or 'none'}"]
    if best.checkpoint:
        header.append(f"# its latest checkpoint: {best.checkpoint}")
    header.append(f"# run it: avi-train {path}")
    path.write_text("\n".join(header) + "\n" + path.read_text())
    return path


def write_results(rows: list[TrialRow], plan: Any) -> dict[str, Path]:
    out = plan.results_dir
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_columns(plan))
        for r in rows:
            w.writerow([_fmt(v) for v in _values(r, plan)])
    files["csv"] = out / "results.csv"
    table = depth_table(rows, plan) if plan.depth_search else None
    (out / "results.md").write_text(_markdown(rows, plan, table))
    files["markdown"] = out / "results.md"
    best = rows[0] if rows and math.isfinite(rows[0].best) and rows[0].config is not None else None
    if best is not None:
        files["best_config"] = write_best_config(best, plan, out / "best_config.yaml")
    if table:
        files["depth_plot"] = _depth_plot(table, plan, out / "depth.png")
    return files
