"""Consensus profiles: one row per perturbation (pycytominer.aggregate) with its labels carried along."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd

from utils.profiles.aggregate import check_columns, check_operation


def consensus(
    df: pd.DataFrame,
    features: Sequence[str],
    strata: Sequence[str] = ("perturbation_id",),
    operation: str = "mean",
    carry: Sequence[str] = ("target",),
) -> pd.DataFrame:
    """Consensus profile per perturbation via pycytominer.aggregate, then the per-perturbation metadata joined back.

    Parameters
    ----------
    df:
        Normalised well profiles: the ``strata`` columns, the ``features`` and, optionally, the ``carry`` labels.
    features:
        The feature columns to pool (cast to float); only these, the strata and the carried labels are returned.
    strata:
        The columns that define one consensus profile (a perturbation by default).
    operation:
        ``mean`` or ``median`` (``OPERATIONS``), NaN-skipping per feature.
    carry:
        Label columns to join back per group; those absent from ``df`` or among the strata are skipped. A group
        with several values gets them joined with ``|`` (sorted) and a warning, so profiles are never duplicated.

    Returns
    -------
    pandas.DataFrame
        One row per group, sorted by ``strata`` (pycytominer's groupby), columns ``[*strata, *features, *carry]``,
        so each perturbation counts once whatever its number of wells (inference writes it as agg_features).
        ConfigError for an unknown operation, DataError naming any missing strata or feature column.
    """
    from pycytominer import aggregate  # lazy: importing pycytominer costs ~1.5 s, which --help must not pay

    check_operation(operation)
    check_columns(df, [*strata, *features], "consensus")
    agg = aggregate(df, strata=list(strata), features=list(features), operation=operation)
    carry = [c for c in carry if c in df.columns and c not in strata]
    if carry:
        agg = agg.merge(_labels_per_group(df, list(strata), carry), on=list(strata), how="left")
    return agg[[*strata, *features, *carry]]


def _labels_per_group(df: pd.DataFrame, strata: list[str], carry: list[str]) -> pd.DataFrame:
    """One label row per group; several values are joined with '|' and reported, never duplicating profiles."""
    labels = df[[*strata, *carry]].drop_duplicates()
    ambiguous = labels.duplicated(strata, keep=False)
    if ambiguous.any():
        n = labels.loc[ambiguous, strata].drop_duplicates().shape[0]
        warnings.warn(f"{n} group(s) of {strata} carry several values of {carry}; joined with '|'", stacklevel=3)
        joined = lambda s: "|".join(sorted({str(v) for v in s}))
        labels = labels.groupby(strata, sort=False, dropna=False).agg(
            {c: (lambda s: joined(s) if s.nunique(dropna=False) > 1 else s.iloc[0]) for c in carry}
        ).reset_index()
    return labels
