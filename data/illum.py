"""Illumination correction functions per plate and channel, computed the CellProfiler / DeepProfiler way.

Usage: ``python -m data.illum DATASET_CSV -o OUTDIR [--channels ...] [--image_root DIR] [--downscale 4]
[--median_size 24] [--percentile 2]``. For each plate and channel: the mean of all its sites on the [0,1] scale,
block-averaged down by ``--downscale``, median-filtered with a disk of diameter ``--median_size`` (downscaled
pixels), resized back bilinearly, then divided by its robust minimum (the ``--percentile`` percentile) and clipped
below at 1, so correcting (dividing the image by the function) never brightens a pixel. Writes
``OUTDIR/<plate>/<plate>_Illum<Ch>.npy`` (float32, (H,W)) and ``OUTDIR/load_data_with_illum.csv``: the input CSV with
absolute image paths and ``FileName_Illum<Ch>`` / ``PathName_Illum<Ch>`` added, which every reader then applies.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from data.io import read_site
from data.schema import (
    DEFAULT_CHANNELS,
    LAYOUT_COLUMN,
    MERGED_COLUMN,
    filename_column,
    illum_filename_column,
    illum_pathname_column,
    image_paths,
    load_site_table,
    pathname_column,
)
from utils.cli import FlagParser, run_cli
from utils.errors import ConfigError, DataError
from utils.fileio import atomic_path, ensure_dir, write_csv_atomic
from utils.rundir import OutputLock

DEFAULT_DOWNSCALE = 4
DEFAULT_MEDIAN_SIZE = 24  # DeepProfiler's default disk diameter, in downscaled pixels
DEFAULT_PERCENTILE = 2.0  # CellProfiler's and DeepProfiler's robust minimum
OUTPUT_CSV = "load_data_with_illum.csv"
RAW_SCALE = 65535.0


def downscale_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Block means of ``factor`` x ``factor`` pixels (edge blocks average the pixels they have), in float64.

    Why block means: the mean is linear, so the downscaled plate mean equals the mean of downscaled sites, and
    averaging (unlike subsampling) keeps the low-frequency field that illumination correction is after.
    """
    if factor < 1:
        raise ConfigError(f"--downscale must be >= 1, got {factor}")
    image = np.asarray(image, dtype=np.float64)
    if factor == 1:
        return image.copy()
    height, width = image.shape
    rows, cols = np.arange(0, height, factor), np.arange(0, width, factor)
    sums = np.add.reduceat(np.add.reduceat(image, rows, axis=0), cols, axis=1)
    counts = np.diff(np.append(rows, height))[:, None] * np.diff(np.append(cols, width))[None, :]
    return sums / counts


def _axis_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source indices and the upper weight of each output pixel, pixel centres aligned."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo


def resize_bilinear(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize to ``shape`` with aligned pixel centres and clamped edges (separable, float64)."""
    image = np.asarray(image, dtype=np.float64)
    y0, y1, wy = _axis_weights(shape[0], image.shape[0])
    x0, x1, wx = _axis_weights(shape[1], image.shape[1])
    rows = image[y0] * (1.0 - wy)[:, None] + image[y1] * wy[:, None]
    return rows[:, x0] * (1.0 - wx)[None, :] + rows[:, x1] * wx[None, :]


def disk_footprint(diameter: int) -> np.ndarray:
    """Boolean disk of the given diameter (odd side), the median filter's neighbourhood."""
    if diameter < 1:
        raise ConfigError(f"--median_size must be >= 1, got {diameter}")
    radius = diameter / 2.0
    half = int(radius)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    return yy * yy + xx * xx <= radius * radius


def illumination_function(
    mean_image: np.ndarray,
    downscale: int = DEFAULT_DOWNSCALE,
    median_size: int = DEFAULT_MEDIAN_SIZE,
    percentile: float = DEFAULT_PERCENTILE,
    name: str = "mean image",
) -> np.ndarray:
    """The (H,W) float32 illumination function (values >= 1) of a plate's mean image of one channel.

    Downscale, median filter (removes the cells, keeps the smooth field), resize back, then divide by the robust
    minimum and clip below at 1: the darkest ``percentile`` % of the field keep their intensity and brighter regions
    are divided down to that level, so corrected pixels never exceed raw ones and never overflow uint16.
    """
    mean_image = np.asarray(mean_image, dtype=np.float64)
    if mean_image.ndim != 2 or min(mean_image.shape) < 1:
        raise DataError(f"{name}: shape {mean_image.shape}, expected a non-empty (H,W) image")
    if not 0.0 < percentile < 100.0:
        raise ConfigError(f"--percentile must be in (0, 100), got {percentile}")
    thumb = downscale_mean(mean_image, downscale)
    smooth = ndimage.median_filter(thumb, footprint=disk_footprint(median_size), mode="nearest")
    full = resize_bilinear(smooth, mean_image.shape)
    robust = float(np.percentile(full, percentile))
    if not robust > 0.0 or not np.isfinite(robust):
        raise DataError(f"{name}: the smoothed mean image is {robust:g} at its {percentile:g}th percentile; a blank "
                        f"(all-zero) channel has no illumination function")
    return (np.maximum(full, robust) / robust).astype(np.float32)


class PlateMean:
    """Running per-channel sum of a plate's uint16 sites, so the mean needs one (C,H,W) float64 buffer."""

    def __init__(self, plate: str) -> None:
        self.plate = plate
        self.total: np.ndarray | None = None
        self.count = 0
        self.first = ""

    def add(self, pixels: np.ndarray, name: str) -> None:
        """Add one (C,H,W) uint16 site; a site whose shape differs from the plate's first is an error naming it."""
        if self.total is None:
            self.total = np.zeros(pixels.shape, dtype=np.float64)
            self.first = name
        elif pixels.shape != self.total.shape:
            raise DataError(f"{name}: shape {pixels.shape} differs from {self.total.shape} of {self.first} (plate "
                            f"{self.plate}); one illumination function needs one site size per plate")
        self.total += pixels
        self.count += 1

    def mean(self) -> np.ndarray:
        """Mean site on the [0,1] scale, (C,H,W) float64."""
        if self.total is None or self.count == 0:
            raise DataError(f"plate {self.plate}: no sites to average")
        return self.total / (self.count * RAW_SCALE)


def plate_functions(
    mean: np.ndarray,
    channels: Sequence[str],
    plate: str,
    downscale: int = DEFAULT_DOWNSCALE,
    median_size: int = DEFAULT_MEDIAN_SIZE,
    percentile: float = DEFAULT_PERCENTILE,
) -> dict[str, np.ndarray]:
    """One illumination function per channel from a plate's (C,H,W) mean site."""
    return {ch: illumination_function(mean[c], downscale, median_size, percentile, name=f"plate {plate} {ch}")
            for c, ch in enumerate(channels)}


def illum_path(outdir: str | os.PathLike[str], plate: str, channel: str) -> Path:
    """Where a plate's function for one channel is written: ``<outdir>/<plate>/<plate>_Illum<Ch>.npy``."""
    return Path(outdir) / plate / f"{plate}_Illum{channel}.npy"


def check_plate_name(plate: Any) -> str:
    """A plate name usable as a folder name (no separators, not '.' or '..', not empty)."""
    name = "" if plate is None or (isinstance(plate, float) and np.isnan(plate)) else str(plate).strip()
    if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise DataError(f"plate name {plate!r} cannot be used as a folder name for its illumination functions")
    return name


def with_illum_columns(
    raw: pd.DataFrame,
    table: pd.DataFrame,
    files: Mapping[tuple[str, str], Path],
    channels: Sequence[str],
) -> pd.DataFrame:
    """The input CSV (``raw``, as text) with absolute image paths and the illumination columns of each row's plate.

    Why absolute: the new CSV lives in another folder than the old one, and absolute paths work from anywhere,
    whatever ``--image_root`` a later command is given. ``table`` is ``load_site_table``'s view of the same rows.
    """
    if len(raw) != len(table):
        raise DataError(f"{len(raw)} CSV rows but {len(table)} table rows; cannot add illumination columns")
    out = raw.copy()
    layouts = table[LAYOUT_COLUMN].tolist()
    merged = [i for i, layout in enumerate(layouts) if layout in ("merged", "npy")]
    if merged:
        if MERGED_COLUMN not in out.columns:
            out[MERGED_COLUMN] = ""
        out.loc[merged, MERGED_COLUMN] = table.loc[merged, MERGED_COLUMN].tolist()
    per_channel = [i for i, layout in enumerate(layouts) if layout == "per-channel"]
    for ch in channels:
        if per_channel:
            paths = table.loc[per_channel, filename_column(ch)].tolist()
            for col in (filename_column(ch), pathname_column(ch)):
                if col not in out.columns:
                    out[col] = ""
            out.loc[per_channel, filename_column(ch)] = [os.path.basename(p) for p in paths]
            out.loc[per_channel, pathname_column(ch)] = [os.path.dirname(p) for p in paths]
        targets = [files[(check_plate_name(plate), ch)] for plate in table["plate"].tolist()]
        out[illum_filename_column(ch)] = [t.name for t in targets]
        out[illum_pathname_column(ch)] = [str(t.parent.resolve()) for t in targets]
    return out


def write_function(path: Path, function: np.ndarray) -> None:
    """Write one (H,W) float32 function as .npy, atomically (np.save would append .npy to a temporary name)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(function, dtype=np.float32), allow_pickle=False)


def compute_plate_means(
    table: pd.DataFrame, channels: Sequence[str], workers: int = 4, progress: bool = True
) -> dict[str, PlateMean]:
    """Mean uncorrected site of every plate (plates in table order), reading sites on ``workers`` threads."""
    channels = tuple(channels)
    plates = [check_plate_name(p) for p in table["plate"].tolist()]
    means: dict[str, PlateMean] = {}
    for plate in plates:
        means.setdefault(plate, PlateMean(plate))

    def read(i: int) -> np.ndarray:
        return read_site(table.iloc[i], channels, illum=False)[0]

    bar = tqdm(total=len(table), desc="illum", unit="site", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for plate in means:
            rows = [i for i, p in enumerate(plates) if p == plate]
            for i, pixels in zip(rows, pool.map(read, rows)):
                means[plate].add(pixels, image_paths(table.iloc[i], channels)[0])
                bar.update(1)
    bar.close()
    return means


def run(
    csv_path: str | os.PathLike[str],
    outdir: str | os.PathLike[str],
    channels: Sequence[str] = DEFAULT_CHANNELS,
    image_root: str | os.PathLike[str] | None = None,
    downscale: int = DEFAULT_DOWNSCALE,
    median_size: int = DEFAULT_MEDIAN_SIZE,
    percentile: float = DEFAULT_PERCENTILE,
    workers: int = 4,
    progress: bool = True,
) -> dict[str, object]:
    """Compute and write every plate's functions and the new CSV; returns a summary (plates, sites, range)."""
    channels = tuple(channels)
    if downscale < 1:
        raise ConfigError(f"--downscale must be >= 1, got {downscale}")
    disk_footprint(median_size)
    if not 0.0 < percentile < 100.0:
        raise ConfigError(f"--percentile must be in (0, 100), got {percentile}")
    table = load_site_table(csv_path, image_root=image_root, channels=channels, required=("plate",))
    raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    out = ensure_dir(outdir)
    with OutputLock(out):  # two runs into one folder would interleave their functions and the CSV
        means = compute_plate_means(table, channels, workers=workers, progress=progress)
        files: dict[tuple[str, str], Path] = {}
        strongest = (1.0, "", "")
        for plate, acc in means.items():
            functions = plate_functions(acc.mean(), channels, plate, downscale, median_size, percentile)
            for ch, function in functions.items():
                path = illum_path(out, plate, ch)
                write_function(path, function)
                files[(plate, ch)] = path
                peak = float(function.max())
                if peak > strongest[0]:
                    strongest = (peak, plate, ch)
        csv_out = out / OUTPUT_CSV
        write_csv_atomic(with_illum_columns(raw, table, files, channels), csv_out)
        return {"csv": str(csv_out), "sites": len(table), "plates": len(means), "channels": len(channels),
                "strongest": strongest}


def _parser() -> argparse.ArgumentParser:
    p = FlagParser(prog="python -m data.illum", description=__doc__.splitlines()[0])
    p.add_argument("dataset_csv", nargs="?", default=None, help="site table (paper or JUMP load_data columns)")
    p.add_argument("--valset", "--dataset_csv", dest="dataset_csv_flag", default=None, metavar="CSV",
                   help="the site table as a flag (same as the positional argument)")
    p.add_argument("-o", "--outdir", required=True,
                   help=f"output folder: <plate>/<plate>_Illum<Ch>.npy and {OUTPUT_CSV}")
    p.add_argument("--channels", nargs="+", default=list(DEFAULT_CHANNELS), help="channel names in order")
    p.add_argument("--image_root", default=None, help="folder that relative image paths resolve against")
    p.add_argument("--downscale", type=int, default=DEFAULT_DOWNSCALE,
                   help=f"block-average the plate mean by this factor before filtering (default {DEFAULT_DOWNSCALE})")
    p.add_argument("--median_size", type=int, default=DEFAULT_MEDIAN_SIZE,
                   help=f"median filter disk diameter in downscaled pixels (default {DEFAULT_MEDIAN_SIZE})")
    p.add_argument("--percentile", type=float, default=DEFAULT_PERCENTILE,
                   help=f"robust minimum the function is divided by (default {DEFAULT_PERCENTILE:g}th percentile)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    return p


def _csv_argument(args: argparse.Namespace) -> str:
    """The site CSV from the positional argument or ``--valset`` / ``--dataset_csv``, exactly one of them."""
    given = [v for v in (args.dataset_csv, args.dataset_csv_flag) if v]
    if not given:
        raise ConfigError("no site CSV: give DATASET_CSV (or --valset CSV)")
    if len(given) == 2 and given[0] != given[1]:
        raise ConfigError(f"two site CSVs given ({given[0]} and {given[1]}); give one")
    return given[0]


def main(argv: Sequence[str] | None = None) -> int:
    """Thin CLI: parse, compute, write, print one summary line."""
    args = _parser().parse_args(argv)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    summary = run(_csv_argument(args), args.outdir, channels=args.channels, image_root=args.image_root,
                  downscale=args.downscale, median_size=args.median_size, percentile=args.percentile,
                  workers=args.workers)
    peak, plate, ch = summary["strongest"]  # type: ignore[misc]
    where = f" ({plate} {ch})" if plate else ""
    print(f"illum: {summary['sites']} sites, {summary['plates']} plates x {summary['channels']} channels -> "
          f"{summary['csv']} (strongest correction {peak:.3f}x{where})")
    return 0


if __name__ == "__main__":
    run_cli(main)
