"""One trial: a Ray Tune function trainable that drives the same Ray Train + DeepSpeed run as `carousel train`.

This is the pattern Ray documents for Train v2 under Tune: the trial is a light driver process
(it holds no CPU; see runner.TRIAL_RESOURCES) that builds a TorchTrainer and calls ``fit()``; the
Train workers take the CPUs. ``TuneReportCallback`` forwards every ``ray.train.report`` of the
workers, i.e. every validation, to Tune, so the scheduler can stop a weak trial between two.

The Train run is named by the trial id under ``<storage>/<search>/train/``: a trial restarted by
``carousel tune --resume`` finds its run there and Ray Train continues it from its latest
checkpoint (the same as ``carousel train --resume``), writing into the same MLflow child run.
"""

from __future__ import annotations

from typing import Any


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """``config``: the sampled values by dotted path; ``context``: what runner.trial_context built."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from carousel.train.launcher import build_trainer
    from carousel.tune.spec import trial_spec
    from carousel.tune.tracking import open_child

    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(context["base"], config, trial_id, context["train_storage"])
    run_id = open_child(context, trial_id, spec, config)
    done = final_metrics(context["train_storage"], trial_id, spec.train.max_steps)
    if done is not None:
        # Restored by --resume, but its Train run had already ended (Tune's state, saved every
        # ~10 s, still called it running): tell Tune how it ended instead of starting Train again.
        ray.tune.report(done)
        return
    trainer = build_trainer(
        spec,
        trial_id,
        {"spec": spec.model_dump(mode="json"), "mlflow_run_id": run_id, "tracking_uri": context["tracking_uri"]},
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()  # errors fail the trial (the driver marks its run FAILED)


def final_metrics(train_storage: str, trial_id: str, max_steps: int) -> dict[str, Any] | None:
    """The metrics of the trial's last-step checkpoint when every rank finished writing it, else None."""
    import json

    from carousel.data.storage import Location
    from carousel.train import checkpoint as ckpt

    final = Location.parse(train_storage).join(trial_id, f"checkpoint-{max_steps:08d}")
    meta_loc = final.join(ckpt.META)
    if not meta_loc.exists():
        return None
    meta = json.loads(meta_loc.read_bytes())
    if not all(final.join(ckpt.manifest_name(r)).exists() for r in range(meta["world_size"])):
        return None
    return dict(meta["metrics"])
