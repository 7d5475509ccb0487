"""The one place that draws: image grids (PIL, pixel for pixel) and matplotlib figures (Agg).

Used by the engine (sample and reconstruction grids during training), :mod:`avi_scale.evaluate`
(the paper's figures, comparisons) and :mod:`avi_scale.tune` (search plots).  It imports nothing of
avi-scale, so every room may use it.

Image grids: ``nrow`` columns of ``H x W`` images, ``pad`` white pixels between and around them, then
enlarged by ``scale`` (nearest neighbour).  Figures are saved at a fixed ``figsize * PLOT_DPI`` (no
tight bounding box), so every file has a known pixel size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

PLOT_DPI = 100


# -- image grids -----------------------------------------------------------------------------------
def grid_size(n: int, height: int, width: int, nrow: int, pad: int = 2, scale: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that :func:`save_image_grid` writes for ``n`` images."""
    cols = min(nrow, n)
    rows = math.ceil(n / nrow)
    return (cols * (width + pad) + pad) * scale, (rows * (height + pad) + pad) * scale


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> np.ndarray:
    """``images`` [N, C, H, W] (C = 1 or 3, values in [0, 1]) -> one uint8 RGB array on a white ground."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {shape}")
    if images.shape[0] == 0:
        raise ValueError("no images to draw")
    if nrow < 1 or pad < 0:
        raise ValueError(f"nrow must be >= 1 and pad >= 0 (got nrow={nrow}, pad={pad})")
    x = images.detach().float().cpu().clamp(0.0, 1.0).numpy()
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    n, _, h, w = x.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        canvas[top:top + h, left:left + w] = x[i].transpose(1, 2, 0)
    return (canvas * 255.0 + 0.5).astype(np.uint8)


def save_png(grid: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a uint8 [H, W, 3] array as a PNG, enlarged ``scale`` times; returns the path."""
    from PIL import Image

    if scale < 1:
        raise ValueError(f"scale must be >= 1 (got {scale})")
    img = Image.fromarray(grid, mode="RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int, pad: int = 2, scale: int = 1) -> Path:
    """:func:`image_grid` written as one PNG; returns the path."""
    if scale < 1:
        raise ValueError(f"nrow and scale must be >= 1 and pad >= 0 (got nrow={nrow}, pad={pad}, scale={scale})")
    return save_png(image_grid(images, nrow, pad), path, scale)


# -- matplotlib figures ------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at :data:`PLOT_DPI`, close it, and return the path."""
    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=PLOT_DPI)
    plt.close(fig)
    return path


def cell_edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around the centres ``x`` (for pcolormesh with uneven spacing)."""
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])
