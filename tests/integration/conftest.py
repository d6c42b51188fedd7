"""Integration fixtures: a real Ray cluster started with `ray start`, a real prepared KJV subset."""

import os
import socket
import subprocess
import sys
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


@pytest.fixture(scope="session")
def ray_cluster():
    """A real single-node Ray cluster (head only, 2 CPUs) for the whole session; yields its address."""
    from ray._private.services import get_node_ip_address

    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    run([BIN / "ray", "start", "--head", f"--port={port}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         "--disable-usage-stats"], env=env, timeout=180)
    # Ray drivers address the head by the node's IP (what `ray start` prints), not by loopback.
    address = f"{get_node_ip_address()}:{port}"
    try:
        yield address
    finally:
        run([BIN / "ray", "stop", "--force"], env=env, check=False, timeout=120)


@pytest.fixture(scope="session")
def cluster_env(ray_cluster):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = ray_cluster
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def kjv_tiny(tmp_path_factory, cluster_env):
    """~4000 KJV verses, BPE 512, prepared by the real CLI with Ray tasks on the cluster."""
    out = tmp_path_factory.mktemp("data") / "kjv-tiny"
    run([BIN / "carousel", "prepare", "text", "--kjv", "--max-verses", "4000", "--out", out,
         "--tokenizer", "bpe", "--vocab-size", "512", "--shard-lines", "1000"], env=cluster_env)
    return out


@pytest.fixture
def workdir(tmp_path):
    """A fresh working directory: its own MLflow store (./mlflow.db) and run storage."""
    return tmp_path


def tracking_client(workdir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
