"""Shared internals of the metric families: label codes, unit rows, query blocks and the one-sort ranking.

Every family computes similarities one block of query rows at a time, so an N x N matrix never exists and memory
stays bounded for large N. The helpers here are what the families share: how big a block is, how blocks run on a
small thread pool, how one block's similarities are computed, and the integer encoding that ranks a whole block with
one sort.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from utils.errors import DataError

SENTINEL = np.iinfo(np.int64).max
MEMORY_BUDGET_BYTES = 512 * 1024**2
BYTES_PER_BLOCK_CELL = 64
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


def worker_count() -> int:
    """Threads for the block loops: numpy's sorts and element-wise passes release the GIL, so blocks overlap."""
    try:
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def block_size(n_columns: int, budget_bytes: int = MEMORY_BUDGET_BYTES) -> int:
    """Rows per block so the temporaries of all blocks in flight (about 64 bytes per cell) stay inside the budget."""
    per_worker = budget_bytes // worker_count()
    return int(max(1, min(4096, per_worker // max(1, n_columns * BYTES_PER_BLOCK_CELL))))


def iter_blocks(n: int, rows: int) -> Iterator[slice]:
    """Slices of consecutive query rows."""
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def run_blocks(fn: Callable[[slice], None], blocks: list[slice], desc: str, progress: bool) -> None:
    """Apply ``fn`` to every block (each writes only its own rows), on a small thread pool when cores allow."""
    workers = worker_count()
    bar = tqdm(total=len(blocks), desc=desc, disable=not progress, leave=False)
    if workers <= 1 or len(blocks) <= 1:
        for blk in blocks:
            fn(blk)
            bar.update()
    else:
        # one BLAS thread per block worker: nested BLAS threads oversubscribe the cores and spin against each other
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(fn, blocks):
                bar.update()
    bar.close()


def similarity_block(queries: np.ndarray, refs: np.ndarray, device: str | None = None) -> np.ndarray:
    """Dot products of unit rows; on CUDA when asked, since the GEMM dominates for wide embeddings."""
    if device and device != "cpu":
        # lazy: torch costs about a second to import and is only needed when a GPU device is asked for
        import torch

        q = torch.as_tensor(queries, device=device)
        r = torch.as_tensor(refs, device=device)
        return (q @ r.T).cpu().numpy()
    return queries @ refs.T


def same_label(codes_: np.ndarray, rows: slice) -> np.ndarray:
    """Same-label mask of a query block against all columns; missing labels (-1) never match."""
    q = codes_[rows][:, None]
    return (q == codes_[None, :]) & (q >= 0)


def monotone_int(x: np.ndarray) -> np.ndarray:
    """Map floats to int64 with the same order (IEEE bit trick), so sorting integers sorts the floats."""
    if x.dtype == np.float32:
        bits = x.view(np.int32).astype(np.int64)
        return bits ^ ((bits >> 31) & 0x7FFFFFFF)
    bits = x.astype(np.float64, copy=False).view(np.int64)
    return bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)


def float_from_monotone(m: np.ndarray) -> np.ndarray:
    """Inverse of the float64 bit trick of monotone_int (the map is its own inverse)."""
    bits = m ^ ((m >> 63) & 0x7FFFFFFFFFFFFFFF)
    return bits.view(np.float64)


def sorted_relevance(score_key: np.ndarray, positive: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Sort each row by ascending key with positives first among ties; non-candidates go last as SENTINEL.

    One integer sort replaces argsort + gather: the key's order-preserving integer is shifted left and the low bit
    holds 0 for a positive, 1 for a negative. float64 keys need |key| < 2 so the shift cannot overflow.
    """
    encoded = (monotone_int(score_key) << 1) | (~positive).astype(np.int64)
    encoded[~candidate] = SENTINEL
    encoded.sort(axis=1)
    return encoded


def row_searchsorted(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray, side: str = "left") -> np.ndarray:
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
