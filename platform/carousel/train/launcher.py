"""The driver side of `carousel train`: open the run, launch the Ray Train trainer, publish the model."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carousel.config import JobSpec
from carousel.data.shards import DataError, Dataset
from carousel.data.layout import StreamLayout
from carousel.ray_session import BackgroundFit, init_ray


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    best_checkpoint: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False


def ranking_metric(spec: JobSpec) -> str:
    """The validation metric the family's unit ranks checkpoints by (lower is better)."""
    from carousel.train.families import ranking_metric as family_metric

    return family_metric(spec.model.family)


def preflight(spec: JobSpec) -> None:
    """Checks that need the data but touch nothing: raise before Ray or MLflow start."""
    if spec.model.family == "ctc":
        from carousel.train.ctc_unit import preflight_ctc

        return preflight_ctc(spec)
    ds = Dataset(spec.data.path, verify_checksums=False)
    if ds.manifest.kind != "text":
        raise DataError(f"data.path: a {ds.manifest.kind} dataset; model.family lm needs `carousel prepare text`")
    t, world = spec.train, spec.scaling.num_workers
    for split in (spec.data.train_split, spec.data.valid_split, spec.data.test_split):
        StreamLayout(ds.split(split).tokens, world, t.batch_size, t.bptt).validate(f"data.path split {split!r}")


def build_trainer(spec: JobSpec, run_name: str, train_loop_config: dict[str, Any], callbacks: list | None = None):
    """The Ray Train trainer of one run. ``callbacks``: Ray Train callbacks, e.g. carousel tune's
    TuneReportCallback, which forwards each report of a trial's workers to Ray Tune.

    It is Ray's DataParallelTrainer (what TorchTrainer is) with Carousel's torch-free backend
    (process_group.py): building and running it loads no torch in this process or Train's controller."""
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from carousel.ray_session import split_worker_env, worker_env
    from carousel.train.process_group import ProcessGroupConfig, train_worker

    # How often Train's controller polls the workers (Ray's default 2 s), read from this process's
    # environment when the run starts. The loop trains on after a checkpoint only once the controller
    # has committed it, which it does at a poll: measured on a tiny 2-worker run, each checkpoint
    # stalled training 3-4 s at 2 s and 1-1.4 s at 1 s, and the run's end came 4-5 s sooner; the
    # controller's polls cost ~0.1 % of a 2-core machine more. A value the user set is kept.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    s = spec.scaling
    use_gpu = s.gpus_per_worker > 0
    resources = {"CPU": s.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = s.gpus_per_worker
    storage = storage_uri(spec.run.storage_path)
    _, env = split_worker_env(worker_env())  # the credentials are in the job's runtime env
    return DataParallelTrainer(
        train_worker,
        train_loop_config=train_loop_config,
        backend_config=ProcessGroupConfig(backend="nccl" if use_gpu else "gloo", env=env),
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement,
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=spec.run.max_failures),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.run.keep_best,
                checkpoint_score_attribute=ranking_metric(spec),
                checkpoint_score_order="min",
            ),
        ),
    )


class _Terminated(Exception):
    pass


class RunFailed(RuntimeError):
    """Training failed (retries used up, or an error retrying cannot fix). The run keeps its
    checkpoints and its MLflow run is FAILED; ``carousel train --resume NAME`` continues it."""

    def __init__(self, run_name: str, reason: str):
        super().__init__(f"run {run_name} FAILED: {reason}")
        self.run_name, self.reason = run_name, reason


def failure_reason(error: BaseException) -> str:
    """One readable line per failed worker from Ray Train's error, innermost cause first seen."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        lines = []
        for rank, exc in sorted(failures.items()):
            cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the worker's own exception
            text = str(cause).strip().splitlines()
            lines.append(f"worker rank {rank}: {type(cause).__name__}: {text[-1] if text else ''}")
        return "; ".join(lines)
    inner = getattr(error, "controller_failure", None) or error
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1] if text else ''}"


# Set by the handler: Ray Train catches and re-wraps exceptions raised inside fit(), so whether the
# run was stopped by a signal is remembered here rather than read off the exception's type.
_stopped_by: list[str] = []


def _raise_terminated(signum, frame):
    _stopped_by.append(signal.Signals(signum).name)
    raise _Terminated(signal.Signals(signum).name)


def storage_uri(storage_path: str) -> str:
    """The run storage as every node names it: a URI as given, a local path made absolute."""
    return storage_path if "://" in storage_path else os.path.abspath(storage_path)


def train(spec: JobSpec, address: str | None = None, tracking_uri: str | None = None) -> TrainOutcome:
    t0 = time.time()
    preflight(spec)
    embedded = init_ray(address)  # before anything imports ray: it fixes the auth mode at import
    import ray

    from carousel.train.capacity import wait_for_capacity

    # An embedded Ray is this machine and nothing will join it: no point waiting.
    wait_for_capacity(spec.scaling, 0 if embedded else spec.scaling.resources_timeout_s)

    from carousel.tracking.runs import close_run, free_name, open_run
    from carousel.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or spec.tracking.uri)
    tags = {}
    try:
        tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - a tag, not a requirement
        pass
    storage = spec.run.storage_path
    name = free_name(storage, spec.run_name)
    launch = uuid.uuid4().hex
    _stopped_by.clear()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    old_int = signal.signal(signal.SIGINT, _raise_terminated)
    status, step, record = "FAILED", None, None
    outcome = TrainOutcome(name, "", uri, status)
    try:
        # The Train controller and workers start first; the MLflow run is opened while they do.
        # Importing MLflow and opening its store cost the driver ~2 s, and nothing in a worker needs
        # the run before rank 0's first log line: it reads the id from the run record then
        # (tracking/runs.py wait_for_mlflow_run). Measured: docs/performance.md, start-up.
        trainer = build_trainer(
            spec, name,
            {"spec": spec.model_dump(mode="json"), "tracking_uri": uri, "run_name": name, "launch": launch,
             "run_storage": storage_uri(storage)},
        )
        fit = BackgroundFit(trainer)  # SIGTERM (ray job stop) is handled at once
        record, resumed = open_run(spec, uri, tags, name=name, launch=launch)
        outcome.mlflow_run_id, outcome.resumed = record.mlflow_run_id, resumed
        print(
            f"{'resuming' if resumed else 'starting'} run {record.name} | MLflow run {record.mlflow_run_id} | "
            f"tracking {uri}",
            flush=True,
        )
        result = fit.wait()
        metrics = dict(result.metrics or {})
        step = metrics.get("step")
        outcome.metrics = metrics
        best = _best_checkpoint(result, ranking_metric(spec))
        outcome.best_checkpoint = best
        if metrics.get("halted"):
            status = "HALTED"
        else:
            if best is not None:
                outcome.model = publish_model(spec, uri, record.mlflow_run_id, best, metrics)
            status = "FINISHED"
    except (KeyboardInterrupt, _Terminated):
        status = "KILLED"
        raise
    except Exception as e:
        if _stopped_by or record is None:  # no MLflow run: nothing to mark; the workers end with this driver
            raise
        raise RunFailed(record.name, failure_reason(e)) from e
    finally:
        if _stopped_by:
            status = "KILLED"
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if record is not None:
            close_run(record, storage, status, step)
        outcome.status = status
        outcome.seconds = time.time() - t0
        import mlflow  # callers in this process (carousel.cli, tests) read the run back through it

        mlflow.set_tracking_uri(uri)
    return outcome


def _best_checkpoint(result, metric: str) -> str | None:
    scored = [(m.get(metric, float("inf")), c.path) for c, m in (result.best_checkpoints or [])]
    if not scored:
        return result.checkpoint.path if result.checkpoint else None
    return min(scored)[1]


def publish_model(spec: JobSpec, tracking_uri: str, run_id: str, checkpoint_path: str, metrics: dict) -> dict:
    """Log the best checkpoint's model to the run, register it, print a sample."""
    import mlflow

    if spec.model.family == "ctc":
        from carousel.tracking.asr_model import publish_asr

        return publish_asr(spec, tracking_uri, run_id, checkpoint_path, metrics)

    from carousel.train import checkpoint as ckpt
    from carousel.tracking.lm_model import log_and_register

    ckpt.verify(checkpoint_path, ckpt.read_meta(checkpoint_path)["world_size"])
    meta = ckpt.read_meta(checkpoint_path)
    model_dir = str(Path(checkpoint_path) / ckpt.MODEL_DIR)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    samples_at = Path(model_dir) / ckpt.SAMPLES
    if samples_at.exists():  # rank 0 wrote them with the checkpoint: no model is loaded here
        samples = json.loads(samples_at.read_text(encoding="utf-8"))
    else:  # a checkpoint from before samples travelled with it
        from carousel.models.lm import published_samples
        from carousel.tracking.lm_model import LoadedLM

        lm = LoadedLM(model_dir)
        samples = published_samples(lm.model, lm.tokenizer, spec.tracking.sample_prompts, spec.tracking.sample_tokens,
                                    spec.seed)
    best_metrics = {"val_ppl": meta["metrics"]["val_ppl"], "step": meta["step"]}
    for k in ("test_ppl",):
        if k in metrics:
            best_metrics[k] = metrics[k]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_text("\n\n".join(samples), "samples.txt")
        mlflow.log_dict(spec.model_dump(mode="json"), "spec.yaml")
        mlflow.log_artifact(str(Path(model_dir) / "tokenizer.json"))
        out = log_and_register(model_dir, spec.tracking.registered_model, spec.tracking.alias, best_metrics)
    out["samples"] = samples
    out["best_step"] = meta["step"]
    out["best_val_ppl"] = meta["metrics"]["val_ppl"]
    return out
