"""Training: the loop, exact gradient accumulation, checkpoints, distributed and precision helpers."""
