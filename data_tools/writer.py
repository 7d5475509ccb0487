"""Split a :class:`~data_tools.sources.Source` and write it as tar shards + ``manifest.json``.

Order and splits are fixed by ``--seed``: each official split is permuted; "test" (when the source has
none) and then "val" are carved off the start of the permuted training set.  Samples are encoded as
``<origin>_<index>.png`` (lossless) and ``<origin>_<index>.cls`` where ``origin``/``index`` locate the
image in the source.  A shard closes when it reaches ``--shard-samples`` samples or ``--shard-mb`` MB.

Parallel conversion (``--workers N``, N > 1): the shards are cut up front, each split's permuted order
into consecutive runs of ``K`` samples (``--shard-samples``, or fewer: the count that ``--shard-mb``
allows at the mean encoded size of the split's first :data:`SIZE_PROBE` samples, so close to the limit
but not a hard cap), shard ``i`` holding samples ``i*K .. i*K+K-1`` under its final name
``<split>-<i>.tar``.  N forked worker processes take whole shards, each encoding, writing, hashing and
storing its own (its own S3 client); the main process keeps the journal and writes the one manifest.
So every split holds exactly the samples of a 1-worker run, in the same order when its shards are read
in name order; names are fixed before any worker starts, so they cannot collide, and the shards are
byte-identical for every N > 1 (1 worker closes shards by their real size instead, so its boundaries
may differ).

Crash safety: each shard is written to a temporary file and appears under its final name only when
complete (an atomic rename on disk; a single upload on S3).  After every shard, a journal
(``_progress.json``) records the finished shards; ``manifest.json`` is written last and the journal
removed.  Re-running the same command resumes after the last finished shard (with workers: skips every
finished shard); a different command on an unfinished output, or any command on a finished one, is
refused unless ``--overwrite`` (1 worker and N > 1 cut shards differently, so they count as different;
any N > 1 resumes any other).

Beside ``manifest.json`` go one ``<split>.wids.json`` per split: a `wids` dataset description
(``{"wids_version": 1, "shardlist": [{"url": "train-000000.tar", "nsamples": 1000, "filesize": ...}]}``,
URLs relative to the file), so ``wids.ShardListDataset("data/x/train.wids.json")`` reads the shards
with random access.  They are written just before the manifest, which stays the mark of completion.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator, Optional

import numpy as np

from avi_scale.data.manifest import FORMAT, MANIFEST_NAME, SPLITS, VERSION, check_manifest
from data_tools.sources import Source, SourceError
from data_tools.stores import ConvertError, LocalStore, S3Store, open_store

JOURNAL = "_progress.json"
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")
WIDS_SUFFIX = ".wids.json"
WIDS_NAME = re.compile(r"^(train|val|test)\.wids\.json$")
SIZE_PROBE = 64  # samples whose encoded size sets the shard length of a parallel conversion
_TAR_MTIME = 946684800  # fixed member times make shards byte-identical across runs


@dataclass
class WriteOptions:
    out: str
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: Optional[float] = None  # None: 0.1 when the source has no official test split
    shard_mb: float = 64.0
    shard_samples: Optional[int] = None
    endpoint_url: Optional[str] = None
    overwrite: bool = False
    progress: bool = True
    command: str = ""
    workers: int = 1  # > 1: shards cut up front and written by this many forked processes


# -------------------------------------------------------------------------------------------- stores


def carved_test_fraction(test_fraction: Optional[float]) -> float:
    """The share carved off for "test" from a source without an official test split (default 0.1)."""
    return 0.1 if test_fraction is None else test_fraction


def plan_splits(source: Source, val_fraction: float, test_fraction: Optional[float], seed: int) -> dict:
    """split -> (origin split name, image set, index order); empty splits are left out."""
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if value is not None and not 0.0 <= value < 1.0:
            raise ConvertError(f"{name} must be in [0, 1), got {value}")
    if test_fraction is not None and "test" in source.splits:
        raise ConvertError(f"{source.name} has an official test split: --test-fraction does not apply")
    if val_fraction and "val" in source.splits:
        raise ConvertError(f"{source.name} has an official validation split: use --val-fraction 0")
    rng = np.random.default_rng(seed)
    train = source.splits["train"]
    order = rng.permutation(len(train))
    plan = {}
    carve = [("test", carved_test_fraction(test_fraction))] if "test" not in source.splits else []
    carve.append(("val", val_fraction))
    for split, fraction in carve:
        n = int(round(fraction * len(train)))
        if n:
            plan[split] = ("train", train, order[:n])
            order = order[n:]
    if len(order) == 0:
        raise ConvertError("--val-fraction and --test-fraction leave no training samples")
    plan["train"] = ("train", train, order)
    for split in ("val", "test"):
        if split in source.splits and len(source.splits[split]):
            plan[split] = (split, source.splits[split], rng.permutation(len(source.splits[split])))
    return {split: plan[split] for split in SPLITS if split in plan}


# --------------------------------------------------------------------------------------------- write


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _fingerprint(source: Source, plan: dict, opts: WriteOptions) -> str:
    described = {"source": source.info, "name": source.name, "shape": source.shape, "seed": opts.seed,
                 "val_fraction": opts.val_fraction, "test_fraction": opts.test_fraction,
                 "shard_mb": opts.shard_mb, "shard_samples": opts.shard_samples,
                 "splits": {k: len(v[2]) for k, v in plan.items()}}
    if opts.workers > 1:  # shards cut up front (any N > 1 alike); absent for 1 worker, as before
        described["layout"] = "planned"
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _start_or_resume(store: LocalStore | S3Store, fingerprint: str, overwrite: bool) -> dict:
    """The journal to continue from (empty for a fresh start), after checking the output's state."""
    fresh = {"fingerprint": fingerprint, "splits": {}}
    if overwrite:
        for name in store.names():
            if SHARD_NAME.match(name) or WIDS_NAME.match(name) or name in (MANIFEST_NAME, JOURNAL):
                store.delete(name)
        store.clean_temporaries()
        return fresh
    if store.size(MANIFEST_NAME) is not None:
        raise ConvertError(f"{store.location} already holds a converted dataset ({MANIFEST_NAME}); "
                           f"pass --overwrite to replace it, or choose another --out")
    store.clean_temporaries()
    raw = store.get_bytes(JOURNAL)
    if raw is None:
        stale = [n for n in store.names() if SHARD_NAME.match(n)]
        if stale:
            raise ConvertError(f"{store.location} holds shards ({stale[0]}, ...) but no {MANIFEST_NAME} or {JOURNAL}; "
                               f"pass --overwrite to replace them")
        return fresh
    journal = json.loads(raw)
    if journal.get("fingerprint") != fingerprint:
        raise ConvertError(f"{store.location} holds an unfinished conversion made with different input or "
                           f"options ({JOURNAL}; --workers 1 and --workers N > 1 cut shards differently); re-run "
                           f"that command to finish it, or pass --overwrite")
    for split, shards in journal["splits"].items():
        for shard in shards:
            if store.size(shard["name"]) != shard["bytes"]:
                raise ConvertError(f"{store.location}/{shard['name']} is recorded as finished in {JOURNAL} but is "
                                   f"missing or has another size; pass --overwrite to start again")
    return journal


def _write_shard(store: LocalStore | S3Store, name: str, origin: str, images: Any, indices: np.ndarray,
                 limit: int, max_bytes: float, progress: Any) -> dict:
    """Write samples ``indices`` to shard ``name``, at most ``limit`` of them and until ``max_bytes`` are
    reached; returns its journal record."""
    import webdataset as wds

    channels = images.shape[2]
    sums, squares = np.zeros(channels), np.zeros(channels)
    temp = store.temp_path(name)
    count, size = 0, 0
    with open(temp, "wb") as stream:
        with wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME) as tar:
            while count < min(limit, len(indices)) and size < max_bytes:
                index = int(indices[count])
                image = images.image(index)
                if image.shape != images.shape:
                    raise SourceError(f"{origin} sample {index}: shape {image.shape}, expected {images.shape}")
                png = encode_png(image)
                label = str(int(images.labels[index])).encode()
                tar.write({"__key__": f"{origin}_{index:08d}", "png": png, "cls": label})
                size += len(png) + len(label) + 2048  # two members: headers and padding
                pixels = image.reshape(-1, channels).astype(np.float64) / 255.0
                sums += pixels.sum(axis=0)
                squares += (pixels * pixels).sum(axis=0)
                count += 1
                progress.update(1)
        stream.flush()
        os.fsync(stream.fileno())
    digest = hashlib.sha256()
    with open(temp, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    record = {"name": name, "count": count, "bytes": temp.stat().st_size, "sha256": digest.hexdigest(),
              "sum": sums.tolist(), "sumsq": squares.tolist()}
    store.put_file(name, temp)
    return record


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _statistics(shards: list[dict], shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    n = sum(s["count"] for s in shards) * shape[0] * shape[1]
    sums = np.sum([s["sum"] for s in shards], axis=0)
    squares = np.sum([s["sumsq"] for s in shards], axis=0)
    mean = sums / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _pattern(split: str, count: int) -> str:
    return f"{split}-000000.tar" if count == 1 else f"{split}-{{000000..{count - 1:06d}}}.tar"


def wids_index(name: str, split: str, shards: list[dict]) -> dict:
    """The `wids` dataset description of one split: shard URLs relative to the index file beside them."""
    return {"wids_version": 1, "name": f"{name}-{split}",
            "shardlist": [{"url": s["name"], "nsamples": s["count"], "filesize": s["bytes"]} for s in shards]}


# ------------------------------------------------------------------------------------ parallel writing


def planned_shard_samples(images: Any, order: np.ndarray, opts: WriteOptions) -> int:
    """Samples per shard of a parallel conversion: ``--shard-samples``, or fewer when ``--shard-mb`` is
    reached sooner at the mean encoded size of the first :data:`SIZE_PROBE` samples of ``order`` (the
    size a 1-worker shard counts: PNG + label + 2048 bytes of tar headers and padding)."""
    probe = [int(i) for i in order[:SIZE_PROBE]]
    sizes = [len(encode_png(images.image(i))) + len(str(int(images.labels[i]))) + 2048 for i in probe]
    by_size = max(1, math.ceil(opts.shard_mb * 1e6 / (sum(sizes) / len(sizes))))
    return min(by_size, opts.shard_samples) if opts.shard_samples else by_size


# what forked workers inherit (set just before the pool starts, cleared after): no pickling of the source
_SHARED: dict = {}


def _worker_start() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    opts: WriteOptions = _SHARED["opts"]
    # its own store (an S3 store: its own client, staging under the main process's staging dir, removed by
    # it); never closed here: a local store's close() would sweep up the other workers' unfinished shards
    _SHARED["store"] = open_store(opts.out, opts.endpoint_url, _SHARED["staging"])


def _worker_shard(task: tuple[str, str, int, int]) -> tuple[str, dict]:
    """Write one planned shard: ``(split, name, start, stop)`` of the split's order."""
    split, name, start, stop = task
    origin, images, order = _SHARED["plan"][split]
    record = _write_shard(_SHARED["store"], name, origin, images, order[start:stop], stop - start, math.inf, _NoBar())
    return split, record


def _parallel_tasks(plan: dict, journal: dict, opts: WriteOptions) -> list[tuple[str, str, int, int]]:
    """The shards still to write, ``(split, name, start, stop)``, cutting each split into runs of the
    journal's samples per shard (measured and recorded on the first run)."""
    per_shard = journal.setdefault("samples_per_shard", {})
    tasks = []
    for split, (_, images, order) in plan.items():
        if split not in per_shard:
            per_shard[split] = planned_shard_samples(images, order, opts)
        k = per_shard[split]
        finished = {s["name"] for s in journal["splits"].setdefault(split, [])}
        for i, start in enumerate(range(0, len(order), k)):
            name = f"{split}-{i:06d}.tar"
            if name not in finished:
                tasks.append((split, name, start, min(start + k, len(order))))
    return tasks


@contextlib.contextmanager
def _worker_pool(plan: dict, opts: WriteOptions, num_tasks: int) -> Iterator[Any]:
    """``opts.workers`` forked processes (no more than there are shards to write) that inherit ``plan``."""
    if "fork" not in multiprocessing.get_all_start_methods():
        raise ConvertError("--workers > 1 needs the 'fork' start method (Linux, macOS); use --workers 1")
    staging = tempfile.mkdtemp(prefix="avi-shards-workers-")
    _SHARED.update(plan=plan, opts=opts, staging=staging)
    try:
        with multiprocessing.get_context("fork").Pool(min(opts.workers, num_tasks), initializer=_worker_start) as pool:
            yield pool  # leaving the block terminates the workers (after an error: mid-shard)
    finally:
        _SHARED.clear()
        shutil.rmtree(staging, ignore_errors=True)


def _write_parallel(store: LocalStore | S3Store, pool: Any, tasks: list, journal: dict, progress: Any) -> None:
    for split, record in pool.imap_unordered(_worker_shard, tasks):
        journal["splits"][split].append(record)
        store.put_bytes(JOURNAL, json.dumps(journal).encode())
        progress.update(record["count"])
    for shards in journal["splits"].values():
        shards.sort(key=lambda s: s["name"])


def _write_sequential(store: LocalStore | S3Store, plan: dict, journal: dict, opts: WriteOptions,
                      progress: Any) -> None:
    for split, (origin, images, order) in plan.items():
        shards = journal["splits"].setdefault(split, [])
        position = sum(s["count"] for s in shards)
        while position < len(order):
            record = _write_shard(store, f"{split}-{len(shards):06d}.tar", origin, images, order[position:],
                                  opts.shard_samples or len(order), opts.shard_mb * 1e6, progress)
            shards.append(record)
            position += record["count"]
            store.put_bytes(JOURNAL, json.dumps(journal).encode())


def _manifest(source: Source, plan: dict, journal: dict, opts: WriteOptions) -> dict:
    """The manifest of a finished conversion: counts, shards with sha256, statistics, how it was made."""
    splits = {}
    for split, shards in journal["splits"].items():
        mean, std = _statistics(shards, source.shape)
        splits[split] = {"count": sum(s["count"] for s in shards), "pattern": _pattern(split, len(shards)),
                         "shards": [{k: s[k] for k in ("name", "count", "bytes", "sha256")} for s in shards],
                         "mean": mean, "std": std}
    labels = np.concatenate([np.asarray(p[1].labels)[p[2]] for p in plan.values()])
    labelled = bool(labels.size) and int(labels.min()) >= 0
    manifest = {
        "format": FORMAT, "version": VERSION, "name": source.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": opts.command,
        "source": source.info,
        "image": {"shape": list(source.shape), "dtype": "uint8", "encoding": "png"},
        "keys": {"image": "png", "label": "cls"},
        "num_classes": (len(source.class_names or []) or int(labels.max()) + 1) if labelled else 0,
        "class_names": source.class_names if labelled else None,
        "seed": opts.seed, "val_fraction": opts.val_fraction,
        "test_fraction": None if "test" in source.splits else carved_test_fraction(opts.test_fraction),
        "shard_limits": {"max_mb": opts.shard_mb, "max_samples": opts.shard_samples},
        "splits": {k: splits[k] for k in SPLITS if k in splits},
        "wids": {k: f"{k}{WIDS_SUFFIX}" for k in SPLITS if k in splits},
    }
    if "samples_per_shard" in journal:  # a parallel conversion: shards cut up front
        manifest["shard_limits"]["planned_samples_per_shard"] = journal["samples_per_shard"]
    return manifest


def convert(source: Source, opts: WriteOptions) -> dict:
    """Write ``source`` to ``opts.out`` (directory or s3://bucket/prefix); returns the manifest."""
    from tqdm import tqdm

    if opts.shard_mb <= 0 or (opts.shard_samples is not None and opts.shard_samples < 1):
        raise ConvertError("--shard-mb must be > 0 and --shard-samples >= 1")
    if opts.workers < 1:
        raise ConvertError(f"--workers must be >= 1, got {opts.workers}")
    plan = plan_splits(source, opts.val_fraction, opts.test_fraction, opts.seed)
    store = open_store(opts.out, opts.endpoint_url)
    try:
        journal = _start_or_resume(store, _fingerprint(source, plan, opts), opts.overwrite)
        done = sum(s["count"] for shards in journal["splits"].values() for s in shards)
        total = sum(len(p[2]) for p in plan.values())
        tasks: list = []
        pool = None
        with contextlib.ExitStack() as stack:
            if opts.workers > 1:  # the workers fork before the progress bar starts its thread
                tasks = _parallel_tasks(plan, journal, opts)
                store.put_bytes(JOURNAL, json.dumps(journal).encode())  # the shard length, before any shard
                pool = stack.enter_context(_worker_pool(plan, opts, len(tasks))) if tasks else None
            bar = tqdm(total=total, initial=done, unit="img", unit_scale=True,
                       desc=f"{source.name} -> {store.location}") \
                if opts.progress else contextlib.nullcontext(_NoBar())  # a disabled tqdm still starts a monitor thread
            progress = stack.enter_context(bar)
            if opts.workers == 1:
                _write_sequential(store, plan, journal, opts, progress)
            elif pool is not None:
                _write_parallel(store, pool, tasks, journal, progress)
        manifest = _manifest(source, plan, journal, opts)
        check_manifest(manifest, f"{store.location}/{MANIFEST_NAME}")
        for split, entry in manifest["splits"].items():
            index = wids_index(source.name, split, entry["shards"])
            store.put_bytes(manifest["wids"][split], json.dumps(index, indent=2).encode())
        store.put_bytes(MANIFEST_NAME, json.dumps(manifest, indent=2).encode())
        store.delete(JOURNAL)
        return manifest
    finally:
        store.close()
