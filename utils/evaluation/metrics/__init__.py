"""Retrieval metrics on profile matrices, vectorised over blocks of queries so large N fits in bounded memory.

Every metric here works on a float feature matrix plus integer label codes (see ``codes``); the DataFrame handling
lives in ``utils.evaluation``. Similarities are computed once per block of query rows and every metric of a level
consumes that same block. torch is optional (a CUDA GEMM when available) and never imported at module import.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from utils.errors import DataError

SENTINEL = np.iinfo(np.int64).max
PAPER_KS = tuple(range(1, 50, 2))
PAPER_THRESHOLDS = tuple(np.round(np.arange(0.01, 1.0001, 0.03), 2))
MEMORY_BUDGET_BYTES = 512 * 1024**2
BYTES_PER_BLOCK_CELL = 64
AP_BLOCK_ROWS = 256
DENSE_ONEHOT_MAX = 512
NULL_CHUNK_BYTES = 64 * 1024**2
MAX_WORKERS = 2


def codes(values: pd.Series | Sequence[object] | np.ndarray) -> np.ndarray:
    """Turn labels into int codes (-1 for missing) so masks are integer comparisons, not string ones."""
    series = pd.Series(values).reset_index(drop=True)
    out, _ = pd.factorize(series, use_na_sentinel=True)
    return out.astype(np.int64)


def unit_rows(x: np.ndarray, metric: str = "cosine", name: str = "profiles") -> np.ndarray:
    """Centre (correlation) and L2-normalise rows so one matrix product gives every similarity."""
    x = np.asarray(x, dtype=np.float64)
    if metric == "correlation":
        x = x - x.mean(axis=1, keepdims=True)
    elif metric != "cosine":
        raise ValueError(f"unknown similarity metric {metric!r}: use cosine or correlation")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(norms[:, 0] == 0)
    if bad.size:
        what = "constant" if metric == "correlation" else "all-zero"
        raise DataError(f"{name}: row {bad[0]} is {what}, so its {metric} similarity is undefined ({bad.size} rows)")
    return x / norms


def block_size(n_columns: int, budget_bytes: int = MEMORY_BUDGET_BYTES) -> int:
    """Rows per block so the temporaries of all blocks in flight (about 64 bytes per cell) stay inside the budget."""
    per_worker = budget_bytes // worker_count()
    return int(max(1, min(4096, per_worker // max(1, n_columns * BYTES_PER_BLOCK_CELL))))


def iter_blocks(n: int, rows: int) -> Iterator[slice]:
    """Slices of consecutive query rows."""
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def worker_count() -> int:
    """Threads for the block loops: numpy's sorts and element-wise passes release the GIL, so blocks overlap."""
    try:
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def run_blocks(fn: Callable[[slice], None], blocks: list[slice], desc: str, progress: bool) -> None:
    """Apply ``fn`` to every block (each writes only its own rows), on a small thread pool when cores allow."""
    from tqdm import tqdm

    workers = worker_count()
    bar = tqdm(total=len(blocks), desc=desc, disable=not progress, leave=False)
    if workers <= 1 or len(blocks) <= 1:
        for blk in blocks:
            fn(blk)
            bar.update()
    else:
        from threadpoolctl import threadpool_limits

        # one BLAS thread per block worker: nested BLAS threads oversubscribe the cores and spin against each other
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(fn, blocks):
                bar.update()
    bar.close()


def similarity_block(queries: np.ndarray, refs: np.ndarray, device: str | None = None) -> np.ndarray:
    """Dot products of unit rows; on CUDA when asked, since the GEMM dominates for wide embeddings."""
    if device and device != "cpu":
        import torch

        q = torch.as_tensor(queries, device=device)
        r = torch.as_tensor(refs, device=device)
        return (q @ r.T).cpu().numpy()
    return queries @ refs.T


def _monotone_int(x: np.ndarray) -> np.ndarray:
    """Map floats to int64 with the same order (IEEE bit trick), so sorting integers sorts the floats."""
    if x.dtype == np.float32:
        bits = x.view(np.int32).astype(np.int64)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)
    bits = x.astype(np.float64, copy=False).view(np.int64)
    return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)


def sorted_relevance(score_key: np.ndarray, positive: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Sort each row by ascending key with positives first among ties; non-candidates go last as SENTINEL.

    One integer sort replaces argsort + gather: the key's order-preserving integer is shifted left and the low bit
    holds 0 for a positive, 1 for a negative. float64 keys need |key| < 2 so the shift cannot overflow.
    """
    encoded = (_monotone_int(score_key) << 1) | (~positive).astype(np.int64)
    encoded[~candidate] = SENTINEL
    encoded.sort(axis=1)
    return encoded


def _float_from_monotone(m: np.ndarray) -> np.ndarray:
    """Inverse of the float64 bit trick of _monotone_int (the map is its own inverse)."""
    bits = m ^ ((m >> 63) & 0x7FFFFFFFFFFFFFFF)
    return bits.view(np.float64)


def _row_searchsorted(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray, side: str = "left") -> np.ndarray:
    """np.searchsorted of each value within its own sorted row, as a vectorised bisection (log2(N) gathers)."""
    rows, values = np.broadcast_arrays(rows, values)
    n = sorted_rows.shape[1]
    lo = np.zeros(values.shape, dtype=np.int64)
    hi = np.full(values.shape, n, dtype=np.int64)
    active = lo < hi
    while active.any():
        mid = (lo + hi) // 2
        v = sorted_rows[rows, np.minimum(mid, n - 1)]
        right = (v < values) if side == "left" else (v <= values)
        right &= active
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
        active = lo < hi
    return lo


# ---------------------------------------------------------------------------------------------------------------
# Paper metrics at the well level: 1-NN accuracies with exclusions, and silhouettes, in one pass.


@dataclass
class NNTask:
    """A 1-NN accuracy: the match rule and which candidates a query may not see (besides itself)."""

    name: str
    match: np.ndarray
    exclude_same: tuple[np.ndarray, ...] = ()
    exclude_all_of: tuple[tuple[np.ndarray, ...], ...] = ()


@dataclass
class WellPassResult:
    """Per-query outcomes of the well-level pass (NaN where a query has no eligible correct answer)."""

    nn_correct: dict[str, np.ndarray] = field(default_factory=dict)
    silhouette: dict[str, np.ndarray] = field(default_factory=dict)


def _same(codes_: np.ndarray, rows: slice) -> np.ndarray:
    """Same-label mask of a query block against all columns; missing labels (-1) never match."""
    q = codes_[rows][:, None]
    return (q == codes_[None, :]) & (q >= 0)


def well_pass(
    unit: np.ndarray,
    tasks: Sequence[NNTask],
    silhouette_labels: dict[str, np.ndarray] | None = None,
    device: str | None = None,
    progress: bool = False,
) -> WellPassResult:
    """Nearest-neighbour accuracies and silhouettes from one blocked sweep over cosine similarities.

    For each task the excluded candidates are those sharing every code of one ``exclude_all_of`` tuple (or the
    single codes in ``exclude_same``); the query's nearest remaining neighbour (first index on ties) is correct if it
    shares the ``match`` code. Queries without any eligible correct candidate get NaN.
    """
    n = unit.shape[0]
    res = WellPassResult()
    for t in tasks:
        res.nn_correct[t.name] = np.full(n, np.nan)
    sil = {name: _SilhouetteAcc(lab) for name, lab in (silhouette_labels or {}).items()}

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
                masks[id(c)] = _same(c, blk)
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


class _SilhouetteAcc:
    """Per-sample silhouette (sklearn's definition) accumulated block by block from per-label distance sums."""

    def __init__(self, labels: np.ndarray) -> None:
        from scipy import sparse

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


# ---------------------------------------------------------------------------------------------------------------
# Paper metrics at the profile level: k and distance-threshold PR curves, precision@R and mAP, in one pass.


@dataclass
class ProfilePassResult:
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


def profile_pass(
    unit: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = PAPER_KS,
    thresholds: Sequence[float] = PAPER_THRESHOLDS,
    device: str | None = None,
    progress: bool = False,
) -> ProfilePassResult:
    """The paper's retrieval curves for queries against all other profiles, same label = relevant.

    Neighbours are ranked by descending similarity; among equal similarities relevant ones rank first. ``ap`` is
    sklearn's average precision (tied scores form one threshold). Distance neighbours are d = 1 - s < t + 1e-6.
    """
    n = unit.shape[0]
    ks = np.array([k for k in ks if k <= n - 1], dtype=np.int64)
    thr = np.asarray(thresholds, dtype=np.float64)
    label_count = np.bincount(labels[labels >= 0], minlength=int(labels.max()) + 1 if n else 0)
    n_pos = np.where(labels >= 0, label_count[np.maximum(labels, 0)] - 1, 0).astype(np.int64)
    out = ProfilePassResult(
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
        rel = _same(labels, blk)
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
        dist = np.where(valid, 1.0 + _float_from_monotone(enc >> 1), np.inf)
        n_all = _row_searchsorted(dist, local[:, None], edges[None, :])
        n_tp = tp0[local[:, None], n_all]
        with np.errstate(invalid="ignore", divide="ignore"):
            out.prec_d[blk] = np.where(n_all > 0, n_tp / np.maximum(n_all, 1), np.nan)
            out.rec_d[blk] = np.where(has_pos[:, None], n_tp / np.maximum(npos, 1)[:, None], np.nan)
        # sklearn AP: each relevant item scores the precision at the end of its tie group
        rows, cols = np.nonzero(rel_sorted)
        group = enc >> 1
        end = _row_searchsorted(group, rows, group[rows, cols], side="right")
        prec_at = tp0[rows, end] / end
        ap = np.bincount(rows, weights=prec_at, minlength=len(qidx)) / np.maximum(npos, 1)
        out.ap[blk] = np.where(has_pos, ap, np.nan)

    run_blocks(one_block, list(iter_blocks(n, block_size(n))), "profile PR", progress)
    return out


def micro_macro(values: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over queries (micro) and mean over labels of per-label means (macro), column-wise, NaN-aware."""
    micro = _nanmean_cols(values)
    frame = pd.DataFrame(values)
    frame["__label"] = labels
    per_label = frame.groupby("__label").mean()
    macro = _nanmean_cols(per_label.to_numpy())
    return micro, macro


def _nanmean_cols(values: np.ndarray) -> np.ndarray:
    """Column means ignoring NaN; NaN (not a warning) for an all-NaN column."""
    values = np.atleast_2d(values)
    count = np.isfinite(values).sum(axis=0)
    total = np.nansum(values, axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


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


# ---------------------------------------------------------------------------------------------------------------
# mAP in copairs' standard form.


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
    which is copairs' tie handling. Returns ``meta`` plus average_precision, normalized_average_precision,
    n_pos_pairs and n_total_pairs (AP NaN for profiles without positive pairs).
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


_NULL_CACHE: dict[tuple[bytes, tuple[int, ...], int, int], np.ndarray] = {}
_NULL_CACHE_ENTRIES = 8


def cached_null_distributions(confs: np.ndarray, null_size: int, seed: int) -> np.ndarray:
    """null_distributions, memoised per process: representations of one set share their configurations."""
    confs = np.ascontiguousarray(confs, dtype=np.int64)
    key = (confs.tobytes(), confs.shape, null_size, seed)
    if key not in _NULL_CACHE:
        if len(_NULL_CACHE) >= _NULL_CACHE_ENTRIES:
            _NULL_CACHE.pop(next(iter(_NULL_CACHE)))
        _NULL_CACHE[key] = null_distributions(confs, null_size, seed)
    return _NULL_CACHE[key]


def null_distributions(confs: np.ndarray, null_size: int, seed: int) -> np.ndarray:
    """AP of random rankings for each (n_pos, n_total) configuration, drawn exactly as copairs draws them.

    Configurations must be unique rows sorted as np.unique(axis=0) sorts them, because each one's RNG seed is the
    next draw of default_rng(seed).integers(8096). One iteration per configuration, not per profile.
    """
    rng = np.random.default_rng(seed)
    seeds = rng.integers(8096, size=len(confs))
    out = np.empty((len(confs), null_size), dtype=np.float32)
    for i, (num_pos, total) in enumerate(confs):
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
) -> pd.DataFrame:
    """Group mAP with permutation p-values and BH correction, as copairs.map.mean_average_precision.

    The null of a group is the mean of its members' null APs (same draws as copairs), p = (#null > mAP + 1) /
    (null_size + 1). Groups are reduced with one add.reduceat, not a loop.
    """
    sameby = list(sameby)
    valid = ap_scores[ap_scores["average_precision"].notna() & (ap_scores["n_pos_pairs"] > 0)]
    valid = valid.reset_index(drop=True).copy()
    cols = sameby + [
        "mean_average_precision",
        "mean_normalized_average_precision",
        "n_profiles",
        "p_value",
        "corrected_p_value",
        "below_p",
        "below_corrected_p",
    ]
    if valid.empty:
        return pd.DataFrame(columns=cols)
    confs_all = valid[["n_pos_pairs", "n_total_pairs"]].to_numpy()
    confs, rev = np.unique(confs_all, axis=0, return_inverse=True)
    nulls = cached_null_distributions(confs, null_size, seed)
    grouped = valid.groupby(sameby, observed=True, sort=True)
    scores = grouped.agg(
        mean_average_precision=("average_precision", "mean"),
        mean_normalized_average_precision=("normalized_average_precision", "mean"),
        n_profiles=("average_precision", "size"),
    ).reset_index()
    gid = grouped.ngroup().to_numpy()
    order = np.argsort(gid, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(gid[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    conf_of = rev.ravel()[order]
    observed = scores["mean_average_precision"].to_numpy()
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
        sums = np.add.reduceat(nulls[rows], seq_start[u0:u1] - seq_start[u0], axis=0)
        means = (sums.astype(np.float64) / seq_len[u0:u1, None]).astype(np.float32)
        means.sort(axis=1)
        lo, hi = np.searchsorted(seq_id[by_seq], [u0, u1])
        groups = by_seq[lo:hi]
        # copairs compares its float32 null with the mAP as a Python float, i.e. in float32
        below = _row_searchsorted(means, seq_id[groups] - u0, observed[groups].astype(np.float32), side="right")
        num[groups] = null_size - below
        u0 = u1
    scores["p_value"] = (num + 1) / (null_size + 1)
    scores["corrected_p_value"] = benjamini_hochberg(scores["p_value"].to_numpy())
    scores["below_p"] = scores["p_value"] < threshold
    scores["below_corrected_p"] = scores["corrected_p_value"] < threshold
    return scores[cols]


# ---------------------------------------------------------------------------------------------------------------
# Percent replicating and batch diagnostics.


def _median_offdiag(unit_groups: np.ndarray) -> np.ndarray:
    """Median of the upper-triangle correlations of each (g, n, F) stack of centred unit rows."""
    n = unit_groups.shape[1]
    gram = np.einsum("gif,gjf->gij", unit_groups, unit_groups)
    iu = np.triu_indices(n, k=1)
    return np.median(gram[:, iu[0], iu[1]], axis=1)


def replicate_correlations(unit: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Median pairwise Pearson correlation within each group (NaN for single-member groups), one stack per size."""
    uniq, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    out = np.full(len(uniq), np.nan)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    for size in np.unique(counts[counts >= 2]):
        gsel = np.flatnonzero(counts == size)
        idx = order[starts[gsel][:, None] + np.arange(size)[None, :]]
        for chunk in iter_blocks(len(gsel), max(1, 2_000_000 // max(1, size * size * 8))):
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
        for chunk in iter_blocks(len(sel), max(1, 2_000_000 // max(1, size * size * 8))):
            out[sel[chunk]] = _median_offdiag(unit[idx[chunk]])
    return out


def percent_replicating(
    feats: np.ndarray, groups: np.ndarray, null_size: int = 1000, seed: int = 507, percentile: float = 95.0
) -> dict[str, float | str]:
    """Share of groups whose median replicate correlation beats the null's 95th percentile (null sizes matched)."""
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


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Confusion matrix over the union of labels (rows true, columns predicted)."""
    labels, inv = np.unique(np.r_[y_true, y_pred], return_inverse=True)
    t, p = inv[: len(y_true)], inv[len(y_true) :]
    return np.bincount(t * len(labels) + p, minlength=len(labels) ** 2).reshape(len(labels), len(labels))


def matthews_corrcoef(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin's R_K) from the confusion matrix; 0 when undefined, like sklearn."""
    c = confusion(np.asarray(y_true), np.asarray(y_pred)).astype(np.float64)
    t, p = c.sum(axis=1), c.sum(axis=0)
    n, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * n - t @ p
    cov_ypyp = n * n - p @ p
    cov_ytyt = n * n - t @ t
    denom = cov_ytyt * cov_ypyp
    return float(cov_ytyp / np.sqrt(denom)) if denom > 0 else 0.0


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in y_true."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes, inv = np.unique(y_true, return_inverse=True)
    hit = (y_true == y_pred).astype(float)
    return float(np.mean(np.bincount(inv, weights=hit) / np.bincount(inv)))


def _ridge() -> object:
    """Closed-form linear classifier: fast, and enough to expose a linearly separable batch effect."""
    from sklearn.linear_model import RidgeClassifier

    return RidgeClassifier(alpha=1.0)


def _logistic() -> object:
    """Multinomial logistic regression, for users who prefer a probabilistic linear model."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=1000)


def _forest() -> object:
    """The paper's random forest (200 trees, seed 100): slow, catches non-linear batch effects."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=200, random_state=100, n_jobs=1)


BATCH_CLASSIFIERS = {"ridge": _ridge, "logistic": _logistic, "random_forest": _forest}


def batch_classification(
    feats: np.ndarray, batches: np.ndarray, classifier: str = "ridge", folds: int = 5, seed: int = 507
) -> dict[str, float | str]:
    """Cross-validated balanced accuracy and MCC of predicting batch from features (high = strong batch effect)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if classifier not in BATCH_CLASSIFIERS:
        raise DataError(f"unknown batch classifier {classifier!r}: choose from {', '.join(BATCH_CLASSIFIERS)}")
    batches = np.asarray(batches)
    _, counts = np.unique(batches, return_counts=True)
    nan = {"batch_bal_acc": np.nan, "batch_mcc": np.nan}
    if len(counts) < 2:
        return {**nan, "reason": "batch classification needs two or more batches"}
    k = int(min(folds, counts.min()))
    if k < 2:
        return {**nan, "reason": "batch classification needs two or more wells in every batch"}
    from threadpoolctl import threadpool_limits

    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    with threadpool_limits(limits=1, user_api="blas"):  # small solves: threads only add contention
        pred = cross_val_predict(BATCH_CLASSIFIERS[classifier](), feats, batches, cv=cv)
    return {"batch_bal_acc": balanced_accuracy(batches, pred), "batch_mcc": matthews_corrcoef(batches, pred),
            "reason": ""}


def silhouette_summary(per_sample: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """Mean silhouette with sklearn's validity rule (2 <= labels <= samples - 1), else NaN and why."""
    ok = labels >= 0
    n_labels = len(np.unique(labels[ok]))
    if not 2 <= n_labels <= ok.sum() - 1:
        return float("nan"), f"silhouette needs 2..n-1 labels, got {n_labels} among {int(ok.sum())} profiles"
    return float(np.mean(per_sample[ok])), ""
