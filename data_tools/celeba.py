"""The ``avi-shards celeba`` source: CelebA-style JPEG folders, cropped and resized to ``--size``.

Layout.  ``--src`` is the folder of images (CelebA's ``img_align_celeba/``, CelebA-HQ or FFHQ exports:
any flat folder of ``.jpg``/``.jpeg``/``.png`` files) or a folder holding ``img_align_celeba/``.  The
official splits come from ``list_eval_partition.txt`` (lines ``000001.jpg 0``: 0 train, 1 validation,
2 test; Kaggle's ``list_eval_partition.csv`` with its ``image_id,partition`` header reads too), looked
for beside the images, in ``--src``, in ``--src/Eval`` (the Google Drive layout) or given by
``--partition``.  Every listed image must exist and every image must be listed.  Without a partition
file all images are training images and ``--val-fraction``/``--test-fraction`` carve the other splits.
Images are unlabelled (``cls`` -1): CelebA's 40 attributes are not stored.

Crops (``--crop``), then a resize to ``--size`` x ``--size`` with ``--interpolation`` (PIL's filters):

* ``nvae`` (default): NVAE's CelebA-64 convention (``CropCelebA64`` in NVAE's ``datasets.py``, itself
  a simplification of the crop of Larsen et al., "Autoencoding beyond pixels"): the PIL box
  ``(left 15, top 40, right 163, bottom 188)`` of the 178x218 aligned images, the 148x148 square around
  the face, then resized, NVAE with torchvision's ``Resize(64)``, which on PIL images is PIL's bilinear
  filter: so ``--size 64 --crop nvae --interpolation bilinear`` (the defaults) stores exactly NVAE's
  64x64 model inputs (before its random flips: ``data.random_flips``).  Other image sizes are refused
  with the file named.
* ``center``: the largest centred square (the whole image for the square CelebA-HQ and FFHQ).

NVAE's CelebA-HQ 256 additionally models 5-bit pixels: convert at ``--size 256 --crop center`` and train
with ``model.num_bits=5 data.num_bits=5`` (the loader quantises; the shards stay 8-bit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.folder import FolderImages, check_resize_options, images_in
from data_tools.sources import Source, SourceError, file_info

PARTITION_NAMES = ("list_eval_partition.txt", "list_eval_partition.csv")
PARTITION_SPLITS = {0: "train", 1: "val", 2: "test"}


def _image_folder(root: Path) -> Path:
    if (root / "img_align_celeba").is_dir():
        root = root / "img_align_celeba"
        if (root / "img_align_celeba").is_dir():  # the zip extracted into a folder of its own name
            root = root / "img_align_celeba"
    return root


def find_partition(src: Path, images: Path) -> Optional[Path]:
    """The first ``list_eval_partition.{txt,csv}`` beside the images, in ``src`` or in ``src/Eval``."""
    for folder in (images, images.parent, src, src / "Eval"):
        for name in PARTITION_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_partition(path: Path) -> dict[str, str]:
    """file name -> split of a CelebA partition file; a :class:`SourceError` names the bad line."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the partition file ({exc})") from None
    for number, line in enumerate(lines, 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        if number == 1 and len(fields) == 2 and not fields[1].lstrip("-").isdigit():
            continue  # the CSV's header
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) not in PARTITION_SPLITS:
            raise SourceError(f"{path}, line {number}: expected '<image file> <0|1|2>' (0 train, 1 validation, "
                              f"2 test), got {line.strip()!r}")
        if fields[0] in out:
            raise SourceError(f"{path}, line {number}: {fields[0]} is listed twice")
        out[fields[0]] = PARTITION_SPLITS[int(fields[1])]
    if not out:
        raise SourceError(f"{path}: the partition file lists no images")
    return out


def read_celeba(src: str, size: int = 64, crop: str = "nvae", interpolation: str = "bilinear",
                partition: Optional[str] = None, name: Optional[str] = None) -> Source:
    """CelebA-style images cropped and resized to ``size`` (see the module's notes), split by the
    partition file when there is one."""
    check_resize_options(size, interpolation, crop)
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"{src} is not a directory")
    folder = _image_folder(root)
    paths = images_in(folder, recursive=False)
    if not paths:
        raise SourceError(f"{folder} holds no .png/.jpg/.jpeg images (expected the CelebA JPEGs, e.g. "
                          f"img_align_celeba/000001.jpg)")
    part_path = Path(partition) if partition else find_partition(root, folder)
    if partition and not part_path.is_file():
        raise SourceError(f"--partition {partition} does not exist")
    by_split: dict[str, list[Path]] = {}
    if part_path is None:
        by_split["train"] = paths
    else:
        assigned = read_partition(part_path)
        present = {p.name: p for p in paths}
        missing = [n for n in assigned if n not in present]
        if missing:
            raise SourceError(f"{part_path} lists {len(missing)} image(s) that are not in {folder} "
                              f"(first: {', '.join(missing[:3])})")
        unlisted = [n for n in present if n not in assigned]
        if unlisted:
            raise SourceError(f"{folder} holds {len(unlisted)} image(s) that {part_path} does not list "
                              f"(first: {', '.join(unlisted[:3])}); remove them or pass another --partition")
        for file_name, split in assigned.items():
            by_split.setdefault(split, []).append(present[file_name])
        if "train" not in by_split:
            raise SourceError(f"{part_path} assigns no image to the training split (0)")
    splits = {}
    for split in ("train", "val", "test"):
        if by_split.get(split):
            files = sorted(by_split[split])
            labels = np.full(len(files), -1, dtype=np.int64)
            splits[split] = FolderImages(files, labels, 3, size, interpolation, crop)
    info = {"kind": "celeba", "path": str(folder.resolve()), "files": len(paths), "size": size, "crop": crop,
            "interpolation": interpolation, "partition": file_info(part_path) if part_path else None,
            "official_splits": sorted(splits) if part_path else ["train"]}
    if crop == "nvae":
        info["crop_box"] = "NVAE CropCelebA64: PIL box (15, 40, 163, 188) of the 178x218 aligned images"
    if part_path is None:
        info["note"] = (f"no {PARTITION_NAMES[0]} found in or beside {folder}: every image is a training image "
                        f"and --val-fraction/--test-fraction carve the validation and test splits")
    return Source(name or f"celeba{size}", splits, None, info)
