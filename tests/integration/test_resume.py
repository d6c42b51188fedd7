"""A run halted after N steps and resumed matches an uninterrupted run step for step."""

import pytest

from conftest import BIN, ROOT, run, tracking_client

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"
COMMON = ["--set", "train.max_steps=30", "--set", "train.log_every=1", "--set", "train.eval_every=10",
          "--set", "run.checkpoint_every=10", "--set", "tracking.registered_model=null",
          "--set", "run.storage_path=runs", "--set", "tracking.log_system_metrics=false"]


def losses(client, run_name):
    exp = client.get_experiment_by_name("carousel-tests")
    (r,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    hist = client.get_metric_history(r.info.run_id, "train_loss")
    return r, {m.step: m.value for m in hist}, [m.step for m in hist]


def test_halt_and_resume_matches_uninterrupted_run(workdir, kjv_tiny, cluster_env):
    data = ["--set", f"data.path={kjv_tiny}"]
    run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=straight"], cwd=workdir, env=cluster_env)

    halted = run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=staged",
                  "--set", "train.halt_at_step=10"], cwd=workdir, env=cluster_env)
    assert "HALTED" in halted.stdout and "carousel train --resume staged" in halted.stdout
    resumed = run([BIN / "carousel", "train", "--resume", "staged", "--storage-path", "runs",
                   "--set", "train.halt_at_step=null"], cwd=workdir, env=cluster_env)
    assert "resuming run staged" in resumed.stdout
    assert "resuming at step 10" in resumed.stdout + resumed.stderr

    c = tracking_client(workdir)
    r_straight, straight, _ = losses(c, "straight")
    for name in ("staged",):
        r, other, steps = losses(c, name)
        assert steps == list(range(1, 31)), name  # one MLflow run, every step logged exactly once
        assert r.info.status == "FINISHED"
        diffs = [abs(straight[s] - other[s]) for s in range(1, 31)]
        assert max(diffs) < 1e-5, (name, diffs)
