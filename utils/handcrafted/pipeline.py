"""The handcrafted pipeline end to end: site table -> per-site features (in parallel) -> clean, normalised wells.

``run`` is the one entry point below the CLI; it reads a ``HandcraftedConfig`` and writes ``well_features.csv``
(metadata + ``Cells_``/``Nuclei_``/``Cytoplasm_`` features), ``site_features.csv`` (raw site medians) and
``run.json`` (counts, what was dropped and why, the settings and the package versions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

import pandas as pd
from tqdm import tqdm

from data.io import read_site
from data.schema import INFERENCE_REQUIRED, load_site_table
from data.segmentation import SegmentationParams, segment
from utils.errors import DataError
from utils.fileio import write_csv_atomic
from utils.handcrafted.config import HandcraftedConfig
from utils.handcrafted.measure import COUNT_COLUMN, MeasureOptions, measure_site, site_profile
from utils.handcrafted.profiles import (
    WELL_METADATA,
    aggregate,
    chain_selects_features,
    drop_incomplete,
    limit_sites,
    normalize,
    select_features,
)
from utils.profiles.features import feature_columns
from utils.rundir import Transaction, output_run

OUTPUTS: tuple[str, ...] = ("site_features.csv", "well_features.csv", "run.json")


@dataclass(frozen=True)
class SiteJob:
    """Everything a worker needs for one site (picklable)."""

    row: dict[str, Any]
    channels: tuple[str, ...]
    params: SegmentationParams
    options: MeasureOptions
    operation: str


def process_site(job: SiteJob) -> dict[str, float]:
    """Read, segment and measure one site; runs in a worker process."""
    pixels, _ = read_site(job.row, job.channels)
    seg = segment(pixels, job.channels, job.params)
    return site_profile(measure_site(seg, pixels, job.channels, job.options), job.operation)


def compute_site_features(table: pd.DataFrame, channels: Sequence[str], params: SegmentationParams,
                          options: MeasureOptions, operation: str = "median", workers: int = 1) -> pd.DataFrame:
    """One feature row per site of ``table`` (same order), in parallel over sites."""
    jobs = [SiteJob(row, tuple(channels), params, options, operation) for row in table.to_dict("records")]
    rows: list[dict[str, float]] = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = pool.map(process_site, jobs, chunksize=1) if pool else map(process_site, jobs)
        with tqdm(total=len(jobs), desc="sites", unit="site", dynamic_ncols=True) as bar:
            for row in results:
                rows.append(row)
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad site stops the run without finishing the queue
    features = pd.DataFrame(rows)
    meta = [c for c in (*WELL_METADATA[:3], "field", *WELL_METADATA[3:]) if c in table.columns]
    return pd.concat([table[meta].reset_index(drop=True), features], axis=1)


def run(cfg: HandcraftedConfig) -> dict[str, Any]:
    """Run the whole handcrafted baseline and return the summary it writes to run.json.

    The output folder is locked for the run, and the CSVs and run.json are staged and swapped in together once
    every stage has succeeded (``utils.rundir``): a failed rerun leaves the earlier complete results untouched.

    Parameters
    ----------
    cfg:
        The run's settings (validated on construction): the site table, the output folder, segmentation,
        measurement, aggregation, normalisation and feature selection.

    Returns
    -------
    dict
        Counts (sites, wells, objects, features measured and kept), what was dropped, the normalisation report,
        the settings (``args`` is ``dataclasses.asdict(cfg)``), package versions and the wall time in seconds.
    """
    start = time.time()
    table = load_site_table(cfg.valset, image_root=cfg.image_root, channels=cfg.channel_names,
                            required=INFERENCE_REQUIRED, platemap=cfg.platemap, column_map=cfg.column_map)
    table = limit_sites(table, cfg.max_sites_per_well)
    with output_run(cfg.output_dir) as tx:
        return measure_and_commit(cfg, table, tx, start)


def measure_and_commit(cfg: HandcraftedConfig, table: pd.DataFrame, tx: Transaction, start: float) -> dict[str, Any]:
    """Measure, aggregate, normalise and select, staging the tables in ``tx``; commit with run.json last."""
    channels, params, options, select = cfg.channel_names, cfg.segmentation, cfg.measurement, cfg.select_operations
    sites = compute_site_features(table, channels, params, options, cfg.site_operation, cfg.workers)
    wells, clean_report = drop_incomplete(aggregate(sites, cfg.well_operation))
    normalised, norm_report = normalize(wells, cfg.norm_method, cfg.control_query, cfg.controls, cfg.batch_key)
    if chain_selects_features(cfg.norm_method):  # the chain selected features where it wanted them
        select = ()
    selected = select_features(normalised, select, cfg.corr_threshold)
    if not feature_columns(selected):
        raise DataError("feature selection removed every feature; try --feature_select none or fewer operations")
    write_csv_atomic(sites, tx.path("site_features.csv"))
    write_csv_atomic(selected, tx.path("well_features.csv"))
    summary = {
        "n_sites": len(sites), "n_wells": len(selected), "n_objects": int(sites[COUNT_COLUMN].sum()),
        "n_features_measured": len(feature_columns(wells)), "n_features": len(feature_columns(selected)),
        "empty_sites": int((sites[COUNT_COLUMN] == 0).sum()), **clean_report, "normalisation": norm_report,
        "feature_select": list(select) if select or not chain_selects_features(cfg.norm_method)
        else "in the normalisation chain", "segmentation": asdict(params), "measurement": asdict(options),
        "site_operation": cfg.site_operation, "well_operation": cfg.well_operation,
        "args": asdict(cfg), "versions": {p: metadata.version(p) for p in ("cp-measure", "pycytominer")},
        "seconds": round(time.time() - start, 2),
    }
    tx.commit(summary, stale=OUTPUTS)
    return summary
