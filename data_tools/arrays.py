"""Array sources: ``.npy`` (memory-mapped) and ``.npz`` files of uint8 images, with optional labels."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.sources import ArrayImages, ConcatImages, Source, SourceError, file_info


def _as_nhwc(array: np.ndarray, layout: str, flat_shape: Optional[tuple[int, int, int]], origin: str) -> np.ndarray:
    if array.ndim == 2:
        if flat_shape is None:
            raise SourceError(f"{origin}: flat (N, {array.shape[1]}) images need --flat-shape C,H,W")
        c, h, w = flat_shape
        if c * h * w != array.shape[1]:
            raise SourceError(f"{origin}: --flat-shape {c},{h},{w} has {c * h * w} values, rows have {array.shape[1]}")
        return array.reshape(-1, c, h, w).transpose(0, 2, 3, 1)
    if array.ndim == 3:
        return array[..., None]
    if array.ndim != 4:
        raise SourceError(f"{origin}: images must be (N, H, W), (N, H, W, C), (N, C, H, W) or flat, got {array.shape}")
    if layout == "auto":
        last, second = array.shape[3] in (1, 3), array.shape[1] in (1, 3)
        if last == second:
            raise SourceError(f"{origin}: cannot tell channels-last from channels-first in {array.shape}; "
                              f"pass --layout")
        layout = "nhwc" if last else "nchw"
    return array if layout == "nhwc" else array.transpose(0, 2, 3, 1)


def _load_arrays(path: Path, labels_path: Optional[Path], images_key: str, labels_key: str, layout: str,
                 flat_shape: Optional[tuple[int, int, int]], label_offset: int) -> ArrayImages:
    if not path.is_file():
        raise SourceError(f"{path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if images_key not in archive.files:
                    raise SourceError(f"{path} has no array {images_key!r} (arrays: {', '.join(archive.files)}); "
                                      f"pass --images-key")
                images = archive[images_key]
                labels = archive[labels_key] if labels_key in archive.files else None
        elif path.suffix == ".npy":
            images, labels = np.load(path, mmap_mode="r", allow_pickle=False), None
        else:
            raise SourceError(f"{path}: expected a .npy or .npz file")
        if labels_path is not None:
            labels = np.load(labels_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{path}: cannot load the arrays ({exc})") from None
    images = _as_nhwc(images, layout, flat_shape, str(path))
    if labels is None:
        labels = np.full(images.shape[0], -1, dtype=np.int64)
    else:
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise SourceError(f"{labels_path or path}: labels must be integers, got {labels.dtype}")
        labels = labels.reshape(-1).astype(np.int64) + label_offset
        if labels.size and labels.min() < 0:
            raise SourceError(f"{labels_path or path}: labels below 0 after --label-offset {label_offset}")
    return ArrayImages(images, labels, str(path))


def read_numpy(splits: dict, labels: dict, images_key: str = "images", labels_key: str = "labels",
               layout: str = "auto", flat_shape: Optional[tuple[int, int, int]] = None, label_offset: int = 0,
               name: str = "numpy") -> Source:
    """``splits``: split -> list of .npy/.npz files; ``labels``: split -> list of label .npy files (optional,
    parallel to the image files; else the .npz array ``labels_key``, else unlabelled)."""
    out, info = {}, {"kind": "numpy", "files": {}}
    for split, paths in splits.items():
        if not paths:
            continue
        label_paths = labels.get(split) or [None] * len(paths)
        if len(label_paths) != len(paths):
            raise SourceError(f"--{split}-labels lists {len(label_paths)} files for {len(paths)} image files")
        parts = [_load_arrays(Path(p), Path(lp) if lp else None, images_key, labels_key, layout, flat_shape,
                              label_offset) for p, lp in zip(paths, label_paths)]
        out[split] = parts[0] if len(parts) == 1 else ConcatImages(parts, f"--{split}")
        info["files"][split] = [file_info(Path(p)) for p in paths]
    if "train" not in out:
        raise SourceError("--train names no files")
    shapes = {s.shape for s in out.values()}
    if len(shapes) != 1:
        raise SourceError(f"the splits hold images of different shapes: {sorted(shapes)}")
    info["official_splits"] = sorted(out)
    return Source(name, out, None, info)
