"""Percent replicating: how often a perturbation's wells agree with each other more than random wells do.

Groups of one size are stacked and reduced together (one einsum per stack), so the cost is a few array passes
instead of a Python loop over perturbations or null draws.
"""

from __future__ import annotations

import numpy as np

from utils.evaluation.metrics._blocks import iter_blocks, unit_rows

STACK_BYTES = 2_000_000


def _median_offdiag(unit_groups: np.ndarray) -> np.ndarray:
    """Median of the upper-triangle correlations of each (g, n, F) stack of centred unit rows."""
    n = unit_groups.shape[1]
    gram = np.einsum("gif,gjf->gij", unit_groups, unit_groups)
    iu = np.triu_indices(n, k=1)
    return np.median(gram[:, iu[0], iu[1]], axis=1)


def _stack_rows(size: int) -> int:
    """Groups per stack so one stack's Gram matrices stay near STACK_BYTES."""
    return max(1, STACK_BYTES // max(1, size * size * 8))


def replicate_correlations(unit: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Median pairwise Pearson correlation within each group (NaN for single-member groups), one stack per size."""
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    out = np.full(len(uniq), np.nan)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    for size in np.unique(counts[counts >= 2]):
        gsel = np.flatnonzero(counts == size)
        idx = order[starts[gsel][:, None] + np.arange(size)[None, :]]
        for chunk in iter_blocks(len(gsel), _stack_rows(size)):
            out[gsel[chunk]] = _median_offdiag(unit[idx[chunk]])
    return out


def replicate_null(
    unit: np.ndarray, groups: np.ndarray, sizes: np.ndarray, null_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Median correlations of random sets of wells from distinct groups, with set sizes drawn from ``sizes``."""
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    draw_sizes = rng.choice(sizes, size=null_size, replace=True)
    out = np.empty(null_size)
    for size in np.unique(draw_sizes):
        sel = np.flatnonzero(draw_sizes == size)
        if size > len(uniq):
            out[sel] = np.nan
            continue
        picked = np.argpartition(rng.random((len(sel), len(uniq))), size - 1, axis=1)[:, :size]
        offs = np.floor(rng.random(picked.shape) * counts[picked]).astype(np.int64)
        idx = order[starts[picked] + offs]
        for chunk in iter_blocks(len(sel), _stack_rows(size)):
            out[sel[chunk]] = _median_offdiag(unit[idx[chunk]])
    return out


def percent_replicating(
    feats: np.ndarray, groups: np.ndarray, null_size: int = 1000, seed: int = 507, percentile: float = 95.0
) -> dict[str, float | str]:
    """Share of groups whose median replicate correlation beats the null's 95th percentile (null sizes matched).

    Each null set draws its size from the real groups' sizes, so a large group is not compared with a small null
    set (the median of more correlations is less spread, which would bias the share).

    Parameters
    ----------
    feats:
        (N, F) well profiles; rows must not be constant (Pearson correlation is undefined there).
    groups:
        (N,) group of each well, e.g. perturbation codes; groups with one well have no replicate correlation.
    null_size:
        Random sets of wells (each from distinct groups) in the null.
    seed:
        Seed of the null draws.
    percentile:
        The null percentile a group must beat.

    Returns
    -------
    dict
        repl_corr (mean median correlation over groups with two or more wells), percent_95 (the share beating the
        null), null_threshold, and reason (non-empty, with NaN values, when no group has two wells).
    """
    unit = unit_rows(feats, "correlation")
    corr = replicate_correlations(unit, groups)
    _, counts = np.unique(groups, return_counts=True)
    sizes = counts[counts >= 2]
    if sizes.size == 0:
        return {"repl_corr": np.nan, "percent_95": np.nan, "null_threshold": np.nan,
                "reason": "no perturbation has two or more wells"}
    null = replicate_null(unit, groups, sizes, null_size, np.random.default_rng(seed))
    thr = float(np.nanpercentile(null, percentile))
    real = corr[counts >= 2]
    return {
        "repl_corr": float(np.nanmean(real)),
        "percent_95": float(np.mean(real > thr)),
        "null_threshold": thr,
        "reason": "",
    }
