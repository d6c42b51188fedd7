"""One trial: a Ray Tune function trainable that drives the same Ray Train + DeepSpeed run as `carousel train`.

This is the pattern Ray documents for Train v2 under Tune: the trial is a light driver process
(it holds no CPU; see runner.TRIAL_RESOURCES) that builds the Train trainer and calls ``fit()``; the
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
    if context.get("pbt"):
        return run_pbt_trial(config, context, trial_id)
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


def final_metrics(train_storage: str, run_name: str, max_steps: int) -> dict[str, Any] | None:
    """The metrics of the Train run's last-step checkpoint when every rank finished writing it, else None."""
    import json

    from carousel.data.storage import Location
    from carousel.train import checkpoint as ckpt

    final = Location.parse(train_storage).join(run_name, f"checkpoint-{max_steps:08d}")
    meta_loc = final.join(ckpt.META)
    if not meta_loc.exists():
        return None
    meta = json.loads(meta_loc.read_bytes())
    if not all(final.join(ckpt.manifest_name(r)).exists() for r in range(meta["world_size"])):
        return None
    return dict(meta["metrics"])


def location(checkpoint) -> str:
    """A checkpoint as a path or URI that ray.train.Checkpoint (and so run.init_from) reads back."""
    import pyarrow.fs

    if checkpoint.filesystem is None or isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return f"{checkpoint.filesystem.type_name}://{checkpoint.path}"


def run_pbt_trial(config: dict[str, Any], context: dict[str, Any], trial_id: str) -> None:
    """A PBT trial: its Train run reports each checkpoint to Tune (a copy, so PBT can clone it
    whatever the source trial's Train run keeps); started from another trial's checkpoint, it is
    a new generation that continues that state with this trial's (perturbed) settings."""
    import threading

    import ray.tune
    from ray.util.queue import Empty, Queue

    from carousel.train import checkpoint as ckpt
    from carousel.train.launcher import build_trainer
    from carousel.tune import pbt
    from carousel.tune.forward import ForwardReports
    from carousel.tune.spec import trial_spec
    from carousel.tune.tracking import open_child

    start, meta = ray.tune.get_checkpoint(), None
    if start is not None:
        with start.as_directory() as d:
            meta = ckpt.read_meta(d)
    source_run = meta["spec"]["run"]["name"] if meta else None
    run_name, continues = pbt.train_run_for(trial_id, source_run, start.path if start else None)
    spec = trial_spec(context["base"], config, run_name, context["train_storage"],
                      init_from=location(start) if continues else None)
    if continues and meta["step"] >= spec.train.max_steps:
        # PBT cloned a trial that had already trained to the end: nothing is left to train.
        ray.tune.report(dict(meta["metrics"]))
        return
    lineage = None
    if continues:
        lineage = {"source_trial": source_run.split("-g")[0], "source_run": source_run, "source_step": meta["step"],
                   "source_run_id": meta.get("mlflow_run_id")}
    run_id = open_child(context, trial_id, spec, config, lineage)
    done = final_metrics(context["train_storage"], run_name, spec.train.max_steps)
    if done is not None:
        ray.tune.report(done)
        return

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    fitting, failures = threading.Event(), []
    fitting.set()

    def forward() -> None:
        while fitting.is_set() or not reports.empty():
            try:
                metrics, checkpoint = reports.get(timeout=0.5)
            except Empty:
                continue
            if failures:
                continue  # keep draining: the controller blocks on a full queue
            try:
                if checkpoint is None:
                    ray.tune.report(metrics)
                else:
                    with checkpoint.as_directory() as d:
                        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(d))
            except BaseException as e:  # noqa: BLE001 - raised in the trial's thread below
                failures.append(e)

    forwarder = threading.Thread(target=forward, name="carousel-pbt-reports", daemon=True)
    forwarder.start()
    trainer = build_trainer(
        spec,
        run_name,
        {"spec": spec.model_dump(mode="json"), "mlflow_run_id": run_id, "tracking_uri": context["tracking_uri"]},
        callbacks=[ForwardReports(reports)],
    )
    try:
        trainer.fit()
    finally:
        fitting.clear()
        forwarder.join()
    if failures:
        raise failures[0]
