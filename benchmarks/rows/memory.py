"""Row 7, memory: peak RSS per worker of a 2-worker run for ZeRO 0/1/2 x fp32/bf16.

A wider model than the other rows' (--memory-hidden, 768 by default: ~12 M parameters, ~190 MiB
of fp32 weights, gradients and AdamW moments) so the model states show against the ~750 MiB a
worker holds anyway (torch, DeepSpeed, Ray, MLflow); few tokens per step, because bf16 matmuls
are slow on a CPU without AVX-512 BF16 (see the kernel row). The run halts (resumably) at step HALT; the peak is
read from each worker's /proc VmHWM when rank 0 prints that step, before the checkpoint is
written, and again as late as the worker is seen (checkpoint included).
"""

from __future__ import annotations

import re

from bench_math import ratio, zero_model_state_bytes
from common import PlainLM, carousel_train, load_avg, train_workers

HALT = 3


def model_overrides(hidden: int) -> list[str]:
    return [f"model.hidden={hidden}", f"model.embed={hidden}", "train.batch_size=2", "train.bptt=8",
            "train.eval_batches=1"]


def one(ctx, address: str, head_pid: int, stage: int, precision: str) -> dict:
    """One 2-worker run halted at step HALT -> both workers' peak RSS."""
    before = set(train_workers(head_pid))
    at_step: dict[int, int] = {}
    latest: dict[int, int] = {}
    halt_line = re.compile(rf"\bstep\s+{HALT}/")

    def watch(line, proc):
        now = {p: v for p, v in train_workers(head_pid).items() if p not in before}
        latest.update(now)
        if not at_step and halt_line.search(line):
            at_step.update(now)

    extra = [a for kv in model_overrides(ctx.memory_hidden) + [f"train.zero_stage={stage}", f"train.precision={precision}",
                                  "train.max_steps=1000", f"train.halt_at_step={HALT}", "train.log_every=1",
                                  "scaling.num_workers=2", "scaling.cpus_per_worker=1"] for a in ("--set", kv)]
    carousel_train(ctx.data, 0, 0, ctx.work, address=address, extra=extra, watch=watch)
    if len(at_step) != 2:
        raise RuntimeError(f"ZeRO {stage} {precision}: saw {len(at_step)} train workers at step {HALT}, expected 2")
    mib = lambda b: round(b / 2**20, 1)
    return {"zero": stage, "precision": precision,
            "peak_rss_mib_at_step": sorted(mib(v) for v in at_step.values()),
            "peak_rss_mib_with_checkpoint": sorted(mib(v) for v in latest.values())}


def run(ctx) -> dict:
    cluster = ctx.cluster()
    params = sum(p.numel() for p in PlainLM(ctx.data, 1, overrides=model_overrides(ctx.memory_hidden)).model.parameters())
    rows = []
    for stage, prec in [(stage, prec) for prec in ctx.memory_precisions for stage in (0, 1, 2)]:
        r = one(ctx, cluster.address, cluster.head.pid, stage, prec)
        r["model_states_mib_predicted"] = round(zero_model_state_bytes(params, 2, stage, prec) / 2**20, 1)
        r["load_avg"] = load_avg()
        rows.append(r)
        print("  memory", r, flush=True)
    # Rank 0 holds more (MLflow logger, exports): the larger of the two is the figure to plan for.
    base = max(rows[0]["peak_rss_mib_at_step"])
    ratios = []
    for r in rows:
        peak = max(r["peak_rss_mib_at_step"])
        ratios.append(ratio(f"memory {r['precision']} zero{r['zero']}", peak / base, None,
                            f"{peak:.0f} MiB peak RSS/worker / {rows[0]['precision']} ZeRO 0 ({base:.0f}); "
                            f"model states by the ZeRO paper {r['model_states_mib_predicted']:.0f} MiB"))
    return {"parameters": params, "hidden": ctx.memory_hidden, "halt_step": HALT, "runs": rows, "ratios": ratios,
            "load_avg": load_avg()}
