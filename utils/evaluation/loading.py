"""Find the representation folders, read their well tables, and reject what would give wrong numbers.

Every check happens here, before any metric runs, so a bad table fails with the file, column and row to fix rather
than as a NaN (or a wrong number) in the results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.metadata import apply_column_map as apply_explicit_map
from utils.errors import DataError
from utils.evaluation.config import METADATA_PRESETS, EvalConfig
from utils.profiles.features import detect_features

WELL_FILES = ("well_features.csv", "well_features.csv.gz", "well_features.parquet")
SKIP_DIRS = {"figures"}


@dataclass
class Representation:
    """One folder's wells: metadata (paper names), feature matrix, and which feature set it uses."""

    name: str
    path: Path
    meta: pd.DataFrame
    x: np.ndarray
    features: list[str]
    kind: str


def discover_representations(root: Path) -> list[tuple[str, Path]]:
    """Every subfolder except figures/ and hidden ones must hold a well_features.csv; say which does not."""
    if not root.is_dir():
        raise DataError(f"{root}: input directory does not exist (check -b/--basedir and -i/--input)")
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name in SKIP_DIRS or sub.name.startswith("."):
            continue
        files = [sub / f for f in WELL_FILES if (sub / f).is_file()]
        if not files:
            raise DataError(f"{sub}: no well_features.csv (every folder in {root} except figures/ is a representation)")
        found.append((sub.name, files[0]))
    if not found:
        raise DataError(f"{root}: no representation folders with a well_features.csv")
    return found


def apply_column_map(df: pd.DataFrame, mapping: Mapping[str, str], preset: str, source: str) -> pd.DataFrame:
    """Copy CellProfiler/pycytominer metadata columns onto the paper's names (explicit map first, then preset).

    ``preset`` is a key of METADATA_PRESETS (EvalConfig checks it). Columns are copied, not renamed, so the
    original names stay available to --replicate-diffby.
    """
    df = apply_explicit_map(df, tuple(mapping.items()), source).copy()
    for src, dst in METADATA_PRESETS[preset].items():
        if src in df.columns and dst not in df.columns:
            df[dst] = df[src]
    return df


def required_columns(cfg: EvalConfig) -> list[str]:
    """perturbation_id, batch and well (plus control_type for ORF sets); the label column is optional, since most
    real plates annotate no target: without it the label-level metrics are skipped, with a note."""
    cols = ["perturbation_id", "batch", "well"]
    return cols + ["control_type"] if cfg.orf else cols


def load_representation(name: str, path: Path, cfg: EvalConfig) -> Representation:
    """Read one well table, map metadata names, pick features, and reject what would give wrong numbers."""
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed: ")])
    df = apply_column_map(df, cfg.column_map, cfg.metadata_preset, str(path))
    return representation_from_frame(name, df, cfg, path)


def representation_from_frame(name: str, df: pd.DataFrame, cfg: EvalConfig, path: Path) -> Representation:
    """Check an in-memory well table (paper metadata names) and split it into metadata and features.

    ``load_representation`` reads files through this, and the training probe hands it the frame it embedded, so
    both are checked and scored by the same code.
    """
    missing = [c for c in required_columns(cfg) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            "(map CellProfiler names with --map Metadata_X=name or --metadata-preset pycytominer)"
        )
    if df.empty:
        raise DataError(f"{path}: no rows")
    features, kind = detect_features(list(df.columns), str(path))
    try:
        x = df[features].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric values in feature columns ({str(exc).splitlines()[0]})") from exc
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: {int(bad.sum())} NaN/inf feature values, first in column {features[c]} at CSV row {r + 2}"
        )
    for col in ("perturbation_id", "batch", "well"):
        if df[col].isna().any():
            first = int(np.argmax(df[col].isna().to_numpy())) + 2
            raise DataError(f"{path}: column {col} has missing values (first at CSV row {first})")
    meta = df.drop(columns=features).reset_index(drop=True)
    if cfg.label not in meta.columns:
        meta[cfg.label] = pd.Series(pd.NA, index=meta.index, dtype="string")
    return Representation(name=name, path=path, meta=meta, x=x, features=features, kind=kind)
