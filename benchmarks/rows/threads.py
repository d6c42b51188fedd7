"""Thread settings: the plain trainer's tokens/s under OpenMP's default wait policy (threads spin
for a while at every barrier) against OMP_WAIT_POLICY=PASSIVE (they sleep), and with one thread.

libgomp reads its policy once, when torch loads it, so each side runs in a fresh process
(common.plain_process). On a busy machine a spinning thread burns the time slice its partner
needs to reach the barrier, and every small parallel region (the LSTM's per-step GEMMs) pays for
it; carousel.ray_session.worker_env() therefore gives Carousel's workers PASSIVE unless the user's
environment says otherwise.
"""

from __future__ import annotations

from bench_math import alternate, ratio, spread
from common import load_avg, plain_process

SIDES = {"spin (default)": (2, None), "passive": (2, "PASSIVE"), "1 thread": (1, "PASSIVE")}


def run(ctx) -> dict:
    def side(threads: int, policy: str | None):
        return lambda: plain_process(ctx.data, ctx.steps, ctx.warmup, threads, {"OMP_WAIT_POLICY": policy})["tokens_per_s"]

    s = alternate({name: side(*v) for name, v in SIDES.items()}, ctx.rounds)
    m = {k: spread(v) for k, v in s.items()}
    spin, passive, one = (m[k]["median"] for k in SIDES)
    return {
        "tokens_per_s": m,
        "ratios": [
            ratio("threads passive/spin", passive / spin, None,
                  f"{passive:.0f} / {spin:.0f} tok/s (2 threads, OMP_WAIT_POLICY=PASSIVE / default)"),
            ratio("threads 2/1", passive / one, None, f"{passive:.0f} / {one:.0f} tok/s (2 threads / 1 thread, passive)"),
        ],
        "load_avg": load_avg(),
    }
