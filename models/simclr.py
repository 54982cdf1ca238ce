"""SimCLR: a projection MLP (``mlp.0``/``mlp.2``, the paper's keys) and NT-Xent with negatives from every rank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.base import SSLMethod
from utils.distributed import all_gather_with_grad, is_distributed
from utils.errors import ConfigError

if TYPE_CHECKING:  # timm is imported only when a model is built, so nt_xent workers start fast
    from timm.models.vision_transformer import VisionTransformer


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2, gather: bool = True) -> torch.Tensor:
    """InfoNCE over 2N views with cosine similarity; with ``gather`` the negatives come from every rank.

    Local queries are scored against all gathered keys; averaging this loss over ranks (as DDP does with gradients)
    gives exactly the single-process loss and gradient on the concatenated batch. All ranks need the same batch size.
    """
    if z1.shape != z2.shape:
        raise ConfigError(f"SimCLR views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    with torch.autocast(z1.device.type, enabled=False):
        q1, q2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        n_local = q1.shape[0]
        if gather and is_distributed():
            k1, k2 = all_gather_with_grad(q1), all_gather_with_grad(q2)
            offset = dist.get_rank() * n_local
        else:
            k1, k2, offset = q1, q2, 0
        n_total = k1.shape[0]
        keys = torch.cat([k1, k2], dim=0)
        queries = torch.cat([q1, q2], dim=0)
        logits = queries @ keys.T / temperature
        local = torch.arange(n_local, device=logits.device) + offset
        self_idx = torch.cat([local, local + n_total])
        pos_idx = torch.cat([local + n_total, local])
        rows = torch.arange(2 * n_local, device=logits.device)
        logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), device=logits.device))
        return F.cross_entropy(logits, pos_idx)


class SimCLR(SSLMethod):
    """Backbone CLS -> projection MLP -> NT-Xent between the two views of each sample."""

    def __init__(self, backbone: VisionTransformer, hidden_dim: int = 128, temperature: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.mlp = nn.Sequential(
            nn.Linear(backbone.embed_dim, 4 * hidden_dim), nn.ReLU(inplace=True), nn.Linear(4 * hidden_dim, hidden_dim)
        )
        self.temperature = temperature

    @classmethod
    def build(cls, args: dict[str, Any], in_chans: int) -> SimCLR:
        """Backbone and MLP from the paper's train_simclr.py flags (``--arch``, ``--hidden_dim``, ...)."""
        from models.backbones import create_backbone  # lazy: timm (~1.4 s) loads only when a model is built

        backbone = create_backbone(
            args.get("arch") or "vit_small_patch16_224",
            in_chans,
            img_size=int(args.get("size") or 224),
            patch_size=args.get("patch_size"),
            drop_path_rate=float(args.get("drop_path_rate") or 0.0),
        )
        return cls(backbone, int(args.get("hidden_dim", 128)), float(args.get("temperature", 0.2)))

    def forward(self, views: list[torch.Tensor], state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Two views per sample, either one tensor (2B, ...) view-major or two tensors (B, ...)."""
        if len(views) == 1:
            x = views[0]
        elif len(views) == 2 and views[0].shape == views[1].shape:
            x = torch.cat(views)
        else:
            raise ConfigError(f"SimCLR needs two views of one size, got tensors {[tuple(v.shape) for v in views]}")
        if x.shape[0] % 2:
            raise ConfigError(f"SimCLR view tensor has {x.shape[0]} rows; expected 2 views per sample")
        feats = self.backbone(x)
        self.record_embedding(feats)
        z = self.mlp(feats)
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.temperature, gather=True), {}
