"""NaN/Inf steps: skipped before the update, counted, and fatal only when they keep coming.

At ZeRO 1/2 DeepSpeed's optimizer already checks the global gradient norm and skips a non-finite
step (``engine.skipped_steps``; bf16 needs ``check_grad_overflow``, see deepspeed_config.py). At
ZeRO 0 the engine steps a plain torch optimizer that would write NaN into every weight, so the loop
drops the gradients first: torch optimizers leave a parameter whose ``grad`` is None untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


class NonFiniteError(RuntimeError):
    """Raised when training cannot go on: K optimizer steps in a row had NaN/Inf loss or gradients."""


@dataclass
class NonFiniteGuard:
    """Pure bookkeeping, saved in the checkpoint so a resumed run keeps counting."""

    limit: int
    in_a_row: int = 0
    total: int = 0

    def observe(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"step {step}: {self.in_a_row} optimizer steps in a row had a NaN/Inf loss or gradient "
                f"(train.max_nonfinite_steps={self.limit}); {self.total} skipped in all. The weights were "
                "never updated with them. Lower train.lr, set train.grad_clip, or use fp32."
            )

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])


@contextmanager
def optimizer_step_skipped(engine):
    """ZeRO 0: the coming ``engine.step()`` runs its bookkeeping (clipping, zeroing the gradients,
    counters) but not the optimizer's update, so weights and optimizer state stay as they were.
    DeepSpeed has no public switch for this outside its fp16 loss scaler, hence the instance patch."""
    opt = engine.optimizer
    opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del opt.step  # the class's own step again


def weights_are_finite(module) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in module.parameters())
