"""Single-cell crops (``--crop-mode cells``): one crop per nucleus, embedded, then pooled to sites and wells.

The input unit of DeepProfiler, Cell-DINO and the JUMP embedder. Per plate, ``embed_plate_cells`` reads whole sites
through the same pinned-buffer prefetcher as tiles, finds each site's nucleus centres (``data.locations``: a
location CSV, or ``data.segmentation.nucleus_centres`` on the site's DNA channel in ``--num_workers`` threads),
keeps the crops inside the image (``--edge-cells``) and at most ``--max-cells`` of them (a seeded choice per site),
cuts them on the device and embeds them in chunks (``embed_crops``: resized to ``--size``, standardised like
tiles). ``pool_plate_cells`` then pools cells into sites and wells with the same NaN-aware groupbys as tiles
(``--well-pool tiles`` pools every cell of the well), and the rest of the run (parts, merge, normalisation) is
the tiles path unchanged.

A site without cells follows ``--empty-sites``: ``drop`` leaves it out (a NaN site row, like a site without valid
tiles), ``center`` embeds one crop at the site's centre instead, the cell analogue of the paper's middle tile.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from data.locations import cap_cells, cell_corners, cut_crops, read_locations, site_locations_file
from data.prefetch import SitePrefetcher
from data.segmentation import nucleus_centres
from data.tiling import Region
from utils.errors import DataError
from utils.inference.config import InferenceConfig
from utils.inference.context import EmbedContext, embed_crops
from utils.inference.plates import PlateResult, batch_errors, probe_geometry, unreadable_plate, well_meta
from utils.profiles import aggregate_sites, aggregate_wells, embedding_names

CROPS_PER_SITE = 16  # crops per device call = --batch_size x this: a 1080 px site tiled at 224 px has 16 tiles
COUNT_COLUMN = "n_cells"


@dataclass
class PlateCells:
    """Cell embeddings of one plate before pooling: one row per crop, with its site and nucleus, and the counts."""

    cell_sites: np.ndarray  # (n,) position of the crop's site in the plate table
    cell_yx: np.ndarray  # (n, 2) nucleus centre (row, column) in site pixels
    cell_centre: np.ndarray  # (n,) True for the centre crop of a site without cells (--empty-sites center)
    cell_emb: np.ndarray | None  # (n, D) float32; None when no site could be read
    read_ok: np.ndarray
    no_cells: np.ndarray  # per site: read, but no cell left after the edge rule
    skipped: list[dict[str, str]]
    counts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class _CentreFinder:
    """Nucleus centres of the sites of a batch: location files read on the host, segmentation in its own threads
    (``--num_workers`` of them) on the batch's DNA channel, in ``--channels`` (file) order."""

    def __init__(self, cfg: InferenceConfig, height: int, width: int) -> None:
        self.cfg, self.height, self.width = cfg, height, width
        self.dna = list(cfg.channels).index("DNA")
        self.pool = ThreadPoolExecutor(max(1, cfg.num_workers), "nucleus-segmentation")
        self.from_files = self.segmented = 0
        self.segment_seconds = 0.0

    def __call__(self, rows: list[dict[str, Any]], pixels: torch.Tensor, slots: list[int]) -> list[np.ndarray]:
        files = [site_locations_file(row, self.cfg.locations) for row in rows]
        centres: list[np.ndarray | None] = [
            None if f is None else read_locations(f, self.height, self.width) for f in files]
        todo = [k for k, f in enumerate(files) if f is None]
        self.from_files += len(rows) - len(todo)
        if todo:
            t0 = time.perf_counter()
            dna = pixels[[slots[k] for k in todo], self.dna].cpu().numpy()  # one gather and one host copy per batch
            found = self.pool.map(lambda d: nucleus_centres(d[None], ("DNA",)), list(dna))
            for k, c in zip(todo, found):
                centres[k] = c
            self.segmented += len(todo)
            self.segment_seconds += time.perf_counter() - t0
        return [c for c in centres if c is not None]

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def embed_plate_cells(ctx: EmbedContext, plate_table: pd.DataFrame, cfg: InferenceConfig,
                      progress: tqdm) -> PlateCells:
    """Embed one crop per cell of every site of one plate; bad images raise or are skipped (``--skip_bad_images``)."""
    t0 = time.perf_counter()
    n_sites = len(plate_table)
    read_ok = np.zeros(n_sites, dtype=bool)
    no_cells = np.zeros(n_sites, dtype=bool)
    counts: dict[str, Any] = {"n_cells": 0, "n_cells_dropped_at_edges": 0, "n_cells_over_max": 0,
                              "n_sites_centre_crop": 0}
    geometry = probe_geometry(plate_table, cfg.channels)
    if geometry is None:
        skipped = unreadable_plate(plate_table, cfg, progress)
        empty = np.zeros(0, dtype=np.int64)
        return PlateCells(empty, np.zeros((0, 2)), np.zeros(0, bool), None, read_ok, no_cells, skipped, counts,
                          time.perf_counter() - t0)
    height, width = geometry
    size = int(cfg.crop_size)
    if cfg.edge_cells == "drop" and size > min(height, width):
        raise DataError(f"--crop-size {size} is larger than the {height}x{width} sites of plate "
                        f"{plate_table['plate'].iloc[0]}: every cell would be dropped at the edges")
    rows = plate_table.to_dict("records")
    loader = SitePrefetcher(plate_table, cfg.channels, Region(height, width, 0, 0, height, width), cfg.batch_size,
                            ctx.device, threads=cfg.num_workers)
    finder = _CentreFinder(cfg, height, width)
    chunk = cfg.batch_size * CROPS_PER_SITE
    skipped: list[dict[str, str]] = []
    sites_l, yx_l, centre_l, emb_l = [], [], [], []
    pending: torch.Tensor | None = None
    try:
        for batch in loader:
            skipped += batch_errors(batch, plate_table, cfg)
            read_ok[batch.positions] = batch.ok
            slots = [j for j in range(batch.count) if batch.ok[j]]
            positions = [int(batch.positions[j]) for j in slots]
            found = finder([rows[p] for p in positions], batch.pixels, slots)
            b_slot, b_corner = [], []
            for slot, pos, centres in zip(slots, positions, found):
                corners, kept, dropped = cell_corners(centres, size, height, width, cfg.edge_cells)
                row = rows[pos]
                pick = cap_cells(len(kept), cfg.max_cells, row.get("plate"), row.get("well"), row.get("field"))
                counts["n_cells_dropped_at_edges"] += dropped
                counts["n_cells_over_max"] += len(kept) - len(pick)
                counts["n_cells"] += len(pick)
                yx, is_centre = centres[kept[pick]], np.zeros(len(pick), dtype=bool)
                corners = corners[pick]
                if len(pick) == 0:
                    no_cells[pos] = True
                    if cfg.empty_sites == "center":
                        corners = np.array([[(height - size) // 2, (width - size) // 2]], dtype=np.int64)
                        yx, is_centre = (corners + size // 2).astype(np.float64), np.ones(1, dtype=bool)
                        counts["n_sites_centre_crop"] += 1
                b_slot += [slot] * len(corners)
                b_corner.append(corners)
                sites_l.append(np.full(len(corners), pos, dtype=np.int64))
                yx_l.append(yx)
                centre_l.append(is_centre)
            corners_all = np.concatenate(b_corner) if b_corner else np.zeros((0, 2), dtype=np.int64)
            for start in range(0, len(corners_all), chunk):
                crops = cut_crops(batch.pixels, b_slot[start : start + chunk], corners_all[start : start + chunk], size)
                count = len(crops)
                if cfg.compile and count < chunk:  # compiled graphs keep one batch shape, as for tiles
                    crops = torch.cat([crops, crops.new_zeros((chunk - count, *crops.shape[1:]))])
                emb = embed_crops(ctx, crops, cfg.size)[:count]
                if pending is not None:  # one chunk late: the device already has the next one queued
                    emb_l.append(pending.cpu().numpy())
                pending = emb
            progress.update(batch.count)
        if pending is not None:
            emb_l.append(pending.cpu().numpy())
    finally:
        finder.close()
    counts["n_sites_from_location_files"] = finder.from_files
    counts["n_sites_segmented"] = finder.segmented
    counts["segment_seconds"] = round(finder.segment_seconds, 3)
    cell_emb = np.concatenate(emb_l) if emb_l else None
    cat = (lambda parts, shape, dtype: np.concatenate(parts) if parts else np.zeros(shape, dtype=dtype))
    return PlateCells(cat(sites_l, (0,), np.int64), cat(yx_l, (0, 2), np.float64), cat(centre_l, (0,), bool),
                      cell_emb, read_ok, no_cells, skipped, counts, time.perf_counter() - t0)


def pool_plate_cells(plate_table: pd.DataFrame, cells: PlateCells, cfg: InferenceConfig) -> PlateResult:
    """Cells -> sites -> wells with NaN-aware groupbys; a read site without any crop is one NaN row."""
    t0 = time.perf_counter()
    well_codes = plate_table.groupby(well_meta(plate_table), sort=False, dropna=False).ngroup().to_numpy()
    rows = plate_table.index.to_numpy()
    empty = np.zeros(0, dtype=np.float32)
    result = PlateResult(np.zeros(0, np.int64), empty.reshape(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int64),
                         empty.reshape(0, 0), np.zeros(0, np.int64))
    if cells.cell_emb is not None or cells.read_ok.any():
        dim = cells.cell_emb.shape[1] if cells.cell_emb is not None else 0
        feats = embedding_names(dim)
        without = np.flatnonzero(cells.read_ok & ~np.isin(np.arange(len(rows)), cells.cell_sites))
        emb = cells.cell_emb if cells.cell_emb is not None else np.zeros((0, dim), np.float32)
        df = pd.DataFrame(np.concatenate([emb, np.full((len(without), dim), np.nan, np.float32)]), columns=feats)
        site_codes = np.concatenate([cells.cell_sites, without])
        order = np.argsort(site_codes, kind="stable")  # sites in table order, their cells in crop order
        df = df.iloc[order].reset_index(drop=True)
        site_codes = site_codes[order]
        df.insert(0, "well_code", well_codes[site_codes])
        df.insert(0, "site_code", site_codes)
        if dim and len(df):
            sites = aggregate_sites(df, feats, ["site_code"], cfg.operation, count_column=COUNT_COLUMN)
            source = df if cfg.well_pool == "tiles" else sites.assign(
                well_code=well_codes[sites["site_code"].to_numpy()])
            wells = aggregate_wells(source, feats, ["well_code"], cfg.operation, count_column=COUNT_COLUMN)
            first_row = pd.Series(rows).groupby(well_codes, sort=False).first()
            per_well = pd.Series(df[feats].notna().all(axis=1).to_numpy()).groupby(df["well_code"]).sum()
            result = PlateResult(
                site_rows=rows[sites["site_code"].to_numpy()],
                site_emb=sites[feats].to_numpy(np.float32),
                site_valid=sites[COUNT_COLUMN].to_numpy(np.int64),
                well_rows=first_row.loc[wells["well_code"].to_numpy()].to_numpy(np.int64),
                well_emb=wells[feats].to_numpy(np.float32),
                well_valid=per_well.loc[wells["well_code"].to_numpy()].to_numpy(np.int64),
            )
        if cfg.save_cells and cells.cell_emb is not None:
            result.cell_rows = rows[cells.cell_sites]
            result.cell_yx = cells.cell_yx
            result.cell_emb = cells.cell_emb
            result.cell_centre = cells.cell_centre
    result.report = {
        "plate": str(plate_table["plate"].iloc[0]),
        "n_sites": int(len(plate_table)),
        "n_sites_read": int(cells.read_ok.sum()),
        "crop_mode": "cells",
        "crop_size": int(cfg.crop_size),
        **cells.counts,
        "n_sites_without_cells": int((cells.no_cells & cells.read_ok).sum()),
        "n_wells": int(len(result.well_rows)),
        "skipped_files": cells.skipped,
        "embed_seconds": round(cells.seconds, 3),
        "pool_seconds": round(time.perf_counter() - t0, 3),
    }
    return result
