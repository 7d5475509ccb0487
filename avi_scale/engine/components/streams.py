"""This rank's training batches: one shard loader per data slot, and the optional audit of what they read.

A step's global batch is made of ``world_size * gradient_accumulation_steps`` slots; this rank owns slots
``rank * G + micro`` for ``micro < G``, and slot ``s`` reads the training split as shard-loader rank ``s`` of
that many.  The loaders keep their own positions (``state_dict``), so a resumed run continues every slot
where it stopped.  With ``train.batch_log``, :class:`BatchLog` appends, per step and slot, a hash of every
image read to ``<output_dir>/batches/rankNNNNN.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Iterator, Optional

import numpy as np
import torch

from avi_scale.config import DataConfig
from avi_scale.engine.distributed import World

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainStreams:
    """The shard loaders of this rank's data slots; ``start`` opens their iterators."""

    def __init__(self, data: DataConfig, micro_batch_size: int, accumulation_steps: int, world: World,
                 pin_memory: bool):
        from avi_scale.data import build_loader

        g = accumulation_steps
        self.num_slots = world.world_size * g
        self.slots = [world.rank * g + m for m in range(g)]
        self.loaders = [build_loader(data, "train", micro_batch_size, slot, self.num_slots, pin_memory=pin_memory)
                        for slot in self.slots]
        self.iters: list[Iterator[Batch]] = []

    @property
    def num_batches(self) -> int:
        """Batches per epoch of one slot (steps per epoch)."""
        return self.loaders[0].num_batches

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far by this rank's loaders (``data.skip_corrupt``; kept across resumes)."""
        return sum(loader.skipped for loader in self.loaders)

    def start(self) -> None:
        """Open every slot's endless iterator at its loader's current position."""
        self.iters = [loader.forever() for loader in self.loaders]

    def next(self, micro: int) -> Batch:
        """The next batch of this rank's ``micro``-th slot."""
        return next(self.iters[micro])

    def state_dict(self) -> dict[int, dict]:
        """``{slot: loader position}`` of this rank's slots."""
        return {slot: loader.state_dict() for slot, loader in zip(self.slots, self.loaders)}

    def load_state_dict(self, states: dict[int, dict]) -> None:
        """Move this rank's loaders to their positions in ``states`` (every slot's, from a checkpoint)."""
        for slot, loader in zip(self.slots, self.loaders):
            loader.load_state_dict(states[slot])

    def close(self) -> None:
        for it in self.iters:  # stops DataLoader worker processes of an unfinished epoch
            it.close()
        self.iters = []


def image_ids(x: torch.Tensor) -> list[str]:
    """Short content hashes of the images of a batch (the data-order audit of ``train.batch_log``)."""
    arr = (x.detach().float().cpu().numpy() * 255.0).round().astype(np.uint8)
    return [hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest() for a in arr]


def _json_or_none(line: str) -> Optional[dict]:
    """A JSON line, or None for a torn one (a process killed, or a disk filled, in the middle of a write)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class BatchLog:
    """``train.batch_log``: this rank's ``batches/rankNNNNN.jsonl``, one line per step and slot (a no-op
    when disabled).  A resumed run first drops what was logged from ``start_step`` on (and a torn line)."""

    def __init__(self, run_dir: Path, rank: int, start_step: int, enabled: bool):
        self.file: Optional[IO[str]] = None
        if not enabled:
            return
        path = run_dir / "batches" / f"rank{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            kept = [ln for ln in path.read_text().splitlines()
                    if (row := _json_or_none(ln)) is not None and row["step"] < start_step]
        path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, step: int, slot: int, x: torch.Tensor) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "slot": slot, "ids": image_ids(x)}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
