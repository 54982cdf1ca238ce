"""Inference pipeline: sites on disk -> tile embeddings on the device -> site and well profiles -> normalised CSVs.

Flow (one process, or one rank of ``torchrun --nproc_per_node=N inference.py ...``; gloo on CPU, NCCL on GPU):
1. Load the backbone (``models.checkpoints``: ours or the paper's DINO/MAE/SimCLR files; its intensity constants,
   pooling and channel order come with it) and the site table.
2. Ranks split the plates (largest first, to the least-loaded rank). For each plate, ``data.prefetch`` threads read
   only the tiled region of each uint16 site into reused pinned buffers; on the device the sites are tiled (still
   uint16), each tile is marked valid when its DNA channel has cells (the paper's 0.7 x Otsu / 1 % rule; Otsu from
   the TIFF description or ``Otsu_th``, computed on the device from the tiled region when unknown), converted,
   standardised in place and embedded (bf16 autocast on GPU by default). Invalid tiles become NaN rows.
3. A helper thread pools each plate while the next one is embedded: tiles -> sites and tiles -> wells (the paper
   pools every valid tile of a well; ``--well-pool sites`` pools site profiles instead) with NaN-aware groupbys
   (``utils.profiles``), then writes ``<outdir>/parts/<plate>-<hash>.npz`` and a ``.json`` sidecar last. The sidecar
   marks the plate done for ``--resume`` and holds a fingerprint of every setting that changes embeddings (checkpoint
   hash, tiling, pooling, channels, ...); resuming with other settings is an error. Normalisation flags are not in
   it, so ``--resume`` with another ``--norm_method`` only re-normalises. With several nodes, ``--outdir`` must be
   on a shared file system.
4. Rank 0 merges the parts, drops wells without any valid tile (reported), normalises with pycytominer and writes
   ``agg_features.csv`` then ``well_features.csv`` (in ``<outdir>/<method>/`` for each method with ``--norm_method
   all``), optional ``site_features.csv`` (raw site profiles with ``n_valid_tiles``) and parquet copies, and
   ``run.json`` last (status, checkpoint sha256, flags, resolved settings, control query, versions, skipped files,
   empty sites/wells, per-plate reports and timings). Final outputs of an earlier run are deleted at start, so a
   failed run never leaves a complete-looking result.

Conventions: metadata columns keep the paper's names (batch, plate, well, perturbation_id, target, plus control_type
and gene_group when the CSV has them); features are ``emb0..emb{D-1}`` unpadded, like the paper's inference, so its
evaluation code reads them; no index column. ``--l2norm`` scales each well profile to unit L2 norm (the paper
scaled feature columns, a bug). Sites with no valid tile: by default (``--empty-sites drop``) they contribute
nothing and a well left without any valid tile gets no row; both are counted in run.json and warned about.
``--empty-sites center`` applies the paper's rule instead (such a site uses its middle tile).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data.cellmask import has_cells, otsu_threshold_batch
from data.intensity import IntensityNorm, get_intensity_norm
from data.prefetch import Region, SitePrefetcher, site_shape
from data.schema import INFERENCE_REQUIRED, OPTIONAL_METADATA, image_paths, load_site_table
from data.tiling import tile_batch, tile_positions
from models.backbones import ARCHS, embed
from models.checkpoints import load_backbone_for_inference
from utils.distributed import DistInfo, detect_launcher, init_distributed
from utils.errors import ConfigError, DataError
from utils.fileio import atomic_path, ensure_dir, write_csv_atomic, write_json_atomic
from utils.profiles import (
    NORM_METHODS,
    aggregate_sites,
    aggregate_wells,
    consensus,
    embedding_names,
    normalize_profiles,
    resolve_control_query,
)

PARTS_DIR = "parts"
PART_FORMAT = "cellpaint-ssl/inference-part/1"
WELL_META = ("batch", "plate", "well", "perturbation_id", "target")
SITE_META = ("batch", "plate", "well", "field", "perturbation_id", "target")
FINAL_FILES = ("well_features", "agg_features", "site_features")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
EMPTY_SITE_RULES = ("drop", "center")
WELL_POOLS = ("tiles", "sites")


@dataclass
class EmbedContext:
    """Everything the device step needs, resolved once."""

    embed_fn: Callable[[torch.Tensor], torch.Tensor]
    intensity: IntensityNorm
    device: torch.device
    size: int
    stride: int
    center: bool
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


@dataclass
class PlateResult:
    """Per-plate arrays (indices are rows of the site table) and the report that goes to run.json."""

    site_rows: np.ndarray
    site_emb: np.ndarray
    site_valid: np.ndarray
    well_rows: np.ndarray
    well_emb: np.ndarray
    well_valid: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Checkpoint hash for run.json, so a profile table can be traced to exact weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "numpy", "pandas", "pycytominer", "tifffile", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _part_name(plate: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(plate))[:60]
    return f"{safe}-{hashlib.sha1(str(plate).encode()).hexdigest()[:8]}"


def _plate_signature(plate_table: pd.DataFrame, channels: Sequence[str]) -> str:
    """Hash of the plate's sites (files and metadata), so a resumed part belongs to the same rows."""
    digest = hashlib.sha1()
    for idx, row in plate_table.iterrows():
        meta = "|".join(str(row.get(c)) for c in SITE_META)
        digest.update(f"{idx}|{meta}|{'|'.join(image_paths(row, channels))}\n".encode())
    return digest.hexdigest()


def _assign_plates(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Largest plates first to the least-loaded rank: deterministic on every rank, balanced by site count."""
    loads = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for plate in sorted(sizes, key=lambda p: (-sizes[p], list(sizes).index(p))):
        r = loads.index(min(loads))
        out[r].append(plate)
        loads[r] += sizes[plate]
    return out


def _region(height: int, width: int, size: int, stride: int, center: bool) -> tuple[Region, int]:
    pos = np.asarray(tile_positions(height, width, size, stride, center))
    y0, x0 = int(pos[:, 0].min()), int(pos[:, 1].min())
    h, w = int(pos[:, 0].max()) + size - y0, int(pos[:, 1].max()) + size - x0
    return Region(height, width, y0, x0, h, w), len(pos)


def _probe_geometry(plate_table: pd.DataFrame, channels: Sequence[str]) -> tuple[int, int] | None:
    """(H, W) of the first site that opens; None when no site of the plate can be opened."""
    for _, row in plate_table.iterrows():
        try:
            _, h, w = site_shape(row.to_dict(), channels)
            return h, w
        except DataError:
            continue
    return None


@torch.no_grad()
def embed_sites(
    ctx: EmbedContext, pixels: torch.Tensor, otsu: torch.Tensor, otsu_missing: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint16 (B,C,h,w) on the device -> tile embeddings (B,n,D) with NaN for invalid tiles, validity, empty sites."""
    if ctx.channel_perm is not None:  # gather through an int16 view: uint16 has few kernels on CUDA
        pixels = pixels.view(torch.int16)[:, ctx.channel_perm].view(torch.uint16)
    if otsu_missing:
        missing = torch.isnan(otsu)
        otsu = torch.where(missing, otsu_threshold_batch(pixels[:, ctx.dna_index]).to(torch.float32), otsu)
    tiles, _ = tile_batch(pixels, ctx.size, ctx.stride)  # uint16: half the bytes of float through the rearrangement
    b, n = tiles.shape[:2]
    # has_cells is tile_validity's rule without its NaN check, which would stall the device queue every batch;
    # thresholds are never NaN here (missing ones were just computed).
    valid = has_cells(tiles[:, :, ctx.dna_index], otsu[:, None], ctx.cell_factor, ctx.min_fraction)
    empty = ~valid.any(dim=1)
    if ctx.empty_sites == "center":
        valid[:, n // 2] |= empty
    # (x / scale - mean) / std == (x - mean * scale) / (std * scale): one conversion, then in place.
    x = tiles.reshape(b * n, *tiles.shape[2:]).to(torch.float32)
    x.sub_(ctx.shift).div_(ctx.spread)
    if ctx.autocast is not None:
        with torch.autocast(ctx.device.type, dtype=ctx.autocast):
            emb = ctx.embed_fn(x)
    else:
        emb = ctx.embed_fn(x)
    emb = emb.float().reshape(b, n, -1)
    emb = torch.where(valid[..., None], emb, torch.full_like(emb, math.nan))
    return emb, valid, empty


def _tile_frame(emb: np.ndarray, site_codes: np.ndarray, well_codes: np.ndarray) -> tuple[pd.DataFrame, list[str]]:
    s, n, d = emb.shape
    feats = embedding_names(d)
    df = pd.DataFrame(emb.reshape(s * n, d), columns=feats)
    df.insert(0, "well_code", np.repeat(well_codes, n))
    df.insert(0, "site_code", np.repeat(site_codes, n))
    return df, feats


@dataclass
class PlateTiles:
    """Tile embeddings of one plate (NaN rows for invalid tiles) before pooling, with what went wrong."""

    tile_emb: np.ndarray | None
    tile_valid: np.ndarray | None
    read_ok: np.ndarray
    no_cells: np.ndarray
    skipped: list[dict[str, str]]
    n_tiles: int
    seconds: float


def embed_plate(
    ctx: EmbedContext,
    plate_table: pd.DataFrame,
    args: argparse.Namespace,
    channels: Sequence[str],
    progress: tqdm,
) -> PlateTiles:
    """Embed one plate's sites on the device; bad images raise or are skipped."""
    t0 = time.perf_counter()
    skipped: list[dict[str, str]] = []
    geometry = _probe_geometry(plate_table, channels)
    n_sites = len(plate_table)
    read_ok = np.zeros(n_sites, dtype=bool)
    no_cells = np.zeros(n_sites, dtype=bool)
    tile_emb: np.ndarray | None = None
    tile_valid: np.ndarray | None = None
    n_tiles = 0
    if geometry is not None:
        region, n_tiles = _region(*geometry, args.size, ctx.stride, ctx.center)
        loader = SitePrefetcher(plate_table, channels, region, args.batch_size, ctx.device, threads=args.num_workers)
        pending: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        offset = 0

        def collect(item: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]) -> None:
            nonlocal tile_emb, tile_valid
            start, emb, valid, empty, count = item
            no_cells[start : start + count] = empty[:count].cpu().numpy()
            emb_h = emb[:count].cpu().numpy()
            if tile_emb is None:
                tile_emb = np.full((n_sites, n_tiles, emb_h.shape[-1]), np.nan, dtype=np.float32)
                tile_valid = np.zeros((n_sites, n_tiles), dtype=bool)
            tile_emb[start : start + count] = emb_h
            tile_valid[start : start + count] = valid[:count].cpu().numpy()
            progress.update(count)

        for batch in loader:
            for pos, message in batch.errors:
                if not args.skip_bad_images:
                    raise DataError(message)
                warnings.warn(f"skipping bad image: {message}", RuntimeWarning, stacklevel=2)
                skipped.append({"files": ", ".join(image_paths(plate_table.iloc[pos], channels)), "error": message})
            read_ok[batch.positions] = batch.ok
            rows = batch.pixels.shape[0] if args.compile else batch.count  # compiled graphs keep one batch shape
            emb, valid, empty = embed_sites(ctx, batch.pixels[:rows], batch.otsu[:rows], batch.otsu_missing)
            if pending is not None:
                collect(pending)
            pending = (offset, emb, valid, empty, batch.count)
            offset += batch.count
        if pending is not None:
            collect(pending)
    else:
        for _, row in plate_table.iterrows():
            files = ", ".join(image_paths(row, channels))
            try:
                site_shape(row.to_dict(), channels)
            except DataError as exc:
                if not args.skip_bad_images:
                    raise
                skipped.append({"files": files, "error": str(exc)})
        progress.update(n_sites)
    return PlateTiles(tile_emb, tile_valid, read_ok, no_cells, skipped, n_tiles, time.perf_counter() - t0)


def pool_plate(plate_table: pd.DataFrame, tiles: PlateTiles, args: argparse.Namespace) -> PlateResult:
    """Tiles -> sites -> wells with NaN-aware groupbys over the sites that could be read."""
    t0 = time.perf_counter()
    tile_emb, tile_valid, read_ok = tiles.tile_emb, tiles.tile_valid, tiles.read_ok
    well_keys = _well_meta(plate_table)
    well_codes = plate_table.groupby(well_keys, sort=False, dropna=False).ngroup().to_numpy()
    rows = plate_table.index.to_numpy()
    ok = np.flatnonzero(read_ok)
    empty = np.zeros(0, dtype=np.float32)
    if tile_emb is None or len(ok) == 0:
        result = PlateResult(np.zeros(0, np.int64), empty.reshape(0, 0), np.zeros(0, np.int64),
                             np.zeros(0, np.int64), empty.reshape(0, 0), np.zeros(0, np.int64))
    else:
        tile_df, feats = _tile_frame(tile_emb[ok], ok, well_codes[ok])
        sites = aggregate_sites(tile_df, feats, ["site_code"], args.operation)
        if args.well_pool == "tiles":
            wells = aggregate_wells(tile_df, feats, ["well_code"], args.operation, count_column="n_valid_tiles")
        else:
            site_in = sites.assign(well_code=well_codes[sites["site_code"].to_numpy()])
            wells = aggregate_wells(site_in, feats, ["well_code"], args.operation, count_column="n_valid_tiles")
        first_row = pd.Series(rows).groupby(well_codes, sort=False).first()
        result = PlateResult(
            site_rows=rows[sites["site_code"].to_numpy()],
            site_emb=sites[feats].to_numpy(np.float32),
            site_valid=sites["n_valid_tiles"].to_numpy(np.int64),
            well_rows=first_row.loc[wells["well_code"].to_numpy()].to_numpy(np.int64),
            well_emb=wells[feats].to_numpy(np.float32),
            well_valid=_well_valid_tiles(tile_valid[ok], well_codes[ok], wells["well_code"].to_numpy()),
        )
    result.report = {
        "plate": str(plate_table["plate"].iloc[0]),
        "n_sites": int(len(plate_table)),
        "n_sites_read": int(len(ok)),
        "n_tiles_per_site": int(tiles.n_tiles),
        "n_sites_without_valid_tiles": int((tiles.no_cells & read_ok).sum()),
        "n_wells": int(len(result.well_rows)),
        "skipped_files": tiles.skipped,
        "embed_seconds": round(tiles.seconds, 3),
        "pool_seconds": round(time.perf_counter() - t0, 3),
    }
    return result


def _pool_and_save(
    parts: Path, plate_table: pd.DataFrame, tiles: PlateTiles, args: argparse.Namespace, fingerprint: dict[str, Any],
    rank: int,
) -> None:
    """Runs on a helper thread, so pooling and writing one plate overlaps with embedding the next."""
    result = pool_plate(plate_table, tiles, args)
    result.report["rank"] = rank
    _save_part(parts, str(plate_table["plate"].iloc[0]), result, fingerprint)


def _well_valid_tiles(valid: np.ndarray, well_codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    counts = pd.Series(valid.sum(axis=1)).groupby(well_codes, sort=False).sum()
    return counts.loc[order].to_numpy(np.int64)


def _well_meta(table: pd.DataFrame) -> list[str]:
    return [*WELL_META, *[c for c in OPTIONAL_METADATA if c in table.columns]]


def _save_part(directory: Path, plate: str, result: PlateResult, fingerprint: dict[str, Any]) -> None:
    name = _part_name(plate)
    arrays = {k: getattr(result, k) for k in ("site_rows", "site_emb", "site_valid", "well_rows", "well_emb",
                                                "well_valid")}
    with atomic_path(directory / f"{name}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    write_json_atomic(directory / f"{name}.json", {"format": PART_FORMAT, "fingerprint": fingerprint,
                                                   "report": result.report})


def _load_part(
    directory: Path, plate: str, arrays: bool = True, sites: bool = True
) -> tuple[PlateResult | None, dict[str, Any]] | None:
    """A finished plate (None when absent); site embeddings only when asked, so merging many plates stays small."""
    name = _part_name(plate)
    meta_path, npz_path = directory / f"{name}.json", directory / f"{name}.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not arrays:
            return None, meta
        with np.load(npz_path, allow_pickle=False) as z:
            loaded = {k: z[k] if sites or not k.startswith("site_") else np.zeros(0) for k in z.files}
        result = PlateResult(**loaded, report=meta["report"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(f"{npz_path}: unreadable intermediate result ({exc}); delete it and rerun") from None
    return result, meta


def _check_resumed(meta: dict[str, Any], fingerprint: dict[str, Any], path: Path) -> None:
    old = meta.get("fingerprint", {})
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        raise ConfigError(
            f"--resume: {path} was computed with different {', '.join(changed)}; use a new --outdir or drop --resume"
        )


def _resolve_device(args: argparse.Namespace) -> DistInfo:
    _, _, world, _ = detect_launcher(getattr(args, "local_rank", None))
    gpus = list(args.gpus) if args.gpus else None
    if gpus and len(gpus) > 1 and world == 1:
        warnings.warn(f"--gpus {' '.join(map(str, gpus))}: one process uses GPU {gpus[0]}; for several GPUs run "
                      f"torchrun --nproc_per_node={len(gpus)} inference.py ...", RuntimeWarning, stacklevel=2)
    if gpus and world > 1 and len(gpus) < world:
        gpus = None  # torchrun: one GPU per local rank; the README's "--gpus 0" must not pin every rank to GPU 0
    requested = None if args.device == "auto" else args.device
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available: use --device cpu")
    if gpus and torch.cuda.is_available():
        for g in gpus:
            if not 0 <= g < torch.cuda.device_count():
                raise ConfigError(f"--gpus {g}: only {torch.cuda.device_count()} GPU(s) visible (0..)")
    return init_distributed(getattr(args, "local_rank", None), device=requested, gpus=gpus, timeout_min=24 * 60)


def _model_channels(loaded: Any, channels: Sequence[str], ckpt: str) -> tuple[str, ...]:
    """The channel order the model was trained on; files are read in ``--channels`` order and permuted to it."""
    trained = (getattr(loaded, "info", None) or {}).get("channels") or list(channels)
    if sorted(trained) != sorted(channels):
        raise ConfigError(f"--channels {' '.join(channels)} do not match the checkpoint's channels "
                          f"{' '.join(trained)} ({ckpt})")
    return tuple(trained)


def _build_context(args: argparse.Namespace, channels: Sequence[str], dist_info: DistInfo) -> tuple[EmbedContext, Any]:
    loaded = load_backbone_for_inference(args.ckpt, args.model, args.arch)
    backbone = loaded.backbone.to(dist_info.device).eval()
    in_chans = int(backbone.patch_embed.proj.in_channels)
    patch = int(backbone.patch_embed.patch_size[0])
    if args.size % patch:
        raise ConfigError(f"--size {args.size} is not a multiple of the checkpoint's patch size {patch}")
    if in_chans != len(channels):
        raise ConfigError(f"--ckpt {args.ckpt} expects {in_chans} channels but --channels has {len(channels)}")
    model_channels = _model_channels(loaded, channels, args.ckpt)
    intensity = get_intensity_norm(args.intensity) if args.intensity else loaded.intensity
    intensity = intensity.select(model_channels)
    pool = args.pool or loaded.pool
    layers = list(args.layers) if args.layers else None

    def embed_fn(x: torch.Tensor) -> torch.Tensor:
        return embed(backbone, x, pool, layers)

    if args.compile:
        embed_fn = torch.compile(embed_fn)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if dist_info.device.type == "cuda" else "fp32"
    if "DNA" not in channels:
        raise ConfigError(f"--channels {list(channels)} has no DNA channel, which the cell mask needs")
    if precision == "fp16" and dist_info.device.type != "cuda":
        raise ConfigError("--precision fp16 needs a GPU; use fp32 or bf16 on the CPU")
    perm = None if model_channels == tuple(channels) else [list(channels).index(c) for c in model_channels]
    stride = args.stride or args.size
    fingerprint = {
        "checkpoint_sha256": file_sha256(args.ckpt),
        "model": loaded.info.get("method", args.model),  # what was loaded, not what was typed
        "arch": loaded.info.get("arch", args.arch),
        "channels": list(channels),
        "model_channels": list(model_channels),
        "intensity": intensity.to_dict(),
        "pool": pool,
        "layers": layers,
        "size": args.size,
        "stride": stride,
        "center_tiles": bool(args.center_tiles),
        "operation": args.operation,
        "well_pool": args.well_pool,
        "empty_sites": args.empty_sites,
        "cell_factor": args.cell_factor,
        "min_cell_fraction": args.min_cell_fraction,
        "precision": precision,
    }
    ctx = EmbedContext(
        embed_fn=embed_fn, intensity=intensity, device=dist_info.device, size=args.size, stride=stride,
        center=bool(args.center_tiles), dna_index=model_channels.index("DNA"), autocast=PRECISIONS[precision],
        empty_sites=args.empty_sites, cell_factor=args.cell_factor, min_fraction=args.min_cell_fraction,
        fingerprint=fingerprint, channel_perm=perm,
    )
    return ctx, loaded


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible flag combinations before any work starts."""
    if args.operation not in ("mean", "median"):
        raise ConfigError(f"--operation {args.operation!r} must be mean or median")
    if args.norm_method not in (*NORM_METHODS, "all"):
        raise ConfigError(f"--norm_method {args.norm_method!r} is not one of {', '.join(NORM_METHODS)}, all")
    if args.size < 1 or (args.stride is not None and args.stride < 1):
        raise ConfigError("--size and --stride must be positive")
    if args.batch_size < 1:
        raise ConfigError("--batch_size must be >= 1")
    if args.num_workers < 0:
        raise ConfigError("--num_workers must be >= 0")
    if args.empty_sites not in EMPTY_SITE_RULES:
        raise ConfigError(f"--empty-sites must be one of {', '.join(EMPTY_SITE_RULES)}")
    if args.well_pool not in WELL_POOLS:
        raise ConfigError(f"--well-pool must be one of {', '.join(WELL_POOLS)}")
    if not Path(args.ckpt).is_file():
        raise ConfigError(f"--ckpt {args.ckpt}: no such file")
    if args.arch not in ARCHS:
        raise ConfigError(f"--arch {args.arch!r} is not one of {', '.join(sorted(ARCHS))}")
    if not math.isfinite(args.cell_factor) or args.cell_factor < 0:
        raise ConfigError(f"--cell-factor must be >= 0, got {args.cell_factor}")
    if not 0.0 <= args.min_cell_fraction <= 1.0:
        raise ConfigError(f"--min-cell-fraction is a fraction of tile pixels in [0, 1], got {args.min_cell_fraction}")


def _clear_final_outputs(outdir: Path) -> None:
    """Remove outputs of an earlier run up front, so a failed run never leaves a complete-looking result."""
    targets = [outdir / "run.json"]
    for folder in [outdir, *(outdir / m for m in NORM_METHODS)]:
        targets += [folder / f"{name}.{ext}" for name in FINAL_FILES for ext in ("csv", "parquet")]
    for path in targets:
        if path.is_file():
            path.unlink()


def _write_table(df: pd.DataFrame, folder: Path, name: str, parquet: bool) -> list[str]:
    write_csv_atomic(df, folder / f"{name}.csv")
    written = [str(folder / f"{name}.csv")]
    if parquet:
        with atomic_path(folder / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        written.append(str(folder / f"{name}.parquet"))
    return written


def _merge(table: pd.DataFrame, results: list[PlateResult], dim: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    feats = embedding_names(dim)
    well_meta, site_meta = _well_meta(table), [*SITE_META, *[c for c in OPTIONAL_METADATA if c in table.columns]]
    wells, sites = [], []
    for r in results:
        if len(r.well_rows):
            w = table.loc[r.well_rows, well_meta].reset_index(drop=True)
            wells.append(pd.concat([w, pd.DataFrame(r.well_emb, columns=feats)], axis=1))
            if len(r.site_rows):
                s = table.loc[r.site_rows, site_meta].reset_index(drop=True)
                s.insert(len(site_meta), "n_valid_tiles", r.site_valid)
                sites.append(pd.concat([s, pd.DataFrame(r.site_emb, columns=feats)], axis=1))
    if not wells:
        raise DataError("no site could be embedded: every image was skipped")
    return pd.concat(wells, ignore_index=True), pd.concat(sites, ignore_index=True) if sites else pd.DataFrame()


def normalise_wells(
    wells: pd.DataFrame, feats: list[str], meta: list[str], method: str, control_query: str, args: argparse.Namespace
) -> tuple[pd.DataFrame, list[str]]:
    """One normalisation method with the run's scope, MAD reference and L2 flag (inference and the training probe)."""
    return normalize_profiles(wells, feats, meta, method, control_query, scope=args.norm_scope,
                              mad_reference=args.mad_reference, l2norm=args.l2norm)


def drop_empty_wells(wells: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Wells whose every tile was invalid (all-NaN features) leave the table; returns the rest and who left."""
    feats = [c for c in wells.columns if c.startswith("emb")]
    nan_wells = wells[feats].isna().all(axis=1)
    dropped = wells.loc[nan_wells, ["batch", "plate", "well"]].to_dict("records")
    return wells.loc[~nan_wells].reset_index(drop=True), dropped


def embed_profiles(
    ctx: EmbedContext, table: pd.DataFrame, args: argparse.Namespace, channels: Sequence[str],
    progress: tqdm | None = None,
) -> pd.DataFrame:
    """Every plate of ``table`` -> tiles -> wells -> one ``args.norm_method``, in memory (no parts, no files).

    The training probe embeds its held-out plate with this, so it sees exactly what ``inference.py`` would write
    to ``well_features.csv`` for the same weights and flags.
    """
    if args.norm_method == "all":
        raise ConfigError("embed_profiles needs one --norm_method, not 'all'")
    bar = progress if progress is not None else tqdm(total=len(table), disable=True)
    results = [pool_plate(plate_table, embed_plate(ctx, plate_table, args, channels, bar), args)
               for _, plate_table in table.groupby("plate", sort=False)]
    dims = {r.well_emb.shape[1] for r in results if len(r.well_rows)}
    wells, _ = _merge(table, results, dims.pop() if dims else 0)
    wells, _ = drop_empty_wells(wells)
    if wells.empty:
        raise DataError("no well has a valid tile (no cells found by the cell rule)")
    feats = [c for c in wells.columns if c.startswith("emb")]
    meta = [c for c in wells.columns if c not in feats]
    control_query = resolve_control_query(wells, args.controls, args.control_query)
    norm, _ = normalise_wells(wells, feats, meta, args.norm_method, control_query, args)
    return norm


def _postprocess(
    wells: pd.DataFrame, args: argparse.Namespace, control_query: str, outdir: Path
) -> tuple[dict[str, Any], list[str]]:
    feats = [c for c in wells.columns if c.startswith("emb")]
    meta = [c for c in wells.columns if c not in feats]
    methods = list(NORM_METHODS) if args.norm_method == "all" else [args.norm_method]
    kept_counts: dict[str, int] = {}
    written: list[str] = []
    for method in tqdm(methods, desc="normalise", unit="method", disable=len(methods) == 1, leave=False):
        folder = outdir / method if args.norm_method == "all" else outdir
        norm, kept = normalise_wells(wells, feats, meta, method, control_query, args)
        agg = consensus(norm, kept, ["perturbation_id"], args.operation,
                        carry=("target", "control_type", "gene_group"))
        written += _write_table(agg, folder, "agg_features", args.parquet)
        written += _write_table(norm, folder, "well_features", args.parquet)
        kept_counts[method] = len(kept)
    return kept_counts, written


def run_inference(args: argparse.Namespace) -> Path | None:
    """Embed every site of ``--valset`` and write normalised well and perturbation profiles to ``--outdir``."""
    t_start = time.perf_counter()
    validate_args(args)
    dist_info = _resolve_device(args)
    outdir = Path(args.outdir)
    parts = outdir / PARTS_DIR
    channels = tuple(args.channels)
    table = load_site_table(args.valset, args.image_root, channels, required=INFERENCE_REQUIRED,
                            check_files=not args.skip_bad_images)
    if dist_info.is_main:
        ensure_dir(outdir)
        _clear_final_outputs(outdir)
    ctx, loaded = _build_context(args, channels, dist_info)
    sizes = table.groupby("plate", sort=False).size().to_dict()
    mine = _assign_plates(sizes, dist_info.world_size)[dist_info.rank]
    progress = tqdm(total=sum(sizes[p] for p in mine), unit="site", dynamic_ncols=True,
                    desc=f"embed rank {dist_info.rank}" if dist_info.distributed else "embed",
                    disable=not dist_info.is_main and not sys.stderr.isatty())
    t_embed = time.perf_counter()
    resumed = []
    finisher = ThreadPoolExecutor(1, "plate-pooling")
    saving: list[Future] = []
    with progress, finisher:
        for plate in mine:
            plate_table = table[table["plate"] == plate]
            fingerprint = {**ctx.fingerprint, "sites": _plate_signature(plate_table, channels)}
            if args.resume:
                found = _load_part(parts, plate, arrays=False)
                if found is not None:
                    _check_resumed(found[1], fingerprint, parts / f"{_part_name(plate)}.json")
                    resumed.append(plate)
                    progress.update(len(plate_table))
                    continue
            for done in [f for f in saving if f.done()]:
                done.result()  # surface a pooling error now rather than after every plate is embedded
            tiles = embed_plate(ctx, plate_table, args, channels, progress)
            saving.append(finisher.submit(_pool_and_save, parts, plate_table, tiles, args, fingerprint,
                                          dist_info.rank))
        for f in saving:
            f.result()
    embed_seconds = time.perf_counter() - t_embed
    if dist_info.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(gathered, {"resumed": resumed, "embed_seconds": embed_seconds})
        dist.barrier()
    else:
        gathered = [{"resumed": resumed, "embed_seconds": embed_seconds}]
    if not dist_info.is_main:
        return None
    return _finish(args, table, outdir, parts, ctx, loaded, dist_info, gathered, t_start)


def _finish(
    args: argparse.Namespace,
    table: pd.DataFrame,
    outdir: Path,
    parts: Path,
    ctx: EmbedContext,
    loaded: Any,
    dist_info: DistInfo,
    gathered: list[dict[str, Any]],
    t_start: float,
) -> Path:
    """Rank 0: merge the plate parts, normalise, and write the final tables, then run.json last."""
    t_post = time.perf_counter()
    results, reports = [], []
    for plate in table["plate"].drop_duplicates():
        found = _load_part(parts, plate, sites=args.save_sites)
        if found is None:
            raise DataError(f"{parts}: intermediate result of plate {plate!r} is missing; rerun with --resume")
        results.append(found[0])
        reports.append(found[1]["report"])
    dims = {r.well_emb.shape[1] for r in results if len(r.well_rows)}
    if len(dims) > 1:
        raise DataError(f"{parts}: plates have different embedding sizes {sorted(dims)}; rerun without --resume")
    wells, sites = _merge(table, results, dims.pop() if dims else 0)
    wells, dropped = drop_empty_wells(wells)
    feats = [c for c in wells.columns if c.startswith("emb")]
    if dropped:
        warnings.warn(f"{len(dropped)} well(s) have no valid tile and are left out (listed in run.json)",
                      RuntimeWarning, stacklevel=2)
    skipped = [s for rep in reports for s in rep["skipped_files"]]
    empty_sites = sum(rep["n_sites_without_valid_tiles"] for rep in reports)
    if empty_sites:
        rule = "left out" if args.empty_sites == "drop" else "their middle tile is used (--empty-sites center)"
        warnings.warn(f"{empty_sites} site(s) have no valid tile: {rule}; counts per plate in run.json",
                      RuntimeWarning, stacklevel=2)
    control_query = resolve_control_query(wells, args.controls, args.control_query)
    written = []
    if args.save_sites:
        written += _write_table(sites, outdir, "site_features", args.parquet)
    kept, written_norm = _postprocess(wells, args, control_query, outdir)
    written += written_norm
    n_sites = int(sum(rep["n_sites_read"] for rep in reports))
    resumed = {p for g in gathered for p in g["resumed"]}
    embedded = int(sum(rep["n_sites_read"] for rep in reports if rep["plate"] not in resumed))
    embed_seconds = max(g["embed_seconds"] for g in gathered)
    total = time.perf_counter() - t_start
    run = {
        "status": "complete",
        "checkpoint": {"path": str(Path(args.ckpt).resolve()), "sha256": ctx.fingerprint["checkpoint_sha256"],
                       "info": getattr(loaded, "info", {})},
        "flags": vars(args),
        "settings": ctx.fingerprint,
        "control_query": control_query,
        "versions": _versions(),
        "device": str(dist_info.device),
        "world_size": dist_info.world_size,
        "command": sys.argv,
        "n_sites": n_sites,
        "n_wells": int(len(wells)),
        "n_features": len(feats),
        "features_kept": kept,
        "feature_names": "emb0..emb{D-1}, unpadded like the paper",
        "skipped_files": skipped,
        "n_sites_without_valid_tiles": int(empty_sites),
        "wells_without_valid_tiles": dropped,
        "resumed_plates": [p for g in gathered for p in g["resumed"]],
        "plates": reports,
        "outputs": written,
        "timings": {"embed_seconds": round(embed_seconds, 3), "postprocess_seconds":
                    round(time.perf_counter() - t_post, 3), "total_seconds": round(total, 3),
                    "sites_per_second": round(embedded / embed_seconds, 3) if embedded else None},
    }
    write_json_atomic(outdir / "run.json", run)
    rate = f"{embedded / embed_seconds:.1f} sites/s" if embedded else "all plates resumed"
    print(f"inference: {n_sites} sites -> {len(wells)} wells ({args.norm_method}), {len(skipped)} skipped, "
          f"{rate}, {total:.1f} s total -> {outdir}", flush=True)
    return outdir
