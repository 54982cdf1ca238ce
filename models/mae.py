"""Masked autoencoder: a timm ViT encoder (``backbone.*``), the paper's lightweight decoder, per-patch pixel loss.

Key layout: the encoder is ``backbone`` with timm's keys; the decoder keys are the paper's (``mask_token``,
``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``).
``paper_state_dict`` / ``load_paper_state_dict`` convert to and from the paper's flat ``model`` dict.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from models.backbones import backbone_img_size, backbone_patch_size, create_backbone
from models.base import SSLMethod
from utils.errors import CheckpointError, ConfigError
from utils.seeding import keyed_generator

# Decoder (width, depth, heads) by encoder width: 384/768 are the paper's §2.2, 1024/1280 the MAE paper's,
# 192 and 32 (vit_tiny, vit_debug) are ours. Override with args decoder_embed_dim/decoder_depth/decoder_num_heads.
DECODERS: dict[int, tuple[int, int, int]] = {
    32: (32, 1, 2),
    192: (128, 4, 4),
    384: (256, 8, 8),
    768: (512, 8, 16),
    1024: (512, 8, 16),
    1280: (512, 8, 16),
}
DECODER_KEYS = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred")


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin/cos features of positions at geometric frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """The MAE paper's fixed 2-D table (first half from the column index, second from the row); CLS row zero."""
    if dim % 4:
        raise ConfigError(f"sin-cos positions need a width divisible by 4, got {dim}")
    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    emb = np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C) in the paper's (row, col, channel) order within a patch."""
    b, c, h, w = imgs.shape
    gh, gw = h // patch, w // patch
    x = imgs.reshape(b, c, gh, patch, gw, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, gh * gw, patch * patch * c)


def random_masking(
    batch: int, length: int, mask_ratio: float, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample shuffle by argsort of uniform noise: (ids_keep, mask with 1 = removed, ids_restore)."""
    len_keep = int(length * (1 - mask_ratio))
    if len_keep < 1:
        raise ConfigError(f"mask ratio {mask_ratio} leaves no visible patch out of {length}")
    noise = torch.rand(batch, length, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, length, device=device)
    mask[:, :len_keep] = 0
    return ids_shuffle[:, :len_keep], torch.gather(mask, 1, ids_restore), ids_restore


class MaskedAutoencoder(SSLMethod):
    """Encoder on the visible patches, decoder reconstructs every patch; loss on the masked ones only."""

    def __init__(
        self,
        backbone: VisionTransformer,
        decoder_embed_dim: int = 256,
        decoder_depth: int = 8,
        decoder_num_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_ratio: float = 0.75,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch = backbone_patch_size(backbone)
        self.in_chans = backbone.patch_embed.proj.in_channels
        self.grid = backbone_img_size(backbone) // self.patch
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        embed_dim = backbone.embed_dim
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.grid * self.grid + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
             for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch * self.patch * self.in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.seed = seed
        self._init_weights()

    def _init_weights(self) -> None:
        """The MAE paper's init: fixed sin-cos tables, xavier linears and patch projection, N(0, .02) tokens."""
        pos = torch.from_numpy(sincos_2d(self.backbone.embed_dim, self.grid)).float().unsqueeze(0)
        self.backbone.pos_embed.data.copy_(pos)
        self.backbone.pos_embed.requires_grad = False
        dec = torch.from_numpy(sincos_2d(self.decoder_pos_embed.shape[-1], self.grid)).float().unsqueeze(0)
        self.decoder_pos_embed.data.copy_(dec)
        w = self.backbone.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.backbone.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def build(cls, args: dict[str, Any], in_chans: int) -> MaskedAutoencoder:
        """Encoder and decoder from the paper's train_mae.py flags (``--model``, ``--mask_ratio``, ...)."""
        arch = args.get("model") or args.get("arch") or "mae_vit_small"
        img_size = int(args.get("input_size") or 224)
        backbone = create_backbone(arch, in_chans, img_size=img_size, patch_size=args.get("patch_size"))
        width = backbone.embed_dim
        default = DECODERS.get(width)
        sizes = [args.get(k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")]
        if default is None and None in sizes:
            raise ConfigError(
                f"no default MAE decoder for encoder width {width} ({arch}): give decoder_embed_dim, "
                "decoder_depth and decoder_num_heads"
            )
        dim, depth, heads = (s if s is not None else d for s, d in zip(sizes, default or sizes))
        return cls(
            backbone,
            int(dim),
            int(depth),
            int(heads),
            norm_pix_loss=bool(args.get("norm_pix_loss", False)),
            mask_ratio=float(args.get("mask_ratio", 0.75)),
            seed=int(args.get("seed", 0)),
        )

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions are added before masking; the CLS token (with its position) is prepended after."""
        bb = self.backbone
        x = bb._pos_embed(bb.patch_embed(imgs))
        x = bb.norm_pre(bb.patch_drop(x))
        cls, patches = x[:, :1], x[:, 1:]
        ids_keep, mask, ids_restore = random_masking(
            patches.shape[0], patches.shape[1], mask_ratio, generator, imgs.device
        )
        visible = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        x = torch.cat([cls, visible], dim=1)
        for blk in bb.blocks:
            x = blk(x)
        return bb.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Unshuffle visible tokens among mask tokens, add fixed positions, predict every patch's pixels."""
        x = self.decoder_embed(x)
        n_mask = ids_restore.shape[1] + 1 - x.shape[1]
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(x.shape[0], n_mask, -1).to(x.dtype)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], tokens], dim=1)
        pos = resample_abs_pos_embed(self.decoder_pos_embed, new_size=list(grid), old_size=[self.grid, self.grid])
        x = x + pos
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch (per-patch normalised target with norm_pix_loss), over masked patches."""
        target = patchify(imgs.float(), self.patch)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def step_generator(self, device: torch.device, state: dict[str, Any]) -> torch.Generator:
        """A generator seeded from (seed, epoch, step, rank): masks are reproducible and resume exactly."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return keyed_generator(self.seed, device, "mae-mask", state.get("epoch", 0), state.get("step", 0), rank)

    def forward(self, views: list[torch.Tensor], state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """All views of all samples are independent reconstructions; the loss is averaged over view tensors."""
        generator = state.get("generator") or self.step_generator(views[0].device, state)
        total = views[0].new_zeros((), dtype=torch.float32)
        count = 0
        visible_means = []
        for imgs in views:
            h, w = imgs.shape[-2:]
            if h % self.patch or w % self.patch:
                raise ConfigError(f"MAE view size {h}x{w} is not a multiple of the patch size {self.patch}")
            latent, mask, ids_restore = self.forward_encoder(imgs, self.mask_ratio, generator)
            visible_means.append(latent[:, 1:].detach().mean(dim=1))  # mean of visible tokens: the mean-pool proxy
            pred = self.forward_decoder(latent, ids_restore, (h // self.patch, w // self.patch))
            total = total + self.loss(imgs, pred, mask) * imgs.shape[0]
            count += imgs.shape[0]
        self.record_embedding(torch.cat(visible_means))
        return total / count, {"mask_ratio": self.mask_ratio}

    def paper_state_dict(self) -> dict[str, torch.Tensor]:
        """The paper's flat ``model`` layout: encoder keys without the ``backbone.`` prefix, decoder keys as is."""
        return {k.removeprefix("backbone."): v for k, v in self.state_dict().items()}

    def load_paper_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a paper ``model`` dict strictly (qkv biases included), e.g. to continue the paper's training."""
        mapped = {(k if k.startswith(DECODER_KEYS) else f"backbone.{k}"): v for k, v in state_dict.items()}
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
        if missing or unexpected:
            raise CheckpointError(f"MAE state does not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_state_dict(mapped)
