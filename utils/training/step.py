"""One training iteration (device augmentation, forward, backward, clip, optimizer, EMA), shared with the bench."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from utils import distributed
from utils.precision import autocast
from utils.seeding import keyed_generator, sample_seed
from utils.training.config import TrainConfig
from utils.training.data import ViewPipeline
from utils.training.optim import apply_schedule, clip_gradients


class TrainStep:
    """One training iteration (device augmentation, forward, backward, clip, optimizer, EMA), shared with the bench."""

    def __init__(
        self, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
        precision: str, info: distributed.DistInfo, seed: int, pipeline: ViewPipeline | None = None,
        tap: Any = None,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.precision, self.info, self.seed, self.pipeline, self.tap = precision, info, seed, pipeline, tap
        self.device = info.device
        self.ddp = model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def augment(self, views: list[torch.Tensor], epoch: int, it: int) -> list[torch.Tensor]:
        """uint16 loader views -> augmented, standardised device tensors (generator keyed by epoch/iteration/rank)."""
        if self.pipeline is None:
            raise RuntimeError("TrainStep.augment needs a ViewPipeline")
        return self.pipeline(views, keyed_generator(self.seed, self.device, "augment", epoch, it, self.info.rank))

    def __call__(
        self, views: list[torch.Tensor], epoch: int, it: int, step: int, values: dict[str, float]
    ) -> dict[str, Any] | None:
        """Forward/backward one micro-batch; after the last of an accumulation, clip and step and return the logs."""
        accum = self.cfg.accum_iter
        micro = it % accum
        if micro == 0:
            apply_schedule(self.optimizer, values)
        torch.manual_seed(sample_seed(self.seed, "global", epoch, it, self.info.rank))  # drop-path etc.
        state = {"epoch": epoch, "step": step, "iteration": it, **values,
                 "generator": keyed_generator(self.seed, self.device, "model", epoch, it, self.info.rank)}
        sync = micro == accum - 1
        no_sync = self.ddp.no_sync() if (self.info.distributed and not sync) else contextlib.nullcontext()
        with no_sync:
            with autocast(self.precision, self.device):
                loss, logs = self.ddp(views, state)
            self.scaler.scale(loss / accum).backward()
        if not sync:
            return None
        if self.tap is not None:  # e.g. SimCLR's top-1/top-5/mean-position of the positive, from the forward
            logs = {**logs, **self.tap.metrics()}
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.trainable, self.cfg.clip_grad, self.cfg.clip_mode)
        self.model.before_optimizer_step(state)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_step(state)
        return {"loss": loss.detach(), **logs, **values, "grad_norm": grad_norm, **self.model.collapse_stats()}
