"""Benchmark: synthetic site generation speed at 1080 px and 256 px, against an in-process I/O reference.

Run from the repository root: ``python bench/bench_synthetic.py [--workers 1] [--sites-1080 6] [--sites-256 48]``.
For each size it times ``generate_plates`` (render, Otsu, TIFF write) and a reference that fills the same number of
uint16 bytes from ``np.random.Generator.normal`` and writes them to disk. The ratio (generator time / reference
time) is robust to a busy machine because both run in the same process, one after the other.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.schema import DEFAULT_CHANNELS  # noqa: E402
from data.synthetic import generate_plates  # noqa: E402


def _reference_seconds(n_sites: int, size: int, folder: Path) -> float:
    """Time to normal-fill and write n_sites uint16 (5, size, size) arrays: the floor any generator must pay."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(n_sites):
        noise = rng.normal(3000.0, 500.0, (len(DEFAULT_CHANNELS), size, size))
        np.clip(noise, 0, 65535).astype(np.uint16).tofile(folder / f"ref_{i}.raw")
    return time.perf_counter() - start


def bench_size(size: int, n_sites: int, workers: int) -> None:
    """Print sites/s of the generator and of the reference at one site size, and their ratio."""
    wells = max(4, n_sites // 2)
    sites = max(1, n_sites // wells)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        table = generate_plates(Path(tmp) / "plates", plates=1, batches=1, wells=wells, sites=sites, size=size,
                                seed=0, layout="merged", workers=workers, progress=False)
        generated = time.perf_counter() - start
        reference = _reference_seconds(len(table), size, Path(tmp))
    n = len(table)
    print(f"{size:>5} px: {n / generated:8.2f} sites/s ({n} sites, {workers} worker(s), {generated:.1f} s); "
          f"reference normal-fill+write {n / reference:8.2f} sites/s; ratio generator/reference time "
          f"{generated / reference:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="generator processes (1 = single-core figure)")
    parser.add_argument("--sites-1080", type=int, default=8, help="sites to generate at 1080 px")
    parser.add_argument("--sites-256", type=int, default=64, help="sites to generate at 256 px")
    args = parser.parse_args()
    bench_size(1080, args.sites_1080, args.workers)
    bench_size(256, args.sites_256, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
