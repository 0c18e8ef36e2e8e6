"""Per-iteration schedules as arrays (as DINO does), with the official moco-v3 formulas."""
from __future__ import annotations

import numpy as np


def lr_schedule(peak_lr: float, epochs: int, warmup_epochs: float, iters_per_epoch: int) -> np.ndarray:
    """Linear warmup from 0, then half-cycle cosine to 0, evaluated at every iteration (``adjust_learning_rate``)."""
    t = np.arange(epochs * iters_per_epoch, dtype=np.float64) / iters_per_epoch  # fractional epoch
    warm = peak_lr * t / max(warmup_epochs, 1e-12)
    span = max(epochs - warmup_epochs, 1e-12)
    cos = peak_lr * 0.5 * (1.0 + np.cos(np.pi * (t - warmup_epochs) / span))
    return np.where(t < warmup_epochs, warm, cos)


def momentum_schedule(m0: float, epochs: int, iters_per_epoch: int, cosine: bool = True) -> np.ndarray:
    """m(t) = 1 - (1 + cos(pi t / T)) / 2 * (1 - m0) (``adjust_moco_momentum``), or constant m0."""
    t = np.arange(epochs * iters_per_epoch, dtype=np.float64) / iters_per_epoch
    if not cosine:
        return np.full_like(t, m0)
    return 1.0 - 0.5 * (1.0 + np.cos(np.pi * t / epochs)) * (1.0 - m0)
