"""Row 6, scaling: Carousel's global tokens/s with 2 workers x 1 thread against 1 worker x 1 thread
(data parallelism; goal >= 1.8 on a quiet 2-core machine) and against 1 worker x 2 threads (the
same cores used by intra-op threads instead). Same per-worker batch, a running private cluster,
sides alternated; the load average is recorded because on a shared 2-core machine it, not
Carousel, decides the first ratio. Tokens per CPU-second of the workers show what data
parallelism costs in work (gradient all-reduce, a second process) independently of the load, and
the split of the whole machine's CPU during the 2 x 1 steps shows what the workers did not get.

The same model, data and steps in plain PyTorch processes with torch.distributed (gloo) and no Ray,
1 x 1 and 2 x 1, alternated with the Carousel sides, give this machine's own ceiling for the ratio:
what two processes reach on two cores shared with nothing but the OS and the benchmark's Ray
cluster, idle meanwhile (its daemons wake as they do under `carousel cluster up`)."""

from __future__ import annotations

from bench_math import Goal, alternate, ratio, spread
from common import carousel_train, load_avg, plain_data_parallel, plain_process

SHAPES = {"1x1": (1, 1), "2x1": (2, 1), "1x2": (1, 2)}


def _median_split(splits: list[dict[str, float]]) -> dict[str, float]:
    """The run whose workers got the median share, or {} when none was measured."""
    splits = sorted((x for x in splits if x), key=lambda x: x["train_workers"])
    return splits[len(splits) // 2] if splits else {}


def _largest(share: dict, n: int = 4) -> str:
    """The ``n`` processes besides the workers that took the most of the machine, as text."""
    top = list(share.get("by_process", {}).items())[:n]
    return "; largest others: " + ", ".join(f"{k} {v:.3f}" for k, v in top) if top else ""


def run(ctx) -> dict:
    cluster = ctx.cluster()
    loads: list[list[float]] = []
    cpu: dict[str, list[float]] = {k: [] for k in SHAPES}
    machine: dict[str, list[dict[str, float]]] = {k: [] for k in SHAPES}

    def side(name: str, workers: int, threads: int):
        def go() -> float:
            extra = ["--set", f"scaling.num_workers={workers}", "--set", f"scaling.cpus_per_worker={threads}"]
            r = carousel_train(ctx.data, ctx.scaling_steps, ctx.warmup, ctx.work, address=cluster.address, extra=extra,
                               workers_root=cluster.head.pid)
            loads.append(load_avg())
            cpu[name].append(r["tokens_per_cpu_s"])
            machine[name].append(r["machine"])
            return r["tokens_per_s"]

        return go

    def plain(workers: int):
        def go() -> float:
            r = (plain_data_parallel(ctx.data, ctx.scaling_steps, ctx.warmup, workers) if workers > 1
                 else plain_process(ctx.data, ctx.scaling_steps, ctx.warmup, threads=1))
            cpu[f"plain {workers}x1"].append(r["tokens_per_cpu_s"])
            return r["tokens_per_s"]

        return go

    cpu.update({"plain 1x1": [], "plain 2x1": []})
    sides = {k: side(k, *v) for k, v in SHAPES.items()}
    sides.update({"plain 1x1": plain(1), "plain 2x1": plain(2)})
    s = alternate(sides, ctx.rounds)
    m = {k: spread(v) for k, v in s.items()}
    c = {k: spread(v) for k, v in cpu.items()}
    plain_ratio = m["plain 2x1"]["median"] / m["plain 1x1"]["median"]
    return {
        "tokens_per_s": m,
        "tokens_per_cpu_s": c,
        "load_avg_per_run": loads,
        "machine_cpu_split": machine,  # per run: train workers / everything else / idle, over the measured steps
        "ratios": [
            ratio("scaling 2x1/1x1", m["2x1"]["median"] / m["1x1"]["median"], Goal(">=", 1.8),
                  f"{m['2x1']['median']:.0f} / {m['1x1']['median']:.0f} tok/s (2 workers x 1 thread / 1 x 1)"),
            ratio("scaling plain 2x1/1x1", plain_ratio, None,
                  f"{m['plain 2x1']['median']:.0f} / {m['plain 1x1']['median']:.0f} tok/s (plain PyTorch + gloo, not "
                  "through Ray, beside the idle cluster: this machine's ceiling for the ratio)"),
            ratio("scaling 2x1/1x1 of plain's", m["2x1"]["median"] / m["1x1"]["median"] / plain_ratio, None,
                  "Carousel's 2x1/1x1 / plain's 2x1/1x1: what Ray and Carousel keep of the machine's scaling"),
            ratio("scaling 2x1/1x2", m["2x1"]["median"] / m["1x2"]["median"], None,
                  f"{m['2x1']['median']:.0f} / {m['1x2']['median']:.0f} tok/s (2 workers x 1 thread / 1 x 2)"),
            ratio("scaling 2x1/1x1 CPU-s", c["2x1"]["median"] / c["1x1"]["median"], None,
                  f"{c['2x1']['median']:.0f} / {c['1x1']['median']:.0f} tok per CPU-second: what data parallelism "
                  "costs in work, whatever the load"),
            *([ratio("scaling 2x1 workers' CPU share", share["train_workers"], None,
                     f"of the machine's CPU during the 2 x 1 steps; everything else {share['everything_else']:.3f}, "
                     f"idle {share['idle']:.3f} (all-reduce waits){_largest(share)}")]
              if (share := _median_split(machine["2x1"])) else []),
        ],
        "load_avg": load_avg(),
    }
