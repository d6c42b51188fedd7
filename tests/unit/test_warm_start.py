"""run.init_from: which specs may continue a checkpoint, and the optimizer settings they bring."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from carousel.config import load_spec
from carousel.train.schedule import build_scheduler, lr_factor
from carousel.train.warm_start import (
    PERTURBABLE,
    WarmStartError,
    apply_hyperparameters,
    check_init_from,
    compatibility_problems,
    restart_safe,
)

JOB = Path(__file__).resolve().parents[2] / "jobs" / "lm-kjv-tiny.yaml"


def spec(*overrides):
    return load_spec(JOB, ["train.max_steps=100", *overrides])


def test_optimizer_settings_may_change_shapes_and_data_may_not():
    source, world = spec().model_dump(mode="json"), spec().scaling.num_workers
    assert compatibility_problems(source, world, spec("train.lr=0.01", "model.dropout=0.3", "run.name=x",
                                                  "train.max_steps=200", "train.grad_clip=0.5"), world) == []
    problems = compatibility_problems(source, world, spec("model.hidden=48", "model.embed=48", "train.bptt=16"), world + 1)
    assert any(p.startswith(f"scaling.num_workers: the checkpoint was written by {world} workers, this run has {world + 1}")
               for p in problems)
    assert any(p.startswith("model.hidden: the checkpoint has 64, this run 48") for p in problems)
    assert any(p.startswith("train.bptt:") for p in problems)
    assert len(problems) == 4  # num_workers, hidden, embed, bptt


def test_everything_pbt_may_perturb_is_restart_safe():
    assert all(restart_safe(p) for p in PERTURBABLE)
    assert not restart_safe("model.hidden") and not restart_safe("train.zero_stage") and not restart_safe("data.path")


def test_check_init_from_names_the_missing_file_and_the_fields(tmp_path):
    with pytest.raises(WarmStartError, match="no meta.json; not a Carousel checkpoint"):
        check_init_from(spec(f"run.init_from={tmp_path}"))
    (tmp_path / "meta.json").write_text(json.dumps({"spec": spec().model_dump(mode="json"),
                                                       "world_size": spec().scaling.num_workers}))
    check_init_from(spec(f"run.init_from={tmp_path}", "train.lr=0.02"))
    with pytest.raises(WarmStartError, match=r"model\.layers: the checkpoint has"):
        check_init_from(spec(f"run.init_from={tmp_path}", "model.layers=3"))


def test_new_rate_decay_and_betas_apply_at_the_restored_schedule_position():
    old, new = spec("train.lr=0.001", "train.weight_decay=0.0"), spec("train.lr=0.004", "train.weight_decay=0.1",
                                                                       "train.betas=[0.8,0.95]")
    w, b = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}], lr=0.001)
    sched = build_scheduler(opt, old.train)
    for _ in range(7):
        opt.step()
        sched.step()
    # What DeepSpeed's load_checkpoint does: the old run's optimizer and schedule state come back...
    opt2 = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=0.004)
    sched2 = build_scheduler(opt2, new.train)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.001 * lr_factor(7, old.train))
    # ...and the new run's settings go on top, seven steps into the schedule.
    apply_hyperparameters(SimpleNamespace(lr_scheduler=sched2), new.train)
    for i, g in enumerate(opt2.param_groups):
        assert g["lr"] == pytest.approx(0.004 * lr_factor(7, new.train))
        assert g["betas"] == (0.8, 0.95) and g["weight_decay"] == (0.1 if i == 0 else 0.0)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.004 * lr_factor(8, new.train))
