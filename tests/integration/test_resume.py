"""Runs that are halted, lose a worker, run out of retries or lose their driver all end exactly
like an uninterrupted run: the same losses at every step, each step logged once, one MLflow run."""

import os
import re
import signal
import subprocess

import pytest

from conftest import BIN, ROOT, run, tracking_client, with_empty_store

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"
STEPS = 30
COMMON = ["--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1", "--set", "train.eval_every=10",
          "--set", "run.checkpoint_every=10", "--set", "tracking.registered_model=null",
          "--set", "run.storage_path=runs", "--set", "tracking.log_system_metrics=false"]
WORKER_STEP = re.compile(r"RayTrainWorker pid=(\d+)\).*step\s+(\d+)/")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, kjv_tiny, cluster_env, mlflow_store_template):
    """The uninterrupted reference run: (its working directory, {step: train loss})."""
    workdir = with_empty_store(tmp_path_factory.mktemp("straight"), mlflow_store_template)
    run([BIN / "carousel", "train", JOB, *COMMON, "--set", f"data.path={kjv_tiny}", "--set", "run.name=straight"],
        cwd=workdir, env=cluster_env)
    return workdir, losses(tracking_client(workdir), "straight")[1]


@pytest.fixture(scope="module")
def straight(straight_run):
    return straight_run[1]


def losses(client, run_name):
    exp = client.get_experiment_by_name("carousel-tests")
    (r,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    hist = client.get_metric_history(r.info.run_id, "train_loss")
    return r, {m.step: m.value for m in hist}, [m.step for m in hist]


def assert_matches_straight(workdir, name, straight):
    r, other, steps = losses(tracking_client(workdir), name)
    assert steps == list(range(1, STEPS + 1)), name  # one MLflow run, every step logged exactly once
    assert r.info.status == "FINISHED"
    diffs = [abs(straight[s] - other[s]) for s in range(1, STEPS + 1)]
    assert max(diffs) < 1e-5, (name, diffs)


def train_and_signal(args, cwd, env, at_steps: list[int], kill_driver: bool = False):
    """Run ``carousel train``; when rank 0 prints each step in ``at_steps``, SIGKILL its worker
    process (or, with ``kill_driver``, the driver). Returns (returncode, output)."""
    proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, pending = [], list(at_steps)
    for line in proc.stdout:
        out.append(line)
        m = WORKER_STEP.search(line)
        if pending and m and int(m.group(2)) == pending[0]:
            pending.pop(0)
            os.kill(proc.pid if kill_driver else int(m.group(1)), signal.SIGKILL)
    proc.wait(timeout=600)
    text = "".join(out)
    assert not pending, f"never reached steps {pending}:\n{text[-3000:]}"
    return proc.returncode, text


def test_halt_and_resume_matches_uninterrupted_run_even_when_the_latest_checkpoint_is_torn(
        workdir, kjv_tiny, cluster_env, straight):
    """Halt at step 20, then truncate a file of the step-20 checkpoint (#7 item 4: a torn write or
    a damaged disk). --resume refuses it, naming the file, and continues from step 10 instead."""
    data = ["--set", f"data.path={kjv_tiny}"]
    halted = run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=staged", "--set", "run.keep_best=3",
                  "--set", "train.halt_at_step=20"], cwd=workdir, env=cluster_env)
    assert "HALTED" in halted.stdout and "carousel train --resume staged" in halted.stdout
    victim = max((workdir / "runs" / "staged" / "checkpoint-00000020" / "engine").rglob("*.pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    resumed = run([BIN / "carousel", "train", "--resume", "staged", "--storage-path", "runs",
                   "--set", "train.halt_at_step=null"], cwd=workdir, env=cluster_env)
    out = resumed.stdout + resumed.stderr
    assert "resuming run staged" in resumed.stdout
    assert f"checkpoint at step 20 refused: {victim}" in out and "(truncated?)" in out
    assert "resuming at step 10" in out
    assert (workdir / "runs" / "staged" / "checkpoint-00000020-2").is_dir()  # never written into the torn one
    assert_matches_straight(workdir, "staged", straight)


def test_killed_workers_restart_from_the_latest_checkpoint_until_retries_run_out(workdir, kjv_tiny, cluster_env, straight):
    """#7 items 1 and 2: a SIGKILLed worker (max_failures=1) restarts the group from the latest
    checkpoint; a second kill uses up the retries, the run ends FAILED, and --resume finishes it."""
    args = [BIN / "carousel", "train", JOB, *COMMON, "--set", f"data.path={kjv_tiny}", "--set", "run.name=killed",
            "--set", "run.max_failures=1"]
    code, out = train_and_signal(args, workdir, cluster_env, at_steps=[14, 24])
    assert code != 0
    assert "resuming at step 10" in out  # the restarted group began from the step-10 checkpoint
    assert "FAILED" in out and "carousel train --resume killed" in out  # what to do next is said
    r, _, _ = losses(tracking_client(workdir), "killed")
    assert r.info.status == "FAILED"

    resumed = run([BIN / "carousel", "train", "--resume", "killed", "--storage-path", "runs"], cwd=workdir, env=cluster_env)
    assert "resuming at step 20" in resumed.stdout + resumed.stderr
    assert_matches_straight(workdir, "killed", straight)


def test_a_killed_driver_is_resumed_by_running_the_same_job_again(workdir, kjv_tiny, cluster_env, straight):
    """#7 item 3: SIGKILL the driver; the same command again continues the same run from its
    latest checkpoint, not from step 0."""
    args = [BIN / "carousel", "train", JOB, *COMMON, "--set", f"data.path={kjv_tiny}", "--set", "run.name=orphan"]
    code, _ = train_and_signal(args, workdir, cluster_env, at_steps=[14], kill_driver=True)
    assert code == -signal.SIGKILL
    again = run(args, cwd=workdir, env=cluster_env)
    assert "resuming run orphan" in again.stdout
    assert "resuming at step 10" in again.stdout + again.stderr
    assert_matches_straight(workdir, "orphan", straight)


def test_a_run_started_from_another_runs_checkpoint_continues_it_exactly(workdir, kjv_tiny, cluster_env, straight_run):
    """run.init_from (PBT's exploit; branching a run) with a new learning rate: the first step
    after the restored one has the original's loss exactly (weights, data position and RNG come
    back; the update is what changes), and the logged rate is the new one at the restored schedule
    position. A changed shape is refused before anything starts, naming the field. (Identical
    losses over many steps: the PBT test in test_tune.py.)"""
    source_dir, straight = straight_run
    kept = sorted((source_dir / "runs" / "straight").glob("checkpoint-000000[12]0"))
    assert kept, "the reference run kept no checkpoint before its last step"
    source = kept[0]
    start = int(source.name.split("-")[1])
    data = ["--set", f"data.path={kjv_tiny}", "--set", f"run.init_from={source}"]

    branch = run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=branch-lr", "--set", "train.lr=0.006",
                  "--set", f"train.max_steps={start + 3}"], cwd=workdir, env=cluster_env)
    assert f"continuing {source} at step {start}" in branch.stdout + branch.stderr
    c = tracking_client(workdir)
    r, mine, steps = losses(c, "branch-lr")
    assert steps == [start + 1, start + 2, start + 3] and r.info.status == "FINISHED"
    assert abs(mine[start + 1] - straight[start + 1]) < 1e-5, (mine, straight[start + 1])
    assert abs(mine[start + 3] - straight[start + 3]) > 1e-4  # the new rate took effect
    from carousel.config import load_spec
    from carousel.train.schedule import lr_factor

    spec = load_spec(JOB, [f"train.max_steps={start + 3}", "train.lr=0.006", f"data.path={kjv_tiny}"])
    lr = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "lr")}
    assert sorted(lr) == steps
    for step, value in lr.items():  # the schedule is a function of the step and max_steps
        assert value == pytest.approx(0.006 * lr_factor(step, spec.train), rel=1e-6), (step, value)

    bad = run([BIN / "carousel", "train", JOB, *COMMON, *data, "--set", "run.name=branch-bad", "--set", "model.layers=3"],
              cwd=workdir, env=cluster_env, check=False)
    assert bad.returncode != 0
    assert "run.init_from" in bad.stderr and "model.layers" in bad.stderr, bad.stderr[-2000:]
