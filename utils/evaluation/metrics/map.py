"""mAP in copairs' standard form: per-profile AP under pair rules, normalised AP, permutation nulls and BH.

The numbers equal copairs' to 1e-9 (AP) and exactly (p-values), so results stay comparable with published copairs
figures, but no pair list is built: similarities and rankings are computed one block of queries at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from utils.errors import DataError
from utils.evaluation.metrics._blocks import (
    SENTINEL,
    block_size,
    codes,
    iter_blocks,
    row_searchsorted,
    run_blocks,
    similarity_block,
    sorted_relevance,
    unit_rows,
)
from utils.evaluation.metrics.exact import exact_p_value, log_arrangements

AP_BLOCK_ROWS = 256
NULL_CHUNK_BYTES = 64 * 1024**2


@dataclass
class PairRules:
    """copairs-style pair rules: positives share ``pos_sameby`` and differ in ``pos_diffby``; negatives likewise."""

    pos_sameby: tuple[str, ...]
    pos_diffby: tuple[str, ...] = ()
    neg_sameby: tuple[str, ...] = ()
    neg_diffby: tuple[str, ...] = ()


def _rule_mask(col_codes: dict[str, np.ndarray], blk: slice, same: Sequence[str], diff: Sequence[str]) -> np.ndarray:
    """Pairs of a query block with all columns that satisfy one sameby/diffby rule."""
    first = next(iter(col_codes.values()))
    mask = np.ones((blk.stop - blk.start, len(first)), dtype=bool)
    for c in same:
        v = col_codes[c]
        mask &= v[blk][:, None] == v[None, :]
    for c in diff:
        v = col_codes[c]
        mask &= v[blk][:, None] != v[None, :]
    return mask


def average_precision(
    meta: pd.DataFrame,
    feats: np.ndarray,
    rules: PairRules,
    device: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Per-profile AP exactly as copairs.map.average_precision (cosine), without building pair lists.

    Similarities are rounded to float32 and ranked by the float32 key 1 - s, positives first among equal keys,
    which is copairs' tie handling; matching it to the bit is what lets ``mean_average_precision`` reproduce
    copairs' p-values.

    Parameters
    ----------
    meta:
        One row per profile, holding every column the rules name (no missing values there).
    feats:
        (N, F) profiles in ``meta``'s row order; rows must not be all zero (cosine is undefined there).
    rules:
        Which pairs are positives and which are negatives; the two sets must be disjoint.
    device, progress:
        Where the similarity GEMM runs (a torch device; None: numpy), and whether to show a bar over the blocks.

    Returns
    -------
    pandas.DataFrame
        ``meta`` (index reset) plus n_pos_pairs, n_total_pairs, average_precision and normalized_average_precision;
        AP is NaN for profiles without positive pairs.
    """
    columns = list(dict.fromkeys([*rules.pos_sameby, *rules.pos_diffby, *rules.neg_sameby, *rules.neg_diffby]))
    missing = [c for c in columns if c not in meta.columns]
    if missing:
        raise DataError(f"pair rules name missing metadata columns: {', '.join(missing)}")
    if meta[columns].isna().any(axis=None):
        bad = [c for c in columns if meta[c].isna().any()]
        raise DataError(f"metadata columns used by the pair rules have missing values: {', '.join(bad)}")
    if set(rules.pos_sameby) & set(rules.pos_diffby) or set(rules.neg_sameby) & set(rules.neg_diffby):
        raise DataError("sameby and diffby must be disjoint")
    unit = unit_rows(feats, "cosine")
    n = unit.shape[0]
    col_codes = {c: codes(meta[c]) for c in columns}
    order = np.lexsort([col_codes[c] for c in reversed(rules.pos_sameby)]) if rules.pos_sameby else np.arange(n)
    ap = np.full(n, np.nan)
    n_pos = np.zeros(n, dtype=np.int64)
    n_tot = np.zeros(n, dtype=np.int64)
    reordered = {c: v[order].astype(np.int32) for c, v in col_codes.items()}
    unit_o = np.ascontiguousarray(unit[order])
    one = np.float32(1)

    def one_block(blk: slice) -> None:
        """Metrics of one block of query rows, written into its own rows only."""
        qidx = np.arange(blk.start, blk.stop)
        local = np.arange(len(qidx))
        pos = _rule_mask(reordered, blk, rules.pos_sameby, rules.pos_diffby)
        neg = _rule_mask(reordered, blk, rules.neg_sameby, rules.neg_diffby)
        pos[local, qidx] = False
        neg[local, qidx] = False
        if (pos & neg).any():
            raise DataError("the pair rules make some pairs both positive and negative; make them disjoint")
        cand = pos | neg
        cols = np.flatnonzero(cand.any(axis=0))
        if cols.size == 0:
            return
        pos, cand = pos[:, cols], cand[:, cols]
        sims = similarity_block(unit_o[blk], unit_o[cols], device).astype(np.float32)
        enc = sorted_relevance(one - sims, pos, cand)
        # AP = mean over positives of (their rank among positives) / (their rank overall)
        rows, ranks = np.nonzero(((enc & 1) == 0) & (enc != SENTINEL))
        npos = pos.sum(axis=1)
        first = np.r_[0, np.cumsum(npos)[:-1]]
        j = np.arange(1, len(rows) + 1) - first[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            ap_blk = np.bincount(rows, weights=j / (ranks + 1), minlength=len(qidx)) / npos
        target = order[qidx]
        ap[target] = np.where(npos > 0, ap_blk, np.nan)
        n_pos[target] = npos
        n_tot[target] = cand.sum(axis=1)

    blocks = list(iter_blocks(n, min(AP_BLOCK_ROWS, block_size(n))))
    run_blocks(one_block, blocks, "AP", progress)
    result = meta.reset_index(drop=True).copy()
    result["n_pos_pairs"] = n_pos
    result["n_total_pairs"] = n_tot
    result["average_precision"] = ap
    paired = n_tot > 0
    nap = np.full(n, np.nan)
    nap[paired] = normalize_ap(ap[paired], n_pos[paired], n_tot[paired] - n_pos[paired])
    result["normalized_average_precision"] = nap
    return result


def expected_ap(m: np.ndarray, n_neg: np.ndarray) -> np.ndarray:
    """Exact expected AP of a random ranking with M positives among L = M + N (copairs' mu0)."""
    m = np.asarray(m, dtype=np.int64)
    total = m + np.asarray(n_neg, dtype=np.int64)
    lmax = int(total.max()) if total.size else 0
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, lmax + 1, dtype=np.float64))])
    h = harmonic[total]
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = (1.0 / total) * (((m - 1.0) / (total - 1.0)) * (total - h) + h)
    mu = np.where(total == 1, np.where(m == 1, 1.0, 0.0), mu)
    mu = np.where(m == 0, 0.0, mu)
    mu = np.where((m == total) & (total > 1), 1.0, mu)
    return mu


def normalize_ap(ap: np.ndarray, m: np.ndarray, n_neg: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """(AP - mu0) / (1 - mu0), clipped to [-1, 1]: 0 is chance, 1 is perfect, whatever the list length."""
    mu = expected_ap(m, n_neg)
    return np.clip((np.asarray(ap, dtype=float) - mu) / np.maximum(1 - mu, eps), -1.0, 1.0)


_NULL_CACHE: dict[tuple[bytes, tuple[int, ...], int, int, bytes], np.ndarray] = {}
_NULL_CACHE_ENTRIES = 8


def cached_null_distributions(confs: np.ndarray, null_size: int, seed: int,
                              needed: np.ndarray | None = None) -> np.ndarray:
    """null_distributions, memoised per process: representations of one set share their configurations."""
    confs = np.ascontiguousarray(confs, dtype=np.int64)
    needed = np.ones(len(confs), dtype=bool) if needed is None else np.asarray(needed, dtype=bool)
    key = (confs.tobytes(), confs.shape, null_size, seed, needed.tobytes())
    if key not in _NULL_CACHE:
        if len(_NULL_CACHE) >= _NULL_CACHE_ENTRIES:
            _NULL_CACHE.pop(next(iter(_NULL_CACHE)))
        _NULL_CACHE[key] = null_distributions(confs, null_size, seed, needed)
    return _NULL_CACHE[key]


def null_distributions(confs: np.ndarray, null_size: int, seed: int,
                       needed: np.ndarray | None = None) -> np.ndarray:
    """AP of random rankings for each (n_pos, n_total) configuration, drawn exactly as copairs draws them.

    Configurations must be unique rows sorted as np.unique(axis=0) sorts them, because each one's RNG seed is the
    next draw of default_rng(seed).integers(8096). One iteration per configuration, not per profile. Rows outside
    ``needed`` (configurations only exact p-values use) are left zero: their seeds are still drawn, so every other
    row keeps copairs' draws, and a 50000-candidate configuration no longer permutes null_size x 50000 ranks for
    nothing.
    """
    rng = np.random.default_rng(seed)
    seeds = rng.integers(8096, size=len(confs))
    out = np.zeros((len(confs), null_size), dtype=np.float32)
    for i, (num_pos, total) in enumerate(confs):
        if needed is not None and not needed[i]:
            continue
        sub = np.random.default_rng(seeds[i])
        dtype = np.uint16 if total < 2**16 else np.uint32
        idx = np.tile(np.arange(total, dtype=dtype), (null_size, 1))
        sub.permuted(idx, axis=1, out=idx)
        rel_k = np.sort(idx[:, :num_pos], axis=1)
        pr_k = np.arange(1, num_pos + 1, dtype=np.float32) / (rel_k + 1)
        out[i] = (pr_k.sum(axis=1) / num_pos).astype(np.float32)
    return out


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values, computed as statsmodels' fdr_bh computes them."""
    p = np.asarray(pvalues, dtype=np.float64)
    n = len(p)
    if n == 0:
        return p.copy()
    order = np.argsort(p)
    ps = p[order]
    ecdf = np.arange(1, n + 1) / float(n)
    adj = np.minimum.accumulate((ps / ecdf)[::-1])[::-1]
    adj[adj > 1] = 1
    out = np.empty_like(adj)
    out[order] = adj
    return out


def mean_average_precision(
    ap_scores: pd.DataFrame,
    sameby: Sequence[str],
    null_size: int,
    threshold: float,
    seed: int,
    exact: bool = True,
) -> pd.DataFrame:
    """Group mAP with permutation p-values and BH correction, as copairs.map.mean_average_precision, and exact
    p-values where the null is smaller than the permutation budget.

    The null of a group is the mean of its members' null APs (same draws as copairs) and
    p = (1 + #{null > mAP}) / (1 + null_size), so a group is called retrieved on the same evidence copairs would use.
    Groups are reduced with one add.reduceat, not a loop. When a group's members have at most ``null_size``
    arrangements in all (the product of C(n_total, n_pos)), sampling only re-draws them and its floor
    1/(null_size + 1) is unreachable (a group whose members are all positives got p = 1/(null_size + 1) for a
    certain AP of 1), so with ``exact`` its p-value is P(null mean AP >= mAP), enumerated (``metrics/exact.py``).

    Parameters
    ----------
    ap_scores:
        The output of ``average_precision`` (rows without a valid AP or without positive pairs are ignored).
    sameby:
        The columns that define a group, e.g. ``["perturbation_id"]``.
    null_size:
        Random rankings per configuration in the null (copairs' null_size).
    threshold:
        Significance level for ``below_p`` and ``below_corrected_p``.
    seed:
        Seed of the null draws; the same seed gives copairs' nulls.
    exact:
        Exact p-values for groups with at most ``null_size`` arrangements; False gives copairs' numbers throughout.

    Returns
    -------
    pandas.DataFrame
        One row per group (sorted by ``sameby``): mean_average_precision, median_average_precision,
        mean_normalized_average_precision, n_profiles, p_value, p_value_method (exact or sampled), min_p_value
        (the smallest p the group could reach), can_pass (min_p_value < threshold), corrected_p_value (BH),
        below_p and below_corrected_p.
    """
    sameby = list(sameby)
    valid = ap_scores[ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)]
    valid = valid.reset_index(drop=True).copy()
    cols = sameby + [
        "mean_average_precision",
        "median_average_precision",
        "mean_normalized_average_precision",
        "n_profiles",
        "p_value",
        "p_value_method",
        "min_p_value",
        "can_pass",
        "corrected_p_value",
        "below_p",
        "below_corrected_p",
    ]
    if valid.empty:
        return pd.DataFrame(columns=cols)
    confs_all = valid[["n_pos_pairs", "n_total_pairs"]].to_numpy()
    confs, rev = np.unique(confs_all, axis=0, return_inverse=True)
    grouped = valid.groupby(sameby, observed=True, sort=True)
    scores = grouped.agg(
        mean_average_precision=("average_precision", "mean"),
        median_average_precision=("average_precision", "median"),
        mean_normalized_average_precision=("normalized_average_precision", "mean"),
        n_profiles=("average_precision", "size"),
    ).reset_index()
    gid = grouped.ngroup().to_numpy()
    order = np.argsort(gid, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(gid[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    conf_of = rev.ravel()[order]
    observed = scores["mean_average_precision"].to_numpy()
    is_exact = np.zeros(len(starts), dtype=bool)
    if exact:
        # per distinct configuration, not per member: a data set repeats few (n_pos, n_total) pairs
        log_count = np.add.reduceat(log_arrangements(confs[:, 0], confs[:, 1])[conf_of], starts)
        is_exact = log_count <= np.log(null_size) + 1e-9
    needed = np.zeros(len(confs), dtype=bool)
    needed[conf_of[~np.repeat(is_exact, ends - starts)]] = True
    nulls = cached_null_distributions(confs, null_size, seed, needed)
    # groups with the same ordered member configurations share one null (same float32 sums): compute it once
    sizes = ends - starts
    seq_id = np.empty(len(starts), dtype=np.int64)
    seq_rows, seq_sizes = [], []
    for size in np.unique(sizes):
        g = np.flatnonzero(sizes == size)
        uniq, inv = np.unique(conf_of[starts[g][:, None] + np.arange(size)], axis=0, return_inverse=True)
        seq_id[g] = sum(len(r) for r in seq_sizes) + inv.ravel()
        seq_rows.append(uniq.ravel())
        seq_sizes.append(np.full(len(uniq), size))
    rows_all, seq_len = np.concatenate(seq_rows), np.concatenate(seq_sizes)
    seq_start = np.r_[0, np.cumsum(seq_len)[:-1]]
    by_seq = np.argsort(seq_id, kind="stable")
    num = np.empty(len(starts), dtype=np.int64)
    # chunks of sequences bound the gathered null rows (null_size floats each) to about NULL_CHUNK_BYTES
    per_chunk = max(1, NULL_CHUNK_BYTES // (4 * null_size))
    u0 = 0
    while u0 < len(seq_len):
        u1 = max(u0 + 1, int(np.searchsorted(seq_start + seq_len, seq_start[u0] + per_chunk, side="right")))
        rows = rows_all[seq_start[u0] : seq_start[u1 - 1] + seq_len[u1 - 1]]
        block, offs, lens = nulls[rows], seq_start[u0:u1] - seq_start[u0], seq_len[u0:u1]
        means = np.empty((u1 - u0, null_size), dtype=np.float32)
        for size in np.unique(lens):
            sel = np.flatnonzero(lens == size)
            # numpy.mean over the members, as copairs reduces them: float32, in its summation order, to the bit
            means[sel] = block[offs[sel][:, None] + np.arange(size)].mean(axis=1)
        means.sort(axis=1)
        lo, hi = np.searchsorted(seq_id[by_seq], [u0, u1])
        groups = by_seq[lo:hi]
        # copairs compares its float32 null with the mAP as a Python float, i.e. in float32
        below = row_searchsorted(means, seq_id[groups] - u0, observed[groups].astype(np.float32), side="right")
        num[groups] = null_size - below
        u0 = u1
    scores["p_value"] = (num + 1) / (null_size + 1)
    scores["p_value_method"] = "sampled"
    scores["min_p_value"] = 1.0 / (null_size + 1)
    member_confs = confs[conf_of]
    for g in np.flatnonzero(is_exact):
        key = tuple(sorted(tuple(int(v) for v in c) for c in member_confs[starts[g]:ends[g]]))
        p, floor = exact_p_value(float(observed[g]), key)
        scores.loc[g, ["p_value", "min_p_value"]] = p, floor
        scores.loc[g, "p_value_method"] = "exact"
    scores["can_pass"] = scores["min_p_value"] < threshold
    scores["corrected_p_value"] = benjamini_hochberg(scores["p_value"].to_numpy())
    scores["below_p"] = scores["p_value"] < threshold
    scores["below_corrected_p"] = scores["corrected_p_value"] < threshold
    return scores[cols]
