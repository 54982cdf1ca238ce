"""Benchmark: seconds per 1080x1080 site of the handcrafted baseline, split into segmentation and each feature group.

Run from the repository root: ``python bench/bench_handcrafted.py [--sites 3] [--size 1080] [--groups all]``.
Sites come from ``data.synthetic.render_site`` (about 190 cells per 1080 px site, JUMP-like pixel scale). Every
stage runs in one process on one core, so the numbers are per-worker; ``--workers N`` of the CLI divides wall time
by about N. The default feature set (intensity, sizeshape, texture on DNA and Mito) is the ``default`` line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.segmentation import segment  # noqa: E402
from data.synthetic import SiteParams, render_site  # noqa: E402
from utils.handcrafted.measure import FEATURE_GROUPS, MeasureOptions, measure_site  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--size", type=int, default=1080)
    parser.add_argument("--groups", default="all", help="comma list of feature groups, or all")
    args = parser.parse_args()
    groups = list(FEATURE_GROUPS) if args.groups == "all" else args.groups.split(",")
    sites = [render_site(SiteParams(), args.size, np.random.default_rng(i)) for i in range(args.sites)]
    timings: dict[str, float] = {"segment": 0.0, "default": 0.0, **{g: 0.0 for g in groups}}
    cells = 0
    for pixels in sites:
        start = time.perf_counter()
        seg = segment(pixels)
        timings["segment"] += time.perf_counter() - start
        cells += seg.count
        start = time.perf_counter()
        measure_site(seg, pixels)
        timings["default"] += time.perf_counter() - start
        for group in groups:
            start = time.perf_counter()
            measure_site(seg, pixels, options=MeasureOptions(features=(group,)))
            timings[group] += time.perf_counter() - start
    n = len(sites)
    print(f"{n} site(s) of {args.size} px, {cells / n:.0f} cells/site, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    for name, seconds in timings.items():
        print(f"  {name:<12} {seconds / n:7.2f} s/site")
    total = timings["segment"] + timings["default"]
    print(f"default pipeline (segment + default measurements): {total / n:.2f} s/site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
