"""Connecting to Ray: an embedded local instance, or a cluster at an address, with token auth kept on.

Ray 2.60 turns token authentication on for an embedded ``ray.init()``; ``ray start`` turns it on
only when a token already exists (or RAY_AUTH_MODE=token), so `carousel cluster up` makes sure one
does. A driver that names an explicit address only sends a token when RAY_AUTH_MODE=token.
Carousel drivers do what Ray's ``address="auto"`` path does: when a token is available
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and the mode is unset, they
authenticate with it, and refuse, with the fix, a cluster that runs without token auth.
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


def token_source() -> str | None:
    """Where a Ray auth token would come from, in Ray's own order (None: nowhere)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return str(path) if path.is_file() else None


def read_token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    src = token_source()
    return Path(src).read_text().strip() if src else None


def ensure_token() -> str:
    """The token a cluster started here uses: the existing one, or a new one where Ray keeps it."""
    src = token_source()
    if src:
        return src
    import secrets

    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray's own generator writes
    return str(path)


def auth_hint(address: str, status: int | None = None) -> str:
    """A clear message for a refused (401) or rejected (403) token, or a failed connection."""
    src = token_source()
    if status == 403 or (status is None and src):
        return (f"the Ray cluster at {address} rejected the auth token from {src}: it is not that cluster's token "
                "(copy the cluster's ~/.ray/auth_token, or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)")
    return (f"the Ray cluster at {address} requires token authentication and no token was found "
            "(set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the cluster's token to ~/.ray/auth_token)")


def auth_env_for(address: str | None) -> dict[str, str]:
    """Environment to add before connecting (pure: tested without a cluster)."""
    if address and address != "auto" and "RAY_AUTH_MODE" not in os.environ and token_available():
        return {"RAY_AUTH_MODE": "token"}
    return {}


def cluster_auth_mode(dashboard_url: str | None, timeout: float = 5) -> str | None:
    """The cluster's token-auth mode as its dashboard reports it ("token" or "disabled"; the
    endpoint needs no token), or None when there is no dashboard to ask."""
    import json
    import urllib.error
    import urllib.request

    if not dashboard_url:
        return None
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    try:
        with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=timeout) as r:
            return str(json.loads(r.read()).get("authentication_mode")) or None
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return None


def auth_mismatch(driver_mode: str | None, cluster_mode: str | None, address: str) -> str | None:
    """Why this driver cannot use the cluster, or None. A driver in token mode on a cluster started
    without token auth connects, but the raylet then calls the driver without a token, the driver
    refuses, and Ray drops the job's actors as if their owner had died ("The actor never ran - it
    was cancelled before it started running"): measured with Ray 2.60. Pure, tested alone."""
    if (driver_mode or "").lower() != "token" or cluster_mode != "disabled":
        return None
    return (f"the Ray cluster at {address} runs without token authentication, and this driver authenticates "
            f"with the token from {token_source() or 'RAY_AUTH_TOKEN'}: Ray cannot mix the two. Restart the cluster "
            "with token auth (`carousel cluster up`, or `RAY_AUTH_MODE=token ray start ...` with the same token), "
            "or run this driver without it (RAY_AUTH_MODE=disabled)")


# Read when a process opens a shard or the run's storage on an object store (pyarrow's S3 / GCS file
# systems resolve credentials then): Ray Train's workers do it before any Carousel code runs there,
# and `carousel prepare` in Ray tasks. These alone go to every process of the job, from its start.
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AWS_REGION", "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS")


def worker_env() -> dict[str, str]:
    env = {
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        # Bound how long a dead tracking server can hold rank 0's background logger.
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
        # Idle OpenMP threads sleep instead of spinning. libgomp reads this when torch loads, so
        # the backend sets it in each worker before torch loads (train/process_group.py). Measured (docs/performance.md,
        # threads row): with 2 threads, spinning is ~30 % faster while the worker has its cores to
        # itself, but when anything else wants them (Ray's daemons, the driver, other workers or
        # jobs) a spinning thread starves the partner it waits for and steps run 2-5x slower, at
        # any load average. A bounded loss beats an unbounded one, so PASSIVE is the default;
        # one thread per worker (what the scaling row favours) has no barriers and no choice to
        # make. A node that runs nothing else can set OMP_WAIT_POLICY=ACTIVE before `carousel train`.
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    # Workers read shards and write checkpoints with the driver's object-store credentials when it
    # has them (on clouds, node roles usually make these unnecessary).
    forwarded = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DS_ACCELERATOR",
                 *CREDENTIALS)
    for k in forwarded:
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def split_worker_env(env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(object-store credentials: the job's runtime env, the rest: the train workers' backend sets it)."""
    creds = {k: v for k, v in env.items() if k in CREDENTIALS}
    return creds, {k: v for k, v in env.items() if k not in creds}


def job_runtime_env() -> dict | None:
    """The driver's runtime env: only the credentials it forwards, when there are any. A runtime env
    sends every process of the job (Train's controller and helper actors, workers, tasks) through
    Ray's runtime-env agent before it starts, ~1.2 s of start-up (docs/performance.md); the other
    worker variables travel with the trainer's backend (train/process_group.py)."""
    creds = job_compatible(split_worker_env(worker_env())[0])
    return {"env_vars": creds} if creds else None


def job_compatible(env: dict[str, str]) -> dict[str, str]:
    """Inside a Ray job, leave out env vars the job's runtime_env already sets: Ray refuses to merge
    a driver's runtime_env with the job's when they share a key (the job's value wins anyway)."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_env}


def init_ray(address: str | None = None) -> bool:
    """Connect to the cluster at ``address`` (or RAY_ADDRESS), else start an embedded Ray.
    Returns True when this call started an embedded instance (nothing else will join it)."""
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray reads the auth mode when it is first imported: set it before that.
    os.environ.update(auth_env_for(address))
    # Ray folds log lines that differ only in numbers ("[repeated 18x across cluster]"): rank 0's
    # progress lines are exactly that, and folding hides most of them. Also read at import.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray

    if ray.is_initialized():
        return False
    runtime_env = job_runtime_env()
    if not address:
        # A fresh embedded instance ("local"): a bare ray.init() would attach to whatever cluster
        # `ray start` last left on this machine. Its dashboard (bound to 127.0.0.1) serves the
        # State API that Ray Train's controller monitoring queries.
        ray.init(address="local", runtime_env=runtime_env, logging_level="WARNING")
        return True
    try:
        ctx = ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
    except ConnectionError as e:
        hint = (
            "no Ray auth token found (set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or copy the cluster's "
            "~/.ray/auth_token)" if not token_available() else "is the cluster up, and is the token its own?"
        )
        raise RayConnectionError(f"cannot connect to the Ray cluster at {address}: {hint} ({e})") from None
    problem = auth_mismatch(os.environ.get("RAY_AUTH_MODE"), cluster_auth_mode(ctx.dashboard_url), address)
    if problem:
        ray.shutdown()
        raise RayConnectionError(problem)
    return False


class BackgroundFit:
    """``trainer.fit()`` running on a helper thread; ``wait()`` joins it in short, interruptible joins.

    A driver blocked in ``ray.get`` (where ``fit`` waits for the Train controller) never runs Python
    signal handlers: measured with Ray 2.60, a job driver given SIGTERM by ``ray job stop`` sat there
    until the supervisor's SIGKILL, and its MLflow run stayed RUNNING. Ray Train supports ``fit`` off
    the main thread (Tune does it), and the main thread then handles SIGTERM/SIGINT at once. The
    main thread may also work while the run starts (`carousel train` opens its MLflow run then).
    """

    def __init__(self, trainer):
        import threading

        self._box: dict = {}
        self._thread = threading.Thread(target=self._run, args=(trainer,), name="trainer.fit", daemon=True)
        self._thread.start()

    def _run(self, trainer) -> None:
        try:
            self._box["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
            self._box["error"] = e

    def wait(self):
        while self._thread.is_alive():
            self._thread.join(0.5)
        if "error" in self._box:
            raise self._box["error"]
        return self._box["result"]
