"""The tracking server against real faults and real attackers' first moves (issues #5 and #7).

Every part is real: `mlflow server` processes (sqlite and PostgreSQL backends, MLflow's basic-auth
app), `carousel train` on the session's `ray start` cluster, `carousel cluster up` with its Ray
token auth, and a throwaway PostgreSQL server started from Debian's binaries.

- A tracking server killed mid-run and restarted on the same port: training goes on meanwhile, and
  the run's history ends complete (every step exactly once) and FINISHED.
- A tracking server down at start, or refusing the login: `carousel train` fails in seconds with the
  URI in the message, before Ray or a run starts.
- `carousel cluster up --mlflow-auth --mlflow-backend postgresql://...`: anonymous requests get 401,
  the generated login lets a real job log its run (found in PostgreSQL's tables), no secret is on
  a command line, and every listening socket is on loopback or the node's IP.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, ROOT, free_port, run

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"


def http_status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class MlflowServer:
    """A real `mlflow server` (own session, so a kill takes its workers too) on a fixed port."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self, timeout: float = 120) -> float:
        t0 = time.time()
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        while not self.healthy():
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                raise RuntimeError(f"mlflow server did not come up:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        return time.time() - t0

    def healthy(self) -> bool:
        try:
            return http_status(f"{self.uri}/health") == 200
        except (urllib.error.URLError, OSError):  # nothing listening yet
            return False

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # no goodbye: a crash, not a shutdown
        self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _train_cmd(data, tmp_path, *sets):
    args = [BIN / "carousel", "train", JOB, "--set", f"data.path={data}", "--set", f"run.storage_path={tmp_path / 'runs'}"]
    for s in sets:
        args += ["--set", s]
    return [str(a) for a in args]


# ------------------------------------------------------------------ item 6: server down mid-run / at start


def test_tracking_server_killed_mid_run_loses_nothing_and_never_stalls_training(
        mlflow_server, kjv_tiny, cluster_env, tmp_path, monkeypatch):
    """Killed (SIGKILL) as soon as the first step is logged, back on the same port after >= 5 s plus
    its own start-up (which on a loaded machine takes a minute): enough training must remain for the
    restart, so the run is long (600 steps of the tiny model)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # this test's own polling: fail fast
    steps, every = 600, 100
    env = {**cluster_env, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    cmd = _train_cmd(kjv_tiny, tmp_path, f"train.max_steps={steps}", "train.log_every=1", f"train.eval_every={every}",
                     "train.eval_batches=2", "run.checkpoint_every=300", "tracking.experiment=outage",
                     "tracking.registered_model=kjv-lstm-outage")
    log = open(tmp_path / "train.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        c = _client(mlflow_server.uri)
        run_id = None
        deadline = time.time() + 600
        while True:  # kill the server as soon as training logs
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-5000:]
            assert time.time() < deadline, "training never logged a step"
            exp = c.get_experiment_by_name("outage")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            if runs and c.get_metric_history(runs[0].info.run_id, "train_loss"):
                run_id = runs[0].info.run_id
                break
            time.sleep(0.3)
        t_kill = time.time()
        mlflow_server.kill()
        time.sleep(5)
        restart_s = mlflow_server.start()
        t_back = time.time()
        alive_when_back = proc.poll() is None
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert rc == 0, out[-6000:]
    after_back = time.time() - t_back

    hist = c.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in hist) == list(range(1, steps + 1))  # every step, exactly once
    assert sorted(m.step for m in c.get_metric_history(run_id, "val_ppl")) == list(range(every, steps + 1, every))
    r = c.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.tags["carousel.status"] == "FINISHED"
    # The training thread went on while the server was down: points stamped then (by the training
    # thread, into the buffer) reached the server afterwards ...
    stamp = {m.step: m.timestamp / 1000 for m in hist}
    during = [s for s, t in stamp.items() if t_kill < t < t_back]
    assert len(during) >= 20, (t_kill, t_back, sorted(stamp.items())[:5])
    # ... and no step waited for it: one failed send takes ~5 s (connection refused, 2 retries), the
    # worst step-to-step gap in the outage is far below (evaluation steps excluded).
    gaps = [stamp[s + 1] - stamp[s] for s in during if s + 1 in stamp and s % every]
    worst_gap = max(gaps)
    assert worst_gap < 4, f"a training step waited {worst_gap:.1f}s on the dead server"
    print(f"outage {t_back - t_kill:.1f}s (server restart {restart_s:.1f}s, training "
          f"{'still running' if alive_when_back else 'already draining'} when it returned): {len(during)} steps "
          f"logged into the buffer meanwhile, worst step gap {worst_gap:.2f}s; run ended {after_back:.1f}s after "
          f"the server returned; total {time.time() - t0:.0f}s")


def test_tracking_server_down_at_start_fails_fast_before_anything_starts(kjv_tiny, cluster_env, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.time()
    proc = run(_train_cmd(kjv_tiny, tmp_path), cwd=tmp_path, env={**cluster_env, "MLFLOW_TRACKING_URI": uri},
               check=False, timeout=120)
    took = time.time() - t0
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"the MLflow tracking server at {uri} is not reachable (Connection refused)" in proc.stderr
    assert "Nothing was started" in proc.stderr and "starting run" not in proc.stdout
    assert not (tmp_path / "runs").exists()  # no run record, no checkpoint directory
    assert took < 60, took  # Python start-up and imports included (~25 s on a loaded machine); the check: <= 2 x 5 s
    print(f"down at start: refused in {took:.1f}s")


# ------------------------------------------------------------------ issue #5: cluster with PostgreSQL + basic auth


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server: its own data dir, 127.0.0.1 on a free port, password auth."""
    pg = _postgres_bin()
    if pg is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package `postgresql`, in the Makefile)")
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="carousel-pg-"))
    as_pg = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    password = "pg-" + os.urandom(9).hex()
    (root / "pw").write_text(password)
    if as_pg:
        os.chown(root / "pw", pw.pw_uid, pw.pw_gid)
    run([*as_pg, pg / "initdb", "-D", root / "data", "-U", "carousel", f"--pwfile={root / 'pw'}",
         "--auth=scram-sha-256", "--no-sync", "--no-instructions"], timeout=120)
    port = free_port()
    log = open(root / "postgres.log", "w")
    server = subprocess.Popen([*as_pg, pg / "postgres", "-D", root / "data", "-h", "127.0.0.1", "-p", str(port),
                               "-k", root, "-c", "fsync=off"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    dsn = dict(host="127.0.0.1", port=port, user="carousel", password=password)
    deadline = time.time() + 60
    while True:
        try:
            conn = psycopg.connect(dbname="postgres", autocommit=True, **dsn)
            break
        except psycopg.OperationalError:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError((root / "postgres.log").read_text()[-3000:])
            time.sleep(0.3)
    conn.execute("CREATE DATABASE mlflow")
    conn.close()
    try:
        yield {**dsn, "dbname": "mlflow", "uri": f"postgresql://carousel:{password}@127.0.0.1:{port}/mlflow"}
    finally:
        os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def carousel(*args, env, check=True, timeout=900):
    return run([BIN / "carousel", *args], cwd=ROOT, env=env, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory, postgres):
    """`carousel cluster up` with MLflow on PostgreSQL behind basic auth (one worker node: small)."""
    from carousel.cluster.local import down, load_state, mlflow_credentials

    state = tmp_path_factory.mktemp("auth-cluster") / "state"
    # A user's shell: none of this session's tracking settings (client() sets the HTTP bounds in-process).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
           "MLFLOW_TRACKING_PASSWORD", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    env.update(CAROUSEL_CLUSTER_DIR=str(state), PYTHONUNBUFFERED="1")
    t0 = time.time()
    carousel("cluster", "up", "--workers", "1", "--worker-cpus", "2", "--mlflow-auth",
             "--mlflow-backend", postgres["uri"], env=env, timeout=400)
    up_s = time.time() - t0
    st = load_state(state)
    try:
        yield {"state": state, "env": env, "st": st, "login": mlflow_credentials(state), "up_s": up_s}
    finally:
        down(state, log=lambda *_: None)


# Ray 2.60 binds these gRPC servers to every interface and has no option to narrow them (measured;
# docs/security.md): the GCS, each raylet's node manager and object manager, each dashboard agent's
# gRPC. Token auth guards them (test below). Its Prometheus exporter would too: `cluster up` turns
# it off unless asked (--ray-metrics). Everything else must stay on loopback or the node IP.
RAY_ALL_INTERFACES = {"gcs_server": ("--port",), "raylet": ("--node-manager-port", "--object-manager-port"),
                      "ray::DashboardAgent": ("--dashboard-agent-grpc-port",)}


def _cluster_processes(st) -> list:
    """What `up` started: the recorded processes, their descendants, and everything with the marker."""
    import psutil

    from carousel.cluster.local import marked_processes

    found = {p.pid: p for p in marked_processes(st.cluster_id)}
    for rec in st.processes:
        try:
            top = psutil.Process(rec.pid)
            for p in [top, *top.children(recursive=True)]:
                found.setdefault(p.pid, p)
        except psutil.Error:
            continue
    return list(found.values())


def _ports(st, flag: str) -> set[int]:
    return {int(a.split("=", 1)[1]) for p in st.processes for a in p.cmd if a.startswith(flag + "=")}


def test_every_listening_socket_of_the_cluster_is_on_loopback_or_the_node_ip(auth_cluster):
    import psutil

    st = auth_cluster["st"]
    procs = _cluster_processes(st)
    local_only = {"127.0.0.1", "::1", "::ffff:127.0.0.1", st.node_ip, f"::ffff:{st.node_ip}"}
    listening, wild = [], []
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):  # TCP listeners, bound UDP
                listening.append((name, c.laddr.ip, c.laddr.port))
                if c.laddr.ip not in local_only:
                    wild.append((name, c.laddr.ip, c.laddr.port))
    print(f"{len(procs)} processes, {len(listening)} listening sockets: "
          + ", ".join(f"{n}@{ip}:{port}" for n, ip, port in sorted(listening)))
    ours = {port for _, ip, port in listening if ip in ("127.0.0.1", "::ffff:127.0.0.1")}
    assert st.mlflow_port in ours and st.dashboard_port in ours  # the two HTTP front doors: loopback only
    # The all-interface ones are exactly those gRPC servers of Ray's, on the ports `up` chose for them.
    expected = {(name, port) for name, flags in RAY_ALL_INTERFACES.items() for f in flags for port in _ports(st, f)}
    assert {(n, port) for n, _, port in wild} <= expected, wild
    assert not _ports(st, "--metrics-export-port") & {port for _, _, port in listening}  # exporter off


def test_ray_core_refuses_a_driver_without_the_token(auth_cluster, tmp_path):
    """The GCS listens on every interface: a driver without the cluster's token must get nowhere."""
    env = {k: v for k, v in auth_cluster["env"].items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)  # a token, not the cluster's
    probe = (f"import ray; ray.init(address={auth_cluster['st'].gcs_address!r}, logging_level='ERROR'); "
             "print('CONNECTED', ray.cluster_resources())")
    t0 = time.time()
    proc = run([sys.executable, "-c", probe], env=env, check=False, timeout=300)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout, proc.stdout[-2000:]
    print(f"GCS refused a wrong token in {time.time() - t0:.1f}s: {proc.stderr.strip().splitlines()[-1][:300]}")


def test_ray_dashboard_and_jobs_api_refuse_requests_without_the_token(auth_cluster):
    from carousel.cluster.local import ray_auth_headers

    dash = auth_cluster["st"].dashboard_url
    for path in ("/api/jobs/", "/nodes?view=summary", "/api/v0/actors"):
        assert http_status(dash + path) == 401, path
        assert http_status(dash + path, {"Authorization": "Bearer " + "0" * 64}) in (401, 403), path
    assert http_status(dash + "/api/jobs/", ray_auth_headers()) == 200


def test_mlflow_refuses_anonymous_requests_and_cluster_env_logs_in(auth_cluster):
    st = auth_cluster["st"]
    assert http_status(f"{st.mlflow_uri}/health") == 200  # the one open route
    assert http_status(f"{st.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1") == 401
    assert http_status(f"{st.mlflow_uri}/ajax-api/2.0/mlflow/experiments/search?max_results=1") == 401
    # What `carousel cluster env` exports is enough for MLflow's own client.
    script = (f'eval "$({BIN / "carousel"} cluster env)" && '
              f'{sys.executable} -c "from mlflow.tracking import MlflowClient; '
              f'print([e.name for e in MlflowClient().search_experiments()])"')
    out = run(["bash", "-c", script], env=auth_cluster["env"]).stdout
    assert "Default" in out


def test_no_secret_on_a_command_line_or_in_cluster_json(auth_cluster, postgres):
    import stat

    from carousel.cluster.local import marked_processes

    st = auth_cluster["st"]
    _, admin = auth_cluster["login"]
    secrets = {"database password": postgres["password"], "admin password": admin}
    state_json = (auth_cluster["state"] / "cluster.json").read_text()
    for what, secret in secrets.items():
        assert secret not in state_json, what
        for p in marked_processes(st.cluster_id):
            assert secret not in " ".join(p.cmdline()), (what, p.pid, p.name())
    assert stat.S_IMODE((auth_cluster["state"] / "mlflow" / "admin-password").stat().st_mode) == 0o600
    assert stat.S_IMODE((auth_cluster["state"] / "mlflow" / "basic_auth.ini").stat().st_mode) == 0o600
    assert stat.S_IMODE((auth_cluster["state"] / "mlflow").stat().st_mode) == 0o700
    assert st.mlflow_backend == f"postgresql://carousel@127.0.0.1:{postgres['port']}/mlflow"


def test_job_logs_its_run_with_the_generated_login_into_postgres(auth_cluster, postgres, kjv_tiny):
    import psycopg

    env = auth_cluster["env"]
    t0 = time.time()
    sub = carousel("submit", JOB, "--set", f"data.path={kjv_tiny}", "--set", "train.max_steps=20",
                   "--set", "train.eval_every=10", "--set", "run.checkpoint_every=10", env=env)
    m = re.search(r"^submitted (\S+)", sub.stdout, re.M)
    assert m, sub.stdout
    job_id = m.group(1)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = carousel("jobs", "status", job_id, env=env).stdout.split(":", 1)[1].split()[0]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    assert status == "SUCCEEDED", carousel("jobs", "logs", job_id, env=env).stdout[-6000:]
    job_s = time.time() - t0

    user, password = auth_cluster["login"]
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    try:
        c = _client(auth_cluster["st"].mlflow_uri)
        (r,) = c.search_runs([c.get_experiment_by_name("carousel-tests").experiment_id])
        assert r.info.status == "FINISHED"
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val_ppl")] == [10, 20]
        mv = c.get_model_version_by_alias("kjv-lstm-tiny", "best")
        assert mv.run_id == r.info.run_id
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME")
        os.environ.pop("MLFLOW_TRACKING_PASSWORD")
    # ... and it is PostgreSQL that holds them.
    with psycopg.connect(**{k: postgres[k] for k in ("host", "port", "user", "password", "dbname")}) as conn:
        cur = conn.cursor()
        cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (r.info.run_id,))
        assert cur.fetchall() == [("lm-kjv-tiny", "FINISHED")]
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'val_ppl'", (r.info.run_id,))
        assert cur.fetchone() == (2,)
        cur.execute("SELECT name, version FROM model_versions WHERE run_id = %s", (r.info.run_id,))
        assert cur.fetchall() == [("kjv-lstm-tiny", int(mv.version))]
    print(f"cluster up {auth_cluster['up_s']:.1f}s (PostgreSQL backend, basic auth); job {job_s:.1f}s")


@pytest.mark.parametrize("login", ["wrong", "none"])
def test_a_refused_login_fails_fast_with_a_clear_error(auth_cluster, kjv_tiny, tmp_path, login):
    uri = auth_cluster["st"].mlflow_uri
    env = {**auth_cluster["env"], "MLFLOW_TRACKING_URI": uri}
    if login == "wrong":
        env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="not-the-password")
    t0 = time.time()
    proc = run(_train_cmd(kjv_tiny, tmp_path), cwd=tmp_path, env=env, check=False, timeout=120)
    took = time.time() - t0
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    expected = ("refused the login of user 'admin'" if login == "wrong" else "requires a login and none was given")
    assert f"the MLflow tracking server at {uri}" in proc.stderr and expected in proc.stderr
    assert not (tmp_path / "runs").exists() and took < 60
    print(f"{login} login refused in {took:.1f}s")
