"""Training loader items/s per method: the cached cell-mask summary against the full integral image of every item.

One process, no DataLoader workers: both datasets read the same synthetic 1080² plate (uncompressed merged TIFFs,
in the page cache after a first pass) with the same (epoch, index) keys and give identical crops, so the ratio is
the cost of the cell rule alone. The reference is the loader as it was before the summary: every item read its
site's whole DNA plane and built the full-resolution summed-area table (``integral_mask``). The cached run is
timed after one untimed epoch has filled its cache, as a persistent loader worker is from its second epoch on.

    python bench/bench_loader.py                    # MAE, DINO and SimCLR recipes, 1080 px sites
    python bench/bench_loader.py --methods mae --site_size 1080 --sites 64 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from data.augment import crop_and_resize, get_recipe, sample_crop_boxes  # noqa: E402
from data.cellmask import integral_mask, otsu_threshold  # noqa: E402
from data.datasets import TrainCropDataset  # noqa: E402
from data.io import open_site_array  # noqa: E402
from data.schema import load_site_table  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.fileio import write_json_atomic  # noqa: E402
from utils.seeding import sample_seed  # noqa: E402

# Each method's default recipe (the paper's crops): MAE one native 224 crop; DINO 2 x 224 + 8 x 96; SimCLR 2 x 224.
METHODS = ("mae", "dino", "simclr")


class IntegralEveryItem(TrainCropDataset):
    """The reference: the tiles-mode item as it was, a full summed-area table from the whole DNA plane per item."""

    def __getitem__(self, key: Any) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        row = self.table.iloc[index]
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        site = open_site_array(row, self.channels)
        _, height, width = (int(s) for s in site.shape)
        dna = np.asarray(site[self.dna])
        otsu = self._metadata_otsu(index, row)
        integral = integral_mask(dna, otsu_threshold(dna) if math.isnan(otsu) else otsu, self.factor)
        views, cell_crops = [], 0
        for spec in self.recipe.views:
            boxes, passed = sample_crop_boxes(integral, height, width, spec, rng, max_tries=self.max_tries,
                                              min_fraction=self.min_fraction)
            views.append(torch.from_numpy(crop_and_resize(site, boxes, spec.size)))
            cell_crops += int(passed.sum())
        return {"views": views, "index": index, "cell_crops": cell_crops}


def _plate(data_dir: str, sites: int, size: int) -> Path:
    """A cached synthetic plate of uncompressed merged TIFFs (as bench_train uses)."""
    from data.synthetic import generate_plates

    out = Path(data_dir) / f"sites{sites}_px{size}"
    if not (out / "dataset.csv").is_file():
        generate_plates(out, plates=1, batches=1, wells=max(1, sites // 2), sites=2, size=size, seed=0,
                        layout="merged", progress=True)
    return out / "dataset.csv"


def _rate(ds: TrainCropDataset, keys: list[tuple[int, int]]) -> float:
    """Items per second over ``keys``."""
    t0 = time.perf_counter()
    for key in keys:
        ds[key]
    return len(keys) / (time.perf_counter() - t0)


def bench_method(method: str, table: pd.DataFrame, rounds: int) -> dict[str, Any]:
    """Alternate timed epochs of the reference and the cached loader; the best epoch of each counts."""
    recipe = get_recipe(method)
    cached, reference = TrainCropDataset(table, recipe, seed=0), IntegralEveryItem(table, recipe, seed=0)
    n = len(table)
    for i in range(n):  # the untimed epoch: fills the page cache and the summary cache, and checks equality
        a, b = cached[(0, i)], reference[(0, i)]
        if not all(torch.equal(x, y) for x, y in zip(a["views"], b["views"])):
            raise AssertionError(f"{method}: site {i} crops differ between the cached summary and the integral")
    rates: dict[str, list[float]] = {"cached": [], "reference": []}
    for r in range(1, rounds + 1):
        keys = [(r, int(i)) for i in np.random.default_rng(r).permutation(n)]
        rates["reference"].append(_rate(reference, keys))
        rates["cached"].append(_rate(cached, keys))
    best = {k: max(v) for k, v in rates.items()}
    ratios = [c / ref for c, ref in zip(rates["cached"], rates["reference"])]
    return {"method": method, "sites": n, "items_per_s": best, "rounds": rates, "ratio": best["cached"] / best[
        "reference"], "ratio_range": [min(ratios), max(ratios)], "cache_bytes": cached._mask_cache_used}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sites", type=int, default=32)
    p.add_argument("--site_size", type=int, default=1080)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs of each; the best counts")
    p.add_argument("--data_dir", default="/tmp/cellpaint_bench")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    table = load_site_table(_plate(args.data_dir, args.sites, args.site_size))
    results = [bench_method(m, table, args.rounds) for m in args.methods]
    print(f"{'method':<8} {'integral items/s':>17} {'cached items/s':>15} {'ratio':>6}  (per-round range)")
    for res in results:
        lo, hi = res["ratio_range"]
        print(f"{res['method']:<8} {res['items_per_s']['reference']:>17.1f} {res['items_per_s']['cached']:>15.1f} "
              f"{res['ratio']:>6.2f}  ({lo:.2f}-{hi:.2f})")
    print(f"loader bench: {len(table)} sites of {args.site_size} px, 1 process, {platform.machine()}, "
          f"{date.today().isoformat()}")
    if args.out:
        write_json_atomic(args.out, {"results": results, "site_size": args.site_size, "date": date.today().isoformat()})
    return 0


if __name__ == "__main__":
    run_cli(main)
