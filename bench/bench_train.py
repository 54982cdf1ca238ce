"""Training throughput per method (img/s) with real data loading, against a bare step on random device tensors.

The data run uses the training loop's own pieces (crop dataset, DataLoader, device augmentation, TrainStep); the bare
run feeds the same model random, already-standardised view tensors of the recipe's shapes, so the ratio shows how
much the input pipeline costs. Both include the optimizer step. After ``--warmup`` steps of each, they are timed in
alternating windows of ``--steps`` (``--rounds`` of each) and the fastest window of each counts. On a shared CPU the
loader workers compete with the compute threads, so CPU ratios are noisy; on a GPU they measure input stalls.

    python bench/bench_train.py                       # GPU: ViT-S/16, paper crops, bf16
    python bench/bench_train.py --device cpu          # CPU: tiny batch, few steps
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402

from utils.cli import run_cli  # noqa: E402
from utils.distributed import DistInfo, resolve_device  # noqa: E402
from utils.precision import resolve_precision  # noqa: E402
from utils.seeding import sample_seed  # noqa: E402
from utils.training import parse_config  # noqa: E402
from utils.training.data import ViewPipeline, load_intensity_norm  # noqa: E402
from utils.training.loop import build_model  # noqa: E402
from utils.training.optim import build_optimizer  # noqa: E402
from utils.training.schedules import build_schedules  # noqa: E402
from utils.training.step import TrainStep  # noqa: E402

# The paper's crop settings per method (ViT-S/16); only the batch size and arch change between GPU and CPU.
METHOD_FLAGS = {
    "dino": lambda arch, bs: ["--arch", arch, "--batch_size_per_gpu", str(bs)],
    "mae": lambda arch, bs: ["--model", arch, "--batch_size", str(bs), "--mask_ratio", "0.75", "--norm_pix_loss"],
    "simclr": lambda arch, bs: ["--arch", arch, "--batch_size", str(bs), "--ckpt_path", "unused"],
}
GPU_BATCH = {"dino": 64, "mae": 256, "simclr": 256}


class _EpochStream(Sampler):
    """(epoch, index) keys over many shuffled epochs back to back, so a short bench never stalls on epoch ends."""

    def __init__(self, n_sites: int, total: int, seed: int) -> None:
        self.n_sites, self.total, self.seed = n_sites, total, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        made, epoch = 0, 0
        while made < self.total:
            for i in np.random.default_rng(sample_seed(self.seed, "bench", epoch)).permutation(self.n_sites):
                if made == self.total:
                    return
                yield epoch, int(i)
                made += 1
            epoch += 1

    def __len__(self) -> int:
        return self.total


def _plate(args: argparse.Namespace) -> Path:
    """A cached synthetic plate of uncompressed (memory-mappable) merged TIFFs."""
    from data.synthetic import generate_plates

    out = Path(args.data_dir) / f"sites{args.sites}_px{args.site_size}"
    csv = out / "dataset.csv"
    if not csv.is_file():
        wells = max(1, args.sites // 2)
        generate_plates(out, plates=1, batches=1, wells=wells, sites=2, size=args.site_size, seed=0,
                        layout="merged", workers=max(1, args.num_workers), progress=True)
    return csv


def _seconds(fn: Any, start: int, steps: int, device: torch.device) -> float:
    """Wall time of ``steps`` calls, synchronising the device around the window."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for i in range(start, start + steps):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_method(method: str, opts: argparse.Namespace, csv: Path, device: torch.device) -> dict[str, Any]:
    """Measure one method: the bare step on random device tensors, then the full data + augmentation + step."""
    from data.augment import get_recipe
    from data.datasets import TrainCropDataset, collate_views
    from data.schema import TRAIN_REQUIRED, load_site_table

    batch = opts.batch_size or (GPU_BATCH[method] if device.type == "cuda" else 2)
    argv = [*METHOD_FLAGS[method](opts.arch, batch), "--path_df", str(csv), "--device", str(device)]
    if opts.precision:
        argv += ["--precision", opts.precision]
    cfg = parse_config(method, [*argv, *(["--compile"] if opts.compile else [])]).with_world(1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True, launcher="single")
    precision = resolve_precision(cfg.precision, device)
    recipe = get_recipe(cfg.recipe, **{k: v for k, v in cfg.recipe_overrides.items() if v is not None})
    norm = load_intensity_norm(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, device).train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    values = build_schedules(cfg, steps_per_epoch=100).at(50 * cfg.epochs)
    stepper = TrainStep(cfg, model, optimizer, scaler, precision, info, cfg.seed, ViewPipeline(recipe, norm, device))

    gen = torch.Generator(device=device).manual_seed(0)
    c = len(cfg.channels)
    bare_views = [torch.randn(v.count * batch, c, v.size, v.size, device=device, generator=gen) for v in recipe.views]

    def bare_step(i: int) -> None:
        stepper(bare_views, 0, i, i, values)

    _seconds(bare_step, 0, opts.warmup, device)
    total = opts.warmup + opts.rounds * opts.steps
    table = load_site_table(str(csv), required=TRAIN_REQUIRED, channels=tuple(cfg.channels))
    dataset = TrainCropDataset(table, recipe, channels=tuple(cfg.channels), seed=0)
    loader = DataLoader(
        dataset, batch_size=batch, sampler=_EpochStream(len(dataset), total * batch, seed=0), collate_fn=collate_views,
        num_workers=opts.num_workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=opts.num_workers > 0, prefetch_factor=opts.prefetch if opts.num_workers > 0 else None,
    )
    batches = iter(loader)

    def data_step(i: int) -> None:
        stepper(stepper.augment(next(batches)["views"], 0, i), 0, i, i, values)

    _seconds(data_step, 0, opts.warmup, device)
    bare_s, data_s = [], []
    for r in range(opts.rounds):  # alternate windows, so drifting load or clocks hit both alike
        start = opts.warmup + r * opts.steps
        bare_s.append(_seconds(bare_step, start, opts.steps, device))
        data_s.append(_seconds(data_step, start, opts.steps, device))
    bare = opts.steps * batch / min(bare_s)
    data = opts.steps * batch / min(data_s)
    # The collapse indicators on the last step's embedding: the spread (every step) and the rank (logged steps).
    spread_s = _seconds(lambda i: stepper.model.collapse_stats(), 0, opts.steps, device) / opts.steps
    rank_s = _seconds(lambda i: stepper.model.collapse_stats(with_rank=True), 0, opts.steps, device) / opts.steps
    step_s = min(bare_s) / opts.steps
    return {
        "method": method, "arch": cfg.arch, "device": str(device), "precision": precision, "batch": batch,
        "views": [f"{v.count}x{v.size}" for v in recipe.views], "steps": opts.steps, "rounds": opts.rounds,
        "compile": opts.compile,
        "data_img_s": data, "bare_img_s": bare, "ratio": data / bare,
        "diag_fraction_every_step": spread_s / step_s, "diag_fraction_logged_step": rank_s / step_s,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def main() -> int:
    """Run the selected methods and print one line each (and a JSON file when --out is given)."""
    p = argparse.ArgumentParser("bench_train.py", description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["dino", "mae", "simclr"], choices=["dino", "mae", "simclr"])
    p.add_argument("--arch", default="vit_small", help="backbone name from models.backbones.ARCHS")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch_size", type=int, default=None, help="per step (default: GPU 64/256/256, CPU 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: GPU 30, CPU 2)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of each kind; the best round counts")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps of each kind first (default: GPU 10, CPU 1)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default: CPU cores - 1)")
    p.add_argument("--prefetch", type=int, default=4, help="batches prefetched per worker")
    p.add_argument("--data_dir", default="/tmp/cellpaint_bench", help="where the synthetic plate is cached")
    p.add_argument("--sites", type=int, default=None, help="synthetic sites (default: GPU 512, CPU 16)")
    p.add_argument("--site_size", type=int, default=None, help="site size in px (default: GPU 1080, CPU 256)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    opts = p.parse_args()
    device = resolve_device(opts.device, 0)
    gpu = device.type == "cuda"
    if gpu:
        torch.set_float32_matmul_precision("high")
    import os

    opts.steps = opts.steps or (30 if gpu else 2)
    opts.warmup = opts.warmup if opts.warmup is not None else (10 if gpu else 1)
    opts.num_workers = opts.num_workers if opts.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    opts.sites = opts.sites or (512 if gpu else 16)
    opts.site_size = opts.site_size or (1080 if gpu else 256)
    csv = _plate(opts)
    results = []
    for method in opts.methods:
        r = bench_method(method, opts, csv, device)
        results.append(r)
        print(f"bench_train {r['method']:6s} {r['arch']} {r['gpu']} {r['precision']} batch {r['batch']} "
              f"views {'+'.join(r['views'])}: data {r['data_img_s']:.2f} img/s, bare step {r['bare_img_s']:.2f} "
              f"img/s, ratio {r['ratio']:.2f}; collapse diagnostics {r['diag_fraction_every_step']:.2%} of a bare "
              f"step ({r['diag_fraction_logged_step']:.2%} with the rank on logged steps)", flush=True)
    if opts.out:
        from utils.fileio import write_json_atomic

        write_json_atomic(opts.out, results)
    print("bench_train summary: " + ", ".join(f"{r['method']} ratio {r['ratio']:.2f}" for r in results))
    return 0


if __name__ == "__main__":
    run_cli(main)
