"""The driver of `carousel tune`: Ray Tune over Ray Train trials, MLflow parent/child runs, the best model.

Layout under the base spec's ``run.storage_path``::

    <search>/                      Ray Tune's experiment (experiment state, one directory per trial)
    <search>/carousel-search.json  the search record: its MLflow parent run, resolved specs, status
    <search>/train/<trial id>/     each trial's Ray Train run (checkpoint-<step>/ as in `carousel train`)

``carousel tune --resume NAME`` restores the Tune experiment (``Tuner.restore``): finished trials
stay finished, unfinished and errored ones continue, each from its Train run's latest checkpoint
and into its own MLflow child run, so no trial and no run is duplicated.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carousel.config import ScalingConfig, SpecError, spec_from_dict
from carousel.ray_session import init_ray
from carousel.tune.spec import Search

# A trial is only the driver of its Train run: it asks for (almost) nothing, so the Train
# workers can take every CPU. Tune refuses an empty request; a sliver of the head node's own
# resource is nothing a worker wants, and it keeps trial drivers (and their Train controllers)
# on the head node, away from worker nodes that may be preempted (Ray's advice for Train in Tune).
TRIAL_RESOURCES = {"node:__internal_head__": 0.001}


class SearchError(RuntimeError):
    pass


def plan_concurrency(cluster: dict[str, float], scaling: ScalingConfig, requested: int | None) -> int:
    """How many trials run at once: as many as the cluster's CPUs (and GPUs) hold, at most ``requested``."""
    cpus = scaling.num_workers * scaling.cpus_per_worker
    fit = int(cluster.get("CPU", 0) // cpus)
    if scaling.gpus_per_worker > 0:
        fit = min(fit, int(cluster.get("GPU", 0) // (scaling.num_workers * scaling.gpus_per_worker)))
    if fit < 1:
        need = f"{cpus} CPUs" + (f" and {scaling.num_workers * scaling.gpus_per_worker:g} GPUs" if scaling.gpus_per_worker else "")
        have = f"{cluster.get('CPU', 0):g} CPUs" + (f" and {cluster.get('GPU', 0):g} GPUs" if scaling.gpus_per_worker else "")
        raise SpecError([f"scaling: one trial needs {need} (num_workers x per worker); the cluster has {have}"])
    return min(fit, requested) if requested else fit


def _seed(search: Search) -> int:
    return search.spec.search.seed if search.spec.search.seed is not None else search.base.seed


def build_scheduler(search: Search, record):
    sch = search.spec.scheduler
    if sch.kind == "pbt":
        from carousel.tune import pbt

        return pbt.build(search)
    if sch.kind != "asha":
        return None  # FIFO: every trial runs to its end
    from carousel.tune.scheduler import ChildHistory, ResumableASHA

    # Tune's time is the training step the loop reports with each validation.
    return ResumableASHA(ChildHistory(record.tracking_uri, record.experiment_id, record.parent_run_id, search.metric),
                         time_attr="step", max_t=search.max_steps, grace_period=search.grace_period,
                         reduction_factor=sch.reduction_factor, brackets=sch.brackets)


def build_search_alg(search: Search, concurrency: int):
    if search.spec.search.kind == "optuna":
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=_seed(search))), concurrency)
    from ray.tune.search import BasicVariantGenerator

    # Tune ignores TuneConfig.max_concurrent_trials for a generator passed in: it takes its own limit.
    return BasicVariantGenerator(random_state=_seed(search), max_concurrent=concurrency)


def train_storage(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}/train"


def trial_context(record, search: Search) -> dict[str, Any]:
    """Everything a trial needs besides its sampled values (plain data: it travels to the trial actor)."""
    return {
        "base": search.base.model_dump(mode="json"),
        "search": record.name,
        "train_storage": train_storage(record.storage_path, record.name),
        "tracking_uri": record.tracking_uri,
        "experiment_id": record.experiment_id,
        "parent_run_id": record.parent_run_id,
        "pbt": search.spec.scheduler.kind == "pbt",
    }


# ----------------------------------------------------------------------------- results


TRIAL_STATUSES = ("FINISHED", "STOPPED_EARLY", "FAILED", "UNFINISHED")


@dataclass
class TrialRow:
    trial_id: str
    status: str  # FINISHED | STOPPED_EARLY | FAILED | UNFINISHED
    values: dict[str, Any]
    step: int | None = None
    best: float | None = None  # the best value of the search metric the trial reported
    run_id: str | None = None
    error: str | None = None


def stopped_early(last_step: int | None, max_steps: int) -> bool:
    """A trial that completed before its last training step was stopped by the scheduler."""
    return last_step is not None and last_step < max_steps


def trial_status(error: bool, child_status: str | None, child_tags: dict[str, str]) -> str:
    """A trial's outcome from Tune's error and what the driver wrote to its MLflow run (pure)."""
    if error:
        return "FAILED"
    if child_status == "FINISHED":
        return "STOPPED_EARLY" if child_tags.get("carousel.stopped_early") == "true" else "FINISHED"
    if child_status == "FAILED":
        return "FAILED"
    return "UNFINISHED"


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    scored = [r for r in rows if r.best is not None and math.isfinite(r.best) and r.status != "FAILED"]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda r: (sign * r.best, r.trial_id))


def best_checkpoint(run_dir: str, metric: str, mode: str = "min") -> tuple[str, dict] | None:
    """The trial's kept checkpoint with the best ``metric`` that verifies completely."""
    from carousel.train import checkpoint as ckpt

    found = []
    for d in sorted(Path(run_dir).glob("checkpoint-*")):
        try:
            meta = ckpt.read_meta(d)
            ckpt.verify(d, meta["world_size"])
        except (ckpt.CheckpointError, ValueError, KeyError):
            continue
        value = meta.get("metrics", {}).get(metric)
        if value is not None and math.isfinite(value):
            found.append(((value if mode == "min" else -value), meta["step"], str(d), meta))
    if not found:
        return None
    _, _, path, meta = min(found)
    return path, meta


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def format_table(rows: list[TrialRow], paths: list[str], metric: str, best_id: str | None) -> str:
    """Plain fixed-width text (not rich): captured logs and job logs keep every column."""
    head = ["trial", "status", *paths, "step", f"best {metric}", "mlflow run"]
    body = [[("* " if r.trial_id == best_id else "  ") + r.trial_id, r.status,
             *[_fmt(r.values.get(p)) for p in paths], _fmt(r.step), _fmt(r.best), (r.run_id or "-")[:12]]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *map(line, body)]
    if best_id:
        out.append("* best trial")
    return "\n".join(out)


@dataclass
class SearchOutcome:
    name: str
    status: str  # FINISHED | FAILED | KILLED
    parent_run_id: str
    tracking_uri: str
    storage_path: str
    metric: str
    rows: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    model: dict[str, Any] = field(default_factory=dict)
    table: str = ""
    seconds: float = 0.0
    resumed: bool = False
    concurrency: int = 0


def _rows(results, children: dict[str, Any], search: Search) -> list[TrialRow]:
    rows = []
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id") or Path(r.path).name
        child = children.get(trial_id)
        best = None
        df = r.metrics_dataframe
        if df is not None and search.metric in df and len(df[search.metric].dropna()):
            col = df[search.metric].dropna()
            best = float(col.min() if search.spec.mode == "min" else col.max())
        elif search.metric in (r.metrics or {}):
            best = float(r.metrics[search.metric])
        values = {p: (r.config or {}).get(p) for p in search.spec.space}
        status = trial_status(r.error is not None, child.info.status if child else None,
                              child.data.tags if child else {})
        rows.append(TrialRow(trial_id, status, values, (r.metrics or {}).get("step"), best,
                             child.info.run_id if child else None,
                             str(r.error).strip().splitlines()[-1] if r.error else None))
    return sorted(rows, key=lambda x: x.trial_id)


# ----------------------------------------------------------------------------- signals


class _Terminated(Exception):
    pass


_stopped_by: list[str] = []


def _on_sigterm(signum, frame):
    """SIGTERM (``ray job stop``) ends the search the way Ctrl-C does in Tune: trials stop, the
    experiment state is saved, the search is resumable. Tune listens for SIGINT/SIGUSR1 only."""
    _stopped_by.append(signal.Signals(signum).name)
    if callable(signal.getsignal(signal.SIGUSR1)):
        signal.raise_signal(signal.SIGUSR1)  # Tune's own handler: a graceful end of tuner.fit()
    else:
        raise _Terminated(signal.Signals(signum).name)


# ----------------------------------------------------------------------------- the search


def _make_tuner(search: Search, record, concurrency: int, resume: bool):
    from ray import tune

    from carousel.tune.callbacks import TrialRuns, trial_dirname
    from carousel.tune.space import param_space
    from carousel.tune.trial import run_trial

    storage = record.storage_path
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=trial_context(record, search)),
                                    TRIAL_RESOURCES)
    if resume:
        return tune.Tuner.restore(f"{storage.rstrip('/')}/{record.name}", trainable,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(search.spec.space),
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.spec.mode, num_samples=search.spec.num_samples,
            scheduler=build_scheduler(search, record), search_alg=build_search_alg(search, concurrency),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=record.name, storage_path=storage,
            callbacks=[TrialRuns(record.tracking_uri, record.experiment_id, record.parent_run_id, search.max_steps)],
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train retries inside a trial
            # PBT's trials report their Train checkpoints to Tune (trial.py); a strong trial's may be
            # cloned up to a perturbation interval after it was reported, so keep a few.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if search.spec.scheduler.kind == "pbt" else None),
            verbose=1,
        ),
    )


def run_search(search: Search, address: str | None = None, tracking_uri: str | None = None,
               resume_record=None) -> SearchOutcome:
    t0 = time.time()
    init_ray(address)  # before anything imports ray: it fixes the auth mode at import
    import ray

    from carousel.tracking.store import resolve_tracking_uri
    from carousel.tune import tracking

    base = search.base
    storage = base.run.storage_path
    concurrency = plan_concurrency(ray.cluster_resources(), base.scaling, search.spec.max_concurrent)
    if resume_record is None:
        tags = {}
        try:
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
        except Exception:  # noqa: BLE001 - a tag, not a requirement
            pass
        uri = resolve_tracking_uri(tracking_uri or base.tracking.uri)
        record = tracking.open_parent(search, uri, storage, tags)
    else:
        record = resume_record
        tracking.reopen_parent(record)
    uri = record.tracking_uri
    print(f"{'resuming' if resume_record else 'starting'} search {record.name} | {search.spec.num_samples} samples, "
          f"{concurrency} at a time | scheduler {search.spec.scheduler.kind} | search {search.spec.search.kind} | "
          f"metric {search.metric} ({search.spec.mode}) | MLflow parent run {record.parent_run_id} | tracking {uri}",
          flush=True)

    _stopped_by.clear()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    old_usr1 = signal.getsignal(signal.SIGUSR1)
    outcome = SearchOutcome(record.name, "FAILED", record.parent_run_id, uri, storage, search.metric,
                            resumed=resume_record is not None, concurrency=concurrency)
    status = "FAILED"
    try:
        tuner = _make_tuner(search, record, concurrency, resume_record is not None)
        try:
            results = tuner.fit()
        finally:
            signal.signal(signal.SIGUSR1, old_usr1)  # Tune's handler stays behind; the search is past it
        children = tracking.current_children(tracking.child_runs(uri, record.experiment_id, record.parent_run_id))
        rows = _rows(results, children, search)
        unfinished = [r for r in rows if r.status == "UNFINISHED"]
        outcome.rows = rows
        outcome.best = pick_best(rows, search.spec.mode)
        if _stopped_by or unfinished:
            status = "KILLED"
            for r in unfinished:
                if r.run_id:
                    tracking.close_child(uri, r.run_id, "KILLED", step=r.step, reason="search interrupted; resumable")
        elif outcome.best is None:
            status = "FAILED"
        else:
            outcome.model = _publish(search, record, outcome.best)
            status = "FINISHED"
        outcome.table = format_table(rows, list(search.spec.space), search.metric,
                                     outcome.best.trial_id if outcome.best else None)
        _log_results(record, outcome)
    except BaseException:
        status = "KILLED" if _stopped_by or not isinstance(sys.exc_info()[1], Exception) else "FAILED"
        _close_open_children(record, status)
        raise
    finally:
        if _stopped_by:
            status = "KILLED"
        signal.signal(signal.SIGTERM, old_term)
        best = {}
        if outcome.best is not None:
            best = {"trial_id": outcome.best.trial_id, "run_id": outcome.best.run_id, search.metric: outcome.best.best,
                    "values": outcome.best.values, **{k: v for k, v in outcome.model.items() if k in ("version", "model_uri")}}
        tracking.close_parent(record, status, best)
        outcome.status = status
        outcome.seconds = time.time() - t0
    return outcome


def _close_open_children(record, status: str) -> None:
    """After the driver failed or was stopped: no child run may stay RUNNING."""
    from carousel.tune import tracking

    try:
        for run in tracking.child_runs(record.tracking_uri, record.experiment_id, record.parent_run_id):
            if run.info.status == "RUNNING":
                tracking.close_child(record.tracking_uri, run.info.run_id, status,
                                     reason="search interrupted; resumable" if status == "KILLED" else "search failed")
    except Exception:  # noqa: BLE001 - the original error matters more than this bookkeeping
        pass


def _publish(search: Search, record, best: TrialRow) -> dict[str, Any]:
    """Log the best trial's best checkpoint as a model in its child run; register it, move the alias."""
    from carousel.train.launcher import publish_model

    from carousel.tune.pbt import owns

    root = Path(train_storage(record.storage_path, record.name))
    # The trial's Train runs: one, or one per PBT generation.
    run_dirs = [d for d in sorted(root.glob(f"{best.trial_id}*")) if owns(best.trial_id, d.name)]
    found = [f for d in run_dirs if (f := best_checkpoint(str(d), search.metric, search.spec.mode))]
    if not found:
        raise SearchError(f"trial {best.trial_id}: no complete checkpoint under {root}/{best.trial_id}* to publish")
    sign = 1 if search.spec.mode == "min" else -1
    path, meta = min(found, key=lambda f: (sign * f[1]["metrics"][search.metric], f[1]["step"]))
    spec = spec_from_dict(meta["spec"], f"{path}/meta.json")
    # The child run of the generation that wrote the checkpoint.
    out = publish_model(spec, record.tracking_uri, meta.get("mlflow_run_id") or best.run_id, path, meta.get("metrics", {}))
    out["checkpoint"] = path
    return out


def _log_results(record, outcome: SearchOutcome) -> None:
    from carousel.tracking.store import client

    c = client(record.tracking_uri)
    rid = record.parent_run_id
    rows = [{"trial_id": r.trial_id, "status": r.status, **r.values, "step": r.step,
             f"best_{outcome.metric}": r.best, "run_id": r.run_id, "error": r.error} for r in outcome.rows]
    c.log_dict(rid, rows, "trials.json")
    c.log_text(rid, outcome.table + "\n", "trials.txt")
    for status in TRIAL_STATUSES:  # every one, so a resumed search overwrites its earlier counts
        c.set_tag(rid, f"carousel.trials.{status.lower()}", str(sum(r.status == status for r in outcome.rows)))
    if outcome.best is not None:
        c.log_metric(rid, f"best_{outcome.metric}", outcome.best.best)
        c.set_tag(rid, "carousel.best_trial", outcome.best.trial_id)
        if outcome.best.run_id:
            c.set_tag(rid, "carousel.best_run_id", outcome.best.run_id)
        for p, v in outcome.best.values.items():
            c.set_tag(rid, f"best.{p}", str(v))
        if outcome.model.get("registered_model"):
            c.set_tag(rid, "carousel.registered_model",
                      f"{outcome.model['registered_model']}/{outcome.model['version']}")


def resume_record(storage_path: str, name: str):
    """The record of a search to resume, or a SearchError saying why it cannot be."""
    from carousel.tune.tracking import SearchRecord

    record = SearchRecord.load(storage_path, name)
    if record is None:
        raise SearchError(f"--resume {name}: no search named {name!r} under {storage_path}")
    if record.status == "FINISHED":
        raise SearchError(f"--resume {name}: the search finished; start a new one (another name)")
    alive = record.driver_alive()
    if alive:
        raise SearchError(f"--resume {name}: its driver (pid {record.driver['pid']}) is still running")
    if alive is None:
        print(f"warning: search {name} was last driven from host {record.driver['host']}; make sure that "
              "driver has stopped (two drivers must not run one search)", file=sys.stderr)
    return record


def fresh_name_check(storage_path: str, name: str) -> None:
    """A new search must not reuse an existing search's (or run's) directory."""
    from carousel.tune.tracking import SearchRecord

    record = SearchRecord.load(storage_path, name)
    if record is not None:
        hint = ("start it under another name (--set name=...)" if record.status == "FINISHED"
                else f"continue it with: carousel tune --resume {name} --storage-path {storage_path}")
        raise SearchError(f"a search named {name!r} exists under {storage_path} ({record.status}): {hint}")
    from carousel.data.storage import Location

    if Location.parse(storage_path).join(name).exists():
        raise SearchError(f"{storage_path.rstrip('/')}/{name} exists and is not a search: choose another name")
