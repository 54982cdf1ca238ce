"""Batch removal against biology conservation, in the spirit of the JUMP batch-correction benchmark.

Arevalo et al. (Nat Commun 2024) scored each correction with scIB-style batch-removal metrics and biology metrics
and ranked methods by 0.4 x batch + 0.6 x biology. Here every batch component is scaled to [0, 1] with 1 = no
batch signal, computed on the z-scored treated wells evaluate.py already scores, with scikit-learn / scipy only:

- ``silhouette``: mean over wells of 1 - |s|, s the well's silhouette of its batch label (cosine; the per-well
  values ``well_neighbour_stats`` already computes). scIB takes it within each cell-type label; wells of one
  target are too few for a within-label silhouette, so it is global here.
- ``classifier``: 1 - (balanced accuracy - chance) / (1 - chance) of the cross-validated batch classifier
  (``batch_classification``), clipped to [0, 1].
- ``ilisi``: kNN graph iLISI: per well, the inverse Simpson index 1 / sum_b p_b^2 of the batch labels among its k
  nearest neighbours (cosine), scaled as (iLISI - 1) / (n_batches - 1), averaged. scIB weights neighbours with a
  perplexity kernel; the unweighted kNN version needs no tuning and is tested against a loop.
- ``graph_connectivity``: per label (target) with 2+ wells, the fraction of its wells in the largest connected
  component of the kNN graph restricted to that label, averaged over labels (scIB's definition).

``batch_score`` is the mean of the defined components; ``bio_score`` the mean of the defined retrieval mAPs;
``overall_score`` = 0.4 x batch_score + 0.6 x bio_score. One batch leaves every batch component undefined (NaN,
with the reason), never a perfect 1.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

KNN = 15
KNN_BLOCK_ROWS = 2048
BATCH_WEIGHT = 0.4
BIO_WEIGHT = 0.6
COMPONENTS = ("silhouette", "classifier", "ilisi", "graph_connectivity")


def knn_indices(unit: np.ndarray, k: int = KNN, block: int = KNN_BLOCK_ROWS) -> np.ndarray:
    """(N, k) indices of each row's k most cosine-similar other rows (``unit`` rows have unit norm), computed one
    block of rows at a time so memory stays at block x N."""
    n = unit.shape[0]
    k = min(k, n - 1)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = unit[start:stop] @ unit.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, idx, axis=1), axis=1, kind="stable")
        out[start:stop] = np.take_along_axis(idx, order, axis=1)
    return out


def silhouette_score_batch(per_well: np.ndarray) -> float:
    """Mean of 1 - |s| over wells with a defined batch silhouette."""
    ok = np.isfinite(per_well)
    return float(np.mean(1.0 - np.abs(per_well[ok]))) if ok.any() else float("nan")


def classifier_score(bal_acc: float, n_batches: int) -> float:
    """1 for chance-level batch prediction, 0 for perfect prediction."""
    if not np.isfinite(bal_acc) or n_batches < 2:
        return float("nan")
    chance = 1.0 / n_batches
    return float(np.clip(1.0 - (bal_acc - chance) / (1.0 - chance), 0.0, 1.0))


def ilisi_score(neighbours: np.ndarray, batches: np.ndarray) -> float:
    """Mean normalised inverse Simpson index of batch labels over each well's neighbours."""
    _, codes = np.unique(batches, return_inverse=True)
    n_batches = int(codes.max()) + 1
    if n_batches < 2:
        return float("nan")
    counts = np.zeros((len(codes), n_batches))
    np.add.at(counts, (np.repeat(np.arange(len(codes)), neighbours.shape[1]), codes[neighbours].ravel()), 1.0)
    p = counts / neighbours.shape[1]
    lisi = 1.0 / (p**2).sum(axis=1)
    return float(np.mean((lisi - 1.0) / (n_batches - 1)))


def graph_connectivity(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Mean over labels with 2+ wells of the largest connected component's share in the label's kNN subgraph."""
    n = len(labels)
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    graph = csr_matrix((np.ones(len(rows)), (rows, neighbours.ravel())), shape=(n, n))
    shares = []
    for lab in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == lab)
        if len(members) < 2:
            continue
        _, comp = connected_components(graph[members][:, members], directed=False)
        shares.append(np.bincount(comp).max() / len(members))
    return float(np.mean(shares)) if shares else float("nan")


def batch_removal(unit: np.ndarray, batches: np.ndarray, labels: np.ndarray, silhouette: np.ndarray,
                  bal_acc: float) -> tuple[dict[str, float], list[str]]:
    """Every batch component and their mean, with a reason for each undefined one.

    Parameters
    ----------
    unit:
        (N, F) unit-norm z-scored treated wells.
    batches:
        (N,) batch label per well.
    labels:
        (N,) integer target code per well, -1 when unlabelled.
    silhouette:
        (N,) per-well silhouette of the batch label (NaN where undefined).
    bal_acc:
        Cross-validated balanced accuracy of the batch classifier.
    """
    n_batches = len(np.unique(batches))
    notes: list[str] = []
    nan = float("nan")
    if n_batches < 2:
        scores = dict.fromkeys(COMPONENTS, nan)
        notes.append("batch removal: one batch only, so the batch scores are undefined")
    else:
        neighbours = knn_indices(unit)
        scores = {"silhouette": silhouette_score_batch(silhouette),
                  "classifier": classifier_score(bal_acc, n_batches),
                  "ilisi": ilisi_score(neighbours, batches),
                  "graph_connectivity": graph_connectivity(neighbours, labels)}
        notes += [f"batch removal: {name} undefined" for name, v in scores.items() if not np.isfinite(v)]
    defined = [v for v in scores.values() if np.isfinite(v)]
    scores["batch_score"] = float(np.mean(defined)) if defined else nan
    return scores, notes


def overall(batch_score: float, bio_score: float) -> float:
    """0.4 x batch + 0.6 x biology (Arevalo et al. 2024); NaN when either is undefined."""
    return float(BATCH_WEIGHT * batch_score + BIO_WEIGHT * bio_score)


def bio_conservation(maps: dict[str, float]) -> float:
    """Mean of the defined retrieval mAPs (replicate and label)."""
    defined = [v for v in maps.values() if np.isfinite(v)]
    return float(np.mean(defined)) if defined else float("nan")
