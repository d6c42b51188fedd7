"""Pure parts of `carousel submit` / `jobs` / `cluster`: runtime_env, excludes, command lines, state. No Ray."""

import itertools
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from carousel.cluster import local
from carousel.config import load_spec
from carousel.jobs.client import EXCLUDES, JobsError, build_submission, repo_root
from carousel import ray_session

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"


def _spec(**paths):
    spec = load_spec(JOB, [f"{k.replace('__', '.')}={v}" for k, v in paths.items()])
    return spec


def test_submission_runs_carousel_train_on_the_shipped_checkout_with_absolute_paths():
    spec = _spec(data__path="/shared/kjv", run__storage_path="/shared/runs")
    sub = build_submission(JOB, ["train.max_steps=7"], spec, ROOT, "http://mlflow:5000", sub_id="x")
    assert sub.entrypoint == ("carousel train jobs/lm-kjv-tiny.yaml --set train.max_steps=7 "
                              "--set data.path=/shared/kjv --set run.storage_path=/shared/runs")
    env = sub.runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["PYTHONPATH"] == "platform"
    assert sub.runtime_env["working_dir"] == str(ROOT)
    assert sub.metadata["carousel.job"] == "lm-kjv-tiny" and sub.submission_id == "x"


def test_storage_override_and_warnings_for_local_paths():
    spec = _spec(data__path="/local/kjv", run__storage_path="/local/runs")
    sub = build_submission(JOB, [], spec, ROOT, None, storage_path="/cluster/storage")
    assert sub.entrypoint.endswith("--set run.storage_path=/cluster/storage")
    assert any("data.path /local/kjv is a local path" in w for w in sub.warnings)
    assert any("no MLflow tracking URI" in w for w in sub.warnings)
    uri = build_submission(JOB, [], _spec(data__path="s3://b/kjv", run__storage_path="s3://b/runs"),
                           ROOT, "http://m:5000")
    assert uri.warnings == []


def test_spec_outside_the_working_dir_is_refused(tmp_path):
    outside = tmp_path / "job.yaml"
    outside.write_text(JOB.read_text())
    with pytest.raises(JobsError, match="must be inside the working directory"):
        build_submission(outside, [], _spec(data__path="/d"), ROOT, "http://m")


def test_excludes_drop_bulk_but_keep_every_package_file():
    from ray._private.runtime_env.packaging import _get_excludes  # Ray's own matcher (no cluster)

    excluded = _get_excludes(ROOT, EXCLUDES)
    for bulk in ("data", "data/kjv/shard-0.arrow", "runs/x/carousel-run.json", ".venv/bin/python", ".git/HEAD",
                 "mlflow.db", "mlartifacts/1/a", "platform/carousel/__pycache__/cli.cpython-311.pyc",
                 ".carousel/cluster/cluster.json"):
        assert excluded(ROOT / bulk), bulk
    for kept in ("platform/carousel/data", "platform/carousel/data/shards.py", "platform/carousel/cli.py",
                 "jobs/lm-kjv-tiny.yaml", "pyproject.toml", "platform/carousel/tracking/runs.py"):
        assert not excluded(ROOT / kept), kept
    assert repo_root(ROOT / "platform" / "carousel") == ROOT


def test_driver_env_leaves_out_keys_the_job_already_sets(monkeypatch):
    env = {"A": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_session.job_compatible(env) == env
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"env_vars": {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}}}))
    assert ray_session.job_compatible(env) == {"A": "1"}


def test_only_object_store_credentials_go_into_the_jobs_runtime_env(monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert ray_session.job_runtime_env() is None  # nothing to forward: no runtime env at all
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    assert ray_session.job_runtime_env() == {"env_vars": {"AWS_ACCESS_KEY_ID": "k"}}
    creds, rest = ray_session.split_worker_env(ray_session.worker_env())
    assert creds == {"AWS_ACCESS_KEY_ID": "k"} and rest["OMP_WAIT_POLICY"] == "ACTIVE" and "AWS_ACCESS_KEY_ID" not in rest
    # Inside a submitted job that already sets them, Ray would refuse a second value for the key.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"AWS_ACCESS_KEY_ID": "k"}}}))
    assert ray_session.job_runtime_env() is None


def test_token_sources_and_messages(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert ray_session.token_source() is None and ray_session.read_token() is None
    assert "no token was found" in ray_session.auth_hint("http://h:8265", 401)
    path = ray_session.ensure_token()
    assert path == str(tmp_path / "tok") and len(ray_session.read_token()) == 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ray_session.ensure_token() == path  # kept, not regenerated
    assert f"rejected the auth token from {path}" in ray_session.auth_hint("http://h:8265", 403)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert ray_session.token_source() == "$RAY_AUTH_TOKEN" and ray_session.read_token() == "abc"


def test_a_token_driver_refuses_a_cluster_without_token_auth(monkeypatch, tmp_path):
    """The mode comes from the dashboard's /api/authentication_mode (an HTTP server here answering as
    Ray's does); a token driver on an auth-disabled cluster gets the fix, every other pair passes."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    modes = iter(["disabled", "token"])

    class Dashboard(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"authentication_mode": next(modes)}).encode()
            self.send_response(200 if self.path == "/api/authentication_mode" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"127.0.0.1:{server.server_address[1]}"  # as RayContext.dashboard_url gives it: no scheme
    try:
        assert ray_session.cluster_auth_mode(url) == "disabled"
        assert ray_session.cluster_auth_mode(f"http://{url}") == "token"
    finally:
        server.shutdown()
    assert ray_session.cluster_auth_mode(url, timeout=1) is None  # nobody there: not a verdict
    assert ray_session.cluster_auth_mode("") is None  # a cluster without a dashboard

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    ray_session.ensure_token()
    problem = ray_session.auth_mismatch("token", "disabled", "10.0.0.1:6379")
    assert problem and "10.0.0.1:6379 runs without token authentication" in problem
    assert str(tmp_path / "tok") in problem and "RAY_AUTH_MODE=disabled" in problem
    for driver, cluster in [("token", "token"), ("token", None), ("disabled", "disabled"), (None, "disabled")]:
        assert ray_session.auth_mismatch(driver, cluster, "h:1") is None, (driver, cluster)


def _plan(tmp_path, **kw):
    ports = iter(range(20000, 20100))
    return local.plan(local.ClusterConfig(**kw), tmp_path / "state", "10.0.0.5", port=lambda: next(ports))


def test_plan_head_workers_and_mlflow_command_lines(tmp_path):
    st = _plan(tmp_path, workers=2)
    head, w1, w2, mlflow = st.processes
    assert [p.name for p in st.processes] == ["ray-head", "ray-worker-1", "ray-worker-2", "mlflow"]
    assert "--head" in head.cmd and "--block" in head.cmd and "--num-cpus=0" in head.cmd
    assert "--dashboard-host=127.0.0.1" in head.cmd
    for w in (w1, w2):
        assert f"--address={st.gcs_address}" in w.cmd and "--num-cpus=1" in w.cmd and "--block" in w.cmd
        assert '--resources={"carousel_worker_node": 1}' in w.cmd
    # Every node its own ports and temp dir: nothing shared that Ray would fight over.
    port_args = [a for p in (head, w1, w2) for a in p.cmd if a.endswith(tuple("0123456789")) and "port=" in a
                 and not a.startswith(("--min-worker", "--max-worker", "--address"))]
    values = [a.split("=")[1] for a in port_args]
    assert len(values) == len(set(values))
    temps = [a for p in (head, w1, w2) for a in p.cmd if a.startswith("--temp-dir=")]
    assert len(set(temps)) == 3 and all(t.startswith(f"--temp-dir=/tmp/carousel-{st.cluster_id}/") for t in temps)
    assert mlflow.cmd[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert "--serve-artifacts" in mlflow.cmd and mlflow.cmd[mlflow.cmd.index("--host") + 1] == "127.0.0.1"
    assert mlflow.cmd[mlflow.cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert "--app-name" not in mlflow.cmd
    assert st.storage == str(tmp_path / "state" / "storage")
    assert st.dashboard_url.startswith("http://127.0.0.1:") and st.mlflow_uri.startswith("http://127.0.0.1:")


def test_plan_postgres_auth_storage_and_bad_sizes(tmp_path):
    st = _plan(tmp_path, mlflow_backend="postgresql://u:s3cr%40t@db:5433/mlflow?sslmode=require", mlflow_auth=True,
               storage=str(tmp_path / "nfs"), workers=3, worker_cpus=2, worker_gpus=1, dashboard_port=8265)
    mlflow = st.processes[-1].cmd
    # The password never reaches a command line (ps shows those) or cluster.json.
    assert mlflow[mlflow.index("--backend-store-uri") + 1] == "postgresql://u@db:5433/mlflow?sslmode=require"
    assert "s3cr" not in json.dumps(st.to_json())
    assert mlflow[-2:] == ["--app-name", "basic-auth"]
    assert st.storage == str(tmp_path / "nfs") and st.dashboard_port == 8265
    assert len(st.processes) == 5 and "--num-gpus=1" in st.processes[1].cmd and "--num-cpus=2" in st.processes[1].cmd
    with pytest.raises(local.ClusterError):
        _plan(tmp_path, workers=0)


def test_process_env_slows_rays_log_directory_scan(tmp_path):
    """Ray's own log monitor, imported under the cluster's environment, rescans its directory at most
    once a second (a Ray release that renamed the knobs would scan every pass again); a user's value wins."""
    import subprocess

    env = local.process_env(_plan(tmp_path), base={"PATH": os.environ.get("PATH", "")})
    probe = ("import time; from ray._private.log_monitor import LogMonitor as M, LOG_NAME_UPDATE_INTERVAL_S as i; "
             "m = M.__new__(M); m.log_filenames = set(); now = time.time(); "
             "print(m.should_update_filenames(now), m.should_update_filenames(now - 1.5), i)")
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "True", "1.0"]
    default = subprocess.run([sys.executable, "-c", probe], env={"PATH": env["PATH"]}, capture_output=True,
                             text=True, check=True).stdout.split()
    assert default[0] == "True"  # Ray's default: every pass
    mine = local.process_env(_plan(tmp_path), base={"LOG_NAME_UPDATE_INTERVAL_S": "0.2"})
    assert mine["LOG_NAME_UPDATE_INTERVAL_S"] == "0.2"


def test_process_env_marks_and_authenticates_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "somewhere:6379")
    st = _plan(tmp_path, mlflow_auth=True)
    (tmp_path / "state").mkdir()
    env = local.process_env(st)
    assert env[local.MARKER] == st.cluster_id and env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_ADDRESS"] == st.gcs_address and env["MLFLOW_TRACKING_URI"] == st.mlflow_uri
    assert env["PATH"].split(os.pathsep)[-1] == str(Path(sys.executable).parent)  # last: see process_env
    assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0" and int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 10
    assert env["RAY_enable_metrics_collection"] == "0"  # its exporter would listen on 0.0.0.0
    assert local.process_env(_plan(tmp_path, ray_metrics=True))["RAY_enable_metrics_collection"] == "1"
    user, password = local.mlflow_credentials(tmp_path / "state")
    assert env["MLFLOW_TRACKING_USERNAME"] == user and env["MLFLOW_TRACKING_PASSWORD"] == password
    ini = local.write_auth_config(tmp_path / "state")
    assert f"admin_password = {password}" in ini.read_text() and stat.S_IMODE(ini.stat().st_mode) == 0o600


def test_database_password_is_split_out_of_the_backend_uri():
    assert local.split_db_password("postgresql://u:p%40x@db:5432/m?sslmode=require") == \
        ("postgresql://u@db:5432/m?sslmode=require", "p@x")
    assert local.split_db_password("postgresql://u@db/m") == ("postgresql://u@db/m", None)
    assert local.split_db_password("postgresql+psycopg2://u:pw@/m?host=/run/pg") == \
        ("postgresql+psycopg2://u@/m?host=%2Frun%2Fpg", "pw")
    assert local.split_db_password("sqlite:////tmp/x.db") == ("sqlite:////tmp/x.db", None)
    with pytest.raises(local.ClusterError, match="--mlflow-backend: 'db.example.com' is not a database URI"):
        local.split_db_password("db.example.com")


def test_postgres_backends_name_the_driver_sqlalchemy_loads():
    assert local.backend_driver("postgresql://u@db/m") == "psycopg"  # SQLAlchemy 2.1's default
    assert local.backend_driver("postgresql+psycopg2://u@db/m") == "psycopg2"
    assert local.backend_driver("sqlite:////tmp/m.db") is None
    local.check_backend_driver("postgresql://u@db/m")  # installed by the `postgres` extra


def test_server_secrets_reach_the_mlflow_server_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "from-the-shell")
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "x")
    st = _plan(tmp_path, mlflow_auth=True, mlflow_backend="postgresql://u:in-uri@db/m")
    (tmp_path / "state").mkdir()
    ray_env = local.process_env(st)
    assert not set(local.SERVER_ONLY) & set(ray_env)  # Ray nodes, and so every job, never see them
    assert ray_env["MLFLOW_TRACKING_USERNAME"] == "admin" and ray_env["MLFLOW_TRACKING_PASSWORD"]
    server = local.mlflow_server_env(st, ray_env, "in-uri")
    assert server["PGPASSWORD"] == "in-uri"  # the URI's password wins over the shell's
    assert server["MLFLOW_AUTH_CONFIG_PATH"].endswith("mlflow/basic_auth.ini")
    assert server["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no idle huey job consumers
    secret = tmp_path / "state" / "mlflow" / "flask-secret"
    assert server["MLFLOW_FLASK_SERVER_SECRET_KEY"] == secret.read_text() and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert local.mlflow_server_env(st, ray_env, None)["PGPASSWORD"] == "from-the-shell"  # libpq's own variable
    plain = _plan(tmp_path, mlflow_auth=False)
    assert "MLFLOW_AUTH_CONFIG_PATH" not in local.mlflow_server_env(plain, local.process_env(plain), None,
                                                                     base={})


def test_state_round_trip_and_ports_kept_across_restarts(tmp_path):
    st = _plan(tmp_path)
    again = local.ClusterState.from_json(json.loads(json.dumps(st.to_json())))
    assert again == st and again.processes[0].cmd == st.processes[0].cmd
    kept = local._keep_ports(local.ClusterConfig(), st)
    assert (kept.dashboard_port, kept.mlflow_port) == (st.dashboard_port, st.mlflow_port)
    assert local._keep_ports(local.ClusterConfig(mlflow_port=5999), st).mlflow_port == 5999


def test_dead_or_recycled_pids_are_not_ours():
    import psutil

    me = psutil.Process()
    assert local._alive(local.Proc("me", [], "", me.pid, me.create_time()))
    assert not local._alive(local.Proc("recycled", [], "", me.pid, me.create_time() - 100))
    assert not local._alive(local.Proc("gone", [], "", 2**22 + 12345, 0.0))
    assert local.marked_processes("no-such-cluster-id") == []


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cloud_cluster_configs_validate_against_rays_schema(name):
    import jsonschema
    import ray.autoscaler  # the package only: nothing starts

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster" / "ray" / name).read_text())
    jsonschema.validate(cfg, schema)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert len(gpu_types) >= 2 and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu_types)
    assert sum(t["max_workers"] for t in gpu_types) >= cfg["max_workers"] > 0
    assert any("pip install" in c and "~/carousel" in c for c in cfg["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    bad = {**cfg, "max_workers": "eight"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_dockerfile_parses_and_follows_the_rules():
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(ROOT / "cluster" / "docker" / "Dockerfile"))
    instructions = [i["instruction"] for i in df.structure]
    assert instructions.count("FROM") == 1 and df.baseimage.startswith("nvidia/cuda:") and "cudnn" in df.baseimage
    runs = " ".join(i["value"] for i in df.structure if i["instruction"] == "RUN")
    assert "download.pytorch.org/whl/cu" in df.args["TORCH_INDEX"] and "torch==2.13.0" in runs
    assert "deepspeed" in runs and "DS_BUILD_" in runs and "ds_report" in runs  # ops built at image build time
    assert 'constraints.txt ".[postgres]"' in runs  # Carousel, Ray, MLflow[auth], pyarrow, and psycopg 3
    # hadolint-style checks
    users = [i["value"] for i in df.structure if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0")  # DL3002: last USER is not root
    assert "--uid 1000" in runs
    assert ":latest" not in df.baseimage and ":" in df.baseimage  # DL3006/DL3007: pinned base
    assert "apt-get install -y --no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs  # DL3015/DL3009
    assert not any(i["instruction"] == "ADD" for i in df.structure)  # DL3020: COPY, not ADD
    assert all("sudo" not in i["value"] for i in df.structure if i["instruction"] == "RUN")  # DL3004
    assert all(not i["value"].lstrip().startswith("cd ") for i in df.structure if i["instruction"] == "RUN")  # DL3003
    cmd = next(i["value"] for i in df.structure if i["instruction"] == "ENTRYPOINT")
    assert json.loads(cmd)  # DL3025: JSON form
    copied = [i["value"].split()[0] for i in df.structure if i["instruction"] == "COPY" and "--from" not in i["value"]]
    for src in copied:
        assert (ROOT / src).exists(), src
    ignore = (ROOT / "cluster" / "docker" / "Dockerfile.dockerignore").read_text()
    assert all(f"!{s}" in ignore for s in ("pyproject.toml", "platform/"))


def test_local_cluster_scripts_call_the_cli():
    for name in ("up", "down", "status"):
        script = ROOT / "cluster" / "local" / f"{name}.sh"
        assert os.access(script, os.X_OK) and f"cluster {name}" in script.read_text()


def test_cluster_env_exports_the_mlflow_login_without_printing_the_password(tmp_path):
    from typer.testing import CliRunner

    from carousel.cluster.cli import cluster_app

    st = _plan(tmp_path, mlflow_auth=True)
    Path(st.state_dir).mkdir()
    local._save(st)
    _, password = local.mlflow_credentials(Path(st.state_dir))
    out = CliRunner().invoke(cluster_app, ["env", "--state-dir", st.state_dir]).output
    assert f"export MLFLOW_TRACKING_URI={st.mlflow_uri}" in out and "export MLFLOW_TRACKING_USERNAME=admin" in out
    assert password not in out
    assert f'export MLFLOW_TRACKING_PASSWORD="$(cat {st.state_dir}/mlflow/admin-password)"' in out


def test_plan_ports_stay_distinct_when_the_picker_repeats_itself(tmp_path):
    # Nothing binds a planned port until its node starts, so a picker may offer one twice.
    offers = itertools.chain.from_iterable((p, p, p - 1) for p in itertools.count(41000))
    st = local.plan(local.ClusterConfig(workers=2), tmp_path / "state", "10.0.0.5", port=lambda: next(offers))
    ports = [int(a.split("=")[1]) for p in st.processes for a in p.cmd
             if a.split("=")[0] in local.NODE_PORT_FLAGS]
    ports += [st.gcs_port, st.dashboard_port, st.client_port, st.mlflow_port]
    assert len(ports) == len(set(ports)) == 3 * len(local.NODE_PORT_FLAGS) + 4


def test_free_ports_come_from_below_the_kernels_ephemeral_range():
    # Ports the kernel hands out at random (bind to 0) are the ones other Ray processes take later.
    lo, _ = local.ephemeral_ports()
    picked = {local.free_port() for _ in range(20)}
    if lo > 21000:
        assert all(20000 <= p < lo for p in picked)
    assert all(local.port_free(p) for p in picked)


def test_a_restarted_node_gets_fresh_node_ports_and_keeps_everything_else(tmp_path):
    st = _plan(tmp_path, workers=1)
    w1 = st.processes[1]
    fresh = iter(range(50000, 50100))
    again = local.with_fresh_node_ports(w1.cmd, port=lambda: next(fresh))
    changed = [(a, b) for a, b in zip(w1.cmd, again) if a != b]
    assert len(again) == len(w1.cmd) and len(changed) == len(local.NODE_PORT_FLAGS)
    assert all(a.split("=")[0] in local.NODE_PORT_FLAGS and b.split("=")[0] == a.split("=")[0] for a, b in changed)
    assert f"--address={st.gcs_address}" in again


def test_node_lookup_keeps_asking_until_the_raylet_registers_or_the_wait_runs_out():
    from carousel.cluster.ray_node import patient

    now = [0.0]
    sleep = lambda s: now.__setitem__(0, now[0] + s)  # noqa: E731
    answers = iter([RuntimeError("not yet")] * 5 + ["node-info"])

    def get_node(address, node_id):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    assert patient(get_node, 60, sleep, lambda: now[0])("gcs:1", "n") == "node-info" and now[0] == 2.5

    def never(address, node_id):
        raise RuntimeError("GCS cannot find the node")

    now[0] = 0.0
    with pytest.raises(RuntimeError, match="cannot find the node"):
        patient(never, 10, sleep, lambda: now[0])("gcs:1", "n")
    assert now[0] == 10.0


def test_nodes_start_through_rays_own_cli():
    st = _plan(Path("/tmp/x"), workers=1)
    for p in st.processes[:2]:
        assert p.cmd[:4] == [sys.executable, "-m", "carousel.cluster.ray_node", "start"]


def test_the_heads_own_metrics_servers_are_off_unless_asked_and_then_on_ports_of_the_cluster(tmp_path):
    env = local.process_env(_plan(tmp_path), base={})
    assert env["AUTOSCALER_METRIC_PORT"] == env["DASHBOARD_METRIC_PORT"] == "65536"  # cannot bind: off
    st = _plan(tmp_path, ray_metrics=True)
    on = local.process_env(st, base={})
    assert on["RAY_enable_metrics_collection"] == "1"
    ports = {int(on["AUTOSCALER_METRIC_PORT"]), int(on["DASHBOARD_METRIC_PORT"])}
    assert len(ports) == 2 and not ports & {44217, 44227} and not ports & {st.gcs_port, st.dashboard_port}
