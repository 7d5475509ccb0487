"""The paper's pictures as PNG files: sample grids at several temperatures, reconstructions beside
their originals, the depth-wise attention of a layer, the KL per layer over training (Figure 7 of
the paper), the KL per layer and active units on the test set, and the training curves.

Grids and figures are drawn by :mod:`avi_scale.plots` (known pixel sizes).  Layers are numbered from 1 (the top layer, next to the N(0, I) prior), as in
``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from avi_scale.plots import PLOT_DPI, cell_edges, pyplot, save_figure, save_image_grid

def sample_grids(model, temperatures: Sequence[float], num_samples: int, out_dir: str | Path, seed: int = 0,
                 scale: int = 2, prefix: str = "samples") -> dict[float, Path]:
    """One grid of ``num_samples`` prior samples per temperature (the prior's sigmas scaled by T).

    Every temperature uses the same seed, so the grids show the same draws at different temperatures.
    Returns {temperature: path}.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples (eval.num_samples) must be >= 1, got {num_samples}")
    if not temperatures:
        raise ValueError("no temperatures given (eval.temperatures is empty)")
    bad = [t for t in temperatures if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"temperatures must be positive numbers, got {bad}")
    device = next(model.parameters()).device
    nrow = max(1, int(math.ceil(math.sqrt(num_samples))))
    out: dict[float, Path] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_fork_devices(device)):
            for t in temperatures:
                torch.manual_seed(seed)
                images = model.sample(num_samples, temperature=float(t))
                out[float(t)] = save_image_grid(images, Path(out_dir) / f"{prefix}_t{float(t):.2f}.png", nrow, scale=scale)
    finally:
        model.train(was_training)
    return out


def reconstruction_grid(model, x: torch.Tensor, path: str | Path, seed: int = 0, nrow: int = 8,
                        scale: int = 2) -> Path:
    """Originals and their reconstructions in alternating rows (a row of originals, then the same
    images reconstructed, ...), ``nrow`` images per row."""
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch [B, C, H, W], got {tuple(x.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_fork_devices(device)):
            torch.manual_seed(seed)
            recon = model.reconstruct(x.to(device)).float().cpu()
    finally:
        model.train(was_training)
    x = x.float().cpu()
    rows = []
    for start in range(0, x.shape[0], nrow):
        orig = x[start:start + nrow]
        rec = recon[start:start + nrow]
        if orig.shape[0] < nrow:  # pad a short last row with white so pairs stay aligned
            blank = torch.ones(nrow - orig.shape[0], *x.shape[1:])
            orig, rec = torch.cat([orig, blank]), torch.cat([rec, blank])
        rows += [orig, rec]
    return save_image_grid(torch.cat(rows), path, nrow, scale=scale)


def _fork_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# -- depth-wise attention ----------------------------------------------------------------------------
def attention_summary(model, x: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """Average depth-wise attention weights over images and pixels, as matrices.

    Returns {"prior": [L, L], "posterior": [L, L + 1]} (only the sides the model has), NaN where a
    layer does not attend: row ``l`` is the querying layer, column ``j`` the layer whose entry it
    reads; the posterior's last column is the preprocessed bottom-up feature.  Prior: layer ``l``
    reads layers ``0..l-1``.  Posterior: layer ``l`` reads ``l..L-1`` and the preprocessed feature.
    Every row sums to 1 over its readable columns.
    """
    device = next(model.parameters()).device
    L = model.cfg.num_layers
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_fork_devices(device)):
            torch.manual_seed(seed)
            weights = model.attention_weights(x.to(device))
    finally:
        model.train(was_training)
    out: dict[str, np.ndarray] = {}
    if weights.get("prior"):
        m = np.full((L, L), np.nan)
        for layer, w in weights["prior"].items():
            avg = w.float().mean(dim=(0, 2, 3)).cpu().numpy()  # [n = layer]
            if avg.shape[0] != layer:
                raise RuntimeError(f"prior attention of layer {layer} has {avg.shape[0]} entries, expected {layer}")
            m[layer, :layer] = avg
        out["prior"] = m
    if weights.get("posterior"):
        m = np.full((L, L + 1), np.nan)
        for layer, w in weights["posterior"].items():
            avg = w.float().mean(dim=(0, 2, 3)).cpu().numpy()  # [n = L - layer + 1]
            if avg.shape[0] != L - layer + 1:
                raise RuntimeError(f"posterior attention of layer {layer} has {avg.shape[0]} entries, "
                                   f"expected {L - layer + 1}")
            m[layer, layer:] = avg
        out["posterior"] = m
    return out


def attention_figure(summary: dict[str, np.ndarray], layer: int, path: str | Path,
                     figsize: tuple[float, float] = (12.0, 4.0)) -> Path:
    """Heat maps of the averaged attention (rows: querying layer, columns: layer read) for the prior
    and the posterior, and bar charts of what ``layer`` (0-based; -1 = last) reads."""
    plt = pyplot()
    sides = [s for s in ("prior", "posterior") if s in summary]
    if not sides:
        raise ValueError("the model has no depth-wise attention (model.prior_attention and "
                         "model.posterior_attention are both disabled): no attention picture")
    L = summary[sides[0]].shape[0]
    if not -L <= layer < L:
        raise ValueError(f"attention layer {layer} is out of range for {L} layers (use 0..{L - 1} or -1)")
    layer %= L
    fig, axes = plt.subplots(1, 2 * len(sides), figsize=figsize, dpi=PLOT_DPI,
                             gridspec_kw={"width_ratios": [3, 2] * len(sides)})
    for k, side in enumerate(sides):
        m = summary[side]
        ax_map, ax_bar = axes[2 * k], axes[2 * k + 1]
        cols = m.shape[1]
        im = ax_map.imshow(np.ma.masked_invalid(m), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        labels = [str(j + 1) for j in range(L)] + (["pre"] if cols > L else [])
        ax_map.set_xticks(range(cols), labels, fontsize=7)
        ax_map.set_yticks(range(L), [str(j + 1) for j in range(L)], fontsize=7)
        ax_map.set_xlabel("layer read (key/value)")
        ax_map.set_ylabel("querying layer")
        ax_map.set_title(f"{side} attention (mean weight)", fontsize=9)
        ax_map.axhline(layer, color="red", linewidth=0.8, alpha=0.6)
        fig.colorbar(im, ax=ax_map, fraction=0.046, pad=0.04)
        row = m[layer]
        readable = np.flatnonzero(~np.isnan(row))
        if readable.size:
            ax_bar.bar(range(readable.size), row[readable], color="tab:blue")
            ax_bar.set_xticks(range(readable.size), [labels[j] for j in readable], fontsize=7)
            ax_bar.set_ylim(0, 1)
        else:
            ax_bar.text(0.5, 0.5, "the top layer's prior is N(0, I):\nno prior attention", ha="center",
                        va="center", fontsize=8, transform=ax_bar.transAxes)
            ax_bar.set_xticks([])
        ax_bar.set_title(f"layer {layer + 1}: {side} weights", fontsize=9)
        ax_bar.set_xlabel("layer read")
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.15, top=0.88, wspace=0.45)
    return save_figure(fig, path)


# -- metrics of a run ----------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (one JSON object per line; "nan"/"inf" strings become
    floats).  A malformed line raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
        records.append({k: _number(v) for k, v in row.items()})
    return records


def _number(v: Any) -> Any:
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, list):
        return [_number(u) for u in v]
    return v


def kl_matrix(records: Sequence[dict], kind: str = "train", key: str = "kl_per_layer") -> tuple[np.ndarray, np.ndarray]:
    """(steps [T], KL [L, T]) from the records of ``kind`` that carry ``key`` (nats per image)."""
    rows = [r for r in records if r.get("kind") == kind and isinstance(r.get(key), list) and "step" in r]
    if not rows:
        raise ValueError(f"no {kind!r} records with a {key!r} list in the metrics")
    widths = {len(r[key]) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{key!r} lists have different lengths {sorted(widths)}: records of different models?")
    steps = np.array([r["step"] for r in rows], dtype=np.int64)
    kl = np.array([r[key] for r in rows], dtype=np.float64).T
    return steps, kl


def active_layers_over_training(records: Sequence[dict], threshold: float, kind: str = "train",
                                key: str = "kl_per_layer") -> tuple[np.ndarray, np.ndarray]:
    """(steps, number of layers whose KL exceeds ``threshold`` nats) per logged step."""
    steps, kl = kl_matrix(records, kind, key)
    return steps, (kl > threshold).sum(axis=0)


def kl_heatmap(records: Sequence[dict], path: str | Path, kind: str = "train", key: str = "kl_per_layer",
               figsize: tuple[float, float] = (9.0, 4.0), active_layer_kl: Optional[float] = None) -> Path:
    """The paper's Figure 7: KL per layer (rows, layer 1 = top) over training steps (columns).

    Colour is the layer's share of the total KL at that step (how evenly the layers are used); the
    right panel shows the absolute KL of each layer at the last step."""
    plt = pyplot()
    steps, kl = kl_matrix(records, kind, key)
    L, T = kl.shape
    total = kl.sum(axis=0, keepdims=True)
    share = np.divide(kl, total, out=np.zeros_like(kl), where=total > 0)
    fig, (ax, ax_last) = plt.subplots(1, 2, figsize=figsize, dpi=PLOT_DPI, gridspec_kw={"width_ratios": [4, 1]})
    edges_x = cell_edges(steps.astype(np.float64))
    edges_y = np.arange(L + 1) + 0.5
    mesh = ax.pcolormesh(edges_x, edges_y, share, cmap="magma", vmin=0.0, vmax=max(share.max(), 1e-12),
                         shading="flat")
    ax.set_ylim(L + 0.5, 0.5)  # layer 1 at the top
    ticks = list(range(1, L + 1)) if L <= 20 else sorted(set(np.linspace(1, L, 10, dtype=int).tolist()))
    ax.set_yticks(ticks)
    ax.set_xlabel("training step")
    ax.set_ylabel("layer (1 = top)")
    ax.set_title("share of the KL per layer over training", fontsize=9)
    fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02, label="KL_l / sum KL")
    last = kl[:, -1]
    ax_last.barh(np.arange(1, L + 1), last, color="tab:purple")
    ax_last.set_ylim(L + 0.5, 0.5)
    ax_last.set_yticks(ticks)
    ax_last.set_xlabel("nats / image")
    title = f"KL at step {int(steps[-1])}"
    if active_layer_kl is not None:
        ax_last.axvline(active_layer_kl, color="gray", linestyle="--", linewidth=0.8)
        title += f"\n{int((last > active_layer_kl).sum())}/{L} layers > {active_layer_kl:g}"
    ax_last.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.14, top=0.86, wspace=0.35)
    return save_figure(fig, path)


def curves_figure(records: Sequence[dict], path: str | Path, figsize: tuple[float, float] = (10.0, 4.0)) -> Path:
    """Training curves: negative ELBO (train, and validation when logged) and the KL / reconstruction
    split with the KL weight beta."""
    plt = pyplot()
    train = [r for r in records if r.get("kind") == "train" and "neg_elbo" in r]
    val = [r for r in records if r.get("kind") == "eval" and "val_neg_elbo" in r]
    if not train and not val:
        raise ValueError("the metrics hold no 'train' or 'eval' records with a negative ELBO")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=figsize, dpi=PLOT_DPI)
    if train:
        ax.plot([r["step"] for r in train], [r["neg_elbo"] for r in train], label="train -ELBO")
    if val:
        ax.plot([r["step"] for r in val], [r["val_neg_elbo"] for r in val], "o-", label="validation -ELBO (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / image")
    ax.set_title("negative ELBO", fontsize=9)
    ax.legend(fontsize=8)
    if train and "kl" in train[0]:
        ax2.plot([r["step"] for r in train], [r.get("kl", np.nan) for r in train], label="KL")
        ax2.plot([r["step"] for r in train], [r.get("recon_nll", np.nan) for r in train], label="reconstruction")
        ax2.set_ylabel("nats / image")
        if "beta" in train[0]:
            twin = ax2.twinx()
            twin.plot([r["step"] for r in train], [r.get("beta", np.nan) for r in train], color="gray",
                      linestyle="--", label="beta")
            twin.set_ylabel("KL weight beta")
            twin.set_ylim(0, 1.05)
        ax2.legend(fontsize=8, loc="upper right")
    ax2.set_xlabel("step")
    ax2.set_title("training: KL and reconstruction", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.93, bottom=0.14, top=0.9, wspace=0.3)
    return save_figure(fig, path)


def latent_usage_figure(kl_per_layer: Sequence[float], active_units: Sequence[int], units_per_layer: int,
                        path: str | Path, active_layer_kl: Optional[float] = None,
                        figsize: tuple[float, float] = (9.0, 3.5)) -> Path:
    """Test-set KL per layer and the fraction of active units per layer, side by side."""
    plt = pyplot()
    L = len(kl_per_layer)
    if L == 0 or len(active_units) != L:
        raise ValueError(f"need one KL and one active-unit count per layer, got {L} and {len(active_units)}")
    layers = np.arange(1, L + 1)
    ticks = layers if L <= 20 else sorted(set(np.linspace(1, L, 10, dtype=int).tolist()))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=figsize, dpi=PLOT_DPI)
    ax.set_xticks(ticks)
    ax2.set_xticks(ticks)
    ax.bar(layers, kl_per_layer, color="tab:purple")
    if active_layer_kl is not None:
        ax.axhline(active_layer_kl, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("layer (1 = top)")
    ax.set_ylabel("KL, nats / image")
    ax.set_title("KL per layer (test set)", fontsize=9)
    ax2.bar(layers, np.asarray(active_units, dtype=np.float64) / max(units_per_layer, 1), color="tab:green")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("layer (1 = top)")
    ax2.set_ylabel("fraction of active units")
    ax2.set_title(f"active units ({int(sum(active_units))} of {units_per_layer * L})", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.16, top=0.88, wspace=0.3)
    return save_figure(fig, path)
