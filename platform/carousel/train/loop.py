"""The one generic training loop, run inside every Ray Train worker around a DeepSpeed engine.

Model-family specifics live in a unit (units.py). Every rank runs the same number of steps and
calls ``ray.train.report`` at the same steps (it is a barrier). Rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from carousel.train import host_allocator
from carousel.train.runtime import configure_accelerator, rng_state, seed_everything, set_rng_state, set_threads


def _optimizer(model, spec):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Biases and embeddings (tied to the head) get no weight decay.
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.train.lr, betas=spec.train.betas)


def import_deepspeed():
    """``import deepspeed`` without the MLflow import its autotuner makes at import time (1.8 of the
    2.3 s it took here, on every rank; Carousel never runs DeepSpeed's autotuner, which is all that
    uses it). Rank 0 imports MLflow itself when it opens its metric logger; the other ranks never."""
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: DeepSpeed takes it as absent
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def skip_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-building its shared-memory all-reduce op (~2 min on a fresh machine,
    then cached) when its communication backend starts: only ``inference_all_reduce`` uses it, and
    training all-reduces through torch.distributed. DeepSpeed has no setting for this, so its
    record of which ops this machine can build is amended. Call after ``import deepspeed``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def slow_precision_warning(precision: str, device) -> str | None:
    """A warning line for bf16 on a CPU without bf16 arithmetic (no AVX-512 BF16 or AMX): oneDNN
    then takes a generic path, measured 25-40x slower than fp32 on such a CPU (docs/performance.md,
    kernel row). A warning, not a refusal: the run is correct, only slow."""
    import torch

    if precision != "bf16" or device.type != "cpu" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return ("warning: precision bf16 on a CPU without bf16 arithmetic (no AVX-512 BF16 / AMX): expect it to be "
            "many times slower than fp32 (set train.precision=fp32)")


def local_grad_norm(module) -> float:
    """2-norm of the (already all-reduced) gradients. DeepSpeed clips at ZeRO stage 0 but does not
    report the norm it clipped with, so at stage 0 we measure it before ``engine.step()``."""
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def backward_and_step(engine, loss, t, boundary: bool) -> tuple[float | None, bool]:
    """One micro-step. At the accumulation boundary with ZeRO 0, returns the gradient norm and
    whether a non-finite gradient was dropped so the update became a no-op (see nonfinite.py);
    ZeRO 1/2 and fp16 skip such a step inside DeepSpeed and count it in ``engine.skipped_steps``."""
    from contextlib import nullcontext

    from carousel.train.nonfinite import optimizer_step_skipped

    engine.backward(loss)
    norm, dropped = None, False
    if boundary and t.zero_stage == 0:
        # After backward the gradients are all-reduced, so every rank decides alike.
        norm = local_grad_norm(engine.module)
        dropped = not math.isfinite(norm) and t.precision != "fp16"  # fp16: DeepSpeed's loss scaler skips
    with optimizer_step_skipped(engine) if dropped else nullcontext():
        engine.step()
    return norm, dropped


def _intact_checkpoint(rank: int, world: int, say):
    """The checkpoint to continue from: the newest committed one whose files all verify, and the
    directory names already taken in the run (so a new checkpoint never lands in a refused one's).

    Rank 0 checks the candidates (every rank's manifest, sizes and sha256, before DeepSpeed
    unpickles anything) and broadcasts its choice so all ranks load the same step.
    """
    import ray.train
    import torch.distributed as dist

    from carousel.train import checkpoint as ckpt

    latest = ray.train.get_checkpoint()
    if latest is None:
        return None, set()
    choice: list[Any] = [None, set()]
    if rank == 0:
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        candidates = {c.checkpoint.path: (int(c.metrics.get("step", -1)), c.checkpoint) for c in reported}
        choice[1] = {Path(p).name for p in [*candidates, latest.path]}
        candidates.setdefault(latest.path, (1 << 62, latest))  # the latest first, whatever its metrics say

        def check(cp) -> None:
            with cp.as_directory() as d:
                meta = ckpt.read_meta(d)
                if meta["world_size"] != world:  # no older checkpoint would do better: fail
                    raise ckpt.WorldSizeMismatch(
                        f"{cp.path}: written by {meta['world_size']} workers, this run has {world}; "
                        "set scaling.num_workers back or start a new run"
                    )
                ckpt.verify(d, world)

        chosen, refused = ckpt.newest_intact(list(candidates.values()), check)
        for line in refused:
            say(line)
        if refused and chosen is not None:
            say(f"continuing from the newest intact checkpoint: {chosen.path}")
        choice[0] = chosen.path if chosen is not None else ""
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    path, taken = choice
    if not path:
        return None, taken
    return (latest if path == latest.path else ray.train.Checkpoint(path, filesystem=latest.filesystem)), taken


def _warm_start_checkpoint(spec, rank: int, world: int):
    """``run.init_from``, checked by rank 0 (spec compatibility, every file's size and sha256)
    before any rank loads it; every rank raises the same error if it cannot be continued."""
    import ray.train
    import torch.distributed as dist

    from carousel.train import checkpoint as ckpt
    from carousel.train.warm_start import WarmStartError, compatibility_problems

    where = spec.run.init_from
    cp = ray.train.Checkpoint(where)
    problem = [""]
    if rank == 0:
        try:
            with cp.as_directory() as d:
                meta = ckpt.read_meta(d)
                problems = compatibility_problems(meta["spec"], meta["world_size"], spec, world)
                if problems:
                    raise WarmStartError("; ".join(problems))
                ckpt.verify(d, world)
        except (ckpt.CheckpointError, WarmStartError, OSError, KeyError, ValueError) as e:
            problem[0] = f"run.init_from {where}: {e}"
    if world > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise WarmStartError(problem[0])
    return cp


def checkpoint_dir_name(step: int, taken: set[str]) -> str:
    """``checkpoint-<step>``, or ``checkpoint-<step>-2``... when a refused checkpoint of the same
    step still holds that name: Ray Train would merge into it and later delete both as one."""
    name, n = f"checkpoint-{step:08d}", 2
    while name in taken:
        name, n = f"checkpoint-{step:08d}-{n}", n + 1
    taken.add(name)
    return name


def train_worker(config: dict[str, Any]) -> None:
    device = configure_accelerator()
    deepspeed = import_deepspeed()
    import ray.train

    skip_inference_comm_op()
    import torch

    from carousel.config import JobSpec
    from carousel.train import checkpoint as ckpt
    from carousel.train.deepspeed_config import backward_allreduce_needed, deepspeed_config
    from carousel.train.nonfinite import NonFiniteGuard, weights_are_finite
    from carousel.train.progress import progress_line, say
    from carousel.train.safe_load import weights_only_engine
    from carousel.train.schedule import build_scheduler
    from carousel.train.units import make_unit

    spec = JobSpec.model_validate(config["spec"])
    t = spec.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    set_threads(spec.scaling.cpus_per_worker)

    seed_everything(spec.seed)  # identical initial weights on every rank
    unit = make_unit(spec, device)
    model = unit.build_model()
    optimizer = _optimizer(model, spec)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=build_scheduler(optimizer, t), config=deepspeed_config(t, world)
    )
    engine.enable_backward_allreduce = engine.enable_backward_allreduce and backward_allreduce_needed(t.zero_stage, world)
    loader = unit.train_loader(rank, world)
    seed_everything(spec.seed + 1 + rank)  # per-rank dropout streams
    metric = unit.metric  # checkpoints are ranked by it, lower is better

    step, best, unsent_metrics = 0, {}, []
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    restored, taken_names = _intact_checkpoint(rank, world, say)
    warm = restored is None and spec.run.init_from is not None
    if warm:
        restored = _warm_start_checkpoint(spec, rank, world)
    if restored is not None:
        with restored.as_directory() as d:
            d = Path(d)
            meta = ckpt.read_meta(d)
            with weights_only_engine(engine):  # data, never code: see safe_load.py
                engine.load_checkpoint(str(d / ckpt.ENGINE_DIR), tag=meta["tag"])
            state = ckpt.load_rank_state(d, rank)
        loader.load_state_dict(state["loader"])
        unit.load_state_dict(state["unit"], device)
        set_rng_state(state["rng"])
        if "nonfinite" in state:
            guard.load_state_dict(state["nonfinite"])
        step, best = meta["step"], meta.get("best", {})
        # Another run's unsent points belong to that run's MLflow run, not to this one.
        unsent_metrics = [] if warm else state.get("unsent_metrics", [])
        if warm:
            from carousel.train.warm_start import apply_hyperparameters

            apply_hyperparameters(engine, t)

    logger, run_id = None, None
    if rank == 0:
        from carousel.tracking.metrics import MetricLogger, last_logged_step
        from carousel.tracking.runs import wait_for_mlflow_run
        from carousel.tracking.store import client

        c = client(config["tracking_uri"])
        # `carousel train` opens the MLflow run while the workers start (launcher.py); tune trials
        # open theirs first and pass the id.
        run_id = config.get("mlflow_run_id") or wait_for_mlflow_run(
            config["run_storage"], config["run_name"], config["launch"]
        )
        logger = MetricLogger(c, run_id, skip_through_step=last_logged_step(c, run_id, "lr"))
        logger.resend(unsent_metrics)  # points the checkpoint covers that the server never confirmed
        monitor = None
        if spec.tracking.log_system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id, sampling_interval=spec.tracking.system_metrics_interval, resume_logging=True,
                tracking_uri=config["tracking_uri"],
            )
            monitor.start()
        params = sum(p.numel() for p in model.parameters())
        for line in unit.summary_lines(params, world):
            say(line)
        # What reached this worker (train/process_group.py sets the policy before torch loads).
        say(f"threads: {torch.get_num_threads()} per worker, OpenMP waits {os.environ.get('OMP_WAIT_POLICY', 'by default')}; "
            f"host allocator: {host_allocator.applied()}")
        if (warning := slow_precision_warning(t.precision, device)) is not None:
            say(warning)
        if warm:
            say(f"continuing {spec.run.init_from} at step {step} (lr {engine.get_lr()[0]:.3g})")
        else:
            say(f"resuming at step {step}" if step else "starting at step 0")

    def evaluate(split: str, limit: int | None) -> dict[str, float]:
        return unit.evaluate(engine.module, split, rank, world, limit)

    def save_and_report(metrics: dict[str, float]) -> None:
        if not weights_are_finite(engine.module):  # the NaN guard should make this unreachable
            raise ckpt.CheckpointError(f"step {step}: the weights hold NaN/Inf; no checkpoint is published")
        export = meta = None
        if rank == 0:
            export = {"state_dict": ckpt.export_state_dict(engine.module), **unit.export(engine.module)}
            meta = {
                "step": step,
                "world_size": world,
                "metrics": metrics,
                "best": best,
                "mlflow_run_id": run_id,
                "spec": spec.model_dump(mode="json"),
            }
        rank_state = {"loader": loader.state_dict(), "unit": unit.state_dict(), "rng": rng_state(),
                      "nonfinite": guard.state_dict(), "unsent_metrics": logger.unsent() if logger else []}
        with tempfile.TemporaryDirectory(prefix="carousel-ckpt-") as tmp:
            ckpt.save(Path(tmp), engine, f"step{step}", rank, rank_state, meta, export)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(step, taken_names),
            )
        # report() returns once the files are in storage, but the controller registers the
        # checkpoint only at its next poll of the workers (every ~2 s). A worker killed in between
        # takes the report with it and the restarted group would begin from an older checkpoint
        # (or step 0), so training goes on only after Ray Train has committed this one.
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)

    # Rank 0's metric points go out every 2 s from a background thread: a run that stops with an
    # error (NaN steps in a row, a corrupt shard) still sends what it logged before it ends.
    try:
        engine.train()
        stage0_norm = float("nan")
        window_t0, window_loss, window_steps, window_work = time.time(), 0.0, 0, 0
        run_t0, run_step0 = time.time(), step
        drill = set(t.inject_nonfinite_steps)
        while step < t.max_steps:
            skipped_before, dropped = engine.skipped_steps, False
            step_loss = 0.0
            for micro in range(t.grad_accum):
                loss, work = unit.train_loss(engine, loader.next())
                if step + 1 in drill:
                    loss = loss * float("nan")
                window_work += work  # tokens or frames: what the throughput counts
                norm, drop = backward_and_step(engine, loss, t, boundary=micro == t.grad_accum - 1)
                if norm is not None:
                    stage0_norm, dropped = norm, dropped or drop
                step_loss = step_loss + loss.detach().float() / t.grad_accum  # no host sync per step
            step += 1
            skipped = dropped or engine.skipped_steps > skipped_before
            guard.observe(step, skipped)
            if skipped:
                if rank == 0:
                    say(f"step {step}: NaN/Inf loss or gradient; update skipped ({guard.in_a_row} in a row, {guard.total} in all)")
            else:
                window_loss = window_loss + step_loss
                window_steps += 1
            last = step == t.max_steps
            halt = step == t.halt_at_step

            if step % t.log_every == 0 or last or halt:
                unit_mean = float(window_loss) / window_steps if window_steps else float("nan")
                total_work = float(window_work)
                if world > 1:
                    import torch.distributed as dist

                    tl = torch.tensor([unit_mean, total_work], dtype=torch.float64)
                    dist.all_reduce(tl)
                    unit_mean, total_work = float(tl[0]) / world, float(tl[1])
                if rank == 0:
                    elapsed = time.time() - window_t0
                    per_s = total_work / max(elapsed, 1e-9)
                    lr = engine.get_lr()[0]
                    rate = (step - run_step0) / max(time.time() - run_t0, 1e-9)
                    extra = unit.train_metrics(unit_mean) if window_steps else {}
                    point = {"lr": lr, "nonfinite_skipped": guard.total, unit.rate_name: per_s}
                    if window_steps:  # a window of skipped steps has no loss worth charting
                        grad_norm = stage0_norm if t.zero_stage == 0 else float(engine.get_global_grad_norm())
                        point.update({"train_loss": unit_mean, **extra, "grad_norm": grad_norm})
                    logger.log(point, step)
                    say(progress_line(step, t.max_steps, unit_mean, extra.get("train_ppl"), lr, per_s,
                                      (t.max_steps - step) / max(rate, 1e-9), unit.rate_unit))
                window_t0, window_loss, window_steps, window_work = time.time(), 0.0, 0, 0

            checkpoint_now = step % spec.run.checkpoint_every == 0 or last or halt
            if step % t.eval_every == 0 or checkpoint_now:
                val = unit.split_metrics("val", evaluate(spec.data.valid_split, t.eval_batches))
                metrics: dict[str, Any] = {"step": step, **val}
                if not best or val[metric] < best[metric]:
                    best = {metric: val[metric], "step": step}
                metrics[f"best_{metric}"] = best[metric]
                if rank == 0:
                    logger.log({**val, f"best_{metric}": best[metric]}, step)
                    say(f"step {step}: validation {unit.describe(val, 'val')}")
                if last:
                    # Ray Train's Result carries the metrics of the latest checkpoint: the final test
                    # figures must travel with the final checkpoint.
                    test = unit.split_metrics("test", evaluate(spec.data.test_split, None))
                    metrics.update(test)
                    if rank == 0:
                        logger.log(test, step)
                        say(f"test {unit.describe(test, 'test')}")
                metrics["halted"] = halt
                if checkpoint_now:
                    save_and_report(metrics)
                else:
                    ray.train.report(metrics)
                # Throughput and ETA measure training, not evaluation or checkpoint writing.
                window_t0 = time.time()
            if halt:
                break
    finally:
        if rank == 0:
            if monitor is not None:
                monitor.finish()
            logger.close()
