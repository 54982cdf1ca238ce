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
   empty sites/wells, per-plate reports and timings). The final files are staged and swapped in together at the end
   (``utils.rundir``): a failed or refused run leaves an earlier run's complete results untouched, and
   ``<outdir>/.lock`` keeps a second run out of the folder while this one runs.

Modules: ``config`` (InferenceConfig, the flags), ``context`` (backbone and device step), ``plates`` (embed and pool
one plate), ``cells`` (the same for ``--crop-mode cells``: one crop per nucleus), ``parts`` (per-plate results on
disk, resume), ``outputs`` (merge, normalise, write), ``pipeline`` (this flow). From Python:
``run_inference(InferenceConfig(ckpt=..., valset=..., outdir=...))``.

Conventions: metadata columns keep the paper's names (batch, plate, well, perturbation_id, target, plus control_type
and gene_group when the CSV has them); features are ``emb0..emb{D-1}`` unpadded, like the paper's inference, so its
evaluation code reads them; no index column. ``--l2norm`` scales each well profile to unit L2 norm (the paper
scaled feature columns, a bug). Sites with no valid tile: by default (``--empty-sites drop``) they contribute
nothing and a well left without any valid tile gets no row; both are counted in run.json and warned about.
``--empty-sites center`` applies the paper's rule instead (such a site uses its middle tile).
"""

from __future__ import annotations

import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import torch.distributed as dist
from tqdm import tqdm

from data.locations import check_location_files
from data.schema import INFERENCE_REQUIRED, load_site_table
from utils.distributed import DistInfo, claim_output
from utils.errors import ConfigError, DataError
from utils.inference.cells import COUNT_COLUMN as CELL_COUNT
from utils.inference.cells import embed_plate_cells, pool_plate_cells
from utils.inference.config import ALL_METHODS, IN_MEMORY, InferenceConfig
from utils.inference.context import EmbedContext, load_context, resolve_device
from utils.inference.outputs import (
    CELL_FILE,
    drop_empty_wells,
    final_names,
    merge_plates,
    normalise_wells,
    versions,
    write_cells,
    write_profiles,
    write_table,
)
from utils.inference.parts import PARTS_DIR, check_resumed, load_part, part_name, pool_and_save
from utils.inference.plates import PlateResult, assign_plates, embed_plate, plate_signature, pool_plate
from utils.profiles import feature_columns, resolve_control_query
from utils.rundir import Transaction, recover_and_report


def run_inference(cfg: InferenceConfig) -> Path | None:
    """Embed every site of ``cfg.valset`` and write normalised well and perturbation profiles to ``cfg.outdir``.

    Parameters
    ----------
    cfg:
        The run's settings (``InferenceConfig.from_flags`` for the command line); validated when built.

    Returns the output folder on rank 0 and None on the other ranks of a torchrun job.
    """
    if cfg.ckpt == IN_MEMORY:
        raise ConfigError("run_inference embeds a checkpoint file: give --ckpt")
    t_start = time.perf_counter()
    dist_info = resolve_device(cfg)
    outdir = Path(cfg.outdir)
    table = load_site_table(cfg.valset, cfg.image_root, cfg.channels, required=INFERENCE_REQUIRED,
                            check_files=not cfg.skip_bad_images, platemap=cfg.platemap, column_map=cfg.column_map)
    if cfg.crop_mode == "cells":
        check_location_files(table, cfg.locations)  # a missing file fails now, not at its plate hours later
    lock = claim_output(outdir, dist_info)  # rank 0 holds it; every rank stops when another run does
    try:
        if dist_info.is_main:
            recover_and_report(outdir)
        return embed_and_write(cfg, dist_info, table, outdir, t_start)
    finally:
        if lock is not None:
            lock.release()


def embed_and_write(
    cfg: InferenceConfig, dist_info: DistInfo, table: pd.DataFrame, outdir: Path, t_start: float
) -> Path | None:
    """Embed this rank's plates into ``parts/`` (skipping finished ones under --resume); rank 0 then writes."""
    parts = outdir / PARTS_DIR
    ctx, loaded = load_context(cfg, dist_info)
    embed = embed_plate_cells if cfg.crop_mode == "cells" else embed_plate
    sizes = table.groupby("plate", sort=False).size().to_dict()
    mine = assign_plates(sizes, dist_info.world_size)[dist_info.rank]
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
            fingerprint = {**ctx.fingerprint, "sites": plate_signature(plate_table, cfg.channels)}
            if cfg.resume:
                found = load_part(parts, plate, arrays=False)
                if found is not None:
                    check_resumed(found[1], fingerprint, parts / f"{part_name(plate)}.json")
                    resumed.append(plate)
                    progress.update(len(plate_table))
                    continue
            for done in [f for f in saving if f.done()]:
                done.result()  # surface a pooling error now rather than after every plate is embedded
            tiles = embed(ctx, plate_table, cfg, progress)
            saving.append(finisher.submit(pool_and_save, parts, plate_table, tiles, cfg, fingerprint,
                                          dist_info.rank))
        for f in saving:
            f.result()
    embed_seconds = time.perf_counter() - t_embed
    if dist_info.distributed:
        gathered: list[Any] = [None] * dist_info.world_size
        dist.all_gather_object(gathered, {"resumed": resumed, "embed_seconds": embed_seconds})
        dist.barrier()
    else:
        gathered = [{"resumed": resumed, "embed_seconds": embed_seconds}]
    if not dist_info.is_main:
        return None
    return write_run(cfg, table, outdir, parts, ctx, loaded, dist_info, gathered, t_start)


def load_plates(table: pd.DataFrame, parts: Path, with_sites: bool) -> tuple[list[PlateResult], list[dict[str, Any]]]:
    """Every plate's finished part, in table order, with its report; a missing part is an error."""
    results, reports = [], []
    for plate in table["plate"].drop_duplicates():
        found = load_part(parts, plate, sites=with_sites)
        if found is None:
            raise DataError(f"{parts}: intermediate result of plate {plate!r} is missing; rerun with --resume")
        results.append(found[0])
        reports.append(found[1]["report"])
    return results, reports


def write_run(
    cfg: InferenceConfig,
    table: pd.DataFrame,
    outdir: Path,
    parts: Path,
    ctx: EmbedContext,
    loaded: Any,
    dist_info: DistInfo,
    gathered: list[dict[str, Any]],
    t_start: float,
) -> Path:
    """Rank 0: merge the plate parts, normalise, and stage every final table, then swap them in with run.json last;
    nothing of an earlier run in ``outdir`` changes before every new table is written, and a failure anywhere
    leaves the previous run's complete results as they were."""
    with Transaction(outdir) as tx:
        t_post = time.perf_counter()
        results, reports = load_plates(table, parts, cfg.save_sites)
        dims = {r.well_emb.shape[1] for r in results if len(r.well_rows)}
        if len(dims) > 1:
            raise DataError(f"{parts}: plates have different embedding sizes {sorted(dims)}; rerun without --resume")
        cells = cfg.crop_mode == "cells"
        unit = "cell" if cells else "valid tile"
        wells, sites = merge_plates(table, results, dims.pop() if dims else 0, CELL_COUNT if cells else "n_valid_tiles")
        wells, dropped = drop_empty_wells(wells)
        feats = feature_columns(wells)
        if dropped:
            warnings.warn(f"{len(dropped)} well(s) have no {unit} and are left out (listed in run.json)",
                          RuntimeWarning, stacklevel=2)
        skipped = [s for rep in reports for s in rep["skipped_files"]]
        empty_sites = sum(rep["n_sites_without_cells" if cells else "n_sites_without_valid_tiles"] for rep in reports)
        if empty_sites:
            middle = "their centre crop" if cells else "their middle tile"
            rule = "left out" if cfg.empty_sites == "drop" else f"{middle} is used (--empty-sites center)"
            warnings.warn(f"{empty_sites} site(s) have no {unit}: {rule}; counts per plate in run.json",
                          RuntimeWarning, stacklevel=2)
        control_query = resolve_control_query(wells, cfg.controls, cfg.control_query)
        written = []
        if cfg.save_sites:
            written += write_table(sites, tx, "site_features", cfg.parquet)
        kept, written_norm, norm_steps = write_profiles(wells, cfg, control_query, tx)
        written += written_norm
        if cfg.save_cells:
            plates = table["plate"].drop_duplicates()
            write_cells(table, (load_part(parts, p, sites=False, cells=True)[0] for p in plates), tx.path(CELL_FILE))
            written.append(str(outdir / CELL_FILE))
        n_sites = int(sum(rep["n_sites_read"] for rep in reports))
        resumed = {p for g in gathered for p in g["resumed"]}
        embedded = int(sum(rep["n_sites_read"] for rep in reports if rep["plate"] not in resumed))
        embed_seconds = max(g["embed_seconds"] for g in gathered)
        total = time.perf_counter() - t_start
        run = {
            "status": "complete",
            "checkpoint": {"path": str(Path(cfg.ckpt).resolve()), "sha256": ctx.fingerprint["checkpoint_sha256"],
                           "info": getattr(loaded, "info", {})},
            "flags": cfg.flags(),
            "settings": ctx.fingerprint,
            "control_query": control_query,
            "versions": versions(),
            "device": str(dist_info.device),
            "world_size": dist_info.world_size,
            "command": sys.argv,
            "n_sites": n_sites,
            "n_wells": int(len(wells)),
            "n_features": len(feats),
            "features_kept": kept,
            "normalisation": norm_steps,
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
        if cells:
            run = cell_report(run, reports)
        tx.commit(run, stale=final_names())
        rate = f"{embedded / embed_seconds:.1f} sites/s" if embedded else "all plates resumed"
        counted = ""
        if cells:
            c = run["cells"]
            counted = (f" from {c['n_cells']} cells ({c['n_cells_dropped_at_edges']} dropped at edges, "
                       f"{c['n_sites_without_cells']} sites without cells)")
        print(f"inference: {n_sites} sites{counted} -> {len(wells)} wells ({cfg.norm_method}), {len(skipped)} skipped, "
              f"{rate}, {total:.1f} s total -> {outdir}", flush=True)
        return outdir


def cell_report(run: dict[str, Any], reports: list[dict[str, Any]]) -> dict[str, Any]:
    """run.json of a cell-mode run: tile counts renamed for cells, and the run's cell totals in ``cells``."""
    keys = ("n_cells", "n_cells_dropped_at_edges", "n_cells_over_max", "n_sites_without_cells", "n_sites_centre_crop",
            "n_sites_from_location_files", "n_sites_segmented", "segment_seconds")
    totals: dict[str, Any] = {k: sum(rep.get(k, 0) for rep in reports) for k in keys}
    totals["segment_seconds"] = round(totals["segment_seconds"], 3)
    totals["cells_per_site"] = round(totals["n_cells"] / run["n_sites"], 2) if run["n_sites"] else None
    renamed = {"n_sites_without_valid_tiles": "n_sites_without_cells",
               "wells_without_valid_tiles": "wells_without_cells"}
    out = {renamed.get(k, k): v for k, v in run.items()}
    out["n_sites_without_cells"] = totals["n_sites_without_cells"]
    out["cells"] = totals
    return out


def embed_profiles(
    ctx: EmbedContext, table: pd.DataFrame, cfg: InferenceConfig, progress: tqdm | None = None,
) -> pd.DataFrame:
    """Every plate of ``table`` -> tiles -> wells -> one normalisation method, in memory (no parts, no files).

    The training probe embeds its held-out plate with this, so it sees exactly what ``inference.py`` would write
    to ``well_features.csv`` for the same weights and flags.

    Parameters
    ----------
    ctx:
        The embedding context (``load_context`` for a checkpoint, ``make_context`` around a live model).
    table:
        The validated site table (``data.schema.load_site_table``).
    cfg:
        Tiling, pooling and normalisation settings; ``norm_method`` must name one method, not ``all``.
    progress:
        A tqdm bar to advance per site (none by default).
    """
    if cfg.norm_method == ALL_METHODS:
        raise ConfigError("embed_profiles needs one --norm_method, not 'all'")
    bar = progress if progress is not None else tqdm(total=len(table), disable=True)
    embed, pool = (embed_plate_cells, pool_plate_cells) if cfg.crop_mode == "cells" else (embed_plate, pool_plate)
    results = [pool(plate_table, embed(ctx, plate_table, cfg, bar), cfg)
               for _, plate_table in table.groupby("plate", sort=False)]
    dims = {r.well_emb.shape[1] for r in results if len(r.well_rows)}
    wells, _ = merge_plates(table, results, dims.pop() if dims else 0)
    wells, _ = drop_empty_wells(wells)
    if wells.empty:
        raise DataError("no well has a valid tile (no cells found by the cell rule)")
    feats = feature_columns(wells)
    meta = [c for c in wells.columns if c not in feats]
    control_query = resolve_control_query(wells, cfg.controls, cfg.control_query)
    norm, _ = normalise_wells(wells, feats, meta, cfg.norm_method, control_query, cfg)
    return norm
