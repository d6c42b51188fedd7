"""Thread settings: how idle OpenMP threads wait. OpenMP's default (threads spin for a while at
every barrier) against OMP_WAIT_POLICY=PASSIVE (they sleep), 2 threads, in two places:

  plain     the plain trainer in a fresh process per side (libgomp reads its policy once, when
            torch loads it; common.plain_process), and with one thread for scale
  carousel  a real `carousel train` worker (1 x 2 threads) on the running cluster, the policy
            passed the way a user would: in the environment of `carousel train`

On a busy machine a spinning thread burns the time slice its partner needs to reach the barrier,
and every small parallel region (the LSTM's per-time-step GEMMs) pays for it; a Carousel worker
always has neighbours (Ray's threads, the metric logger, the driver and Ray's daemons on the same
cores). carousel.ray_session.worker_env() picks the workers' default from these figures.
"""

from __future__ import annotations

from bench_math import alternate, ratio, spread
from common import carousel_train, load_avg, plain_process

SIDES = {"spin (default)": (2, None), "passive": (2, "PASSIVE"), "1 thread": (1, "PASSIVE")}
CAROUSEL_SIDES = {"carousel spin": "ACTIVE", "carousel passive": "PASSIVE"}


def run(ctx) -> dict:
    cluster = ctx.cluster()

    def side(threads: int, policy: str | None):
        return lambda: plain_process(ctx.data, ctx.steps, ctx.warmup, threads, {"OMP_WAIT_POLICY": policy})["tokens_per_s"]

    def carousel_side(policy: str):
        return lambda: carousel_train(ctx.data, ctx.steps, ctx.warmup, ctx.work, address=cluster.address,
                                      extra=["--set", "scaling.cpus_per_worker=2"], env={"OMP_WAIT_POLICY": policy})["tokens_per_s"]

    sides = {name: side(*v) for name, v in SIDES.items()}
    sides.update({name: carousel_side(policy) for name, policy in CAROUSEL_SIDES.items()})
    s = alternate(sides, ctx.rounds)
    m = {k: spread(v) for k, v in s.items()}
    spin, passive, one = (m[k]["median"] for k in SIDES)
    cspin, cpassive = (m[k]["median"] for k in CAROUSEL_SIDES)
    return {
        "tokens_per_s": m,
        "ratios": [
            ratio("threads passive/spin", passive / spin, None,
                  f"{passive:.0f} / {spin:.0f} tok/s (plain, 2 threads, OMP_WAIT_POLICY=PASSIVE / default)"),
            ratio("threads carousel p/s", cpassive / cspin, None,
                  f"{cpassive:.0f} / {cspin:.0f} tok/s (Carousel worker 1 x 2, PASSIVE / ACTIVE)"),
            ratio("threads 2/1", passive / one, None, f"{passive:.0f} / {one:.0f} tok/s (2 threads / 1 thread, passive)"),
        ],
        "load_avg": load_avg(),
    }
