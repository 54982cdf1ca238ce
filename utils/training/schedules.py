"""Per-iteration schedules as precomputed arrays, so resuming at any step reads back the exact same value."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    iters_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``start_warmup`` to ``base``, then a half cosine to ``final`` (DINO's scheduler)."""
    if epochs < 0 or iters_per_epoch < 0:
        raise ValueError(f"epochs ({epochs}) and iters_per_epoch ({iters_per_epoch}) must be >= 0")
    total = int(epochs * iters_per_epoch)
    warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), total)
    warmup = np.linspace(start_warmup, base, warmup_iters, endpoint=False) if warmup_iters > 0 else np.zeros(0)
    n_cos = total - warmup_iters
    steps = np.arange(n_cos)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n_cos, 1)))
    schedule = np.concatenate([warmup, cosine]).astype(np.float64)
    assert len(schedule) == total
    return schedule


def linear_warmup_constant(
    start: float, end: float, epochs: int, iters_per_epoch: int, warmup_epochs: float
) -> np.ndarray:
    """Linear ramp from ``start`` to ``end`` over the warm-up, then constant (DINO's teacher temperature)."""
    total = int(epochs * iters_per_epoch)
    warmup_iters = min(int(round(warmup_epochs * iters_per_epoch)), total)
    ramp = np.linspace(start, end, warmup_iters) if warmup_iters > 0 else np.zeros(0)
    return np.concatenate([ramp, np.full(total - warmup_iters, end)]).astype(np.float64)


def constant_schedule(value: float, epochs: int, iters_per_epoch: int) -> np.ndarray:
    """A flat schedule, for settings that do not change (e.g. a fixed weight decay)."""
    return np.full(int(epochs * iters_per_epoch), float(value), dtype=np.float64)
