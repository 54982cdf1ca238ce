"""Profiles as DataFrames: NaN-aware aggregation, variance filter, pycytominer normalisation and consensus.

Every function takes explicit feature and metadata column lists, so nothing depends on column-name guessing.

Normalisation follows the paper (original_behaviour.md §4.4) unless told otherwise:
- ``standardize``: per plate, fitted on the control wells;
- ``mad_robustize``: per plate, fitted on ALL wells of the plate (``mad_reference="controls"`` fits on controls);
- ``spherize``: ZCA-cor whitening fitted on the control wells of all plates pooled, applied to every well;
- ``a_b`` runs ``a`` then ``b``; before every step, features whose population variance is <= 1e-5 in the control
  wells or in the non-control wells are dropped; ``no_post_proc`` returns the profiles unchanged.
``scope="plate"`` or ``"global"`` forces one scope on every step instead of the paper's per-method scopes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.errors import ConfigError, DataError

FEATURE_PREFIX = "emb"
VARIANCE_THRESHOLD = 1e-5
OPERATIONS = ("mean", "median")

# Each method is the ordered list of pycytominer steps it runs.
NORM_METHODS: dict[str, tuple[str, ...]] = {
    "standardize": ("standardize",),
    "mad_robustize": ("mad_robustize",),
    "spherize": ("spherize",),
    "spherize_mad_robustize": ("spherize", "mad_robustize"),
    "mad_robustize_spherize": ("mad_robustize", "spherize"),
    "spherize_standardize": ("spherize", "standardize"),
    "standardize_spherize": ("standardize", "spherize"),
    "no_post_proc": (),
}
NORM_CHOICES = (*NORM_METHODS, "all")
SCOPES = ("paper", "plate", "global")


@dataclass(frozen=True)
class StepSpec:
    """Where a pycytominer step is fitted: per plate or pooled, on control wells or on all wells."""

    scope: str
    reference: str


PAPER_STEPS: dict[str, StepSpec] = {
    "standardize": StepSpec("plate", "controls"),
    "mad_robustize": StepSpec("plate", "all"),
    "spherize": StepSpec("global", "controls"),
}

CONTROL_PRESETS: dict[str, str] = {
    "DMSO": "perturbation_id == 'DMSO'",
    "negcon": "control_type == 'negcon'",
}


def embedding_names(dim: int, prefix: str = FEATURE_PREFIX) -> list[str]:
    """Name features like the paper (``emb0``, ``emb1``, ... unpadded) so its evaluation code reads them."""
    return [f"{prefix}{i}" for i in range(dim)]


def feature_columns(df: pd.DataFrame, prefix: str = FEATURE_PREFIX) -> list[str]:
    """The embedding columns, in table order, found by the prefix the paper's evaluation uses."""
    return [c for c in df.columns if isinstance(c, str) and c.startswith(prefix)]


def _check_operation(operation: str) -> None:
    if operation not in OPERATIONS:
        raise ConfigError(f"--operation {operation!r} is not one of {', '.join(OPERATIONS)}")


def _check_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
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
    """Pool rows per key with one linear groupby; NaN rows (invalid tiles) are ignored, never matched pairwise."""
    _check_operation(operation)
    _check_columns(df, [*keys, *features], "aggregate")
    grouped = df.groupby(list(keys), sort=False, dropna=False)[list(features)]
    out = grouped.mean() if operation == "mean" else grouped.median()
    if count_column is not None:
        valid = df[list(features)].notna().all(axis=1)
        out.insert(0, count_column, valid.groupby([df[k] for k in keys], sort=False, dropna=False).sum())
    return out.reset_index()


def aggregate_sites(
    tile_df: pd.DataFrame,
    features: Sequence[str],
    site_keys: Sequence[str],
    operation: str = "mean",
    count_column: str | None = "n_valid_tiles",
) -> pd.DataFrame:
    """Site profiles from tile rows whose invalid tiles are NaN, with the number of valid tiles per site."""
    return aggregate_profiles(tile_df, features, site_keys, operation, count_column)


def aggregate_wells(
    df: pd.DataFrame,
    features: Sequence[str],
    well_keys: Sequence[str],
    operation: str = "mean",
    count_column: str | None = None,
) -> pd.DataFrame:
    """Well profiles from tile rows (the paper pools all tiles of a well) or from site rows."""
    return aggregate_profiles(df, features, well_keys, operation, count_column)


def l2_normalize_rows(df: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    """Scale each PROFILE to unit L2 norm (the paper scaled feature columns instead, a bug)."""
    out = df.copy()
    values = out[list(features)].to_numpy(dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    out[list(features)] = values / np.where(norms > 0, norms, 1.0)
    return out


def resolve_control_query(df: pd.DataFrame, controls: str = "auto", control_query: str | None = None) -> str:
    """Pick the pandas query that marks negative-control wells: explicit, a preset, or negcon when annotated."""
    if control_query:
        return control_query
    if controls in CONTROL_PRESETS:
        return CONTROL_PRESETS[controls]
    if controls != "auto":
        raise ConfigError(f"--controls {controls!r} is not one of auto, {', '.join(CONTROL_PRESETS)}")
    if "control_type" in df.columns and (df["control_type"] == "negcon").any():
        return CONTROL_PRESETS["negcon"]
    return CONTROL_PRESETS["DMSO"]


def control_mask(df: pd.DataFrame, query: str) -> np.ndarray:
    """Boolean mask of the rows matched by the control query, with a one-line error for a bad query."""
    try:
        selected = df.query(query).index
    except Exception as exc:  # pandas raises many types for a bad expression
        raise ConfigError(f"control query {query!r} cannot be evaluated: {exc}") from exc
    return df.index.isin(selected)


def variance_filter(
    df: pd.DataFrame, features: Sequence[str], controls: np.ndarray, threshold: float = VARIANCE_THRESHOLD
) -> list[str]:
    """Keep features with population variance above the threshold in control AND non-control wells (the paper)."""
    values = df[list(features)].to_numpy(dtype=np.float64)
    keep = np.ones(len(features), dtype=bool)
    for mask in (controls, ~controls):
        if mask.any():
            keep &= values[mask].var(axis=0) > threshold
    return [f for f, k in zip(features, keep) if k]


def _fit_groups(df: pd.DataFrame, scope: str, plate_col: str) -> list[pd.Index]:
    if scope == "global":
        return [df.index]
    _check_columns(df, [plate_col], "per-plate normalisation")
    return [idx for _, idx in df.groupby(plate_col, sort=False, dropna=False).groups.items()]


def normalize_step(
    df: pd.DataFrame,
    features: Sequence[str],
    meta: Sequence[str],
    method: str,
    control_query: str,
    spec: StepSpec,
    plate_col: str = "plate",
) -> pd.DataFrame:
    """Run one pycytominer.normalize step per plate or pooled, fitted on controls or on all wells."""
    from pycytominer import normalize

    samples = control_query if spec.reference == "controls" else "all"
    parts = []
    for idx in _fit_groups(df, spec.scope, plate_col):
        part = df.loc[idx]
        n_ref = len(part) if samples == "all" else int(control_mask(part, samples).sum())
        if n_ref < 2:
            where = "all plates" if spec.scope == "global" else f"plate {part[plate_col].iloc[0]!r}"
            raise DataError(f"{method}: {where} has {n_ref} reference well(s) for {samples!r}; need at least 2")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                parts.append(
                    normalize(profiles=part, features=list(features), meta_features=list(meta), samples=samples,
                              method=method)
                )
        except (ValueError, np.linalg.LinAlgError) as exc:
            where = "all plates" if spec.scope == "global" else f"plate {part[plate_col].iloc[0]!r}"
            detail = str(exc).splitlines()[0][:200]
            raise DataError(f"{method} on {where} fitted on {n_ref} well(s) of {samples!r} failed: {detail}") from None
    out = pd.concat(parts).loc[df.index]
    return out[[*meta, *features]]


def normalize_profiles(
    df: pd.DataFrame,
    features: Sequence[str],
    meta: Sequence[str],
    method: str,
    control_query: str,
    *,
    scope: str = "paper",
    mad_reference: str = "all",
    l2norm: bool = False,
    variance_threshold: float = VARIANCE_THRESHOLD,
    plate_col: str = "plate",
) -> tuple[pd.DataFrame, list[str]]:
    """Apply a paper normalisation method (steps, variance filter, scopes) and return the table and kept features."""
    if method not in NORM_METHODS:
        raise ConfigError(f"--norm_method {method!r} is not one of {', '.join(NORM_METHODS)}")
    if scope not in SCOPES:
        raise ConfigError(f"--norm-scope {scope!r} is not one of {', '.join(SCOPES)}")
    if mad_reference not in ("all", "controls"):
        raise ConfigError(f"--mad-reference {mad_reference!r} is not one of all, controls")
    features = list(features)
    meta = list(meta)
    _check_columns(df, [*meta, *features], "normalisation")
    if df[features].isna().to_numpy().any():
        raise DataError("normalisation: profiles contain NaN features; drop wells without valid tiles first")
    out = df[[*meta, *features]].reset_index(drop=True)
    if l2norm:
        out = l2_normalize_rows(out, features)
    for step in NORM_METHODS[method]:
        controls = control_mask(out, control_query)
        if not controls.any():
            raise DataError(f"{method}: no control wells match {control_query!r}")
        features = variance_filter(out, features, controls, variance_threshold)
        if not features:
            raise DataError(f"{method}: every feature has variance <= {variance_threshold} before {step}")
        spec = PAPER_STEPS[step]
        if scope != "paper":
            spec = StepSpec(scope, spec.reference)
        if step == "mad_robustize" and mad_reference == "controls":
            spec = StepSpec(spec.scope, "controls")
        out = normalize_step(out[[*meta, *features]], features, meta, step, control_query, spec, plate_col)
    return out, features


def consensus(
    df: pd.DataFrame,
    features: Sequence[str],
    strata: Sequence[str] = ("perturbation_id",),
    operation: str = "mean",
    carry: Sequence[str] = ("target",),
) -> pd.DataFrame:
    """Consensus profile per perturbation via pycytominer.aggregate, then the per-perturbation metadata joined back."""
    from pycytominer import aggregate

    _check_operation(operation)
    _check_columns(df, [*strata, *features], "consensus")
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
