"""Connecting to Ray: an embedded local instance, or a cluster at an address, with token auth kept on.

Ray 2.60 turns token authentication on for the clusters it starts, but a driver that names an
explicit address only sends a token when RAY_AUTH_MODE=token. Carousel drivers do what Ray's
``address="auto"`` path does: when a token is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token) and the mode is unset, they authenticate with it.
"""

from __future__ import annotations

import os
from pathlib import Path


class RayConnectionError(RuntimeError):
    pass


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return Path(path).is_file()


def auth_env_for(address: str | None) -> dict[str, str]:
    """Environment to add before connecting (pure: tested without a cluster)."""
    if address and address != "auto" and "RAY_AUTH_MODE" not in os.environ and token_available():
        return {"RAY_AUTH_MODE": "token"}
    return {}


def worker_env() -> dict[str, str]:
    env = {
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        # Bound how long a dead tracking server can hold rank 0's background logger.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
    }
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DS_ACCELERATOR"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def init_ray(address: str | None = None) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray reads the auth mode when it is first imported: set it before that.
    os.environ.update(auth_env_for(address))
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": worker_env()}
    if not address:
        # An embedded single-node instance. Its dashboard (bound to 127.0.0.1) serves the State API
        # that Ray Train's controller monitoring queries; without it that monitor logs errors.
        ray.init(runtime_env=runtime_env, logging_level="WARNING")
        return
    try:
        ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
    except ConnectionError as e:
        hint = (
            "no Ray auth token found (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the cluster's "
            "~/.ray/auth_token)" if not token_available() else "is the cluster up, and is the token its own?"
        )
        raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {hint} ({e})") from None
