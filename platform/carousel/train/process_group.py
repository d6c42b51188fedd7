"""Ray Train's backend for Carousel's workers: torch.distributed is set up on the workers, and
neither the driver nor Train's controller ever loads torch.

Why not Ray's ``TorchConfig``: its module imports torch at the top, and Ray unpickles the config in
the driver and in Train's controller, neither of which runs a tensor. Start-up is three Python
processes in a row (driver, controller, worker), and torch plus ``ray.train.torch`` cost each of
the first two ~1.5 s of a 2-core machine's first-step time (docs/performance.md, start-up). This
backend names Ray's own worker-side functions (process-group setup with its NCCL error handling
and timeouts, torchrun's environment variables, shutdown) through wrappers that import them on
the worker. Only the orchestration (which backend, where rank 0 listens) is written here.

It also carries the workers' environment (``ray_session.worker_env``) and sets it first thing in
every worker, before anything there loads torch, instead of a job-wide ``runtime_env``: a runtime
env sends every process of the job (controller, Train's helper actors, workers) through Ray's
runtime-env agent first, which measured ~1.2 s of start-up here. Object-store credentials, which
Ray Train reads before the backend starts (it opens the run's storage when a worker joins), are
the exception: they stay in the job's runtime env when given (``ray_session.job_runtime_env``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

logger = logging.getLogger(__name__)

# Read once, when torch (libgomp) loads.
READ_WHEN_TORCH_LOADS = ("OMP_WAIT_POLICY",)


def late_variables(env: dict[str, str], torch_loaded: bool, current: dict[str, str]) -> list[str]:
    """Variables of ``env`` that setting now cannot change: torch already read them, with other values."""
    if not torch_loaded:
        return []
    return [k for k in READ_WHEN_TORCH_LOADS if k in env and current.get(k) != env[k]]


def pick_backend(requested: str | None, resources_per_worker: dict[str, float]) -> str:
    """NCCL for GPU workers, gloo otherwise, unless the spec names one."""
    if requested:
        return requested
    return "nccl" if resources_per_worker.get("GPU", 0) > 0 else "gloo"


@dataclass
class ProcessGroupConfig(BackendConfig):
    backend: str | None = None  # None: pick_backend
    timeout_s: int = 1800  # collective operations, as torch.distributed.init_process_group's timeout
    env: dict[str, str] = field(default_factory=dict)  # set in every worker before torch loads

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):
        return CudaDevice

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        # Ray Train exports this to its state API: names only, the values may be credentials.
        return {"backend": self.backend, "timeout_s": self.timeout_s, "env": sorted(self.env)}


class CudaDevice:
    """Ray's TorchConfigContextManager (each GPU worker's default CUDA device), imported on the worker."""

    def __enter__(self):
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        return self._inner.__enter__()

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


class ProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig):
        import ray
        from ray.train._internal.utils import get_address_and_port

        for rank, late in enumerate(worker_group.execute(apply_env, backend_config.env)):
            if late:
                logger.warning("worker rank %d loaded torch before Carousel could set %s; it keeps the node's values",
                               rank, ", ".join(late))
        backend = pick_backend(backend_config.backend, worker_group.get_resources_per_worker())
        addr, port = worker_group.execute_single(0, get_address_and_port)
        worker_group.execute(set_rendezvous, addr, port)
        worker_group.execute(set_torchrun_env)
        ray.get([
            worker_group.execute_single_async(i, setup_process_group, backend=backend, world_rank=i,
                                              world_size=len(worker_group), init_method="env://",
                                              timeout_s=backend_config.timeout_s)
            for i in range(len(worker_group))
        ])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig):
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.train.constants import DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S

        timeout = float(os.environ.get(TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S))
        try:
            ray.get(worker_group.execute_async(shutdown, destroy_process_group=len(worker_group) > 1), timeout=timeout)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %.0f s", timeout)


# ---------------------------------------------------------------- run on the workers


def apply_env(env: dict[str, str]) -> list[str]:
    """Set ``env`` here; returns the variables torch already read, which keep the values it read
    (so what this process reports of them, e.g. rank 0's threads line, stays true)."""
    from carousel.train import host_allocator

    late = late_variables(env, "torch" in sys.modules, dict(os.environ))
    os.environ.update({k: v for k, v in env.items() if k not in late})
    host_allocator.apply(os.environ)
    return late


def set_rendezvous(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)


def set_torchrun_env() -> None:
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()


def setup_process_group(**kwargs) -> None:
    from ray.train.torch.config import _setup_torch_process_group

    _setup_torch_process_group(**kwargs)


def shutdown(destroy_process_group: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy_process_group)


def train_worker(config: dict[str, Any]) -> None:
    """The function Ray Train runs on every worker, named here so the driver need not import the loop."""
    from carousel.train.loop import train_worker as run

    run(config)
