"""The pure arithmetic of the benchmarks: FLOP counts, medians and spreads, goals, padding.

Kept free of torch, Ray and MLflow so tests/unit/test_bench_math.py checks it in milliseconds.
"""

from __future__ import annotations

import collections
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


def lstm_lm_flops_per_token(layer_inputs: Sequence[int], hidden: int, vocab: int) -> int:
    """Training FLOPs per token of a stacked LSTM LM: 3 x (sum over layers 8·H·(H+I) + 2·H·V).

    Forward per layer: 4 gates x (I + H) inputs x H outputs x 2 (multiply-add) = 8·H·(H+I);
    the softmax head 2·H·V; backward costs twice the forward (gradients of inputs and weights),
    hence the 3. Elementwise gate math, the loss and the optimizer are left out: they are not
    matmuls and are small next to them (which is also why the ratio to GEMM can approach 1).
    """
    if not layer_inputs or hidden < 1 or vocab < 1:
        raise ValueError("need at least one layer, hidden >= 1 and vocab >= 1")
    return 3 * (sum(8 * hidden * (hidden + i) for i in layer_inputs) + 2 * hidden * vocab)


def gemm_flops(m: int, n: int, k: int) -> int:
    """[m, k] @ [k, n]: one multiply and one add per term."""
    return 2 * m * n * k


def spread(samples: Sequence[float]) -> dict[str, float]:
    """Median and range: the median resists a neighbour's burst of load, the range shows it."""
    if not samples:
        raise ValueError("no samples")
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def alternate(sides: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Measure every side once per round, reversing the order every other round (A B, B A, A B...).

    Background load on a shared machine drifts over minutes; interleaving puts every side under
    the same drift, and the reversal keeps a slow ramp from always favouring the side that runs
    first. Returns each side's samples in order.
    """
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(sides)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(float(sides[n]()))
    return out


def ratio_of_medians(num: Sequence[float], den: Sequence[float]) -> float:
    return statistics.median(num) / statistics.median(den)


_OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Goal:
    op: str  # ">=" or "<="
    value: float

    def __post_init__(self):
        if self.op not in _OPS:
            raise ValueError(f"goal op must be one of {sorted(_OPS)}, not {self.op!r}")

    def met(self, measured: float) -> bool:
        return _OPS[self.op](measured, self.value)

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


def padding_efficiency(batches: Sequence[Sequence[int]]) -> float:
    """Real frames / padded frames over batches of utterance lengths (a batch pads to its longest)."""
    real = sum(sum(b) for b in batches)
    padded = sum(len(b) * max(b) for b in batches if b)
    if padded == 0:
        raise ValueError("no frames")
    return real / padded


def vm_hwm_bytes(proc_status: str) -> int:
    """Peak resident set size from the text of /proc/<pid>/status (``VmHWM:  123456 kB``).

    The kernel keeps this high-water mark itself, so a sampler that reads it late still sees a
    peak it missed between samples (psutil exposes current RSS only).
    """
    for line in proc_status.splitlines():
        if line.startswith("VmHWM:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"unexpected VmHWM unit {unit!r}")
            return int(value) * 1024
    raise ValueError("no VmHWM line (not a Linux /proc/<pid>/status?)")


def ratio(name: str, value: float, goal: Goal | None, measured: str) -> dict:
    """One line of the table: a named ratio, what it divides (``measured``), and its goal."""
    return {"name": name, "value": value, "measured": measured,
            "goal": str(goal) if goal else None, "met": goal.met(value) if goal else None}


def zero_model_state_bytes(params: int, world: int, stage: int, precision: str) -> int:
    """Bytes of model states per worker by the ZeRO paper's accounting (Rajbhandari et al. 2020,
    section 3), with AdamW's two fp32 moments:

      fp32:  weights 4, gradients 4, moments 8 bytes per parameter;
      bf16:  bf16 weights 2 and gradients 2, fp32 master weights 4 and moments 8 (the 12 bytes
             the paper's K counts), the form DeepSpeed's bf16 mode keeps.

    Stage 1 partitions the optimizer states (moments, and the master weights in bf16) across the
    workers, stage 2 the gradients as well. Activations, buffers and the process itself come on
    top: the memory row shows how far the measured RSS follows this.
    """
    if stage not in (0, 1, 2) or world < 1:
        raise ValueError("stage must be 0, 1 or 2 and world >= 1")
    if precision == "fp32":
        weights, grads, opt = 4, 4, 8
    elif precision == "bf16":
        weights, grads, opt = 2, 2, 12
    else:
        raise ValueError(f"precision {precision!r}: fp32 or bf16")
    per = weights + (grads / world if stage >= 2 else grads) + (opt / world if stage >= 1 else opt)
    return int(round(per * params))


def attainable_rate(parts: Sequence[tuple[float, float]]) -> float:
    """FLOP/s of a computation made of GEMMs (flops, measured FLOP/s of that GEMM's shape) run one
    after another: total flops / total time. The bound a model's matmuls set on its own speed."""
    if not parts or any(r <= 0 for _, r in parts):
        raise ValueError("need parts with positive rates")
    return sum(f for f, _ in parts) / sum(f / r for f, r in parts)


def leaf_summary(collapsed: str, top: int = 20, within: str = "") -> list[tuple[str, float]]:
    """py-spy's collapsed stacks ("a;b;c 12" per line) -> the innermost frames with the largest
    shares of the samples: where the time is spent, whoever called it. ``within``: keep only
    stacks through a frame containing this text (the training thread, not Ray's idle ones)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit() or within not in stack:
            continue
        counts[stack.split(";")[-1]] += int(n)
        total += int(n)
    return [(frame, n / total) for frame, n in counts.most_common(top)] if total else []


def steps_at(history, t: float) -> float:
    """Steps finished at time ``t`` (s), interpolated between the logged steps' timestamps (ms):
    ``history`` holds MLflow metric points (``.step``, ``.timestamp``), logged every few steps."""
    points = sorted((m.timestamp / 1000, m.step) for m in history)
    before = [p for p in points if p[0] <= t]
    after = [p for p in points if p[0] > t]
    if not before:
        return 0.0
    (t1, s1) = before[-1]
    if not after:
        return float(s1)
    (t2, s2) = after[0]
    return s1 + (s2 - s1) * (t - t1) / max(t2 - t1, 1e-9)


def process_title(cmdline: Sequence[str]) -> str:
    """A short name for a process of a Ray node, from its command line: Ray's actors and workers
    by their title (``ray::TrainController.run`` -> ``TrainController``), the dashboard's modules
    by theirs, Python scripts and modules by name, binaries by file name."""
    if not cmdline:
        return "?"
    head = cmdline[0]
    if head.startswith("ray::"):
        return head[5:].split(".", 1)[0].split()[0] or "ray::"
    if head.startswith("ray-dashboard-"):
        return "dashboard " + head[len("ray-dashboard-"):].split()[0].rsplit("-", 1)[0]
    if Path(head).name.startswith("python"):
        args = list(cmdline[1:])
        while args and args[0].startswith("-") and args[0] != "-m":
            args.pop(0)
        if args[:1] == ["-m"] and len(args) > 1:
            return args[1]
        if args:
            name = Path(args[0]).name
            return name[:-3] if name.endswith(".py") else (" ".join([name, *args[1:2]]))
    return Path(head).name


def cpu_by_title(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU-seconds each kind of process spent between two readings of {pid: (title, CPU-s)},
    summed by title, largest first. A process counts under its title at the second reading (a Ray
    worker retitles itself when it takes an actor: ``ray::IDLE`` -> ``ray::DatasetManager``); one
    that started in between counts from zero; one that ended in between is not in ``after`` and
    is left out (its last CPU time is unknown)."""
    out: dict[str, float] = collections.defaultdict(float)
    for pid, (title, cpu) in after.items():
        out[title] += cpu - (before[pid][1] if pid in before else 0.0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
