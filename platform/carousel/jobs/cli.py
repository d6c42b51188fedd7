"""`carousel submit` and `carousel jobs list|status|logs|stop` (registered on the main app by carousel.cli)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

jobs_app = typer.Typer(no_args_is_help=True, help="Watch and stop jobs on a Ray cluster (Ray Jobs API).")

JobsAddressOpt = Annotated[Optional[str], typer.Option(
    "--address", envvar="RAY_ADDRESS",
    help="Ray dashboard address, e.g. http://HEAD:8265 (default: the `carousel cluster up` cluster)")]


def _fail(msg: str, code: int = 2):
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _local_cluster():
    """The running `carousel cluster up` cluster, if any."""
    from carousel.cluster.local import _alive, default_state_dir, load_state

    st = load_state(default_state_dir())
    if st is None or not all(_alive(p) for p in st.processes if p.name in ("ray-head", "mlflow")):
        return None
    return st


def resolve(address: str | None):
    """(dashboard address, local cluster state or None)."""
    local = _local_cluster()
    if address:
        address = address.rstrip("/")
        if local is not None and address in (local.dashboard_url, local.dashboard_url.replace("127.0.0.1", "localhost")):
            return address, local
        return address, None
    if local is not None:
        return local.dashboard_url, local
    _fail("no Ray cluster: give --address http://HEAD:8265 (or set RAY_ADDRESS), or start one with `carousel cluster up`")


def _client(address: str):
    from carousel.jobs.client import JobsClient, JobsError

    try:
        return JobsClient(address)
    except JobsError as e:
        _fail(str(e))


def _guard(fn, *args):
    from carousel.jobs.client import JobsError

    try:
        return fn(*args)
    except JobsError as e:
        _fail(str(e))


def submit(
    job: Annotated[Path, typer.Argument(help="job spec YAML (inside this checkout)")],
    set: Annotated[Optional[list[str]], typer.Option("--set", help="override a spec field: a.b=value (repeatable)")] = None,
    address: JobsAddressOpt = None,
    tracking_uri: Annotated[Optional[str], typer.Option(
        envvar="MLFLOW_TRACKING_URI", help="MLflow tracking server for the job (default: the local cluster's)")] = None,
    storage_path: Annotated[Optional[str], typer.Option(
        help="shared run/checkpoint storage (default: the local cluster's, else the spec's run.storage_path)")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream the job's logs until it ends")] = False,
) -> None:
    """Validate a job spec here, then run `carousel train` on a Ray cluster through the Jobs API."""
    from carousel.jobs.client import JobsError, build_submission, repo_root
    from carousel.tune.cli import load_for_submit

    spec, command = load_for_submit(job, set)  # refused here, before anything reaches the cluster; a tune spec runs `carousel tune`
    address, local = resolve(address)
    if local is not None:
        tracking_uri = tracking_uri or local.mlflow_uri
        if storage_path is None and not any(o.startswith(("run.storage_path=", "base.run.storage_path=")) for o in set or []):
            storage_path = local.storage
    try:
        sub = build_submission(job, list(set or []), spec, repo_root(job.resolve().parent), tracking_uri, storage_path,
                               command=command)
    except JobsError as e:
        _fail(str(e))
    for w in sub.warnings:
        if local is None:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
    client = _client(address)
    t0 = time.time()
    job_id = _guard(client.submit, sub)
    dash = client.address
    typer.echo(f"submitted {job_id} in {time.time() - t0:.1f}s")
    typer.echo(f"  entrypoint: {sub.entrypoint}")
    typer.echo(f"  dashboard:  {dash}/#/jobs/{job_id}")
    uri = spec.tracking.uri or tracking_uri
    if uri:
        typer.echo(f"  MLflow:     {uri}" + (f"/#/experiments (experiment {spec.tracking.experiment})" if uri.startswith("http") else ""))
    typer.echo(f"  follow:     carousel jobs logs {job_id} --follow" + ("" if local else f" --address {address}"))
    if follow:
        status = _guard(client.follow, job_id, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        typer.secho(f"job {job_id}: {status}", bold=True)
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@jobs_app.command("list")
def jobs_list(address: JobsAddressOpt = None) -> None:
    """Jobs on the cluster, newest first."""
    address, _ = resolve(address)
    jobs = _guard(_client(address).list)
    jobs = sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)
    if not jobs:
        typer.echo("no jobs")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        took = f"{(j.end_time - j.start_time) / 1000:.0f}s" if j.end_time and j.start_time else "-"
        typer.echo(f"{j.submission_id or j.job_id:48s} {j.status.value:9s} {started} {took:>6s}  {j.entrypoint[:80]}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: JobsAddressOpt = None) -> None:
    """A job's status (and message)."""
    address, _ = resolve(address)
    info = _guard(_client(address).info, job_id)
    typer.echo(f"{job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


@jobs_app.command("logs")
def jobs_logs(job_id: str, follow: Annotated[bool, typer.Option("--follow", "-f")] = False,
              address: JobsAddressOpt = None) -> None:
    """A job's driver log (the training progress); --follow streams it until the job ends."""
    address, _ = resolve(address)
    client = _client(address)
    if follow:
        status = _guard(client.follow, job_id, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        typer.secho(f"job {job_id}: {status}", bold=True, err=True)
    else:
        typer.echo(_guard(client.logs, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: JobsAddressOpt = None,
              wait: Annotated[bool, typer.Option(help="wait until the job has ended")] = True) -> None:
    """Stop a job: its driver gets SIGTERM and marks the MLflow run KILLED."""
    address, _ = resolve(address)
    client = _client(address)
    _guard(client.stop, job_id)
    status = _guard(client.wait, job_id, 120) if wait else _guard(client.status, job_id)
    typer.echo(f"{job_id}: {status}")
