"""`carousel train` on a real Ray cluster with 2 DeepSpeed workers, then everything a user reads after."""

import json
import math

import pytest

from conftest import BIN, ROOT, run, tracking_client, with_empty_store

pytestmark = pytest.mark.integration
JOB = ROOT / "jobs" / "lm-kjv-tiny.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, kjv_tiny, cluster_env, mlflow_store_template):
    work = with_empty_store(tmp_path_factory.mktemp("e2e"), mlflow_store_template)
    proc = run([BIN / "carousel", "train", JOB, "--set", f"data.path={kjv_tiny}", "--set", "run.storage_path=runs"],
               cwd=work, env=cluster_env)
    return work, proc.stdout + proc.stderr


def test_training_prints_derived_quantities_progress_and_results(trained):
    _, out = trained
    assert "tokens/step: 512 = 2 workers x 8 streams x bptt 32" in out
    assert "step 40/40 | loss" in out and "tok/s" in out and "eta" in out
    assert "test perplexity" in out and "registered model" in out
    # The workers' environment arrives through Carousel's backend before torch loads (no runtime env).
    assert "threads: 1 per worker, OpenMP waits PASSIVE; host allocator: glibc, large buffers kept" in out
    assert "loaded torch before" not in out


def test_mlflow_holds_the_run_params_and_metrics_at_the_right_steps(trained):
    work, _ = trained
    c = tracking_client(work)
    exp = c.get_experiment_by_name("carousel-tests")
    (run_,) = c.search_runs([exp.experiment_id], "attributes.run_name = 'lm-kjv-tiny'")
    assert run_.info.status == "FINISHED"
    assert run_.data.params["model.layers"] == "2" and run_.data.params["scaling.num_workers"] == "2"
    assert run_.data.tags["carousel.status"] == "FINISHED"
    rid = run_.info.run_id
    train_steps = [m.step for m in c.get_metric_history(rid, "train_loss")]
    assert train_steps == list(range(5, 41, 5))
    val = c.get_metric_history(rid, "val_ppl")
    assert [m.step for m in val] == [10, 20, 30, 40]
    assert val[-1].value < 0.8 * val[0].value  # validation perplexity falls
    test_ppl = c.get_metric_history(rid, "test_ppl")
    assert len(test_ppl) == 1 and math.isfinite(test_ppl[0].value)
    assert c.get_metric_history(rid, "tokens_per_s")[-1].value > 0
    assert any(k.startswith("system/") for k in run_.data.metrics)


def test_artifacts_and_registered_model(trained):
    work, _ = trained
    c = tracking_client(work)
    exp = c.get_experiment_by_name("carousel-tests")
    (run_,) = c.search_runs([exp.experiment_id], "attributes.run_name = 'lm-kjv-tiny'")
    names = {a.path for a in c.list_artifacts(run_.info.run_id)}
    assert {"samples.txt", "spec.yaml", "tokenizer.json"} <= names
    mv = c.get_model_version_by_alias("kjv-lstm-tiny", "best")
    assert mv.run_id == run_.info.run_id
    assert float(mv.tags["val_ppl"]) > 1


def test_generate_loads_the_registered_model(trained, cluster_env):
    work, _ = trained
    proc = run([BIN / "carousel", "generate", "--model", "models:/kjv-lstm-tiny@best", "--prompt", "And God said",
                "--max-tokens", "15", "--seed", "3"], cwd=work, env=cluster_env)
    text = proc.stdout.strip()
    assert text.startswith("And God said") and len(text) > len("And God said") + 5
    again = run([BIN / "carousel", "generate", "--model", "models:/kjv-lstm-tiny@best", "--prompt", "And God said",
                 "--max-tokens", "15", "--seed", "3"], cwd=work, env=cluster_env)
    assert again.stdout == proc.stdout  # same seed, same sample


def test_pyfunc_scores_perplexity(trained):
    import mlflow
    import pandas as pd

    work, _ = trained
    uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/kjv-lstm-tiny@best")
    kjv_like, noise = model.predict(
        pd.DataFrame({"text": ["And the LORD spake unto Moses, saying,", "zq xv qqq jjj kx zzzv"]}),
        params={"task": "score"},
    )
    assert 1 < kjv_like < noise


def test_eval_a_checkpoint_on_the_test_split(trained, kjv_tiny, cluster_env):
    work, _ = trained
    best = sorted((work / "runs" / "lm-kjv-tiny").glob("checkpoint-*"))[-1]
    proc = run([BIN / "carousel", "eval", "--checkpoint", best, "--data", kjv_tiny, "--split", "test",
                "--batch-size", "4", "--bptt", "32"], cwd=work, env=cluster_env)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["split"] == "test" and result["tokens"] > 1000 and 1 < result["ppl"] < 512
