"""`carousel tune` on a real Ray cluster: Ray Tune trials of Ray Train + DeepSpeed runs, real MLflow.

1. ASHA over 4 tiny LM trials (1 worker x 1 CPU each, 2 at a time): the two learning rates too
   small to learn anything are stopped at the first rung; a parent run and 4 nested child runs
   with the right params; the best trial's model registered with the alias; a summary table.
2. A search whose driver is SIGKILLed after its first trial finished, then `--resume`d: it
   finishes with every trial and every child run exactly once, and no metric step twice.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, run, tracking_client, with_empty_store

pytestmark = pytest.mark.integration
GOOD, WEAK = [1.0e-2, 5.0e-3], [1.0e-5, 1.0e-6]


def write_spec(workdir: Path, kjv_tiny, name: str, space: dict, scheduler: dict, steps: int) -> Path:
    spec = {
        "name": name,
        "base": str(ROOT / "jobs" / "lm-kjv-tiny.yaml"),
        "set": [f"data.path={kjv_tiny}", f"train.max_steps={steps}", "train.eval_every=5", "run.checkpoint_every=10",
                "scaling.num_workers=1", "tracking.log_system_metrics=false", "run.storage_path=runs",
                "tracking.registered_model=kjv-lstm-tune", "tracking.sample_tokens=5"],
        "space": space,
        "num_samples": 1,
        "max_concurrent": 2,
        "scheduler": scheduler,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def search_runs(client, name):
    exp = client.get_experiment_by_name("carousel-tests")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`carousel.search` = '{name}' and tags.`carousel.kind` = 'search'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return parent, children


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.fixture(scope="module")
def asha(tmp_path_factory, kjv_tiny, cluster_env, mlflow_store_template):
    work = with_empty_store(tmp_path_factory.mktemp("tune-asha"), mlflow_store_template)
    spec = write_spec(work, kjv_tiny, "asha", {"train.lr": {"grid": GOOD + WEAK}},
                      {"kind": "asha", "grace_period": 10, "reduction_factor": 2}, steps=30)
    t0 = time.time()
    proc = run([BIN / "carousel", "tune", spec], cwd=work, env=cluster_env, timeout=1800)  # slow on a loaded 2-core box
    return work, proc.stdout, time.time() - t0


def test_asha_stops_the_weak_trials_and_prints_a_summary(asha):
    work, out, seconds = asha
    print(f"ASHA search of 4 trials: {seconds:.0f}s")
    assert "search asha: FINISHED" in out
    table = out[out.index("trial "):]
    assert table.splitlines()[0].split()[:3] == ["trial", "status", "train.lr"]
    assert "STOPPED_EARLY" in table and "* best trial" in table
    assert "registered model models:/kjv-lstm-tune/1 (alias @best)" in out


def test_parent_and_nested_child_runs_hold_the_right_params_and_statuses(asha):
    work, _, _ = asha
    c = tracking_client(work)
    parent, children = search_runs(c, "asha")
    assert parent.info.status == "FINISHED" and parent.data.tags["carousel.status"] == "FINISHED"
    assert parent.data.params["space.train.lr"] == "grid([0.01, 0.005, 1e-05, 1e-06])"
    assert parent.data.params["scheduler.kind"] == "asha" and parent.data.params["scheduler.grace_period"] == "10"
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"tune-spec.yaml", "base-spec.yaml", "trials.json"}

    assert len(children) == 4
    assert len({r.data.tags["carousel.trial_id"] for r in children}) == 4
    by_lr = {float(r.data.params["train.lr"]): r for r in children}
    assert sorted(by_lr) == sorted(GOOD + WEAK)
    for r in children:
        assert r.info.status == "FINISHED" and r.data.params["scaling.num_workers"] == "1"
        assert r.info.run_name == f"asha-{r.data.tags['carousel.trial_id']}"
        train = steps(c, r.info.run_id, "train_loss")
        assert train == sorted(set(train))  # no step twice
    for lr in WEAK:  # the rung at step 10 already held both good trials: the weak ones stop there
        tags = by_lr[lr].data.tags
        assert tags["carousel.stopped_early"] == "true" and tags["carousel.status"] == "STOPPED_EARLY"
        assert tags["carousel.stopped_at_step"] == "10"
    finished = [r for r in children if r.data.tags["carousel.stopped_early"] == "false"]
    assert finished and all(steps(c, r.info.run_id, "val_ppl") == [5, 10, 15, 20, 25, 30] for r in finished)

    best = parent.data.tags["carousel.best_run_id"]
    assert best in {by_lr[lr].info.run_id for lr in GOOD}
    best_ppl = min(c.get_metric_history(r.info.run_id, "val_ppl")[-1].value for r in finished)
    assert parent.data.metrics["best_val_ppl"] == pytest.approx(best_ppl, rel=1e-6)
    mv = c.get_model_version_by_alias("kjv-lstm-tune", "best")
    assert mv.run_id == best


def test_a_killed_search_resumes_without_duplicate_trials_or_runs(workdir, kjv_tiny, cluster_env):
    spec = write_spec(workdir, kjv_tiny, "killed", {"train.lr": {"grid": [1.0e-2, 5.0e-3, 3.0e-3]}},
                      {"kind": "fifo"}, steps=20)
    log = open(workdir / "first.log", "w")
    proc = subprocess.Popen([str(BIN / "carousel"), "tune", str(spec)], cwd=workdir, env=cluster_env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline, c = time.time() + 600, None
    try:
        while True:  # until the driver has closed its first trial's run
            assert proc.poll() is None, (workdir / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no trial finished in 10 minutes"
            # The search record is written after the parent run, so the store exists (opening it
            # earlier would race the driver creating its tables).
            if (workdir / "runs" / "killed" / "carousel-search.json").exists():
                c = c or tracking_client(workdir)
                done = [r for r in search_runs(c, "killed")[1] if r.info.status == "FINISHED"]
                if done:
                    break
            time.sleep(1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started in its session
        proc.wait()
        log.close()
    first_done = done[0]
    first_history = [(m.step, m.value, m.timestamp) for m in c.get_metric_history(first_done.info.run_id, "train_loss")]

    resumed = run([BIN / "carousel", "tune", "--resume", "killed", "--storage-path", "runs"], cwd=workdir, env=cluster_env)
    assert "resuming search killed" in resumed.stdout and "search killed: FINISHED" in resumed.stdout

    parent, children = search_runs(c, "killed")
    assert parent.info.status == "FINISHED" and parent.data.tags["carousel.trials.finished"] == "3"
    trial_ids = [r.data.tags["carousel.trial_id"] for r in children]
    assert len(children) == 3 and len(set(trial_ids)) == 3  # one run per trial, none twice
    assert sorted(float(r.data.params["train.lr"]) for r in children) == [3.0e-3, 5.0e-3, 1.0e-2]
    for r in children:
        assert r.info.status == "FINISHED" and r.data.tags["carousel.stopped_early"] == "false"  # FIFO
        assert steps(c, r.info.run_id, "train_loss") == [5, 10, 15, 20]  # complete, and no step twice
    # The trial that had finished was not run again.
    again = [(m.step, m.value, m.timestamp) for m in c.get_metric_history(first_done.info.run_id, "train_loss")]
    assert again == first_history
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(workdir / "runs" / "killed")).trials  # Tune's own record
    assert sorted(t.trial_id for t in trials) == sorted(trial_ids)
    assert all(t.status == "TERMINATED" and t.last_result["step"] == 20 for t in trials)


def test_pbt_exploited_trial_continues_the_strong_trials_state_exactly(workdir, kjv_tiny, cluster_env):
    """PBT over a strong and a weak learning rate, perturbing only a gradient-clipping bound far
    above any gradient norm (so a perturbed value trains exactly as the original): the weak trial
    is replaced by a copy of the strong one's checkpoint, as a new generation with its own child
    run, and that generation's losses equal the strong trial's at every step they share."""
    spec = write_spec(workdir, kjv_tiny, "pbt", {"train.lr": {"grid": [1.0e-2, 1.0e-6]},
                                                 "train.grad_clip": {"choice": [1.0e4, 2.0e4]}},
                      {"kind": "pbt", "perturbation_interval": 10, "quantile_fraction": 0.5,
                       "resample_probability": 0.0, "mutate": ["train.grad_clip"]}, steps=30)
    out = run([BIN / "carousel", "tune", spec], cwd=workdir, env=cluster_env, timeout=1800).stdout
    assert "search pbt: FINISHED" in out, out[-3000:]

    c = tracking_client(workdir)
    parent, children = search_runs(c, "pbt")
    assert parent.data.params["scheduler.kind"] == "pbt" and parent.data.params["scheduler.perturbation_interval"] == "10"
    by_trial = {}
    for r in children:
        by_trial.setdefault(r.data.tags["carousel.trial_id"], []).append(r)
    assert len(by_trial) == 2
    strong = next(t for t, rs in by_trial.items() if any(float(r.data.params["train.lr"]) == 1.0e-2 and
                                                         r.data.tags["carousel.generation"] == "1" for r in rs))
    weak = next(t for t in by_trial if t != strong)
    assert len(by_trial[strong]) == 1  # the strong trial is never replaced
    gens = sorted(by_trial[weak], key=lambda r: int(r.data.tags["carousel.generation"]))
    assert len(gens) >= 2, [r.data.tags for r in gens]
    assert gens[0].data.tags["carousel.status"] == "REPLACED" and float(gens[0].data.params["train.lr"]) == 1.0e-6

    strong_run = by_trial[strong][0]
    strong_loss = {m.step: m.value for m in c.get_metric_history(strong_run.info.run_id, "train_loss")}
    for g in gens[1:]:
        tags, params = g.data.tags, g.data.params
        assert tags["carousel.pbt.source_trial"] == strong and tags["carousel.pbt.source_run_id"] == strong_run.info.run_id
        assert float(params["train.lr"]) == 1.0e-2  # copied from the strong trial, not perturbed
        assert float(params["train.grad_clip"]) in (1.0e4, 2.0e4, 1.2e4, 0.8e4, 2.4e4, 1.6e4)
        assert params["run.init_from"].startswith(str(workdir / "runs" / "pbt"))
        start = int(tags["carousel.pbt.source_step"])
        mine = {m.step: m.value for m in c.get_metric_history(g.info.run_id, "train_loss")}
        # Logged every 5 steps (lm-kjv-tiny): the first point after the restored step covers start+1..
        assert mine and start < min(mine) <= start + 5, (start, sorted(mine))
        diffs = [abs(mine[s] - strong_loss[s]) for s in sorted(mine)]
        assert max(diffs) < 1e-5, (start, diffs)
    assert gens[-1].info.status == "FINISHED"
    assert parent.data.tags["carousel.best_trial"] in (strong, weak)
