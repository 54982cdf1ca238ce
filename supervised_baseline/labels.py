"""Compound bioactivity labels as one table: one row per compound, one column per assay, values 1.0 (active),
0.0 (inactive) or NaN (unknown).

Read from a CSV (``perturbation_id`` or an alias, then one column per assay; a site or well table with
``label_<assay>`` columns, such as the synthetic plates' dataset.csv, works too) or from the paper's label matrix
(``.npy`` or Matrix Market ``.mtx`` with a row-index file). Two value conventions exist: ours (1 / 0 / empty) and the
paper's (+1 active, -1 inactive, 0 unknown). A CSV holding any -1 is read with the paper's convention; matrices
always are.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse

from data.metadata import check_unique_header
from data.schema import ALIASES
from utils.errors import DataError

ID_COLUMN = "perturbation_id"
LABEL_PREFIX = "label_"
# compound id columns recognised in labels and feature tables, in order of preference
ID_ALIASES: tuple[str, ...] = (ID_COLUMN, *ALIASES.get(ID_COLUMN, ()), "Metadata_broad_sample", "Metadata_InChIKey",
                               "INCHIKEY", "inchikey", "compound")
METADATA = {"batch", "plate", "well", "field", "target", "control_type", "gene_group", "FileName_Merged", "Otsu_th",
            "layout"}


def find_id_column(columns: Sequence[str], source: str, explicit: str | None = None) -> str:
    """The compound column of a table: ``explicit`` when given, else the first known alias present."""
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"{source}: no column {explicit!r} (data.id_column)")
        return explicit
    for name in ID_ALIASES:
        if name in columns:
            return name
    raise DataError(f"{source}: no compound column (expected one of {', '.join(ID_ALIASES[:4])}, ...; "
                    "or set data.id_column)")


def id_dtypes(explicit: str | None = None) -> dict[str, type]:
    """Read every candidate compound column as text, so numeric ids with a blank cell stay '1', never '1.0'."""
    return {name: str for name in (*ID_ALIASES, *([explicit] if explicit else []))}


def _paper_values(values: np.ndarray) -> np.ndarray:
    """+1 / -1 / 0 (unknown) -> 1 / 0 / NaN."""
    out = np.full(values.shape, np.nan)
    out[values > 0] = 1.0
    out[values < 0] = 0.0
    return out


def _row_ids(path: Path, n: int) -> list[str]:
    """Compound ids of a matrix's rows: one per line, or the id column of a CSV."""
    if path.suffix.lower() == ".csv":
        table = pd.read_csv(path, dtype=str)
        ids = table[find_id_column(list(table.columns), str(path))].tolist()
    else:
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(ids) != n:
        raise DataError(f"{path}: {len(ids)} row ids for a label matrix of {n} rows")
    return [str(i) for i in ids]


def read_matrix(path: Path, index: Path | None, names: Path | None) -> pd.DataFrame:
    """The paper's label matrix (.npy dense or .mtx sparse, +1/-1/0) with its row ids, as a label table."""
    if index is None:
        raise DataError(f"{path}: a .npy/.mtx label matrix needs data.label_index (one compound id per row)")
    try:
        if path.suffix.lower() == ".mtx":
            matrix = scipy.io.mmread(str(path))
            dense = matrix.toarray() if scipy.sparse.issparse(matrix) else np.asarray(matrix)
        else:
            dense = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable label matrix ({exc})") from None
    if dense.ndim != 2:
        raise DataError(f"{path}: label matrix must be 2-D (compounds x assays), got shape {dense.shape}")
    assays = ([line.strip() for line in names.read_text().splitlines() if line.strip()] if names
              else [f"assay{j:03d}" for j in range(dense.shape[1])])
    if len(assays) != dense.shape[1]:
        raise DataError(f"{names}: {len(assays)} assay names for {dense.shape[1]} columns")
    table = pd.DataFrame(_paper_values(dense.astype(np.float64)), columns=assays)
    table.index = pd.Index(_row_ids(index, dense.shape[0]), name=ID_COLUMN)
    return table


def read_table(path: Path, what: str, id_column: str | None = None) -> tuple[pd.DataFrame, str]:
    """A CSV with a compound column (ids read as text), and that column's name; duplicated headers are an error
    (pandas would silently rename them ``x.1``)."""
    check_unique_header(path, what)
    try:
        table = pd.read_csv(path, low_memory=False, dtype=id_dtypes(id_column))
    except (OSError, ValueError, csv.Error) as exc:
        raise DataError(f"{path}: unreadable {what} ({exc})") from None
    return table, find_id_column(list(table.columns), str(path), id_column)


def read_csv_labels(path: Path, id_column: str | None = None) -> pd.DataFrame:
    """A labels CSV (or a site/well table with ``label_*`` columns) as a label table, one row per compound."""
    raw, ident = read_table(path, "labels table", id_column)
    prefixed = [c for c in raw.columns if str(c).startswith(LABEL_PREFIX)]
    assays = prefixed or [c for c in raw.columns if c != ident and c not in METADATA and c not in ID_ALIASES]
    if not assays:
        raise DataError(f"{path}: no assay columns besides {ident!r}")
    values = raw[assays].apply(pd.to_numeric, errors="coerce")
    bad = raw[assays].notna() & values.isna()
    if bad.to_numpy().any():
        col = assays[int(np.flatnonzero(bad.to_numpy().any(axis=0))[0])]
        raise DataError(f"{path}: assay column {col!r} holds a non-numeric label")
    paper = bool((values < 0).to_numpy().any())
    arr = values.to_numpy(np.float64)
    arr = _paper_values(np.nan_to_num(arr, nan=0.0)) if paper else arr
    if not paper and not np.isin(arr[~np.isnan(arr)], (0.0, 1.0)).all():
        raise DataError(f"{path}: labels must be 1, 0 or empty (or the paper's +1/-1/0)")
    table = pd.DataFrame(arr, columns=[str(c)[len(LABEL_PREFIX):] if prefixed else str(c) for c in assays])
    table.insert(0, ID_COLUMN, raw[ident].astype(str).to_numpy())
    table = table[raw[ident].notna().to_numpy()]
    return _one_row_per_compound(table, path)


def _one_row_per_compound(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Collapse repeated compound rows (site tables repeat them); rows that disagree on an assay are an error."""
    grouped = table.groupby(ID_COLUMN, sort=True)
    lo, hi = grouped.min(), grouped.max()
    clash = (lo != hi) & lo.notna()
    if clash.to_numpy().any():
        cpd, assay = clash.stack()[clash.stack()].index[0]
        raise DataError(f"{path}: compound {cpd!r} has conflicting labels for assay {assay!r}")
    return lo


def read_labels(path: str | Path, id_column: str | None = None, index: str | None = None,
                names: str | None = None) -> pd.DataFrame:
    """The label table of ``data.labels``: index = compound id, one float column per assay (1 / 0 / NaN)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.labels {path}: no such file")
    if path.suffix.lower() in (".npy", ".mtx"):
        table = read_matrix(path, Path(index) if index else None, Path(names) if names else None)
    else:
        table = read_csv_labels(path, id_column)
    table = table.loc[:, table.notna().any(axis=0)]
    if table.shape[1] == 0:
        raise DataError(f"data.labels {path}: no assay has a single label")
    return table
