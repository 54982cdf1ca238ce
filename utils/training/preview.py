"""Look at training views exactly as a method's training run draws them, before and after augmentation.

    python -m utils.training.preview --path_df CSV --method dino --out DIR [--color_aug paper] [training flags ...]

Any flag the method's training script accepts (e.g. ``--global_crops_size 96 --local_crops_number 4`` or
``--intensity stats.json``) may follow; it is parsed by that script's own parser and resolved with the same
``config_from_flags``, so the recipe (``utils.training.data.build_recipe``), the crop dataset (``TrainCropDataset`` +
``collate_views``), the device augmentation and the intensity standardisation (``ViewPipeline``'s own ``to_float``,
``augs`` and ``norm.standardize``, with the ``keyed_generator`` keys a training step uses) are the training
code's, not copies. Writes ``DIR/views.png`` (per view group: rows = views, columns = raw crop composite, augmented
composite, then the five augmented channels, all on the raw crop's display range so darkening shows) and
``DIR/view_stats.json`` (per view group and channel: statistics of the raw crops, after augmentation and after
standardisation).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import TrainCropDataset, collate_views
from utils.cli import FlagParser, run_cli
from utils.fileio import atomic_path, write_json_atomic
from utils.seeding import keyed_generator
from utils.training.args import parse_args
from utils.training.config import config_from_flags
from utils.training.data import ViewPipeline, build_recipe, crop_options, load_intensity_norm, load_table

# Mito -> red, AGP -> red/green, RNA -> green, ER -> green/blue, DNA -> blue: a fixed 5 -> RGB mixing for composites
_MIX = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])


def _channel_stats(x: torch.Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per channel of (N, C, h, w): pooled mean/std, mean per-view spatial std, how many views are flat/saturated."""
    x = x.detach().double()
    flat = x.flatten(2)  # N, C, P
    view_std = flat.std(dim=2, unbiased=False)  # N, C
    out = {}
    for c, name in enumerate(names):
        v = flat[:, c]
        out[name] = {
            "mean": float(v.mean()),
            "std": float(v.std(unbiased=False)),
            "mean_view_mean": float(v.mean(dim=1).mean()),
            "mean_view_std": float(view_std[:, c].mean()),
            "p01": float(torch.quantile(v.flatten()[:: max(1, v.numel() // 200000)], 0.01)),
            "p99": float(torch.quantile(v.flatten()[:: max(1, v.numel() // 200000)], 0.99)),
            "frac_pixels_at_0": float((v <= 0).double().mean()),
            "frac_pixels_at_1": float((v >= 1).double().mean()),
        }
    return out


def _relative_change(raw: torch.Tensor, aug: torch.Tensor) -> dict[str, float]:
    """Per view and channel, augmented spatial std / raw spatial std (1 = contrast kept; ~0 = the view went flat)."""
    r = raw.double().flatten(2).std(dim=2, unbiased=False)
    a = aug.double().flatten(2).std(dim=2, unbiased=False)
    ratio = (a / r.clamp_min(1e-12)).flatten()
    return {
        "median": float(ratio.median()),
        "p05": float(torch.quantile(ratio, 0.05)),
        "p95": float(torch.quantile(ratio, 0.95)),
        "frac_flat_lt_0.1": float((ratio < 0.1).double().mean()),
        "frac_black_views": float((aug.double().flatten(1).amax(1) <= 1e-6).double().mean()),
        "frac_views_any_black_channel": float((aug.double().flatten(2).amax(2) <= 1e-6).any(1).double().mean()),
    }


def _composite(x: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(C, h, w) [0, 1] intensities -> (h, w, 3) RGB, each channel divided by its display maximum ``hi``."""
    scaled = np.clip(x / hi[:, None, None], 0, 1)
    rgb = np.einsum("chw,ck->hwk", scaled, _MIX[: x.shape[0]])
    return np.clip(rgb / _MIX[: x.shape[0]].sum(0).clip(min=1e-6), 0, 1)


def _save_grid(groups: list[dict[str, Any]], names: Sequence[str], path: Path, title: str, n_show: int) -> None:
    import matplotlib  # lazy: matplotlib costs ~0.3 s and selects a backend; only the grid needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sum(min(n_show, g["raw"].shape[0]) for g in groups)
    cols = 2 + len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    r = 0
    for gi, g in enumerate(groups):
        raw, aug = g["raw"].numpy(), g["aug"].numpy()
        hi = np.quantile(raw.transpose(1, 0, 2, 3).reshape(raw.shape[1], -1), 0.995, axis=1).clip(min=1e-6)
        for i in range(min(n_show, raw.shape[0])):
            panels = [_composite(raw[i], hi), _composite(aug[i], hi)] + [aug[i, c] for c in range(len(names))]
            labels = ["raw", "augmented"] + [f"aug {n}" for n in names]
            for j, (img, lab) in enumerate(zip(panels, labels)):
                ax = axes[r, j]
                if img.ndim == 2:
                    ax.imshow(img, cmap="gray", vmin=0, vmax=float(hi[j - 2]))
                else:
                    ax.imshow(img)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0 or (i == 0):
                    ax.set_title(f"{lab}" if j else f"group {gi} {lab}", fontsize=7)
            r += 1
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        with atomic_path(path.with_suffix(f".{ext}")) as tmp:
            fig.savefig(tmp, format=ext, dpi=80)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The preview's own flags; any other flag goes to the method's training parser."""
    p = FlagParser("python -m utils.training.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("--path_df", required=True, help="dataset CSV (as for training)")
    p.add_argument("--method", required=True, choices=("dino", "simclr", "mae"))
    p.add_argument("--out", required=True, help="output folder for views.png and view_stats.json")
    p.add_argument("--color_aug", choices=("relative", "paper"), default=None,
                   help="intensity augmentation mode (default: the training script's default)")
    p.add_argument("--batches", type=int, default=2, help="batches of sites to draw (default 2)")
    p.add_argument("--batch", type=int, default=16, help="sites per batch (default 16)")
    p.add_argument("--show", type=int, default=4, help="views per group shown in the PNG (default 4)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Draw the views, write views.png/.pdf and view_stats.json, print a one-line summary."""
    args, rest = build_parser().parse_known_args(argv)
    train_argv = ["--path_df", args.path_df, "--num_workers", "0", *rest]
    if args.color_aug is not None:
        train_argv += ["--color_aug", args.color_aug]
    if args.method == "simclr" and "--ckpt_path" not in rest:
        train_argv += ["--ckpt_path", str(Path(args.out) / "unused")]
    cfg = config_from_flags(args.method, parse_args(args.method, train_argv)).with_world(1)
    device = torch.device("cpu")
    table = load_table(cfg)
    recipe = build_recipe(cfg)
    norm = load_intensity_norm(cfg, table)
    pipeline = ViewPipeline(recipe, norm, device)
    dataset = TrainCropDataset(table, recipe, channels=cfg.channels, seed=cfg.seed, **crop_options(cfg))
    order = np.random.default_rng(cfg.seed).permutation(len(dataset))
    per_group: list[dict[str, list[torch.Tensor]]] = [{"raw": [], "aug": [], "std": []} for _ in recipe.views]
    for it in range(args.batches):
        idx = order[(it * args.batch) % len(order):][: args.batch]
        views = collate_views([dataset[(0, int(i))] for i in idx])["views"]
        gen = keyed_generator(cfg.seed, device, "augment", 0, it, 0)  # the key a training step uses
        for g, (x, aug) in enumerate(zip(views, pipeline.augs)):
            raw = pipeline.to_float(x.to(device))
            augmented = aug(raw, generator=gen) if aug is not None else raw
            per_group[g]["raw"].append(raw)
            per_group[g]["aug"].append(augmented)
            per_group[g]["std"].append(pipeline.norm.standardize(augmented))
    names = list(cfg.channels)
    groups = [{k: torch.cat(v) for k, v in g.items()} for g in per_group]
    mode = recipe.gpu_aug_per_view[0].color_mode
    stats: dict[str, Any] = {
        "method": args.method, "color_mode": mode, "intensity": cfg.intensity, "path_df": args.path_df,
        "recipe": recipe.to_dict(), "groups": [],
    }
    for spec, g in zip(recipe.views, groups):
        stats["groups"].append({
            "views": g["raw"].shape[0], "size": spec.size, "scale": spec.scale,
            "raw": _channel_stats(g["raw"], names),
            "augmented": _channel_stats(g["aug"], names),
            "standardized": _channel_stats(g["std"], names),
            "augmented_over_raw_view_std": _relative_change(g["raw"], g["aug"]),
        })
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "view_stats.json", stats)
    _save_grid(groups, names, out / "views.png", f"{args.method}, color_aug={mode}, intensity={cfg.intensity}",
               args.show)
    g0 = stats["groups"][0]["augmented_over_raw_view_std"]
    print(f"{args.method} color_aug={mode}: augmented/raw per-view std median {g0['median']:.3f} "
          f"(p05 {g0['p05']:.3f}), flat {g0['frac_flat_lt_0.1']:.1%}, black views {g0['frac_black_views']:.1%} "
          f"-> {out / 'views.png'}, {out / 'view_stats.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
