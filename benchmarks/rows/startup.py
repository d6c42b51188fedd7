"""Row 5, start-up: `carousel train` launched to its first training step, on a cluster that is
already up and with an embedded Ray started by the command itself; with the time of each
milestone (the driver's run line, the controller's resource request, the worker group, the model
summary printed by rank 0, step 1) to show where it goes.

"Already up" is what `carousel cluster up` leaves running: Ray and an MLflow tracking server
(here the benchmark's private Ray cluster and a server of its own). The embedded side is a laptop's
first command: no cluster, a sqlite store in the working directory.
"""

from __future__ import annotations

from bench_math import Goal, ratio, spread
from common import MlflowServer, carousel_train, load_avg


def run(ctx) -> dict:
    address = ctx.cluster().address
    server = MlflowServer(ctx.work)
    try:
        carousel_train(ctx.data, 1, 0, ctx.work, address=address, tracking_uri=server.uri)  # warm the page cache once
        running, embedded, lines = [], [], {"running": [], "embedded": []}
        for r in range(ctx.startup_rounds):
            for side in (("running", "embedded") if r % 2 == 0 else ("embedded", "running")):
                if side == "running":
                    res = carousel_train(ctx.data, 1, 0, ctx.work, address=address, tracking_uri=server.uri)
                else:
                    res = carousel_train(ctx.data, 1, 0, ctx.work)
                (running if side == "running" else embedded).append(res["first_step_s"])
                lines[side].append(res["timeline"])
    finally:
        server.stop()
    run_s, emb_s = spread(running), spread(embedded)
    return {
        "running_cluster_s": run_s,
        "embedded_ray_s": emb_s,
        "timelines": lines,
        "ratios": [
            ratio("startup running", run_s["median"], Goal("<=", 15),
                  "s to first step, Ray and an MLflow server already up (as `carousel cluster up` leaves them)"),
            ratio("startup embedded", emb_s["median"], None, "s to first step, Ray started by the command, sqlite"),
        ],
        "load_avg": load_avg(),
    }
