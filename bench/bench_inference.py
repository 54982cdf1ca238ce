"""Inference throughput (sites/s) from TIFF files on disk to well profiles, against the bare model forward.

The pipeline run is ``utils.inference.run_inference`` itself (prefetch threads, device tiling, cell mask, embed,
per-plate pooling, part files); its embedding phase gives sites/s. The bare run feeds the same backbone random
standardised tiles already on the device, in batches of the same tile count, in the same process. The ratio of the
two is the share of the model bound the data path achieves. Both run once untimed first (warm caches, compile).

    python bench/bench_inference.py --device cpu         # CPU: tiny ViT, small sites (default without CUDA)
    python bench/bench_inference.py --device cpu --preset cpu_vits   # CPU: the GPU setting's model and sites
    python bench/bench_inference.py --device cuda        # GPU: ViT-S/16, 1080 px sites, 16 tiles/site, bf16

Each repeat times a pipeline run and then the bare forward, back to back, so a repeat's ratio shares the
machine's state; the line reports the median ratio and the range over the repeats, and the best rate of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data.intensity import PRESETS  # noqa: E402
from data.io import write_merged_tiff  # noqa: E402
from data.schema import DEFAULT_CHANNELS  # noqa: E402
from inference import build_parser  # noqa: E402
from models.backbones import create_backbone, embed  # noqa: E402
from models.checkpoints import FORMAT, save_checkpoint  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.fileio import write_json_atomic  # noqa: E402
from utils.inference import InferenceConfig, run_inference  # noqa: E402
from utils.precision import DTYPES  # noqa: E402

PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {"arch": "vit_tiny", "site": 256, "tile": 128, "sites": 192, "plates": 2, "batch_size": 8, "workers": 1,
            "precision": "fp32", "unique": 48, "overrides": {"embed_dim": 96, "depth": 4, "num_heads": 3}},
    # the GPU setting's model and sites on the CPU (ViT-S/16, 1080 px, 16 tiles of 224 px), few sites
    "cpu_vits": {"arch": "vit_small", "site": 1080, "tile": 224, "sites": 16, "plates": 2, "batch_size": 4,
                 "workers": 1, "precision": "fp32", "unique": 16, "overrides": {}},
    "cuda": {"arch": "vit_small", "site": 1080, "tile": 224, "sites": 4096, "plates": 4, "batch_size": 64,
             "workers": 14, "precision": "bf16", "unique": 256, "overrides": {}},
}


def _write_data(root: Path, n_sites: int, n_plates: int, size: int, unique: int, seed: int) -> Path:
    """Uncompressed merged TIFFs (the paper's format) with random intensities, and a paper-style CSV.

    Only ``unique`` files are written; the other sites are hard links to them, so a GPU-sized run fits on the disk
    and in the page cache (the bench measures the warm-cache data path, as the issue's table does).
    """
    rng = np.random.default_rng(seed)
    rows = []
    per_plate = math.ceil(n_sites / n_plates)
    for i in tqdm(range(n_sites), desc="bench data", unit="site", leave=False):
        plate, k = divmod(i, per_plate)
        well = f"W{k // 4:03d}"
        path = root / f"p{plate}" / f"{well}_s{k % 4}.tiff"
        if i < unique:
            pixels = rng.integers(0, 20000, size=(len(DEFAULT_CHANNELS), size, size), dtype=np.uint16)
            write_merged_tiff(path, pixels, otsu=9000.0)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(rows[i % unique]["FileName_Merged"], path)
        rows.append({"FileName_Merged": str(path), "batch": "b1", "plate": f"P{plate}", "well": well,
                     "field": k % 4 + 1, "perturbation_id": "DMSO" if (k // 4) % 3 == 0 else f"cpd{k // 4 % 7}",
                     "target": "t"})
    csv = root / "dataset.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _checkpoint(path: Path, arch: str, tile: int, overrides: dict[str, int]) -> Path:
    torch.manual_seed(0)
    backbone = create_backbone(arch, len(DEFAULT_CHANNELS), img_size=tile, **overrides)
    save_checkpoint(path, {
        "format": FORMAT, "method": "simclr", "arch": arch,
        "patch_size": int(backbone.patch_embed.patch_size[0]), "in_chans": len(DEFAULT_CHANNELS),
        "backbone": backbone.state_dict(), "heads": {}, "optimizer": None, "scaler": None, "epoch": 0, "step": 0,
        "args": dict(overrides), "intensity": PRESETS["paper_train"].to_dict(), "channels": list(DEFAULT_CHANNELS),
        "versions": {},
    })
    return path


def _bare_sites_per_s(ckpt: Path, device: torch.device, tiles: int, tile: int, precision: str, compile_: bool,
                      repeats: int, tiles_per_site: int, min_seconds: float = 2.0) -> float:
    from models.checkpoints import load_backbone_for_inference

    backbone = load_backbone_for_inference(ckpt).backbone.to(device).eval()
    fn = torch.compile(lambda x: embed(backbone, x, "cls")) if compile_ else (lambda x: embed(backbone, x, "cls"))
    x = torch.randn(tiles, len(DEFAULT_CHANNELS), tile, tile, device=device)
    dtype = DTYPES[precision]

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            fn(x).float().sum().item()

    step()
    step()
    done, t0 = 0, time.perf_counter()
    while done < repeats or time.perf_counter() - t0 < min_seconds:
        step()
        done += 1
    return done * tiles / (time.perf_counter() - t0) / tiles_per_site


def bench(argv: list[str] | None = None) -> None:
    """Run both measurements and print one comparable line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    for key in ("arch", "precision"):
        p.add_argument(f"--{key}", default=None)
    for key in ("site", "tile", "sites", "plates", "batch_size", "workers", "unique"):
        p.add_argument(f"--{key}", type=int, default=None)
    p.add_argument("--preset", choices=sorted(PRESET_SETTINGS), default=None,
                   help="settings (default: cuda on the GPU, cpu on the CPU)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--repeats", type=int, default=5, help="timed pairs (pipeline, bare forward)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("--workdir", default=None, help="keep data and outputs here (default: a temporary folder)")
    a = p.parse_args(argv)
    given = {k: v for k, v in vars(a).items() if v is not None and k not in ("device", "preset", "out")}
    cfg = {**PRESET_SETTINGS[a.preset or a.device], **given}
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.workdir or tmp)
        csv = _write_data(root / "data", cfg["sites"], cfg["plates"], cfg["site"], cfg["unique"], seed=0)
        ckpt = _checkpoint(root / "bench.pth", cfg["arch"], cfg["tile"], cfg["overrides"])
        flags = ["--ckpt", str(ckpt), "--valset", str(csv), "--size", str(cfg["tile"]), "--batch_size",
                 str(cfg["batch_size"]), "--num_workers", str(cfg["workers"]), "--precision", cfg["precision"],
                 "--device", a.device, "--norm_method", "mad_robustize", *(["--compile"] if a.compile else [])]
        run_inference(InferenceConfig.from_flags(build_parser().parse_args([*flags, "-o", str(root / "warmup")])))
        pipelines, bares, ends = [], [], []
        for i in range(a.repeats):  # interleaved pairs: a shared machine slows runs at random
            t0 = time.perf_counter()
            run_inference(InferenceConfig.from_flags(build_parser().parse_args([*flags, "-o", str(root / f"out{i}")])))
            total = time.perf_counter() - t0
            run = json.loads((root / f"out{i}" / "run.json").read_text())
            n_sites, per_site = run["n_sites"], run["plates"][0]["n_tiles_per_site"]
            pipelines.append(n_sites / run["timings"]["embed_seconds"])
            ends.append(n_sites / total)
            bares.append(_bare_sites_per_s(ckpt, device, cfg["batch_size"] * per_site, cfg["tile"],
                                           cfg["precision"], a.compile,
                                           max(3, min(50, cfg["sites"] // cfg["batch_size"])), per_site))
    ratios = sorted(p / b for p, b in zip(pipelines, bares))
    median = float(np.median(ratios))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"bench_inference [{name}] {cfg['arch']} {cfg['precision']}{' compiled' if a.compile else ''}: "
          f"{cfg['site']}px sites, {per_site} tiles/site of {cfg['tile']}px, batch {cfg['batch_size']} sites, "
          f"{cfg['workers']} reader threads | pipeline {max(pipelines):.1f} sites/s "
          f"(end to end incl. normalisation and CSVs: {max(ends):.1f}) | bare forward {max(bares):.1f} sites/s | "
          f"ratio {median:.2f} (median of {len(ratios)}, range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    if a.out:
        write_json_atomic(a.out, {"device": name, "settings": cfg, "pipeline_sites_per_s": pipelines,
                                  "bare_sites_per_s": bares, "end_to_end_sites_per_s": ends,
                                  "ratio_median": median, "ratio_range": [ratios[0], ratios[-1]]})


if __name__ == "__main__":
    run_cli(bench)
