"""Row 5, start-up: `carousel train` launched to its first training step, on a Ray cluster that is
already up and with an embedded Ray started by the command itself; with the time of each
milestone (the model summary printed by rank 0, step 0, step 1) to show where it goes."""

from __future__ import annotations

from bench_math import Goal, ratio, spread
from common import carousel_train, load_avg


def run(ctx) -> dict:
    address = ctx.cluster().address
    carousel_train(ctx.data, 1, 0, ctx.work, address=address)  # warm the cluster's worker pool once
    running, embedded, lines = [], [], {"running": [], "embedded": []}
    for r in range(ctx.startup_rounds):
        for side in (("running", "embedded") if r % 2 == 0 else ("embedded", "running")):
            res = carousel_train(ctx.data, 1, 0, ctx.work, address=address if side == "running" else None)
            (running if side == "running" else embedded).append(res["first_step_s"])
            lines[side].append(res["timeline"])
    run_s, emb_s = spread(running), spread(embedded)
    return {
        "running_cluster_s": run_s,
        "embedded_ray_s": emb_s,
        "timelines": lines,
        "ratios": [
            ratio("startup running", run_s["median"], Goal("<=", 15), "s to first step, Ray already up"),
            ratio("startup embedded", emb_s["median"], None, "s to first step, Ray started by the command"),
        ],
        "load_avg": load_avg(),
    }
