"""A real multi-node Ray cluster on one machine, plus an MLflow tracking server: `carousel cluster up|down|status`.

Every node is its own ``ray start --block`` process (own node id, resources and ports); the MLflow
server is ``mlflow server --serve-artifacts`` bound to 127.0.0.1. Each process starts in a session
of its own and carries ``CAROUSEL_CLUSTER_ID`` in its environment, which Ray passes on to every
raylet worker and job driver it spawns. ``down`` signals the process groups it recorded, then
sweeps the (few) descendants that live in sessions of their own (Ray job drivers) by that marker:
it stops exactly what ``up`` started, never another cluster on the machine (``ray stop`` would).

The state directory holds ``cluster.json`` (ports, addresses, PIDs), ``logs/``, the shared
``storage/`` for checkpoints and the MLflow store.

Secrets stay out of command lines and ``cluster.json`` (both readable by any local user via ``ps``
or the file): a database password given in ``--mlflow-backend`` is cut out of the URI and handed to
the MLflow server alone as ``PGPASSWORD``; the basic-auth admin password lives in a 0600 file. See
docs/security.md for what the local cluster does and does not protect.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "cluster.json"
STATE_FILE_LAST = "cluster.last.json"
MARKER = "CAROUSEL_CLUSTER_ID"
WORKER_RESOURCE = "carousel_worker_node"
ADMIN_PASSWORD_FILE = "mlflow/admin-password"  # under the state dir, mode 0600


class ClusterError(RuntimeError):
    pass


def default_state_dir() -> Path:
    return Path(os.environ.get("CAROUSEL_CLUSTER_DIR") or Path.home() / ".carousel" / "cluster")


@dataclass
class ClusterConfig:
    workers: int = 2
    head_cpus: int = 0  # training workers land on worker nodes
    worker_cpus: int = 1
    worker_gpus: int = 0
    object_store_mb: int = 256
    storage: str | None = None  # shared checkpoint storage; default <state>/storage
    mlflow_backend: str | None = None  # default sqlite:///<state>/mlflow/mlflow.db; postgresql://user[:pass]@host/db
    mlflow_auth: bool = False  # MLflow's basic-auth app
    dashboard_port: int | None = None
    mlflow_port: int | None = None
    job_stop_wait_s: int = 30  # SIGTERM -> SIGKILL grace for stopped jobs (Ray's default is 3 s)
    ray_metrics: bool = False  # Ray's Prometheus exporter: it listens on every interface, and nothing here scrapes it


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: str
    pid: int = 0
    create_time: float = 0.0


@dataclass
class ClusterState:
    cluster_id: str
    state_dir: str
    node_ip: str
    gcs_port: int
    dashboard_port: int
    client_port: int
    mlflow_port: int
    storage: str
    mlflow_backend: str
    mlflow_artifacts: str
    mlflow_auth: bool
    config: dict
    temp_root: str = ""
    processes: list[Proc] = field(default_factory=list)
    started: float = 0.0
    up_seconds: float = 0.0

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(gcs_address=self.gcs_address, dashboard_url=self.dashboard_url, mlflow_uri=self.mlflow_uri)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ClusterState":
        d = {k: v for k, v in d.items() if k not in ("gcs_address", "dashboard_url", "mlflow_uri")}
        d["processes"] = [Proc(**p) for p in d.get("processes", [])]
        return cls(**d)


# ---------------------------------------------------------------- pure planning (unit-tested)


def ephemeral_ports() -> tuple[int, int]:
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "") -> int:
    """A port free on every address, below the kernel's ephemeral range when there is room there.

    A port the kernel hands out (bind to 0) is one it can hand out again: every Ray worker process
    binds random ephemeral ports, and one of the head's can take a port planned for a node that is
    not started yet; that raylet then cannot bind, never registers, and ``ray start`` gives up
    after its fixed 30 s (seen in CI, on both attempts, as the holder kept the port).
    """
    lo, _ = ephemeral_ports()
    floor = 20000 if lo > 20000 + 1000 else None
    if floor is not None:
        rng = secrets.SystemRandom()
        for _ in range(200):
            port = rng.randrange(floor, lo)
            if port_free(port, host):
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def split_db_password(uri: str) -> tuple[str, str | None]:
    """``postgresql://user:pass@host/db`` -> (``postgresql://user@host/db``, ``pass``): the URI that may be
    shown and stored, and the secret (None when the URI has none: libpq then reads $PGPASSWORD / ~/.pgpass)."""
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(uri)
    except ArgumentError:
        raise ClusterError(f"--mlflow-backend: {uri!r} is not a database URI (sqlite:///PATH or "
                           "postgresql://USER@HOST:PORT/DB)") from None
    if u.password is None:
        return uri, None
    bare = URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database, query=u.query)
    return bare.render_as_string(hide_password=False), str(u.password)


def backend_driver(backend: str) -> str | None:
    """The Python module SQLAlchemy (2.1, MLflow's) loads for this URI (pure: unit-tested)."""
    scheme = backend.split("://", 1)[0]
    if scheme in ("postgresql", "postgresql+psycopg"):
        return "psycopg"  # SQLAlchemy 2.1's default PostgreSQL driver: psycopg 3
    if scheme == "postgresql+psycopg2":
        return "psycopg2"
    return None


def check_backend_driver(backend: str) -> None:
    """A PostgreSQL backend needs its driver in this venv: say so before the server dies of it."""
    import importlib.util

    module = backend_driver(backend)
    if module and importlib.util.find_spec(module) is None:
        package = "'carousel-lstm[postgres]' (psycopg 3)" if module == "psycopg" else "psycopg2-binary"
        raise ClusterError(f"--mlflow-backend {backend.split('://', 1)[0]}://... needs the {module} driver: "
                           f"pip install {package}")


METRICS_OFF = 65536  # a port no server can bind: see process_env
# Ray's log monitor globs the session's log directory for new files on every 0.1 s pass; beyond
# this many files it does so every LOG_NAME_UPDATE_INTERVAL_S instead. A threshold of 0 makes
# that the rule: a new worker's log is found within 1 s (read from its start, nothing is lost) and
# the monitor's CPU fell from 1.1-1.2 % to 0.4-0.5 % of a core during training on 2 cores, where
# it was the busiest process besides the workers (docs/performance.md, scaling).
QUIET_LOG_MONITOR = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "1.0"}
# Per node: fixed defaults (agent port 52365, ...) would collide between nodes on one machine.
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def plan(cfg: ClusterConfig, state_dir: Path, ip: str, port=free_port) -> ClusterState:
    """Decide ports, paths and every command line; starts nothing."""
    state_dir = state_dir.resolve()
    if cfg.workers < 1:
        raise ClusterError("--workers must be at least 1")
    backend, _ = split_db_password(cfg.mlflow_backend or f"sqlite:///{state_dir / 'mlflow' / 'mlflow.db'}")
    config = asdict(cfg)
    config["mlflow_backend"] = backend  # never the password
    used: set[int] = set()

    def new_port() -> int:  # distinct within the plan: nothing binds them until the nodes start
        while (p := port()) in used:
            pass
        used.add(p)
        return p

    st = ClusterState(
        cluster_id=secrets.token_hex(8),
        state_dir=str(state_dir),
        node_ip=ip,
        gcs_port=new_port(),
        dashboard_port=cfg.dashboard_port or new_port(),
        client_port=new_port(),
        mlflow_port=cfg.mlflow_port or new_port(),
        storage=str(Path(cfg.storage).resolve()) if cfg.storage else str(state_dir / "storage"),
        mlflow_backend=backend,
        mlflow_artifacts=str(state_dir / "mlflow" / "artifacts"),
        mlflow_auth=cfg.mlflow_auth,
        config=config,
    )
    # Each node its own Ray temp dir: nodes sharing one would share (and delete each other's)
    # runtime_env working_dir copies, socket names and log files. Short, for unix socket paths.
    if cfg.ray_metrics:
        st.config.update(autoscaler_metric_port=new_port(), dashboard_metric_port=new_port())
    st.temp_root = f"/tmp/carousel-{st.cluster_id}"
    ray = [sys.executable, "-m", "carousel.cluster.ray_node"]  # `ray start`, patient with a busy machine
    logs = state_dir / "logs"
    mem = str(cfg.object_store_mb * 1024 * 1024)

    def node_ports() -> list[str]:
        return [*(f"{flag}={new_port()}" for flag in NODE_PORT_FLAGS), "--min-worker-port=0", "--max-worker-port=0"]

    head = [
        *ray, "start", "--head", "--block", f"--node-ip-address={ip}", f"--port={st.gcs_port}",
        f"--num-cpus={cfg.head_cpus}", "--num-gpus=0", f"--object-store-memory={mem}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={st.dashboard_port}",
        f"--ray-client-server-port={st.client_port}", "--disable-usage-stats", f"--temp-dir={st.temp_root}/head",
        *node_ports(),
    ]
    st.processes.append(Proc("ray-head", head, str(logs / "ray-head.log")))
    for i in range(1, cfg.workers + 1):
        cmd = [
            *ray, "start", "--block", f"--address={st.gcs_address}", f"--node-ip-address={ip}",
            f"--num-cpus={cfg.worker_cpus}", f"--num-gpus={cfg.worker_gpus}", f"--object-store-memory={mem}",
            f"--resources={json.dumps({WORKER_RESOURCE: 1})}", "--disable-usage-stats", f"--temp-dir={st.temp_root}/w{i}",
            *node_ports(),
        ]
        st.processes.append(Proc(f"ray-worker-{i}", cmd, str(logs / f"ray-worker-{i}.log")))
    mlflow = [
        sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", st.mlflow_artifacts,
        "--host", "127.0.0.1", "--port", str(st.mlflow_port), "--workers", "1",
    ]
    if cfg.mlflow_auth:
        mlflow += ["--app-name", "basic-auth"]
    st.processes.append(Proc("mlflow", mlflow, str(logs / "mlflow.log")))
    return st


def process_env(st: ClusterState, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process the cluster runs (and so of its Ray workers and job drivers)."""
    env = dict(os.environ if base is None else base)
    env.update({
        MARKER: st.cluster_id,
        # Ray code that looks its cluster up by itself (Ray Train's PlacementGroupCleaner queries the
        # State API with no address) would otherwise pick any GCS running on this machine.
        "RAY_ADDRESS": st.gcs_address,
        # Job entrypoints run `carousel train`: the venv's bin dir goes on PATH, *last*, so every other
        # tool resolves as it does elsewhere on this machine. (First, the venv's pip `ninja` replaced
        # /usr/bin/ninja for DeepSpeed's JIT ops; their build logs disagree, and each flipped the shared
        # ~/.cache/torch_extensions build to a full ~2 min rebuild on every run.)
        "PATH": os.pathsep.join(p for p in (env.get("PATH", ""), str(Path(sys.executable).parent)) if p),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        # `ray start --block` drains its node for up to 30 s on SIGTERM (for Serve); nothing to drain here.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_JOB_STOP_WAIT_TIME_S": str(st.config.get("job_stop_wait_s", 30)),
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        # Off unless asked: each node's metrics exporter would listen on 0.0.0.0 (Ray offers no bind option).
        "RAY_enable_metrics_collection": "1" if st.config.get("ray_metrics") else "0",
        # The head's autoscaler monitor and dashboard also serve Prometheus metrics, on fixed ports
        # (44217, 44227) of every interface, whenever prometheus_client is installed; that setting
        # does not reach them and Ray has no other. An out-of-range port makes each fail to bind (they
        # log it and go on). With --ray-metrics they get ports of their own, so clusters don't collide.
        "AUTOSCALER_METRIC_PORT": str(st.config.get("autoscaler_metric_port") or METRICS_OFF),
        "DASHBOARD_METRIC_PORT": str(st.config.get("dashboard_metric_port") or METRICS_OFF),
        # Jobs submitted with plain `ray job submit` track to this cluster's server too.
        "MLFLOW_TRACKING_URI": st.mlflow_uri,
        "CAROUSEL_STORAGE_PATH": st.storage,
        **{k: env.get(k, v) for k, v in QUIET_LOG_MONITOR.items()},  # the user's own values win
        "PYTHONUNBUFFERED": "1",
    })
    for k in SERVER_ONLY:
        env.pop(k, None)
    if st.mlflow_auth:
        # Jobs log as the admin: on a single-user local cluster every job runs as the user who started it.
        user, password = mlflow_credentials(Path(st.state_dir))
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


# Only the MLflow server needs these; Ray's processes (and so every job) do not get them.
SERVER_ONLY = ("PGPASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_CONFIG_PATH")


def mlflow_server_env(st: ClusterState, env: dict[str, str], db_password: str | None,
                      base: dict[str, str] | None = None) -> dict[str, str]:
    """The MLflow server's environment: the cluster's, plus the database password and auth settings."""
    base = os.environ if base is None else base
    # MLflow 3's job runner (GenAI evaluation jobs) would start several ~250 MB huey consumer
    # processes beside the server; nothing here queues such jobs.
    out = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
    if db_password is not None:
        out["PGPASSWORD"] = db_password
    elif "PGPASSWORD" in base:
        out["PGPASSWORD"] = base["PGPASSWORD"]
    if st.mlflow_auth:
        out.update(MLFLOW_AUTH_CONFIG_PATH=str(Path(st.state_dir) / "mlflow" / "basic_auth.ini"),
                   MLFLOW_FLASK_SERVER_SECRET_KEY=_secret(Path(st.state_dir) / "mlflow" / "flask-secret"))
    return out


def _secret(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def mlflow_credentials(state_dir: Path) -> tuple[str, str]:
    """The basic-auth admin of this cluster's MLflow server (password generated once, mode 0600)."""
    return "admin", _secret(state_dir / ADMIN_PASSWORD_FILE)


def write_auth_config(state_dir: Path) -> Path:
    user, password = mlflow_credentials(state_dir)
    ini = state_dir / "mlflow" / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{state_dir / 'mlflow' / 'basic_auth.db'}\n"
        f"admin_username = {user}\n"
        f"admin_password = {password}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    ini.chmod(0o600)
    return ini


# ---------------------------------------------------------------- process bookkeeping


def _alive(p: Proc) -> bool:
    import psutil

    try:
        proc = psutil.Process(p.pid)
        return abs(proc.create_time() - p.create_time) < 0.5 and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def marked_processes(cluster_id: str) -> list:
    """Every process on the machine carrying this cluster's marker (ours: same user)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(MARKER) == cluster_id:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def port_free(port: int, host: str = "") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _keep_ports(cfg: ClusterConfig, previous: "ClusterState | None") -> ClusterConfig:
    """The same dashboard and MLflow ports as last time, when free: run records and bookmarks keep
    the tracking URI, so a run resumed on a restarted cluster still reaches its MLflow server."""
    if previous is None:
        return cfg
    cfg = ClusterConfig(**asdict(cfg))
    if cfg.dashboard_port is None and port_free(previous.dashboard_port):
        cfg.dashboard_port = previous.dashboard_port
    if cfg.mlflow_port is None and port_free(previous.mlflow_port):
        cfg.mlflow_port = previous.mlflow_port
    return cfg


def load_state(state_dir: Path, name: str = STATE_FILE) -> ClusterState | None:
    f = state_dir / name
    if not f.exists():
        return None
    return ClusterState.from_json(json.loads(f.read_text()))


def _save(st: ClusterState) -> None:
    f = Path(st.state_dir) / STATE_FILE
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(st.to_json(), indent=2))
    tmp.replace(f)


@contextlib.contextmanager
def _locked(state_dir: Path):
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _spawn(p: Proc, env: dict[str, str]) -> None:
    import psutil

    Path(p.log).parent.mkdir(parents=True, exist_ok=True)
    with open(p.log, "ab") as log:
        log.write(f"\n$ {shlex.join(p.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(p.cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=Path(p.log).parent.parent)
    p.pid = proc.pid
    p.create_time = psutil.Process(proc.pid).create_time()


def _wait_for(what: str, check, procs: list[Proc], timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        if check():
            return
        for p in procs:
            if not _alive(p):
                raise ClusterError(f"{p.name} exited while waiting for {what}; its log ({p.log}) ends:\n"
                                   + _tail(p.log))
        if time.time() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def _tail(path: str, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def _log_has(p: Proc, text: str) -> bool:
    return text in _tail(p.log, 10**6)


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=3) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def ray_auth_headers() -> dict[str, str]:
    from carousel.ray_session import read_token

    token = read_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_get(dashboard_url: str, path: str, timeout: float = 10) -> dict:
    """GET a Ray dashboard JSON endpoint with the auth token (e.g. the State API: /api/v0/actors?...)."""
    req = urllib.request.Request(f"{dashboard_url}{path}", headers=ray_auth_headers())
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def alive_nodes(st: ClusterState) -> int:
    try:
        data = dashboard_get(st.dashboard_url, "/nodes?view=summary", timeout=5)
    except (urllib.error.URLError, OSError, ValueError):
        return 0
    summary = data.get("data", {}).get("summary", [])
    return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")


# ---------------------------------------------------------------- up / down / status


def up(cfg: ClusterConfig, state_dir: Path | None = None, timeout: float = 180, log=print) -> ClusterState:
    """Start the cluster (or report the running one): head, workers, MLflow server; wait until ready."""
    from carousel.ray_session import ensure_token

    state_dir = (state_dir or default_state_dir()).resolve()
    with _locked(state_dir):
        old = load_state(state_dir)
        if old is not None:
            dead = [p.name for p in old.processes if not _alive(p)]
            if not dead:
                log(f"cluster already up (state {state_dir})")
                return old
            log(f"cluster in {state_dir} is partly down ({', '.join(dead)} not running): restarting it")
            _stop(old, log)
        t0 = time.time()
        token_path = ensure_token()
        cfg = _keep_ports(cfg, old or load_state(state_dir, STATE_FILE_LAST))
        st = plan(cfg, state_dir, node_ip())
        Path(st.storage).mkdir(parents=True, exist_ok=True)
        Path(st.mlflow_artifacts).mkdir(parents=True, exist_ok=True)
        (state_dir / "mlflow").chmod(0o700)  # the tracking database, auth store and secrets: this user's only
        if cfg.mlflow_auth:
            write_auth_config(state_dir)
        env = process_env(st)
        _, db_password = split_db_password(cfg.mlflow_backend or st.mlflow_backend)
        check_backend_driver(st.mlflow_backend)
        st.started = t0
        head, *workers, mlflow = st.processes
        try:
            _spawn(mlflow, mlflow_server_env(st, env, db_password))
            _start_node(st, head, env, [], timeout, log)
            for w in workers:
                # One at a time: nodes of one session pick their socket names from what already exists.
                _start_node(st, w, env, [head], timeout, log)
            _wait_for(f"{len(workers)} Ray worker nodes", lambda: alive_nodes(st) == len(workers) + 1,
                      [head, *workers], timeout)
            _wait_for("the MLflow server", lambda: _http_ok(f"{st.mlflow_uri}/health"), [mlflow], timeout)
        except BaseException:
            _stop(st, log)
            raise
        st.up_seconds = round(time.time() - t0, 1)
        _save(st)
        log(f"cluster up in {st.up_seconds:.1f}s (token {token_path})")
        return st


RAY_START_TIMED_OUT = "timed out during startup"  # the raylet never registered (see ray_node.py)


def with_fresh_node_ports(cmd: list[str], port=free_port) -> list[str]:
    """The same ``ray start`` command with new per-node ports (not the GCS/dashboard ports others use)."""
    out = []
    for arg in cmd:
        flag = arg.split("=", 1)[0]
        out.append(f"{flag}={port()}" if flag in NODE_PORT_FLAGS else arg)
    return out


def _start_node(st: ClusterState, p: Proc, env: dict[str, str], needed: list[Proc], timeout: float, log) -> None:
    """``ray start`` one node; up to twice more, on fresh ports, if its raylet never registered."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        _spawn(p, env)
        _save(st)  # from here on `down` can clean up even if we fail
        try:
            _wait_for(p.name, lambda: _log_has(p, "Ray runtime started"), [*needed, p], timeout)
            return
        except ClusterError as e:
            retry = attempt < attempts and not _alive(p) and _log_has(p, RAY_START_TIMED_OUT)
            if not retry or not all(map(_alive, needed)):
                raise ClusterError(f"{e}\n{_raylet_logs(p)}") from None
        log(f"{p.name}: its raylet did not register in time (busy machine or a taken port?); "
            f"starting it again on fresh ports\n{_raylet_logs(p, 600)}")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever that attempt left in its group
        time.sleep(10 * attempt)  # let whatever kept the machine busy finish
        p.cmd = with_fresh_node_ports(p.cmd)


def _raylet_logs(p: Proc, n: int = 2000) -> str:
    """The tails of the node's own raylet logs: ``ray start`` only says that the raylet never registered."""
    temp = next((a.split("=", 1)[1] for a in p.cmd if a.startswith("--temp-dir=")), None)
    if temp is None:
        return ""
    logs = Path(temp) / "session_latest" / "logs"
    parts = [f"--- {f} ends:\n{_tail(str(f), n)}" for f in (logs / "raylet.out", logs / "raylet.err")
             if f.exists() and f.stat().st_size]
    return "\n".join(parts) or f"(no raylet logs in {logs})"


def _stop(st: ClusterState, log=print, grace: float = 15) -> list[str]:
    import psutil

    stopped = []
    # All at once: a raylet whose GCS went first waits ~30 s for it before exiting.
    for p in st.processes:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)  # its own session: pgid == pid
            stopped.append(p.name)
    deadline = time.time() + grace
    while time.time() < deadline and any(_alive(p) for p in st.processes):
        time.sleep(0.2)
    for p in st.processes:
        if _alive(p):
            log(f"{p.name} still running {grace:.0f}s after SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
    # What is left: the rest of those process groups, and job drivers and their watchers, which
    # run in sessions of their own. All carry the marker (and only ours do): a group kill on a
    # recycled pgid could hit a stranger, this cannot.
    for sig_wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        left = marked_processes(st.cluster_id)
        if not left:
            break
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig_wait[0])
        psutil.wait_procs(left, timeout=sig_wait[1])
    if st.temp_root.startswith("/tmp/carousel-"):
        # Keep the job drivers' logs (the Jobs API's `logs`) with the cluster's own, then drop Ray's temp dirs.
        jobs = Path(st.state_dir) / "logs" / "jobs"
        for f in Path(st.temp_root).glob("head/session_*/logs/job-driver-*.log"):
            jobs.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copy2(f, jobs / f.name)
        shutil.rmtree(st.temp_root, ignore_errors=True)
    return stopped


def down(state_dir: Path | None = None, log=print) -> bool:
    """Stop what `up` started. Returns False when there was nothing to stop."""
    state_dir = (state_dir or default_state_dir()).resolve()
    with _locked(state_dir):
        st = load_state(state_dir)
        if st is None:
            log(f"no cluster in {state_dir}")
            return False
        t0 = time.time()
        stopped = _stop(st, log)
        left = marked_processes(st.cluster_id)
        if left:
            raise ClusterError(f"processes still running after down: {[p.pid for p in left]}")
        (state_dir / STATE_FILE).replace(state_dir / STATE_FILE_LAST)
        log(f"cluster down in {time.time() - t0:.1f}s (stopped {', '.join(stopped) or 'nothing: already stopped'}); "
            f"logs and storage kept in {state_dir}")
        return True


def status(state_dir: Path | None = None) -> dict | None:
    state_dir = (state_dir or default_state_dir()).resolve()
    st = load_state(state_dir)
    if st is None:
        return None
    procs = {p.name: {"pid": p.pid, "alive": _alive(p), "log": p.log} for p in st.processes}
    return {
        "state_dir": st.state_dir,
        "up": all(v["alive"] for v in procs.values()),
        "ray_address": st.gcs_address,
        "dashboard": st.dashboard_url,
        "mlflow": st.mlflow_uri,
        "mlflow_auth": st.mlflow_auth,
        "storage": st.storage,
        "alive_nodes": alive_nodes(st) if procs["ray-head"]["alive"] else 0,
        "processes": procs,
        "marked_processes": len(marked_processes(st.cluster_id)),
    }
