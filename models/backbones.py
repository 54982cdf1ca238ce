"""timm ViT backbones by name, and the embeddings inference takes from them (CLS, patch mean, intermediate blocks)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from utils.errors import ConfigError

_TINY = {"embed_dim": 192, "depth": 12, "num_heads": 3}
_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6}
_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12}
_LARGE = {"embed_dim": 1024, "depth": 24, "num_heads": 16}
_HUGE = {"embed_dim": 1280, "depth": 32, "num_heads": 16}

# Width, depth, heads and patch of every architecture name a user may pass (ours, DINO's, timm's and MAE's names).
# Names that spell a patch size ("..._patch8") fix it; the others take --patch_size (default 16).
ARCHS: dict[str, dict[str, int]] = {
    "vit_tiny": {**_TINY, "patch_size": 16},
    "vit_small": {**_SMALL, "patch_size": 16},
    "vit_base": {**_BASE, "patch_size": 16},
    "vit_large": {**_LARGE, "patch_size": 16},
    "vit_tiny_patch8": {**_TINY, "patch_size": 8},
    "vit_small_patch8": {**_SMALL, "patch_size": 8},
    "vit_base_patch8": {**_BASE, "patch_size": 8},
    "vit_large_patch8": {**_LARGE, "patch_size": 8},
    "vit_tiny_patch16": {**_TINY, "patch_size": 16},
    "vit_small_patch16": {**_SMALL, "patch_size": 16},
    "vit_small_patch16_224": {**_SMALL, "patch_size": 16},
    "vit_base_patch16": {**_BASE, "patch_size": 16},
    "vit_base_patch16_224": {**_BASE, "patch_size": 16},
    "vit_large_patch16": {**_LARGE, "patch_size": 16},
    "vit_large_patch16_224": {**_LARGE, "patch_size": 16},
    "vit_huge_patch14": {**_HUGE, "patch_size": 14},
    "vit_xbase": {"embed_dim": 384, "depth": 12, "num_heads": 12, "patch_size": 16},
    "vit_slarge": {"embed_dim": 384, "depth": 24, "num_heads": 16, "patch_size": 16},
    "mae_vit_small": {**_SMALL, "patch_size": 16},
    "mae_vit_small_patch16": {**_SMALL, "patch_size": 16},
    "mae_vit_base_patch16": {**_BASE, "patch_size": 16},
    "mae_vit_large_patch16": {**_LARGE, "patch_size": 16},
    "mae_vit_huge_patch14": {**_HUGE, "patch_size": 14},
    # Tiny models for tests and CPU smoke runs; never for real training.
    "vit_debug": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16},
    "vit_debug_patch8": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8},
}
FIXED_PATCH = frozenset(name for name in ARCHS if "_patch" in name)
POOLS = ("cls", "mean", "mean_prenorm")
OVERRIDE_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def arch_config(arch: str, patch_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Resolve a name (plus an optional patch size and size overrides) into VisionTransformer size kwargs."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHS))}")
    cfg: dict[str, Any] = {**ARCHS[arch], "mlp_ratio": 4.0}
    if patch_size is not None and patch_size != cfg["patch_size"]:
        if arch in FIXED_PATCH:
            raise ConfigError(f"--arch {arch} has patch size {cfg['patch_size']} but patch size {patch_size} was given")
        cfg["patch_size"] = int(patch_size)
    for key, value in overrides.items():
        if key not in OVERRIDE_KEYS:
            raise ConfigError(f"unknown backbone override {key!r}; allowed: {', '.join(OVERRIDE_KEYS)}")
        if value is not None:
            cfg[key] = value
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise ConfigError(f"embed_dim {cfg['embed_dim']} is not divisible by num_heads {cfg['num_heads']} ({arch})")
    return cfg


def create_backbone(
    arch: str,
    in_chans: int = 5,
    img_size: int = 224,
    patch_size: int | None = None,
    drop_path_rate: float = 0.0,
    qkv_bias: bool = True,
    **overrides: Any,
) -> VisionTransformer:
    """Build the timm ViT every method and checkpoint shares, so state_dict keys are always timm's."""
    cfg = arch_config(arch, patch_size, **overrides)
    if img_size % cfg["patch_size"]:
        raise ConfigError(f"image size {img_size} is not a multiple of patch size {cfg['patch_size']} ({arch})")
    return VisionTransformer(
        img_size=img_size,
        patch_size=cfg["patch_size"],
        in_chans=in_chans,
        num_classes=0,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        dynamic_img_size=True,
    )


def backbone_patch_size(backbone: VisionTransformer) -> int:
    """The square patch size, which checkpoints record."""
    return int(backbone.patch_embed.patch_size[0])


def backbone_img_size(backbone: VisionTransformer) -> int:
    """The image size the stored positional embedding grid was built for."""
    return int(backbone.patch_embed.img_size[0])


def _block_indices(depth: int, layers: Sequence[int]) -> list[int]:
    out = []
    for layer in layers:
        idx = depth + layer if layer < 0 else layer
        if not 0 <= idx < depth:
            raise ConfigError(f"layer {layer} is out of range for a backbone with {depth} blocks")
        out.append(idx)
    return out


def _pool(tokens: torch.Tensor, prefix: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "cls":
        return prefix[:, 0]
    return tokens.mean(dim=1)


def embed(
    backbone: VisionTransformer, x: torch.Tensor, pool: str = "cls", layers: Sequence[int] | None = None
) -> torch.Tensor:
    """One vector per image: CLS or patch mean, after or before the final norm, from the last or chosen blocks.

    Parameters
    ----------
    backbone:
        A timm ViT from ``create_backbone`` or ``load_backbone_for_inference``; eval mode and no_grad are the caller's.
    x:
        (B, C, H, W) standardised float images; H and W need only be multiples of the patch size (dynamic size).
    pool:
        ``cls`` (CLS token after the final norm), ``mean`` (mean of the patch tokens after it) or ``mean_prenorm``
        (the same mean before it: the paper's MAE inference).
    layers:
        Blocks to take tokens from, 0-based, negative counting from the end; None means the last block. The
        final norm (unless ``mean_prenorm``) is applied to each, and blocks after the deepest one are not run.

    Returns
    -------
    torch.Tensor
        (B, D * len(layers)), one pooled vector per chosen block concatenated in the order given, so a tile is one
        row that pools into site and well profiles. ConfigError for an unknown pool or a block out of range.
    """
    if pool not in POOLS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    depth = len(backbone.blocks)
    wanted = _block_indices(depth, layers if layers else [-1])
    taken = sorted(set(wanted))
    pairs = backbone.forward_intermediates(
        x,
        indices=taken,
        return_prefix_tokens=True,
        norm=pool != "mean_prenorm",
        stop_early=True,
        output_fmt="NLC",
        intermediates_only=True,
    )
    by_block = {idx: _pool(tokens, prefix, pool) for idx, (tokens, prefix) in zip(taken, pairs)}
    return torch.cat([by_block[idx] for idx in wanted], dim=1)
