"""Starting a run from another run's checkpoint: ``run.init_from``.

The new run takes everything the checkpoint holds (weights, optimizer moments, LR-schedule position,
each rank's data position and RNG streams, the step) and continues exactly as the old run would
have, except for the settings it changes. That is what Population Based Training's exploit needs (a
weak trial continues from a strong trial's state with perturbed hyperparameters), and what a user
needs to branch a run with a new learning rate without losing its progress.

Only settings that a running optimizer can take mid-way may differ (RESTART_SAFE); everything the
checkpoint's shapes, partitioning or data position depend on must match, and the run refuses to
start otherwise, naming each field.
"""

from __future__ import annotations

from typing import Any

from carousel.config import JobSpec, flatten

# Fields a continued run may change. The optimizer's param groups and the LR schedule's base rate
# are re-applied after the checkpoint is loaded (apply_hyperparameters); dropout and gradient
# clipping are read from the spec when the model and engine are built; the rest is bookkeeping.
RESTART_SAFE_PREFIXES = ("run.", "tracking.", "name")
RESTART_SAFE = {
    "train.lr", "train.weight_decay", "train.betas", "train.grad_clip", "train.min_lr_ratio",
    "train.max_steps", "train.schedule", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.halt_at_step", "train.max_nonfinite_steps", "train.inject_nonfinite_steps",
    "model.dropout", "model.embed_dropout", "model.input_dropout", "model.output_dropout",
    "seed",  # the RNG streams come from the checkpoint
    "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.placement", "scaling.resources_timeout_s",
    "speech.decoder", "speech.beam_width", "speech.lm", "speech.lm_weight", "speech.word_bonus",
    "speech.librivox", "speech.sample_rows", "speech.eval_utterances",
}
# What PBT may perturb: numbers a running optimizer or model takes without a rebuild.
PERTURBABLE = ("train.lr", "train.weight_decay", "train.grad_clip", "train.min_lr_ratio",
               "model.dropout", "model.embed_dropout", "model.input_dropout", "model.output_dropout")


class WarmStartError(ValueError):
    pass


def restart_safe(path: str) -> bool:
    return path in RESTART_SAFE or path.startswith(RESTART_SAFE_PREFIXES)


def compatibility_problems(source: dict[str, Any], source_world: int, spec: JobSpec, world: int) -> list[str]:
    """Why ``spec`` cannot continue a checkpoint written under ``source`` (a job spec dict) by
    ``source_world`` workers: one line per field, empty when it can."""
    problems = []
    if source_world != world:
        problems.append(f"scaling.num_workers: the checkpoint was written by {source_world} workers, this run has {world}")
    old, new = flatten(source), flatten(spec.model_dump(mode="json"))
    for path in sorted(set(old) | set(new)):
        if restart_safe(path) or path == "scaling.num_workers":
            continue
        if old.get(path) != new.get(path):
            problems.append(f"{path}: the checkpoint has {old.get(path)!r}, this run {new.get(path)!r}")
    return problems


def check_init_from(spec: JobSpec) -> None:
    """Before Ray starts: ``run.init_from`` exists, is a Carousel checkpoint, and this spec can
    continue it. (The workers check every file's sha256 again before loading.)"""
    import json

    from carousel.data.storage import Location
    from carousel.train import checkpoint as ckpt

    where = spec.run.init_from
    if where is None:
        return
    meta_at = Location.parse(where).join(ckpt.META)
    try:
        meta = json.loads(meta_at.read_bytes())
    except FileNotFoundError:
        raise WarmStartError(f"run.init_from {where}: no {ckpt.META}; not a Carousel checkpoint") from None
    except (OSError, ValueError) as e:
        raise WarmStartError(f"run.init_from {where}: cannot read {ckpt.META}: {e}") from None
    problems = compatibility_problems(meta.get("spec", {}), meta.get("world_size", 0), spec, spec.scaling.num_workers)
    if problems:
        raise WarmStartError(f"run.init_from {where}: this spec cannot continue it:\n  " + "\n  ".join(problems))


def apply_hyperparameters(engine, t) -> None:
    """After ``engine.load_checkpoint``: the optimizer's groups hold the old run's rate, decay and
    betas, and the schedule its base rate. Put this run's in, at the restored schedule position."""
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups  # the base optimizer's (ZeRO wraps it, sharing them)
    for i, group in enumerate(groups):
        group["weight_decay"] = t.weight_decay if i == 0 else 0.0  # group 1: biases and embeddings
        group["betas"] = tuple(t.betas)
        group["initial_lr"] = t.lr
    scheduler.base_lrs = [t.lr] * len(groups)
    # LambdaLR's own formula, at the step the checkpoint reached (get_lr() warns outside step()).
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
