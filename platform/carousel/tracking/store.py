"""Where MLflow lives: the spec's URI, else $MLFLOW_TRACKING_URI, else a sqlite store here.

Also how long a tracking server may hold Carousel: MLflow's HTTP client retries a failed request
7 times with exponential backoff (about 4 minutes against a refused port) and waits up to 120 s for
an answer. Carousel's processes use ``HTTP_BOUNDS`` instead unless the user set those variables,
and ``require_tracking_server`` turns an unreachable or refusing server into one clear error before
anything starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

# MLflow is imported where it is used, not here: importing it (with its SQL store) costs the
# driver ~2 s, and `carousel train` resolves the URI long before it needs a client (the run is
# opened while the workers start: train/launcher.py).

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"

# Measured (tests/integration/test_metric_logger.py): a call to a refused port fails after
# ~4-5 s (urllib3 waits 0, then 2*2 s + up to 1 s jitter); a server that accepts but never answers
# holds a call for at most 3 x 10 s + 5 s. Training never waits on either: rank 0's MetricLogger
# sends from a background thread. The same defaults go to the Ray workers (ray_session.worker_env).
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached, or refuses our credentials."""


def bound_http_requests(environ=None) -> dict[str, str]:
    """Apply ``HTTP_BOUNDS`` where the user has not chosen values. MLflow reads these variables at
    every request and offers no per-client argument, hence the process environment."""
    environ = os.environ if environ is None else environ
    for k, v in HTTP_BOUNDS.items():
        environ.setdefault(k, v)
    return {k: environ[k] for k in HTTP_BOUNDS}


def resolve_tracking_uri(uri: str | None = None, workdir: str | Path | None = None) -> str:
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    base = Path(workdir or os.getcwd()).resolve()
    return f"sqlite:///{base / DEFAULT_DB}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """Artifacts beside a local sqlite store; a tracking server chooses its own (served artifacts)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / DEFAULT_ARTIFACTS).as_uri()
    return None


def client(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    bound_http_requests()
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def worth_retrying(e: Exception) -> bool:
    """Whether a failed MLflow call may succeed later (pure: unit-tested).

    Unreachable servers, timeouts and 5xx come back as MlflowException with a 5xx status; 401/403
    (credentials about to be fixed), 408 and 429 are transient too. Any other 4xx (invalid value,
    deleted run) fails the same way every time.
    """
    from mlflow.exceptions import MlflowException

    if not isinstance(e, MlflowException):
        return True
    status = e.get_http_status_code()
    return not (400 <= status < 500) or status in (401, 403, 408, 429)


def retry_while_unreachable(call, tracking_uri: str, what: str, timeout: float = 60.0, pause: float = 2.0):
    """``call()``, again while the server is unreachable, for up to ``timeout`` s; then TrackingUnavailable.

    For the driver's last words (the run's final status): a server restarting just then must not
    turn a finished training into a crash, and a server gone for good must not hang it.
    """
    deadline = time.time() + timeout
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified below
            if not worth_retrying(e):
                raise
            if time.time() > deadline:
                raise TrackingUnavailable(f"the MLflow tracking server at {tracking_uri} stayed unreachable for "
                                          f"{timeout:.0f} s: could not {what} ({_root_cause(e)})") from None
            time.sleep(pause)


def is_server_uri(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def describe_refusal(tracking_uri: str, status: int, user: str | None, body: str = "") -> str:
    """The message for a tracking server that answered but said no (pure: unit-tested)."""
    if status == 401 and not user:
        return (f"the MLflow tracking server at {tracking_uri} requires a login and none was given: set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (for `carousel cluster up --mlflow-auth`: "
                "eval \"$(carousel cluster env)\")")
    if status == 401:
        return (f"the MLflow tracking server at {tracking_uri} refused the login of user {user!r} "
                "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): wrong password or unknown user")
    if status == 403:
        return f"the MLflow tracking server at {tracking_uri} does not let user {user!r} read experiments (HTTP 403)"
    return f"the MLflow tracking server at {tracking_uri} answered HTTP {status}: {body[:300]}"


def server_auth(environ=None, credentials_file: str = "~/.mlflow/credentials") -> dict | None:
    """How MLflow's client would authenticate to a tracking server, as ``requests`` arguments
    (pure but for reading ``credentials_file``: unit-tested), or None for auth only MLflow can do
    (AWS SigV4, an auth plug-in).

    By hand because the start-up check runs before anything else, and MLflow's own lookup
    (``mlflow.utils.credentials.get_default_host_creds``) can only be imported with all of MLflow:
    ~2 s of `carousel train`'s start-up (docs/performance.md). Same sources, same precedence:
    MLFLOW_TRACKING_USERNAME / _PASSWORD from the environment, else the ``[mlflow]`` section of
    ~/.mlflow/credentials; else MLFLOW_TRACKING_TOKEN; the TLS settings as MLflow reads them.
    """
    import configparser

    env = os.environ if environ is None else environ
    truthy = ("true", "1")
    if env.get("MLFLOW_TRACKING_AWS_SIGV4", "").lower() in truthy or env.get("MLFLOW_TRACKING_AUTH"):
        return None
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    path = os.path.expanduser(credentials_file)
    if os.path.exists(path):
        cfg = configparser.ConfigParser()
        cfg.read(path)
        if "mlflow" in cfg:
            user = user or cfg["mlflow"].get("mlflow_tracking_username")
            password = password or cfg["mlflow"].get("mlflow_tracking_password")
    out: dict = {"user": user, "auth": None, "headers": {}}
    if user and password:
        out["auth"] = (user, password)
    elif env.get("MLFLOW_TRACKING_TOKEN"):
        out["headers"] = {"Authorization": f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"}
    insecure = env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in truthy
    out["verify"] = False if insecure else (env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True)
    out["cert"] = env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH")
    return out


def require_tracking_server(tracking_uri: str, timeout: int = 5, retries: int = 1) -> None:
    """Raise TrackingUnavailable unless the server answers an authenticated read, within about
    ``(retries + 1) * timeout`` seconds. Other stores (sqlite, postgresql://...) are not checked here.

    Called before Ray or an MLflow run starts: a run whose tracking server is down at start fails
    at once with the URI in the message, rather than training with nowhere to put its run. (A server
    that goes away *during* training is different: rank 0 keeps the points and sends them later.)
    """
    if not is_server_uri(tracking_uri):
        return
    path, params = "/api/2.0/mlflow/experiments/search", {"max_results": 1}
    auth = server_auth()
    if auth is None:  # auth only MLflow's own client can do (SigV4, plug-ins)
        from mlflow.exceptions import MlflowException
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        creds = get_default_host_creds(tracking_uri)
        user, unreachable = creds.username, MlflowException

        def get():
            return http_request(creds, path, "GET", params=params, max_retries=retries, backoff_factor=1,
                                backoff_jitter=0, timeout=timeout, raise_on_status=False)
    else:
        import requests
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        session = requests.Session()
        session.mount(tracking_uri, HTTPAdapter(max_retries=Retry(total=retries, backoff_factor=1, raise_on_status=False)))
        user, unreachable = auth["user"], requests.RequestException

        def get():
            return session.get(f"{tracking_uri.rstrip('/')}{path}", params=params, auth=auth["auth"],
                               headers=auth["headers"], verify=auth["verify"], cert=auth["cert"], timeout=timeout)
    try:
        resp = get()
    except unreachable as e:
        raise TrackingUnavailable(
            f"the MLflow tracking server at {tracking_uri} is not reachable ({_root_cause(e)}); start it, or "
            "point tracking.uri / MLFLOW_TRACKING_URI at one that runs. Nothing was started."
        ) from None
    if resp.status_code != 200:
        raise TrackingUnavailable(describe_refusal(tracking_uri, resp.status_code, user, resp.text))


def _root_cause(e: Exception) -> str:
    """The innermost reason of a requests/urllib3 failure ("Connection refused", "timed out")."""
    text = str(e)
    for marker in ("Connection refused", "timed out", "Name or service not known", "No route to host",
                   "Connection reset", "certificate verify failed"):
        if marker in text:
            return marker
    return text[:300]


def ensure_experiment(c: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return c.create_experiment(name, artifact_location=default_artifact_root(tracking_uri))
    except MlflowException:
        # Another driver created it between our lookup and create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
