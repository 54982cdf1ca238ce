"""Per-iteration schedules as precomputed arrays, so resuming at any step reads back the exact same value."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for the annotation: config imports the probe, which the schedules need not load
    from utils.training.config import TrainConfig


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


@dataclass
class Schedules:
    """Per-optimizer-step values, precomputed so a resumed run reads exactly what the first run read."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray | None
    teacher_temp: np.ndarray | None

    def at(self, step: int) -> dict[str, float]:
        """The scheduled values for one optimizer step (the last value past the end)."""
        i = min(step, len(self.lr) - 1)
        values = {"lr": float(self.lr[i]), "wd": float(self.wd[i])}
        if self.momentum is not None:
            values["momentum"] = float(self.momentum[i])
        if self.teacher_temp is not None:
            values["teacher_temp"] = float(self.teacher_temp[i])
        return values


def build_schedules(cfg: TrainConfig, steps_per_epoch: int) -> Schedules:
    """LR (warm-up + cosine), weight decay (cosine), teacher momentum (cosine to 1) and teacher temperature."""
    lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_start_lr)
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
    momentum = None
    if cfg.momentum_teacher is not None:
        momentum = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)
    temp = None
    if cfg.teacher_temp is not None:
        warm, final, warm_epochs = cfg.teacher_temp
        temp = linear_warmup_constant(warm, final, cfg.epochs, steps_per_epoch, warm_epochs)
    return Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=temp)
