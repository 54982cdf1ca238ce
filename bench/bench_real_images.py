"""Cost of real plates: 8-bit PNG against 16-bit TIFF reads, and single-cell crops against tiles, per site.

On the LINCS A549 set (``../shared/data/lincs_a549_images``: 1080 px sites, one 8-bit PNG per channel) in one
process:

1. site read: ``data.io.read_site`` of the PNG sites against the same sites converted here to uncompressed
   per-channel uint16 TIFF (the reference, the fast memory-mapped path), after one untimed pass each (warm caches);
2. inference embedding: ``utils.inference.run_inference`` by tiles (224 px grid, the paper's default) against
   ``--crop-mode cells`` (128 px crops around the CellProfiler nuclei resized to 224, and with the project's own
   segmentation), with the same random ViT-Tiny; the pipeline's own ``embed_seconds`` per site.

    python bench/bench_real_images.py --sites 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data.intensity import PRESETS  # noqa: E402
from data.io import read_site  # noqa: E402
from data.schema import load_site_table  # noqa: E402
from inference import build_parser  # noqa: E402
from models.backbones import create_backbone  # noqa: E402
from models.checkpoints import FORMAT, save_checkpoint  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.inference import InferenceConfig, run_inference  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lincs_a549_images"
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")


def subset(data: Path, n: int, out: Path) -> Path:
    """The first ``n`` sites of load_data.csv, one per well in turn, with absolute folders."""
    ld = pd.read_csv(data / "load_data.csv")
    ld = ld.groupby(["Metadata_Plate", "Metadata_Well"], sort=False).head(max(1, -(-n // 8))).head(n).copy()
    for c in [c for c in ld.columns if c.startswith("PathName_")]:
        ld[c] = [str(data / v) for v in ld[c]]
    path = out / "load_data.csv"
    ld.to_csv(path, index=False)
    return path


def as_tiff(csv: Path, out: Path) -> Path:
    """The same sites as per-channel uncompressed uint16 TIFFs (x 257, the bit-depth rule)."""
    ld = pd.read_csv(csv)
    for ch in CHANNELS:
        names = []
        for i, (folder, name) in enumerate(zip(ld[f"PathName_Orig{ch}"], ld[f"FileName_Orig{ch}"])):
            plane = np.asarray(Image.open(Path(folder) / name)).astype(np.uint16) * 257
            target = out / f"s{i}_{ch}.tif"
            tifffile.imwrite(target, plane, photometric="minisblack", metadata=None)
            names.append(target.name)
        ld[f"FileName_Orig{ch}"], ld[f"PathName_Orig{ch}"] = names, str(out)
    path = out / "load_data_tiff.csv"
    ld.to_csv(path, index=False)
    return path


def time_reads(csv: Path, repeats: int) -> float:
    """Mean seconds per ``read_site`` over the table, after one untimed pass."""
    table = load_site_table(csv, channels=CHANNELS, required=())
    rows = [r.to_dict() for _, r in table.iterrows()]
    for r in rows:
        read_site(r, CHANNELS)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for r in rows:
            read_site(r, CHANNELS)
    return (time.perf_counter() - t0) / (repeats * len(rows))


def tiny_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", 5, img_size=224, patch_size=16)
    save_checkpoint(path, {"format": FORMAT, "method": "simclr", "arch": "vit_tiny", "patch_size": 16, "in_chans": 5,
                           "backbone": bb.state_dict(), "heads": {}, "optimizer": None, "scaler": None, "epoch": 0,
                           "step": 0, "args": {}, "intensity": PRESETS["paper_train"].to_dict(),
                           "channels": list(CHANNELS), "versions": {}})
    return path


def embed_seconds(ckpt: Path, csv: Path, platemap: Path, out: Path, extra: list[str], workers: int) -> dict:
    argv = ["--ckpt", str(ckpt), "--valset", str(csv), "--platemap", str(platemap), "-o", str(out),
            "--channels", *CHANNELS, "--batch_size", "32", "--num_workers", str(workers),
            "--norm_method", "no_post_proc", "--size", "224", *extra]
    run_inference(InferenceConfig.from_flags(build_parser().parse_args(argv)))
    run = json.loads((out / "run.json").read_text())
    sites = run["n_sites"]
    cells = run["cells"]["n_cells"] / sites if "cells" in run else None
    return {"s_per_site": run["timings"]["embed_seconds"] / sites, "cells_per_site": cells}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--sites", type=int, default=8, help="sites of the set to use (of 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed read passes")
    p.add_argument("--workers", type=int, default=2)
    opts = p.parse_args(argv)
    data = Path(opts.data)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = subset(data, opts.sites, tmp)
        tif = as_tiff(csv, tmp)
        png_s, tif_s = time_reads(csv, opts.repeats), time_reads(tif, opts.repeats)
        ckpt = tiny_checkpoint(tmp / "vit_tiny.pth")
        pm = data / "platemap.csv"
        runs = {
            "tiles": embed_seconds(ckpt, csv, pm, tmp / "tiles", ["--center-tiles"], opts.workers),
            "cells_locations": embed_seconds(ckpt, csv, pm, tmp / "cells", ["--crop-mode", "cells", "--crop-size",
                                             "128", "--locations", str(data / "locations")], opts.workers),
            "cells_segmented": embed_seconds(ckpt, csv, pm, tmp / "seg", ["--crop-mode", "cells", "--crop-size",
                                             "128"], opts.workers),
        }
    tiles = runs["tiles"]["s_per_site"]
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}")
    print(f"site read ({opts.sites} sites of 5 x 1080 px): PNG 8-bit {png_s * 1e3:.1f} ms, TIFF uint16 "
          f"{tif_s * 1e3:.1f} ms -> PNG/TIFF {png_s / tif_s:.2f}x")
    for name, r in runs.items():
        crops = f" ({r['cells_per_site']:.1f} cells/site)" if r["cells_per_site"] is not None else " (16-tile grid)"
        print(f"inference {name}: {r['s_per_site']:.3f} s/site{crops} -> {r['s_per_site'] / tiles:.2f}x tiles")
    return 0


if __name__ == "__main__":
    run_cli(main)
