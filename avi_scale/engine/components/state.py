"""What a checkpoint carries of the training besides weights and optimizer: the step, the skip counters
and every rank's random generators; and the seeds of the posterior noise.

The noise of every micro-batch is seeded from ``(train.seed, step, slot)`` (:func:`noise_seed`), so a step
computes the same whatever the process layout, and a resumed run replays it exactly.  The generators of
Python, numpy and torch are captured per rank (:func:`capture_rng`) and restored on a resume at the same
world size (:func:`restore_rng`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def noise_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple (stable across processes and runs, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def capture_rng() -> dict:
    """This process's Python, numpy, torch (and CUDA) generator states, as checkpointable data."""
    # numpy's state as plain numbers (not an ndarray): checkpoints then load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the generators to a state written by :func:`capture_rng`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainState:
    """Where training stands: ``step`` optimizer steps taken (the 0-based index of the next one),
    ``skipped_steps`` of them skipped in all, ``consecutive_skips`` in a row up to now."""

    def __init__(self) -> None:
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0

    def applied(self) -> None:
        """The step about to be counted was applied."""
        self.consecutive_skips = 0

    def skipped(self) -> None:
        """The step about to be counted was skipped (it changed nothing)."""
        self.skipped_steps += 1
        self.consecutive_skips += 1

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state: dict) -> None:
        """Take the three counters from ``state`` (other keys, e.g. of a whole client state, are ignored)."""
        self.step = state["step"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
