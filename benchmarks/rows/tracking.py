"""Row 4, tracking: step time with rank 0's MetricLogger writing to a real sqlite MLflow store,
on / off, in the plain loop; and what a synchronous ``log_metric`` per metric would cost."""

from __future__ import annotations

import time

from bench_math import Goal, alternate, ratio, spread
from common import load_avg, plain_loop


def run(ctx) -> dict:
    from mlflow.tracking import MlflowClient

    from carousel.tracking.metrics import MetricLogger

    c = MlflowClient(f"sqlite:///{ctx.work / 'track.db'}")
    exp = c.create_experiment(f"track-{time.time()}", artifact_location=(ctx.work / "art").as_uri())
    run_id = c.create_run(exp).info.run_id
    logger = MetricLogger(c, run_id)
    offset = [0]  # each repeat logs fresh steps, so the run holds every point once

    def buffered(step, loss):
        logger.log({"train_loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}, offset[0] + step)

    def logged_run() -> float:
        r = plain_loop(ctx.data, ctx.steps, ctx.warmup, 2, logger=buffered)["step_s"]
        offset[0] += ctx.warmup + ctx.steps
        return r

    run_sync = c.create_run(exp).info.run_id

    def synchronous(step, loss):
        for k, v in {"train_loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}.items():
            c.log_metric(run_sync, k, v, step=step)

    s = alternate({"off": lambda: plain_loop(ctx.data, ctx.steps, ctx.warmup, 2)["step_s"], "on": logged_run},
                  ctx.rounds + 1)
    logger.close()
    sync = plain_loop(ctx.data, ctx.steps, ctx.warmup, 2, logger=synchronous)["step_s"]
    logged = len(c.get_metric_history(run_id, "train_loss"))
    if logged != offset[0]:  # the figure is only worth something if the logger really logged
        raise RuntimeError(f"the MetricLogger stored {logged} train_loss points, expected {offset[0]}")
    off, on = spread(s["off"]), spread(s["on"])
    return {
        "off_step_s": off,
        "metric_logger_step_s": on,
        "sync_log_metric_step_s": sync,
        "ratios": [
            ratio("tracking", on["median"] / off["median"], Goal("<=", 1.01),
                  f"{on['median'] * 1e3:.1f} / {off['median'] * 1e3:.1f} ms/step (MetricLogger on / off)"),
            ratio("tracking sync", sync / off["median"], None, "synchronous log_metric per metric / off (one run)"),
        ],
        "load_avg": load_avg(),
    }
