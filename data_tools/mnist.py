"""28x28 greyscale benchmark sources: MNIST / Fashion-MNIST IDX files and OMNIGLOT's ``chardata.mat``."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from data_tools.sources import ArrayImages, Source, SourceError, file_info

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


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
        info["files"] += [file_info(images_path), file_info(labels_path)]
    class_names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(d) for d in range(10)]
    return Source(name, splits, class_names, info)


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
    info = {"kind": "omniglot", **file_info(path), "labels": "alphabet (argmax of the one-hot target)",
            "official_splits": ["train", "test"], "notes": notes}
    return Source("omniglot", splits, None, info)
