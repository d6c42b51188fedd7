"""Row 1, kernel: the LM's training FLOP/s against the GEMM FLOP/s measured in the same run.

Per precision, a plain-PyTorch trainer of the benchmark model (common.PlainLM) and a square
GEMM are timed alternately. FLOPs count 3 x (sum over layers 8·H·(H+I) + 2·H·V) per token
(bench_math). All precisions take the same steps from the same initial weights, batches and
dropout masks, so their validation losses afterwards compare precision alone.

Threads: the benchmark job's (one per worker, as every job runs), for the model and the GEMM.
GEMMs at the model's own shapes are timed too: they bound what the model can reach (the
recurrent step multiplies a [B, H] matrix, far from a large GEMM's rate); and the same LM at
hidden 512, to show how the ratio moves with that GEMM's size.
"""

from __future__ import annotations

import statistics
import time

from bench_math import Goal, attainable_rate, gemm_flops, lstm_lm_flops_per_token, ratio, spread
from common import WORKER_THREADS, PlainLM, load_avg

GEMM_N = 1024  # the reference GEMM: square, large enough for MKL/oneDNN's full rate
WIDE = 512  # the hidden size of the "wide" line


def gemm_rate(torch, m: int, n: int, k: int, dtype, min_s: float = 0.3) -> float:
    """FLOP/s of [m, k] @ [k, n]: repeat for at least ``min_s``, after one untimed call."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        el = time.perf_counter() - t0
        if el >= min_s:
            return gemm_flops(m, n, k) * reps / el


def model_shapes(spec, vocab: int) -> dict[str, tuple[int, int, int]]:
    """(m, n, k) of the model's GEMMs; the 2nd..nth layers' input projection has k = hidden."""
    t, m = spec.train, spec.model
    bt = t.batch_size * t.bptt
    shapes = {
        "input_projection": (bt, 4 * m.hidden, m.embed),  # all time steps at once
        "recurrent_step": (t.batch_size, 4 * m.hidden, m.hidden),  # one time step
        "head": (bt, vocab, m.hidden),
    }
    if m.layers > 1 and m.hidden != m.embed:
        shapes["input_projection_upper"] = (bt, 4 * m.hidden, m.hidden)
    return shapes


def shape_bound(spec, vocab: int, rates: dict[str, float]) -> float:
    """FLOP/s the model's training matmuls would reach if each ran at its own shape's GEMM rate
    (backward GEMMs are charged at their forward shape's rate)."""
    t, m = spec.train, spec.model
    bt = t.batch_size * t.bptt
    parts = []
    for layer in range(m.layers):
        k_in = m.embed if layer == 0 else m.hidden
        key = "input_projection" if layer == 0 or "input_projection_upper" not in rates else "input_projection_upper"
        parts.append((3 * gemm_flops(bt, 4 * m.hidden, k_in), rates[key]))
        parts.append((3 * gemm_flops(bt, 4 * m.hidden, m.hidden), rates["recurrent_step"]))
    parts.append((3 * gemm_flops(bt, vocab, m.hidden), rates["head"]))
    return attainable_rate(parts)


def run(ctx) -> dict:
    import torch

    precisions = [p for p in ctx.precisions if p]
    threads = WORKER_THREADS  # what the job's workers run with; the threads row shows why one
    trainers = {p: PlainLM(ctx.data, threads, p) for p in precisions}
    lm = trainers["fp32"] if "fp32" in trainers else next(iter(trainers.values()))
    spec, vocab = lm.spec, lm.model.vocab_size
    cfg = spec.model
    layer_inputs = [cfg.embed] + [cfg.hidden] * (cfg.layers - 1)
    flops_token = lstm_lm_flops_per_token(layer_inputs, cfg.hidden, vocab)
    flops_step = flops_token * lm.tokens_per_step
    failed: dict[str, str] = {}
    for p, tr in list(trainers.items()):
        try:
            for _ in range(ctx.kernel_warmup):
                tr.step()
        except RuntimeError as e:  # e.g. oneDNN has no bf16 LSTM primitive on this CPU
            failed[p] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            del trainers[p]
            precisions.remove(p)

    dtype_of = {"fp32": torch.float32, "bf16-autocast": torch.bfloat16, "bf16-cast": torch.bfloat16}
    gemm: dict[str, list[float]] = {"fp32": [], "bf16": []}
    model: dict[str, list[float]] = {p: [] for p in precisions}
    losses: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(ctx.kernel_rounds):
        order = precisions if r % 2 == 0 else list(reversed(precisions))
        measured_gemm = set()
        for p in order:
            key = "fp32" if p == "fp32" else "bf16"
            if key not in measured_gemm:  # one reference GEMM per dtype per round
                gemm[key].append(gemm_rate(torch, GEMM_N, GEMM_N, GEMM_N, dtype_of[p]))
                measured_gemm.add(key)
            for _ in range(ctx.kernel_steps):
                s = trainers[p].step()
                model[p].append(flops_step / s["step_s"])
                losses[p].append(s["loss"])
    # The same LM twice as wide (hidden and embedding 512), fp32: how the ratio moves with the
    # recurrent GEMM's size (its [B, H] x [H, 4H] product per time step is what holds H = 256 back).
    wide = PlainLM(ctx.data, threads, "fp32", overrides=[f"model.hidden={WIDE}", f"model.embed={WIDE}"])
    wide_flops_step = lstm_lm_flops_per_token([WIDE] * cfg.layers, WIDE, vocab) * wide.tokens_per_step
    wide_rates, wide_gemm = [], []
    for _ in range(ctx.kernel_warmup):
        wide.step()
    for _ in range(ctx.kernel_rounds):
        wide_gemm.append(gemm_rate(torch, GEMM_N, GEMM_N, GEMM_N, torch.float32))
        wide_rates += [wide_flops_step / wide.step()["step_s"] for _ in range(ctx.kernel_steps)]
    shapes = {name: gemm_rate(torch, *mnk, torch.float32) for name, mnk in model_shapes(spec, vocab).items()}
    bound = shape_bound(spec, vocab, shapes)
    steps_taken = ctx.kernel_warmup + ctx.kernel_rounds * ctx.kernel_steps
    val = {p: tr.evaluate(ctx.eval_windows) for p, tr in trainers.items()}

    out: dict = {
        "flops_per_token": flops_token,
        "tokens_per_step": lm.tokens_per_step,
        "threads": threads,
        "gemm_n": GEMM_N,
        "gemm_gflops": {k: spread([x / 1e9 for x in v]) for k, v in gemm.items() if v},
        "model_gflops": {p: spread([x / 1e9 for x in v]) for p, v in model.items()},
        "wide_hidden": WIDE,
        "wide_model_gflops_fp32": spread([x / 1e9 for x in wide_rates]),
        "wide_gemm_gflops_fp32": spread([x / 1e9 for x in wide_gemm]),
        "model_shape_gemm_gflops_fp32": {k: round(v / 1e9, 2) for k, v in shapes.items()},
        "model_shape_bound_gflops_fp32": round(bound / 1e9, 2),
        "mkldnn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "steps_taken": steps_taken,
        "val_loss": val,
        "eval_windows": ctx.eval_windows,
        "failed": failed,
        "ratios": [],
    }
    goal = Goal(">=", 0.8)
    for p in precisions:
        key = "fp32" if p == "fp32" else "bf16"
        g, mdl = statistics.median(gemm[key]), statistics.median(model[p])
        out["ratios"].append(ratio(f"kernel {p}", mdl / g, goal,
                                   f"{mdl / 1e9:.2f} / {g / 1e9:.2f} GFLOP/s (LM train / {key} GEMM {GEMM_N}³)"))
    wm, wg = statistics.median(wide_rates), statistics.median(wide_gemm)
    out["ratios"].append(ratio(f"kernel fp32 hidden {WIDE}", wm / wg, goal,
                               f"{wm / 1e9:.2f} / {wg / 1e9:.2f} GFLOP/s (the LM at hidden {WIDE} / fp32 GEMM {GEMM_N}³)"))
    if "fp32" in precisions:
        f32 = statistics.median(model["fp32"])
        out["ratios"].append(ratio("kernel fp32/shapes", f32 / bound, None,
                                   f"{f32 / 1e9:.2f} / {bound / 1e9:.2f} GFLOP/s (LM train / its own GEMM shapes)"))
        for p in precisions:
            if p != "fp32":
                out["ratios"].append(ratio(f"{p} speed", statistics.median(model[p]) / f32, None,
                                           f"LM step rate {p} / fp32"))
                out["ratios"].append(ratio(f"{p} val loss", val[p] / val["fp32"], Goal("<=", 1.01),
                                           f"{val[p]:.4f} / {val['fp32']:.4f} after {steps_taken} steps"))
    for p, err in failed.items():
        out["ratios"].append(ratio(f"kernel {p}", float("nan"), goal, f"fails: {err[:90]}"))
    out["load_avg"] = load_avg()
    return out
