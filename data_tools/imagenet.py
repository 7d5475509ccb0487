"""The ``avi-shards imagenet`` source: the downsampled ImageNet npz batches (Imagenet8/16/32/64).

Format (our reading of the downsampled-ImageNet page of image-net.org and of Chrabaszcz, Loshchilov and
Hutter, "A Downsampled Variant of ImageNet as an Alternative to the CIFAR datasets", 2017, whose
``Imagenet{32,64}_train_npz`` / ``_val_npz`` archives these are; the pickled variant of the same
batches is not read here, use the npz downloads):

* ``train_data_batch_1.npz`` ... ``train_data_batch_10.npz`` (Imagenet64's training set comes in two
  zip parts; extract both into one folder) and ``val_data.npz``;
* each holds ``data``: uint8 ``[N, 3*S*S]``, one image per row in channel-major order as CIFAR's batches:
  the ``S*S`` red values row by row, then green, then blue, so a row reshapes to ``[3, S, S]``;
  ``labels``: N integers, the 1-based class indices 1..1000; the training batches also carry ``mean``
  (the mean image), which is not needed and not read.

The converter looks for the files anywhere under ``--src`` (each name once), reads ``S`` off the row
width (``--size`` checks it), stores labels 0-based (``label - 1``, 0..999) and keeps ImageNet's
validation images as the **test** split, as the generative-modelling literature reports on them; the
validation split is carved off the training set (``--val-fraction``).  Arrays stored uncompressed
inside the npz (``np.savez``) are memory-mapped, not read into memory (the 64x64 training set is 15 GB);
compressed ones (``np.savez_compressed``) are decompressed into memory.

Not to be confused with van den Oord et al.'s unlabelled "downsampled ImageNet" of PixelRNN (``train_32x32``
/ ``valid_32x32`` PNG folders, the bits/dim benchmark of Glow, NVAE and VDVAE): those PNG folders
convert with ``avi-shards folder`` (no ``--size``; val/test carved by fraction).
"""

from __future__ import annotations

import math
import struct
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.sources import ArrayImages, ConcatImages, Source, SourceError, file_info

TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL_FILE = "val_data.npz"
NUM_CLASSES = 1000
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # a zip member's local file header (30 bytes)


def npz_array(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of an npz file without unpickling: memory-mapped when the member is stored
    uncompressed, else read into memory.  A :class:`SourceError` names the file and what is wrong."""
    member = f"{key}.npy"
    try:
        with zipfile.ZipFile(path) as archive:
            if member not in archive.namelist():
                have = ", ".join(n.removesuffix(".npy") for n in archive.namelist())
                raise SourceError(f"{path}: no array {key!r} (it has: {have}); expected a downsampled ImageNet "
                                  f"batch with 'data' and 'labels'")
            info = archive.getinfo(member)
            if info.compress_type != zipfile.ZIP_STORED:
                with archive.open(member) as stream:
                    return np.lib.format.read_array(stream, allow_pickle=False)
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            if fields[0] != b"PK\x03\x04":
                raise SourceError(f"{path}: corrupt zip member {member}")
            f.seek(info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1])
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
                    return np.lib.format.read_array(stream, allow_pickle=False)
            offset = f.tell()
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"{path}: cannot read array {key!r} ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise SourceError(f"{path}: array {key!r} holds Python objects (refused: it would need unpickling)")
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _find(root: Path, name: str) -> Optional[Path]:
    found = sorted(p for p in root.rglob(name) if p.is_file())
    if len(found) > 1:
        raise SourceError(f"{root} holds {name} more than once ({', '.join(map(str, found[:3]))}); keep one copy")
    return found[0] if found else None


def _batch(path: Path, size: Optional[int]) -> ArrayImages:
    """One npz batch as (N, S, S, 3) images (a view; memory-mapped where possible) and 0-based labels."""
    data = npz_array(path, "data")
    labels = npz_array(path, "labels")
    if data.dtype != np.uint8 or data.ndim != 2:
        raise SourceError(f"{path}: 'data' must be uint8 [N, 3*S*S] rows, got {data.dtype} {list(data.shape)}")
    side = math.isqrt(data.shape[1] // 3)
    if data.shape[1] == 0 or 3 * side * side != data.shape[1]:
        raise SourceError(f"{path}: 'data' rows hold {data.shape[1]} values, not 3*S*S for a square S x S RGB image")
    if size is not None and side != size:
        raise SourceError(f"{path}: images are {side}x{side}, but --size {size} was given")
    labels = np.asarray(labels).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(f"{path}: 'labels' must be integers, got {labels.dtype}")
    if labels.shape[0] != data.shape[0]:
        raise SourceError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise SourceError(f"{path}: labels must be the 1-based class indices 1..{NUM_CLASSES} of the downsampled "
                          f"ImageNet format, found {int(labels.min())}..{int(labels.max())}")
    images = data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)  # channel-major rows -> (N, S, S, 3)
    return ArrayImages(images, labels.astype(np.int64) - 1, str(path))


def read_imagenet(src: str, size: Optional[int] = None) -> Source:
    """The downsampled ImageNet npz batches under ``src`` as a :class:`~data_tools.sources.Source`:
    official "train" (the 10 batches) and "test" (``val_data.npz``)."""
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"{src} is not a directory (expected the extracted Imagenet32/64 npz folders)")
    found = {name: _find(root, name) for name in TRAIN_FILES + [VAL_FILE]}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SourceError(f"{src}: missing {', '.join(missing)} (a downsampled ImageNet npz set has "
                          f"train_data_batch_1..10.npz and val_data.npz; extract every zip part into --src)")
    train = ConcatImages([_batch(found[name], size) for name in TRAIN_FILES], f"{src} (train_data_batch_*.npz)")
    test = _batch(found[VAL_FILE], size)
    if test.shape != train.shape:
        raise SourceError(f"{found[VAL_FILE]}: images are {test.shape[0]}x{test.shape[1]}, the training batches "
                          f"{train.shape[0]}x{train.shape[1]}")
    side = train.shape[0]
    info = {"kind": "imagenet", "size": side, "files": [file_info(found[n]) for n in TRAIN_FILES + [VAL_FILE]],
            "official_splits": ["train", "test"],
            "labels": "0-based (the files' 1-based class index - 1)",
            "note": "val_data.npz (ImageNet's validation images) is stored as the test split"}
    return Source(f"imagenet{side}", {"train": train, "test": test}, None, info)
