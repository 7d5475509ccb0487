"""Images/s of the shard loader vs reading the same images as individual PNG files.

Both sides decode the same PNG bytes (the embedded MNIST 5k digits by default) into float32 batches
[B, C, H, W] in [0, 1] with a torch DataLoader of 1, then 2 workers:

* shards: ``avi_scale.data.build_loader`` over WebDataset shards (exact mode, shuffle buffer 1000);
* files:  a map-style Dataset opening one PNG file per sample (the ImageFolder pattern), shuffled,
          batched by the DataLoader's default collate.

Each measurement runs one warm-up epoch first (page cache, worker start-up) and then times ``--epochs``
epochs; the ratio is shards / files from the same run.  Local disk with a warm page cache is the
friendliest case for per-file reading.  ``--http`` repeats both through a local HTTP server (a separate
``python -m http.server`` process on 127.0.0.1): one request per image against streamed shards, the
situation of object stores and remote file systems.

    python benchmarks/bench_loader.py [--images 5000] [--batch-size 64] [--epochs 3] [--http]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from avi_scale.config import DataConfig
from avi_scale.data import build_loader
from data_tools.mnist5k import load_mnist5k
from data_tools.sources import ArrayImages, Source
from data_tools.writer import WriteOptions, convert, encode_png


class PngFiles(Dataset):
    """One PNG file per sample, decoded on access (the per-file baseline)."""

    def __init__(self, paths: list[Path], labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, i: int):
        return Image.open(self.paths[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with self._open(i) as image:
            array = np.array(image, dtype=np.uint8)
        x = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1).float().div_(255.0)
        return x, int(self.labels[i])


class PngURLs(PngFiles):
    """One HTTP request per sample."""

    def __init__(self, urls: list[str], labels: np.ndarray):
        super().__init__([], labels)
        self.urls = urls

    def __len__(self) -> int:
        return len(self.urls)

    def _open(self, i: int):
        import io

        with urllib.request.urlopen(self.urls[i], timeout=30) as response:
            return Image.open(io.BytesIO(response.read()))


@contextlib.contextmanager
def http_server(root: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def images_per_second(make_batches, epochs: int) -> float:
    for _ in make_batches():  # warm-up epoch
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in make_batches():
            count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="how many MNIST 5k images to use")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per measurement")
    parser.add_argument("--http", action="store_true", help="also compare both through a local HTTP server")
    args = parser.parse_args()

    images, labels = load_mnist5k()
    images, labels = images[: args.images, :, :, None], labels[: args.images]
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        shards, files = Path(tmp) / "shards", Path(tmp) / "files"
        source = Source("bench", {"train": ArrayImages(images, labels, "mnist5k")}, None, {"kind": "bench"})
        convert(source, WriteOptions(out=str(shards), val_fraction=0.0, test_fraction=0.0, shard_samples=1000,
                                     progress=False))
        files.mkdir()
        paths = []
        for i, image in enumerate(images):
            paths.append(files / f"{i:06d}.png")
            paths[-1].write_bytes(encode_png(image))

        print(f"{len(images)} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, batch "
              f"{args.batch_size}, {args.epochs} timed epochs, torch threads {torch.get_num_threads()}")
        compare("local disk", str(shards), PngFiles(paths, labels), args)
        if args.http:
            with http_server(Path(tmp)) as url:
                urls = [f"{url}/files/{p.name}" for p in paths]
                compare("HTTP (127.0.0.1)", f"{url}/shards", PngURLs(urls, labels), args)


def compare(title: str, shards: str, per_file: Dataset, args: argparse.Namespace) -> None:
    print(f"{title}:")
    print(f"{'workers':>9} {'shards img/s':>13} {'files img/s':>12} {'ratio':>6}")
    for workers in (1, 2):
        cfg = DataConfig(train_urls=shards, binarize=False, num_workers=workers, shuffle_buffer=1000)
        loader = build_loader(cfg, "train", args.batch_size, 0, 1)
        shard_rate = images_per_second(lambda: loader, args.epochs)
        files = DataLoader(per_file, batch_size=args.batch_size, shuffle=True, num_workers=workers, drop_last=True)
        file_rate = images_per_second(lambda: files, args.epochs)
        print(f"{workers:>9} {shard_rate:>13.0f} {file_rate:>12.0f} {shard_rate / file_rate:>5.2f}x")


if __name__ == "__main__":
    main()
