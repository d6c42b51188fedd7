"""Run identity and lifecycle: one Carousel run = one Ray Train run directory = one MLflow run.

``<storage>/<run name>/carousel-run.json`` ties them together. Starting a job whose run exists and
did not finish resumes it (same MLflow run, latest checkpoint); a finished run is never reopened
by accident: the new run gets the next free name (``name-2``, ``name-3``, ...).
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from carousel.config import JobSpec, flatten
from carousel.data.storage import Location, atomic_write
from carousel.tracking.store import client, ensure_experiment

RECORD = "carousel-run.json"
FINISHED = "FINISHED"


class JsonRecord:
    """A dataclass stored as ``<storage>/<name>/<FILE>``, written atomically (a reader never sees half)."""

    FILE = ""

    @classmethod
    def location(cls, storage_path: str, name: str) -> Location:
        return Location.parse(storage_path).join(name, cls.FILE)

    @classmethod
    def load(cls, storage_path: str, name: str):
        loc = cls.location(storage_path, name)
        if not loc.exists():
            return None
        return cls(**json.loads(loc.read_bytes()))

    def _write(self, storage_path: str) -> None:
        atomic_write(self.location(storage_path, self.name), json.dumps(asdict(self), indent=2).encode())


@dataclass
class RunRecord(JsonRecord):
    name: str
    mlflow_run_id: str
    experiment_id: str
    tracking_uri: str
    spec: dict[str, Any]
    status: str = "RUNNING"  # RUNNING | HALTED | FINISHED | FAILED | KILLED
    step: int = 0
    created: float = 0.0
    driver: dict[str, Any] | None = None  # host and pid of the driver that last opened the run
    launch: str | None = None  # id of the `carousel train` that last opened it (see wait_for_mlflow_run)
    FILE = RECORD

    def save(self, storage_path: str) -> None:
        self._write(storage_path)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _this_driver() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_runs(storage_path: str) -> list[str]:
    """Mark KILLED the runs this host's drivers left RUNNING when they died (SIGKILL, OOM, power).

    Only runs whose driver ran on this host are judged (its pid tells); a run driven from another
    host is left alone rather than guessed at. Returns the names of the runs it closed.
    """
    root = Location.parse(storage_path)
    if not root.exists():
        return []
    import pyarrow.fs as pafs

    closed = []
    for info in root.fs.get_file_info(pafs.FileSelector(root.path, recursive=False)):
        if info.type != pafs.FileType.Directory:
            continue
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            rec = RunRecord.load(storage_path, name)
        except (ValueError, TypeError):
            continue  # not a Carousel run record
        if rec is None or rec.status != "RUNNING" or not rec.driver:
            continue
        if rec.driver.get("host") != socket.gethostname() or _pid_alive(int(rec.driver["pid"])):
            continue
        try:
            c = client(rec.tracking_uri)
            c.set_tag(rec.mlflow_run_id, "carousel.status", "KILLED")
            c.set_tag(rec.mlflow_run_id, "carousel.status_reason", f"driver pid {rec.driver['pid']} died")
            c.set_terminated(rec.mlflow_run_id, status="KILLED")
        except Exception:  # noqa: BLE001 - a store we cannot reach now; the record still tells the truth
            pass
        rec.status = "KILLED"
        rec.save(storage_path)
        closed.append(name)
    return closed


def free_name(storage_path: str, name: str) -> str:
    n = 2
    candidate = name
    while (rec := RunRecord.load(storage_path, candidate)) is not None and rec.status == FINISHED:
        candidate = f"{name}-{n}"
        n += 1
    return candidate


def _param_value(v: Any) -> str:
    s = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return s[:6000]  # MLflow's param value limit


def open_run(
    spec: JobSpec, tracking_uri: str, extra_tags: dict[str, str] | None = None, name: str | None = None,
    launch: str | None = None,
) -> tuple[RunRecord, bool]:
    """Create or reopen the run for ``spec``; returns (record, resumed). ``name``: the run's name,
    already chosen with ``free_name``; ``launch``: written into the record for ``wait_for_mlflow_run``."""
    from mlflow.entities import Param, RunTag

    storage = spec.run.storage_path
    sweep_dead_runs(storage)
    name = name or free_name(storage, spec.run_name)
    record = RunRecord.load(storage, name)
    c = client(tracking_uri)
    if record is not None:
        c.update_run(record.mlflow_run_id, status="RUNNING")
        c.set_tag(record.mlflow_run_id, "carousel.status", "RUNNING")
        record.status = "RUNNING"
        record.spec = spec.model_dump(mode="json")
        record.driver = _this_driver()
        record.launch = launch
        record.save(storage)
        return record, True

    exp_id = ensure_experiment(c, spec.tracking.experiment, tracking_uri)
    tags = {
        "carousel.job": spec.name,
        "carousel.run": name,
        "carousel.family": spec.model.family,
        "host": socket.gethostname(),
        "mlflow.user": getpass.getuser(),
        **(extra_tags or {}),
    }
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    run = c.create_run(exp_id, run_name=name, tags=tags)
    params = [Param(k, _param_value(v)) for k, v in flatten(spec.model_dump(mode="json")).items()]
    c.log_batch(run.info.run_id, params=params, tags=[RunTag("carousel.storage", storage)])
    record = RunRecord(name, run.info.run_id, exp_id, tracking_uri, spec.model_dump(mode="json"),
                       created=time.time(), driver=_this_driver(), launch=launch)
    record.save(storage)
    return record, False


class RunNotOpened(RuntimeError):
    """The driver never recorded the MLflow run of this launch (it failed or died first)."""


def wait_for_mlflow_run(storage_path: str, name: str, launch: str, timeout: float = 300.0, pause: float = 0.2) -> str:
    """The MLflow run id that launch ``launch`` of run ``name`` recorded, once it has.

    `carousel train` starts the Ray Train workers first and opens the MLflow run while they start
    (importing MLflow and opening its store cost the driver ~2 s that the workers need not wait
    for); rank 0 reads the id from the run record when it first needs it, by which time the driver
    has long written it. The record is the run's identity on shared storage, which every worker
    reaches (checkpoints live beside it). A driver that fails to open the run exits, and Ray ends
    its job's workers with it; the timeout covers a driver that hangs.
    """
    deadline = time.time() + timeout
    while True:
        rec = RunRecord.load(storage_path, name)
        if rec is not None and rec.launch == launch:
            return rec.mlflow_run_id
        if time.time() > deadline:
            raise RunNotOpened(
                f"run {name}: the driver did not record its MLflow run in {RunRecord.location(storage_path, name).uri()} "
                f"within {timeout:.0f} s (did `carousel train` fail or hang?)"
            )
        time.sleep(pause)


def close_run(record: RunRecord, storage_path: str, status: str, step: int | None = None) -> None:
    """Record the outcome in MLflow and in the run record. HALTED is RUNNING-resumable but not live."""
    from carousel.tracking.store import retry_while_unreachable

    c = client(record.tracking_uri)
    mlflow_status = {"HALTED": "FINISHED", "FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED"}[status]
    # The record first: a tracking server that is down now must not leave a finished run RUNNING here
    # (the next start would sweep it up as KILLED).
    record.status = status
    if step is not None:
        record.step = step
    record.save(storage_path)

    def mark():
        c.set_tag(record.mlflow_run_id, "carousel.status", status)
        c.set_terminated(record.mlflow_run_id, status=mlflow_status)

    retry_while_unreachable(mark, record.tracking_uri, f"mark MLflow run {record.mlflow_run_id} {status}")
