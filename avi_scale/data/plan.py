"""The epoch plan: which shard pieces, in which order, each rank and DataLoader worker reads.

Pure: no I/O, no torch.  Every process derives the same plan from ``(seed, epoch)`` and the manifest's
per-shard sample counts; the loader (:mod:`avi_scale.data.loader`) only executes it.

How a training epoch is cut up (``mode="exact"``)
    The shard order is permuted per epoch; the concatenated samples form one global sequence of ``N``
    samples.  Each rank gets ``num_batches = N // (world_size * batch_size)`` full batches: rank ``r``
    takes the contiguous slice ``[r * num_batches * B, (r + 1) * num_batches * B)``; the last
    ``N mod (world_size * B)`` samples of the sequence (different ones each epoch) wait for a later
    epoch.  Inside a rank, the DataLoader's ``K`` workers each own a contiguous part of that slice
    ("logical worker" ``k`` owns its batches ``k, k + K, k + 2K, ...``, which is the order in which the
    DataLoader hands batches out), read it shard by shard and shuffle it through a seeded buffer of
    ``shuffle_buffer`` samples.  No sample is read by two workers or two ranks, so the epoch visits each
    sample at most once, and every rank yields exactly ``num_batches`` batches (no collective can hang
    on uneven shards).  (``webdataset``'s ``split_by_node``/``split_by_worker`` split whole shards, which
    gives ranks unequal sample counts whenever shard sizes differ; hence the sample-level plan.)

Resampled streams (``mode="resampled"``)
    Each logical worker of each rank draws shards at random with replacement (weighted by their sample
    counts) from its own seeded stream, forever; an epoch is ``num_batches`` batches per rank
    (``data.epoch_batches``, or ``N // (world_size * B)``).  Samples may repeat within an epoch and
    across ranks.

Position and resume
    A batch's index within the epoch is ``t = 0 .. num_batches - 1`` in the order the loader yields them.
    A position is ``(epoch, batch)`` plus, per logical worker, how many raw samples it has consumed.  A
    plan that starts at ``start_batch`` rotates the workers so the DataLoader's round robin starts at the
    right logical worker (:meth:`EpochPlan.logical_worker`), and each skips the raw samples it had
    already delivered.  The batches, including the seeded transforms, are those of an uninterrupted run.

Evaluation
    Rank ``r`` gets samples ``[r * N // world_size, (r + 1) * N // world_size)`` of the shards in manifest
    order (:func:`eval_share`; counts differ by at most one), in batches of ``batch_size`` with a smaller
    last one, split between the workers like training batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator, TypeVar

import numpy as np

MODES = ("exact", "resampled")
TAG_SHARDS, TAG_SHUFFLE, TAG_RESAMPLE = 11, 12, 13  # seed tags: shard order, shuffle buffer, resampling

Piece = tuple[int, int, int]  # (shard index, first sample, end sample) within one shard
T = TypeVar("T")


def mix_seed(*parts: int) -> int:
    """A 64-bit seed mixed from non-negative integers."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0])


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches of each logical worker when batch ``t`` belongs to worker ``t % num_workers``."""
    return [len(range(k, num_batches, num_workers)) for k in range(num_workers)]


def consumed_positions(batch: int, num_workers: int, batch_size: int) -> list[int]:
    """Raw samples each logical worker has consumed after ``batch`` full batches with nothing skipped."""
    return [n * batch_size for n in worker_batch_counts(batch, num_workers)]


def segments(order: list[int], counts: tuple[int, ...], lo: int, hi: int) -> list[Piece]:
    """The pieces of positions ``[lo, hi)`` of the sequence that concatenates the shards in ``order``."""
    pieces, offset = [], 0
    for index in order:
        start, stop = max(lo, offset), min(hi, offset + counts[index])
        if start < stop:
            pieces.append((index, start - offset, stop - offset))
        offset += counts[index]
        if offset >= hi:
            break
    return pieces


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
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


def train_num_batches(num_samples: int, world_size: int, batch_size: int, mode: str, epoch_batches: int) -> int:
    """Training batches per epoch and rank (may be 0: the split is too small)."""
    if mode == "resampled" and epoch_batches > 0:
        return epoch_batches
    return num_samples // (world_size * batch_size)


def eval_share(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s samples ``[lo, hi)`` of an evaluation pass over ``num_samples`` samples."""
    return rank * num_samples // world_size, (rank + 1) * num_samples // world_size


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: everything a worker needs to know which samples to read, and in which order."""

    counts: tuple[int, ...]  # samples per shard, in the order the loader lists the shards
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

    def worker_batches(self) -> list[int]:
        """Batches of each logical worker in this epoch."""
        return worker_batch_counts(self.num_batches, self.num_workers)

    def logical_worker(self, slot: int) -> tuple[int, int, int]:
        """``(k, first, mine)`` for DataLoader worker ``slot``: it runs logical worker ``k`` (rotated so the
        round robin resumes at ``start_batch``), from its batch ``first`` to ``mine`` (its batch count)."""
        k = (self.start_batch + slot) % self.num_workers
        first = (self.start_batch + slot) // self.num_workers
        return k, first, self.worker_batches()[k]

    def batch_index(self, k: int, j: int) -> int:
        """Index ``t`` within the epoch of logical worker ``k``'s batch ``j``."""
        return k + self.num_workers * j

    def shard_order(self) -> list[int]:
        """This epoch's permutation of the shards (exact mode)."""
        order = list(range(len(self.counts)))
        np.random.default_rng(mix_seed(self.seed, self.epoch, TAG_SHARDS)).shuffle(order)
        return order

    def exact_pieces(self, k: int) -> list[Piece]:
        """The shard pieces logical worker ``k`` reads in one pass over its part of the epoch."""
        counts = self.worker_batches()
        lo = (self.rank * self.num_batches + sum(counts[:k])) * self.batch_size
        return segments(self.shard_order(), self.counts, lo, lo + counts[k] * self.batch_size)

    def shuffle_rng(self, k: int) -> random.Random:
        """The generator of logical worker ``k``'s shuffle buffer (fresh for each pass)."""
        return random.Random(mix_seed(self.seed, self.epoch, self.rank, k, TAG_SHUFFLE))

    def resampled_shards(self, k: int) -> Iterator[int]:
        """Logical worker ``k``'s endless draws of shard indices, weighted by sample count (resampled mode)."""
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, k, TAG_RESAMPLE))
        indices = range(len(self.counts))
        while True:
            yield rng.choices(indices, weights=self.counts)[0]

    def eval_pieces(self, slot: int) -> list[Piece]:
        """The shard pieces (manifest order) worker ``slot`` reads in an evaluation pass; empty when none."""
        lo, hi = eval_share(sum(self.counts), self.rank, self.world_size)
        counts = self.worker_batches()
        start = lo + sum(counts[:slot]) * self.batch_size
        stop = min(hi, start + counts[slot] * self.batch_size)
        if start >= stop:
            return []
        return segments(list(range(len(self.counts))), self.counts, start, stop)

    def sample_offsets(self) -> np.ndarray:
        """Global index of each shard's first sample (manifest order), and the total at the end."""
        return np.concatenate([[0], np.cumsum(self.counts)])
