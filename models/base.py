"""The interface every self-supervised method offers the training loop, with the hooks most methods leave empty."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.collapse import effective_rank, embedding_spread


class SSLMethod(nn.Module):
    """Base class: ``forward(views, state) -> (loss, scalars)``, optional hooks, and checkpointable heads.

    A forward also records (detached, no copy) the backbone embedding of its batch and any method-specific collapse
    statistics, so the loop can watch for collapse without a second forward.
    """

    backbone: nn.Module
    _embedding: torch.Tensor | None = None
    _collapse_extra: dict[str, torch.Tensor] | None = None

    def inference_backbone(self) -> nn.Module:
        """The weights inference embeds with (DINO: the teacher), which the training probe must use too."""
        return self.backbone

    def record_embedding(self, embedding: torch.Tensor, **extra: torch.Tensor) -> None:
        """Keep this step's backbone embedding (B, d) and extra scalars for ``collapse_stats``."""
        self._embedding = embedding.detach()
        self._collapse_extra = extra

    def collapse_stats(self, with_rank: bool = False) -> dict[str, torch.Tensor]:
        """The last forward's collapse indicators (utils.collapse); the effective rank (an SVD) only when asked."""
        if self._embedding is None or self._embedding.shape[0] < 2:
            return {}
        out = {**embedding_spread(self._embedding), **(self._collapse_extra or {})}
        if with_rank:
            out["embed_rank"] = effective_rank(self._embedding).to(self._embedding.device)
        return out

    def after_step(self, state: dict[str, Any]) -> None:
        """Called after each optimizer step (DINO updates its EMA teacher here)."""

    def before_optimizer_step(self, state: dict[str, Any]) -> None:
        """Called between backward and the optimizer step (DINO drops frozen last-layer gradients here)."""

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but ``backbone``, so checkpoints keep the backbone under timm's key names."""
        from models.checkpoints import head_state  # lazy: it loads timm (~1.4 s), which loss-only users never need

        return head_state(self)

    def load_head_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore what ``head_state_dict`` saved (strict)."""
        from models.checkpoints import load_head_state  # lazy: as in head_state_dict

        load_head_state(self, state_dict)
