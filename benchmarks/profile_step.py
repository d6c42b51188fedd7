"""Where a training step's time goes: the profiles behind docs/performance.md.

    .venv/bin/python benchmarks/profile_step.py torch  [--precision fp32] [--steps 10] [--threads 2]
        torch.profiler over plain-PyTorch steps of the benchmark model (benchmarks/lm-bench.yaml):
        operators by self CPU time -> bench-results/profile-torch-<precision>.txt
    .venv/bin/python benchmarks/profile_step.py worker [--seconds 15] [--native] [--set key=value ...]
        `carousel train` of the benchmark job; when rank 0 prints step 1, py-spy samples the Ray
        Train worker for --seconds -> bench-results/profile-worker.txt (collapsed stacks, for any
        flame-graph viewer) and the functions with the most samples on the terminal.

Run it on a quiet machine if you can; whatever the load, the shares of the total are what to read.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from carousel.ray_session import worker_env  # noqa: E402

os.environ.update({k: v for k, v in worker_env().items() if k.startswith(("OMP_", "GOMP_"))})

from bench_math import leaf_summary  # noqa: E402
from common import BIN, ROOT, PlainLM, carousel_train, train_workers  # noqa: E402

OUT = ROOT / "bench-results"


def torch_profile(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    lm = PlainLM(args.data, args.threads, args.precision)
    for _ in range(3):
        lm.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            lm.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    OUT.mkdir(exist_ok=True)
    path = OUT / f"profile-torch-{args.precision}.txt"
    path.write_text(table)
    print(table)
    print(f"-> {path}")


def worker_profile(args) -> None:
    OUT.mkdir(exist_ok=True)
    out = OUT / "profile-worker.txt"
    first = re.compile(r"\bstep\s+\d+/")  # rank 0's first progress line
    spy: list[subprocess.Popen] = []

    def watch(line, proc):
        if spy or not first.search(line):
            return
        pids = list(train_workers(proc.pid))
        if pids:
            cmd = [str(BIN / "py-spy"), "record", "--pid", str(pids[0]), "--duration", str(args.seconds),
                   "--rate", "100", "--format", "raw", "--output", str(out)] + (["--native"] if args.native else [])
            spy.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))

    # Enough steps to outlast the sampling, a multiple of the warm-up: carousel_train prints a
    # progress line every gcd(warmup, warmup + steps) steps, so the first comes at step 5.
    warmup = 5
    steps = warmup * max(4, args.seconds * 2)
    extra = [a for kv in args.set for a in ("--set", kv)]
    with tempfile.TemporaryDirectory(prefix="carousel-profile-") as tmp:
        carousel_train(args.data, steps, warmup, Path(tmp), extra=extra, watch=watch)
    if not spy:
        raise SystemExit("no training worker was found to profile")
    _, err = spy[0].communicate(timeout=args.seconds + 60)
    if spy[0].returncode or not out.exists():
        raise SystemExit(f"py-spy failed: {err}")
    print("innermost frames of the training thread (train/loop.py train_worker), share of its samples:")
    for frame, share in leaf_summary(out.read_text(), within="train_worker (carousel/train/loop.py"):
        print(f"{share:7.1%}  {frame}")
    print(f"-> {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("torch")
    t.add_argument("--precision", default="fp32", choices=("fp32", "bf16-autocast", "bf16-cast"))
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--threads", type=int, default=2)
    w = sub.add_parser("worker")
    w.add_argument("--seconds", type=int, default=15)
    w.add_argument("--native", action="store_true", help="include C/C++ frames (oneDNN, MKL)")
    w.add_argument("--set", action="append", default=[], help="override the benchmark job, e.g. scaling.num_workers=2")
    for p in (t, w):
        p.add_argument("--data", default=str(ROOT / "data" / "kjv-bpe"))
    args = ap.parse_args()
    args.data = os.path.abspath(args.data)
    torch_profile(args) if args.what == "torch" else worker_profile(args)


if __name__ == "__main__":
    main()
