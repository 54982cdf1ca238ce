"""The paper's well-level metrics: 1-NN accuracies with exclusions, and per-sample silhouettes, in one sweep.

All of them read the same cosine similarities of z-scored wells, so one blocked sweep computes a block's
similarities once and every accuracy and silhouette consumes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

from utils.evaluation.metrics._blocks import block_size, iter_blocks, run_blocks, same_label, similarity_block

DENSE_ONEHOT_MAX = 512


@dataclass
class NNTask:
    """A 1-NN accuracy: the match rule and which candidates a query may not see (besides itself)."""

    name: str
    match: np.ndarray
    exclude_same: tuple[np.ndarray, ...] = ()
    exclude_all_of: tuple[tuple[np.ndarray, ...], ...] = ()


@dataclass
class WellNeighbourStats:
    """Per-query outcomes of the well-level sweep (NaN where a query has no eligible correct answer)."""

    nn_correct: dict[str, np.ndarray] = field(default_factory=dict)
    silhouette: dict[str, np.ndarray] = field(default_factory=dict)


def nn_accuracy(hits: np.ndarray) -> float:
    """Share of correct nearest neighbours over the queries that have an eligible correct answer (NaN if none)."""
    return float(np.nanmean(hits)) if np.isfinite(hits).any() else np.nan


def well_neighbour_stats(
    unit: np.ndarray,
    tasks: Sequence[NNTask],
    silhouette_labels: dict[str, np.ndarray] | None = None,
    device: str | None = None,
    progress: bool = False,
) -> WellNeighbourStats:
    """Nearest-neighbour hits and silhouettes of every well, from one blocked sweep over cosine similarities.

    For each task the excluded candidates are those sharing every code of one ``exclude_all_of`` tuple (or the
    single codes in ``exclude_same``); the query's nearest remaining neighbour (first index on ties) is correct if it
    shares the ``match`` code. Queries without any eligible correct candidate get NaN, so an accuracy averages only
    the queries that could have been right.

    Parameters
    ----------
    unit:
        (N, F) L2-normalised well profiles (``unit_rows``), so a dot product is the cosine similarity.
    tasks:
        The accuracies to compute; each names its match codes and exclusions (int codes, -1 = missing).
    silhouette_labels:
        Label codes per name whose per-sample silhouette (cosine distance, sklearn's definition) is wanted.
    device, progress:
        Where the similarity GEMM runs (a torch device; None: numpy), and whether to show a bar over the blocks.

    Returns
    -------
    WellNeighbourStats
        ``nn_correct[task.name]`` (1.0, 0.0 or NaN per well) and ``silhouette[name]`` (NaN for missing labels).
    """
    n = unit.shape[0]
    res = WellNeighbourStats()
    for t in tasks:
        res.nn_correct[t.name] = np.full(n, np.nan)
    sil = {name: _SilhouetteAccumulator(lab) for name, lab in (silhouette_labels or {}).items()}

    def one_block(blk: slice) -> None:
        """Metrics of one block of query rows, written into its own rows only."""
        sims = similarity_block(unit[blk], unit, device)
        qidx = np.arange(blk.start, blk.stop)
        local = np.arange(len(qidx))
        sims[local, qidx] = -np.inf
        masks: dict[int, np.ndarray] = {}

        def same(c: np.ndarray) -> np.ndarray:
            """Same-label mask of this block, computed once per label array and shared by every task."""
            if id(c) not in masks:
                masks[id(c)] = same_label(c, blk)
            return masks[id(c)]

        for t in tasks:
            excluded = np.zeros(sims.shape, dtype=bool)
            for c in t.exclude_same:
                excluded |= same(c)
            for combo in t.exclude_all_of:
                m = np.ones(sims.shape, dtype=bool)
                for c in combo:
                    m &= same(c)
                excluded |= m
            excluded[local, qidx] = True
            match = same(t.match)
            eligible = (match & ~excluded).any(axis=1)
            masked = np.where(excluded, -np.inf, sims)
            nearest = masked.argmax(axis=1)
            hit = match[local, nearest].astype(float)
            hit[~eligible] = np.nan
            res.nn_correct[t.name][blk] = hit
        if sil:
            dist = np.clip(1.0 - sims, 0.0, 2.0)
            dist[local, qidx] = 0.0
            for acc in sil.values():
                acc.add(dist, blk)

    run_blocks(one_block, list(iter_blocks(n, block_size(n))), "well 1-NN", progress)
    for name, acc in sil.items():
        res.silhouette[name] = acc.out
    return res


class _SilhouetteAccumulator:
    """Per-sample silhouette (sklearn's definition) accumulated block by block from per-label distance sums."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        valid = np.flatnonzero(labels >= 0)
        self.uniq, inv = np.unique(labels[valid], return_inverse=True)
        self.counts = np.bincount(inv, minlength=len(self.uniq)).astype(np.float64)
        onehot = sparse.csr_matrix((np.ones(len(valid)), (valid, inv)), shape=(len(labels), len(self.uniq)))
        # a dense GEMM beats the sparse product until the label count gets large
        self.onehot = onehot.toarray() if len(self.uniq) <= DENSE_ONEHOT_MAX else onehot.tocsc()
        self.out = np.full(len(labels), np.nan)

    def add(self, dist: np.ndarray, blk: slice) -> None:
        """Silhouettes of the block's queries; one product with the label one-hot sums distances per label."""
        qlab = self.labels[blk]
        ok = qlab >= 0
        if not ok.any() or len(self.uniq) == 0:
            return
        sums = np.asarray(dist @ self.onehot)
        pos = np.clip(np.searchsorted(self.uniq, qlab), 0, len(self.uniq) - 1)
        local = np.arange(len(qlab))
        own = self.counts[pos]
        mean_other = sums / self.counts[None, :]
        mean_other[local, pos] = np.inf
        b = mean_other.min(axis=1) if len(self.uniq) > 1 else np.full(len(qlab), np.nan)
        a = sums[local, pos] / np.maximum(own - 1, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = (b - a) / np.maximum(a, b)
        s = np.where(own > 1, np.nan_to_num(s), 0.0)
        self.out[blk] = np.where(ok, s, np.nan)
