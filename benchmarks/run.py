"""Side-by-side benchmarks: each row is a ratio of two things measured in the same run.

    .venv/bin/python benchmarks/run.py [--only kernel,platform,data,tracking,startup,scaling,memory]
                                       [--data data/kjv-bpe] [--steps 30] [--rounds 2]

Rows (one module each under benchmarks/rows/; docs/performance.md explains how to read them):
  kernel    LM training FLOP/s / same-run GEMM FLOP/s, fp32 and bf16 (autocast, full cast);
            bf16 validation loss / fp32 after the same steps
  platform  Carousel (Ray Train + DeepSpeed, 1 worker x 1 thread) tokens/s / a plain PyTorch loop
  data      loader / raw windowed read, loader / training, time waiting for data; speech loader
            frames/s and padding efficiency
  tracking  step time with the MetricLogger on / off
  startup   `carousel train` to its first step, Ray already up and embedded
  scaling   2 workers x 1 thread / 1 x 1, and / 1 x 2; plain torch.distributed 2 x 1 / 1 x 1 beside it
  memory    peak RSS per worker for ZeRO 0/1/2 x fp32/bf16 on 2 workers

Sides are alternated and medians reported with their range, because the machine is shared: the
load average is recorded with every row. Writes bench-results/results.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as stdlib_platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from carousel.ray_session import worker_env  # noqa: E402

# The plain-PyTorch sides run in this process: give it the OpenMP settings Carousel's workers get,
# before torch (and libgomp, which reads them once) is loaded. "Same threads" includes these.
os.environ.update({k: v for k, v in worker_env().items() if k.startswith(("OMP_", "GOMP_"))})

from common import BIN, ROOT, PrivateCluster, load_avg  # noqa: E402

ROWS = ("threads", "kernel", "platform", "data", "tracking", "startup", "scaling", "memory")


@dataclass
class Ctx:
    data: str
    speech_data: str
    work: Path
    steps: int
    warmup: int
    rounds: int
    kernel_steps: int
    kernel_warmup: int
    kernel_rounds: int
    eval_windows: int
    scaling_steps: int
    startup_rounds: int
    memory_hidden: int
    memory_precisions: list[str]
    precisions: list[str]
    _cluster: PrivateCluster | None = field(default=None, repr=False)

    def cluster(self) -> PrivateCluster:
        """One private Ray cluster for every row that needs Ray already up, started on first use."""
        if self._cluster is None:
            self._cluster = PrivateCluster(self.work)
        return self._cluster

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()


def machine() -> dict:
    import torch

    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "simd": sorted({f for f in flags.split() if f.startswith(("avx", "amx"))}),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "python": stdlib_platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_row(name: str, ctx: Ctx) -> dict:
    import importlib

    module = importlib.import_module(f"rows.{name if name != 'platform' else 'overhead'}")
    before = load_avg()
    t0 = time.time()
    out = module.run(ctx)
    out["load_avg_before"] = before
    out.setdefault("load_avg", load_avg())
    out["seconds"] = round(time.time() - t0, 1)
    return out


def table(results: dict) -> str:
    present = [(name, results["rows"][name]) for name in ROWS if name in results["rows"]]
    w = max([22] + [len(q["name"]) for _, r in present for q in r.get("ratios", [])])
    lines = [f"{'row':{w}s} {'ratio':>9s}  {'goal':8s} {'met':3s}  {'load':>5s}  measured"]
    for name, r in present:
        if "error" in r:
            lines.append(f"{name:{w}s} {'FAILED':>9s}  {r['error'].splitlines()[-1][:90]}")
            continue
        load = r["load_avg"][0]
        for q in r["ratios"]:
            met = "" if q["met"] is None else ("yes" if q["met"] else "NO")
            lines.append(f"{q['name']:{w}s} {q['value']:9.3f}  {q['goal'] or '':8s} {met:3s}  {load:5.1f}  {q['measured']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows, in the order to run them")
    ap.add_argument("--data", default=str(ROOT / "data" / "kjv-bpe"))
    ap.add_argument("--speech-data", default=str(ROOT / "data" / "asr-flite-small"),
                    help="the speech dataset of the data row (synthesized there when absent)")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per side (platform, tracking, data)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the sides")
    ap.add_argument("--kernel-steps", type=int, default=2, help="kernel row: steps per precision per round")
    ap.add_argument("--kernel-warmup", type=int, default=1)
    ap.add_argument("--kernel-rounds", type=int, default=3)
    ap.add_argument("--eval-windows", type=int, default=8, help="kernel row: validation windows compared")
    ap.add_argument("--precisions", default="fp32,bf16-autocast,bf16-cast")
    ap.add_argument("--scaling-steps", type=int, default=15)
    ap.add_argument("--startup-rounds", type=int, default=1)
    ap.add_argument("--memory-hidden", type=int, default=768, help="memory row: the model's width")
    ap.add_argument("--memory-precisions", default="fp32,bf16")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "results.json"))
    args = ap.parse_args()
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the private cluster and any running
    # `carousel train` are stopped by the finally blocks below instead of being left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--only: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    data = os.path.abspath(args.data)
    if not (Path(data) / "manifest.json").exists():
        subprocess.run([str(BIN / "carousel"), "prepare", "text", "--kjv", "--out", data, "--vocab-size", "4000"], check=True)
    speech_data = os.path.abspath(args.speech_data)
    if "data" in rows and not (Path(speech_data) / "manifest.json").exists():
        # The corpus jobs/asr-flite-small.yaml names in its header (flite and espeak-ng, ~35 s on
        # 2 cores), so the speech figures describe the speech demo's batches.
        subprocess.run([str(BIN / "carousel"), "prepare", "speech", "--synthesize", "--utterances", "2000",
                        "--held-out", "200", "--out", speech_data], check=True)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Keep earlier rows of results.json that this run does not measure, so `--only` refreshes a row.
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    results = {"machine": machine(), "load_avg_before": load_avg(), "args": vars(args),
               "rows": dict(previous.get("rows", {}))}
    with tempfile.TemporaryDirectory(prefix="carousel-bench-") as tmp:
        ctx = Ctx(data=data, speech_data=speech_data, work=Path(tmp), steps=args.steps,
                  warmup=args.warmup, rounds=args.rounds, kernel_steps=args.kernel_steps,
                  kernel_warmup=args.kernel_warmup, kernel_rounds=args.kernel_rounds, eval_windows=args.eval_windows,
                  scaling_steps=args.scaling_steps, startup_rounds=args.startup_rounds,
                  memory_hidden=args.memory_hidden,
                  memory_precisions=[p.strip() for p in args.memory_precisions.split(",") if p.strip()],
                  precisions=[p.strip() for p in args.precisions.split(",") if p.strip()])
        try:
            for name in rows:
                print(f"== {name} (load {load_avg()})", flush=True)
                try:
                    results["rows"][name] = run_row(name, ctx)
                except Exception:  # one row's failure must not hide the others' figures
                    results["rows"][name] = {"error": traceback.format_exc(), "load_avg": load_avg()}
                results["rows"][name]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                print(json.dumps(results["rows"][name], default=str)[:2000], flush=True)
                out_path.write_text(json.dumps(results, indent=2, default=str))
        finally:
            ctx.close()
    results["load_avg_after"] = load_avg()
    out_path.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table(results))
    print(f"\nload average before / after: {results['load_avg_before']} / {results['load_avg_after']}  "
          f"({results['machine']['cpus']} CPUs)   -> {out_path}")


if __name__ == "__main__":
    main()
