"""Model FLOPs per image, counted by torch's ``FlopCounterMode``: the one FLOP counter of the project.

The engine (``tflops`` and ``mfu`` in metrics.jsonl), ``avi-train --dry-run`` and the benchmarks all call
:func:`count_flops`.  It runs one forward and one backward pass of a fresh CPU model on a random batch and
counts what torch's counter knows: convolutions, matrix products (linear maps, batched matmuls) and
attention, forward and backward separately (the backward is counted, not assumed to be 2x the forward).
Elementwise work (normalisation, activations, the depth-wise attention's multiply-and-sum, the
likelihood) is not counted.  The non-local blocks run on SDPA's math path without their zero-padding,
so attention is counted at its true widths; activation checkpointing is off (recomputation is not model
FLOPs).  Like any forward pass, counting draws from torch's global random generator (initial weights,
the batch, posterior noise).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .layers import NonLocalBlock
from .vae import AttentiveVAE


def count_flops(model_cfg: Any, batch: int = 2) -> dict[str, float]:
    """``{"forward_per_image", "train_per_image"}``: FLOPs of one image's forward pass and of its
    training step (forward + backward), counted on ``batch`` random images of the config's shape."""
    model = AttentiveVAE(dataclasses.replace(model_cfg, activation_checkpointing=False))
    for module in model.modules():
        if isinstance(module, NonLocalBlock):
            module.pad_for_fused_kernels = False  # this instance only: attention at its true widths
    x = torch.rand(batch, model_cfg.image_channels, model_cfg.image_size, model_cfg.image_size)
    if model_cfg.likelihood == "bernoulli":
        x = (x > 0.5).float()
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        loss = model(x, beta=1.0).loss
        forward = counter.get_total_flops()
        loss.backward()
        total = counter.get_total_flops()
    return {"forward_per_image": forward / batch, "train_per_image": total / batch}
