"""Shard loaders for one rank: exact or resampled training epochs, and exact-once evaluation passes.

How a training epoch is cut up (``mode="exact"``)
    The manifest gives every shard's sample count, so the whole epoch is planned up front and every
    process derives the same plan from (seed, epoch).  The shard order is permuted per epoch; the
    concatenated samples form one global sequence of ``N`` samples.  Each rank gets ``num_batches =
    N // (world_size * batch_size)`` full batches: rank ``r`` takes the contiguous slice
    ``[r * num_batches * B, (r + 1) * num_batches * B)``; the last ``N mod (world_size * B)`` samples of
    the sequence (different ones each epoch) wait for a later epoch.  Inside a rank, the DataLoader's
    ``K`` workers each own a contiguous part of that slice ("logical worker" ``k`` owns its batches
    ``k, k + K, k + 2K, ...``, which is the order in which the DataLoader hands batches out), read it
    shard by shard, shuffle it through a seeded buffer of ``shuffle_buffer`` samples and decode.  No
    sample is read by two workers or two ranks, so the epoch visits each sample at most once, and every
    rank yields exactly ``num_batches`` batches (no collective can hang on uneven shards).
    (``webdataset.WebDataset`` with ``split_by_node``/``split_by_worker`` splits whole shards, which gives
    ranks unequal sample counts whenever shard sizes differ; hence the sample-level plan.  webdataset
    still does the I/O: ``gopen`` with the s3/http openers of :mod:`avi_scale.data.openers`, and
    ``TarWriter`` in ``avi-shards``.)

Resampled streams (``mode="resampled"``)
    Each logical worker of each rank draws shards at random with replacement (weighted by their sample
    counts) from its own seeded stream, forever; an epoch is ``num_batches`` batches per rank
    (``data.epoch_batches``, or ``N // (world_size * B)``).  Samples may repeat within an epoch and across
    ranks; use it for datasets too large to care about exact epochs or when shards are added/removed.

Position and resume
    A batch's index within the epoch is ``t = 0 .. num_batches - 1`` in the order the loader yields them.
    ``state_dict()`` records ``(epoch, batch)`` plus, per logical worker, how many raw samples it has
    consumed.  ``load_state_dict`` on a fresh loader continues with batch ``t = batch``: the workers
    rotate so the DataLoader's round robin starts at the right logical worker, and each skips the raw
    samples it had already delivered (cheap: no decoding).  The sequence of batches, including the
    dynamic binarisation and flips (seeded by ``(seed, epoch, rank, t)``), is identical to an
    uninterrupted run.  It needs the same seed, world size, batch size, number of workers and mode;
    ``load_state_dict`` refuses otherwise.

Evaluation
    :class:`EvalLoader` reads the shards in manifest order once: rank ``r`` gets samples
    ``[r * N // world_size, (r + 1) * N // world_size)`` (counts differ by at most one), in batches of
    ``batch_size`` with a smaller last one.  Ranks may thus run one batch more or less: accumulate the
    per-sample sums and counts locally, then ``all_reduce(SUM)`` once after the loop (no per-batch
    collectives).  Binarisation there is seeded per sample by ``(seed, global sample index)``, so a
    test NLL does not depend on world size, batch size or workers.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avi_scale.data import openers
from avi_scale.data.errors import DataError, ShardError
from avi_scale.data.manifest import SplitShards, is_shard_pattern, resolve_split
from avi_scale.data.openers import open_url
from avi_scale.data.shards import decode_sample, iter_tar_samples

log = logging.getLogger("avi_scale.data")

MODES = ("exact", "resampled")
_TAG_SHARDS, _TAG_SHUFFLE, _TAG_RESAMPLE, _TAG_AUGMENT, _TAG_EVAL = 11, 12, 13, 14, 15


def _seed(*parts: int) -> int:
    """A 64-bit seed mixed from non-negative integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches of each logical worker when batch ``t`` belongs to worker ``t % num_workers``."""
    return [len(range(k, num_batches, num_workers)) for k in range(num_workers)]


def _segments(order: list[int], counts: tuple[int, ...], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """``(shard index, first sample, end sample)`` pieces of positions ``[lo, hi)`` of the sequence that
    concatenates the shards in ``order``."""
    pieces, offset = [], 0
    for index in order:
        start, stop = max(lo, offset), min(hi, offset + counts[index])
        if start < stop:
            pieces.append((index, start - offset, stop - offset))
        offset += counts[index]
        if offset >= hi:
            break
    return pieces


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer of ``size`` items (pass-through for size <= 1)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to produce its batches of one epoch (pickled into DataLoader workers)."""

    shards: SplitShards
    train: bool
    mode: str
    seed: int
    epoch: int
    rank: int
    world_size: int
    batch_size: int
    num_batches: int  # of this rank
    num_workers: int  # logical workers, >= 1
    start_batch: int
    positions: tuple[int, ...]  # raw samples consumed per logical worker at start_batch
    shuffle_buffer: int
    binarize: bool
    random_flips: bool
    skip_corrupt: bool
    io: openers.IOSettings


def _to_float(plan: _Plan, images: np.ndarray, t: int, sample_indices: Optional[np.ndarray]) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1], flipped/binarised with seeded generators.

    numpy, single-threaded, in the worker: no intra-op thread pool to contend with the training process.
    """
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    if plan.train:
        rng = np.random.default_rng([plan.seed, plan.epoch, plan.rank, t, _TAG_AUGMENT])
        if plan.random_flips:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip, :, :, ::-1]
        if plan.binarize:
            x = (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
    elif plan.binarize:
        for i, index in enumerate(sample_indices if sample_indices is not None else []):
            rng = np.random.default_rng([plan.seed, int(index), _TAG_EVAL])
            x[i] = rng.random(x[i].shape, dtype=np.float32) < x[i]
    return x


def _as_is(item: Any) -> Any:
    """DataLoader ``collate_fn``: keep the worker's numpy arrays (sent by value through the pipe)."""
    return item


class _Skips:
    """Counts skipped samples (skip_corrupt) and logs each one."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int, why: str) -> None:
        self.count += n
        log.warning("skipping %d sample(s): %s", n, why)


class _EpochStream(IterableDataset):
    """Yields ``(x float32 [B, C, H, W], y int64 [B], t, position, skipped)`` numpy arrays for the batches
    of one rank's epoch owned by this worker.

    Workers send numpy arrays, pickled through the DataLoader's pipe, rather than tensors: no shared-memory
    file descriptors to pass (that hand-over hung on these machines, and fails in containers with a small
    /dev/shm); the main process only wraps them with ``torch.from_numpy``."""

    def __init__(self, plan: _Plan):
        super().__init__()
        self.plan = plan

    # -- raw samples ------------------------------------------------------------------------------
    def _read_piece(self, index: int, start: int, stop: int, skips: Optional[_Skips]) -> Iterator:
        """Raw ``(url, key, members, shard index, position in shard)`` of samples ``[start, stop)``."""
        shards = self.plan.shards
        url, count = shards.urls[index], shards.counts[index]
        n = 0
        try:
            with open_url(url) as stream:
                for key, members in iter_tar_samples(url, stream, count if stop == count else None):
                    if start <= n < stop:
                        yield url, key, members, index, n
                    n += 1
                    if n == stop and stop < count:
                        break
            if n < stop:
                raise ShardError(f"shard {url} is truncated: it ended after {n} samples, the manifest says {count}")
        except ShardError as exc:
            if skips is None:
                raise
            lost = max(0, stop - max(n, start))
            skips.add(lost, f"{exc} (lost the rest of the shard: {lost} sample(s))")

    def _exact_pass(self, k: int, skips: Optional[_Skips]) -> Iterator:
        p = self.plan
        counts = worker_batch_counts(p.num_batches, p.num_workers)
        order = list(range(len(p.shards.counts)))
        np.random.default_rng(_seed(p.seed, p.epoch, _TAG_SHARDS)).shuffle(order)
        lo = (p.rank * p.num_batches + sum(counts[:k])) * p.batch_size
        pieces = _segments(order, p.shards.counts, lo, lo + counts[k] * p.batch_size)
        raw = itertools.chain.from_iterable(self._read_piece(i, a, b, skips) for i, a, b in pieces)
        return _shuffled(raw, p.shuffle_buffer, random.Random(_seed(p.seed, p.epoch, p.rank, k, _TAG_SHUFFLE)))

    def _raw_train(self, k: int, skips: Optional[_Skips]) -> Iterator:
        p = self.plan
        if p.mode == "resampled":
            rng = random.Random(_seed(p.seed, p.epoch, p.rank, k, _TAG_RESAMPLE))
            indices = range(len(p.shards.counts))

            def draws() -> Iterator:
                while True:
                    i = rng.choices(indices, weights=p.shards.counts)[0]
                    yield from self._read_piece(i, 0, p.shards.counts[i], skips)

            return _shuffled(draws(), p.shuffle_buffer, random.Random(_seed(p.seed, p.epoch, p.rank, k, _TAG_SHUFFLE)))
        if skips is None:
            return self._exact_pass(k, None)
        return self._repeated_passes(k, skips)

    def _repeated_passes(self, k: int, skips: _Skips) -> Iterator:
        """With skip_corrupt, a worker that lost samples tops its part up by reading it again from the
        start, so every rank still yields ``num_batches`` full batches."""
        for repeat in itertools.count():
            got = 0
            for item in self._exact_pass(k, skips):
                got += 1
                yield item
            if got == 0:
                raise ShardError(f"no readable sample in worker {k}'s part of rank {self.plan.rank}'s shards "
                                 f"of {self.plan.shards.manifest_url}")
            if repeat == 0:
                log.warning("worker %d of rank %d repeats samples of its part to make up for skipped ones", k,
                            self.plan.rank)

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        p = self.plan
        openers.configure(**vars(p.io))
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != p.num_workers:
            raise DataError(f"internal: planned for {p.num_workers} workers, DataLoader runs {workers}")
        return self._train_batches(slot) if p.train else self._eval_batches(slot)

    def _train_batches(self, slot: int) -> Iterator:
        p = self.plan
        k = (p.start_batch + slot) % p.num_workers  # rotate so the round robin resumes at batch start_batch
        first = (p.start_batch + slot) // p.num_workers
        mine = worker_batch_counts(p.num_batches, p.num_workers)[k]
        if first >= mine:
            return
        skips = _Skips() if p.skip_corrupt else None
        raw = self._raw_train(k, skips)
        position = p.positions[k]
        if position:
            next(itertools.islice(raw, position - 1, position), None)
        h, w, c = p.shards.image_shape
        reported, bad_run, piece_len = 0, 0, max(1, mine * p.batch_size)
        for j in range(first, mine):
            images = np.empty((p.batch_size, h, w, c), dtype=np.uint8)  # fresh: the queue pickles it later
            labels = np.empty(p.batch_size, dtype=np.int64)
            filled = 0
            while filled < p.batch_size:
                item = next(raw, None)
                if item is None:
                    raise DataError(f"internal: worker {k} of rank {p.rank} ran out of samples at batch {j}")
                url, key, members, _, _ = item
                position += 1
                try:
                    images[filled], labels[filled] = decode_sample(url, key, members, p.shards.image_shape)
                except ShardError as exc:
                    if skips is None:
                        raise
                    skips.add(1, str(exc))
                    bad_run += 1
                    if bad_run > piece_len:
                        raise ShardError(f"no decodable sample in a whole pass over this worker's part of "
                                         f"{p.shards.manifest_url} (last: {exc})") from None
                    continue
                bad_run = 0
                filled += 1
            t = k + p.num_workers * j
            skipped = skips.count - reported if skips is not None else 0
            reported += skipped
            yield _to_float(p, images, t, None), labels, t, position, skipped

    def _eval_batches(self, slot: int) -> Iterator:
        p = self.plan
        total = p.shards.num_samples
        lo, hi = p.rank * total // p.world_size, (p.rank + 1) * total // p.world_size
        counts = worker_batch_counts(p.num_batches, p.num_workers)
        start = lo + sum(counts[:slot]) * p.batch_size
        stop = min(hi, start + counts[slot] * p.batch_size)
        if start >= stop:
            return
        skips = _Skips() if p.skip_corrupt else None
        offsets = np.concatenate([[0], np.cumsum(p.shards.counts)])
        order = list(range(len(p.shards.counts)))
        raw = itertools.chain.from_iterable(self._read_piece(i, a, b, skips) for i, a, b in
                                            _segments(order, p.shards.counts, start, stop))
        h, w, c = p.shards.image_shape
        reported = 0
        while True:
            images, labels, indices = [], [], []
            for url, key, members, shard, n in raw:
                try:
                    image, label = decode_sample(url, key, members, p.shards.image_shape)
                except ShardError as exc:
                    if skips is None:
                        raise
                    skips.add(1, str(exc))
                    continue
                images.append(image)
                labels.append(label)
                indices.append(int(offsets[shard]) + n)
                if len(images) == p.batch_size:
                    break
            skipped = skips.count - reported if skips is not None else 0
            reported += skipped
            if not images:
                if skipped:  # an empty batch only reports skips at the very end; the loader drops it
                    yield np.empty((0, c, h, w), np.float32), np.empty(0, np.int64), -1, 0, skipped
                return
            batch = _to_float(p, np.stack(images).reshape(len(images), h, w, c), -1, np.asarray(indices))
            yield batch, np.asarray(labels, dtype=np.int64), -1, 0, skipped


class _Loader:
    """Common plumbing: the plan, the DataLoader around :class:`_EpochStream`, error translation."""

    train: bool

    def __init__(self, shards: SplitShards, data_cfg: Any, split: str, batch_size: int, rank: int,
                 world_size: int, pin_memory: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if data_cfg.mode not in MODES:
            raise ValueError(f"data.mode {data_cfg.mode!r} is not one of {MODES}")
        self.shards = shards
        self.cfg = data_cfg
        self.split = split
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.workers = max(1, data_cfg.num_workers)  # logical workers (0 DataLoader workers = 1 in-process)
        self.skipped = 0  # samples skipped so far (data.skip_corrupt)

    @property
    def manifest(self) -> dict:
        return self.shards.manifest

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the images, from the manifest."""
        return self.shards.image_shape

    def __len__(self) -> int:
        return self.num_batches  # type: ignore[attr-defined]

    def _plan(self, epoch: int, start_batch: int, positions: tuple[int, ...]) -> _Plan:
        cfg = self.cfg
        return _Plan(shards=self.shards, train=self.train, mode=cfg.mode, seed=cfg.seed, epoch=epoch,
                     rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                     num_batches=self.num_batches, num_workers=self.workers,  # type: ignore[attr-defined]
                     start_batch=start_batch, positions=positions,
                     shuffle_buffer=cfg.shuffle_buffer if self.train else 0,
                     binarize=cfg.binarize, random_flips=cfg.random_flips and self.train,
                     skip_corrupt=cfg.skip_corrupt, io=openers.settings())

    def _batches(self, plan: _Plan) -> Iterator:
        loader = DataLoader(_EpochStream(plan), batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
                            timeout=self.cfg.batch_timeout_s if self.cfg.num_workers > 0 else 0)
        batches = iter(loader)
        try:
            for x, y, t, position, skipped in batches:
                self.skipped += skipped
                if not len(y):
                    continue
                x, y = torch.from_numpy(x), torch.from_numpy(y)
                if self.pin_memory:
                    x, y = x.pin_memory(), y.pin_memory()
                yield x, y, t, position
        except RuntimeError as exc:
            if isinstance(exc, DataError) or "timed out" not in str(exc):
                raise
            raise DataError(f"no batch from a loader worker within data.batch_timeout_s="
                            f"{self.cfg.batch_timeout_s}s (split {self.split!r}, rank {self.rank}, shards "
                            f"of {self.shards.manifest_url})") from None
        finally:
            # stop the workers now: an exception's traceback keeps the iterator alive until the cyclic GC runs
            shutdown = getattr(batches, "_shutdown_workers", None)  # multi-process iterators only
            if shutdown is not None:
                shutdown()


class TrainLoader(_Loader):
    """One rank's training batches; ``iter()`` runs (the rest of) the current epoch, then advances it.

    Attributes: ``num_batches`` (per epoch, this rank; equal on every rank), ``epoch``, ``batch`` (batches
    of the epoch consumed so far), ``skipped``.
    """

    train = True

    def __init__(self, shards: SplitShards, data_cfg: Any, split: str, batch_size: int, rank: int,
                 world_size: int, *, epoch: int = 0, start_batch: int = 0, pin_memory: bool = False):
        super().__init__(shards, data_cfg, split, batch_size, rank, world_size, pin_memory)
        total, per_step = shards.num_samples, world_size * batch_size
        if data_cfg.mode == "resampled" and data_cfg.epoch_batches > 0:
            self.num_batches = data_cfg.epoch_batches
        else:
            self.num_batches = total // per_step
        if self.num_batches < 1:
            raise ValueError(f"split {split!r} has {total} samples, fewer than world_size x batch_size = "
                             f"{per_step}: no full batch per rank (lower the batch size"
                             + (" or set data.epoch_batches)" if data_cfg.mode == "resampled" else ")"))
        self.epoch = epoch
        self.batch = 0
        self.positions = [0] * self.workers
        self._seek(epoch, start_batch, None)

    def _seek(self, epoch: int, batch: int, positions: Optional[list[int]]) -> None:
        if epoch < 0 or not 0 <= batch <= self.num_batches:
            raise ValueError(f"loader position epoch={epoch}, batch={batch} is outside [0, {self.num_batches}]")
        self.epoch, self.batch = epoch, batch
        if positions is None:  # exact when no sample was skipped: every consumed batch took batch_size samples
            counts = [len(range(k, batch, self.workers)) for k in range(self.workers)]
            positions = [n * self.batch_size for n in counts]
        self.positions = list(positions)
        if self.batch == self.num_batches:
            self._seek(self.epoch + 1, 0, None)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``; a no-op when ``epoch`` is the current one (keeps a resumed position)."""
        if epoch != self.epoch:
            self._seek(epoch, 0, None)

    def state_dict(self) -> dict:
        """A small JSON-able position: store it in checkpoints, give it to :meth:`load_state_dict`."""
        return {"epoch": self.epoch, "batch": self.batch, "positions": list(self.positions),
                "num_batches": self.num_batches, "skipped": self.skipped, **self._identity()}

    def _identity(self) -> dict:
        return {"mode": self.cfg.mode, "seed": self.cfg.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_workers": self.workers, "num_samples": self.shards.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for field, value in self._identity().items():
            if state.get(field) != value:
                raise ValueError(f"loader state has {field}={state.get(field)!r} but this loader has "
                                 f"{field}={value!r}: exact resume needs the same {field}")
        positions = [int(v) for v in state["positions"]]
        if len(positions) != self.workers:
            raise ValueError(f"loader state has {len(positions)} worker positions, expected {self.workers}")
        self.skipped = int(state.get("skipped", 0))
        self._seek(int(state["epoch"]), int(state["batch"]), positions)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self.epoch, self.batch
        expected = start
        for x, y, t, position in self._batches(self._plan(epoch, start, tuple(self.positions))):
            if t != expected:
                raise DataError(f"internal: rank {self.rank} expected batch {expected} of epoch {epoch}, got {t}")
            self.positions[t % self.workers] = position
            expected += 1
            self.batch = expected
            if expected == self.num_batches:
                self._seek(epoch + 1, 0, None)
            yield x, y
        if expected != self.num_batches:
            raise DataError(f"rank {self.rank} got {expected} of {self.num_batches} batches in epoch {epoch}")

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches across epochs without end (for step-based training loops)."""
        while True:
            yield from self


class EvalLoader(_Loader):
    """One rank's share of a split, every sample once across ranks; ``iter()`` is one full pass.

    Attributes: ``num_samples`` and ``num_batches`` of this rank (they may differ by one between ranks).
    """

    train = False

    def __init__(self, shards: SplitShards, data_cfg: Any, split: str, batch_size: int, rank: int,
                 world_size: int, *, pin_memory: bool = False):
        super().__init__(shards, data_cfg, split, batch_size, rank, world_size, pin_memory)
        total = shards.num_samples
        self.num_samples = (rank + 1) * total // world_size - rank * total // world_size
        self.num_batches = math.ceil(self.num_samples / batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _, _ in self._batches(self._plan(0, 0, (0,) * self.workers)):
            yield x, y


def split_urls(data_cfg: Any, split: str) -> str:
    """The URL(s) for ``split``: ``data.<split>_urls``, else ``data.train_urls`` when it names a dataset
    directory/prefix (then the manifest gives each split's shards)."""
    urls = getattr(data_cfg, f"{split}_urls", None)
    if urls:
        return urls
    if data_cfg.train_urls and not is_shard_pattern(data_cfg.train_urls):
        return data_cfg.train_urls
    if split == "train":
        raise ValueError("data.train_urls is not set: name a dataset directory holding manifest.json (e.g. "
                         "data/mnist5k, s3://bucket/cifar10) or a shard pattern (e.g. "
                         "data/mnist/train-{000000..000009}.tar)")
    raise ValueError(f"data.{split}_urls is not set (and data.train_urls is not a dataset directory whose "
                     f"manifest could name the {split!r} shards)")


def build_loader(data_cfg: Any, split: str, batch_size: int, rank: int, world_size: int, *, epoch: int = 0,
                 start_batch: int = 0, train: Optional[bool] = None, pin_memory: bool = False):
    """A :class:`TrainLoader` (``train``, default for split "train") or an :class:`EvalLoader` for one rank.

    ``split``: "train", "val" or "test"; URLs from :func:`split_urls`.  ``epoch``/``start_batch`` position a
    training loader (prefer :meth:`TrainLoader.load_state_dict`, which is exact even after skipped samples).
    Yields ``(x float32 [B, C, H, W] in [0, 1], y int64 [B])``.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    openers.configure(endpoint_url=data_cfg.s3_endpoint_url, retries=data_cfg.io_retries,
                      timeout_s=data_cfg.io_timeout_s, backoff_s=data_cfg.io_backoff_s)
    shards = resolve_split(split_urls(data_cfg, split), split)
    if split == "train" if train is None else train:
        return TrainLoader(shards, data_cfg, split, batch_size, rank, world_size, epoch=epoch,
                           start_batch=start_batch, pin_memory=pin_memory)
    return EvalLoader(shards, data_cfg, split, batch_size, rank, world_size, pin_memory=pin_memory)
