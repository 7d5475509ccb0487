"""Image-folder sources: PNG/JPEG files, one sub-folder per class or one flat folder, read one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from data_tools.sources import Source, SourceError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
