"""The interface every self-supervised method offers the training loop, with the hooks most methods leave empty."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SSLMethod(nn.Module):
    """Base class: ``forward(views, state) -> (loss, scalars)``, optional hooks, and checkpointable heads."""

    backbone: nn.Module

    def after_step(self, state: dict[str, Any]) -> None:
        """Called after each optimizer step (DINO updates its EMA teacher here)."""

    def before_optimizer_step(self, state: dict[str, Any]) -> None:
        """Called between backward and the optimizer step (DINO drops frozen last-layer gradients here)."""

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but ``backbone``, so checkpoints keep the backbone under timm's key names."""
        from models.checkpoints import head_state

        return head_state(self)

    def load_head_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore what ``head_state_dict`` saved (strict)."""
        from models.checkpoints import load_head_state

        load_head_state(self, state_dict)
