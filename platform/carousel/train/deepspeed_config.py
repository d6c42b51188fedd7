"""Job spec -> DeepSpeed config dict. Pure: unit tests check it without DeepSpeed."""

from __future__ import annotations

from typing import Any

from carousel.config import TrainConfig

_NEVER = 1 << 30  # DeepSpeed's own step printing is replaced by our progress lines


def deepspeed_config(t: TrainConfig, world_size: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world_size,
        "zero_optimization": {"stage": t.zero_stage},
        # check_grad_overflow: ZeRO 1/2 then skip (and count) a step whose gradients hold NaN/Inf
        # in bf16 as they already do in fp32 and fp16; the loop's guard relies on it.
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
        # The optimizer (torch AdamW) and LR schedule (schedule.py) are passed in as objects:
        # DeepSpeed's fused optimizers need CUDA ops, and ZeRO 1/2 partition a torch optimizer's
        # state just the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if t.grad_clip is not None:
        cfg["gradient_clipping"] = t.grad_clip
    return cfg


def backward_allreduce_needed(zero_stage: int, world_size: int) -> bool:
    """Whether DeepSpeed's engine should all-reduce the gradients after backward.

    At ZeRO 0 its "all-reduce" flattens every gradient into one buffer, reduces it and copies it
    back, even with one worker, where the average of one is itself: 1.5 % of a step of the
    benchmark model on one CPU thread, for bit-identical gradients (docs/performance.md,
    platform). ZeRO 1/2 reduce through their optimizer, which also partitions; they keep it.
    """
    return not (zero_stage == 0 and world_size == 1)
