"""Images/s of shard conversion (``avi-shards``) with 1 and N worker processes, on a JPEG folder.

The folder is made here: ``--images`` CelebA-like 178x218 JPEGs (a smooth picture plus noise, quality
90), converted as ``avi-shards celeba --size 64`` does it (NVAE's crop, bilinear resize to 64x64, PNG
encoding, tar writing, sha256) into a fresh local directory per measurement, once with 1 worker and once
with each of ``--workers``; the work is the converter's whole ``convert()`` call, so the parallel runs
include forking the workers and cutting the shards.  Each measurement is repeated ``--repeats`` times
and the best kept; the ratios are from the same run.  A warm-up conversion of a few images comes first
(imports, page cache).

    python benchmarks/bench_shards.py [--images 600] [--workers 2] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_tools.celeba import read_celeba  # noqa: E402
from data_tools.writer import WriteOptions, convert  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_jpegs(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:218, 0:178]
    for i in range(count):
        phase = rng.uniform(0, 6.28, size=3)
        base = np.stack([127 + 100 * np.sin(xx / (17 + 5 * c) + yy / 23 + phase[c]) for c in range(3)], axis=-1)
        image = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i + 1:06d}.jpg", quality=90)


def measure(src: Path, out_root: Path, workers: int, repeats: int) -> float:
    """Best images/s over ``repeats`` conversions of ``src`` with ``workers`` processes."""
    source = read_celeba(str(src), size=64)
    total = sum(len(s) for s in source.splits.values())
    best = 0.0
    for r in range(repeats):
        out = out_root / f"w{workers}_{r}"
        opts = WriteOptions(out=str(out), val_fraction=0.05, test_fraction=0.05, shard_samples=100, progress=False,
                            workers=workers)
        started = time.perf_counter()
        convert(source, opts)
        best = max(best, total / (time.perf_counter() - started))
        shutil.rmtree(out)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="worker counts compared with 1")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        root = Path(tmp)
        make_jpegs(root / "jpegs", args.images)
        make_jpegs(root / "warm", 20, seed=1)
        measure(root / "warm", root, 1, 1)
        rates = {1: measure(root / "jpegs", root, 1, args.repeats)}
        for workers in args.workers:
            rates[workers] = measure(root / "jpegs", root, workers, args.repeats)
    cpu = cpu_model()
    print(f"shard conversion, {args.images} JPEGs 178x218 -> 64x64 PNG shards (NVAE crop, bilinear); "
          f"{os.cpu_count()} CPUs: {cpu}")
    print(f"{'workers':>8} {'images/s':>10} {'x 1 worker':>11}")
    for workers, rate in rates.items():
        print(f"{workers:>8} {rate:>10.1f} {rate / rates[1]:>11.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu, "cpus": os.cpu_count(), "images": args.images,
                                               "images_per_s": {str(k): v for k, v in rates.items()},
                                               "ratio": {str(k): v / rates[1] for k, v in rates.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
