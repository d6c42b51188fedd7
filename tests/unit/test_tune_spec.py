"""Tune specs and search spaces: everything is checked before Ray or MLflow start, errors name the field."""

import json
from pathlib import Path

import pytest
import yaml

from carousel.config import ScalingConfig, SpecError
from carousel.tune.runner import (
    TrialRow,
    best_checkpoint,
    format_table,
    pick_best,
    plan_concurrency,
    stopped_early,
    trial_status,
)
from carousel.tune.space import Choice, Grid, LogUniform, RandInt, Uniform, fixed_field, with_values
from carousel.tune.spec import (
    TuneSpec,
    apply_tune_overrides,
    build_search,
    is_tune_spec,
    load_search,
    search_from_record,
    trial_spec,
)

ROOT = Path(__file__).resolve().parents[2]
BASE = {
    "name": "t",
    "data": {"path": "/data/x"},
    "model": {"layers": 2, "hidden": 32, "embed": 32},
    "train": {"max_steps": 40, "eval_every": 10, "warmup_steps": 4},
    "run": {"checkpoint_every": 20},
}


@pytest.fixture
def base_file(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(BASE))
    return p


def search(base_file, space, **kw):
    raw = {"name": "s", "base": base_file.name, "space": space, **kw}
    return build_search(raw, "tune.yaml", base_file.parent)


def problems(base_file, space, **kw):
    with pytest.raises(SpecError) as e:
        search(base_file, space, **kw)
    return e.value.problems


def test_short_and_long_forms_parse_to_the_same_dimensions():
    spec = TuneSpec.model_validate({"name": "s", "base": "b.yaml", "space": {
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "model.dropout": {"kind": "uniform", "low": 0.0, "high": 0.3},
        "train.warmup_steps": {"randint": [0, 5]},
        "model.cell": {"choice": ["lstm", "gru"]},
        "model.layers": {"grid": [1, 2]},
    }})
    s = spec.space
    assert s["train.lr"] == LogUniform(kind="loguniform", low=1e-4, high=1e-2)
    assert isinstance(s["model.dropout"], Uniform) and s["model.dropout"].candidates() == [0.0, 0.3]
    assert isinstance(s["train.warmup_steps"], RandInt) and s["train.warmup_steps"].candidates() == [0, 4]  # high exclusive
    assert isinstance(s["model.cell"], Choice) and isinstance(s["model.layers"], Grid)
    assert s["train.lr"].describe() == "loguniform(0.0001, 0.01)"
    assert spec.scheduler.kind == "asha" and spec.search.kind == "random" and spec.mode == "min"


def test_a_valid_search_knows_its_metric_steps_and_candidates(base_file):
    s = search(base_file, {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.cell": {"choice": ["lstm", "gru"]}})
    assert s.metric == "val_ppl" and s.max_steps == 40
    assert s.grace_period == 20  # default: two validations
    assert len(s.candidates) == 4  # every bound x every choice


@pytest.mark.parametrize("space, expected", [
    ({"train.lrr": {"choice": [0.1]}}, "space.train.lrr = 0.1: train.lrr: unknown field"),
    ({"model.dropout": {"uniform": [0.0, 1.0]}}, "space.model.dropout = 1.0: model.dropout: must be < 1.0"),
    ({"train.lr": {"choice": [0.0, 0.1]}}, "space.train.lr = 0.0: train.lr: must be > 0.0"),
    ({"model.hidden": {"choice": [32, 64]}}, "space.model.hidden = 64: model.tie_weights:"),
    ({"scaling.num_workers": {"choice": [1, 2]}}, "space.scaling.num_workers: not tunable"),
    ({"run.keep_best": {"choice": [1, 2]}}, "space.run.keep_best: not tunable"),
    ({"data.path": {"choice": ["relative/dir"]}}, "space.data.path = 'relative/dir': use absolute paths or URIs"),
])
def test_space_errors_name_the_field_and_the_value(base_file, space, expected):
    assert any(p.startswith(expected) for p in problems(base_file, space)), problems(base_file, space)


@pytest.mark.parametrize("dim, expected", [
    ({"loguniform": [0, 1e-2]}, "space.train.lr.loguniform: low (0.0) must be > 0 on a log scale"),
    ({"uniform": [0.1, 0.01]}, "space.train.lr.uniform: low (0.1) must be < high (0.01)"),
    ({"normal": [0, 1]}, "space.train.lr: expected one of choice, uniform, loguniform, randint, grid"),
    ({"uniform": [0.1]}, "space.train.lr.uniform: expected [low, high]"),
    ({"choice": []}, "space.train.lr.choice.values: List should have at least 1 item"),
])
def test_malformed_dimensions_are_refused_with_their_path(base_file, dim, expected):
    assert any(p.startswith(expected) for p in problems(base_file, {"train.lr": dim}))


def test_dimensions_are_checked_together(base_file):
    # Each alone is fine with the base; warmup 29 with max_steps 20 is not.
    p = problems(base_file, {"train.warmup_steps": {"randint": [0, 30]}, "train.max_steps": {"choice": [20, 40]}})
    assert p[0] == "space (train.warmup_steps=29, train.max_steps=20): train.warmup_steps: must be < max_steps (20)"


def test_scheduler_search_and_metric_rules(base_file):
    lr = {"train.lr": {"choice": [1e-3, 1e-2]}}
    assert problems(base_file, {"train.lr": {"grid": [1e-3]}}, search={"kind": "optuna"})[0].startswith(
        "search: optuna samples every dimension itself; space.train.lr is a grid")
    assert problems(base_file, lr, scheduler={"kind": "pbt"}) == [
        "scheduler.perturbation_interval: 40 steps leaves no perturbation before the end (trials train 40 steps)"]
    assert problems(base_file, lr, scheduler={"kind": "pbt", "perturbation_interval": 30}) == [
        "scheduler.perturbation_interval: 30 steps is not a multiple of run.checkpoint_every (20): "
        "an exploit copies the state of the strong trial's latest checkpoint"]
    p = problems(base_file, {"model.layers": {"choice": [1, 2]}}, num_samples=1,
                 scheduler={"kind": "pbt", "perturbation_interval": 20})
    assert p[0].startswith("space: pbt perturbs running trials, and none of model.layers can change in one")
    assert p[1] == "num_samples: pbt needs a population (at least 2 trials: num_samples x grid points)"
    assert problems(base_file, lr, scheduler={"grace_period": 5})[0].startswith(
        "scheduler.grace_period: 5 steps is less than one validation")
    assert problems(base_file, lr, scheduler={"grace_period": 40})[0].startswith(
        "scheduler.grace_period: 40 steps leaves nothing to stop")
    assert problems(base_file, lr, metric="val_cer")[0].startswith("metric: 'val_cer' is not reported")
    assert problems(base_file, lr, mode="max")[0] == "mode: val_ppl is lower-is-better; use min"
    assert problems(base_file, lr, num_samples=0) == ["num_samples: must be >= 1"]
    fifo = search(base_file, lr, scheduler={"kind": "fifo", "grace_period": 40})  # asha's rules only for asha
    assert fifo.spec.scheduler.kind == "fifo"


def test_base_spec_errors_name_the_base_file(base_file):
    with pytest.raises(SpecError) as e:
        search(base_file, {"train.lr": {"choice": [0.1]}}, set=["train.bptt=1"])
    assert str(base_file) in str(e.value) and "train.bptt: must be >= 2" in e.value.problems


def test_overrides_reach_the_tune_spec_the_base_and_single_dimensions():
    raw = {"name": "s", "base": "b.yaml", "set": ["train.max_steps=10"], "space": {"train.lr": {"choice": [0.1]}}}
    out = apply_tune_overrides(raw, ["num_samples=8", "base.data.path=/d", "space.model.dropout={uniform: [0, 0.2]}",
                                     "scheduler.grace_period=20"])
    assert out["num_samples"] == 8 and out["scheduler"] == {"grace_period": 20}
    assert out["set"] == ["train.max_steps=10", "data.path=/d"]
    assert out["space"] == {"train.lr": {"choice": [0.1]}, "model.dropout": {"uniform": [0, 0.2]}}
    assert raw["set"] == ["train.max_steps=10"]  # the input is not changed
    assert is_tune_spec(out) and not is_tune_spec(BASE)


def test_a_trial_spec_carries_the_sampled_values_with_their_types():
    spec = trial_spec(BASE, {"train.lr": 1e-05, "model.cell": "gru", "train.warmup_steps": 3}, "abc_00001", "/runs/s/train")
    assert spec.train.lr == 1e-05 and spec.model.cell == "gru" and spec.train.warmup_steps == 3
    assert spec.run.name == "abc_00001" and spec.run.storage_path == "/runs/s/train"
    assert with_values({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}
    with pytest.raises(ValueError, match="train.max_steps: is not a section"):
        with_values(BASE, {"train.max_steps.x": 1})


def test_fixed_fields():
    assert fixed_field("train.lr") is None and fixed_field("model.hidden") is None
    assert "not tunable" in fixed_field("tracking.experiment") and "not tunable" in fixed_field("model.family")


def test_shipped_tune_specs_load_and_a_recorded_search_round_trips():
    lm = load_search(ROOT / "jobs" / "tune-lm-kjv.yaml")
    assert lm.family == "lm" and lm.metric == "val_ppl" and lm.spec.search.kind == "optuna"
    assert lm.base.scaling.num_workers == 1 and lm.max_steps == 400 and lm.grace_period == 100
    asr = load_search(ROOT / "jobs" / "tune-asr-flite.yaml")
    assert asr.family == "ctc" and asr.metric == "val_cer" and asr.base.speech.decoder == "greedy"
    again = search_from_record(json.loads(json.dumps(lm.spec.model_dump(mode="json"))), lm.base.model_dump(mode="json"))
    assert again.spec == lm.spec and again.base == lm.base


# ----------------------------------------------------------------------------- runner decisions (pure)


def test_concurrency_follows_the_cluster_and_the_cap():
    assert plan_concurrency({"CPU": 8.0}, ScalingConfig(num_workers=2, cpus_per_worker=1), None) == 4
    assert plan_concurrency({"CPU": 8.0}, ScalingConfig(num_workers=2, cpus_per_worker=1), 3) == 3
    assert plan_concurrency({"CPU": 16.0, "GPU": 2.0}, ScalingConfig(num_workers=1, gpus_per_worker=1), None) == 2
    with pytest.raises(SpecError, match="one trial needs 4 CPUs"):
        plan_concurrency({"CPU": 2.0}, ScalingConfig(num_workers=2, cpus_per_worker=2), None)


def test_trial_outcomes_and_the_best_trial():
    assert stopped_early(10, 30) and not stopped_early(30, 30) and not stopped_early(None, 30)
    assert trial_status(False, "FINISHED", {"carousel.stopped_early": "true"}) == "STOPPED_EARLY"
    assert trial_status(False, "FINISHED", {"carousel.stopped_early": "false"}) == "FINISHED"
    assert trial_status(True, "RUNNING", {}) == "FAILED"
    assert trial_status(False, "RUNNING", {}) == "UNFINISHED" and trial_status(False, None, {}) == "UNFINISHED"
    rows = [TrialRow("a", "FINISHED", {"train.lr": 0.01}, 30, 120.0, "r1"),
            TrialRow("b", "STOPPED_EARLY", {"train.lr": 1e-5}, 10, 480.0, "r2"),
            TrialRow("c", "FAILED", {"train.lr": 0.1}, 5, 90.0, "r3"),
            TrialRow("d", "UNFINISHED", {"train.lr": 0.003}, None, None, None)]
    assert pick_best(rows, "min").trial_id == "a"  # a failed trial never wins
    assert pick_best(rows, "max").trial_id == "b"
    assert pick_best(rows[3:], "min") is None
    table = format_table(rows, ["train.lr"], "val_ppl", "a").splitlines()
    assert table[0].split() == ["trial", "status", "train.lr", "step", "best", "val_ppl", "mlflow", "run"]
    assert table[2].split() == ["*", "a", "FINISHED", "0.01", "30", "120", "r1"]
    assert table[5].split() == ["d", "UNFINISHED", "0.003", "-", "-", "-"]
    assert table[-1] == "* best trial"


def test_the_best_checkpoint_is_the_best_one_that_verifies(tmp_path):
    from carousel.train import checkpoint as ckpt

    for step, ppl in ((10, 300.0), (20, 200.0), (30, 250.0)):
        d = tmp_path / f"checkpoint-{step:08d}"
        d.mkdir()
        (d / "meta.json").write_text(json.dumps({"step": step, "world_size": 1, "metrics": {"val_ppl": ppl}}))
        (d / "rank-0.pt").write_bytes(b"x" * step)
        ckpt.write_rank_manifest(d, 0)
    assert best_checkpoint(str(tmp_path), "val_ppl")[0].endswith("checkpoint-00000020")
    (tmp_path / "checkpoint-00000020" / "rank-0.pt").write_bytes(b"torn")  # corrupt: skipped
    path, meta = best_checkpoint(str(tmp_path), "val_ppl")
    assert path.endswith("checkpoint-00000030") and meta["step"] == 30
    assert best_checkpoint(str(tmp_path / "none"), "val_ppl") is None


def test_submit_sends_carousel_tune_with_the_base_paths_pinned():
    from carousel.jobs.client import build_submission

    tune_spec = ROOT / "jobs" / "tune-lm-kjv.yaml"
    search = load_search(tune_spec, ["base.data.path=/shared/kjv", "base.run.storage_path=/shared/runs"])
    sub = build_submission(tune_spec, ["num_samples=2"], search.base, ROOT, "http://m:5000", command="tune", sub_id="x")
    assert sub.entrypoint == ("carousel tune jobs/tune-lm-kjv.yaml --set num_samples=2 "
                              "--set base.data.path=/shared/kjv --set base.run.storage_path=/shared/runs")
    assert sub.metadata["carousel.command"] == "tune"


def test_a_restored_asha_rebuilds_its_rungs_from_the_trials_histories():
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from carousel.tune.scheduler import ResumableASHA

    histories = {"good": [(5, 300.0), (10, 200.0), (15, 180.0)], "ok": [(5, 320.0), (10, 250.0)]}
    kw = dict(time_attr="step", max_t=30, grace_period=10, reduction_factor=2)

    def restored(scheduler):
        scheduler.set_search_properties("val_ppl", "min")
        for tid in histories:  # trials with results, as Tuner.restore adds them
            scheduler.on_trial_add(None, SimpleNamespace(trial_id=tid, last_result={"step": 10}))
        weak = SimpleNamespace(trial_id="weak", last_result={})
        scheduler.on_trial_add(None, weak)
        return scheduler.on_trial_result(None, weak, {"step": 10, "val_ppl": 500.0})

    assert restored(ResumableASHA(lambda tid: histories[tid], **kw)) == TrialScheduler.STOP
    assert restored(ASHAScheduler(**kw)) == TrialScheduler.CONTINUE  # what Tune alone would do


def test_a_trial_whose_train_run_ended_is_recognized_by_its_complete_final_checkpoint(tmp_path):
    from carousel.train import checkpoint as ckpt
    from carousel.tune.trial import final_metrics

    final = tmp_path / "t_00001" / "checkpoint-00000020"
    final.mkdir(parents=True)
    (final / "meta.json").write_text(json.dumps({"step": 20, "world_size": 2, "metrics": {"step": 20, "val_ppl": 9.5}}))
    ckpt.write_rank_manifest(final, 0)
    assert final_metrics(str(tmp_path), "t_00001", 20) is None  # rank 1 never finished writing
    ckpt.write_rank_manifest(final, 1)
    assert final_metrics(str(tmp_path), "t_00001", 20) == {"step": 20, "val_ppl": 9.5}
    assert final_metrics(str(tmp_path), "t_00001", 30) is None and final_metrics(str(tmp_path), "t_2", 20) is None


def test_optuna_tpe_samples_the_space_within_bounds_and_repeats_with_its_seed(base_file):
    from carousel.tune.runner import build_search_alg
    from carousel.tune.space import param_space

    s = search(base_file, {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.cell": {"choice": ["lstm", "gru"]},
                           "train.warmup_steps": {"randint": [0, 5]}}, search={"kind": "optuna", "seed": 3})

    def suggestions():
        alg = build_search_alg(s, concurrency=2)
        assert alg.set_search_properties(s.metric, s.spec.mode, param_space(s.spec.space))
        return [alg.suggest(f"t{i}") for i in range(2)] + [alg.suggest("t2")]  # the third waits: 2 at a time

    first = suggestions()
    assert first[2] is None
    for cfg in first[:2]:
        assert 1e-4 <= cfg["train.lr"] <= 1e-2 and cfg["model.cell"] in ("lstm", "gru") and 0 <= cfg["train.warmup_steps"] < 5
    assert suggestions() == first


def test_pbt_perturbs_only_what_a_running_trial_can_take_and_stays_in_range(base_file):
    from carousel.tune.pbt import Clamp, mutations, train_run_for

    space = {"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.dropout": {"choice": [0.0, 0.2, 0.4]},
             "model.layers": {"choice": [1, 2]}, "train.weight_decay": {"uniform": [0.0, 0.1]}}
    s = search(base_file, space, scheduler={"kind": "pbt", "perturbation_interval": 20})
    m = mutations(s.spec.space)
    assert set(m) == {"train.lr", "model.dropout", "train.weight_decay"}  # layers: copied on exploit, never changed
    assert m["model.dropout"] == [0.0, 0.2, 0.4]  # a list: PBT moves to a neighbour, never multiplies a choice
    clamp = Clamp(s.spec.space)
    assert clamp({"train.lr": 0.012, "train.weight_decay": -0.01, "model.hidden": 64}) == {
        "train.lr": 0.01, "train.weight_decay": 0.0, "model.hidden": 64}
    # A trial's first start, its own checkpoint (a resumed search), another trial's (an exploit).
    assert train_run_for("t_1", None, None) == ("t_1", False)
    assert train_run_for("t_1", "t_1-gabc", "/s/t_1/checkpoint_3") == ("t_1-gabc", False)
    run, new = train_run_for("t_1", "t_2", "/s/t_2/checkpoint_3")
    assert new and run.startswith("t_1-g") and run == train_run_for("t_1", "t_2", "/s/t_2/checkpoint_3")[0]
    assert run != train_run_for("t_1", "t_2", "/s/t_2/checkpoint_4")[0]
    assert train_run_for("t_1", "t_11", "/s/t_11/checkpoint_3")[1]  # t_11 is another trial


def test_shipped_pbt_spec_loads():
    pbt = load_search(ROOT / "jobs" / "tune-pbt-lm-kjv.yaml")
    assert pbt.spec.scheduler.kind == "pbt" and pbt.base.run.checkpoint_every == 50
