"""What inference writes: plates merged into one well table, normalised per method, consensus profiles, the
tables (CSV and optional parquet), staged in the run's transaction (``utils.rundir``) and committed with ``run.json``
last."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from data.schema import OPTIONAL_METADATA
from utils.errors import DataError
from utils.fileio import atomic_path, write_csv_atomic
from utils.inference.config import ALL_METHODS, InferenceConfig
from utils.inference.plates import SITE_META, PlateResult, well_meta
from utils.profiles import NORM_METHODS, consensus, embedding_names, feature_columns, normalize_profiles
from utils.rundir import Transaction

FINAL_FILES = ("well_features", "agg_features", "site_features", "cell_features")
CELL_FILE = "cell_features.parquet"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "timm", "numpy", "pandas", "pycytominer", "harmonypy", "tifffile", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def final_names() -> list[str]:
    """Every final file an inference run can write, relative to its folder: an earlier run's ones this run does not
    remake are removed when it commits, so the folder never mixes two runs."""
    names = ["run.json", CELL_FILE]
    for folder in ["", *(f"{m}/" for m in NORM_METHODS)]:
        names += [f"{folder}{name}.{ext}" for name in FINAL_FILES for ext in ("csv", "parquet")]
    return names


def write_table(df: pd.DataFrame, tx: Transaction, rel: str, parquet: bool) -> list[str]:
    """Stage ``<rel>.csv`` (and ``<rel>.parquet``) in the run's transaction; returns the final paths."""
    write_csv_atomic(df, tx.path(f"{rel}.csv"))
    written = [str(tx.folder / f"{rel}.csv")]
    if parquet:
        with atomic_path(tx.path(f"{rel}.parquet")) as tmp:
            df.to_parquet(tmp, index=False)
        written.append(str(tx.folder / f"{rel}.parquet"))
    return written


def merge_plates(table: pd.DataFrame, results: list[PlateResult], dim: int,
                 count_column: str = "n_valid_tiles") -> tuple[pd.DataFrame, pd.DataFrame]:
    """One well table and one site table (with ``count_column``: valid tiles, or cells) from the plates' parts."""
    feats = embedding_names(dim)
    wmeta, site_meta = well_meta(table), [*SITE_META, *[c for c in OPTIONAL_METADATA if c in table.columns]]
    wells, sites = [], []
    for r in results:
        if len(r.well_rows):
            w = table.loc[r.well_rows, wmeta].reset_index(drop=True)
            wells.append(pd.concat([w, pd.DataFrame(r.well_emb, columns=feats)], axis=1))
            if len(r.site_rows):
                s = table.loc[r.site_rows, site_meta].reset_index(drop=True)
                s.insert(len(site_meta), count_column, r.site_valid)
                sites.append(pd.concat([s, pd.DataFrame(r.site_emb, columns=feats)], axis=1))
    if not wells:
        raise DataError("no site could be embedded: every image was skipped")
    return pd.concat(wells, ignore_index=True), pd.concat(sites, ignore_index=True) if sites else pd.DataFrame()


def write_cells(table: pd.DataFrame, results: Iterable[PlateResult | None], path: Path) -> int:
    """Stream every plate's per-cell embeddings into one parquet file (atomic), one row group per plate.

    Columns: the site metadata, ``x`` and ``y`` (the nucleus centre: column and row in site pixels), ``site_centre``
    (True for the centre crop of a site without cells under ``--empty-sites center``) and ``emb0..``. Plates are
    read one at a time, so memory holds one plate's cells, not the run's. Returns the number of rows written.
    """
    import pyarrow as pa  # lazy: only --save-cells streams parquet, and the training probe imports this module
    import pyarrow.parquet as pq  # lazy: as above

    meta = [*SITE_META, *[c for c in OPTIONAL_METADATA if c in table.columns]]
    text = [c for c in meta if c != "field"]
    writer, rows = None, 0
    with atomic_path(path) as tmp:
        try:
            for r in results:
                if r is None or r.cell_emb is None or not len(r.cell_rows):
                    continue
                df = table.loc[r.cell_rows, meta].reset_index(drop=True)
                df[text] = df[text].astype("string")  # one arrow type whatever a plate's values (all-NA included)
                df["x"], df["y"] = r.cell_yx[:, 1], r.cell_yx[:, 0]
                df["site_centre"] = r.cell_centre.astype(bool)
                df = pd.concat([df, pd.DataFrame(r.cell_emb, columns=embedding_names(r.cell_emb.shape[1]))], axis=1)
                batch = pa.Table.from_pandas(df, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_table(batch.cast(writer.schema))
                rows += len(df)
            if writer is None:  # no cell anywhere: an empty table with the metadata and position columns
                empty = table.iloc[:0][meta].assign(x=pd.Series(dtype=float), y=pd.Series(dtype=float),
                                                    site_centre=pd.Series(dtype=bool))
                empty[text] = empty[text].astype("string")
                pq.write_table(pa.Table.from_pandas(empty, preserve_index=False), tmp)
        finally:
            if writer is not None:
                writer.close()
    return rows


def normalise_wells(
    wells: pd.DataFrame, feats: list[str], meta: list[str], method: str, control_query: str, cfg: InferenceConfig,
    records: list[dict[str, Any]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """One normalisation chain with the run's scope, MAD reference, batch key and L2 flag (inference and the
    training probe); ``records`` receives one record per step for run.json."""
    return normalize_profiles(wells, feats, meta, method, control_query, scope=cfg.norm_scope,
                              mad_reference=cfg.mad_reference, l2norm=cfg.l2norm, batch_key=cfg.batch_key,
                              records=records)


def drop_empty_wells(wells: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Wells whose every tile was invalid (all-NaN features) leave the table; returns the rest and who left."""
    feats = feature_columns(wells)
    nan_wells = wells[feats].isna().all(axis=1)
    dropped = wells.loc[nan_wells, ["batch", "plate", "well"]].to_dict("records")
    return wells.loc[~nan_wells].reset_index(drop=True), dropped


def write_profiles(
    wells: pd.DataFrame, cfg: InferenceConfig, control_query: str, tx: Transaction
) -> tuple[dict[str, int], list[str], dict[str, list[dict[str, Any]]]]:
    """Normalise the wells with each requested method and stage agg_features and well_features; returns the
    number of features each method kept, the files written, and each method's step records."""
    feats = feature_columns(wells)
    meta = [c for c in wells.columns if c not in feats]
    methods = cfg.methods
    kept_counts: dict[str, int] = {}
    written: list[str] = []
    steps: dict[str, list[dict[str, Any]]] = {}
    for method in tqdm(methods, desc="normalise", unit="method", disable=len(methods) == 1, leave=False):
        folder = f"{method}/" if cfg.norm_method == ALL_METHODS else ""
        steps[method] = []
        norm, kept = normalise_wells(wells, feats, meta, method, control_query, cfg, steps[method])
        agg = consensus(norm, kept, ["perturbation_id"], cfg.operation,
                        carry=("target", "control_type", "gene_group"))
        written += write_table(agg, tx, f"{folder}agg_features", cfg.parquet)
        written += write_table(norm, tx, f"{folder}well_features", cfg.parquet)
        kept_counts[method] = len(kept)
    return kept_counts, written, steps
