"""`carousel cluster up|down|status|env`: a local multi-node Ray cluster with an MLflow tracking server."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

cluster_app = typer.Typer(no_args_is_help=True, help="A local multi-node Ray cluster + MLflow server on this machine.")

StateOpt = Annotated[Optional[Path], typer.Option(
    "--state-dir", envvar="CAROUSEL_CLUSTER_DIR", help="ports, logs, PIDs, storage (default ~/.carousel/cluster)")]


def _fail(msg: str, code: int = 1):
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@cluster_app.command("up")
def cluster_up(
    workers: Annotated[int, typer.Option(help="worker nodes (each its own `ray start`)")] = 2,
    worker_cpus: Annotated[int, typer.Option(help="CPUs each worker node offers")] = 1,
    worker_gpus: Annotated[int, typer.Option(help="GPUs each worker node offers")] = 0,
    head_cpus: Annotated[int, typer.Option(help="CPUs on the head (0: training runs on worker nodes)")] = 0,
    object_store_mb: Annotated[int, typer.Option(help="object store per node")] = 256,
    storage: Annotated[Optional[str], typer.Option(help="shared checkpoint storage (default STATE/storage)")] = None,
    mlflow_backend: Annotated[Optional[str], typer.Option(
        help="MLflow backend store: sqlite (default, in STATE) or postgresql://user:pass@host/db")] = None,
    mlflow_auth: Annotated[bool, typer.Option(help="run MLflow's basic-auth app (admin password in STATE/mlflow)")] = False,
    dashboard_port: Annotated[Optional[int], typer.Option(help="Ray dashboard port (default: a free one)")] = None,
    mlflow_port: Annotated[Optional[int], typer.Option(help="MLflow port (default: a free one)")] = None,
    ray_metrics: Annotated[bool, typer.Option(
        help="export Ray's Prometheus metrics (each node's exporter then listens on every interface)")] = False,
    state_dir: StateOpt = None,
) -> None:
    """Start a Ray head, N worker nodes and an MLflow server (all bound to this machine). Harmless when up."""
    from carousel.cluster.local import ClusterConfig, ClusterError, up

    cfg = ClusterConfig(workers=workers, head_cpus=head_cpus, worker_cpus=worker_cpus, worker_gpus=worker_gpus,
                        object_store_mb=object_store_mb, storage=storage, mlflow_backend=mlflow_backend,
                        mlflow_auth=mlflow_auth, dashboard_port=dashboard_port, mlflow_port=mlflow_port,
                        ray_metrics=ray_metrics)
    try:
        st = up(cfg, state_dir, log=typer.echo)
    except ClusterError as e:
        _fail(str(e))
    _print(st)


def _print(st) -> None:
    from carousel.cluster.local import ADMIN_PASSWORD_FILE

    typer.echo(f"  Ray address   {st.gcs_address}  (token auth on)")
    typer.echo(f"  dashboard     {st.dashboard_url}")
    typer.echo(f"  MLflow        {st.mlflow_uri}" + ("  (basic auth: user admin, password in "
                                                     f"{Path(st.state_dir) / ADMIN_PASSWORD_FILE})" if st.mlflow_auth else ""))
    typer.echo(f"  storage       {st.storage}")
    typer.echo(f"  nodes         head ({st.config['head_cpus']} CPUs) + {st.config['workers']} workers "
               f"({st.config['worker_cpus']} CPUs each)")
    typer.echo(f"  state         {st.state_dir}")
    typer.echo("  submit        carousel submit jobs/JOB.yaml --set data.path=DIR --set scaling.placement=SPREAD")


@cluster_app.command("down")
def cluster_down(state_dir: StateOpt = None) -> None:
    """Stop exactly the processes `up` started (and the jobs running on them)."""
    from carousel.cluster.local import ClusterError, down

    try:
        down(state_dir, log=typer.echo)
    except ClusterError as e:
        _fail(str(e))


@cluster_app.command("status")
def cluster_status(state_dir: StateOpt = None,
                   as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False) -> None:
    """Is it up: processes, live Ray nodes, addresses."""
    from carousel.cluster.local import status

    s = status(state_dir)
    if s is None:
        _fail("no cluster (start one with `carousel cluster up`)", 3)
    if as_json:
        typer.echo(json.dumps(s, indent=2))
    else:
        typer.echo(f"{'up' if s['up'] else 'DEGRADED'}: {s['alive_nodes']} Ray nodes alive | dashboard {s['dashboard']} "
                   f"| MLflow {s['mlflow']} | storage {s['storage']}")
        for name, p in s["processes"].items():
            typer.echo(f"  {name:14s} pid {p['pid']:>7d}  {'running' if p['alive'] else 'STOPPED'}  log {p['log']}")
    if not s["up"]:
        raise typer.Exit(1)


@cluster_app.command("env")
def cluster_env(state_dir: StateOpt = None) -> None:
    """Shell exports for Ray's and MLflow's own tools: eval "$(carousel cluster env)"; ray job submit ..."""
    from carousel.cluster.local import default_state_dir, load_state

    st = load_state((state_dir or default_state_dir()).resolve())
    if st is None:
        _fail("no cluster (start one with `carousel cluster up`)", 3)
    env = {"RAY_ADDRESS": st.dashboard_url, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": st.mlflow_uri,
           "CAROUSEL_STORAGE_PATH": st.storage}
    for k, v in env.items():
        typer.echo(f"export {k}={shlex.quote(v)}")
    if st.mlflow_auth:
        # The password is read from its 0600 file when the line is evaluated, never printed.
        from carousel.cluster.local import ADMIN_PASSWORD_FILE

        secret = Path(st.state_dir) / ADMIN_PASSWORD_FILE
        typer.echo("export MLFLOW_TRACKING_USERNAME=admin")
        typer.echo(f'export MLFLOW_TRACKING_PASSWORD="$(cat {shlex.quote(str(secret))})"')
