"""Converters (avi-shards), shard loaders and their failure modes, on real data and real servers."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers module beside this file

from data_fixtures import (  # noqa: E402
    FAST_IO,
    CuttingProxy,
    HTTPServer,
    digits,
    make_bucket,
    moto_auth,
    png_bytes,
    read_split,
    rewrite_shard,
    tar_members,
    unique_id_arrays,
    write_cifar10_dir,
    write_cifar100_dir,
    write_idx,
)

from avi_scale.config import ConfigError, DataConfig, load_config
from avi_scale.data import (
    ManifestError,
    NotFoundError,
    ShardError,
    StorageError,
    build_loader,
    read_manifest,
)
from data_tools.cli import main as avi_shards
from data_tools.mnist5k import load_mnist5k, mnist5k_path

# quiet_exit, s3_endpoint, aws_env: tests/conftest.py
pytestmark = pytest.mark.usefixtures("quiet_exit")


def cfg(urls: str, **changes) -> DataConfig:
    values = {"train_urls": urls, "binarize": False, "shuffle_buffer": 64, **FAST_IO, **changes}
    return DataConfig(**values)


def convert(*argv: str) -> int:
    return avi_shards([*argv, "--no-progress"])


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """Loader batches [B, C, H, W] in [0, 1] back to uint8 [B, H, W, C]."""
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------ module data


@pytest.fixture(scope="module")
def mnist5k_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mnist5k")
    assert convert("mnist5k", "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    images, labels = digits()
    path = tmp_path_factory.mktemp("digits_src") / "digits.npz"
    np.savez(path, images=images, labels=labels)
    return path


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory, digits_npz) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert convert("numpy", "--train", str(digits_npz), "--name", "digits", "--shard-samples", "200",
                   "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def ids_dir(tmp_path_factory) -> Path:
    """400 training samples whose label is their id, in 11 uneven shards (37 samples, last 30)."""
    images, labels = unique_id_arrays(400)
    src = tmp_path_factory.mktemp("ids_src") / "ids.npz"
    np.savez(src, images=images, labels=labels)
    out = tmp_path_factory.mktemp("ids")
    assert convert("numpy", "--train", str(src), "--val-fraction", "0", "--test-fraction", "0",
                   "--shard-samples", "37", "--out", str(out)) == 0
    return out


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ embedded MNIST 5k


def test_load_mnist5k_matches_the_csv():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert images.max() == 255 and images.min() == 0
    assert np.bincount(labels).tolist() == [500] * 10
    with gzip.open(mnist5k_path(), "rt") as f:
        rows = [next(f) for _ in range(3)]
    for i, row in enumerate(rows):
        values = [int(float(v)) for v in row.strip().split(",")]
        assert images[i].ravel().tolist() == values[:-1] and labels[i] == values[-1]


def test_mnist5k_shards_round_trip_and_manifest(mnist5k_dir):
    manifest = read_manifest(str(mnist5k_dir))
    assert manifest["format"] == "avi-scale-shards" and manifest["version"] == 1
    assert manifest["image"] == {"shape": [28, 28, 1], "dtype": "uint8", "encoding": "png"}
    assert manifest["keys"] == {"image": "png", "label": "cls"}
    assert manifest["num_classes"] == 10 and manifest["command"].startswith("avi-shards mnist5k --out ")
    splits = manifest["splits"]
    assert {k: v["count"] for k, v in splits.items()} == {"train": 4000, "val": 500, "test": 500}
    assert splits["train"]["pattern"] == "train-{000000..000003}.tar"
    assert splits["val"]["pattern"] == "val-000000.tar"
    for split in splits.values():
        for shard in split["shards"]:
            data = (mnist5k_dir / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    assert sorted(p.name for p in mnist5k_dir.iterdir()) == sorted(  # the shards, manifest and wids indexes
        ["manifest.json"] + [f"{k}.wids.json" for k in splits]
        + [s["name"] for v in splits.values() for s in v["shards"]])

    images, labels = load_mnist5k()
    seen = []
    for split in ("train", "val", "test"):
        samples = read_split(str(mnist5k_dir), split)
        split_images = np.stack([image for _, image, _ in samples])
        mean = split_images.astype(np.float64).mean() / 255
        std = (split_images.astype(np.float64) / 255).std()
        assert splits[split]["mean"][0] == pytest.approx(mean, abs=1e-5)
        assert splits[split]["std"][0] == pytest.approx(std, abs=1e-5)
        for key, image, label in samples:
            index = int(key.split("_")[1])
            assert np.array_equal(image[..., 0], images[index]) and label == labels[index]
            seen.append(index)
    assert sorted(seen) == list(range(5000))  # every image exactly once across the splits

    # the evaluation loader delivers exactly the shard contents, in order
    x, y = collect(build_loader(cfg(str(mnist5k_dir)), "test", 64, 0, 1))
    assert x.dtype == torch.float32 and x.shape == (500, 1, 28, 28) and y.dtype == torch.int64
    expected = read_split(str(mnist5k_dir), "test")
    assert np.array_equal(as_uint8(x), np.stack([image for _, image, _ in expected]))
    assert y.tolist() == [label for _, _, label in expected]
    assert avi_shards(["verify", str(mnist5k_dir)]) == 0


def test_digits_numpy_round_trip_is_deterministic(digits_dir, digits_npz, tmp_path):
    images, labels = digits()
    manifest = read_manifest(str(digits_dir))
    assert manifest["image"]["shape"] == [8, 8, 1] and manifest["name"] == "digits"
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 1437, "val": 180, "test": 180}
    seen = []
    for split in manifest["splits"]:
        for key, image, label in read_split(str(digits_dir), split):
            index = int(key.split("_")[1])
            assert np.array_equal(image[..., 0], images[index]) and label == labels[index]
            seen.append(index)
    assert sorted(seen) == list(range(len(images)))

    again, other_seed = tmp_path / "again", tmp_path / "seed1"
    common = ["numpy", "--train", str(digits_npz), "--name", "digits", "--shard-samples", "200"]
    assert convert(*common, "--out", str(again)) == 0
    assert convert(*common, "--seed", "1", "--out", str(other_seed)) == 0

    def hashes(path: Path) -> list[str]:
        return [s["sha256"] for v in read_manifest(str(path))["splits"].values() for s in v["shards"]]

    assert hashes(again) == hashes(digits_dir)
    assert hashes(other_seed) != hashes(digits_dir)


def test_image_folders_with_classes_flat_and_resize(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    src = tmp_path / "classes"
    for name in ("cat", "dog"):
        (src / name / "sub").mkdir(parents=True)
        for i in range(5):
            path = src / name / ("sub" if i == 4 else "") / f"img{i}.png"  # class folders are searched recursively
            Image.fromarray(rng.integers(0, 256, size=(10, 12), dtype=np.uint8)).save(path)
    jpeg = src / "dog" / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, size=(10, 12), dtype=np.uint8)).save(jpeg, quality=90)
    out = tmp_path / "out"
    assert convert("folder", "--src", str(src), "--channels", "1", "--val-fraction", "0", "--test-fraction", "0",
                   "--out", str(out)) == 0
    manifest = read_manifest(str(out))
    assert manifest["image"]["shape"] == [10, 12, 1] and manifest["class_names"] == ["cat", "dog"]
    paths = sorted((src / "cat").rglob("*.png")) + sorted(p for p in (src / "dog").rglob("*") if p.is_file())
    for key, image, label in read_split(str(out), "train"):
        path = paths[int(key.split("_")[1])]
        truth = np.asarray(Image.open(path).convert("L"))  # PNGs exactly; the JPEG as PIL decodes it
        assert np.array_equal(image[..., 0], truth)
        assert label == (0 if path.parts[-2] == "cat" or path.parts[-3] == "cat" else 1)

    flat = tmp_path / "flat"
    flat.mkdir()
    for i, (h, w) in enumerate([(20, 16), (16, 24), (16, 16)]):
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(flat / f"f{i}.png")
    assert convert("folder", "--src", str(flat), "--out", str(tmp_path / "bad")) == 2  # sizes differ
    assert convert("folder", "--src", str(flat), "--size", "8", "--val-fraction", "0", "--test-fraction", "0",
                   "--out", str(tmp_path / "sq")) == 0
    manifest = read_manifest(str(tmp_path / "sq"))
    assert manifest["image"]["shape"] == [8, 8, 3] and manifest["num_classes"] == 0
    samples = read_split(str(tmp_path / "sq"), "train")
    assert len(samples) == 3 and all(label == -1 for _, _, label in samples)
    x, y = collect(build_loader(cfg(str(tmp_path / "sq")), "train", 3, 0, 1, train=False))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [-1, -1, -1]


def test_cifar_pickles_directory_and_targz(tmp_path):
    truth = write_cifar10_dir(tmp_path / "c10")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "c10" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for src, out in ((tmp_path / "c10", tmp_path / "o1"), (tmp_path / "cifar-10-python.tar.gz", tmp_path / "o2")):
        assert convert("cifar10", "--src", str(src), "--out", str(out)) == 0
        manifest = read_manifest(str(out))
        assert manifest["image"]["shape"] == [32, 32, 3] and manifest["class_names"][3] == "class3"
        assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 18, "val": 2, "test": 6}
        for split in ("train", "val", "test"):
            for key, image, label in read_split(str(out), split):
                origin, index = key.split("_")
                images, labels = truth[origin]
                assert np.array_equal(image, images[int(index)]) and label == labels[int(index)]
    assert read_manifest(str(tmp_path / "o1"))["splits"] == read_manifest(str(tmp_path / "o2"))["splits"]

    truth100 = write_cifar100_dir(tmp_path / "c100")
    assert convert("cifar100", "--src", str(tmp_path / "c100"), "--labels", "coarse", "--val-fraction", "0",
                   "--out", str(tmp_path / "o3")) == 0
    assert read_manifest(str(tmp_path / "o3"))["class_names"][:2] == ["c0", "c1"]
    for split in ("train", "test"):
        for key, image, label in read_split(str(tmp_path / "o3"), split):
            images, _, coarse = truth100[key.split("_")[0]]
            assert np.array_equal(image, images[int(key.split("_")[1])]) and label == coarse[int(key.split("_")[1])]
    (tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert convert("cifar10", "--src", str(tmp_path / "c10"), "--out", str(tmp_path / "o4")) == 2


def test_mnist_idx_and_omniglot_mat(tmp_path, capsys):
    rng = np.random.default_rng(5)
    src = tmp_path / "idx"
    src.mkdir()
    truth = {}
    for prefix, n, gz in (("train", 30, True), ("t10k", 10, False)):
        images, labels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n)
        suffix = ".gz" if gz else ""
        write_idx(src / f"{prefix}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(src / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz)
        truth["train" if prefix == "train" else "test"] = (images, labels)
    assert convert("mnist", "--src", str(src), "--name", "fashion-mnist", "--out", str(tmp_path / "m")) == 0
    manifest = read_manifest(str(tmp_path / "m"))
    assert manifest["name"] == "fashion-mnist" and manifest["class_names"][0] == "T-shirt/top"
    for split in ("train", "val", "test"):
        for key, image, label in read_split(str(tmp_path / "m"), split):
            images, labels = truth[key.split("_")[0]]
            assert np.array_equal(image[..., 0], images[int(key.split("_")[1])])
            assert label == labels[int(key.split("_")[1])]
    (src / "t10k-images-idx3-ubyte").write_bytes((src / "t10k-images-idx3-ubyte").read_bytes()[:-5])
    capsys.readouterr()
    assert convert("mnist", "--src", str(src), "--out", str(tmp_path / "m2")) == 2
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err

    scipy_io = pytest.importorskip("scipy.io")
    upright = rng.integers(0, 256, size=(12, 28, 28)).astype(np.float64)
    columns = np.stack([u.ravel(order="F") for u in upright], axis=1) / 255.0  # MATLAB column-major images
    targets = np.eye(50)[:, rng.integers(0, 50, size=12)]
    scipy_io.savemat(tmp_path / "chardata.mat", {"data": columns[:, :8], "target": targets[:, :8],
                                                 "testdata": columns[:, 8:], "testtarget": targets[:, 8:]})
    assert convert("omniglot", "--src", str(tmp_path / "chardata.mat"), "--val-fraction", "0",
                   "--out", str(tmp_path / "om")) == 0
    assert read_manifest(str(tmp_path / "om"))["source"]["notes"] == []  # k/255 values: no quantisation
    for split, offset in (("train", 0), ("test", 8)):
        for key, image, label in read_split(str(tmp_path / "om"), split):
            index = int(key.split("_")[1]) + offset
            assert np.array_equal(image[..., 0], upright[index].astype(np.uint8))
            assert label == targets[:, index].argmax()


def test_tar_reader_matches_tarfile_on_ustar_gnu_and_pax_archives():
    import io

    from avi_scale.data.shards import TarFormatError, iter_tar_members

    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        long = "l" * 120 if fmt != tarfile.USTAR_FORMAT else "short"
        members = [("a.png", b"x" * 513), ("d/" + "n" * 95 + "/b.cls", b"7"), ("e.txt", b""), (long + ".png", b"yy")]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
            folder = tarfile.TarInfo("d")
            folder.type = tarfile.DIRTYPE
            archive.addfile(folder)
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        assert list(iter_tar_members(io.BytesIO(buffer.getvalue()))) == members
        with pytest.raises(TarFormatError, match="unexpected end of data"):
            list(iter_tar_members(io.BytesIO(buffer.getvalue()[:1024])))
    with pytest.raises(TarFormatError, match="tar header"):
        list(iter_tar_members(io.BytesIO(b"definitely not a tar archive" * 40)))


# ------------------------------------------------------------------------------------ partitioning


def test_epoch_plan_splits_an_epoch_between_ranks_and_workers_without_io():
    from avi_scale.data.plan import EpochPlan, consumed_positions, eval_share

    counts = (37,) * 10 + (30,)  # 400 samples in uneven shards

    def plan(rank: int, train: bool = True, epoch: int = 1, start_batch: int = 0) -> EpochPlan:
        lo, hi = eval_share(sum(counts), rank, 3)
        return EpochPlan(counts=counts, train=train, mode="exact", seed=0, epoch=epoch, rank=rank,
                         world_size=2 if train else 3, batch_size=8, num_batches=25 if train else -(-(hi - lo) // 8),
                         num_workers=2, start_batch=start_batch, positions=(0, 0), shuffle_buffer=0)

    def samples(pieces) -> list[tuple[int, int]]:
        return [(shard, n) for shard, start, stop in pieces for n in range(start, stop)]

    train = [s for rank in range(2) for k in range(2) for s in samples(plan(rank).exact_pieces(k))]
    assert len(train) == len(set(train)) == 400  # 2 ranks x 25 batches x 8: every sample once
    assert plan(0).shard_order() != plan(0, epoch=2).shard_order() and plan(0).shard_order() == plan(1).shard_order()
    evaluation = [s for rank in range(3) for slot in range(2) for s in samples(plan(rank, train=False).eval_pieces(slot))]
    assert evaluation == [(shard, n) for shard, count in enumerate(counts) for n in range(count)]  # manifest order
    resumed = plan(0, start_batch=5)
    assert [resumed.logical_worker(slot) for slot in range(2)] == [(1, 2, 12), (0, 3, 13)]
    assert consumed_positions(5, 2, 8) == [24, 16]  # batches 0, 2, 4 and 1, 3


def test_two_ranks_two_workers_cover_the_dataset_once(ids_dir):
    for batch_size, dropped in ((8, 0), (12, 16)):  # 400 = 2 x 25 x 8; 400 = 2 x 16 x 12 + 16
        loaders = [build_loader(cfg(str(ids_dir), num_workers=2), "train", batch_size, rank, 2) for rank in range(2)]
        assert loaders[0].num_batches == loaders[1].num_batches == 400 // (2 * batch_size)
        epochs = []
        for epoch in range(2):
            ids = []
            for loader in loaders:
                batches = [(x, y) for x, y in loader]
                assert len(batches) == loader.num_batches and all(len(y) == batch_size for _, y in batches)
                assert loader.state_dict()["epoch"] == epoch + 1
                ids += [int(v) for _, y in batches for v in y]
            assert len(ids) == len(set(ids)) == 400 - dropped and set(ids) <= set(range(400))
            epochs.append(ids)
        assert epochs[0] != epochs[1]  # a new shard order and shuffle each epoch

    for world_size, workers in ((2, 2), (3, 0)):
        ids, counts = [], []
        for rank in range(world_size):
            loader = build_loader(cfg(str(ids_dir), num_workers=workers), "train", 7, rank, world_size, train=False)
            x, y = collect(loader)
            assert len(y) == loader.num_samples and sum(1 for _ in loader) == loader.num_batches
            ids += y.tolist()
            counts.append(len(y))
        assert sorted(ids) == list(range(400)) and max(counts) - min(counts) <= 1


def test_resampled_mode_gives_equal_counts_and_reproducible_streams(ids_dir):
    def run(rank: int, epoch_batches: int = 0) -> list[int]:
        loader = build_loader(cfg(str(ids_dir), mode="resampled", num_workers=2, epoch_batches=epoch_batches),
                              "train", 10, rank, 2)
        return [int(v) for _, y in loader for v in y]

    first = run(0)
    assert len(first) == 20 * 10 and set(first) <= set(range(400))
    assert run(0) == first and run(1) != first
    assert len(run(1, epoch_batches=7)) == 70


def test_binarisation_and_flips_are_seeded(ids_dir):
    images, _ = unique_id_arrays(400)
    binary = cfg(str(ids_dir), binarize=True)
    a = list(build_loader(binary, "train", 16, 0, 1))
    b = list(build_loader(binary, "train", 16, 0, 1))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    x, y = torch.cat([x for x, _ in a]), torch.cat([y for _, y in a])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    grey = torch.from_numpy(images[y.numpy()].astype(np.float32) / 255)
    assert abs(x[:, 0].mean().item() - grey.mean().item()) < 0.02  # Bernoulli(p) has mean p

    loader = build_loader(binary, "train", 16, 0, 1)
    epochs = [{int(v): img for x, y in loader for v, img in zip(y, x)} for _ in range(2)]
    assert loader.epoch == 2 and sorted(epochs[0]) == sorted(epochs[1]) == list(range(400))
    assert sum(torch.equal(epochs[0][k], epochs[1][k]) for k in range(400)) < 10  # a fresh draw each epoch

    flips = cfg(str(ids_dir), random_flips=True, shuffle_buffer=0)
    flipped = 0
    for x, y in build_loader(flips, "train", 16, 0, 1):
        for img, label in zip(as_uint8(x)[..., 0], y.tolist()):
            original = images[label]
            assert np.array_equal(img, original) or np.array_equal(img, original[:, ::-1])
            flipped += int(not np.array_equal(img, original))
    assert 100 < flipped < 300


def test_resume_mid_epoch_repeats_and_skips_nothing(ids_dir):
    for mode in ("exact", "resampled"):
        config = cfg(str(ids_dir), num_workers=2, binarize=True, random_flips=True, mode=mode)
        full = build_loader(config, "train", 8, 1, 2)
        reference = [batch for _ in range(2) for batch in full]  # epochs 0 and 1 uninterrupted
        assert len(reference) == 2 * full.num_batches == 50

        for stop in (7, 24, 25):  # odd position (worker rotation), last batch, epoch boundary
            first = build_loader(config, "train", 8, 1, 2)
            taken = []
            for batch in first:
                taken.append(batch)
                if len(taken) == stop:
                    break
            state = json.loads(json.dumps(first.state_dict()))
            assert state["epoch"] == stop // 25 and state["batch"] == stop % 25
            resumed = build_loader(config, "train", 8, 1, 2)
            resumed.load_state_dict(state)
            resumed.set_epoch(state["epoch"])  # a no-op on the current epoch
            rest = list(resumed)
            if stop % 25:
                rest += list(resumed)  # the following epoch
            combined = taken + rest
            assert len(combined) == 50
            for (x1, y1), (x2, y2) in zip(reference, combined):
                assert torch.equal(y1, y2) and torch.equal(x1, x2)

    config = cfg(str(ids_dir), num_workers=2)
    by_start = build_loader(config, "train", 8, 0, 2, epoch=1, start_batch=5)
    full = build_loader(config, "train", 8, 0, 2, epoch=1)
    assert [y.tolist() for _, y in by_start] == [y.tolist() for _, y in full][5:]
    other = build_loader(cfg(str(ids_dir), num_workers=1), "train", 8, 0, 2)
    with pytest.raises(ValueError, match="num_workers"):
        other.load_state_dict(full.state_dict())


def test_data_config_is_validated():
    with pytest.raises(ConfigError, match="data.mode"):
        load_config(overrides=["data.mode=sometimes"])
    with pytest.raises(ConfigError, match="data.io_retries"):
        load_config(overrides=["data.io_retries=0"])
    with pytest.raises(ValueError, match="val_urls"):
        build_loader(DataConfig(train_urls="x/train-{000000..000001}.tar"), "val", 4, 0, 1)


# --------------------------------------------------------------------------------------- remote


def test_s3_upload_with_the_converter_and_stream_back(s3_endpoint, aws_env, digits_npz, digits_dir, caplog,
                                                      monkeypatch):
    make_bucket(s3_endpoint, "avi-data")
    url = "s3://avi-data/sets/digits"
    assert convert("numpy", "--train", str(digits_npz), "--name", "digits", "--shard-samples", "200",
                   "--out", url, "--endpoint-url", s3_endpoint) == 0
    local = read_manifest(str(digits_dir))
    remote_cfg = cfg(url, s3_endpoint_url=s3_endpoint, num_workers=2)
    from avi_scale.data import openers

    openers.configure(endpoint_url=None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the environment alone locates the endpoint
    remote = read_manifest(url)
    assert remote["splits"] == local["splits"]  # identical shards: same sha256 and counts

    for split in ("val", "test"):
        x_remote, y_remote = collect(build_loader(remote_cfg, split, 50, 0, 1))
        x_local, y_local = collect(build_loader(cfg(str(digits_dir), num_workers=2), split, 50, 0, 1))
        assert torch.equal(y_remote, y_local) and torch.equal(x_remote, x_local)
    pattern = url + "/" + local["splits"]["train"]["pattern"]
    train_remote = list(build_loader(cfg(pattern, s3_endpoint_url=s3_endpoint, num_workers=2), "train", 32, 1, 2))
    train_local = list(build_loader(cfg(str(digits_dir), num_workers=2), "train", 32, 1, 2))
    assert len(train_remote) == len(train_local) == 1437 // 64
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(train_remote, train_local))
    assert avi_shards(["verify", url, "--endpoint-url", s3_endpoint]) == 0
    assert convert("numpy", "--train", str(digits_npz), "--out", url, "--endpoint-url", s3_endpoint) == 2  # exists
    assert "testing-secret-never-logged" not in caplog.text


def test_s3_missing_bucket_object_and_wrong_credentials(s3_endpoint, aws_env, digits_npz, capsys):
    make_bucket(s3_endpoint, "avi-errors")
    url = "s3://avi-errors/digits"
    assert convert("numpy", "--train", str(digits_npz), "--shard-samples", "600", "--out", url,
                   "--endpoint-url", s3_endpoint) == 0
    capsys.readouterr()
    assert convert("numpy", "--train", str(digits_npz), "--out", "s3://no-such-bucket/x",
                   "--endpoint-url", s3_endpoint) == 2
    assert "no-such-bucket" in capsys.readouterr().err

    start = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        build_loader(cfg("s3://no-such-bucket/digits", s3_endpoint_url=s3_endpoint), "train", 8, 0, 1)
    with pytest.raises(ManifestError, match="no manifest.json at s3://avi-errors/nothing-here"):
        build_loader(cfg("s3://avi-errors/nothing-here", s3_endpoint_url=s3_endpoint), "train", 8, 0, 1)

    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).delete_object(Bucket="avi-errors", Key="digits/train-000001.tar")
    loader = build_loader(cfg(url, s3_endpoint_url=s3_endpoint, num_workers=2), "train", 8, 0, 1)
    with pytest.raises(NotFoundError, match=r"s3://avi-errors/digits/train-00000\d\.tar does not exist"):
        list(loader)

    loader = build_loader(cfg(url, s3_endpoint_url=s3_endpoint), "val", 8, 0, 1)
    moto_auth(s3_endpoint, enforce=True)
    try:
        refused = r"refused access to s3://avi-errors/digits/val-000000\.tar .*InvalidAccessKeyId"
        with pytest.raises(StorageError, match=refused) as info:
            list(loader)
        assert "testing-secret-never-logged" not in str(info.value) and "credentials from env" in str(info.value)
    finally:
        moto_auth(s3_endpoint, enforce=False)
    assert time.monotonic() - start < 20


def test_s3_connection_drops_are_resumed_and_a_vanished_server_fails_fast(s3_endpoint, aws_env, digits_npz,
                                                                           digits_dir):
    make_bucket(s3_endpoint, "avi-flaky")
    url = "s3://avi-flaky/digits"
    assert convert("numpy", "--train", str(digits_npz), "--name", "digits", "--shard-samples", "200", "--out", url,
                   "--endpoint-url", s3_endpoint) == 0
    port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = CuttingProxy(port, cut_after=150_000)  # every shard (~400 kB) is cut a few times
    try:
        x_flaky, y_flaky = collect(build_loader(cfg(url, s3_endpoint_url=proxy.url, io_retries=4), "val", 60, 0, 1))
    finally:
        proxy.stop()
    assert proxy.cuts >= 2
    x_local, y_local = collect(build_loader(cfg(str(digits_dir)), "val", 60, 0, 1))
    assert torch.equal(x_flaky, x_local) and torch.equal(y_flaky, y_local)

    dying = CuttingProxy(port, cut_after=150_000, die_after_cut=True)
    try:
        loader = build_loader(cfg(url, s3_endpoint_url=dying.url, num_workers=1), "train", 8, 0, 1)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"giving up on s3://avi-flaky/digits/train-00000\d\.tar at byte"):
            list(loader)
        assert time.monotonic() - start < 15
    finally:
        dying.stop()


def test_http_streaming_and_a_server_going_away_mid_stream(digits_dir):
    server = HTTPServer(digits_dir)
    try:
        assert read_manifest(server.url)["splits"] == read_manifest(str(digits_dir))["splits"]
        x_http, y_http = collect(build_loader(cfg(server.url, num_workers=2), "test", 50, 0, 1))
    finally:
        server.stop()
    x_local, y_local = collect(build_loader(cfg(str(digits_dir), num_workers=2), "test", 50, 0, 1))
    assert torch.equal(x_http, x_local) and torch.equal(y_http, y_local)

    shard = read_manifest(str(digits_dir))["splits"]["test"]["shards"][0]
    server = HTTPServer(digits_dir, cut=(shard["name"], shard["bytes"] // 2))
    try:
        loader = build_loader(cfg(server.url), "test", 50, 0, 1)
        start = time.monotonic()
        gave_up = rf"giving up on {server.url}/{shard['name']} at byte \d+ of {shard['bytes']}"
        with pytest.raises(StorageError, match=gave_up):
            list(loader)
        assert time.monotonic() - start < 15
    finally:
        server.stop()


# ----------------------------------------------------------------------------------- bad input


def test_truncated_shards_fail_naming_the_shard_or_are_skipped_when_asked(digits_dir, tmp_path, capsys):
    data = copy_dataset(digits_dir, tmp_path / "cut")
    shard = data / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: int(shard.stat().st_size * 0.6)])
    start = time.monotonic()
    with pytest.raises(ShardError, match=r"shard \S+/cut/train-000002\.tar is truncated"):
        list(build_loader(cfg(str(data), num_workers=2), "train", 16, 0, 1))
    assert time.monotonic() - start < 30
    capsys.readouterr()
    assert avi_shards(["verify", str(data)]) == 1
    assert "train-000002.tar" in capsys.readouterr().out

    skipping = build_loader(cfg(str(data), skip_corrupt=True, num_workers=2), "train", 16, 0, 1)
    batches = list(skipping)
    assert len(batches) == skipping.num_batches and all(len(y) == 16 for _, y in batches)
    assert skipping.skipped > 0 and skipping.state_dict()["skipped"] == skipping.skipped

    # cut exactly at a member boundary: the missing end-of-archive block betrays it
    data2 = copy_dataset(digits_dir, tmp_path / "boundary")
    shard = data2 / "val-000000.tar"
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    shard.write_bytes(shard.read_bytes()[:members[-2].offset])  # header of the last sample's first member
    cut = (r"val-000000\.tar is truncated or corrupt: unexpected end of data at byte \d+ "
           r"\(no end-of-archive block\) \(in or after sample '\w+', number 179")
    with pytest.raises(ShardError, match=cut):
        list(build_loader(cfg(str(data2)), "val", 16, 0, 1))
    # a well-formed tar with a sample less: the manifest's count betrays it
    last_key = members[-1].name.split(".")[0]
    rewrite_shard(shard, lambda name, content: None if name.startswith(last_key + ".") else (name, content))
    with pytest.raises(ShardError, match=r"val-000000\.tar is truncated: it holds 179 samples, the manifest says 180"):
        list(build_loader(cfg(str(data2)), "val", 16, 0, 1))


def test_bad_members_and_shapes_name_shard_sample_and_member(digits_dir, tmp_path, capsys):
    data = copy_dataset(digits_dir, tmp_path / "bad")
    target = tar_members(data / "test-000000.tar")[10][0].split(".")[0]  # the sixth sample's key

    def break_png(name: str, content: bytes):
        return (name, b"this is not a png") if name == f"{target}.png" else (name, content)

    rewrite_shard(data / "test-000000.tar", break_png)
    with pytest.raises(ShardError, match=rf"test-000000\.tar, sample '{target}', member 'png': not a decodable image"):
        list(build_loader(cfg(str(data)), "test", 16, 0, 1))

    def wrong_shape(name: str, content: bytes):
        return (name, png_bytes(np.zeros((9, 8), np.uint8))) if name == f"{target}.png" else (name, content)

    rewrite_shard(data / "test-000000.tar", wrong_shape)
    with pytest.raises(ShardError, match=r"image is 9x8 \(HxW\), the manifest says 8x8"):
        list(build_loader(cfg(str(data)), "test", 16, 0, 1))

    def text_member(name: str, content: bytes):
        return (f"{target}.txt", b"hello") if name == f"{target}.png" else (name, content)

    rewrite_shard(data / "test-000000.tar", text_member)
    with pytest.raises(ShardError, match=rf"sample '{target}': no 'png' member \(it has: cls, txt\)"):
        list(build_loader(cfg(str(data), num_workers=1), "test", 16, 0, 1))
    capsys.readouterr()
    assert avi_shards(["verify", str(data), "--split", "test"]) == 1
    out = capsys.readouterr().out
    assert "unexpected member(s) txt" in out and "sha256" in out and "test-000000.tar" in out

    skipping = build_loader(cfg(str(data), skip_corrupt=True), "test", 16, 0, 1, train=False)
    assert len(collect(skipping)[1]) == 179 and skipping.skipped == 1


def test_missing_manifest_and_missing_shard(digits_dir, tmp_path, capsys):
    data = copy_dataset(digits_dir, tmp_path / "nomanifest")
    (data / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=rf"no manifest.json at {data}/manifest.json"):
        build_loader(cfg(str(data)), "train", 8, 0, 1)
    with pytest.raises(ManifestError, match="no manifest.json"):
        read_manifest(str(data / "train-{000000..000001}.tar"))
    assert avi_shards(["verify", str(data)]) == 1
    assert "no manifest.json" in capsys.readouterr().out

    data = copy_dataset(digits_dir, tmp_path / "noshard")
    (data / "val-000000.tar").unlink()
    with pytest.raises(NotFoundError, match=r"val-000000\.tar does not exist"):
        list(build_loader(cfg(str(data)), "val", 8, 0, 1))
    with pytest.raises(ManifestError, match="not listed"):
        build_loader(cfg(str(data / "train-{000000..000009}.tar")), "train", 8, 0, 1)


# ------------------------------------------------------------------------------------ converter


def test_interrupted_conversion_resumes_or_refuses_clearly(digits_npz, digits_dir, tmp_path, monkeypatch, capsys):
    from data_tools import writer

    out = tmp_path / "partial"
    args = ["numpy", "--train", str(digits_npz), "--name", "digits", "--shard-samples", "200", "--out", str(out)]
    real_put = writer.LocalStore.put_file
    calls = []

    def crash_on_third(self, name, path):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_put(self, name, path)

    monkeypatch.setattr(writer.LocalStore, "put_file", crash_on_third)
    assert convert(*args) == 130
    monkeypatch.setattr(writer.LocalStore, "put_file", real_put)
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["_progress.json", "train-000000.tar", "train-000001.tar"]  # no manifest, no partial shard
    capsys.readouterr()
    assert avi_shards(["verify", str(out)]) == 1

    assert convert(*args[:-2], "--seed", "3", "--out", str(out)) == 2
    assert "unfinished conversion made with different input or options" in capsys.readouterr().err
    before = (out / "train-000000.tar").stat().st_mtime_ns
    assert convert(*args) == 0
    assert (out / "train-000000.tar").stat().st_mtime_ns == before  # resumed, not rewritten
    assert read_manifest(str(out))["splits"] == read_manifest(str(digits_dir))["splits"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name.startswith("_")) == []

    capsys.readouterr()
    assert convert(*args) == 2
    assert "already holds a converted dataset" in capsys.readouterr().err
    assert convert(*args, "--overwrite") == 0


def test_cli_help_is_instant_and_imports_nothing_heavy():
    code = ("import sys, data_tools.cli as c\n"
            "heavy = [m for m in ('torch', 'webdataset', 'numpy', 'boto3') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    result = subprocess.run([sys.executable, "-m", "data_tools.cli", "--help"], capture_output=True, text=True,
                            timeout=60, env={**os.environ})
    assert result.returncode == 0
    for command in ("cifar10", "cifar100", "mnist", "omniglot", "folder", "numpy", "mnist5k", "verify"):
        assert command in result.stdout
