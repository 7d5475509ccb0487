"""From decoded uint8 images to model input: n-bit quantisation, float conversion, random flips, dynamic
binarisation.

numpy, single-threaded, run in the DataLoader workers: no intra-op thread pool to contend with the
training process.  Every random draw is seeded, so resumed runs and different worker counts see the same
inputs:

* training batches by ``(seed, epoch, rank, t)``, ``t`` the batch's index within the epoch (flips first,
  then the Bernoulli draws, from one generator);
* evaluation images by ``(seed, global sample index)``, so a test NLL does not depend on world size,
  batch size or workers.

``data.num_bits`` (``n``, 8 by default) quantises the stored 8-bit levels ``k`` to ``n`` bits as NVAE
does for its 5-bit CelebA-HQ 256: ``floor(k / 2^(8-n))`` (dropping the low bits), then scaled to
``[0, 1]`` by ``2^n - 1``, so the model sees the grid ``j / (2^n - 1)`` its likelihood's bins are cut
for (``model.num_bits``, which must be the same).  At 8 bits nothing is quantised and the floats are
bit for bit those of the plain ``k / 255`` conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TAG_AUGMENT, TAG_EVAL = 14, 15  # seed tags: training batches, evaluation samples


def to_float(images: np.ndarray, num_bits: int = 8) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [0, 1], C-contiguous; quantised to ``num_bits`` bits
    when < 8.

    Contiguous, not the channels-last strides a transposed ``astype`` keeps: torch 2.13's CPU backward
    of the model corrupts memory (segfaults) on channels-last RGB batches of 48 px and more (the
    down-sampling shortcut's strided 1x1 convs on shifted slices), and NCHW is what the model documents.
    """
    if not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be in 1..8, got {num_bits}")
    if num_bits == 8:
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        x *= np.float32(1.0 / 255.0)
        return x
    levels = np.right_shift(images, 8 - num_bits)  # floor(k / 2^(8-n)), still uint8
    x = np.ascontiguousarray(levels.transpose(0, 3, 1, 2), dtype=np.float32)
    x /= np.float32(2 ** num_bits - 1)
    return x


@dataclass(frozen=True)
class Transform:
    """The input transforms of one loader (``data.num_bits``, ``data.binarize``; ``data.random_flips`` in
    training only)."""

    seed: int
    binarize: bool
    random_flips: bool
    num_bits: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.num_bits <= 8:
            raise ValueError(f"data.num_bits must be in 1..8, got {self.num_bits}")
        if self.binarize and self.num_bits != 8:
            raise ValueError("data.binarize needs data.num_bits=8 (binarisation draws from the 8-bit grey levels)")

    def train_batch(self, images: np.ndarray, epoch: int, rank: int, t: int) -> np.ndarray:
        """Training batch ``t`` of ``epoch`` on ``rank``: uint8 [B, H, W, C] -> float32 [B, C, H, W]."""
        x = to_float(images, self.num_bits)
        rng = np.random.default_rng([self.seed, epoch, rank, t, TAG_AUGMENT])
        if self.random_flips:
            flip = rng.random(len(x)) < 0.5
            x[flip] = x[flip, :, :, ::-1]
        if self.binarize:
            x = (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)
        return x

    def eval_batch(self, images: np.ndarray, sample_indices: np.ndarray) -> np.ndarray:
        """Evaluation images with their global sample indices: uint8 [B, H, W, C] -> float32 [B, C, H, W]."""
        x = to_float(images, self.num_bits)
        if self.binarize:
            for i, index in enumerate(sample_indices):
                rng = np.random.default_rng([self.seed, int(index), TAG_EVAL])
                x[i] = rng.random(x[i].shape, dtype=np.float32) < x[i]
        return x
