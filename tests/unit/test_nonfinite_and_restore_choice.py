"""Pure decisions of the fault path: when NaN/Inf steps stop a run, which checkpoint a restart uses."""

import pytest

from carousel.train.checkpoint import CheckpointError, WorldSizeMismatch, newest_intact
from carousel.train.nonfinite import NonFiniteError, NonFiniteGuard


def test_guard_counts_skips_and_resets_on_a_good_step():
    g = NonFiniteGuard(limit=3)
    for step, bad in enumerate([True, True, False, True, True, False], start=1):
        g.observe(step, bad)
    assert (g.in_a_row, g.total) == (0, 4)


def test_guard_stops_after_k_in_a_row_naming_the_step_and_the_setting():
    g = NonFiniteGuard(limit=3)
    g.observe(1, True)
    g.observe(2, True)
    with pytest.raises(NonFiniteError, match=r"step 3: 3 optimizer steps in a row.*max_nonfinite_steps=3"):
        g.observe(3, True)


def test_guard_state_survives_a_checkpoint():
    g = NonFiniteGuard(limit=2)
    g.observe(1, True)
    h = NonFiniteGuard(limit=2)
    h.load_state_dict(g.state_dict())
    with pytest.raises(NonFiniteError):
        h.observe(2, True)  # the count carried over: the second in a row stops the run


def _check(bad: dict):
    def check(name):
        if name in bad:
            raise bad[name]
    return check


def test_newest_intact_prefers_the_newest_that_verifies():
    cands = [(10, "c10"), (30, "c30"), (20, "c20")]
    chosen, refused = newest_intact(cands, _check({"c30": CheckpointError("rank-1.pt truncated")}))
    assert chosen == "c20"
    assert refused == ["checkpoint at step 30 refused: rank-1.pt truncated"]


def test_newest_intact_returns_none_when_nothing_verifies():
    chosen, refused = newest_intact([(5, "a"), (9, "b")], _check({"a": CheckpointError("x"), "b": CheckpointError("y")}))
    assert chosen is None and len(refused) == 2


def test_a_world_size_mismatch_is_not_a_damaged_checkpoint_and_propagates():
    with pytest.raises(WorldSizeMismatch):
        newest_intact([(5, "a"), (9, "b")], _check({"b": WorldSizeMismatch("2 vs 1")}))


def test_a_failed_run_names_each_failed_worker_and_its_last_error_line():
    from ray.train import WorkerGroupError

    from carousel.train.launcher import failure_reason
    from carousel.train.nonfinite import NonFiniteError

    err = WorkerGroupError("two workers failed", {
        1: NonFiniteError("step 7: 5 optimizer steps in a row had a NaN/Inf loss"),
        0: RuntimeError("Traceback (most recent call last):\n  ...\nActorDiedError: the worker died"),
    })
    assert failure_reason(err) == (
        "worker rank 0: RuntimeError: ActorDiedError: the worker died; "
        "worker rank 1: NonFiniteError: step 7: 5 optimizer steps in a row had a NaN/Inf loss"
    )


def test_a_new_checkpoint_never_reuses_the_directory_of_a_refused_one():
    from carousel.train.loop import checkpoint_dir_name

    taken = {"checkpoint-00000020", "checkpoint-00000010"}
    assert checkpoint_dir_name(30, taken) == "checkpoint-00000030"
    assert checkpoint_dir_name(20, taken) == "checkpoint-00000020-2"
    assert checkpoint_dir_name(20, taken) == "checkpoint-00000020-3"
