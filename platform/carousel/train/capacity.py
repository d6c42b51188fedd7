"""Does the Ray cluster have room for every worker? Checked before any MLflow run or checkpoint
exists, because Ray Train would otherwise wait for the missing resources without end."""

from __future__ import annotations

import time
from typing import Any, Callable

from carousel.config import ScalingConfig


class ClusterTooSmall(RuntimeError):
    pass


def worker_resources(s: ScalingConfig) -> dict[str, float]:
    need = {"CPU": float(s.cpus_per_worker)}
    if s.gpus_per_worker > 0:
        need["GPU"] = float(s.gpus_per_worker)
    return need


def workers_that_fit(nodes: list[dict[str, float]], need: dict[str, float]) -> int:
    """How many workers the alive nodes hold: a worker's resources must all come from one node."""
    total = 0
    for node in nodes:
        total += int(min(node.get(k, 0.0) // v for k, v in need.items()))
    return total


def shortfall(nodes: list[dict[str, float]], s: ScalingConfig) -> str | None:
    """None when the workers fit, else a sentence naming the fields and what the cluster has."""
    need = worker_resources(s)
    fit = workers_that_fit(nodes, need)
    if fit >= s.num_workers:
        return None
    per = " + ".join(f"{v:g} {k}" for k, v in need.items())
    have = ", ".join(
        "{" + ", ".join(f"{k} {n.get(k, 0.0):g}" for k in need) + "}" for n in nodes
    ) or "no alive nodes"
    return (
        f"scaling.num_workers: {s.num_workers} workers x ({per}) do not fit this Ray cluster: its nodes have "
        f"{have}, room for {fit}. Lower scaling.num_workers or scaling.cpus_per_worker/gpus_per_worker, or add nodes."
    )


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def wait_for_capacity(
    s: ScalingConfig, timeout_s: float, nodes: Callable[[], list[dict[str, Any]]] = alive_nodes,
    poll_s: float = 2.0,
) -> None:
    deadline = time.monotonic() + timeout_s
    while (problem := shortfall(nodes(), s)) is not None:
        if time.monotonic() >= deadline:
            waited = f" (waited {timeout_s:g} s: scaling.resources_timeout_s)" if timeout_s else ""
            raise ClusterTooSmall(problem + waited)
        time.sleep(poll_s)
