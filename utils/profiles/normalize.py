"""The paper's normalisation pieces: pycytominer steps with their scopes, the variance filter, L2 scaling.

Every function takes explicit feature and metadata column lists, so nothing depends on column-name guessing.
``utils.profiles.chain`` runs these (and the corrections of ``utils.profiles.corrections``) as named chains.

Normalisation follows the paper (original_behaviour.md §4.4) unless told otherwise:
- ``standardize``: per plate, fitted on the control wells;
- ``mad_robustize``: per plate, fitted on ALL wells of the plate (``mad_reference="controls"`` fits on controls);
- ``spherize``: ZCA-cor whitening fitted on the control wells of all plates pooled, applied to every well;
- ``a_b`` runs ``a`` then ``b``; before every step, features whose population variance is <= 1e-5 in the control
  wells or in the non-control wells are dropped; ``no_post_proc`` returns the profiles unchanged.
``scope="plate"`` or ``"global"`` forces one scope on every step instead of the paper's per-method scopes.
``NORM_METHODS`` lists the paper's methods (what ``--norm_method all`` writes); any chain of ``chain.STEPS`` is
accepted besides.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.errors import DataError
from utils.profiles.aggregate import check_columns
from utils.profiles.controls import control_mask

VARIANCE_THRESHOLD = 1e-5
NO_NORMALISATION = "no_post_proc"  # the paper's name; "none" (the handcrafted CLI's old spelling) is an alias
NORM_ALIASES: dict[str, str] = {"none": NO_NORMALISATION}

# Each method is the ordered list of pycytominer steps it runs.
NORM_METHODS: dict[str, tuple[str, ...]] = {
    "standardize": ("standardize",),
    "mad_robustize": ("mad_robustize",),
    "spherize": ("spherize",),
    "spherize_mad_robustize": ("spherize", "mad_robustize"),
    "mad_robustize_spherize": ("mad_robustize", "spherize"),
    "spherize_standardize": ("spherize", "standardize"),
    "standardize_spherize": ("standardize", "spherize"),
    NO_NORMALISATION: (),
}
NORM_CHOICES = (*NORM_METHODS, "all", *NORM_ALIASES)
SCOPES = ("paper", "plate", "global")


def canonical_method(method: str) -> str:
    """The one spelling of a normalisation method (``none`` -> ``no_post_proc``)."""
    return NORM_ALIASES.get(method, method)


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


def l2_normalize_rows(df: pd.DataFrame, features: Sequence[str]) -> pd.DataFrame:
    """Scale each PROFILE to unit L2 norm (the paper scaled feature columns instead, a bug)."""
    out = df.copy()
    values = out[list(features)].to_numpy(dtype=np.float64)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    out[list(features)] = values / np.where(norms > 0, norms, 1.0)
    return out


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
    check_columns(df, [plate_col], "per-plate normalisation")
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
    from pycytominer import normalize  # lazy: importing pycytominer costs ~1.5 s, which --help must not pay

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
