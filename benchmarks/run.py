"""Side-by-side benchmarks: each row is a ratio of two things measured in the same run.

    .venv/bin/python benchmarks/run.py [--data data/kjv-bpe] [--steps 60] [--only platform,startup,tracking]

Rows:
  platform  Carousel (Ray Train + DeepSpeed, 1 worker x 2 threads) tokens/s / a minimal plain-PyTorch
            loop on the same model, data, steps and threads (goal >= 0.97)
  startup   `carousel train` to its first step: embedded Ray vs an already running cluster (goal <= 15 s)
  tracking  step time with rank 0's MetricLogger on (real sqlite MLflow) / off (goal <= 1.01), and
            what a synchronous mlflow.log_metric per metric would cost instead

Writes bench-results/results.json and prints a table. On a shared machine run it quietly; the
load average is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPEC = ROOT / "benchmarks" / "lm-bench.yaml"


def load_avg() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------ the plain PyTorch baseline


def plain_loop(data: str, steps: int, warmup: int, threads: int, logger=None) -> dict:
    """The same model, data, optimizer, clipping and schedule as the Carousel job, nothing else."""
    import torch

    from carousel.config import load_spec
    from carousel.data.shards import Dataset
    from carousel.data.streams import StreamLoader
    from carousel.models.lm import LanguageModel
    from carousel.models.recurrent import detach_state
    from carousel.train.schedule import build_scheduler

    torch.set_num_threads(threads)
    spec = load_spec(SPEC, [f"data.path={data}"])
    t = spec.train
    ds = Dataset(data)
    torch.manual_seed(spec.seed)
    model = LanguageModel(spec.model, int(ds.manifest.tokenizer["vocab_size"]))
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    sched = build_scheduler(opt, t)
    loader = StreamLoader(ds, "train", 0, 1, t.batch_size, t.bptt)
    state, times = None, []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        x, y, fresh = loader.next()
        if fresh:
            state = None
        loss, state = model(x, detach_state(state), targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        state = detach_state(state)
        if logger is not None:
            logger(step, loss.item())
        times.append(time.perf_counter() - t0)
    steady = times[warmup:]
    tokens = t.batch_size * t.bptt
    return {"step_s": statistics.median(steady), "tokens_per_s": tokens / statistics.median(steady)}


# ------------------------------------------------------------------ Carousel itself


def carousel_train(data: str, steps: int, warmup: int, work: Path, address: str | None = None,
                   extra: list[str] | None = None) -> dict:
    """Run `carousel train` and read its per-step throughput back from MLflow."""
    from mlflow.tracking import MlflowClient

    name = f"bench-{int(time.time() * 1000)}"
    args = [str(BIN / "carousel"), "train", str(SPEC), "--set", f"data.path={data}",
            "--set", f"train.max_steps={warmup + steps + 1}", "--set", f"run.name={name}",
            "--set", f"run.storage_path={work / 'runs'}", *(extra or [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if address:
        args += ["--address", address]
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    out = []
    for line in proc.stdout:
        out.append(line)
        if first_step is None and "step 1/" in line:
            first_step = time.time() - t0
    proc.wait()
    if proc.returncode:
        raise RuntimeError(f"carousel train failed:\n{''.join(out[-40:])}")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("carousel-bench")
    (run,) = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    tps = [m.value for m in sorted(c.get_metric_history(run.info.run_id, "tokens_per_s"), key=lambda m: m.step)
           if warmup < m.step <= warmup + steps]
    return {"tokens_per_s": statistics.median(tps), "first_step_s": first_step, "wall_s": time.time() - t0}


def start_cluster(work: Path) -> tuple[subprocess.Popen, str]:
    from ray._private.services import get_node_ip_address

    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from conftest import free_port

    port = free_port()
    log = open(work / "ray.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    while "Ray runtime started" not in (work / "ray.log").read_text():
        if head.poll() is not None:
            raise RuntimeError((work / "ray.log").read_text())
        time.sleep(0.5)
    return head, f"{get_node_ip_address()}:{port}"


# ------------------------------------------------------------------ rows


def bench_platform(data, steps, warmup, work, repeats=2) -> dict:
    # Alternate the two sides so a change in background load hits both; report medians.
    car, plain = [], []
    for _ in range(repeats):
        plain.append(plain_loop(data, steps, warmup, threads=2)["tokens_per_s"])
        car.append(carousel_train(data, steps, warmup, work)["tokens_per_s"])
    plain.append(plain_loop(data, steps, warmup, threads=2)["tokens_per_s"])
    c, p = statistics.median(car), statistics.median(plain)
    return {
        "carousel_tokens_per_s": c,
        "plain_tokens_per_s": p,
        "ratio": c / p,
        "spread": {"carousel": [min(car), max(car)], "plain": [min(plain), max(plain)]},
        "goal": ">= 0.97",
    }


def bench_startup(data, work) -> dict:
    embedded = carousel_train(data, 2, 0, work)["first_step_s"]
    head, address = start_cluster(work)
    try:
        carousel_train(data, 2, 0, work, address=address)  # warm the cluster's worker pool once
        running = carousel_train(data, 2, 0, work, address=address)["first_step_s"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(60)
    return {"embedded_ray_s": embedded, "running_cluster_s": running, "goal": "running cluster <= 15 s"}


def bench_tracking(data, steps, warmup, work) -> dict:
    from mlflow.tracking import MlflowClient

    from carousel.tracking.metrics import MetricLogger

    uri = f"sqlite:///{work / 'track.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment(f"track-{time.time()}", artifact_location=(work / "art").as_uri())
    run_id = c.create_run(exp).info.run_id
    logger = MetricLogger(c, run_id)
    metrics = lambda step, loss: logger.log({"train_loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}, step)
    run_sync = c.create_run(exp).info.run_id

    def sync(step, loss):
        for k, v in {"train_loss": loss, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0}.items():
            c.log_metric(run_sync, k, v, step=step)

    # Alternate off/on three times (the logger dedups the repeated steps); medians of each side.
    offs, ons = [], []
    for _ in range(3):
        offs.append(plain_loop(data, steps, warmup, threads=2)["step_s"])
        ons.append(plain_loop(data, steps, warmup, threads=2, logger=metrics)["step_s"])
    logger.close()
    synchronous = plain_loop(data, steps, warmup, threads=2, logger=sync)["step_s"]
    assert len(c.get_metric_history(run_id, "train_loss")) == warmup + steps
    off, on = statistics.median(offs), statistics.median(ons)
    return {
        "off_step_s": off,
        "metric_logger_step_s": on,
        "ratio": on / off,
        "spread": {"off": [min(offs), max(offs)], "on": [min(ons), max(ons)]},
        "sync_log_metric_ratio": synchronous / off,
        "goal": "<= 1.01",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT / "data" / "kjv-bpe"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--only", default="platform,startup,tracking")
    args = ap.parse_args()
    data = os.path.abspath(args.data)
    if not (Path(data) / "manifest.json").exists():
        subprocess.run([str(BIN / "carousel"), "prepare", "text", "--kjv", "--out", data, "--vocab-size", "4000"], check=True)
    results = {"load_avg_before": load_avg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="carousel-bench-") as tmp:
        work = Path(tmp)
        for row in args.only.split(","):
            fn = {"platform": lambda: bench_platform(data, args.steps, args.warmup, work),
                  "startup": lambda: bench_startup(data, work),
                  "tracking": lambda: bench_tracking(data, args.steps, args.warmup, work)}[row]
            results[row] = fn()
            results[row]["load_avg"] = load_avg()
            print(row, json.dumps(results[row]), flush=True)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(f"{'row':10s} {'measured':>44s}  {'ratio':>7s}  goal")
    if "platform" in results:
        r = results["platform"]
        print(f"{'platform':10s} {r['carousel_tokens_per_s']:>12.0f} / {r['plain_tokens_per_s']:<12.0f} tok/s (Carousel / plain) {r['ratio']:7.3f}  {r['goal']}")
    if "tracking" in results:
        r = results["tracking"]
        print(f"{'tracking':10s} {r['metric_logger_step_s']*1e3:>12.1f} / {r['off_step_s']*1e3:<12.1f} ms/step (on / off)      {r['ratio']:7.3f}  {r['goal']}"
              f"  (sync log_metric: {r['sync_log_metric_ratio']:.3f})")
    if "startup" in results:
        r = results["startup"]
        print(f"{'startup':10s} first step after {r['running_cluster_s']:.1f} s (running cluster), {r['embedded_ray_s']:.1f} s (embedded Ray)   {r['goal']}")
    print(f"load average before: {results['load_avg_before']:.2f}")


if __name__ == "__main__":
    main()
