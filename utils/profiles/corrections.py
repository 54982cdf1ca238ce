"""Profile corrections beyond pycytominer's normalize: well position, row/column effects, rank-INT, outliers, Harmony.

Each function is pure (arrays in, arrays out) and takes the reference wells it is fitted on as a boolean mask, so
"fit on the controls" and "fit on all wells" are one code path. ``utils.profiles.chain`` names them as steps.

- ``well_position_effects`` / ``subtract_well_position``: the JUMP recipe's well-position correction, the mean
  of each feature per well position across plates (plates share a layout's artefacts: edges, dispensing order).
  The effect subtracted is the position mean minus the reference grand mean, so a position without reference wells
  is left alone instead of being pulled to zero, and fitting on the controls does not shift the treated wells;
  a position needs ``MIN_POSITION_WELLS`` reference wells, or its "mean" would be its own wells' biology.
- ``row_column_effects``: additive row and column effects by least squares (backfitting two-way ANOVA), fitted on
  the reference wells of each plate; useful when a plate's controls sit at few positions, because rows and columns
  are shared by many wells.
- ``rank_inverse_normal``: the rank-based inverse-normal transform (Blom's offset c = 3/8), per feature.
- ``outlier_features`` / ``clip``: the JUMP recipe's outlier handling (drop features whose 99th percentile of
  |value| exceeds a bound, then clip what is left to that bound).
- ``harmony``: harmonypy's Harmony on the profiles, batch key chosen by the caller.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from scipy.special import ndtri
from scipy.stats import rankdata

from utils.errors import DataError

BLOM_OFFSET = 3.0 / 8.0
OUTLIER_BOUND = 100.0  # the JUMP recipe's bound on MAD-robustised features
OUTLIER_QUANTILE = 0.99
MIN_POSITION_WELLS = 3  # reference wells per position before its mean is trusted
BACKFIT_ITERATIONS = 200
BACKFIT_TOLERANCE = 1e-10
_WELL = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")
_WELL_RC = re.compile(r"^\s*r0*(\d{1,3})c0*(\d{1,3})\s*$", re.IGNORECASE)


def well_row_column(wells: pd.Series, source: str = "well") -> tuple[np.ndarray, np.ndarray]:
    """Zero-based (row, column) of plate wells named ``A01``/``A1``/``AA12`` or ``r01c01``; a bad name is an error.

    Two-letter rows (``AA`` after ``Z``) cover 1536-well plates.
    """
    rows = np.empty(len(wells), dtype=np.int64)
    cols = np.empty(len(wells), dtype=np.int64)
    for i, name in enumerate(wells.astype(str)):
        m = _WELL.match(name)
        if m and int(m.group(2)) > 0:
            letters = m.group(1).upper()
            r = 0
            for ch in letters:
                r = r * 26 + (ord(ch) - ord("A") + 1)
            rows[i], cols[i] = r - 1, int(m.group(2)) - 1
            continue
        m = _WELL_RC.match(name)
        if m and int(m.group(1)) > 0 and int(m.group(2)) > 0:
            rows[i], cols[i] = int(m.group(1)) - 1, int(m.group(2)) - 1
            continue
        raise DataError(f"{source}: well {name!r} is not a plate position like A01 or r01c01")
    return rows, cols


def well_position_effects(x: np.ndarray, positions: np.ndarray, reference: np.ndarray,
                          min_wells: int = MIN_POSITION_WELLS) -> tuple[np.ndarray, int]:
    """Per-well effect of its position (position mean - grand mean over the reference wells) and how many
    positions were left alone for having fewer than ``min_wells`` reference wells.

    A position mean over one or two wells is mostly those wells' own biology, so subtracting it would erase the
    signal; such positions get no correction, and if none qualifies the correction is refused.

    Parameters
    ----------
    x:
        (N, F) profiles.
    positions:
        (N,) integer code of each well's position (the same code on every plate).
    reference:
        (N,) boolean mask of the wells the means are estimated on.
    min_wells:
        Reference wells a position needs before its mean is trusted.
    """
    if not reference.any():
        raise DataError("well-position correction: no reference wells")
    n_pos = int(positions.max()) + 1
    ref_pos = positions[reference]
    counts = np.bincount(ref_pos, minlength=n_pos).astype(np.float64)
    if not (counts >= min_wells).any():
        raise DataError(f"well_position: no well position has {min_wells} or more reference wells across plates "
                        f"(at most {int(counts.max())}); it needs plates sharing a layout; use row_column instead")
    sums = np.zeros((n_pos, x.shape[1]))
    np.add.at(sums, ref_pos, x[reference])
    grand = x[reference].mean(axis=0)
    trusted = counts >= min_wells
    with np.errstate(invalid="ignore", divide="ignore"):
        effect = np.where(trusted[:, None], sums / counts[:, None] - grand, 0.0)
    used = np.unique(positions)
    return effect[positions], int((~trusted[used]).sum())


def row_column_effects(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-well additive row + column effect, least squares on the reference wells, centred on their mean.

    Backfitting (alternating row and column means of the residuals) converges to the ordinary least-squares fit of
    ``x ~ row + column`` on the reference wells, balanced or not; a row or column without reference wells gets no
    effect. One plate at a time: call it per plate.
    """
    if not reference.any():
        raise DataError("row/column correction: no reference wells")
    xr, rr, cr = x[reference], rows[reference], cols[reference]
    _, r_idx = np.unique(rr, return_inverse=True)
    _, c_idx = np.unique(cr, return_inverse=True)
    n_r, n_c = int(r_idx.max()) + 1, int(c_idx.max()) + 1
    r_count = np.bincount(r_idx, minlength=n_r)[:, None].astype(np.float64)
    c_count = np.bincount(c_idx, minlength=n_c)[:, None].astype(np.float64)
    resid = xr - xr.mean(axis=0)
    row_eff = np.zeros((n_r, x.shape[1]))
    col_eff = np.zeros((n_c, x.shape[1]))
    scale = max(float(np.abs(resid).max()), 1e-300)
    for _ in range(BACKFIT_ITERATIONS):
        step_r = np.zeros_like(row_eff)
        np.add.at(step_r, r_idx, resid - row_eff[r_idx] - col_eff[c_idx])
        row_eff += step_r / r_count
        step_c = np.zeros_like(col_eff)
        np.add.at(step_c, c_idx, resid - row_eff[r_idx] - col_eff[c_idx])
        col_eff += step_c / c_count
        if max(np.abs(step_r).max() / r_count.min(), np.abs(step_c).max() / c_count.min()) <= BACKFIT_TOLERANCE * scale:
            break
    fitted = row_eff[r_idx] + col_eff[c_idx]
    centre = fitted.mean(axis=0)
    row_map = dict(zip(np.unique(rr).tolist(), range(n_r)))
    col_map = dict(zip(np.unique(cr).tolist(), range(n_c)))
    effect = np.zeros_like(x, dtype=np.float64)
    r_all = np.array([row_map.get(int(r), -1) for r in rows])
    c_all = np.array([col_map.get(int(c), -1) for c in cols])
    effect += np.where((r_all >= 0)[:, None], row_eff[np.maximum(r_all, 0)], 0.0)
    effect += np.where((c_all >= 0)[:, None], col_eff[np.maximum(c_all, 0)], 0.0)
    return effect - centre


def rank_inverse_normal(x: np.ndarray, reference: np.ndarray | None = None, c: float = BLOM_OFFSET) -> np.ndarray:
    """Rank-based inverse-normal transform per feature: Phi^-1((rank - c) / (n - 2c + 1)), ties averaged.

    With ``reference`` (a mask), each value is ranked among the reference wells plus itself, so the reference
    distribution defines the scale and a treated well's extremeness is measured against the controls.
    """
    x = np.asarray(x, dtype=np.float64)
    if reference is None or reference.all():
        ranks = rankdata(x, method="average", axis=0)
        n = x.shape[0]
        return ndtri((ranks - c) / (n - 2 * c + 1))
    ref = np.sort(x[reference], axis=0)
    own = np.asarray(reference, dtype=bool)
    # a reference well is ranked among the references (itself one of them); any other well among them plus itself
    n = np.where(own, ref.shape[0], ref.shape[0] + 1)[:, None]
    below = np.column_stack([np.searchsorted(ref[:, j], x[:, j], side="left") for j in range(x.shape[1])])
    upto = np.column_stack([np.searchsorted(ref[:, j], x[:, j], side="right") for j in range(x.shape[1])])
    rank = below + (upto - below + np.where(own, 1, 2)[:, None]) / 2.0
    return ndtri((rank - c) / (n - 2 * c + 1))


def outlier_features(x: np.ndarray, bound: float = OUTLIER_BOUND, quantile: float = OUTLIER_QUANTILE) -> np.ndarray:
    """Mask of features whose ``quantile`` of |value| exceeds ``bound`` (the JUMP recipe drops them)."""
    return np.quantile(np.abs(x), quantile, axis=0) > bound


def harmony(x: np.ndarray, batches: pd.Series, seed: int = 0, max_iter: int = 20, nclust: int | None = None,
            theta: float | None = None) -> np.ndarray:
    """Harmony-corrected profiles (harmonypy), one row per well, same number of features.

    ``nclust`` defaults to harmonypy's rule (min(N / 30, 100), at least 1); JUMP used 300 for its 100k+ compound
    wells.
    """
    # lazy: harmonypy loads its compiled backend (~0.3 s), and only chains with a harmony step need it
    import harmonypy

    if batches.nunique(dropna=False) < 2:
        raise DataError(f"harmony: the batch key {batches.name!r} has a single value; nothing to correct")
    if batches.isna().any():
        raise DataError(f"harmony: the batch key {batches.name!r} has missing values")
    meta = pd.DataFrame({"key": batches.astype(str).to_numpy()})
    # harmonypy's default, min(N / 30, 100) clusters, is 0 below 15 wells; one cluster is per-batch centring
    clusters = max(1, min(round(len(x) / 30), 100)) if nclust is None else int(nclust)
    if not 1 <= clusters <= len(x):
        raise DataError(f"harmony: nclust {clusters} must be between 1 and the number of wells ({len(x)})")
    kwargs: dict[str, object] = {"max_iter_harmony": max_iter, "random_state": seed, "verbose": False,
                                 "nclust": clusters}
    if theta is not None:
        kwargs["theta"] = float(theta)
    try:
        result = harmonypy.run_harmony(np.ascontiguousarray(x, dtype=np.float64), meta, ["key"], **kwargs)
    except (ValueError, np.linalg.LinAlgError, RuntimeError) as exc:
        raise DataError(f"harmony on {len(x)} wells x {x.shape[1]} features failed: "
                        f"{str(exc).splitlines()[0][:200]}") from None
    z = np.asarray(result.Z_corr)
    if z.shape != x.shape:  # harmonypy < 2 returned (features, wells); requirements pin >= 2
        raise DataError(f"harmony: harmonypy returned shape {z.shape} for input {x.shape}; upgrade harmonypy to >= 2")
    return z
