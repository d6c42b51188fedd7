"""What each model family reports at validation, readable without importing its unit (and torch):
the driver ranks checkpoints by the first metric, and a tune spec may search any of them."""

from __future__ import annotations

VALIDATION_METRICS = {"lm": ("val_ppl", "val_loss"), "ctc": ("val_cer", "val_wer", "val_loss")}


def ranking_metric(family: str) -> str:
    """The validation metric checkpoints are ranked by (lower is better)."""
    if family not in VALIDATION_METRICS:
        raise ValueError(f"model.family: no unit for {family!r}")
    return VALIDATION_METRICS[family][0]
