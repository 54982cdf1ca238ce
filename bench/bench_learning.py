"""Does a method learn? Train the documented small-scale recipe for M minutes and probe a held-out plate pair.

    python bench/bench_learning.py --method dino --minutes 10 --seed 0 --out bench_out/learning/dino_s0

From the seed: six synthetic 256 px plates in two batches (64 wells, 2 sites each); plates 1-4 train, plates 5-6
(one per batch, sharing compounds through their replicates; 256 sites) are the probe. The run
uses ``--preset small_cpu`` with ``--probe_csv`` and ``--max_minutes``, so the probe at epoch 0 is the method's own
random initialisation, measured on the same plates with the same pipeline. The cp-measure handcrafted baseline is
scored on the same probe wells with the same mAP. Writes ``OUT/learning.json``:
``{method, epochs, collapsed, probe: [{epoch, target_map, replicate_map}, ...], handcrafted: {target_map,
replicate_map}, ...}`` and prints the final probe against epoch 0 (the in-process reference) and the handcrafted
features. ``bench/plot_learning.py`` draws the curves of several runs. ``--site_size``/``--wells``/``--workers``
change the plates (bench/gpu_check.py: 1080 px sites rendered on 15 cores) and ``--no_handcrafted`` skips the
baseline (cp-measure is slow on 1080 px sites).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from utils.cli import run_cli  # noqa: E402
from utils.fileio import ensure_dir, write_json_atomic  # noqa: E402

PLATES = {"plates": 6, "batches": 2, "wells": 64, "sites": 2, "size": 256}
PROBE_PLATES = 2
OUT_FLAG = {"dino": "--output_dir", "mae": "--output_dir", "simclr": "--ckpt_path"}


def make_plates(folder: Path, seed: int, layout: dict[str, int] | None = None,
                workers: int | None = None) -> tuple[Path, Path]:
    """Generate (or reuse) the seed's plates (``layout``: PLATES unless given); returns the training and the probe
    site tables. ``workers`` render sites in parallel (default: up to 2, the development VM's cores)."""
    from data.synthetic import generate_plates

    layout = layout or PLATES
    train_csv, probe_csv = folder / "train.csv", folder / "probe.csv"
    stamp = folder / "bench_plates.json"
    wanted = {**layout, "seed": seed}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == wanted and probe_csv.is_file()):
        shutil.rmtree(folder / "handcrafted", ignore_errors=True)  # scored on the old probe sites
        generate_plates(folder, **layout, seed=seed, layout="merged",
                        workers=workers or max(1, min(2, os.cpu_count() or 1)), progress=True)
        table = pd.read_csv(folder / "dataset.csv")
        probe = sorted(table["plate"].unique())[-PROBE_PLATES:]
        table[~table["plate"].isin(probe)].to_csv(train_csv, index=False)
        table[table["plate"].isin(probe)].to_csv(probe_csv, index=False)
        write_json_atomic(stamp, wanted)
    return train_csv, probe_csv


def handcrafted_baseline(probe_csv: Path, out: Path) -> dict[str, float]:
    """The cp-measure baseline's mAP on the probe wells (its own pipeline, the probe's scoring)."""
    from utils import handcrafted
    from utils.training.probe import score_wells

    wells_csv = out / "well_features.csv"
    if not wells_csv.is_file():
        handcrafted.run(handcrafted.HandcraftedConfig(valset=str(probe_csv), output_dir=str(out),
                                                      workers=max(1, min(2, os.cpu_count() or 1))))
    scores = score_wells(pd.read_csv(wells_csv), wells_csv)
    return {"target_map": scores["probe_target_map"], "replicate_map": scores["probe_replicate_map"]}


def train_run(method: str, train_csv: Path, probe_csv: Path, out: Path, minutes: float, seed: int,
              extra: list[str]) -> list[str]:
    """Train the small_cpu recipe in this process; returns the flags used."""
    from utils.training import parse_config, train

    flags = ["--preset", "small_cpu", "--path_df", str(train_csv), OUT_FLAG[method], str(out), "--probe_csv",
             str(probe_csv), "--max_minutes", str(minutes), "--seed", str(seed), "--no_auto_resume", *extra]
    train(parse_config(method, flags))
    return flags


def read_log(log_path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training records and probe records of a log.txt."""
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()]
    return [r for r in lines if r.get("event") != "probe"], [r for r in lines if r.get("event") == "probe"]


def summarise(method: str, out: Path, handcrafted: dict[str, float] | None, flags: list[str], seed: int,
              minutes: float, seconds: float, layout: dict[str, int] | None = None) -> dict[str, Any]:
    """learning.json's content from the run's log."""
    train_records, probes = read_log(out / "run" / "log.txt")
    curve = [{"epoch": int(p["epoch"]), "target_map": float(p["probe_target_map"]),
              "replicate_map": float(p["probe_replicate_map"])} for p in probes]
    first, final = curve[0], curve[-1]
    train_seconds = sum(float(r["epoch_time_s"]) for r in train_records)
    return {
        "method": method, "seed": seed, "minutes": minutes, "epochs": len(train_records),
        "collapsed": bool(train_records[-1]["collapsed"]) if train_records else False,
        "collapsed_epochs": [int(r["epoch"]) for r in train_records if r.get("collapsed")],
        "probe": curve, "handcrafted": handcrafted,
        "gain_target_map": final["target_map"] - first["target_map"],
        "gain_replicate_map": final["replicate_map"] - first["replicate_map"],
        "best_target_map": max(p["target_map"] for p in curve),
        "probe_seconds": round(sum(float(p["probe_seconds"]) for p in probes), 1),
        "train_seconds": round(train_seconds, 1),
        "probe_cost_fraction": round(sum(float(p["probe_seconds"]) for p in probes[1:]) / max(train_seconds, 1e-9), 3),
        "final_embed_std_ratio": train_records[-1].get("train_embed_std_ratio") if train_records else None,
        "flags": flags, "plates": {**(layout or PLATES), "probe_plates": PROBE_PLATES}, "seconds": round(seconds, 1),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": int(__import__("torch").get_num_threads()), "date": date.today().isoformat(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=sorted(OUT_FLAG), required=True)
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget (probes included)")
    p.add_argument("--seed", type=int, default=0, help="seeds the plates and the training run")
    p.add_argument("--out", required=True, help="output folder (learning.json, run/, handcrafted/)")
    p.add_argument("--data", default=None, help="where the seed's plates are cached (default: OUT/../plates_sSEED)")
    p.add_argument("--site_size", type=int, default=PLATES["size"], help="site size in px (1080: the paper's sites)")
    p.add_argument("--wells", type=int, default=PLATES["wells"], help="wells per plate (fewer: a quicker smoke run)")
    p.add_argument("--workers", type=int, default=None, help="processes rendering the plates (default: up to 2)")
    p.add_argument("--no_handcrafted", action="store_true",
                   help="skip the cp-measure baseline (slow on 1080 px sites; learning.json's handcrafted is null)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further training flags (after the recipe)")
    opts = p.parse_args(argv)
    out = ensure_dir(opts.out)
    data = ensure_dir(opts.data or out.parent / f"plates_s{opts.seed}")
    layout = {**PLATES, "size": opts.site_size, "wells": opts.wells}
    t0 = time.perf_counter()
    train_csv, probe_csv = make_plates(data, opts.seed, layout, opts.workers)
    handcrafted = None if opts.no_handcrafted else handcrafted_baseline(probe_csv, ensure_dir(data / "handcrafted"))
    t_train = time.perf_counter()
    flags = train_run(opts.method, train_csv, probe_csv, out / "run", opts.minutes, opts.seed, list(opts.extra))
    result = summarise(opts.method, out, handcrafted, flags, opts.seed, opts.minutes, time.perf_counter() - t_train,
                       layout)
    write_json_atomic(out / "learning.json", result)
    first, final = result["probe"][0], result["probe"][-1]
    baseline = "not run" if handcrafted is None else (
        f"{handcrafted['target_map']:.3f} / {handcrafted['replicate_map']:.3f}")
    print(f"bench_learning {opts.method} seed {opts.seed}: {result['epochs']} epochs in "
          f"{result['seconds'] / 60:.1f} min; probe target mAP {final['target_map']:.3f} vs random init "
          f"{first['target_map']:.3f} (gain {result['gain_target_map']:+.3f}, ratio "
          f"{final['target_map'] / max(first['target_map'], 1e-12):.2f}), replicate mAP "
          f"{final['replicate_map']:.3f} vs {first['replicate_map']:.3f}; probes {result['probe_cost_fraction']:.0%} "
          f"of training time; handcrafted {baseline}; collapsed {result['collapsed']}; total "
          f"{time.perf_counter() - t0:.0f} s -> {out / 'learning.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
