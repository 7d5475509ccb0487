"""From decoded uint8 images to model input: float conversion, random flips, dynamic binarisation.

numpy, single-threaded, run in the DataLoader workers: no intra-op thread pool to contend with the
training process.  Every random draw is seeded, so resumed runs and different worker counts see the same
inputs:

* training batches by ``(seed, epoch, rank, t)``, ``t`` the batch's index within the epoch (flips first,
  then the Bernoulli draws, from one generator);
* evaluation images by ``(seed, global sample index)``, so a test NLL does not depend on world size,
  batch size or workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAG_AUGMENT, TAG_EVAL = 14, 15  # seed tags: training batches, evaluation samples


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1]."""
    x = images.transpose(0, 3, 1, 2).astype(np.float32)
    x *= np.float32(1.0 / 255.0)
    return x


@dataclass(frozen=True)
class Transform:
    """The input transforms of one loader (``data.binarize``; ``data.random_flips`` in training only)."""

    seed: int
    binarize: bool
    random_flips: bool

    def train_batch(self, images: np.ndarray, epoch: int, rank: int, t: int) -> np.ndarray:
        """Training batch ``t`` of ``epoch`` on ``rank``: uint8 [B, H, W, C] -> float32 [B, C, H, W]."""
        x = to_float(images)
        rng = np.random.default_rng([self.seed, epoch, rank, t, TAG_AUGMENT])
        if self.random_flips:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip, :, :, ::-1]
        if self.binarize:
            x = (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
        return x

    def eval_batch(self, images: np.ndarray, sample_indices: np.ndarray) -> np.ndarray:
        """Evaluation images with their global sample indices: uint8 [B, H, W, C] -> float32 [B, C, H, W]."""
        x = to_float(images)
        if self.binarize:
            for i, index in enumerate(sample_indices):
                rng = np.random.default_rng([self.seed, int(index), TAG_EVAL])
                x[i] = rng.random(x[i].shape, dtype=np.float32) < x[i]
        return x
