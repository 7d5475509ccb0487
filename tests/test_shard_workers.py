"""``avi-shards --workers N`` (several processes writing shards, one manifest) and the `wids` index beside
the manifest, read back with the real ``wids`` package.  No timing here: the speed-up is measured by
benchmarks/bench_shards.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers modules beside this file

from data_fixtures import AWS_ENV, make_bucket, read_split  # noqa: E402
from helpers import VENV_BIN, launch_env  # noqa: E402

from avi_scale.data import read_manifest
from data_tools.cli import main as avi_shards

pytestmark = pytest.mark.usefixtures("quiet_exit")

SPLITS = ("train", "val", "test")


def shards_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "avi-shards"), *argv, "--no-progress"], capture_output=True, text=True,
                          env=launch_env(), timeout=300)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> Path:
    """41 JPEGs of a few sizes in one flat folder."""
    from PIL import Image

    src = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(7)
    for i in range(41):
        h, w = [(40, 52), (48, 48), (60, 44)][i % 3]
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(src / f"im{i:03d}.jpg", quality=85)
    return src


@pytest.fixture(scope="module")
def converted(jpegs, tmp_path_factory) -> dict:
    """The folder converted with 1, 2 and 3 workers (5 samples per shard), by the installed command."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for workers in (1, 2, 3):
        proc = shards_cli("folder", "--src", str(jpegs), "--size", "16", "--shard-samples", "5", "--workers",
                          str(workers), "--out", str(root / f"w{workers}"))
        assert proc.returncode == 0, proc.stderr
        out[workers] = root / f"w{workers}"
    return out


def keys_in_order(location: Path) -> dict[str, list[str]]:
    return {split: [key for key, _, _ in read_split(str(location), split)] for split in SPLITS}


def test_workers_hold_the_same_samples_per_split_in_the_same_order(converted):
    one, two, three = (read_manifest(str(converted[w])) for w in (1, 2, 3))
    assert {k: v["count"] for k, v in one["splits"].items()} == {"train": 33, "val": 4, "test": 4}
    assert keys_in_order(converted[2]) == keys_in_order(converted[1])  # the split's order, cut into shards
    for split in SPLITS:
        names = [s["name"] for s in two["splits"][split]["shards"]]
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]  # no collision, no gap
        assert [s["count"] for s in two["splits"][split]["shards"]][:-1] == [5] * (len(names) - 1)
        # deterministic: 2 and 3 workers write byte-identical shards
        assert [s["sha256"] for s in two["splits"][split]["shards"]] == \
            [s["sha256"] for s in three["splits"][split]["shards"]]
        assert two["splits"][split]["mean"] == pytest.approx(one["splits"][split]["mean"], abs=1e-6)
    assert two["shard_limits"]["planned_samples_per_shard"] == {"train": 5, "val": 5, "test": 5}
    for w in (1, 2, 3):
        proc = subprocess.run([str(VENV_BIN / "avi-shards"), "verify", str(converted[w])], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout


def test_workers_cut_shards_by_size_from_the_measured_mean(jpegs, converted, tmp_path):
    out = tmp_path / "by_size"
    proc = shards_cli("folder", "--src", str(jpegs), "--size", "16", "--shard-mb", "0.01", "--workers", "2",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(str(out))
    per_shard = manifest["shard_limits"]["planned_samples_per_shard"]["train"]
    assert 1 < per_shard < 33
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]][0] == per_shard
    assert keys_in_order(out) == keys_in_order(converted[1])


def test_an_interrupted_parallel_conversion_resumes_to_the_same_shards(jpegs, converted, tmp_path, monkeypatch,
                                                                        capsys):
    from data_tools import writer
    from data_tools.sources import SourceError

    out = tmp_path / "resumed"
    common = ["folder", "--src", str(jpegs), "--size", "16", "--shard-samples", "5", "--no-progress", "--out", str(out)]
    real_write = writer._write_shard

    def failing_write(store, name, *rest):  # the forked workers inherit the patch
        if name == "train-000006.tar":  # the last training shard: most others are done by then
            raise SourceError(f"{name}: sample unreadable (injected)")
        return real_write(store, name, *rest)

    monkeypatch.setattr(writer, "_write_shard", failing_write)
    assert avi_shards([*common, "--workers", "2"]) == 2
    assert "train-000006.tar: sample unreadable (injected)" in capsys.readouterr().err
    journal = json.loads((out / "_progress.json").read_text())
    finished = [s["name"] for shards in journal["splits"].values() for s in shards]
    assert finished and "train-000006.tar" not in finished
    assert not (out / "manifest.json").exists() and not list(out.glob(".*.partial"))
    monkeypatch.setattr(writer, "_write_shard", real_write)

    assert avi_shards(common) == 2  # 1 worker cuts shards differently: refused, not mixed
    assert "--workers 1 and --workers N > 1 cut shards differently" in capsys.readouterr().err
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}
    assert avi_shards([*common, "--workers", "3"]) == 0  # any N > 1 resumes
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == mtimes  # kept, not rewritten
    assert read_manifest(str(out))["splits"] == read_manifest(str(converted[2]))["splits"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in converted[2].iterdir())


def test_bad_worker_counts_are_refused(jpegs, tmp_path, capsys):
    assert avi_shards(["folder", "--src", str(jpegs), "--workers", "0", "--out", str(tmp_path / "o"),
                       "--no-progress"]) == 2
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err


def test_wids_reads_every_sample_through_the_index(converted, tmp_path):
    import wids
    from PIL import Image

    for workers in (1, 2):
        location = converted[workers]
        manifest = read_manifest(str(location))
        assert manifest["wids"] == {split: f"{split}.wids.json" for split in SPLITS}
        for split in SPLITS:
            index = json.loads((location / f"{split}.wids.json").read_text())
            assert index["wids_version"] == 1
            assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == \
                [(s["name"], s["count"]) for s in manifest["splits"][split]["shards"]]
            dataset = wids.ShardListDataset(str(location / f"{split}.wids.json"), cache_dir=str(tmp_path / "cache"),
                                            transformations=[lambda sample: sample])
            truth = read_split(str(location), split)
            assert len(dataset) == manifest["splits"][split]["count"] == len(truth)
            for i, (key, image, label) in enumerate(truth):
                sample = dataset[i]
                assert sample["__key__"] == key
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample[".png"].read()))), image)
                assert int(sample[".cls"].read()) == label
            dataset.close()


def test_verify_checks_the_wids_index(converted, tmp_path):
    import shutil

    location = tmp_path / "copy"
    shutil.copytree(converted[2], location)
    index = json.loads((location / "val.wids.json").read_text())
    index["shardlist"][0]["nsamples"] += 1
    (location / "val.wids.json").write_text(json.dumps(index))
    proc = subprocess.run([str(VENV_BIN / "avi-shards"), "verify", str(location)], capture_output=True, text=True)
    assert proc.returncode == 1 and "val.wids.json: its shardlist" in proc.stdout
    (location / "test.wids.json").unlink()
    proc = subprocess.run([str(VENV_BIN / "avi-shards"), "verify", str(location), "--split", "test"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "wids index of split 'test'" in proc.stdout


def test_workers_upload_to_s3_each_with_its_own_client(s3_endpoint, aws_env, jpegs, converted):
    """The converter in its own process (its forked workers never share a process with the S3 server)."""
    make_bucket(s3_endpoint, "avi-workers")
    url = "s3://avi-workers/sets/jpegs"
    proc = subprocess.run([str(VENV_BIN / "avi-shards"), "folder", "--src", str(jpegs), "--size", "16",
                           "--shard-samples", "5", "--workers", "2", "--out", url, "--endpoint-url", s3_endpoint,
                           "--no-progress"], capture_output=True, text=True, env=launch_env(**AWS_ENV), timeout=300)
    assert proc.returncode == 0, proc.stderr
    from avi_scale.data import openers

    openers.configure(endpoint_url=s3_endpoint)
    try:
        assert read_manifest(url)["splits"] == read_manifest(str(converted[2]))["splits"]  # the same bytes
        with openers.open_url(url + "/train.wids.json") as stream:
            assert json.loads(stream.read()) == json.loads((converted[2] / "train.wids.json").read_text())
    finally:
        openers.configure(endpoint_url=None)
    assert avi_shards(["verify", url, "--endpoint-url", s3_endpoint]) == 0
    assert "testing-secret-never-logged" not in proc.stdout + proc.stderr

