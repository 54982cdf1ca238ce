"""Per-channel intensity statistics of a dataset, written as an IntensityNorm JSON that training and inference share.

Usage: ``python -m data.stats DATASET_CSV -o stats.json [--sites N] [--seed K] [--channels ...]``.
Statistics come from exact uint16 histograms (65536 bins per channel), so mean, std and percentiles are exact for
the sampled sites and memory does not grow with the number of sites.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from data.intensity import UINT16_MAX, IntensityNorm
from data.io import read_site
from data.schema import DEFAULT_CHANNELS, load_site_table
from utils.cli import FlagParser, add_metadata_flags, run_cli
from utils.errors import ConfigError, DataError

DEFAULT_PERCENTILES: tuple[float, ...] = (0.1, 1.0, 50.0, 99.0, 99.9)
N_LEVELS = 65536


def channel_histograms(pixels: np.ndarray) -> np.ndarray:
    """Counts of every uint16 level per channel, (C, 65536), the exact and mergeable summary of one site."""
    if pixels.dtype != np.uint16 or pixels.ndim != 3:
        raise DataError(f"expected a (C,H,W) uint16 site, got {pixels.dtype} {pixels.shape}")
    return np.stack([np.bincount(plane.ravel(), minlength=N_LEVELS) for plane in pixels]).astype(np.int64)


def histogram_percentiles(hist: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """Percentiles (P, C) of the pixels a (C, 65536) histogram counts, with NumPy's default linear interpolation."""
    cumulative = np.cumsum(hist, axis=1)
    total = cumulative[:, -1]
    out = np.empty((len(percentiles), hist.shape[0]))
    for c in range(hist.shape[0]):
        ranks = np.asarray(percentiles, dtype=np.float64) / 100.0 * (total[c] - 1)
        lo, hi = np.floor(ranks), np.ceil(ranks)
        v_lo = np.searchsorted(cumulative[c], lo, side="right")
        v_hi = np.searchsorted(cumulative[c], hi, side="right")
        out[:, c] = v_lo + (v_hi - v_lo) * (ranks - lo)
    return out


def norm_from_histograms(
    hist: np.ndarray,
    channels: Sequence[str],
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    name: str = "dataset",
) -> IntensityNorm:
    """Mean/std on the [0,1] scale and percentiles (also [0,1]) from summed per-channel histograms."""
    if hist.shape != (len(channels), N_LEVELS):
        raise DataError(f"histogram shape {hist.shape} does not match {len(channels)} channels")
    total = hist.sum(axis=1).astype(np.float64)
    if (total == 0).any():
        raise DataError("no pixels to compute intensity statistics from")
    levels = np.arange(N_LEVELS, dtype=np.float64) / UINT16_MAX
    mean = hist @ levels / total
    var = (hist * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / total
    std = np.sqrt(var)
    flat = [channels[c] for c in np.flatnonzero(std == 0)]
    if flat:
        raise DataError(f"channels {flat} are constant in the sampled sites; their std is 0")
    pct = histogram_percentiles(hist, percentiles) / UINT16_MAX
    return IntensityNorm(
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        channels=tuple(channels),
        name=name,
        percentiles={f"{p:g}": pct[i].tolist() for i, p in enumerate(percentiles)},
    )


def compute_intensity_norm(
    sites: Iterable[np.ndarray],
    channels: Sequence[str] = DEFAULT_CHANNELS,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    name: str = "dataset",
) -> IntensityNorm:
    """Intensity statistics over all pixels of the given (C,H,W) uint16 sites (arrays in, no files)."""
    hist = np.zeros((len(channels), N_LEVELS), dtype=np.int64)
    for pixels in sites:
        if pixels.shape[0] != len(channels):
            raise DataError(f"site has {pixels.shape[0]} channels, expected {len(channels)}")
        hist += channel_histograms(pixels)
    return norm_from_histograms(hist, channels, percentiles, name)


def sample_sites(n_rows: int, n_sites: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded sample without replacement (all rows when ``n_sites`` is None or larger)."""
    if n_sites is None or n_sites >= n_rows:
        return np.arange(n_rows)
    if n_sites < 1:
        raise ConfigError(f"--sites must be >= 1, got {n_sites}")
    return np.sort(np.random.default_rng(seed).choice(n_rows, size=n_sites, replace=False))


def dataset_intensity_norm(
    table: pd.DataFrame,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    n_sites: int | None = 200,
    seed: int = 0,
    workers: int = 4,
    name: str = "dataset",
    progress: bool = True,
) -> tuple[IntensityNorm, int]:
    """Statistics of a seeded sample of a site table's rows; returns the norm and the number of sites used."""
    rows = sample_sites(len(table), n_sites, seed)
    channels = tuple(channels)

    def histogram(i: int) -> np.ndarray:
        pixels, _ = read_site(table.iloc[int(i)], channels)
        return channel_histograms(pixels)

    hist = np.zeros((len(channels), N_LEVELS), dtype=np.int64)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for h in tqdm(pool.map(histogram, rows), total=len(rows), desc="stats", unit="site", disable=not progress):
            hist += h
    return norm_from_histograms(hist, channels, DEFAULT_PERCENTILES, name), len(rows)


def _parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m data.stats", description=__doc__.splitlines()[0])
    p.add_argument("dataset_csv", help="site table (paper or JUMP load_data columns)")
    p.add_argument("-o", "--output", required=True, help="IntensityNorm JSON to write (atomically)")
    p.add_argument("--sites", type=int, default=200, help="number of sites to sample (0 = all; default 200)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--channels", nargs="+", default=list(DEFAULT_CHANNELS), help="channel names in order")
    p.add_argument("--image_root", default=None,
                   help="folder that relative image paths resolve against")
    add_metadata_flags(p)
    p.add_argument("--name", default=None, help="name stored in the JSON (default: the CSV's file stem)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Thin CLI: parse, load the table, compute, write, print one summary line."""
    args = _parser().parse_args(argv)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    table = load_site_table(args.dataset_csv, image_root=args.image_root, channels=args.channels,
                            platemap=args.platemap, column_map=args.column_map)
    name = args.name or Path(args.dataset_csv).stem
    norm, used = dataset_intensity_norm(
        table, args.channels, n_sites=args.sites or None, seed=args.seed, workers=args.workers, name=name
    )
    source = {"csv": os.path.abspath(args.dataset_csv), "sites": used, "total_sites": len(table), "seed": args.seed}
    norm.save(args.output, source=source)
    means = ", ".join(f"{c} {m:.4f}±{s:.4f}" for c, m, s in zip(norm.channels, norm.mean, norm.std))
    print(f"stats: {used}/{len(table)} sites -> {args.output} (mean±std on [0,1]: {means})")
    return 0


if __name__ == "__main__":
    run_cli(main)
