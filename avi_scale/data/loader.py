"""The streaming loaders of one rank: exact or resampled training epochs, and exact-once evaluation passes.

What each worker reads is fixed by the epoch plan (:mod:`avi_scale.data.plan`: partitioning, order,
resume positions); this module executes it: a torch ``IterableDataset`` per epoch that opens the shards
(``gopen`` with the s3/http openers of :mod:`avi_scale.data.openers`), reads the planned pieces, shuffles
them, decodes (:mod:`avi_scale.data.shards`) and transforms (:mod:`avi_scale.data.transforms`) the
samples, and skips corrupt ones when asked; and the loaders around it.

Resume
    ``TrainLoader.state_dict()`` records ``(epoch, batch)`` plus, per logical worker, how many raw samples
    it has consumed; ``load_state_dict`` on a fresh loader continues with batch ``t = batch``: each worker
    skips the raw samples it had already delivered (cheap: no decoding).  The sequence of batches,
    including the dynamic binarisation and flips, is identical to an uninterrupted run.  It needs the same
    seed, world size, batch size, number of workers and mode; ``load_state_dict`` refuses otherwise.

Evaluation
    :class:`EvalLoader` reads every sample of the split once across ranks.  Ranks may run one batch more or
    less: accumulate the per-sample sums and counts locally, then ``all_reduce(SUM)`` once after the loop
    (no per-batch collectives).

Skipping (``data.skip_corrupt``)
    Undecodable samples and the unreadable rest of truncated shards are skipped, counted and logged; a
    training worker that lost samples reads its part again from the start to keep every rank at
    ``num_batches`` full batches.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avi_scale.data import openers
from avi_scale.data.errors import DataError, ShardError
from avi_scale.data.manifest import SplitShards, split_shards
from avi_scale.data.openers import open_url
from avi_scale.data.plan import MODES, EpochPlan, Piece, consumed_positions, eval_share, shuffled, train_num_batches
from avi_scale.data.shards import decode_sample, iter_tar_samples
from avi_scale.data.transforms import Transform

log = logging.getLogger("avi_scale.data")


def _as_is(item: Any) -> Any:
    """DataLoader ``collate_fn``: keep the worker's numpy arrays (sent by value through the pipe)."""
    return item


class _Skips:
    """Counts skipped samples (skip_corrupt) and logs each one."""

    def __init__(self) -> None:
        self.count = 0
        self.reported = 0

    def add(self, n: int, why: str) -> None:
        self.count += n
        log.warning("skipping %d sample(s): %s", n, why)

    def new(self) -> int:
        """Skips since the last call (reported with the next batch)."""
        fresh, self.reported = self.count - self.reported, self.count
        return fresh


class _EpochStream(IterableDataset):
    """Yields ``(x float32 [B, C, H, W], y int64 [B], t, position, skipped)`` numpy arrays for the batches
    of one rank's epoch owned by this worker.

    Workers send numpy arrays, pickled through the DataLoader's pipe, rather than tensors: no shared-memory
    file descriptors to pass (that hand-over hung on these machines, and fails in containers with a small
    /dev/shm); the main process only wraps them with ``torch.from_numpy``."""

    def __init__(self, plan: EpochPlan, shards: SplitShards, transform: Transform, skip_corrupt: bool,
                 io: openers.IOSettings):
        super().__init__()
        self.plan, self.shards, self.transform = plan, shards, transform
        self.skip_corrupt, self.io = skip_corrupt, io

    # -- raw samples ------------------------------------------------------------------------------
    def _read_piece(self, piece: Piece, skips: Optional[_Skips]) -> Iterator:
        """Raw ``(url, key, members, shard index, position in shard)`` of samples ``[start, stop)``."""
        index, start, stop = piece
        url, count = self.shards.urls[index], self.shards.counts[index]
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

    def _read(self, pieces: list[Piece], skips: Optional[_Skips]) -> Iterator:
        return itertools.chain.from_iterable(self._read_piece(piece, skips) for piece in pieces)

    def _exact_pass(self, k: int, skips: Optional[_Skips]) -> Iterator:
        p = self.plan
        return shuffled(self._read(p.exact_pieces(k), skips), p.shuffle_buffer, p.shuffle_rng(k))

    def _raw_train(self, k: int, skips: Optional[_Skips]) -> Iterator:
        p = self.plan
        if p.mode == "resampled":
            counts = self.shards.counts
            draws = (item for i in p.resampled_shards(k) for item in self._read_piece((i, 0, counts[i]), skips))
            return shuffled(draws, p.shuffle_buffer, p.shuffle_rng(k))
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
                                 f"of {self.shards.manifest_url}")
            if repeat == 0:
                log.warning("worker %d of rank %d repeats samples of its part to make up for skipped ones", k,
                            self.plan.rank)

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        p = self.plan
        openers.configure(**vars(self.io))
        info = get_worker_info()
        slot, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != p.num_workers:
            raise DataError(f"internal: planned for {p.num_workers} workers, DataLoader runs {workers}")
        return self._train_batches(slot) if p.train else self._eval_batches(slot)

    def _train_batches(self, slot: int) -> Iterator:
        p = self.plan
        k, first, mine = p.logical_worker(slot)
        if first >= mine:
            return
        skips = _Skips() if self.skip_corrupt else None
        raw = self._raw_train(k, skips)
        position = p.positions[k]
        if position:
            next(itertools.islice(raw, position - 1, position), None)
        shape = self.shards.image_shape
        bad_run, piece_len = 0, max(1, mine * p.batch_size)
        for j in range(first, mine):
            images = np.empty((p.batch_size, *shape), dtype=np.uint8)  # fresh: the queue pickles it later
            labels = np.empty(p.batch_size, dtype=np.int64)
            filled = 0
            while filled < p.batch_size:
                item = next(raw, None)
                if item is None:
                    raise DataError(f"internal: worker {k} of rank {p.rank} ran out of samples at batch {j}")
                url, key, members, _, _ = item
                position += 1
                try:
                    images[filled], labels[filled] = decode_sample(url, key, members, shape)
                except ShardError as exc:
                    if skips is None:
                        raise
                    skips.add(1, str(exc))
                    bad_run += 1
                    if bad_run > piece_len:
                        raise ShardError(f"no decodable sample in a whole pass over this worker's part of "
                                         f"{self.shards.manifest_url} (last: {exc})") from None
                    continue
                bad_run = 0
                filled += 1
            t = p.batch_index(k, j)
            skipped = skips.new() if skips is not None else 0
            yield self.transform.train_batch(images, p.epoch, p.rank, t), labels, t, position, skipped

    def _eval_batches(self, slot: int) -> Iterator:
        p = self.plan
        pieces = p.eval_pieces(slot)
        if not pieces:
            return
        skips = _Skips() if self.skip_corrupt else None
        offsets = p.sample_offsets()
        raw = self._read(pieces, skips)
        h, w, c = self.shards.image_shape
        while True:
            images, labels, indices = [], [], []
            for url, key, members, shard, n in raw:
                try:
                    image, label = decode_sample(url, key, members, self.shards.image_shape)
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
            skipped = skips.new() if skips is not None else 0
            if not images:
                if skipped:  # an empty batch only reports skips at the very end; the loader drops it
                    yield np.empty((0, c, h, w), np.float32), np.empty(0, np.int64), -1, 0, skipped
                return
            batch = self.transform.eval_batch(np.stack(images).reshape(len(images), h, w, c), np.asarray(indices))
            yield batch, np.asarray(labels, dtype=np.int64), -1, 0, skipped


class _Loader:
    """Common plumbing: the plan, the DataLoader around :class:`_EpochStream`, error translation."""

    train: bool
    num_batches: int

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
        self.transform = Transform(seed=data_cfg.seed, binarize=data_cfg.binarize,
                                   random_flips=data_cfg.random_flips and self.train, num_bits=data_cfg.num_bits)

    def __len__(self) -> int:
        return self.num_batches

    def _plan(self, epoch: int, start_batch: int, positions: tuple[int, ...]) -> EpochPlan:
        cfg = self.cfg
        return EpochPlan(counts=self.shards.counts, train=self.train, mode=cfg.mode, seed=cfg.seed, epoch=epoch,
                         rank=self.rank, world_size=self.world_size, batch_size=self.batch_size,
                         num_batches=self.num_batches, num_workers=self.workers, start_batch=start_batch,
                         positions=positions, shuffle_buffer=cfg.shuffle_buffer if self.train else 0)

    def _batches(self, plan: EpochPlan) -> Iterator:
        stream = _EpochStream(plan, self.shards, self.transform, self.cfg.skip_corrupt, openers.settings())
        loader = DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=self.cfg.num_workers,
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
        self.num_batches = train_num_batches(total, world_size, batch_size, data_cfg.mode, data_cfg.epoch_batches)
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
            positions = consumed_positions(batch, self.workers, self.batch_size)
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
        """Continue from a :meth:`state_dict` of a loader with the same seed, mode, world size, batch size and
        number of workers."""
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
        lo, hi = eval_share(shards.num_samples, rank, world_size)
        self.num_samples = hi - lo
        self.num_batches = math.ceil(self.num_samples / batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _, _ in self._batches(self._plan(0, 0, (0,) * self.workers)):
            yield x, y


def build_loader(data_cfg: Any, split: str, batch_size: int, rank: int, world_size: int, *, epoch: int = 0,
                 start_batch: int = 0, train: Optional[bool] = None,
                 pin_memory: bool = False) -> TrainLoader | EvalLoader:
    """A :class:`TrainLoader` (``train``, default for split "train") or an :class:`EvalLoader` for one rank.

    ``split``: "train", "val" or "test"; shards from :func:`~avi_scale.data.manifest.split_shards`.
    ``epoch``/``start_batch`` position a training loader (prefer :meth:`TrainLoader.load_state_dict`, which
    is exact even after skipped samples).  Yields ``(x float32 [B, C, H, W] in [0, 1], y int64 [B])``.
    """
    shards = split_shards(data_cfg, split)
    if split == "train" if train is None else train:
        return TrainLoader(shards, data_cfg, split, batch_size, rank, world_size, epoch=epoch,
                           start_batch=start_batch, pin_memory=pin_memory)
    return EvalLoader(shards, data_cfg, split, batch_size, rank, world_size, pin_memory=pin_memory)
