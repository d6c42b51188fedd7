"""Row 2, platform overhead: Carousel (Ray Train + DeepSpeed engine + MLflow logging, 1 worker x
1 thread, as the benchmark job) tokens/s / the plain-PyTorch loop on the same model, data, optimizer and threads, in
a fresh process of its own set up as a worker is (carousel.train.runtime.set_threads, the
workers' OpenMP environment).

Also per CPU-second (tokens of the measured steps / CPU time the training process spent on
them): on a shared machine wall-clock rates move with the neighbours' load, CPU time much less.
"""

from __future__ import annotations

from bench_math import Goal, alternate, ratio, spread
from common import WORKER_THREADS, carousel_train, load_avg, plain_process


def run(ctx) -> dict:
    cluster = ctx.cluster()  # a running cluster: start-up is row 5's business, not this one's
    cpu: dict[str, list[float]] = {"plain": [], "carousel": []}
    threads: list[dict[str, float]] = []

    def plain() -> float:
        r = plain_process(ctx.data, ctx.steps, ctx.warmup, threads=WORKER_THREADS)
        cpu["plain"].append(r["tokens_per_cpu_s"])
        return r["tokens_per_s"]

    def carousel() -> float:
        r = carousel_train(ctx.data, ctx.steps, ctx.warmup, ctx.work, address=cluster.address,
                           workers_root=cluster.head.pid)
        cpu["carousel"].append(r["tokens_per_cpu_s"])
        threads.append(r["cpu_s_by_thread"])
        return r["tokens_per_s"]

    s = alternate({"plain": plain, "carousel": carousel}, ctx.rounds)
    c, p = spread(s["carousel"]), spread(s["plain"])
    cc, cp = spread(cpu["carousel"]), spread(cpu["plain"])
    return {
        "carousel_tokens_per_s": c,
        "plain_tokens_per_s": p,
        "carousel_tokens_per_cpu_s": cc,
        "plain_tokens_per_cpu_s": cp,
        "carousel_worker_cpu_s_by_thread": threads,  # over the measured steps, per Carousel run
        "ratios": [
            ratio("platform", c["median"] / p["median"], Goal(">=", 0.97),
                  f"{c['median']:.0f} / {p['median']:.0f} tok/s (Carousel / plain PyTorch)"),
            ratio("platform per CPU-s", cc["median"] / cp["median"], Goal(">=", 0.97),
                  f"{cc['median']:.0f} / {cp['median']:.0f} tok per CPU-second (Carousel / plain PyTorch)"),
        ],
        "load_avg": load_avg(),
    }
