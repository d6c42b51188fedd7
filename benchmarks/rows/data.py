"""Row 3, data: how fast the loaders make batches, against the raw read and against training.

Text (the benchmark job's StreamLoader, rank 0 of 1, [16, 64] windows):
  loader / raw       windows per second from StreamLoader.next() against the most direct way to
                     cut the same windows: one memory-mapped pyarrow read of the split into an
                     int32 array, a precomputed index grid per window, torch.from_numpy. (A bulk
                     read of whole shards is reported too: it moves ~1e9 tokens/s and no loader
                     that hands out 1024-token windows one call at a time can come near it.)
  loader / training  the loader's rate against the plain-PyTorch trainer's consumption
  wait               time spent in loader.next() inside the trainer's steps / step time
Speech (the speech demo's BucketLoader, rank 0 of 2, its frames budget):
  frames/s of the loader against one worker's training consumption (1 thread), and padding
  efficiency over a whole epoch plan: real frames / padded frames.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from bench_math import Goal, alternate, padding_efficiency, ratio, spread
from common import ROOT, WORKER_THREADS, PlainLM, load_avg

SPEECH_JOB = ROOT / "jobs" / "asr-flite-small.yaml"


def raw_bulk(dataset, split: str) -> float:
    """Tokens/s: every shard memory-mapped, read, and made one int64 torch tensor."""
    import pyarrow as pa
    import torch

    t0, n = time.perf_counter(), 0
    for shard in dataset.split(split).shards:
        with pa.memory_map(str(Path(dataset.root.path) / shard.path), "r") as src:
            ids = pa.ipc.open_file(src).read_all()["ids"].combine_chunks().flatten()
            n += torch.from_numpy(ids.to_numpy(zero_copy_only=False).astype(np.int64)).numel()
    return n / (time.perf_counter() - t0)


class RawWindows:
    """The minimal windowed reader: the split's tokens as one int32 array (a single memory-mapped
    read per shard, concatenated), and the same [B, T+1] windows as the loader cut by one numpy
    fancy index each."""

    def __init__(self, dataset, split: str, batch: int, bptt: int):
        import pyarrow as pa

        parts = []
        for shard in dataset.split(split).shards:
            with pa.memory_map(str(Path(dataset.root.path) / shard.path), "r") as src:
                parts.append(pa.ipc.open_file(src).read_all()["ids"].combine_chunks().flatten().to_numpy(zero_copy_only=False))
        self.tokens = np.concatenate(parts)
        stream_len = (len(self.tokens) - 1) // batch
        self.windows = stream_len // bptt
        self.grid = (np.arange(batch) * stream_len)[:, None] + np.arange(bptt + 1)[None, :]
        self.bptt = bptt

    def window(self, k: int):
        import torch

        block = torch.from_numpy(self.tokens[self.grid + k * self.bptt].astype(np.int64))
        return block[:, :-1], block[:, 1:]


def row_by_row(loader, k: int):
    """The window as StreamLoader first cut it: one ``slice`` per stream, stacked
    (kept here as the "before" side of that change)."""
    import torch

    T = loader.bptt
    block = torch.from_numpy(np.stack([loader.tokens.slice(s + k * T, s + k * T + T + 1) for s in loader._starts]))
    return block[:, :-1], block[:, 1:]


def rate_of(fn, count: int, tokens_each: int) -> float:
    t0 = time.perf_counter()
    for k in range(count):
        fn(k)
    return count * tokens_each / (time.perf_counter() - t0)


def text(ctx) -> dict:
    from carousel.data.shards import Dataset
    from carousel.data.streams import StreamLoader

    lm = PlainLM(ctx.data, WORKER_THREADS)
    t = lm.spec.train
    ds = Dataset(ctx.data)
    t0 = time.perf_counter()
    loader = StreamLoader(ds, "train", 0, 1, t.batch_size, t.bptt)  # verifies every shard's sha256
    open_s = time.perf_counter() - t0
    raw = RawWindows(ds, "train", t.batch_size, t.bptt)
    n = min(len(loader), raw.windows)
    tok = t.batch_size * t.bptt
    s = alternate({
        "loader": lambda: rate_of(lambda k: loader.next(), n, tok),
        "raw": lambda: rate_of(raw.window, n, tok),
        "bulk": lambda: raw_bulk(ds, "train"),
        "row_by_row": lambda: rate_of(lambda k: row_by_row(loader, k), n, tok),
    }, ctx.rounds + 1)
    steps = [lm.step() for _ in range(ctx.warmup + ctx.steps)][ctx.warmup:]
    step_s = statistics.median(r["step_s"] for r in steps)
    wait = sum(r["wait_s"] for r in steps) / sum(r["step_s"] for r in steps)
    train_rate = tok / step_s
    ld, rw, bk, rb = spread(s["loader"]), spread(s["raw"]), spread(s["bulk"]), spread(s["row_by_row"])
    return {
        "loader_tokens_per_s": ld, "raw_windows_tokens_per_s": rw, "raw_bulk_tokens_per_s": bk,
        "row_by_row_tokens_per_s": rb,
        "loader_open_s": open_s, "training_tokens_per_s": train_rate, "wait_fraction": wait,
        "ratios": [
            ratio("data loader/raw", ld["median"] / rw["median"], Goal(">=", 0.5),
                  f"{ld['median'] / 1e6:.1f}M / {rw['median'] / 1e6:.1f}M tok/s (StreamLoader / raw windows)"),
            ratio("data loader/before", ld["median"] / rb["median"], None,
                  f"{ld['median'] / 1e6:.1f}M / {rb['median'] / 1e6:.1f}M tok/s (strided shard runs / one slice per row)"),
            ratio("data loader/bulk", ld["median"] / bk["median"], None,
                  f"{ld['median'] / 1e6:.1f}M / {bk['median'] / 1e6:.0f}M tok/s (StreamLoader / bulk read)"),
            ratio("data loader/train", ld["median"] / train_rate, Goal(">=", 50),
                  f"{ld['median'] / 1e6:.1f}M / {train_rate:.0f} tok/s (loader / training)"),
            ratio("data wait", wait, Goal("<=", 0.02), "time in loader.next() / step time"),
        ],
    }


def speech(ctx) -> dict | None:
    import torch

    from carousel.config import load_spec
    from carousel.data.speech_batches import plan_epoch
    from carousel.train.ctc_unit import CTCUnit

    if not (Path(ctx.speech_data) / "manifest.json").exists():
        return None
    spec = load_spec(SPEECH_JOB, [f"data.path={ctx.speech_data}"])
    world, budget = spec.scaling.num_workers, spec.speech.frames_per_batch
    torch.set_num_threads(spec.scaling.cpus_per_worker)
    unit = CTCUnit(spec, torch.device("cpu"))
    loader = unit.train_loader(0, world)
    plan = plan_epoch(loader.data.frames, budget, world, spec.seed, 0)
    eff = padding_efficiency([[int(loader.data.frames[i]) for i in b] for step in plan for b in step])

    def loader_rate() -> float:
        t0, frames = time.perf_counter(), 0
        for _ in range(len(loader)):
            frames += loader.next().frames
        return frames / (time.perf_counter() - t0)

    rates = [loader_rate() for _ in range(2)]
    torch.manual_seed(spec.seed)
    model = unit.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.train.lr)
    consumed, spent = 0, 0.0
    for i in range(ctx.warmup // 2 + max(4, ctx.steps // 4)):
        batch = loader.next()
        t0 = time.perf_counter()
        loss, frames = unit.train_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= ctx.warmup // 2:
            consumed, spent = consumed + frames, spent + time.perf_counter() - t0
    train_rate = consumed / spent
    ld = spread(rates)
    return {
        "dataset": ctx.speech_data, "budget_frames": budget, "world": world,
        "loader_frames_per_s": ld, "training_frames_per_s": train_rate, "padding_efficiency": eff,
        "ratios": [
            ratio("speech padding", eff, Goal(">=", 0.9), "real / padded frames, whole epoch plan"),
            ratio("speech loader/train", ld["median"] / train_rate, Goal(">=", 50),
                  f"{ld['median'] / 1e3:.0f}k / {train_rate / 1e3:.1f}k frames/s (loader / one worker training)"),
        ],
    }


def run(ctx) -> dict:
    out = {"text": text(ctx)}
    sp = speech(ctx)
    if sp is not None:
        out["speech"] = sp
    out["ratios"] = out["text"].pop("ratios") + (sp.pop("ratios") if sp else [])
    out["load_avg"] = load_avg()
    return out
