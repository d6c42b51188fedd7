"""MLflow run status tells the truth: SIGTERM -> KILLED, a failing worker -> FAILED, a dead driver's
run is closed at the next start-up; a corrupt shard is named in the error."""

import os
import re
import signal
import subprocess
import time

import pytest

from carousel.tracking.runs import RunRecord, sweep_dead_runs
from conftest import BIN, ROOT, run, tracking_client

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"
QUICK = ["--set", "tracking.registered_model=null", "--set", "tracking.log_system_metrics=false",
         "--set", "run.storage_path=runs", "--set", "train.log_every=1"]


def mlflow_run(workdir, name):
    c = tracking_client(workdir)
    exp = c.get_experiment_by_name("carousel-tests")
    (r,) = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return r


def test_sigterm_marks_the_run_killed(workdir, kjv_tiny, cluster_env):
    proc = subprocess.Popen(
        [str(BIN / "carousel"), "train", str(JOB), *QUICK, "--set", f"data.path={kjv_tiny}",
         "--set", "run.name=terminated", "--set", "train.max_steps=400", "--set", "train.eval_every=20",
         "--set", "run.checkpoint_every=20"],
        cwd=workdir, env=cluster_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in proc.stdout:
        if re.search(r"step\s+3/400", line):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) != 0
    r = mlflow_run(workdir, "terminated")
    assert r.info.status == "KILLED" and r.data.tags["carousel.status"] == "KILLED"
    assert RunRecord.load(str(workdir / "runs"), "terminated").status == "KILLED"


def test_corrupt_shard_fails_the_run_naming_the_shard(workdir, kjv_tiny, cluster_env, tmp_path):
    import shutil

    data = tmp_path / "corrupt"
    shutil.copytree(kjv_tiny, data)
    shard = data / "train-00000.arrow"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    proc = run([BIN / "carousel", "train", JOB, *QUICK, "--set", f"data.path={data}", "--set", "run.name=corrupt",
                "--set", "run.max_failures=0"], cwd=workdir, env=cluster_env, check=False)
    assert proc.returncode != 0
    assert "train-00000.arrow: sha256 does not match the manifest" in proc.stdout + proc.stderr
    r = mlflow_run(workdir, "corrupt")
    assert r.info.status == "FAILED"


def test_startup_sweep_closes_runs_whose_driver_died(workdir):
    from carousel.tracking.store import client, ensure_experiment

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    c = client(uri)
    exp = ensure_experiment(c, "carousel-tests", uri)
    dead = subprocess.Popen(["true"])
    dead.wait()
    storage = str(workdir / "runs")
    for name, pid in (("orphan", dead.pid), ("alive", os.getpid())):
        rid = c.create_run(exp, run_name=name).info.run_id
        RunRecord(name, rid, exp, uri, {}, driver={"host": os.uname().nodename, "pid": pid, "since": time.time()}).save(storage)
    assert sweep_dead_runs(storage) == ["orphan"]
    assert mlflow_run(workdir, "orphan").info.status == "KILLED"
    assert mlflow_run(workdir, "alive").info.status == "RUNNING"  # a live driver is left alone


def test_nan_steps_are_skipped_and_counted_and_k_in_a_row_stop_the_run(workdir, kjv_tiny, cluster_env):
    """#7 item 5: a NaN loss at step 3 is skipped and training goes on (the step-5 checkpoint is
    finite); three in a row (6, 7, 8) stop the run FAILED with the reason, before any update."""
    import torch

    proc = run([BIN / "carousel", "train", JOB, *QUICK, "--set", f"data.path={kjv_tiny}", "--set", "run.name=nan",
                "--set", "train.max_steps=12", "--set", "train.eval_every=5", "--set", "run.checkpoint_every=5",
                "--set", "train.inject_nonfinite_steps=[3,6,7,8]", "--set", "train.max_nonfinite_steps=3",
                "--set", "run.max_failures=0"], cwd=workdir, env=cluster_env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "step 3: NaN/Inf loss or gradient; update skipped (1 in a row, 1 in all)" in out
    assert "step 8: 3 optimizer steps in a row had a NaN/Inf loss or gradient" in out
    assert "carousel train --resume nan" in out
    r = mlflow_run(workdir, "nan")
    assert r.info.status == "FAILED"
    skipped = {m.step: m.value for m in tracking_client(workdir).get_metric_history(r.info.run_id, "nonfinite_skipped")}
    assert skipped[3] == 1 and skipped[5] == 1
    (ckpt,) = (workdir / "runs" / "nan").glob("checkpoint-00000005")
    weights = torch.load(ckpt / "model" / "weights.pt", weights_only=True)
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_more_workers_than_the_cluster_holds_is_refused_before_any_run_exists(workdir, kjv_tiny, cluster_env):
    """#7 item 9: the session cluster has 2 CPUs; 3 workers x 1 CPU are refused at once, naming
    the field, with no MLflow run and no run directory left behind (Ray Train would wait forever)."""
    proc = run([BIN / "carousel", "train", JOB, *QUICK, "--set", f"data.path={kjv_tiny}", "--set", "run.name=toobig",
                "--set", "scaling.num_workers=3", "--set", "scaling.resources_timeout_s=0"],
               cwd=workdir, env=cluster_env, check=False, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "scaling.num_workers: 3 workers x (1 CPU) do not fit this Ray cluster" in proc.stderr
    assert "room for 2" in proc.stderr
    assert not (workdir / "runs").exists()
    c = tracking_client(workdir)
    exp = c.get_experiment_by_name("carousel-tests")
    assert exp is None or not c.search_runs([exp.experiment_id])
