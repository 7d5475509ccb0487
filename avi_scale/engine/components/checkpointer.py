"""The run's checkpoints: our client state assembled from the components, saves, and the resume.

:class:`~avi_scale.engine.checkpoint.Checkpointer` writes and reads DeepSpeed's files crash-safely; this
component decides what goes in them besides weights and optimizer: the client state (format
:data:`CLIENT_FORMAT`, stored under the key ``avi_scale`` of rank 0's model-states file) holds the step and
skip counters (:class:`TrainState`), every data slot's loader position (:class:`TrainStreams`), every rank's
random generators, the EMA (gathered, fp32), the resolved config and the DeepSpeed JSON.  Every rank calls
every method (they are collective).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from avi_scale.config import TrainConfig
from avi_scale.engine import distributed as D
from avi_scale.engine.checkpoint import Checkpointer, OutputDirError, ensure_writable, resolve
from avi_scale.engine.components.model import average_buffers
from avi_scale.engine.components.state import TrainState, capture_rng, restore_rng
from avi_scale.engine.components.streams import TrainStreams
from avi_scale.engine.distributed import World
from avi_scale.engine.ema import EMA
from avi_scale.engine.export import has_model_states

CLIENT_FORMAT = 1


def checkpoint_dir(t: TrainConfig) -> Path:
    """``train.checkpoint_dir``, or ``<train.output_dir>/checkpoints``."""
    return Path(t.checkpoint_dir) if t.checkpoint_dir else Path(t.output_dir) / "checkpoints"


def check_outputs(t: TrainConfig, world: World) -> None:
    """Before anything is built: every rank can write the checkpoint directory, rank 0 the run
    directory; otherwise all ranks raise the same :class:`OutputDirError` naming the key."""
    problems = []
    if world.is_main:
        problems.append(ensure_writable(Path(t.output_dir), "train.output_dir"))
    key = "train.checkpoint_dir" if t.checkpoint_dir else "train.output_dir (its checkpoints/)"
    problems.append(ensure_writable(checkpoint_dir(t), key, probe=f".avi-write-probe-rank{world.rank}"))
    found = sorted({p for part in D.all_gather_object([p for p in problems if p]) for p in part})
    if found:
        raise OutputDirError("; ".join(found) + ". Nothing was trained: choose another directory or make it "
                             "writable, then rerun.")


class TrainCheckpointer:
    """Saves the engine and the stateful components at most once per step; resumes per ``train.resume``."""

    def __init__(self, t: TrainConfig, world: World, engine: Any, state: TrainState, streams: TrainStreams,
                 ema: EMA, steps_per_epoch: int, config: dict, ds_config: dict):
        self.dir = checkpoint_dir(t)
        self.resume_from = t.resume
        self.micro_batch_size = t.micro_batch_size
        self.accumulation_steps = t.gradient_accumulation_steps
        self.world = world
        self.engine, self.state, self.streams, self.ema = engine, state, streams, ema
        self.steps_per_epoch = steps_per_epoch
        self.config, self.ds_config = config, ds_config
        self.files = Checkpointer(self.dir, t.keep_checkpoints, world.rank, world.world_size)
        self.last: Optional[Path] = None  # the newest checkpoint of this run, saved or resumed
        self.last_step = -1

    def client_state(self) -> Optional[dict]:
        """The client state on rank 0 (None elsewhere); gathers the EMA, loader positions and RNG states."""
        ema = self.ema.state_dict()  # collective under ZeRO-3
        loaders: dict = {}
        for part in D.all_gather_object(self.streams.state_dict()):
            loaders.update(part)
        rngs = dict(enumerate(D.all_gather_object(capture_rng())))
        if not self.world.is_main:
            return None
        s = self.state
        epoch, pos = divmod(s.step, self.steps_per_epoch)
        return {
            "format": CLIENT_FORMAT, "step": s.step, "epoch": epoch, "batch_in_epoch": pos,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.world.world_size,
            "gradient_accumulation_steps": self.accumulation_steps, "data_slots": self.streams.num_slots,
            "micro_batch_size": self.micro_batch_size, "loaders": loaders, "rng": rngs, "ema": ema,
            "skipped_steps": s.skipped_steps, "consecutive_skips": s.consecutive_skips,
            "skipped_samples": sum(state.get("skipped", 0) for state in loaders.values()),
            "config": self.config, "ds_config": self.ds_config,
        }

    def save(self) -> Path:
        """Checkpoint the current step (BatchNorm statistics averaged first), unless it is saved already."""
        if self.last_step == self.state.step and self.last is not None:
            return self.last
        average_buffers(self.engine.module, self.world.world_size)
        self.last = self.files.save(self.engine, self.state.step, self.client_state())
        self.last_step = self.state.step
        return self.last

    def resume(self) -> Optional[Path]:
        """Load the checkpoint ``train.resume`` points at into the engine and the components; returns its
        path (None: a fresh start)."""
        tag_dir = self._find()
        if tag_dir is None:
            return None
        client = self.files.load(self.engine, tag_dir)
        self._check_layout(client, tag_dir)
        self.state.load_state_dict(client)
        self.ema.load_state_dict(client["ema"])
        rng = client["rng"].get(self.world.rank)
        if rng is not None and client["world_size"] == self.world.world_size:
            restore_rng(rng)
        self.streams.load_state_dict(client["loaders"])
        self.last, self.last_step = tag_dir, self.state.step
        return tag_dir

    def _find(self) -> Optional[Path]:
        """The complete checkpoint tag to resume from: ``auto`` the newest one here (if any), ``never``
        none, else the named tag or checkpoint directory (which must hold one)."""
        if self.resume_from == "never":
            return None
        source = self.dir if self.resume_from == "auto" else Path(self.resume_from)
        if self.resume_from != "auto" and has_model_states(source):
            return source  # named explicitly, e.g. the output of ds_to_universal.py
        tag_dir = resolve(source) if source.exists() else None
        if tag_dir is None and self.resume_from != "auto":
            raise FileNotFoundError(f"train.resume={self.resume_from!r}: no complete checkpoint there")
        return tag_dir

    def _check_layout(self, client: dict, tag_dir: Path) -> None:
        slots = self.streams.num_slots
        if client["data_slots"] != slots or client["micro_batch_size"] != self.micro_batch_size:
            raise RuntimeError(
                f"{tag_dir} was written with {client['data_slots']} data slots of {client['micro_batch_size']} "
                f"images (world_size x gradient_accumulation_steps x micro_batch_size); this run has "
                f"{slots} of {self.micro_batch_size}. Keep world_size * gradient_accumulation_steps and "
                "micro_batch_size when resuming, so that every step sees the same global batch.")
