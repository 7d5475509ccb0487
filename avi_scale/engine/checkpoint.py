"""Checkpoints: DeepSpeed's own format plus our client state, made crash-safe, pruned, exportable.

Layout of a checkpoint directory (``train.checkpoint_dir``, default ``<output_dir>/checkpoints``)::

    latest                  tag of the newest *complete* checkpoint (replaced atomically)
    step00000500/           one tag per saved step: DeepSpeed's model/optimizer files of every
                            rank (``mp_rank_00_model_states.pt``, ``*zero_pp_rank_*`` ...)
        COMPLETE            written by rank 0 after every rank has saved (JSON: step, world size)
    zero_to_fp32.py         DeepSpeed's consolidation script, copied there by DeepSpeed

DeepSpeed writes its ``latest`` file from rank 0 without waiting for the other ranks, so the engine
saves with ``save_latest=False`` and moves ``latest`` itself after a barrier.  The client state
(step, epoch, loader positions, RNG states, EMA, resolved config) is assembled on rank 0 and stored
in rank 0's model-states file; after loading, rank 0 broadcasts it (under ZeRO-3 every rank reads
its own file).

:mod:`avi_scale.engine.export` turns a checkpoint into one fp32 ``.pt`` file (DeepSpeed's zero_to_fp32
functions for ZeRO 1-3) and holds the one reader of trained models (:func:`~avi_scale.engine.export.load_model`).

Safety and failures:

* Our own reads use ``torch.load(weights_only=True)`` (:func:`safe_load`): tensors, plain containers and
  numbers, plus the few DeepSpeed data classes its optimizer files hold (:data:`SAFE_GLOBALS`).  DeepSpeed's
  own loaders (resume, ``zero_to_fp32``) unpickle with ``weights_only=False``, so every ``*.pt`` file of a
  checkpoint is first read by :func:`verify_checkpoint_files` (``weights_only=True``, memory-mapped) and a
  file holding anything else is refused before DeepSpeed opens it.
* :func:`output_dir_problem` tells, without creating anything, whether a directory could be made and
  written (``avi-train --check``); :func:`ensure_writable` creates and probes it (the engine, before
  training).  Both raise/return :class:`OutputDirError` messages naming the config key.
* A save that fails (disk full, unwritable, a quota) raises :class:`CheckpointSaveError` naming the last
  complete checkpoint, which ``latest`` still names: nothing marks a checkpoint complete before every
  rank's files are on disk.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from avi_scale.engine import distributed as D

LATEST = "latest"
COMPLETE = "COMPLETE"
PROBE = ".avi-write-probe"
CLIENT_KEY = "avi_scale"  # our client state lives under this one key of DeepSpeed's model-states dict
_TAG = re.compile(r"^step(\d{8,})$")


class OutputDirError(RuntimeError):
    """``train.output_dir`` or ``train.checkpoint_dir`` cannot be created or written."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous complete checkpoint is intact."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects other than tensors and plain data."""


def output_dir_problem(path: str | Path, key: str) -> Optional[str]:
    """Why ``path`` could not be created and written (None: it could), without creating anything."""
    path = Path(os.path.abspath(path))
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "the directory itself" if existing == path else "a path component"
        return f"{key}={path}: {what} {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (its nearest existing parent {existing} is not writable)"
        return f"{key}={path} is not writable{where}"
    return None


def ensure_writable(path: str | Path, key: str, probe: str = PROBE) -> Optional[str]:
    """Create ``path`` and write/remove a probe file in it; returns the problem (None: writable).

    Catches what :func:`output_dir_problem` cannot see from permission bits: read-only mounts for root,
    full disks, quotas, network filesystems refusing writes.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        target = path / probe
        with open(target, "wb") as f:
            f.write(b"avi-scale write probe\n")
            f.flush()
            os.fsync(f.fileno())
        target.unlink()
    except OSError as exc:
        detail = exc.strerror or str(exc)
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return f"{key}={path} is not writable: {detail}{where}"
    return None


# What our checkpoints may contain besides tensors, containers and numbers: DeepSpeed's optimizer files
# pickle three of its data classes, and checkpoints written before numpy RNG states were stored as lists
# hold numpy arrays.  None of these runs code when unpickled (plain data records and an Enum).
def _safe_globals() -> list:
    import numpy as np

    found: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module, name in (("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler")):
        try:
            mod = __import__(module, fromlist=[name])
            found.append(getattr(mod, name))
        except (ImportError, AttributeError):
            continue
    return found


def safe_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`_safe_globals` allowed (CPU tensors)."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def verify_checkpoint_files(tag_dir: str | Path) -> None:
    """Read every ``*.pt`` of a checkpoint with ``weights_only=True`` (memory-mapped, so tensors are not
    read); raise :class:`UnsafeCheckpointError` naming the file if one holds anything else."""
    import pickle

    for f in sorted(Path(tag_dir).glob("*.pt")):
        try:
            safe_load(f, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()
            reason = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line),
                          first[0] if first else type(exc).__name__)
            raise UnsafeCheckpointError(
                f"{f} is not a checkpoint file that torch.load(weights_only=True) accepts ({reason.strip()}); "
                "refusing to hand it to DeepSpeed's loader, which would unpickle it without restrictions") from None


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def tag_step(tag_dir: str | Path) -> int:
    """The step of a ``stepNNNNNNNN`` tag directory; -1 for any other name."""
    m = _TAG.match(Path(tag_dir).name)
    return int(m.group(1)) if m else -1


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE).is_file()


def resolve(path: str | Path) -> Optional[Path]:
    """A complete checkpoint tag directory from a tag directory or a checkpoint directory.

    For a checkpoint directory: the tag named by ``latest`` when it is complete, else the newest
    complete tag (a ``latest`` can be stale after a partial copy of the directory); None if none.
    """
    path = Path(path)
    if is_complete(path):
        return path
    if not path.is_dir():
        return None
    latest = path / LATEST
    if latest.is_file():
        candidate = path / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    tags = sorted((int(m.group(1)), d) for d in path.iterdir() if (m := _TAG.match(d.name)) and is_complete(d))
    return tags[-1][1] if tags else None


class Checkpointer:
    """Saves and loads DeepSpeed checkpoints of one run (every rank calls every method)."""

    def __init__(self, directory: str | Path, keep: int, rank: int, world_size: int):
        self.dir = Path(directory)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size

    def save(self, engine: Any, step: int, client_state: Optional[dict]) -> Path:
        """Save under tag ``step{step:08d}``; ``client_state`` is rank 0's (None on other ranks)."""
        from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                    UNIVERSAL_CHECKPOINT_VERSION_VALUE)

        tag = tag_for(step)
        tag_dir = self.dir / tag
        try:
            if self.rank == 0:
                self.dir.mkdir(parents=True, exist_ok=True)
                if tag_dir.exists():  # a leftover of a crashed save of this very step
                    shutil.rmtree(tag_dir)
            D.barrier()
            # the version tag lets DeepSpeed's ds_to_universal.py convert the checkpoint (world-size changes)
            universal = {UNIVERSAL_CHECKPOINT_INFO: {
                UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
            engine.save_checkpoint(str(self.dir), tag=tag, client_state={CLIENT_KEY: client_state, **universal},
                                   save_latest=False)
            D.barrier()  # every rank's files are on disk
            if self.rank == 0:
                marker = {"step": step, "world_size": self.world_size, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                _write_atomically(tag_dir / COMPLETE, json.dumps(marker) + "\n")
                _write_atomically(self.dir / LATEST, tag)
        except Exception as exc:  # noqa: BLE001 - any failure leaves this tag incomplete; say what is intact
            # this rank stops here; a launcher stops the others (they wait in a collective of the save)
            raise CheckpointSaveError(self._failure(tag, exc)) from exc
        if self.rank == 0:
            self._prune()
        D.barrier()
        return tag_dir

    def _failure(self, tag: str, exc: BaseException) -> str:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
        previous = resolve(self.dir)
        try:  # torch reports a full disk as "unexpected pos ...": say it plainly when it is likely
            free = shutil.disk_usage(self.dir).free
            needed = sum(p.stat().st_size for p in previous.iterdir()) if previous is not None else 0
            space = f"; {free / 2**20:.1f} MiB free there"
            if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or free < max(needed, 2**20):
                space += (f": the filesystem is full (the last checkpoint took {needed / 2**20:.1f} MiB)"
                          if needed else ": the filesystem is full")
        except OSError:
            space = ""
        if previous is not None and previous.name != tag:
            kept = (f"The last complete checkpoint, {previous}, is intact and '{LATEST}' still names it: fix the "
                    "cause (free space, permissions) or set train.checkpoint_dir elsewhere, and rerun the same "
                    "command to resume from it.")
        else:
            kept = "There is no earlier complete checkpoint of this run."
        return (f"could not save checkpoint {tag} in {self.dir} on rank {self.rank} ({detail}{space}). "
                f"{kept} The incomplete {tag}/ has no {COMPLETE} marker and is never loaded.")

    def _prune(self) -> None:
        tags = sorted((int(m.group(1)), d) for d in self.dir.iterdir() if (m := _TAG.match(d.name)))
        complete = [d for _, d in tags if is_complete(d)]
        for d in complete[:-self.keep]:
            shutil.rmtree(d, ignore_errors=True)
        newest = complete[-1] if complete else None
        for _, d in tags:  # incomplete leftovers older than the newest complete checkpoint
            if newest is not None and d != newest and not is_complete(d) and d.name < newest.name:
                shutil.rmtree(d, ignore_errors=True)

    def load(self, engine: Any, tag_dir: Path) -> dict:
        """Load model, optimizer and client state; returns rank 0's client state on every rank."""
        verify_checkpoint_files(tag_dir)
        path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag_dir}")
        state = D.broadcast_object(client.get(CLIENT_KEY) if self.rank == 0 else None)
        if state is None:
            raise RuntimeError(f"{tag_dir} is not an avi-scale checkpoint (no {CLIENT_KEY!r} client state)")
        return state


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) sees the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
