"""Learning-rate schedules as pure functions of the optimizer step.

Hand-written rather than DeepSpeed's WarmupCosineLR/WarmupDecayLR: those apply lr 0 to the first
update (they start "before" step 0) and force at least two warmup steps. A ``LambdaLR`` over this
function gives the first update its intended rate, and DeepSpeed still saves and restores the
scheduler's state with the engine.
"""

from __future__ import annotations

import math

from carousel.config import TrainConfig


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of ``t.lr`` for the update made at optimizer step ``step`` (0-based)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps - 1))
    if t.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * shape


def build_scheduler(optimizer, t: TrainConfig):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
