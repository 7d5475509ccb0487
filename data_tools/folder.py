"""Image-folder sources: PNG/JPEG files, one sub-folder per class or one flat folder, read one at a time.

Every image is converted to L/RGB and, with a ``size``, brought to ``size x size`` by one of the
:data:`CROPS`, resampled with one of the :data:`INTERPOLATIONS` (PIL's filters, antialiased when
shrinking):

* ``fit`` (``avi-shards folder --size``): the shorter side resized to ``size``, then the centre
  ``size x size`` cut out;
* ``center``: the largest centred square cut out, then resized (CelebA-HQ, FFHQ: the whole image);
* ``nvae``: NVAE's CelebA-64 box, :data:`NVAE_CELEBA_BOX` of the 178x218 aligned CelebA images, then
  resized (see :mod:`data_tools.celeba`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.sources import Source, SourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# --interpolation names -> PIL.Image.Resampling members
INTERPOLATIONS = {"box": "BOX", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}
CROPS = ("fit", "center", "nvae")
# NVAE's CelebA-64 crop (datasets.py, CropCelebA64): PIL box (left, top, right, bottom) of a 178x218 image,
# the 148x148 square around the face
NVAE_CELEBA_BOX = (15, 40, 178 - 15, 218 - 30)
NVAE_CELEBA_SIZE = (178, 218)  # (width, height) of CelebA's aligned-and-cropped images (img_align_celeba)


def check_resize_options(size: Optional[int], interpolation: str, crop: str) -> None:
    if size is not None and size < 1:
        raise SourceError(f"--size must be >= 1, got {size}")
    if interpolation not in INTERPOLATIONS:
        raise SourceError(f"--interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    if crop not in CROPS:
        raise SourceError(f"--crop {crop!r} is not one of {', '.join(CROPS)}")


def fit_image(image, size: int, interpolation: str, crop: str, origin: str):
    """``image`` (a PIL image) cropped and resized to ``size x size`` (see the module's notes)."""
    from PIL import Image

    resample = getattr(Image.Resampling, INTERPOLATIONS[interpolation])
    width, height = image.size
    if crop == "fit":
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        return image.crop((left, top, left + size, top + size))
    if crop == "nvae":
        if (width, height) != NVAE_CELEBA_SIZE:
            raise SourceError(f"{origin}: image is {width}x{height} (WxH); --crop nvae is NVAE's box {NVAE_CELEBA_BOX} "
                              f"of the {NVAE_CELEBA_SIZE[0]}x{NVAE_CELEBA_SIZE[1]} aligned CelebA images "
                              f"(img_align_celeba); use --crop center for other images")
        box = NVAE_CELEBA_BOX
    else:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
    return image.crop(box).resize((size, size), resample)


class FolderImages:
    """Image files read on demand, converted to L/RGB and optionally cropped and resized to ``size``."""

    def __init__(self, paths: list[Path], labels: np.ndarray, channels: int, size: Optional[int],
                 interpolation: str = "lanczos", crop: str = "fit"):
        check_resize_options(size, interpolation, crop)
        self.paths, self.labels, self.channels, self.size = paths, labels, channels, size
        self.interpolation, self.crop = interpolation, crop
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
            image = fit_image(image, self.size, self.interpolation, self.crop, str(path))
        array = np.asarray(image, dtype=np.uint8)
        return array.reshape(array.shape[0], array.shape[1], self.channels)

    def image(self, i: int) -> np.ndarray:
        array = self._load(self.paths[i])
        if array.shape != self.shape:
            raise SourceError(f"{self.paths[i]}: image is {array.shape[0]}x{array.shape[1]}, but "
                              f"{self.paths[0]} is {self.shape[0]}x{self.shape[1]}; pass --size to resize "
                              f"and centre-crop all images to one square size")
        return array


def images_in(folder: Path, recursive: bool) -> list[Path]:
    """The PNG/JPEG files of ``folder`` (and its sub-folders when ``recursive``), sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(src: str, channels: int = 3, size: Optional[int] = None, name: Optional[str] = None,
                interpolation: str = "lanczos") -> Source:
    """PNG/JPEG files: one sub-folder per class (searched recursively; labels by sorted folder name), or a
    flat folder of unlabelled images (cls -1).  ``size``: shorter side resized with ``interpolation``,
    then centre-cropped."""
    root = Path(src)
    if not root.is_dir():
        raise SourceError(f"{src} is not a directory")
    check_resize_options(size, interpolation, "fit")

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
    images = FolderImages(paths, np.asarray(labels, dtype=np.int64), channels, size, interpolation, "fit")
    info = {"kind": "folder", "path": str(root.resolve()), "files": len(paths), "channels": channels,
            "resize_crop": size, "interpolation": interpolation if size else None,
            "layout": "class sub-folders" if class_dirs else "flat (unlabelled)"}
    return Source(name or root.resolve().name, {"train": images}, class_names, info)
