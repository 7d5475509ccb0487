"""Optimizers (Adamax as in the paper, AdamW) and the step guard that skips bad steps.

Skipping a step has to leave everything untouched: weights, optimizer moments and step counts.
DeepSpeed already discards a step whose gradients are not finite in its ZeRO, bf16 and fp16
optimizers (it reports it through ``engine.was_step_applied()``).  What it does not do is skip
finite steps whose gradient norm exceeds a threshold, nor non-finite ones under ZeRO-0 fp32 (no
wrapper at all).  So the torch optimizer handed to DeepSpeed is a guarded subclass: when DeepSpeed
calls its ``step`` (possibly once per parameter group), the guard looks at the global gradient
norm DeepSpeed has just computed (before clipping) or, without a wrapper, the norm the engine
computed after the backward pass, and returns without touching anything when the step is bad.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from avi_scale.config import OptimConfig


class StepGuard:
    """Decides, once per optimizer step, whether to apply it."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.norm_source: Optional[Callable[[], float]] = None
        self.pending_norm: Optional[float] = None  # set by the engine when no wrapper computes one
        self.force_skip = False  # set by the engine when the loss was not finite on some rank
        self.called = False
        self.skipped = False
        self.norm = float("nan")

    def begin(self, force_skip: bool, pending_norm: Optional[float] = None) -> None:
        self.force_skip = force_skip
        self.pending_norm = pending_norm
        self.called = False
        self.skipped = False
        self.norm = float("nan")

    def allow(self) -> bool:
        """Called from the optimizer's step; True when the update may proceed."""
        if not self.called:
            self.called = True
            if self.pending_norm is not None:
                self.norm = self.pending_norm
            elif self.norm_source is not None:
                self.norm = float(self.norm_source())
            bad_norm = not math.isfinite(self.norm) or (self.threshold > 0 and self.norm > self.threshold)
            self.skipped = self.force_skip or bad_norm
        return not self.skipped


class _Guarded:
    """Mixin for torch optimizers: ``step`` consults ``self.guard`` first."""

    guard: StepGuard

    def step(self, closure=None):  # noqa: D102 - same contract as torch.optim.Optimizer.step
        if not self.guard.allow():
            return None
        return super().step(closure)


class GuardedAdamax(_Guarded, torch.optim.Adamax):
    pass


class GuardedAdamW(_Guarded, torch.optim.AdamW):
    pass


def decay_mask(model: nn.Module) -> dict[str, bool]:
    """L2 weight decay on convolution kernels only (``*.weight`` with >= 2 dims), as the paper's
    kernel regularizer; not on biases, gains, norms, attention scales or the learned constant."""
    return {n: (n.endswith(".weight") and p.dim() >= 2) for n, p in model.named_parameters()}


def build_optimizer(model: nn.Module, o: OptimConfig, guard: StepGuard) -> torch.optim.Optimizer:
    mask = decay_mask(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if mask[n]], "weight_decay": o.weight_decay},
        {"params": [p for n, p in params if not mask[n]], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    cls = GuardedAdamax if o.optimizer == "adamax" else GuardedAdamW
    # foreach=False: DeepSpeed steps one flat fp32 partition per group, nothing to batch.
    opt = cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=False)
    opt.guard = guard
    return opt


def grad_norm(params: list[torch.Tensor]) -> float:
    """Global L2 norm of the gradients of replicated parameters (ZeRO-0: identical on every rank
    after DeepSpeed's all-reduce, so no communication)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
