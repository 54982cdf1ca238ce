"""Bioactivity prediction on larger synthetic plates than the demo's, against a label-permuted reference run.

    python bench/bench_supervised.py --out bench_out/supervised [--plates 4 --wells 96 --epochs 100]

From the seed: synthetic plates (256 px, 2 sites per well) whose compounds carry ``label_*`` bioactivity labels
that depend on each compound's target; two representations of every well: a ViT-tiny at its random initialisation
(DINO's weights before the first step, tiled inference), the CellProfiler-style handcrafted features, and a
target one-hot ("TargetOracle": the ceiling, since labels are drawn from each compound's target). The FNN
is trained and scored on three compound splits for each (``python -m supervised_baseline compare``), once with the
true labels and once with the label rows permuted across compounds (the in-process reference: any AUC above it is
learnt signal, not leakage). Prints one line per representation with the ratio of the two mean AUCs and writes
``OUT/bench_supervised.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from data.synthetic import generate_plates  # noqa: E402
from supervised_baseline import compare, compare_config  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.fileio import ensure_dir, write_csv_atomic, write_json_atomic  # noqa: E402
from utils.handcrafted import HandcraftedConfig  # noqa: E402
from utils.handcrafted import run as run_handcrafted  # noqa: E402
from utils.inference import InferenceConfig, run_inference  # noqa: E402
from utils.training import train, training_config  # noqa: E402


def representations(plates: Path, emb: Path, workers: int) -> None:
    """Random-init ViT-tiny (tiled inference) and handcrafted well profiles of the plates, under ``emb/``."""
    init = emb.parent / "dino_init"
    if not (init / "checkpoint0000.pth").is_file():
        train(training_config("dino", preset="small_cpu", path_df=str(plates), output_dir=str(init), epochs=1,
                              max_steps_per_epoch=1, save_init=True, num_workers=0, no_auto_resume=True))
    if not (emb / "Random" / "well_features.csv").is_file():
        run_inference(InferenceConfig(ckpt=str(init / "checkpoint0000.pth"), valset=str(plates),
                                      outdir=str(emb / "Random"), size=128, batch_size=16, num_workers=1))
    if not (emb / "CellProfiler" / "well_features.csv").is_file():
        run_handcrafted(HandcraftedConfig(valset=str(plates), output_dir=str(emb / "CellProfiler"), workers=workers))


def target_oracle(plates: Path, emb: Path) -> None:
    """A one-hot of each well's target as its profile: the ceiling of what target identity alone predicts, since the
    generator draws each compound's labels from its target's hit probabilities."""
    wells = pd.read_csv(plates).drop_duplicates(["plate", "well"])
    onehot = pd.get_dummies(wells["target"].fillna("none")).astype(float).to_numpy()
    table = wells[["batch", "plate", "well", "perturbation_id", "target"]].reset_index(drop=True)
    features = pd.DataFrame(onehot, columns=[f"emb{i}" for i in range(onehot.shape[1])])
    write_csv_atomic(pd.concat([table, features], axis=1), ensure_dir(emb / "TargetOracle") / "well_features.csv")


def permuted_labels(plates: Path, out: Path, seed: int) -> Path:
    """The plates' labels with whole label rows shuffled across compounds (same label statistics, no signal)."""
    table = pd.read_csv(plates)
    cols = [c for c in table.columns if c.startswith("label_")]
    per_compound = table.groupby("perturbation_id", sort=True)[cols].first()
    shuffled = per_compound.iloc[np.random.default_rng(seed).permutation(len(per_compound))]
    shuffled.index = per_compound.index
    write_csv_atomic(shuffled.reset_index(), out)
    return out


def bench(argv: list[str] | None = None) -> int:
    """Build the plates and representations, run both comparisons, print the ratios."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/supervised")
    p.add_argument("--plates", type=int, default=4)
    p.add_argument("--wells", type=int, default=96)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    root = ensure_dir(a.out)
    plates = root / "plates" / "dataset.csv"
    if not plates.is_file():
        generate_plates(root / "plates", plates=a.plates, batches=2, wells=a.wells, sites=2, size=256, seed=a.seed,
                        workers=a.workers)
    emb = root / "emb" / "bench"
    representations(plates, emb, a.workers)
    target_oracle(plates, emb)
    shuffled = permuted_labels(plates, root / "labels_permuted.csv", a.seed)
    results: dict[str, Any] = {}
    for name, labels in (("true", str(plates)), ("permuted", str(shuffled))):
        summary = compare(compare_config(emb, labels, root / f"supervised_{name}",
                                         overrides={"training.epochs": a.epochs}, figures=name == "true"))
        results[name] = summary.set_index("representation")[["mean_auc", "mean_auc_sd", "paper_mean_auc",
                                                              "n_assays_scored"]].to_dict("index")
    n_compounds = pd.read_csv(plates)["perturbation_id"].nunique()
    record = {"date": date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
              "plates": a.plates, "wells": a.wells, "compounds": int(n_compounds), "epochs": a.epochs,
              "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(root / "bench_supervised.json", record)
    for rep, true in results["true"].items():
        ref = results["permuted"][rep]
        print(f"bench_supervised {rep}: test mean AUC {true['mean_auc']:.3f} ± {true['mean_auc_sd']:.3f} with the "
              f"labels, {ref['mean_auc']:.3f} ± {ref['mean_auc_sd']:.3f} with permuted labels | ratio "
              f"{true['mean_auc'] / ref['mean_auc']:.2f} ({a.plates} plates, {n_compounds} compounds, "
              f"{a.epochs} epochs)")
    print(json.dumps({"seconds": record["seconds"]}))
    return 0


if __name__ == "__main__":
    run_cli(lambda: bench())
