"""Wells with their compound's label row, compound-grouped splits, and training-split standardisation.

Every well is one sample (the paper's unit); it carries the label row of its compound. Splits are by compound, so no
compound is in two of train, val and test: read from ``splits.csv`` (one column per split, values train/val/test)
or drawn with the seed. A drawn split places each compound by a hash of (seed, split, compound), so a compound's
part does not depend on which other compounds a representation kept: DINO and CellProfiler runs share their splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data.metadata import check_unique_header
from supervised_baseline.config import DataConfig
from supervised_baseline.labels import ID_COLUMN, find_id_column, read_labels, read_table
from utils.errors import DataError
from utils.profiles.features import detect_features
from utils.seeding import sample_seed

PARTS = ("train", "val", "test")
OUTLIER = 1000.0  # the paper imputed |x| > 1000 (CellProfiler blow-ups) like NaN and inf


@dataclass(frozen=True)
class Dataset:
    """Aligned samples: features (wells x F), labels (wells x assays, NaN = unknown), compound per well."""

    x: np.ndarray
    y: np.ndarray
    compounds: np.ndarray
    features: list[str]
    assays: list[str]
    kind: str

    def subset(self, mask: np.ndarray) -> Dataset:
        """The wells selected by a boolean mask."""
        return Dataset(self.x[mask], self.y[mask], self.compounds[mask], self.features, self.assays, self.kind)


def read_features(path: str | Path, id_column: str | None = None) -> tuple[pd.DataFrame, list[str], str, str]:
    """A ``well_features.csv`` (``emb*`` or CellProfiler columns): table, feature columns, kind, compound column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.features {path}: no such file")
    table, ident = read_table(path, "feature table", id_column)
    features, kind = detect_features(list(table.columns), str(path))
    return table, features, kind, ident


def load_dataset(cfg: DataConfig) -> Dataset:
    """Wells of ``data.features`` whose compound has at least one label in ``data.labels``."""
    table, features, kind, ident = read_features(cfg.features, cfg.id_column)
    labels = read_labels(cfg.labels, cfg.id_column, cfg.label_index, cfg.label_names)
    labels = labels[labels.notna().any(axis=1)]  # a compound without any label (e.g. DMSO) teaches nothing
    compounds = table[ident].astype(str).to_numpy()
    keep = np.isin(compounds, labels.index.to_numpy()) & table[ident].notna().to_numpy()
    if not keep.any():
        raise DataError(f"data.features {cfg.features} and data.labels {cfg.labels}: no compound in common "
                        f"(features have e.g. {compounds[0]!r}, labels e.g. {labels.index[0]!r})")
    y = labels.loc[compounds[keep]].to_numpy(np.float64)
    x = table.loc[keep, features].to_numpy(np.float64)
    return Dataset(x, y, compounds[keep], features, [str(a) for a in labels.columns], kind)


def drawn_split(compounds: np.ndarray, seed: int, split: int, fractions: tuple[float, float, float]) -> dict[str, str]:
    """Compound -> part from a hash of (seed, split, compound) mapped to [0, 1) and cut at the cumulative fractions.

    A compound's part then depends only on the seed and its own id. When a part would be empty (very few
    compounds), compounds are instead ranked by the same hash and cut by count, so each part gets one or more.
    """
    unique = sorted(set(compounds.tolist()))
    if len(unique) < 3:
        raise DataError(f"{len(unique)} labelled compound(s): a train/val/test split needs at least 3")
    u = {c: sample_seed(seed, "supervised-split", split, c) / float(1 << 63) for c in unique}
    cuts = (fractions[0], fractions[0] + fractions[1])
    parts = {c: "train" if v < cuts[0] else "val" if v < cuts[1] else "test" for c, v in u.items()}
    if set(parts.values()) == set(PARTS):
        return parts
    order = sorted(unique, key=u.__getitem__)
    n = len(order)
    n_train = min(max(1, round(fractions[0] * n)), n - 2)
    n_val = min(max(1, round(fractions[1] * n)), n - n_train - 1)
    return dict(zip(order, ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)))


def read_split(path: str | Path, split: int, id_column: str | None = None) -> dict[str, str]:
    """Compound -> part from ``splits.csv``: column ``split{N}`` (or the N-th split column) of train/val/test."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.splits {path}: no such file")
    check_unique_header(path, "splits")
    table = pd.read_csv(path, dtype=str)
    ident = find_id_column(list(table.columns), str(path), id_column)
    columns = [c for c in table.columns if c != ident]
    name = f"split{split}" if f"split{split}" in columns else (columns[split - 1] if split <= len(columns) else None)
    if name is None:
        raise DataError(f"{path}: no split {split} (columns {columns})")
    parts = table[name].str.strip().str.lower()
    bad = sorted(set(parts.dropna()) - set(PARTS))
    if bad:
        raise DataError(f"{path}: column {name!r} holds {bad}; expected train, val or test")
    if table[ident].duplicated().any():
        raise DataError(f"{path}: compound {table[ident][table[ident].duplicated()].iloc[0]!r} is listed twice")
    return dict(zip(table[ident].astype(str), parts))


def assign_parts(ds: Dataset, cfg: DataConfig, seed: int) -> np.ndarray:
    """The part (train / val / test, or '' for compounds left out of the split file) of every well."""
    mapping = read_split(cfg.splits, cfg.split, cfg.id_column) if cfg.splits else drawn_split(
        ds.compounds, seed, cfg.split, cfg.fractions)
    parts = parts_of(ds.compounds, mapping)
    for part in PARTS:
        if not (parts == part).any():
            raise DataError(f"split {cfg.split}: no labelled well in the {part} part")
    return parts


def parts_of(compounds: np.ndarray, mapping: dict[str, str]) -> np.ndarray:
    """The part of every well from a compound -> part mapping ('' for compounds it does not list), in one map."""
    return pd.Series(compounds).map(mapping).fillna("").to_numpy(dtype=object)


def split_table(ds: Dataset, parts: np.ndarray) -> pd.DataFrame:
    """One row per compound with its part, as written to ``<output_dir>/splits.csv``."""
    frame = pd.DataFrame({ID_COLUMN: ds.compounds, "part": parts})
    return frame.drop_duplicates(ID_COLUMN).sort_values(ID_COLUMN).reset_index(drop=True)


@dataclass(frozen=True)
class Standardiser:
    """Training-split statistics: non-finite or |x| > 1000 values become the column median, then z-scores."""

    median: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        """Statistics of the training wells only, so nothing about val or test leaks into the model."""
        clean = np.where(np.isfinite(x) & (np.abs(x) <= OUTLIER), x, np.nan)
        median = np.nanmedian(clean, axis=0)
        median = np.where(np.isfinite(median), median, 0.0)
        filled = np.where(np.isnan(clean), median, clean)
        std = filled.std(axis=0)
        return cls(median, filled.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Impute with the training medians and standardise with the training mean and std (float32)."""
        clean = np.where(np.isfinite(x) & (np.abs(x) <= OUTLIER), x, self.median)
        return ((clean - self.mean) / self.std).astype(np.float32)
