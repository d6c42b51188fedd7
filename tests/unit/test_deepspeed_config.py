import math

import pytest

from carousel.config import TrainConfig
from carousel.train.deepspeed_config import backward_allreduce_needed, deepspeed_config
from carousel.train.schedule import lr_factor


def test_batch_sizes_and_precision():
    t = TrainConfig(max_steps=100, batch_size=8, grad_accum=4, precision="bf16", zero_stage=2, grad_clip=0.5)
    c = deepspeed_config(t, world_size=2)
    assert c["train_batch_size"] == 8 * 4 * 2
    assert c["train_micro_batch_size_per_gpu"] == 8 and c["gradient_accumulation_steps"] == 4
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["zero_optimization"]["stage"] == 2 and c["gradient_clipping"] == 0.5


def test_no_clipping_when_disabled():
    assert "gradient_clipping" not in deepspeed_config(TrainConfig(max_steps=10, grad_clip=None), 1)


def test_first_update_uses_the_full_rate_without_warmup():
    assert lr_factor(0, TrainConfig(max_steps=100)) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_warmup_then_decay_to_the_floor(schedule):
    t = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.2, schedule=schedule)
    f = [lr_factor(s, t) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay after warmup
    assert f[99] == pytest.approx(0.2)
    mid = lr_factor(10 + 89 // 2, t)
    p = 44 / 89
    assert mid == pytest.approx(0.2 + 0.8 * ((1 - p) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * p))), rel=1e-6)


def test_constant():
    t = TrainConfig(max_steps=50, warmup_steps=5, schedule="constant")
    assert [lr_factor(s, t) for s in (0, 4, 5, 49)] == [0.2, 1.0, 1.0, 1.0]


def test_bf16_on_a_cpu_without_bf16_arithmetic_is_warned_about():
    import torch

    from carousel.train.loop import slow_precision_warning

    cpu = torch.device("cpu")
    assert slow_precision_warning("fp32", cpu) is None
    assert slow_precision_warning("bf16", torch.device("cuda")) is None  # cuDNN's path, not oneDNN's
    expected = None if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "without bf16 arithmetic"
    got = slow_precision_warning("bf16", cpu)
    assert (got is None) if expected is None else (expected in got)


def test_only_a_lone_zero0_worker_skips_the_backward_allreduce():
    assert not backward_allreduce_needed(0, 1)
    assert backward_allreduce_needed(0, 2)  # data parallel: the average is needed
    assert backward_allreduce_needed(1, 1) and backward_allreduce_needed(2, 1)  # reduced by ZeRO's optimizer
