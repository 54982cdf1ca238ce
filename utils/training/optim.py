"""The optimiser over the paper's parameter groups, the per-step schedule values, and the gradient clip rules."""

from __future__ import annotations

import torch
from torch import nn

from models.registry import param_groups
from utils.errors import ConfigError
from utils.training.config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD for DINO's flag) over the paper's parameter groups; lr and wd are set every step."""
    groups = param_groups(model)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=cfg.betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    raise ConfigError(f"optimizer {cfg.optimizer!r} is not supported: use adamw or sgd")


def apply_schedule(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """Set this step's lr on every group and wd on the groups that decay."""
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
        group["weight_decay"] = values["wd"] if group.get("apply_wd", True) else 0.0


def clip_gradients(params: list[nn.Parameter], max_norm: float, mode: str) -> torch.Tensor:
    """DINO clips each parameter tensor on its own (the paper); the others clip the global norm.

    Returns the global gradient norm before clipping as a device tensor (no host sync).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads)).float()
    if max_norm > 0:
        if mode == "per_tensor":
            coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, [c.to(g.dtype) for g, c in zip(grads, coefs.unbind())])
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return norms.norm(2)
