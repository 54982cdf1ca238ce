"""One plate at a time: embed its sites on the device (``embed_plate``), then pool tiles into sites and wells
(``pool_plate``) with NaN-aware groupbys. Ranks split the plates with ``assign_plates``."""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data.io import site_shape
from data.prefetch import SiteBatch, SitePrefetcher
from data.schema import OPTIONAL_METADATA, image_paths
from utils.errors import DataError
from utils.inference.config import InferenceConfig
from utils.inference.context import EmbedContext, embed_sites
from utils.profiles import aggregate_sites, aggregate_wells, embedding_names

WELL_META = ("batch", "plate", "well", "perturbation_id")
SITE_META = ("batch", "plate", "well", "field", "perturbation_id")
SIGNATURE_META = (*SITE_META, "target")  # what a plate part's fingerprint hashes; unchanged since target is optional


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
    # --crop-mode cells with --save-cells: per crop its site's table row, nucleus (y, x), embedding, and whether it
    # is the centre crop standing in for a site without cells (--empty-sites center); None otherwise
    cell_rows: np.ndarray | None = None
    cell_yx: np.ndarray | None = None
    cell_emb: np.ndarray | None = None
    cell_centre: np.ndarray | None = None


def plate_signature(plate_table: pd.DataFrame, channels: Sequence[str]) -> str:
    """Hash of the plate's sites (files and metadata), so a resumed part belongs to the same rows."""
    digest = hashlib.sha1()
    for idx, row in plate_table.iterrows():
        meta = "|".join(str(row.get(c)) for c in SIGNATURE_META)
        digest.update(f"{idx}|{meta}|{'|'.join(image_paths(row, channels))}\n".encode())
    return digest.hexdigest()


def assign_plates(sizes: dict[str, int], world: int) -> list[list[str]]:
    """Largest plates first to the least-loaded rank: deterministic on every rank, balanced by site count."""
    loads = [0] * world
    out: list[list[str]] = [[] for _ in range(world)]
    for plate in sorted(sizes, key=lambda p: (-sizes[p], list(sizes).index(p))):
        r = loads.index(min(loads))
        out[r].append(plate)
        loads[r] += sizes[plate]
    return out


def probe_geometry(plate_table: pd.DataFrame, channels: Sequence[str]) -> tuple[int, int] | None:
    """(H, W) of the first site that opens; None when no site of the plate can be opened."""
    for _, row in plate_table.iterrows():
        try:
            _, h, w = site_shape(row.to_dict(), channels)
            return h, w
        except DataError:
            continue
    return None


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
    cfg: InferenceConfig,
    progress: tqdm,
) -> PlateTiles:
    """Embed one plate's sites on the device; bad images raise or are skipped (``--skip_bad_images``)."""
    channels = cfg.channels
    t0 = time.perf_counter()
    skipped: list[dict[str, str]] = []
    geometry = probe_geometry(plate_table, channels)
    n_sites = len(plate_table)
    read_ok = np.zeros(n_sites, dtype=bool)
    no_cells = np.zeros(n_sites, dtype=bool)
    tile_emb: np.ndarray | None = None
    tile_valid: np.ndarray | None = None
    n_tiles = 0
    if geometry is not None:
        layout = ctx.grid.layout(*geometry)  # once per plate: the reader and the tiler share it
        n_tiles = layout.n_tiles
        loader = SitePrefetcher(plate_table, channels, layout.region, cfg.batch_size, ctx.device,
                                threads=cfg.num_workers)
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
            skipped += batch_errors(batch, plate_table, cfg)
            read_ok[batch.positions] = batch.ok
            rows = batch.pixels.shape[0] if cfg.compile else batch.count  # compiled graphs keep one batch shape
            emb, valid, empty = embed_sites(ctx, layout, batch.pixels[:rows], batch.otsu[:rows], batch.otsu_missing)
            if pending is not None:
                collect(pending)
            pending = (offset, emb, valid, empty, batch.count)
            offset += batch.count
        if pending is not None:
            collect(pending)
    else:
        skipped = unreadable_plate(plate_table, cfg, progress)
    return PlateTiles(tile_emb, tile_valid, read_ok, no_cells, skipped, n_tiles, time.perf_counter() - t0)


def batch_errors(batch: SiteBatch, plate_table: pd.DataFrame, cfg: InferenceConfig) -> list[dict[str, str]]:
    """The unreadable sites of a batch: an error, or warned about and listed (``--skip_bad_images``)."""
    skipped = []
    for pos, message in batch.errors:
        if not cfg.skip_bad_images:
            raise DataError(message)
        # stacklevel 3: the warning points at embed_plate's caller, as it did before this helper existed
        warnings.warn(f"skipping bad image: {message}", RuntimeWarning, stacklevel=3)
        skipped.append({"files": ", ".join(image_paths(plate_table.iloc[pos], cfg.channels)), "error": message})
    return skipped


def unreadable_plate(plate_table: pd.DataFrame, cfg: InferenceConfig, progress: tqdm) -> list[dict[str, str]]:
    """A plate none of whose sites opens: the first error, or every site listed (``--skip_bad_images``)."""
    skipped = []
    for _, row in plate_table.iterrows():
        files = ", ".join(image_paths(row, cfg.channels))
        try:
            site_shape(row.to_dict(), cfg.channels)
        except DataError as exc:
            if not cfg.skip_bad_images:
                raise
            skipped.append({"files": files, "error": str(exc)})
    progress.update(len(plate_table))
    return skipped


def pool_plate(plate_table: pd.DataFrame, tiles: PlateTiles, cfg: InferenceConfig) -> PlateResult:
    """Tiles -> sites -> wells with NaN-aware groupbys over the sites that could be read."""
    t0 = time.perf_counter()
    tile_emb, tile_valid, read_ok = tiles.tile_emb, tiles.tile_valid, tiles.read_ok
    well_keys = well_meta(plate_table)
    well_codes = plate_table.groupby(well_keys, sort=False, dropna=False).ngroup().to_numpy()
    rows = plate_table.index.to_numpy()
    ok = np.flatnonzero(read_ok)
    empty = np.zeros(0, dtype=np.float32)
    if tile_emb is None or len(ok) == 0:
        result = PlateResult(np.zeros(0, np.int64), empty.reshape(0, 0), np.zeros(0, np.int64),
                             np.zeros(0, np.int64), empty.reshape(0, 0), np.zeros(0, np.int64))
    else:
        tile_df, feats = _tile_frame(tile_emb[ok], ok, well_codes[ok])
        sites = aggregate_sites(tile_df, feats, ["site_code"], cfg.operation)
        if cfg.well_pool == "tiles":
            wells = aggregate_wells(tile_df, feats, ["well_code"], cfg.operation, count_column="n_valid_tiles")
        else:
            site_in = sites.assign(well_code=well_codes[sites["site_code"].to_numpy()])
            wells = aggregate_wells(site_in, feats, ["well_code"], cfg.operation, count_column="n_valid_tiles")
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


def _well_valid_tiles(valid: np.ndarray, well_codes: np.ndarray, order: np.ndarray) -> np.ndarray:
    counts = pd.Series(valid.sum(axis=1)).groupby(well_codes, sort=False).sum()
    return counts.loc[order].to_numpy(np.int64)


def well_meta(table: pd.DataFrame) -> list[str]:
    return [*WELL_META, *[c for c in OPTIONAL_METADATA if c in table.columns]]
