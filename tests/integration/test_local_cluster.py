"""A real local cluster (Ray head + 2 worker nodes + MLflow server), jobs through the Ray Jobs API.

Everything here is a real process: `carousel cluster up` starts three `ray start` nodes and an
`mlflow server`; jobs go through `carousel submit` (JobSubmissionClient, token auth); the browser
test drives Debian's headless Chromium against the tracking server's UI. `down` must leave no
process of the cluster behind.
"""

import json
import os
import re
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import BIN, ROOT, run

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"


def carousel(*args, env, check=True, timeout=900):
    return run([BIN / "carousel", *args], cwd=ROOT, env=env, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Up for the module; the last test takes it down (and checks nothing is left)."""
    from carousel.cluster.local import down, load_state

    state = tmp_path_factory.mktemp("cluster") / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(CAROUSEL_CLUSTER_DIR=str(state), PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = carousel("cluster", "up", "--workers", "2", "--worker-cpus", "1", "--head-cpus", "0", env=env, timeout=400)
    up_s = time.time() - t0
    st = load_state(state)
    try:
        yield {"state": state, "env": env, "st": st, "up_s": up_s, "up_out": proc.stdout, "jobs": {}}
    finally:
        if load_state(state) is not None:  # a test failed before the teardown test ran
            down(state, log=lambda *_: None)


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory):
    """The KJV subset, prepared by Ray tasks on the cluster's worker nodes (a plain driver connection)."""
    out = tmp_path_factory.mktemp("data") / "kjv-tiny"
    env = {**cluster["env"], "RAY_ADDRESS": cluster["st"].gcs_address}
    carousel("prepare", "text", "--kjv", "--max-verses", "4000", "--out", out, "--tokenizer", "bpe",
             "--vocab-size", "512", "--shard-lines", "1000", env=env)
    return out


def _job_id(stdout: str) -> str:
    m = re.search(r"^submitted (\S+)", stdout, re.M)
    assert m, stdout
    return m.group(1)


def _wait(env, job_id, states=("SUCCEEDED", "FAILED", "STOPPED"), timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = carousel("jobs", "status", job_id, env=env).stdout
        status = out.split(":", 1)[1].split()[0]
        if status in states:
            return status
        time.sleep(3)
    raise AssertionError(f"{job_id} still not in {states} after {timeout}s")


def test_cluster_is_up_with_three_nodes_and_mlflow(cluster):
    out = carousel("cluster", "status", "--json", env=cluster["env"]).stdout
    s = json.loads(out)
    assert s["up"] and s["alive_nodes"] == 3
    assert s["dashboard"].startswith("http://127.0.0.1:") and s["mlflow"].startswith("http://127.0.0.1:")
    assert set(s["processes"]) == {"ray-head", "ray-worker-1", "ray-worker-2", "mlflow"}
    again = carousel("cluster", "up", env=cluster["env"])  # up twice: harmless, same cluster
    assert "already up" in again.stdout
    assert json.loads(carousel("cluster", "status", "--json", env=cluster["env"]).stdout)["processes"] == s["processes"]
    print(f"cluster up in {cluster['up_s']:.1f}s")


def test_invalid_spec_is_refused_before_submission(cluster, data):
    before = carousel("jobs", "list", env=cluster["env"]).stdout
    bad = carousel("submit", JOB, "--set", f"data.path={data}", "--set", "model.layerz=3", env=cluster["env"], check=False)
    assert bad.returncode == 2
    assert "model.layerz" in bad.stderr and "submitted" not in bad.stdout
    missing = carousel("submit", JOB, "--set", "data.path=/nonexistent/kjv", env=cluster["env"], check=False)
    assert missing.returncode == 2 and "submitted" not in missing.stdout
    assert carousel("jobs", "list", env=cluster["env"]).stdout == before


def test_wrong_token_is_refused_with_a_clear_message(cluster):
    env = {**cluster["env"], "RAY_AUTH_TOKEN": "0" * 64}
    proc = carousel("jobs", "list", env=env, check=False)
    assert proc.returncode == 2
    assert "rejected the auth token from $RAY_AUTH_TOKEN" in proc.stderr


def test_a_cluster_without_token_auth_is_refused_with_the_fix(tmp_path, kjv_tiny):
    """A plain `ray start` on a machine with no token yet runs without auth; a driver that later finds
    ~/.ray/auth_token used to connect, then lose its Train controller ("The actor never ran")."""
    from conftest import ray_head

    with ray_head(tmp_path / "ray", auth_mode="disabled", num_cpus=1) as address:
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")}
        env["RAY_ADDRESS"] = address
        proc = run([BIN / "carousel", "train", JOB, "--set", f"data.path={kjv_tiny}", "--set",
                    f"run.storage_path={tmp_path / 'runs'}"], cwd=tmp_path, env=env, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"the Ray cluster at {address} runs without token authentication" in proc.stderr
    assert "RAY_AUTH_MODE=disabled" in proc.stderr and "starting run" not in proc.stdout
    assert not (tmp_path / "runs").exists()  # refused before any run or checkpoint exists


def test_tiny_job_runs_across_two_worker_nodes(cluster, data):
    env = cluster["env"]
    t0 = time.time()
    sub = carousel("submit", JOB, "--set", f"data.path={data}", "--set", "scaling.placement=SPREAD", env=env)
    job_id = _job_id(sub.stdout)
    assert "dashboard:  http://127.0.0.1:" in sub.stdout and cluster["st"].mlflow_uri in sub.stdout
    status = _wait(env, job_id)
    cluster["jobs"]["tiny"] = job_id
    print(f"submit -> {status} in {time.time() - t0:.1f}s")
    assert status == "SUCCEEDED", carousel("jobs", "logs", job_id, env=env).stdout[-6000:]

    from carousel.cluster.local import dashboard_get

    dash = cluster["st"].dashboard_url
    (job,) = [j for j in dashboard_get(dash, "/api/jobs/") if j.get("submission_id") == job_id]
    q = urllib.parse.urlencode([("filter_keys", "class_name"), ("filter_predicates", "="),
                                ("filter_values", "RayTrainWorker"), ("filter_keys", "job_id"),
                                ("filter_predicates", "="), ("filter_values", job["job_id"]), ("detail", "1")])
    actors = dashboard_get(dash, f"/api/v0/actors?{q}")["data"]["result"]["result"]
    nodes = dashboard_get(dash, "/api/v0/nodes?detail=1")["data"]["result"]["result"]
    head = {n["node_id"] for n in nodes if n["is_head_node"]}
    workers_at = {a["node_id"] for a in actors}
    assert len(actors) == 2 and len(workers_at) == 2, actors  # SPREAD: one training worker per node
    assert not workers_at & head  # both on worker nodes (the head offers no CPU)
    # Checkpoints went to the cluster's shared storage path.
    assert sorted(p.name for p in (Path(cluster["st"].storage) / "lm-kjv-tiny").glob("checkpoint-*"))


def test_mlflow_server_holds_the_run_metrics_and_registered_model(cluster):
    from mlflow.tracking import MlflowClient

    job_id = cluster["jobs"].get("tiny") or pytest.skip("the tiny job did not run")
    c = MlflowClient(tracking_uri=cluster["st"].mlflow_uri, registry_uri=cluster["st"].mlflow_uri)
    exp = c.get_experiment_by_name("carousel-tests")
    runs = c.search_runs([exp.experiment_id], "attributes.run_name = 'lm-kjv-tiny'")
    assert len(runs) == 1
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["carousel.status"] == "FINISHED"
    assert r.data.params["scaling.placement"] == "SPREAD"
    assert r.data.tags.get("ray.job_id")
    assert [m.step for m in c.get_metric_history(r.info.run_id, "val_ppl")] == [10, 20, 30, 40]
    assert r.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the tracking server
    names = {a.path for a in c.list_artifacts(r.info.run_id)}
    assert {"samples.txt", "tokenizer.json"} <= names
    mv = c.get_model_version_by_alias("kjv-lstm-tiny", "best")
    assert mv.run_id == r.info.run_id
    cluster["run"] = (exp.experiment_id, r.info.run_id)
    # The artifacts really live under the server's artifacts destination.
    assert any(Path(cluster["st"].mlflow_artifacts).rglob("samples.txt"))


def test_jobs_logs_returns_the_training_log(cluster):
    job_id = cluster["jobs"].get("tiny") or pytest.skip("the tiny job did not run")
    out = carousel("jobs", "logs", job_id, env=cluster["env"]).stdout
    assert "starting run lm-kjv-tiny" in out
    assert "step 40/40 | loss" in out and "test perplexity" in out
    listed = carousel("jobs", "list", env=cluster["env"]).stdout
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED", listed, re.M)


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver")
def test_mlflow_ui_in_a_browser_shows_the_run_params_and_perplexity_chart(cluster, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    if "run" not in cluster:
        pytest.skip("no finished run")
    exp_id, run_id = cluster["run"]
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chrome'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    base = cluster["st"].mlflow_uri
    try:
        wait = WebDriverWait(driver, 90)
        # The experiment's training runs list the run by name.
        driver.get(f"{base}/#/experiments/{exp_id}/runs")
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[text()='lm-kjv-tiny']")))
        # The run page lists its parameters.
        driver.get(f"{base}/#/experiments/{exp_id}/runs/{run_id}")
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[text()='model.layers']")))
        assert driver.find_elements(By.XPATH, "//*[text()='scaling.placement']")
        assert driver.find_elements(By.XPATH, "//*[text()='SPREAD']")
        # Its model-metrics tab draws the validation perplexity chart (found with the chart search).
        driver.get(f"{base}/#/experiments/{exp_id}/runs/{run_id}/model-metrics")
        search = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "input[placeholder='Search metric charts']")))
        search.send_keys("val_ppl")
        wait.until(EC.presence_of_element_located((By.XPATH, "//*[text()='lm-kjv-tiny (val_ppl)']")))
        assert driver.find_elements(By.XPATH, "//*[text()='val_ppl']")
        assert not driver.find_elements(By.XPATH, "//*[text()='lm-kjv-tiny (grad_norm)']")  # the search filtered
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.main-svg"))  # plotly drew it
        driver.save_screenshot(str(tmp_path / "metrics.png"))
    finally:
        driver.quit()


def test_stopped_job_ends_stopped_and_its_mlflow_run_killed(cluster, data):
    from mlflow.tracking import MlflowClient

    env = cluster["env"]
    sub = carousel("submit", JOB, "--set", f"data.path={data}", "--set", "train.max_steps=5000",
                   "--set", "run.name=lm-kjv-stopped", "--set", "scaling.placement=SPREAD", env=env)
    job_id = _job_id(sub.stdout)
    c = MlflowClient(tracking_uri=cluster["st"].mlflow_uri)
    deadline = time.time() + 600
    while time.time() < deadline:  # stop it mid-training: once it has logged a training loss
        exp = c.get_experiment_by_name("carousel-tests")
        runs = c.search_runs([exp.experiment_id], "attributes.run_name = 'lm-kjv-stopped'") if exp else []
        if runs and c.get_metric_history(runs[0].info.run_id, "train_loss"):
            break
        status = carousel("jobs", "status", job_id, env=env).stdout.split(":", 1)[1].split()[0]
        assert status in ("PENDING", "RUNNING"), carousel("jobs", "logs", job_id, env=env).stdout[-4000:]
        time.sleep(2)
    else:
        raise AssertionError("the long job never logged a training loss")
    out = carousel("jobs", "stop", job_id, env=env).stdout
    assert out.strip().endswith("STOPPED")
    r = c.get_run(runs[0].info.run_id)
    assert r.info.status == "KILLED" and r.data.tags["carousel.status"] == "KILLED"


def test_down_leaves_no_process_behind(cluster):
    from carousel.cluster.local import marked_processes

    st = cluster["st"]
    t0 = time.time()
    out = carousel("cluster", "down", env=cluster["env"], timeout=300).stdout
    print(f"cluster down in {time.time() - t0:.1f}s")
    assert "cluster down" in out
    assert marked_processes(st.cluster_id) == []
    import psutil

    assert not any(psutil.pid_exists(p.pid) and p.pid and _same(p) for p in st.processes)
    assert carousel("cluster", "status", env=cluster["env"], check=False).returncode == 3
    assert not Path(st.temp_root).exists()
    assert "no cluster" in carousel("cluster", "down", env=cluster["env"]).stdout  # down twice: harmless


def _same(p) -> bool:
    from carousel.cluster.local import _alive

    return _alive(p)
