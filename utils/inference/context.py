"""The device side of inference: the loaded backbone and everything a batch of sites needs, resolved once, and the
step that turns uint16 sites into tile embeddings."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from data.cellmask import otsu_threshold_batch
from data.intensity import IntensityNorm, get_intensity_norm
from data.segmentation import SegmentationParams
from data.tiling import TileGrid, TileLayout, middle_tile_if_empty, tile_validity
from models.backbones import embed
from models.checkpoints import load_backbone_for_inference
from utils.distributed import DistInfo, detect_launcher, init_distributed
from utils.errors import ConfigError
from utils.inference.config import InferenceConfig
from utils.precision import DTYPES, resolve_precision


@dataclass
class EmbedContext:
    """Everything the device step needs, resolved once: the embedding function, intensities, grid and cell rule."""

    embed_fn: Callable[[torch.Tensor], torch.Tensor]
    intensity: IntensityNorm
    device: torch.device
    grid: TileGrid
    dna_index: int
    autocast: torch.dtype | None
    empty_sites: str
    cell_factor: float
    min_fraction: float
    fingerprint: dict[str, Any]
    channel_perm: list[int] | None = None
    shift: torch.Tensor = field(init=False)
    spread: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        shape = (len(self.intensity.mean), 1, 1)
        scale = float(self.intensity.scale)
        self.shift = torch.tensor(self.intensity.mean, dtype=torch.float64).mul(scale).float().view(shape)
        self.spread = torch.tensor(self.intensity.std, dtype=torch.float64).mul(scale).float().view(shape)
        self.shift, self.spread = self.shift.to(self.device), self.spread.to(self.device)


def make_context(
    cfg: InferenceConfig, embed_fn: Callable[[torch.Tensor], torch.Tensor], intensity: IntensityNorm,
    device: torch.device, model_channels: Sequence[str], fingerprint: dict[str, Any],
) -> EmbedContext:
    """The context for ``cfg``'s tiling, cell rule and precision around any embedding function.

    ``inference.py`` wraps a loaded checkpoint; the training probe wraps the live model, so both embed alike.
    """
    channels = list(cfg.channels)
    perm = None if tuple(model_channels) == tuple(channels) else [channels.index(c) for c in model_channels]
    precision = resolve_precision(cfg.precision, device)
    return EmbedContext(
        embed_fn=embed_fn, intensity=intensity, device=device, grid=cfg.grid,
        dna_index=list(model_channels).index("DNA"), autocast=DTYPES[precision], empty_sites=cfg.empty_sites,
        cell_factor=cfg.cell_factor, min_fraction=cfg.min_cell_fraction, fingerprint=fingerprint,
        channel_perm=perm,
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Checkpoint hash for run.json, so a profile table can be traced to exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_device(cfg: InferenceConfig) -> DistInfo:
    """Join the process group (torchrun) or run alone, on the device ``--device``/``--gpus`` ask for."""
    _, _, world, _ = detect_launcher(cfg.local_rank)
    gpus = list(cfg.gpus) if cfg.gpus else None
    if gpus and len(gpus) > 1 and world == 1:
        warnings.warn(f"--gpus {' '.join(map(str, gpus))}: one process uses GPU {gpus[0]}; for several GPUs run "
                      f"torchrun --nproc_per_node={len(gpus)} inference.py ...", RuntimeWarning, stacklevel=2)
    if gpus and world > 1 and len(gpus) < world:
        gpus = None  # torchrun: one GPU per local rank; the README's "--gpus 0" must not pin every rank to GPU 0
    requested = None if cfg.device == "auto" else cfg.device
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available: use --device cpu")
    if gpus and torch.cuda.is_available():
        for g in gpus:
            if not 0 <= g < torch.cuda.device_count():
                raise ConfigError(f"--gpus {g}: only {torch.cuda.device_count()} GPU(s) visible (0..)")
    return init_distributed(cfg.local_rank, device=requested, gpus=gpus, timeout_min=24 * 60)


def _model_channels(loaded: Any, channels: Sequence[str], ckpt: str) -> tuple[str, ...]:
    """The channel order the model was trained on; files are read in ``--channels`` order and permuted to it."""
    trained = (getattr(loaded, "info", None) or {}).get("channels") or list(channels)
    if sorted(trained) != sorted(channels):
        raise ConfigError(f"--channels {' '.join(channels)} do not match the checkpoint's channels "
                          f"{' '.join(trained)} ({ckpt})")
    return tuple(trained)


def load_context(cfg: InferenceConfig, dist_info: DistInfo) -> tuple[EmbedContext, Any]:
    """Load the checkpoint onto the device, check it against the flags, and build the embedding context."""
    channels = cfg.channels
    loaded = load_backbone_for_inference(cfg.ckpt, cfg.model, cfg.arch)
    backbone = loaded.backbone.to(dist_info.device).eval()
    in_chans = int(backbone.patch_embed.proj.in_channels)
    patch = int(backbone.patch_embed.patch_size[0])
    if cfg.size % patch:
        raise ConfigError(f"--size {cfg.size} is not a multiple of the checkpoint's patch size {patch}")
    if in_chans != len(channels):
        raise ConfigError(f"--ckpt {cfg.ckpt} expects {in_chans} channels but --channels has {len(channels)}")
    model_channels = _model_channels(loaded, channels, cfg.ckpt)
    intensity = get_intensity_norm(cfg.intensity) if cfg.intensity else loaded.intensity
    intensity = intensity.select(model_channels)
    pool = cfg.pool or loaded.pool
    layers = list(cfg.layers) if cfg.layers else None

    def embed_fn(x: torch.Tensor) -> torch.Tensor:
        return embed(backbone, x, pool, layers)

    if cfg.compile:
        embed_fn = torch.compile(embed_fn)
    precision = resolve_precision(cfg.precision, dist_info.device)
    fingerprint = {
        "checkpoint_sha256": file_sha256(cfg.ckpt),
        "model": loaded.info.get("method", cfg.model),  # what was loaded, not what was typed
        "arch": loaded.info.get("arch", cfg.arch),
        "channels": list(channels),
        "model_channels": list(model_channels),
        "intensity": intensity.to_dict(),
        "pool": pool,
        "layers": layers,
        "size": cfg.size,
        "stride": cfg.grid.stride,
        "center_tiles": bool(cfg.center_tiles),
        "operation": cfg.operation,
        "well_pool": cfg.well_pool,
        "empty_sites": cfg.empty_sites,
        "cell_factor": cfg.cell_factor,
        "min_cell_fraction": cfg.min_cell_fraction,
        "precision": precision,
    }
    if cfg.crop_mode == "cells":  # only then: a tiles part's fingerprint stays what it was before cell mode existed
        fingerprint.update(cell_fingerprint(cfg))
    return make_context(cfg, embed_fn, intensity, dist_info.device, model_channels, fingerprint), loaded


def cell_fingerprint(cfg: InferenceConfig) -> dict[str, Any]:
    """The settings that change single-cell embeddings, for run.json and the ``--resume`` check of every plate.

    ``save_cells`` is in it because a part holds per-cell rows only when it was asked for.
    """
    return {
        "crop_mode": cfg.crop_mode,
        "crop_size": int(cfg.crop_size),
        "edge_cells": cfg.edge_cells,
        "max_cells": cfg.max_cells,
        "locations": os.path.abspath(cfg.locations) if cfg.locations is not None else None,
        "segmentation": {k: list(v) if isinstance(v, tuple) else v  # JSON's form, so a resumed part compares equal
                         for k, v in dataclasses.asdict(SegmentationParams()).items()},
        "save_cells": bool(cfg.save_cells),
    }


def _embed_standardised(ctx: EmbedContext, x: torch.Tensor) -> torch.Tensor:
    """Standardise float (N, C, s, s) raw pixels in place and embed them (autocast when set) -> float (N, D)."""
    # (x / scale - mean) / std == (x - mean * scale) / (std * scale): one conversion, then in place.
    x.sub_(ctx.shift).div_(ctx.spread)
    if ctx.autocast is not None:
        with torch.autocast(ctx.device.type, dtype=ctx.autocast):
            emb = ctx.embed_fn(x)
    else:
        emb = ctx.embed_fn(x)
    return emb.float()


@torch.no_grad()
def embed_crops(ctx: EmbedContext, crops: torch.Tensor, size: int) -> torch.Tensor:
    """uint16 (n, C, s, s) single-cell crops on the device, in ``--channels`` order -> embeddings (n, D).

    Crops of another side than the model's ``size`` are resized with antialiased bilinear interpolation (as
    training resizes its crops), then standardised like tiles.
    """
    if ctx.channel_perm is not None:
        crops = crops.view(torch.int16)[:, ctx.channel_perm].view(torch.uint16)
    x = crops.to(torch.float32)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return _embed_standardised(ctx, x)


@torch.no_grad()
def embed_sites(
    ctx: EmbedContext, layout: TileLayout, pixels: torch.Tensor, otsu: torch.Tensor, otsu_missing: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint16 (B,C,h,w) pixels of ``layout.region`` on the device -> tile embeddings (B,n,D), NaN for invalid
    tiles; validity; sites without any valid tile."""
    if ctx.channel_perm is not None:  # gather through an int16 view: uint16 has few kernels on CUDA
        pixels = pixels.view(torch.int16)[:, ctx.channel_perm].view(torch.uint16)
    if otsu_missing:
        missing = torch.isnan(otsu)
        otsu = torch.where(missing, otsu_threshold_batch(pixels[:, ctx.dna_index]).to(torch.float32), otsu)
    tiles = layout.tile(pixels, torch.float32)  # gathered and converted in one pass over the uint16 pixels
    b, n = tiles.shape[:2]
    # the rule on the raw float values (exact for uint16), before standardisation overwrites them in place;
    # thresholds are never NaN here (missing ones were just computed): skip the check that would sync the device
    valid = tile_validity(tiles, otsu, ctx.dna_index, ctx.cell_factor, ctx.min_fraction, check_finite=False)
    empty = ~valid.any(dim=1)
    if ctx.empty_sites == "center":
        valid = middle_tile_if_empty(valid)
    emb = _embed_standardised(ctx, tiles.view(b * n, *tiles.shape[2:])).reshape(b, n, -1)
    emb = torch.where(valid[..., None], emb, torch.full_like(emb, math.nan))
    return emb, valid, empty
