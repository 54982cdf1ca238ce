"""Exact null distributions of AP and of a group's mean AP, for nulls smaller than the permutation budget.

Under the null a profile's M positives take a uniformly random set of M ranks among its L candidates, so its AP has
C(L, M) equally likely arrangements; a group's mean AP, its members ranked independently, has the product of its
members' counts. When that product is at most ``null_size`` a sampled null (copairs') spends its draws re-drawing
the same arrangements and its p-value floor 1/(null_size + 1) is one no arrangement reaches, so the p-value is
computed exactly: P(null mean AP >= observed), enumerated.

Functions are pure and memoised per configuration, because one data set repeats few (M, L) configurations.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np

# APs equal to this many decimals are one value: float sums of the same rational differ by ~1e-16, and each merge
# of a group's convolution rounds once, so keys stay within ~1e-13 of the true mean
VALUE_DECIMALS = 14
# the observed mAP counts as reached by null values this close below it: above the keys' rounding error, and below
# the gap between distinct arrangement values (at least ~1/L^2 for L candidates; 1e-9 merged ranks 40000 and 40001
# of a 50000-arrangement null)
TIE_TOLERANCE = 1e-12


def log_arrangements(m: np.ndarray, total: np.ndarray) -> np.ndarray:
    """log C(L, M) per member, without overflow."""
    m = np.asarray(m, dtype=np.float64)
    total = np.asarray(total, dtype=np.float64)
    return np.array([math.lgamma(t + 1) - math.lgamma(k + 1) - math.lgamma(t - k + 1) for k, t in zip(m, total)])


@lru_cache(maxsize=4096)
def ap_distribution(m: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact null distribution of AP for M positives among L candidates: distinct values and how many of the
    C(L, M) arrangements give each (integer counts, so tail probabilities are exact ratios).

    Every one of the C(L, M) rank sets is enumerated; AP = mean over positives of (rank among positives) / rank.
    """
    if not 1 <= m <= total:
        raise ValueError(f"AP null needs 1 <= n_pos <= n_total, got {m}, {total}")
    if total - m < m:
        return _merge(_ap_from_negatives(m, total), np.ones(math.comb(total, m), dtype=np.int64))
    ranks = np.array(list(itertools.combinations(range(1, total + 1), m)), dtype=np.float64)
    ap = (np.arange(1, m + 1) / ranks).mean(axis=1)
    return _merge(ap, np.ones(len(ap), dtype=np.int64))


def _ap_from_negatives(m: int, total: int) -> np.ndarray:
    """AP of every arrangement enumerated by its K = L - M negative ranks, so memory is C(L, M) * K, not * M.

    With negatives at sorted ranks n_1 < ... < n_K, a positive at rank r is (r - #{n_j < r})-th among positives, and
    summing over the positives gives AP = 1 - (K H_L - sum_j H_{n_j} - sum_j (j - 1) / n_j) / M (H: harmonic numbers).
    """
    k = total - m
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, total + 1))])
    if k == 0:
        return np.ones(1)
    neg = np.array(list(itertools.combinations(range(1, total + 1), k)), dtype=np.int64)
    lost = k * harmonic[total] - harmonic[neg].sum(axis=1) - (np.arange(k) / neg).sum(axis=1)
    return 1.0 - lost / m


def _merge(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add the counts of equal values (to ``VALUE_DECIMALS``); values sorted ascending."""
    keys, inverse = np.unique(np.round(values, VALUE_DECIMALS), return_inverse=True)
    merged = np.zeros(len(keys), dtype=np.int64)
    np.add.at(merged, inverse.ravel(), counts)
    return keys, merged


@lru_cache(maxsize=4096)
def mean_ap_distribution(confs: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Exact null distribution of the mean AP of independent members with these (n_pos, n_total) configurations:
    distinct values and arrangement counts."""
    values, counts = np.zeros(1), np.ones(1, dtype=np.int64)
    for m, total in confs:
        v, c = ap_distribution(m, total)
        values, counts = _merge((values[:, None] + v[None, :]).ravel(), (counts[:, None] * c[None, :]).ravel())
    return values / len(confs), counts


def exact_p_value(observed: float, confs: tuple[tuple[int, int], ...]) -> tuple[float, float]:
    """P(null mean AP >= observed) and the smallest p-value any observation could reach (P(null = max))."""
    values, counts = mean_ap_distribution(confs)
    tail = np.cumsum(counts[::-1])[::-1]
    reached = int(np.searchsorted(values, observed - TIE_TOLERANCE, side="left"))
    if reached == len(values):
        raise ValueError(f"observed mAP {observed} exceeds every arrangement of {confs}")
    return int(tail[reached]) / int(tail[0]), int(tail[-1]) / int(tail[0])
