"""What the rows share: the plain-PyTorch trainer, `carousel train` as a subprocess, a private
Ray cluster, and reading the load average and workers' memory."""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

from bench_math import cpu_by_title, process_title, steps_at, vm_hwm_bytes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEC = ROOT / "benchmarks" / "lm-bench.yaml"
# Intra-op threads of the benchmark job's worker: every plain-PyTorch side uses the same.
WORKER_THREADS = int(re.search(r"cpus_per_worker:\s*(\d+)", SPEC.read_text()).group(1))
PRECISIONS = ("fp32", "bf16-autocast", "bf16-cast")


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------ the plain PyTorch baseline


class PlainLM:
    """The benchmark job's model, data, optimizer (same parameter groups as train/loop.py),
    clipping and LR schedule in a bare PyTorch loop: the baseline every overhead is measured
    against, and the kernel row's subject.

    precision:
      fp32           everything in fp32
      bf16-autocast  fp32 weights; matmuls (and oneDNN's RNN, where the CPU supports it) in bf16
      bf16-cast      the model cast to bf16 (what DeepSpeed's bf16 mode does) with fp32 master
                     weights for AdamW, as DeepSpeed's BF16 optimizer keeps them

    Each instance keeps its own RNG stream, so two instances stepped alternately draw the same
    dropout masks as each would alone: precisions compared side by side see identical batches
    and masks.
    """

    def __init__(self, data: str, threads: int, precision: str = "fp32", overrides: list[str] | None = None,
                 rank: int = 0, world: int = 1):
        import torch

        from carousel.config import load_spec
        from carousel.data.shards import Dataset
        from carousel.data.streams import StreamLoader
        from carousel.models.lm import LanguageModel
        from carousel.train.loop import _optimizer
        from carousel.train import host_allocator
        from carousel.train.runtime import set_threads
        from carousel.train.schedule import build_scheduler

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        set_threads(threads)  # what a Carousel worker does: intra-op threads = CPUs, one inter-op thread
        host_allocator.apply(os.environ)  # and its allocator's thresholds (train/host_allocator.py)
        self.torch, self.precision = torch, precision
        self.spec = spec = load_spec(SPEC, [f"data.path={data}", *(overrides or [])])
        t = spec.train
        self.dataset = Dataset(data, verify_checksums=False)  # verified once by the caller's first run
        torch.manual_seed(spec.seed)
        self.model = LanguageModel(spec.model, int(self.dataset.manifest.tokenizer["vocab_size"]))
        self.compute = self.model
        if precision == "bf16-cast":
            self.compute = copy.deepcopy(self.model).to(torch.bfloat16)  # tied weights stay tied
        self.opt = _optimizer(self.model, spec)
        self.sched = build_scheduler(self.opt, t)
        # With world > 1 (torch.distributed initialized): this rank's streams, as a Carousel worker reads them.
        self.rank, self.world = rank, world
        self.loader = StreamLoader(self.dataset, spec.data.train_split, rank, world, t.batch_size, t.bptt)
        self.tokens_per_step = t.batch_size * t.bptt
        self.state = None
        self._rng = torch.get_rng_state()

    def _ctx(self):
        if self.precision == "bf16-autocast":
            return self.torch.autocast("cpu", dtype=self.torch.bfloat16)
        return nullcontext()

    def step(self) -> dict[str, float]:
        """One training step -> {"step_s", "wait_s" (time in the loader), "loss"}."""
        from carousel.models.recurrent import detach_state

        torch = self.torch
        torch.set_rng_state(self._rng)
        t0 = time.perf_counter()
        x, y, fresh = self.loader.next()
        t1 = time.perf_counter()
        if fresh:
            self.state = None
        with self._ctx():
            loss, state = self.compute(x, self.state, targets=y)
        self.opt.zero_grad(set_to_none=True)
        self.compute.zero_grad(set_to_none=True)
        loss.backward()
        if self.world > 1:  # data parallel: one flat all-reduce of the mean gradient (DeepSpeed ZeRO 0's way)
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            grads = [p.grad for p in self.compute.parameters() if p.grad is not None]
            flat = _flatten_dense_tensors(grads).div_(self.world)
            torch.distributed.all_reduce(flat)
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        if self.compute is not self.model:  # bf16 grads -> fp32 master, update, copy back
            for master, low in zip(self.model.parameters(), self.compute.parameters()):
                master.grad = low.grad.float()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.train.grad_clip)
        self.opt.step()
        self.sched.step()
        if self.compute is not self.model:
            with torch.no_grad():
                for master, low in zip(self.model.parameters(), self.compute.parameters()):
                    low.copy_(master)
        self.state = detach_state(state)
        value = float(loss.detach())  # a host sync, as any loop that logs the loss has
        t2 = time.perf_counter()
        self._rng = torch.get_rng_state()
        return {"step_s": t2 - t0, "wait_s": t1 - t0, "loss": value}

    def evaluate(self, windows: int) -> float:
        """Mean validation cross-entropy over the first ``windows`` windows of the valid split."""
        from carousel.data.streams import StreamLoader

        torch, t = self.torch, self.spec.train
        loader = StreamLoader(self.dataset, self.spec.data.valid_split, 0, 1, t.batch_size, t.bptt, max_windows=windows)
        self.compute.eval()
        total, n, state = 0.0, 0, None
        with torch.no_grad(), self._ctx():
            for x, y, _ in loader:
                loss, state = self.compute(x, state, targets=y)
                total += float(loss) * y.numel()
                n += y.numel()
        self.compute.train()
        return total / n


def plain_loop(data: str, steps: int, warmup: int, threads: int, logger=None, precision: str = "fp32",
               rank: int = 0, world: int = 1) -> dict:
    """``warmup + steps`` plain steps; medians of the steady ones."""
    lm = PlainLM(data, threads, precision, rank=rank, world=world)
    times, waits = [], []
    cpu0 = None
    for step in range(warmup + steps):
        if step == warmup:
            cpu0 = time.process_time()
        r = lm.step()
        if logger is not None:
            t0 = time.perf_counter()
            logger(step, r["loss"])
            r["step_s"] += time.perf_counter() - t0
        if step >= warmup:
            times.append(r["step_s"])
            waits.append(r["wait_s"])
    cpu = time.process_time() - cpu0
    med = statistics.median(times)
    return {"step_s": med, "tokens_per_s": lm.tokens_per_step / med, "wait_s": statistics.median(waits),
            "tokens_per_cpu_s": lm.tokens_per_step * steps / cpu}


def plain_process(data: str, steps: int, warmup: int, threads: int, env: dict[str, str | None] | None = None) -> dict:
    """plain_loop in a fresh Python process, as a Carousel worker is one: the thread set-up and
    OpenMP environment start from scratch (``env``: variables to set, or with None to remove)."""
    import json

    e = {**os.environ, **{k: v for k, v in (env or {}).items() if v is not None}}
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
    out = subprocess.run([sys.executable, __file__, "plain", data, str(steps), str(warmup), str(threads)],
                         env=e, capture_output=True, text=True, start_new_session=True)
    if out.returncode:
        raise RuntimeError(f"plain loop failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_data_parallel(data: str, steps: int, warmup: int, world: int) -> dict:
    """plain_loop on ``world`` fresh processes x 1 thread, torch.distributed (gloo) with no Ray: what
    data parallelism reaches on this machine with nothing else running. Global tokens/s from the
    slowest rank's median step (every step waits for the all-reduce)."""
    import json

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from conftest import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, __file__, "plain-ddp", data, str(steps), str(warmup), str(r), str(world)],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for r in range(world)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("plain data-parallel run failed:\n" + "\n".join(err[-2000:] for _, err in outs))
    ranks = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    step_s = max(r["step_s"] for r in ranks)
    return {"step_s": step_s, "tokens_per_s": world * ranks[0]["tokens_per_s"] * ranks[0]["step_s"] / step_s,
            "tokens_per_cpu_s": world / sum(1 / r["tokens_per_cpu_s"] for r in ranks)}


# ------------------------------------------------------------------ Carousel itself


def carousel_train(data: str, steps: int, warmup: int, work: Path, address: str | None = None,
                   extra: list[str] | None = None, watch: Callable[[str, subprocess.Popen], None] | None = None,
                   spec: Path = SPEC, workers_root: int | None = None, env: dict[str, str] | None = None,
                   tracking_uri: str | None = None) -> dict:
    """Run `carousel train` and read its per-step throughput back from MLflow.

    ``watch(line, proc)`` sees every output line as it arrives (the memory row reads the
    workers' peak RSS when a given step is printed). The result carries a timeline: seconds from
    launch to the first occurrence of each start-up milestone, and ``tokens_per_cpu_s``: tokens of
    the measured steps per CPU-second the train workers spent on them (read from /proc when rank 0
    prints the first and the last of those steps; ``workers_root`` is the process the workers
    descend from: a running cluster's head, else this command). CPU time hardly moves with the
    machine's load, so it backs the wall-clock figure on a shared machine. ``env``: variables added
    to the command's environment (OMP_WAIT_POLICY reaches the workers through ray_session.worker_env).
    ``tracking_uri``: where the run tracks (default: a sqlite store in ``work``). ``machine`` splits
    the whole machine's CPU over the measured steps: the train workers, everything else, idle.
    """
    from mlflow.tracking import MlflowClient

    name = f"bench-{int(time.time() * 1000)}"
    # A progress line (and a metric point) every gcd(warmup, warmup + steps) steps: the coarsest grid
    # that still prints both ends of the measured window. A line per step cost a 2-worker run ~4 %
    # of this machine (Ray forwards each line from the worker to the driver; docs/performance.md).
    log_every = math.gcd(warmup, warmup + steps) or 1
    args = [str(BIN / "carousel"), "train", str(spec), "--set", f"data.path={data}",
            "--set", f"train.max_steps={warmup + steps + log_every}", "--set", f"run.name={name}",
            "--set", f"train.log_every={log_every}",
            "--set", f"run.storage_path={work / 'runs'}", *(extra or [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if address:
        args += ["--address", address]
    # Lines printed by the driver, Ray Train's controller, DeepSpeed and rank 0, in launch order.
    milestones = {"run_opened": re.compile(r"^starting run "), "controller": re.compile(r"Requesting resources"),
                  "workers_started": re.compile(r"Started training worker group"),
                  "deepspeed_comm": re.compile(r"DeepSpeed .* built successfully"),
                  "model_built": re.compile(r"model: \d+ x"), "first_step": re.compile(r"\bstep\s+1/"),
                  "last_report": re.compile(r"Reporting training result"), "finished": re.compile(r": FINISHED in ")}
    timeline: dict[str, float] = {}
    window = {warmup: re.compile(rf"\bstep\s+{warmup}/"), warmup + steps: re.compile(rf"\bstep\s+{warmup + steps}/")}
    cpu_at: dict[int, tuple[float, dict[str, float]]] = {}
    before = set(train_workers(workers_root)) if workers_root else set()
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            for key, pat in milestones.items():
                if key not in timeline and pat.search(line):
                    timeline[key] = round(time.time() - t0, 2)
            for step, pat in window.items():
                if steps and step not in cpu_at and pat.search(line):
                    cpu_at[step] = (time.time(), workers_cpu_by_thread(workers_root or proc.pid, before), machine_cpu(),
                                    processes_cpu([r for r in (workers_root, proc.pid) if r]))
            if watch is not None:
                watch(line, proc)
        proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        raise
    if proc.returncode:
        raise RuntimeError(f"carousel train failed:\n{''.join(out[-40:])}")
    c = MlflowClient(tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("carousel-bench")
    (run,) = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    history = c.get_metric_history(run.info.run_id, "tokens_per_s")
    tps = [m.value for m in sorted(history, key=lambda m: m.step) if warmup < m.step <= warmup + steps]
    threads, done, machine = {}, 0, {}
    if len(cpu_at) == 2:
        (ta, a, ma, pa), (tb, b, mb, pb) = cpu_at[warmup], cpu_at[warmup + steps]
        threads = {k: b[k] - a.get(k, 0.0) for k in b}
        busy, idle = mb[0] - ma[0], mb[1] - ma[1]
        if busy + idle > 0:
            work_s = sum(threads.values())
            machine = {"train_workers": round(work_s / (busy + idle), 3),
                       "everything_else": round((busy - work_s) / (busy + idle), 3),
                       "idle": round(idle / (busy + idle), 3),
                       # who "everything else" is, as shares of the machine: the cluster's daemons, Train's
                       # actors, the driver (the workers' own share is train_workers, above)
                       "by_process": {k: round(v / (busy + idle), 4) for k, v in cpu_by_title(pa, pb).items()
                                      if k != "RayTrainWorker" and v / (busy + idle) >= 0.0005}}
        # The lines reach us through Ray's log forwarding, late by a varying fraction of a second:
        # count the steps finished between the two CPU readings from the metric timestamps rank 0
        # wrote right after each logged step (same clock), interpolated between logged steps, not
        # from the step numbers the lines carry. One more logged step after the window keeps the
        # last reading before the run's final validation and checkpoint.
        done = steps_at(history, tb) - steps_at(history, ta)
    cpu = sum(threads.values()) if threads else float("nan")
    per_step = int(run.data.params.get("train.batch_size", 0)) * int(run.data.params.get("train.bptt", 0)) * \
        int(run.data.params.get("scaling.num_workers", 1))
    return {"tokens_per_s": statistics.median(tps) if tps else float("nan"), "first_step_s": timeline.get("first_step"),
            "wall_s": round(time.time() - t0, 2), "timeline": timeline, "machine": machine,
            "tokens_per_cpu_s": per_step * done / cpu if cpu > 0 and done else float("nan"),
            "cpu_s_by_thread": thread_summary(threads)}


class PrivateCluster:
    """A `ray start --head` of our own (2 CPUs), stopped by its process group: never `ray stop`,
    which would stop every Ray on a shared machine."""

    def __init__(self, work: Path, num_cpus: int = 2):
        from ray._private.services import get_node_ip_address

        sys.path.insert(0, str(ROOT / "tests" / "integration"))
        from conftest import free_port

        port = free_port()
        self.address = f"{get_node_ip_address()}:{port}"
        self.log_path = work / f"ray-{port}.log"
        log = open(self.log_path, "w")
        # RAY_ADDRESS: Ray Train's PlacementGroupCleaner finds this cluster's State API (not the
        # machine's latest) and a run ends without its 12 s timeout (see tests/integration/conftest.py).
        # Metrics exporters off, as `carousel cluster up` runs them (cluster/local.py process_env):
        # the cluster a user's `carousel train` meets, and less daemon CPU on 2 cores.
        from carousel.cluster.local import METRICS_OFF, QUIET_LOG_MONITOR
        from carousel.ray_session import ensure_token

        ensure_token()  # token auth on, as cluster up runs it (`ray start` alone: only if a token exists)
        env = {**os.environ, "RAY_ADDRESS": self.address, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "RAY_AUTH_MODE": "token",
               "RAY_enable_metrics_collection": "0", "AUTOSCALER_METRIC_PORT": str(METRICS_OFF),
               "DASHBOARD_METRIC_PORT": str(METRICS_OFF), **QUIET_LOG_MONITOR}
        self.head = subprocess.Popen(
            [str(BIN / "python"), "-m", "carousel.cluster.ray_node", "start", "--head", "--block", f"--port={port}",
             f"--num-cpus={num_cpus}", f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1",
             "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        deadline = time.time() + 180
        while "Ray runtime started" not in self.log_path.read_text():
            if self.head.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(self.log_path.read_text())
            time.sleep(0.5)

    def stop(self) -> None:
        if self.head.poll() is None:
            os.killpg(self.head.pid, signal.SIGTERM)
            try:
                self.head.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.head.pid, signal.SIGKILL)
                self.head.wait(10)

    def __enter__(self) -> "PrivateCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------ workers' memory


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) CPU-seconds of the whole machine since boot, from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = f[3] + f[4]  # idle + iowait
    return (sum(f[:8]) - idle) / tick, idle / tick


class MlflowServer:
    """An MLflow tracking server of our own (sqlite in ``work``), as `carousel cluster up` runs one
    beside its Ray cluster; stopped by its process group."""

    def __init__(self, work: Path):
        sys.path.insert(0, str(ROOT / "tests" / "integration"))
        from conftest import free_port

        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.log_path = work / f"mlflow-{port}.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [str(BIN / "python"), "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(self.log_path.read_text()[-3000:])
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def processes_cpu(roots: Sequence[int]) -> dict[int, tuple[str, float]]:
    """{pid: (process_title, CPU-s)} of ``roots`` and every process below them: a Ray node's
    daemons, Train's actors and workers, the driver."""
    import psutil

    out = {}
    for root in roots:
        try:
            procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = (process_title(p.cmdline()), t.user + t.system)
            except psutil.Error:
                continue  # exited between listing and reading
    return out


def workers_cpu_by_thread(root_pid: int, exclude: set[int]) -> dict[str, float]:
    """CPU seconds (user + system) of the Ray Train workers below ``root_pid`` (except
    ``exclude``), by thread name: where a worker's CPU goes besides the training thread (Ray's
    threads, the metric logger, OpenMP's pool). Read from /proc/<pid>/task/<tid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in train_workers(root_pid):
        if pid in exclude:
            continue
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                stat = (task / "stat").read_text()
                name = (task / "comm").read_text().strip()
            except OSError:
                continue  # the thread ended
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            out[f"{pid}/{task.name} {name}"] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def thread_summary(cpu_by_thread: dict[str, float]) -> dict[str, float]:
    """Per-thread CPU -> the busiest thread (the training thread), the next (OpenMP's second
    thread, when there are two), and every other thread summed (Ray, gloo, the metric logger):
    most threads inherit the worker's name, so their rank is what tells them apart."""
    ranked = sorted(cpu_by_thread.values(), reverse=True)
    return {"busiest": round(sum(ranked[:1]), 3), "second": round(sum(ranked[1:2]), 3),
            "all_others": round(sum(ranked[2:]), 3)}


def workers_cpu_s(root_pid: int, exclude: set[int]) -> float:
    """User + system CPU seconds of the Ray Train workers below ``root_pid`` (except ``exclude``)."""
    return sum(workers_cpu_by_thread(root_pid, exclude).values())


def train_workers(root_pid: int) -> dict[int, int]:
    """{pid: peak RSS bytes} of the Ray Train workers below ``root_pid`` (a `carousel train` with
    embedded Ray, or our own cluster's head): only our processes, whatever else runs."""
    import psutil

    out = {}
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return out
    for p in kids:
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                out[p.pid] = vm_hwm_bytes(Path(f"/proc/{p.pid}/status").read_text())
        except (psutil.Error, OSError, ValueError):
            continue  # exited between listing and reading
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["plain"]:
    import json

    _data, _steps, _warmup, _threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    print(json.dumps(plain_loop(_data, _steps, _warmup, _threads)))

if __name__ == "__main__" and sys.argv[1:2] == ["plain-ddp"]:
    import json

    _data, _steps, _warmup, _rank, _world = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from carousel.ray_session import worker_env

    os.environ.update({k: v for k, v in worker_env().items() if k.startswith(("OMP_", "GOMP_"))})  # before torch
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=_rank, world_size=_world)
    try:
        print(json.dumps(plain_loop(_data, _steps, _warmup, 1, rank=_rank, world=_world)))
    finally:
        dist.destroy_process_group()
