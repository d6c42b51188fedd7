"""Population Based Training over Carousel trials: the scheduler, and how a trial's generations are named.

Ray Tune's PBT exploits by restarting a weak trial from a strong trial's latest *Tune* checkpoint
with perturbed hyperparameters. A Carousel trial reports its Train checkpoints to Tune as such
(trial.py), so the restarted trial finds the strong trial's full state in ``ray.tune.get_checkpoint()``
and trains it on as a new Ray Train run with ``run.init_from`` (train/warm_start.py): the same
weights, optimizer moments, schedule position, data position and RNG streams, with the new settings.

Each such restart is a *generation* of the trial: its own Train run (``<trial>-g<hash>``) and its own
MLflow child run, because MLflow params are write-once and a generation's steps overlap the previous
generation's. Names are derived from the Tune checkpoint's path, so a search resumed after its driver
died finds the same Train run and child run again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from carousel.train.warm_start import PERTURBABLE
from carousel.tune.space import Choice, Grid, RandInt, Uniform


def mutations(space: dict[str, Any], only: list[str] | None = None) -> dict[str, Any]:
    """PBT's hyperparam_mutations: the space's dimensions PBT may change in a running trial.

    Choices and grids become lists (PBT then moves to a neighbouring value: multiplying a choice,
    as it does a Domain, would invent values); ranges stay Tune domains (resampled or scaled by
    the perturbation factors, then clamped by ``Clamp``)."""
    out = {}
    for path, dim in space.items():
        if path not in PERTURBABLE or (only is not None and path not in only):
            continue  # copied with the checkpoint on exploit, never perturbed
        out[path] = list(dim.values) if isinstance(dim, (Choice, Grid)) else dim.to_tune()
    return out


class Clamp:
    """custom_explore_fn: a perturbed value stays inside its dimension's range (PBT scales values
    by 1.2 or 0.8 without bounds; a dropout of 1.1 would fail the trial's spec)."""

    def __init__(self, space: dict[str, Any]):
        # Plain values: this object is pickled with the Tuner.
        self.bounds = {p: (d.low, d.high - 1 if isinstance(d, RandInt) else d.high)
                       for p, d in space.items() if p in PERTURBABLE and isinstance(d, (Uniform, RandInt))}

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for path, (low, high) in self.bounds.items():
            if path in config:
                config[path] = type(config[path])(min(max(config[path], low), high))
        return config


def build(search):
    """The PopulationBasedTraining scheduler of a search (time is the training step)."""
    from ray.tune.schedulers import PopulationBasedTraining

    spec = search.spec
    sch = spec.scheduler
    return PopulationBasedTraining(
        time_attr="step",
        perturbation_interval=perturbation_interval(search),
        hyperparam_mutations=mutations(spec.space, sch.mutate),
        quantile_fraction=sch.quantile_fraction,
        resample_probability=sch.resample_probability,
        perturbation_factors=tuple(sch.perturbation_factors),
        custom_explore_fn=Clamp(spec.space),
    )


def perturbation_interval(search) -> int:
    sch = search.spec.scheduler
    return sch.perturbation_interval or 2 * max(s.run.checkpoint_every for s in search.specs())


def owns(trial_id: str, run_name: str) -> bool:
    """Whether a Train run is one of this trial's generations."""
    return run_name == trial_id or run_name.startswith(f"{trial_id}-g")


def generation_run(trial_id: str, tune_checkpoint: str) -> str:
    """The Train run of the generation that starts from ``tune_checkpoint`` (another trial's state)."""
    return f"{trial_id}-g{hashlib.sha1(tune_checkpoint.encode()).hexdigest()[:8]}"


def train_run_for(trial_id: str, source_run: str | None, tune_checkpoint: str | None) -> tuple[str, bool]:
    """(Train run name, whether it starts from the Tune checkpoint) for a trial starting with
    ``tune_checkpoint`` (written by Train run ``source_run``), or with none (its first start).

    Its own checkpoint (a resumed search, a retried trial) means its own run goes on: Ray Train
    restores that run's latest checkpoint, which is at least as new. Another trial's means PBT
    exploited it: a new generation, continuing the other trial's state."""
    if tune_checkpoint is None or source_run is None:
        return trial_id, False
    if owns(trial_id, source_run):
        return source_run, False
    return generation_run(trial_id, tune_checkpoint), True
