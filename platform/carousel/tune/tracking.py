"""MLflow for a search: one parent run (space, scheduler, best result), one nested child run per trial.

The child run is found by its trial id tag (``carousel.trial_id``) under its parent, and created
only when none exists: a trial restarted by ``carousel tune --resume`` keeps its run, its params
and its metric history (the worker's MetricLogger skips the steps already logged).

Statuses tell the truth: a trial that ran to its last step is FINISHED; one the scheduler stopped
is FINISHED with ``carousel.stopped_early=true`` and ``carousel.status=STOPPED_EARLY``; an error is
FAILED; a search stopped by a signal leaves its running trials KILLED (resumable). Each trial's
params are its full job spec, flattened as in `carousel train` runs, so the MLflow UI compares
trials on the searched fields (parallel coordinates) and on everything else.

``<storage>/<search>/carousel-search.json`` ties the search directory to its MLflow parent run.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from carousel.config import JobSpec, flatten
from carousel.tracking.runs import JsonRecord, _param_value, _pid_alive, git_commit
from carousel.tracking.store import client, ensure_experiment

RECORD = "carousel-search.json"
TRIAL_TAG = "carousel.trial_id"
RUN_TAG = "carousel.run"  # the trial's Train run: its id, or <id>-g<hash> for a PBT generation
GENERATION_TAG = "carousel.generation"
PARENT_TAG = "mlflow.parentRunId"


@dataclass
class SearchRecord(JsonRecord):
    name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    storage_path: str
    tune: dict[str, Any]  # the resolved tune spec
    base: dict[str, Any]  # the resolved base job spec (absolute paths)
    status: str = "RUNNING"  # RUNNING | FINISHED | FAILED | KILLED
    created: float = 0.0
    driver: dict[str, Any] | None = None
    best: dict[str, Any] = field(default_factory=dict)
    FILE = RECORD

    def save(self) -> None:
        self._write(self.storage_path)

    def driver_alive(self) -> bool | None:
        """Whether the driver that last ran this search still runs: None when it ran on another
        host (a pid means nothing here)."""
        d = self.driver or {}
        if self.status != "RUNNING" or not d:
            return False
        if d.get("host") != socket.gethostname():
            return None
        return _pid_alive(int(d["pid"]))


def this_driver() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def parent_params(search) -> dict[str, str]:
    """What defines the search, as parent-run params (write-once: none of them changes on resume)."""
    s = search.spec
    params = {
        "search.kind": s.search.kind,
        "search.seed": s.search.seed if s.search.seed is not None else search.base.seed,
        "scheduler.kind": s.scheduler.kind,
        "metric": search.metric,
        "mode": s.mode,
        "num_samples": s.num_samples,
        "base": search.base.name,
    }
    if s.scheduler.kind == "pbt":
        from carousel.tune.pbt import perturbation_interval

        params.update({"scheduler.perturbation_interval": perturbation_interval(search),
                       "scheduler.quantile_fraction": s.scheduler.quantile_fraction,
                       "scheduler.resample_probability": s.scheduler.resample_probability,
                       "scheduler.perturbation_factors": list(s.scheduler.perturbation_factors)})
    if s.scheduler.kind == "asha":
        params.update({"scheduler.grace_period": search.grace_period, "scheduler.max_t": search.max_steps,
                       "scheduler.reduction_factor": s.scheduler.reduction_factor,
                       "scheduler.brackets": s.scheduler.brackets})
    for path, dim in s.space.items():
        params[f"space.{path}"] = dim.describe()
    return {k: _param_value(v) for k, v in params.items()}


def open_parent(search, tracking_uri: str, storage_path: str, extra_tags: dict[str, str] | None = None) -> SearchRecord:
    from mlflow.entities import Param, RunTag

    c = client(tracking_uri)
    base = search.base
    exp_id = ensure_experiment(c, base.tracking.experiment, tracking_uri)
    tags = {
        "carousel.kind": "search",
        "carousel.search": search.spec.name,
        "carousel.job": base.name,
        "carousel.family": base.model.family,
        "carousel.status": "RUNNING",
        "carousel.storage": storage_path,
        "host": socket.gethostname(),
        "mlflow.user": getpass.getuser(),
        **(extra_tags or {}),
    }
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    run = c.create_run(exp_id, run_name=search.spec.name, tags=tags)
    rid = run.info.run_id
    c.log_batch(rid, params=[Param(k, v) for k, v in parent_params(search).items()],
                tags=[RunTag("carousel.space", json.dumps({p: d.describe() for p, d in search.spec.space.items()}))])
    c.log_dict(rid, search.spec.model_dump(mode="json"), "tune-spec.yaml")
    c.log_dict(rid, base.model_dump(mode="json"), "base-spec.yaml")
    record = SearchRecord(search.spec.name, rid, exp_id, tracking_uri, storage_path,
                          search.spec.model_dump(mode="json"), base.model_dump(mode="json"),
                          created=time.time(), driver=this_driver())
    record.save()
    return record


def reopen_parent(record: SearchRecord) -> None:
    c = client(record.tracking_uri)
    c.update_run(record.parent_run_id, status="RUNNING")
    c.set_tag(record.parent_run_id, "carousel.status", "RUNNING")
    record.status = "RUNNING"
    record.driver = this_driver()
    record.save()


def close_parent(record: SearchRecord, status: str, best: dict[str, Any] | None = None) -> None:
    c = client(record.tracking_uri)
    c.set_tag(record.parent_run_id, "carousel.status", status)
    c.set_terminated(record.parent_run_id, status=status)
    record.status = status
    if best is not None:
        record.best = best
    record.save()


def _child_filter(parent_run_id: str, trial_id: str | None = None) -> str:
    f = f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return f + (f" and tags.`{TRIAL_TAG}` = '{trial_id}'" if trial_id else "")


def child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str) -> list:
    c = client(tracking_uri)
    out, token = [], None
    while True:
        page = c.search_runs([experiment_id], _child_filter(parent_run_id), max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def generation(run) -> int:
    return int(run.data.tags.get(GENERATION_TAG, "1"))


def current(runs: list):
    """A trial's current child run: its latest generation (PBT), and of two for one generation
    the oldest, so every writer settles on the same one."""
    return min(runs, key=lambda r: (-generation(r), r.info.start_time)) if runs else None


def find_child(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str):
    return current(client(tracking_uri).search_runs([experiment_id], _child_filter(parent_run_id, trial_id)))


def current_children(runs: list) -> dict[str, Any]:
    """trial id -> its current child run."""
    by_trial: dict[str, list] = {}
    for r in runs:
        by_trial.setdefault(r.data.tags.get(TRIAL_TAG), []).append(r)
    return {t: current(rs) for t, rs in by_trial.items()}


def open_child(context: dict[str, Any], trial_id: str, spec: JobSpec, values: dict[str, Any],
               lineage: dict[str, str] | None = None) -> str:
    """The child run of the trial's Train run ``spec.run.name``: reopened if it exists (a resumed
    trial), else created with its params. ``lineage``: for a PBT generation, the trial and step
    it continues; the trial's earlier generations are then closed as REPLACED."""
    from mlflow.entities import Param, RunTag

    uri = context["tracking_uri"]
    c = client(uri)
    train_run = spec.run.name or trial_id
    runs = c.search_runs([context["experiment_id"]], _child_filter(context["parent_run_id"], trial_id))
    mine = [r for r in runs if r.data.tags.get(RUN_TAG, trial_id) == train_run]
    if mine:
        rid = current(mine).info.run_id
        c.update_run(rid, status="RUNNING")
        c.set_tag(rid, "carousel.status", "RUNNING")
        return rid
    gen = 1 + max((generation(r) for r in runs), default=0)
    tags = {
        PARENT_TAG: context["parent_run_id"],
        TRIAL_TAG: trial_id,
        RUN_TAG: train_run,
        GENERATION_TAG: str(gen),
        "carousel.kind": "trial",
        "carousel.search": context["search"],
        "carousel.job": spec.name,
        "carousel.family": spec.model.family,
        "carousel.status": "RUNNING",
        "host": socket.gethostname(),
        "mlflow.user": getpass.getuser(),
        **{f"carousel.pbt.{k}": str(v) for k, v in (lineage or {}).items()},
    }
    name = f"{context['search']}-{trial_id}" + (f"-g{gen}" if gen > 1 else "")
    run = c.create_run(context["experiment_id"], run_name=name, tags=tags)
    rid = run.info.run_id
    params = [Param(k, _param_value(v)) for k, v in flatten(spec.model_dump(mode="json")).items()]
    c.log_batch(rid, params=params, tags=[RunTag("carousel.sampled", json.dumps(values, sort_keys=True))])
    for r in runs:
        if r.info.status == "RUNNING":
            c.set_tag(r.info.run_id, "carousel.status", "REPLACED")
            c.set_tag(r.info.run_id, "carousel.status_reason",
                      f"PBT: trial {trial_id} continues as generation {gen} ({name}), from trial "
                      f"{(lineage or {}).get('source_trial')} at step {(lineage or {}).get('source_step')}")
            c.set_terminated(r.info.run_id, status="FINISHED")
    return rid


def close_child(tracking_uri: str, run_id: str, status: str, stopped_early: bool = False,
                step: int | None = None, reason: str | None = None) -> None:
    """status: FINISHED | FAILED | KILLED. A trial stopped by the scheduler is FINISHED, tagged."""
    c = client(tracking_uri)
    c.set_tag(run_id, "carousel.status", "STOPPED_EARLY" if stopped_early else status)
    c.set_tag(run_id, "carousel.stopped_early", str(stopped_early).lower())
    if step is not None:
        # The step of the last validation Tune saw: for a stopped trial, where it was stopped (its
        # workers go on until Ray ends them, so its run may hold a few later steps).
        c.set_tag(run_id, "carousel.stopped_at_step" if stopped_early else "carousel.last_step", str(step))
    if reason:
        c.set_tag(run_id, "carousel.status_reason", reason[:5000])
    c.set_terminated(run_id, status=status)
