"""The one generic training loop, run inside every Ray Train worker around a DeepSpeed engine.

Model-family specifics live in a unit (units.py). Every rank runs the same number of steps and
calls ``ray.train.report`` at the same steps (it is a barrier). Rank 0 alone talks to MLflow.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from carousel.train.runtime import configure_accelerator, rng_state, seed_everything, set_rng_state, set_threads


def _optimizer(model, spec):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Biases and embeddings (tied to the head) get no weight decay.
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.train.lr, betas=spec.train.betas)


def local_grad_norm(module) -> float:
    """2-norm of the (already all-reduced) gradients. DeepSpeed clips at ZeRO stage 0 but does not
    report the norm it clipped with, so at stage 0 we measure it before ``engine.step()``."""
    import torch

    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def train_worker(config: dict[str, Any]) -> None:
    device = configure_accelerator()
    import deepspeed
    import ray.train
    import torch

    from carousel.config import JobSpec
    from carousel.train import checkpoint as ckpt
    from carousel.train.deepspeed_config import deepspeed_config
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
    loader = unit.train_loader(rank, world)
    seed_everything(spec.seed + 1 + rank)  # per-rank dropout streams
    metric = unit.metric  # checkpoints are ranked by it, lower is better

    step, best = 0, {}
    restored = ray.train.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            d = Path(d)
            meta = ckpt.read_meta(d)
            if meta["world_size"] != world:
                raise ckpt.CheckpointError(
                    f"{d}: written by {meta['world_size']} workers, this run has {world}; "
                    "set scaling.num_workers back or start a new run"
                )
            ckpt.verify(d, world)  # before DeepSpeed unpickles anything
            with weights_only_engine(engine):  # data, never code: see safe_load.py
                engine.load_checkpoint(str(d / ckpt.ENGINE_DIR), tag=meta["tag"])
            state = ckpt.load_rank_state(d, rank)
        loader.load_state_dict(state["loader"])
        unit.load_state_dict(state["unit"], device)
        set_rng_state(state["rng"])
        step, best = meta["step"], meta.get("best", {})

    logger = None
    if rank == 0:
        from carousel.tracking.metrics import MetricLogger, last_logged_step
        from carousel.tracking.store import client

        c = client(config["tracking_uri"])
        run_id = config["mlflow_run_id"]
        logger = MetricLogger(c, run_id, skip_through_step=last_logged_step(c, run_id, "train_loss"))
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
        say(f"resuming at step {step}" if step else "starting at step 0")

    def evaluate(split: str, limit: int | None) -> dict[str, float]:
        return unit.evaluate(engine.module, split, rank, world, limit)

    def save_and_report(metrics: dict[str, float]) -> None:
        export = meta = None
        if rank == 0:
            export = {"state_dict": ckpt.export_state_dict(engine.module), **unit.export()}
            meta = {
                "step": step,
                "world_size": world,
                "metrics": metrics,
                "best": best,
                "mlflow_run_id": config["mlflow_run_id"],
                "spec": spec.model_dump(mode="json"),
            }
        rank_state = {"loader": loader.state_dict(), "unit": unit.state_dict(), "rng": rng_state()}
        with tempfile.TemporaryDirectory(prefix="carousel-ckpt-") as tmp:
            ckpt.save(Path(tmp), engine, f"step{step}", rank, rank_state, meta, export)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint-{step:08d}",
            )

    engine.train()
    stage0_norm = float("nan")
    window_t0, window_loss, window_steps, window_work = time.time(), 0.0, 0, 0
    run_t0, run_step0 = time.time(), step
    while step < t.max_steps:
        for micro in range(t.grad_accum):
            loss, work = unit.train_loss(engine, loader.next())
            window_work += work  # tokens or frames: what the throughput counts
            engine.backward(loss)
            if micro == t.grad_accum - 1 and t.zero_stage == 0:
                stage0_norm = local_grad_norm(engine.module)
            engine.step()
            window_loss = window_loss + loss.detach().float() / t.grad_accum  # no host sync per step
        step += 1
        window_steps += 1
        last = step == t.max_steps
        halt = step == t.halt_at_step

        if step % t.log_every == 0 or last or halt:
            unit_mean, total_work = float(window_loss) / window_steps, float(window_work)
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
                extra = unit.train_metrics(unit_mean)
                logger.log(
                    {"train_loss": unit_mean, **extra, "lr": lr,
                     "grad_norm": stage0_norm if t.zero_stage == 0 else float(engine.get_global_grad_norm()),
                     unit.rate_name: per_s},
                    step,
                )
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

    if rank == 0:
        if monitor is not None:
            monitor.finish()
        logger.close()
