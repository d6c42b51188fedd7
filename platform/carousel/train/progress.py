"""Progress lines and derived quantities (pure; printed by rank 0, streamed to the driver by Ray)."""

from __future__ import annotations

import sys


def say(line: str) -> None:
    """One line to the driver's console. Ray Train patches ``print`` to tee into its logger as
    well, which shows every line twice; writing to stdout directly shows it once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def progress_line(
    step: int, total: int, loss: float, ppl: float | None, lr: float, per_s: float, eta_s: float, unit: str = "tok/s"
) -> str:
    """``ppl`` None leaves perplexity out (it means nothing for a CTC loss); ``unit`` names what ``per_s`` counts."""
    width = len(str(total))
    ppl_part = f" | ppl {ppl:9.2f}" if ppl is not None else ""
    return (
        f"step {step:>{width}}/{total} | loss {loss:6.3f}{ppl_part} | lr {lr:.2e} | "
        f"{human(per_s)} {unit} | eta {duration(eta_s)}"
    )


def summary_lines(params: int, tokens_per_step: int, world: int, spec) -> list[str]:
    t = spec.train
    return [
        f"model: {spec.model.layers} x {spec.model.cell.upper()} hidden {spec.model.hidden} "
        f"embed {spec.model.embed} -> {human(params)} parameters",
        f"tokens/step: {tokens_per_step} = {world} workers x {t.batch_size} streams x bptt {t.bptt} x accum {t.grad_accum}",
        f"steps: {t.max_steps} -> {human(tokens_per_step * t.max_steps)} tokens; precision {t.precision}, ZeRO {t.zero_stage}",
    ]
