"""Ray Train driver, the generic worker loop around DeepSpeed, units, checkpoints."""
