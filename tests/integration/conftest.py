"""Integration fixtures: a real Ray cluster started with `ray start`, a real prepared KJV subset."""

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, cwd=None, env=None, check=True, timeout=900):
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}")
    return proc


@contextmanager
def ray_head(log_dir: Path, auth_mode: str = "token", num_cpus: int = 2):
    """A real single-node Ray cluster (head only); yields its address.

    ``ray start --block`` in its own session, stopped with SIGTERM, tears down exactly the processes
    it started (``ray stop`` would kill every Ray cluster on the machine).
    """
    import signal
    import time

    from ray._private.services import get_node_ip_address

    from carousel.ray_session import ensure_token

    port = free_port()
    # Ray drivers address the head by the node's IP (what `ray start` prints), not by loopback.
    address = f"{get_node_ip_address()}:{port}"
    # Token auth on, as `carousel cluster up` starts it: `ray start` alone turns it on only when a
    # token already exists. On a fresh machine (CI) it then ran without auth, and once a later test
    # wrote ~/.ray/auth_token, every driver that found the token was dropped by the raylet.
    if auth_mode == "token":
        ensure_token()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": auth_mode,
           # Ray Train's PlacementGroupCleaner asks the State API with no address: without this it
           # finds whichever cluster started last on the machine and waits out a 12 s timeout at
           # the end of every run (as `carousel cluster up` does: local.process_env).
           "RAY_ADDRESS": address,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain: stop in seconds, not 30
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / "ray-start.log", "w")
    head = subprocess.Popen(
        [str(BIN / "python"), "-m", "carousel.cluster.ray_node", "start", "--head", "--block", f"--port={port}",
         f"--num-cpus={num_cpus}", f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats", f"--ray-client-server-port={free_port()}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in Path(log.name).read_text():
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed:\n{Path(log.name).read_text()[-4000:]}")
            time.sleep(0.5)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The session's cluster (head only, 2 CPUs, token auth); yields its address."""
    with ray_head(tmp_path_factory.mktemp("ray")) as address:
        yield address


@pytest.fixture(scope="session")
def cluster_env(ray_cluster):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = ray_cluster
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_DEDUP_LOGS"] = "0"  # as carousel's drivers set it: tests read rank 0's step lines
    return env


@pytest.fixture(scope="session")
def kjv_tiny(tmp_path_factory, cluster_env):
    """~4000 KJV verses, BPE 512, prepared by the real CLI with Ray tasks on the cluster."""
    out = tmp_path_factory.mktemp("data") / "kjv-tiny"
    run([BIN / "carousel", "prepare", "text", "--kjv", "--max-verses", "4000", "--out", out,
         "--tokenizer", "bpe", "--vocab-size", "512", "--shard-lines", "1000"], env=cluster_env)
    return out


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, created once by MLflow itself. Creating one runs MLflow's schema
    migrations, 2-3 s on a quiet 2-core machine and more while Ray starts workers beside it, and
    almost every test here starts from an empty store; a copy of this one is the same store."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def with_empty_store(directory: Path, template: Path) -> Path:
    """``directory`` with an empty MLflow store (./mlflow.db, where `carousel train` looks by default)."""
    import shutil

    shutil.copyfile(template, directory / "mlflow.db")
    return directory


@pytest.fixture
def workdir(tmp_path, mlflow_store_template):
    """A fresh working directory: its own, empty MLflow store (./mlflow.db) and run storage."""
    return with_empty_store(tmp_path, mlflow_store_template)


def tracking_client(workdir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
