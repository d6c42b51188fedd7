"""A Ray Train callback for PBT trials (imported inside the trial, where Ray is up)."""

from __future__ import annotations

from ray.train.v2.api.callback import UserCallback


class ForwardReports(UserCallback):
    """Runs in the Train controller: every report of rank 0, with its checkpoint, into a queue the
    trial drains. Tune's TuneReportCallback forwards metrics only, and PBT can clone a trial only
    from checkpoints Tune has."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put((metrics[0], checkpoint))
