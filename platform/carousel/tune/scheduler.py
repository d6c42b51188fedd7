"""ASHA whose rungs survive `carousel tune --resume`.

Ray Tune's experiment state holds the trials and the searcher but not the scheduler: a restored
ASHAScheduler starts with empty rungs, so the first resumed trial to reach a rung would always
pass it, however weak. Written here (a small subclass, not a copy) because Tune offers no hook:
when Tune adds a trial that already has results (a restored one), the validation history its
MLflow child run holds is replayed into its bracket. That records, at each rung, the value the
trial had there, as the original run did; the decisions of the replay are ignored.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler


class ChildHistory:
    """(step, value) of a metric from a trial's MLflow child run. Plain values: pickled with the Tuner."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, metric: str):
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.parent_run_id, self.metric = parent_run_id, metric

    def __call__(self, trial_id: str) -> list[tuple[int, float]]:
        from carousel.tracking.store import client
        from carousel.tune.tracking import find_child

        run = find_child(self.tracking_uri, self.experiment_id, self.parent_run_id, trial_id)
        if run is None:
            return []
        history = client(self.tracking_uri).get_metric_history(run.info.run_id, self.metric)
        return sorted((m.step, m.value) for m in history)


class ResumableASHA(ASHAScheduler):
    def __init__(self, history: ChildHistory, **kwargs: Any):
        super().__init__(**kwargs)
        self._history = history

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.last_result:
            return  # a new trial: nothing to replay
        bracket = self._trial_info[trial.trial_id]
        try:
            points = self._history(trial.trial_id)
        except Exception:  # noqa: BLE001 - without history the trial is judged from its next rung on
            points = []
        for step, value in points:
            bracket.on_result(trial, step, self._metric_op * value)
