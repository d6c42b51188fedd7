"""Row 4, tracking: step time with rank 0's MetricLogger writing to a real sqlite MLflow store,
on / off, in the plain loop (4 metrics every step, as the benchmark job logs); the same in
CPU-seconds per token, which the neighbours' load moves far less; and what a synchronous
``log_metric`` per metric would cost instead."""

from __future__ import annotations

import time

from bench_math import Goal, alternate, ratio, spread
from common import WORKER_THREADS, load_avg, plain_loop


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

    cpu: dict[str, list[float]] = {"off": [], "on": []}

    def unlogged_run() -> float:
        r = plain_loop(ctx.data, ctx.steps, ctx.warmup, WORKER_THREADS)
        cpu["off"].append(1 / r["tokens_per_cpu_s"])
        return r["step_s"]

    # The logger's own CPU, read directly: its background thread's CPU clock plus the time the
    # training thread spends in log(); against all CPU the process spent in those runs.
    thread_clock = time.pthread_getcpuclockid(logger._thread.ident)  # noqa: SLF001 - measuring it
    own = {"logger_s": 0.0, "process_s": 0.0}

    def timed(step, loss):
        t0 = time.thread_time()
        buffered(step, loss)
        own["logger_s"] += time.thread_time() - t0

    def logged_run() -> float:
        p0, l0 = time.process_time(), time.clock_gettime(thread_clock)
        r = plain_loop(ctx.data, ctx.steps, ctx.warmup, WORKER_THREADS, logger=timed)
        own["process_s"] += time.process_time() - p0
        own["logger_s"] += time.clock_gettime(thread_clock) - l0
        offset[0] += ctx.warmup + ctx.steps
        cpu["on"].append(1 / r["tokens_per_cpu_s"])  # the logger's thread runs in this process: counted
        return r["step_s"]

    run_sync = c.create_run(exp).info.run_id

    def synchronous(step, loss):
        for k, v in {"train_loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}.items():
            c.log_metric(run_sync, k, v, step=step)

    # Each side is a few seconds: more rounds than the other rows, for a steadier median.
    s = alternate({"off": unlogged_run, "on": logged_run}, 2 * ctx.rounds + 1)
    logger.close()  # the final flush runs on this thread: not part of the training steps
    sync = plain_loop(ctx.data, ctx.steps, ctx.warmup, WORKER_THREADS, logger=synchronous)["step_s"]
    logged = len(c.get_metric_history(run_id, "train_loss"))
    if logged != offset[0]:  # the figure is only worth something if the logger really logged
        raise RuntimeError(f"the MetricLogger stored {logged} train_loss points, expected {offset[0]}")
    off, on = spread(s["off"]), spread(s["on"])
    coff, con = spread(cpu["off"]), spread(cpu["on"])
    return {
        "off_step_s": off,
        "metric_logger_step_s": on,
        "cpu_s_per_token": {"off": coff, "on": con},
        "logger_cpu_s": own["logger_s"], "logged_runs_cpu_s": own["process_s"],
        "sync_log_metric_step_s": sync,
        "ratios": [
            ratio("tracking", on["median"] / off["median"], Goal("<=", 1.01),
                  f"{on['median'] * 1e3:.1f} / {off['median'] * 1e3:.1f} ms/step (MetricLogger on / off)"),
            ratio("tracking CPU-s", con["median"] / coff["median"], Goal("<=", 1.01),
                  "CPU-seconds per token, MetricLogger on / off (its thread included)"),
            ratio("tracking own CPU", own["process_s"] / (own["process_s"] - own["logger_s"]), Goal("<=", 1.01),
                  f"process CPU / CPU without the logger's: it used {own['logger_s']:.2f} of "
                  f"{own['process_s']:.1f} CPU-s (its thread's clock + log() calls)"),
            ratio("tracking sync", sync / off["median"], None, "synchronous log_metric per metric / off (one run)"),
        ],
        "load_avg": load_avg(),
    }
