"""Driver-side Tune hooks: close each trial's MLflow child run with a status that tells the truth.

Imported only after ``ray_session.init_ray`` (it imports Ray Tune). The callback and the trial
directory namer are pickled into the experiment (``Tuner.restore`` brings them back), so they
are module-level and hold only plain values.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback

from carousel.tune.runner import stopped_early
from carousel.tune.tracking import close_child, find_child


def trial_dirname(trial) -> str:
    """Tune's trial directory: the trial id, which also names the trial's Train run and MLflow run."""
    return trial.trial_id


class TrialRuns(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, max_steps: int):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.max_steps = parent_run_id, max_steps

    def _run(self, trial):
        return find_child(self.tracking_uri, self.experiment_id, self.parent_run_id, trial.trial_id)

    def _run_id(self, trial) -> str | None:
        run = self._run(trial)
        return run.info.run_id if run else None

    def _trial_max_steps(self, trial) -> int:
        return int((trial.config or {}).get("train.max_steps", self.max_steps))

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        run = self._run(trial)
        if run is None:
            return  # removed before it ever started: nothing to close
        run_id = run.info.run_id
        step = (trial.last_result or {}).get("step")
        # The loop logs test_* metrics only after its last step: a run holding them trained to the end.
        ran_to_end = any(k.startswith("test_") for k in run.data.metrics)
        early = stopped_early(step, self._trial_max_steps(trial)) and not ran_to_end
        close_child(self.tracking_uri, run_id, "FINISHED", stopped_early=early, step=step,
                    reason=f"stopped by the scheduler at step {step}" if early else None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        run_id = self._run_id(trial)
        if run_id is None:
            return
        error = trial.error_file or ""
        try:
            error = trial.get_error() or error
        except Exception:  # noqa: BLE001 - a reason for a tag, never a second failure
            pass
        close_child(self.tracking_uri, run_id, "FAILED", step=(trial.last_result or {}).get("step"),
                    reason=str(error).strip().splitlines()[-1] if str(error).strip() else None)
