"""Ray Jobs API client: submit `carousel train` with a runtime_env, then list / status / logs / stop.

The submission side is pure (``build_submission``) and unit-tested; ``JobsClient`` wraps Ray's
``JobSubmissionClient`` with token authentication done the way Ray's own ``ray job`` CLI does it:
``RAY_AUTH_MODE=token`` before Ray is imported, the token read by Ray from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Bulk and local state that must never travel with a job (Ray also honours .gitignore).
EXCLUDES = [
    # Anchored ("/data"): an unanchored "data" would also drop the package platform/carousel/data.
    "/.git", "/.venv", "/venv", "/data", "/runs", "/mlruns", "/mlartifacts", "/mlflow.db", "/bench-results",
    "/benchmarks/results", "/.carousel", "/.ci", "__pycache__/", "*.egg-info/", ".pytest_cache/", "*.tmp-*",
    "node_modules/",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class JobsError(RuntimeError):
    pass


def repo_root(start: Path | None = None) -> Path:
    """The working directory a job ships: the project containing pyproject.toml and platform/carousel."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "platform" / "carousel").is_dir():
            return d
    raise JobsError(f"{here} is not inside a Carousel checkout (no pyproject.toml + platform/carousel above it)")


def is_uri(path: str) -> bool:
    return "://" in path


def submission_id(job_name: str, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now or time.time()))
    return f"carousel-{re.sub(r'[^A-Za-z0-9-]+', '-', job_name)[:40]}-{stamp}-{secrets.token_hex(2)}"


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def build_submission(
    job: Path,
    overrides: list[str],
    spec,
    working_dir: Path,
    tracking_uri: str | None,
    storage_path: str | None = None,
    command: str = "train",
    extra_env: dict[str, str] | None = None,
    sub_id: str | None = None,
) -> Submission:
    """What to send for a validated ``spec`` (loaded from ``job`` with ``overrides``).

    The spec is validated here, where its relative paths were made absolute; the job's driver runs
    in a copy of the working directory, so the data and storage paths go along as overrides.
    """
    working_dir = working_dir.resolve()
    job = job.resolve()
    try:
        rel = job.relative_to(working_dir)
    except ValueError:
        raise JobsError(f"{job}: the job spec must be inside the working directory {working_dir} to travel with the job") from None
    warnings = []
    storage = storage_path or spec.run.storage_path
    # `carousel tune` takes a tune spec: ``spec`` is its base job spec, whose fields it sets as base.*
    prefix = "base." if command == "tune" else ""
    pinned = [*overrides, f"{prefix}data.path={spec.data.path}", f"{prefix}run.storage_path={storage}"]
    if not is_uri(spec.data.path):
        warnings.append(f"data.path {spec.data.path} is a local path: it must exist on every node of the cluster")
    if not is_uri(storage) and not storage_path:
        warnings.append(f"run.storage_path {storage} is a local path: on a multi-machine cluster use shared storage "
                        "(NFS, s3://, gs://)")
    env = {
        # The shipped checkout's package first, on the driver and every worker (all start in the
        # working directory; Python makes the entry absolute at start-up): code changes travel with the job.
        "PYTHONPATH": "platform",
        "PYTHONUNBUFFERED": "1",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    }
    uri = spec.tracking.uri or tracking_uri
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    else:
        warnings.append("no MLflow tracking URI (spec tracking.uri, --tracking-uri or $MLFLOW_TRACKING_URI): "
                        "the job uses the cluster's MLFLOW_TRACKING_URI, else a sqlite file in its temporary working directory")
    for k in ("DS_ACCELERATOR", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.update(extra_env or {})
    entry = ["carousel", command, str(rel)]
    for o in pinned:
        entry += ["--set", o]
    return Submission(
        entrypoint=shlex.join(entry),
        runtime_env={
            "working_dir": str(working_dir),
            "excludes": list(EXCLUDES),
            "env_vars": env,
        },
        submission_id=sub_id or submission_id(spec.name),
        metadata={"carousel.job": spec.name, "carousel.spec": str(rel), "carousel.command": command},
        warnings=warnings,
    )


def dashboard_address(address: str) -> str:
    address = address.rstrip("/")
    return address if "://" in address else f"http://{address}"


class JobsClient:
    """Ray's JobSubmissionClient with Carousel's auth handling and error messages."""

    def __init__(self, address: str):
        from carousel.ray_session import auth_env_for

        self.address = dashboard_address(address)
        os.environ.update(auth_env_for(self.address))  # before `import ray`: Ray fixes the auth mode then
        from ray.dashboard.modules.job.sdk import JobSubmissionClient

        try:
            self._c = self._call(JobSubmissionClient, self.address)
        except ConnectionError as e:
            raise JobsError(f"cannot reach the Ray dashboard at {self.address}: is the cluster up? ({e})") from None

    def _call(self, fn, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        from carousel.ray_session import auth_hint

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            status = 403 if str(e).startswith("Authentication failed") else 401
            raise JobsError(auth_hint(self.address, status)) from None

    def submit(self, sub: Submission) -> str:
        return self._call(self._c.submit_job, entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                          submission_id=sub.submission_id, metadata=sub.metadata)

    def list(self):
        return self._call(self._c.list_jobs)

    def info(self, job_id: str):
        try:
            return self._call(self._c.get_job_info, job_id)
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                raise JobsError(f"no job {job_id!r} on {self.address}") from None
            raise

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status.value)

    def logs(self, job_id: str) -> str:
        self.info(job_id)
        return self._call(self._c.get_job_logs, job_id)

    def follow(self, job_id: str, write) -> str:
        """Stream the logs until the job ends; returns its final status."""
        import asyncio

        self.info(job_id)

        async def tail():
            async for chunk in self._c.tail_job_logs(job_id):
                write(chunk)

        self._call(asyncio.run, tail())
        return self.wait(job_id, timeout=60)

    def stop(self, job_id: str) -> bool:
        self.info(job_id)
        return self._call(self._c.stop_job, job_id)

    def wait(self, job_id: str, timeout: float = 3600, poll: float = 1.0) -> str:
        deadline = time.time() + timeout
        while True:
            s = self.status(job_id)
            if s in TERMINAL or time.time() > deadline:
                return s
            time.sleep(poll)
