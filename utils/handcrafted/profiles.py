"""Well profiles from site rows: aggregation, cleaning, normalisation against controls, and feature selection.

Aggregation goes objects -> site median (``measure.site_profile``) -> well mean (``aggregate``). Wells without any
segmented cell and features that are not finite in every well are dropped and reported, never imputed
(``drop_incomplete``). Normalisation is pycytominer's, per plate, fitted on the negative-control wells (the control
query of ``utils.profiles.controls``, so inference, this baseline and evaluation agree on which wells are
controls), for mad_robustize as well (the paper fitted it on all wells); features with zero MAD in a plate's
controls are dropped first. Feature selection is pycytominer's over all wells, with CellProfiler profiling defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from utils.errors import ConfigError, DataError
from utils.handcrafted.measure import COUNT_COLUMN
from utils.profiles.aggregate import OPERATIONS
from utils.profiles.chain import SELECT_OPERATIONS, normalize_profiles, parse_chain
from utils.profiles.chain import select_features as select_profile_features
from utils.profiles.controls import control_mask, no_match_message, resolve_control_query
from utils.profiles.features import feature_columns, finite_features
from utils.profiles.normalize import NO_NORMALISATION, canonical_method

WELL_KEYS: tuple[str, ...] = ("batch", "plate", "well")
WELL_METADATA: tuple[str, ...] = (*WELL_KEYS, "perturbation_id", "target", "control_type", "gene_group")
# The methods --help names first; any chain of utils.profiles.chain runs.
NORM_METHODS: tuple[str, ...] = ("mad_robustize", "standardize", NO_NORMALISATION)
DEFAULT_SELECT: tuple[str, ...] = SELECT_OPERATIONS
MAD_RELATIVE_TOLERANCE = 1e-9  # a control MAD at or below this fraction of the median counts as zero


def check_norm_method(method: str) -> str:
    """The canonical name of a handcrafted normalisation chain (``none`` -> ``no_post_proc``), or a ConfigError."""
    canonical = canonical_method(method)
    parse_chain(canonical)
    return canonical


def check_select_operations(operations: Sequence[str]) -> None:
    """Reject a pycytominer feature-selection operation this baseline does not run."""
    unknown = [op for op in operations if op not in SELECT_OPERATIONS]
    if unknown:
        raise ConfigError(f"--feature_select {unknown[0]!r} is not one of {', '.join(SELECT_OPERATIONS)}, none")


def check_max_sites_per_well(max_sites_per_well: int | None) -> None:
    """Reject a site limit that would leave a well without sites (None means no limit)."""
    if max_sites_per_well is not None and max_sites_per_well < 1:
        raise ConfigError(f"--max_sites_per_well must be >= 1, got {max_sites_per_well}")


def limit_sites(table: pd.DataFrame, max_sites_per_well: int | None) -> pd.DataFrame:
    """The first ``max_sites_per_well`` sites of each well in table order, for quick baselines on big plates."""
    check_max_sites_per_well(max_sites_per_well)
    if max_sites_per_well is None:
        return table
    return table.groupby(list(WELL_KEYS), sort=False, dropna=False).head(max_sites_per_well).reset_index(drop=True)


def aggregate(site_df: pd.DataFrame, operation: str = "mean") -> pd.DataFrame:
    """Well profiles from site rows: features pooled per (batch, plate, well), metadata carried from the first site.

    ``n_sites`` follows the metadata so a reader sees how many sites each well mean rests on.
    """
    if operation not in OPERATIONS:
        raise ConfigError(f"well aggregation {operation!r} is not one of {', '.join(OPERATIONS)}")
    missing = [c for c in WELL_KEYS if c not in site_df.columns]
    if missing:
        raise DataError(f"site table lacks column(s) {', '.join(missing)} needed to aggregate wells")
    features = feature_columns(site_df)
    meta = [c for c in WELL_METADATA if c in site_df.columns]
    grouped = site_df.groupby(list(WELL_KEYS), sort=False, dropna=False)
    values = grouped[features].mean() if operation == "mean" else grouped[features].median()
    carried = grouped[[c for c in meta if c not in WELL_KEYS]].first()
    out = carried.join(values).reset_index()
    out.insert(len(meta), "n_sites", grouped.size().to_numpy())
    return out


def drop_incomplete(wells: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Drop wells in which no cell was found, then features that are not finite in every remaining well.

    Both are reported (not imputed), because pycytominer and evaluate.py need finite profiles.
    """
    features = feature_columns(wells)
    empty = wells[COUNT_COLUMN].fillna(0).to_numpy() <= 0
    kept = wells.loc[~empty].reset_index(drop=True)
    values = kept[features].replace([np.inf, -np.inf], np.nan)
    bad = [f for f in features if values[f].isna().any()]
    report = {"dropped_empty_wells": [f"{r.plate}/{r.well}" for r in wells.loc[empty].itertuples()],
              "dropped_nonfinite_features": len(bad)}
    if kept.empty:
        raise DataError("no cell was segmented in any well; check --channels and --nucleus_diameter")
    return kept.drop(columns=bad), report


def _zero_mad_features(df: pd.DataFrame, features: Sequence[str], controls: np.ndarray) -> list[str]:
    """Features whose control MAD is zero on some plate: mad_robustize would divide by ~0 there.

    "Zero" is relative to the feature's magnitude: on 8-bit images a MAD-type feature can be identical in every
    control but for floating-point rounding (a MAD of 1e-17 on values near 1e-2), which would scale it by 1e15.
    """
    bad: set[str] = set()
    for _, idx in df[controls].groupby("plate", sort=False).groups.items():
        values = df.loc[idx, list(features)].to_numpy(dtype=np.float64)
        median = np.median(values, axis=0)
        mad = np.median(np.abs(values - median), axis=0)
        tiny = MAD_RELATIVE_TOLERANCE * np.abs(median)
        bad.update(f for f, m, t in zip(features, mad, tiny) if not m > t)
    return [f for f in features if f in bad]


def normalize(df: pd.DataFrame, method: str = "mad_robustize", control_query: str | None = None,
              controls: str = "auto", batch_key: str = "batch") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Normalisation chain of well profiles, its pycytominer steps fitted on the negative-control wells.

    Fitting on the controls (also for mad_robustize, which the paper fitted on all wells) keeps a plate full of
    active compounds from shrinking its own effects. Features whose control MAD is zero on some plate are dropped
    first when the chain MAD-robustises, and reported, because the division would blow them up.

    Parameters
    ----------
    df:
        Well profiles with a ``plate`` column and finite features (see ``drop_incomplete``).
    method:
        A chain (``utils.profiles.chain``): ``mad_robustize``, ``standardize``, ``mad_robustize_spherize_harmony``,
        ``jump``, a chain file, or ``no_post_proc`` (alias ``none``: the profiles are returned as given).
    control_query:
        A pandas query selecting the control wells; overrides ``controls``.
    controls:
        ``auto`` (``control_type == 'negcon'`` when annotated, else ``perturbation_id == 'DMSO'``), ``DMSO`` or
        ``negcon``.
    batch_key:
        The column a Harmony step corrects for.

    Returns
    -------
    tuple[pandas.DataFrame, dict]
        The normalised profiles and a report (method, control query, features dropped and why, the steps) for
        run.json.
    """
    method = check_norm_method(method)
    report: dict[str, Any] = {"method": method}
    steps = parse_chain(method)
    if not steps:
        return df, report
    features = feature_columns(df)
    meta = [c for c in df.columns if c not in features]
    query = resolve_control_query(df, controls, control_query)
    report["control_query"] = query
    finite_features(df, features, "normalisation", csv_rows=False, hint="run drop_incomplete first")
    finite = list(features)
    ctrl = control_mask(df, query)
    if not ctrl.any():
        raise DataError(f"{no_match_message(df, query, method)}; pass --controls or --control_query")
    per_plate = pd.Series(ctrl, index=df.index).groupby(df["plate"], sort=False).sum()
    if (per_plate < 2).any():
        plate = per_plate.index[int(np.argmax((per_plate < 2).to_numpy()))]
        raise DataError(f"{method}: plate {plate!r} has {int(per_plate[plate])} control well(s) matching {query!r} "
                        f"with segmented cells; need at least 2 (or use --norm_method {NO_NORMALISATION})")
    if any(s.name == "mad_robustize" for s in steps):
        zero = set(_zero_mad_features(df, finite, ctrl))
        report["dropped_zero_mad_features"] = len(zero)
        finite = [f for f in finite if f not in zero]
    if not finite:
        raise DataError(f"{method}: no feature is finite in every well with a non-zero spread in the controls")
    records: list[dict[str, Any]] = []
    out, kept = normalize_profiles(df[[*meta, *finite]], finite, meta, method, query, mad_reference="controls",
                                   variance_threshold=0.0, batch_key=batch_key, records=records)
    report["dropped_constant_features"] = sum(r["dropped_by_variance_filter"] for r in records)
    report["steps"] = records
    return out, report


def chain_selects_features(method: str) -> bool:
    """Whether a chain has its own feature_select step (then the baseline's trailing selection is skipped)."""
    return any(s.name == "feature_select" for s in parse_chain(canonical_method(method)))


def select_features(df: pd.DataFrame, operations: Sequence[str] = DEFAULT_SELECT,
                    corr_threshold: float = 0.9, na_cutoff: float = 0.05) -> pd.DataFrame:
    """pycytominer feature selection over all wells (CellProfiler profiling defaults)."""
    check_select_operations(operations)
    features = feature_columns(df)
    if not operations or not features:
        return df
    meta = [c for c in df.columns if c not in features]
    selected, _, _ = select_profile_features(df, features, meta, operations, "all", corr_threshold, na_cutoff)
    return selected
