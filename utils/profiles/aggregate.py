"""NaN-aware pooling of profile rows (tiles -> sites -> wells) with one linear groupby per level.

Invalid tiles arrive as NaN rows and are ignored by the groupby, never matched pairwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from utils.errors import ConfigError, DataError

OPERATIONS: tuple[str, ...] = ("mean", "median")


def check_operation(operation: str) -> None:
    if operation not in OPERATIONS:
        raise ConfigError(f"--operation {operation!r} is not one of {', '.join(OPERATIONS)}")


def check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {', '.join(map(str, missing))}")


def aggregate_profiles(
    df: pd.DataFrame,
    features: Sequence[str],
    keys: Sequence[str],
    operation: str = "mean",
    count_column: str | None = None,
) -> pd.DataFrame:
    """Pool rows per key with one linear groupby; NaN rows (invalid tiles) are ignored, never matched pairwise.

    Parameters
    ----------
    df:
        Profile rows (tiles, sites or wells) holding ``keys`` and ``features``; invalid rows have NaN features.
    features:
        The feature columns to pool.
    keys:
        The columns that define one output row, e.g. (plate, well); missing key values form their own group.
    operation:
        ``mean`` or ``median`` (``OPERATIONS``), NaN-skipping per feature.
    count_column:
        When given, a column of that name counts the rows of each group without any NaN feature (the valid
        tiles), so a reader sees how many tiles each profile rests on.

    Returns
    -------
    pandas.DataFrame
        One row per key combination in order of first appearance, columns ``[*keys, count_column, *features]``;
        features are NaN for a group without any valid row (the caller drops or reports it). ConfigError for an
        unknown operation, DataError naming any missing column.
    """
    check_operation(operation)
    check_columns(df, [*keys, *features], "aggregate")
    grouped = df.groupby(list(keys), sort=False, dropna=False)[list(features)]
    out = grouped.mean() if operation == "mean" else grouped.median()
    if count_column is not None:
        valid = df[list(features)].notna().all(axis=1)
        out.insert(0, count_column, valid.groupby([df[k] for k in keys], sort=False, dropna=False).sum())
    return out.reset_index()


def aggregate_sites(tile_df: pd.DataFrame, features: Sequence[str], site_keys: Sequence[str], operation: str = "mean",
                    count_column: str | None = "n_valid_tiles") -> pd.DataFrame:
    """Site profiles from tile rows whose invalid tiles are NaN, with the number of valid tiles per site."""
    return aggregate_profiles(tile_df, features, site_keys, operation, count_column)


def aggregate_wells(df: pd.DataFrame, features: Sequence[str], well_keys: Sequence[str], operation: str = "mean",
                    count_column: str | None = None) -> pd.DataFrame:
    """Well profiles from tile rows (the paper pools all tiles of a well) or from site rows."""
    return aggregate_profiles(df, features, well_keys, operation, count_column)
