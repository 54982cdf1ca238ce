"""The paper's profile-level curves: precision and recall over k and over distance thresholds, then F1 and AUC.

One blocked sweep ranks every query's neighbours once; the k curve, the distance curve, precision@R and sklearn's
average precision are all read off that one ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.evaluation.metrics._blocks import (
    SENTINEL,
    block_size,
    float_from_monotone,
    iter_blocks,
    row_searchsorted,
    run_blocks,
    same_label,
    similarity_block,
    sorted_relevance,
)

PAPER_KS = tuple(range(1, 50, 2))
PAPER_THRESHOLDS = tuple(np.round(np.arange(0.01, 1.0001, 0.03), 2))


@dataclass
class ProfileCurves:
    """Per-query curves of one profile level; rows are queries."""

    ks: np.ndarray
    thresholds: np.ndarray
    n_pos: np.ndarray
    prec_k: np.ndarray
    rec_k: np.ndarray
    prec_d: np.ndarray
    rec_d: np.ndarray
    prec_r: np.ndarray
    ap: np.ndarray


def profile_curves(
    unit: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = PAPER_KS,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    device: str | None = None,
    progress: bool = False,
) -> ProfileCurves:
    """The paper's retrieval curves for queries against all other profiles, same label = relevant.

    Neighbours are ranked by descending similarity; among equal similarities relevant ones rank first. ``ap`` is
    sklearn's average precision (tied scores form one threshold). Distance neighbours are d = 1 - s < t + 1e-6, the
    paper's rule, so the published curves are reproduced to the last neighbour.

    Parameters
    ----------
    unit:
        (N, F) unit rows (``unit_rows``; centred first for correlation), so a dot product is the similarity.
    labels:
        (N,) int label codes; -1 (missing) is never relevant. A query's positives are the other rows of its label.
    ks:
        Neighbour counts of the k curve; those above N - 1 are dropped.
    thresholds:
        Distance thresholds of the distance curve.
    device, progress:
        Where the similarity GEMM runs (a torch device; None: numpy), and whether to show a bar over the blocks.

    Returns
    -------
    ProfileCurves
        Per-query precision/recall at each k and threshold, precision@R and AP (NaN without positives), plus
        ``n_pos`` per query and the ``ks`` actually used.
    """
    n = unit.shape[0]
    ks = np.array([k for k in ks if k <= n - 1], dtype=np.int64)
    thr = np.asarray(thresholds, dtype=np.float64)
    label_count = np.bincount(labels[labels >= 0], minlength=int(labels.max()) + 1 if n else 0)
    n_pos = np.where(labels >= 0, label_count[np.maximum(labels, 0)] - 1, 0).astype(np.int64)
    out = ProfileCurves(
        ks=ks,
        thresholds=thr,
        n_pos=n_pos,
        prec_k=np.full((n, len(ks)), np.nan),
        rec_k=np.full((n, len(ks)), np.nan),
        prec_d=np.full((n, len(thr)), np.nan),
        rec_d=np.full((n, len(thr)), np.nan),
        prec_r=np.full(n, np.nan),
        ap=np.full(n, np.nan),
    )
    edges = thr + 1e-6

    def one_block(blk: slice) -> None:
        """Metrics of one block of query rows, written into its own rows only."""
        sims = similarity_block(unit[blk], unit, device)
        qidx = np.arange(blk.start, blk.stop)
        local = np.arange(len(qidx))
        rel = same_label(labels, blk)
        rel[local, qidx] = False
        cand = np.ones(sims.shape, dtype=bool)
        cand[local, qidx] = False
        npos = n_pos[blk]
        has_pos = npos > 0
        # ranking: one integer sort per block serves every curve, precision@R and AP
        enc = sorted_relevance(-sims, rel, cand)
        valid = enc != SENTINEL
        rel_sorted = ((enc & 1) == 0) & valid
        tp = np.cumsum(rel_sorted, axis=1, dtype=np.int64)
        tp0 = np.concatenate([np.zeros((len(qidx), 1), np.int64), tp], axis=1)  # tp0[:, m] = TP among the first m
        if len(ks):
            tpk = tp[:, ks - 1]
            out.prec_k[blk] = tpk / ks[None, :]
            out.rec_k[blk] = np.where(has_pos[:, None], tpk / np.maximum(npos, 1)[:, None], np.nan)
        out.prec_r[blk] = np.where(has_pos, tp0[local, npos] / np.maximum(npos, 1), np.nan)
        # distance curve: sorted rows have ascending d = 1 - s, so a bisection per threshold counts neighbours
        dist = np.where(valid, 1.0 + float_from_monotone(enc >> 1), np.inf)
        n_all = row_searchsorted(dist, local[:, None], edges[None, :])
        n_tp = tp0[local[:, None], n_all]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.prec_d[blk] = np.where(n_all > 0, n_tp / np.maximum(n_all, 1), np.nan)
            out.rec_d[blk] = np.where(has_pos[:, None], n_tp / np.maximum(npos, 1)[:, None], np.nan)
        # sklearn AP: each relevant item scores the precision at the end of its tie group
        rows, cols = np.nonzero(rel_sorted)
        group = enc >> 1
        end = row_searchsorted(group, rows, group[rows, cols], side="right")
        prec_at = tp0[rows, end] / end
        ap = np.bincount(rows, weights=prec_at, minlength=len(qidx)) / np.maximum(npos, 1)
        out.ap[blk] = np.where(has_pos, ap, np.nan)

    run_blocks(one_block, list(iter_blocks(n, block_size(n))), "profile PR", progress)
    return out


def _nanmean_cols(values: np.ndarray) -> np.ndarray:
    """Column means ignoring NaN; NaN (not a warning) for an all-NaN column."""
    values = np.atleast_2d(values)
    count = np.isfinite(values).sum(axis=0)
    total = np.nansum(values, axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def micro_macro(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over queries (micro) and mean over labels of per-label means (macro), column-wise, NaN-aware."""
    micro = _nanmean_cols(values)
    frame = pd.DataFrame(values)
    frame["__label"] = labels
    per_label = frame.groupby("__label").mean()
    macro = _nanmean_cols(per_label.to_numpy())
    return micro, macro


def f1(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Harmonic mean of averaged precision and recall (0 when both are 0, NaN when undefined)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        s = precision + recall
        return np.where(s > 0, 2 * precision * recall / np.where(s > 0, s, 1), np.where(s == 0, 0.0, np.nan))


def auc_trapezoid(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under a PR curve by the trapezoid rule over its finite points (NaN with fewer than two)."""
    ok = np.isfinite(precision) & np.isfinite(recall)
    if ok.sum() < 2:
        return float("nan")
    return float(np.trapezoid(precision[ok], recall[ok]))
