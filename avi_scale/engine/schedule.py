"""Learning-rate and KL-weight schedules as pure functions of the step.

Being functions of the step alone, they need no state in the checkpoint: a resumed run recomputes
the same values.  ``step`` is the 0-based index of the optimizer step about to be taken.
"""

from __future__ import annotations

import math

from avi_scale.config import OptimConfig, TrainConfig


def learning_rate(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warm-up from ``min_lr`` to ``lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr`` over the remaining steps, or, with ``cosine_restarts``, cosine cycles whose first
    period is ``restart_period_steps`` (0: the whole remainder) and each next one ``restart_mult``
    times longer (SGDR)."""
    if step < o.warmup_steps:
        return o.min_lr + (o.lr - o.min_lr) * step / o.warmup_steps
    t = step - o.warmup_steps
    period = float(total_steps - o.warmup_steps)
    if o.cosine_restarts and o.restart_period_steps > 0:
        period = float(o.restart_period_steps)
        while t >= period:
            t -= period
            period *= o.restart_mult
    if period <= 0:
        return o.lr
    frac = min(t / period, 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + math.cos(math.pi * frac))


def kl_beta(step: int, t: TrainConfig) -> float:
    """KL warm-up: beta rises linearly from ``kl_beta_min`` to 1 over ``kl_warmup_steps``."""
    if t.kl_warmup_steps <= 0 or step >= t.kl_warmup_steps:
        return 1.0
    return t.kl_beta_min + (1.0 - t.kl_beta_min) * step / t.kl_warmup_steps
