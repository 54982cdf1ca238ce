"""Real-data study: DINO, MAE and SimCLR trained on two real LINCS plates, against their own random initialisation and
the handcrafted (cp-measure) features, embedded by tiles and by single-cell crops.

    python bench/real_data.py --out bench_out/real --minutes 15

Every step runs the user-facing command a reader of docs/REAL_DATA.md would type (subprocesses with fixed argument
lists; no shell), on ``../shared/data/lincs_a549_images`` (2 plates from two batches, 4 wells each: 2 DMSO,
orantinib, lonafarnib; 4 sites; 8-bit PNG, one file per channel; ``load_data.csv`` + ``platemap.csv``):

1. ``python -m utils.handcrafted`` on all 32 sites (the CellProfiler-style baseline);
2. ``train_{dino,mae,simclr}.py --preset small_cpu --max_minutes M --save_init`` on both plates (no held-out plate:
   SSL is fitted on the plates it profiles, as in the paper), so each run keeps its own random initialisation;
3. ``inference.py`` for every trained and initial checkpoint, by tiles and by cells (CellProfiler nucleus
   locations), both with ``--save-sites``;
4. ``evaluate.py`` per embedding mode (well level, with the handcrafted folder beside the models);
5. site-level figures computed here with the production metrics (``utils.evaluation.metrics``): cross-plate
   replicate retrieval of each compound against DMSO (a compound site's positives are the same compound's sites on
   the *other* plate, its negatives every DMSO site, so a same-well or same-plate match cannot help), and the batch
   separation of DMSO sites (silhouette of the batch label and leave-one-out 1-NN batch accuracy).

Writes ``OUT/real_data.json`` and ``OUT/real_data.md`` (the tables of docs/REAL_DATA.md) and prints the headline
against random init in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.cli import run_cli  # noqa: E402
from utils.fileio import ensure_dir, write_json_atomic, write_text_atomic  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "lincs_a549_images"
METHODS = ("dino", "mae", "simclr")
SCRIPT = {"dino": "train_dino.py", "mae": "train_mae.py", "simclr": "train_simclr.py"}
OUT_FLAG = {"dino": "--output_dir", "mae": "--output_dir", "simclr": "--ckpt_path"}
EPOCH_FLAG = {"dino": "--epochs", "mae": "--epochs", "simclr": "--max_epochs"}
NAME = {"dino": "DINO", "mae": "MAE", "simclr": "SimCLR"}
# 32 sites give one batch per epoch: the small_cpu batches of 64 would give none. MAE takes 4 masked views per
# decoded site (PNG decoding is the cost), so each method sees 32-64 views a step.
BATCH = {"dino": ["--batch_size_per_gpu", "32"], "mae": ["--batch_size", "16", "--samples_per_image", "4"],
         "simclr": ["--batch_size", "32"]}
NORM = "mad_robustize"  # 4 wells per plate: sphering (the paper's default) is degenerate on 8 wells x 192 features
TILE = ["--size", "224", "--stride", "224", "--center-tiles"]
CELLS = ["--crop-mode", "cells", "--crop-size", "96", "--size", "96"]
DMSO = "DMSO"


def sh(cmd: list[str], log: Path) -> float:
    """Run one command (fixed argument list) with its output in ``log``; a failure stops the study, naming it."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "MPLBACKEND": "Agg"})
    if done.returncode:
        tail = log.read_text().strip().splitlines()[-3:]
        raise SystemExit(f"real_data: {' '.join(cmd[:2])} failed ({done.returncode}); see {log}: {' | '.join(tail)}")
    return time.perf_counter() - t0


def site_args(data: Path) -> list[str]:
    return ["--valset", str(data / "load_data.csv"), "--platemap", str(data / "platemap.csv")]


def handcrafted(data: Path, out: Path, logs: Path) -> float:
    if (out / "run.json").is_file():
        return 0.0
    return sh(["-m", "utils.handcrafted", *site_args(data), "--workers", "2", "-o", str(out)], logs / "handcrafted.log")


def train(method: str, data: Path, out: Path, minutes: float, epochs: int, seed: int, logs: Path) -> float:
    if (out / "checkpoint.pth").is_file():
        return 0.0
    cmd = [SCRIPT[method], "--preset", "small_cpu", "--path_df", str(data / "load_data.csv"), "--platemap",
           str(data / "platemap.csv"), OUT_FLAG[method], str(out), "--save_init", "--max_minutes", str(minutes),
           EPOCH_FLAG[method], str(epochs), *BATCH[method], "--seed", str(seed), "--no_auto_resume",
           "--probe_every", "1000"]
    return sh(cmd, logs / f"train_{method}.log")


def checkpoints(method: str, out: Path) -> dict[str, Path]:
    """The run's random initialisation (epoch 0, written by --save_init) and its final weights."""
    init = [p for p in (out / "checkpoint0000.pth", out / "checkpoint-0000.pth") if p.is_file()]
    final = [p for p in (out / "checkpoint.pth",) if p.is_file()]
    if not init or not final:
        raise SystemExit(f"real_data: {out} lacks the init or the final checkpoint ({sorted(os.listdir(out))})")
    return {f"Random-{NAME[method]}": init[0], NAME[method]: final[0]}


def embed(method: str, ckpt: Path, data: Path, out: Path, mode: str, logs: Path) -> float:
    if (out / "run.json").is_file():
        return 0.0
    extra = CELLS + ["--locations", str(data / "locations")] if mode == "cells" else TILE
    cmd = ["inference.py", "--model", method, "--ckpt", str(ckpt), *site_args(data), "--arch", "vit_tiny",
           "--batch_size", "4", "--num_workers", "2", "--norm_method", NORM, "--save-sites", "-o", str(out), *extra]
    return sh(cmd, logs / f"embed_{mode}_{out.name}.log")


def evaluate(root: Path, mode: str, logs: Path, baselines: list[str]) -> pd.DataFrame:
    out = root / f"eval_{mode}"
    sh(["evaluate.py", "-b", str(root), "-i", mode, "-o", str(out), "--null-size", "10000",
        "--compare-to", *baselines], logs / f"evaluate_{mode}.log")
    return pd.read_csv(out / "well_metrics.csv")


def site_profiles(folder: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Site profiles robust-z-scored per plate (pycytominer mad_robustize through the production chain)."""
    from utils.profiles import feature_columns, normalize_profiles

    df = pd.read_csv(folder / "site_features.csv")
    feats = feature_columns(df)
    meta = [c for c in df.columns if c not in feats]
    df = df[np.isfinite(df[feats].to_numpy(float)).all(axis=1)].reset_index(drop=True)
    norm, kept = normalize_profiles(df, feats, meta, "mad_robustize", f"perturbation_id == '{DMSO}'", scope="plate")
    x = norm[kept].to_numpy(float)
    keep = np.isfinite(x).all(axis=0)
    return norm[meta].reset_index(drop=True), x[:, keep]


def compound_names(data: Path) -> dict[str, str]:
    """perturbation_id -> the plate map's pert_iname, for readable column names."""
    pm = pd.read_csv(data / "platemap.csv", dtype=str)
    return dict(zip(pm["Metadata_broad_sample"], pm["Metadata_pert_iname"]))


def site_scores(meta: pd.DataFrame, x: np.ndarray, names: dict[str, str], seed: int = 0) -> dict[str, float]:
    """Cross-plate compound retrieval against DMSO (mAP, p) per compound, and DMSO batch separation."""
    from sklearn.metrics import silhouette_score

    from utils.evaluation.metrics import PairRules, average_precision, mean_average_precision

    out: dict[str, float] = {}
    compounds = sorted(set(meta["perturbation_id"]) - {DMSO})
    for pert in compounds:
        sel = meta["perturbation_id"].isin([pert, DMSO]).to_numpy()
        m = meta[sel].reset_index(drop=True)
        # positives: same compound on another plate; negatives: any DMSO site
        rules = PairRules(("perturbation_id",), ("plate",), (), ("perturbation_id",))
        ap = average_precision(m, x[sel], rules)
        ap = ap[(m["perturbation_id"] == pert).to_numpy()]
        res = mean_average_precision(ap, ["perturbation_id"], 10000, 0.05, seed)
        label = names.get(pert, pert)
        out[f"{label}_mAP"] = float(res["mean_average_precision"].iloc[0])
        out[f"{label}_p"] = float(res["p_value"].iloc[0])
    dmso = (meta["perturbation_id"] == DMSO).to_numpy()
    xd, bd = x[dmso], meta.loc[dmso, "batch"].astype(str).to_numpy()
    out["dmso_batch_silhouette"] = float(silhouette_score(xd, bd, metric="cosine"))
    unit = xd / np.linalg.norm(xd, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    out["dmso_batch_1nn_acc"] = float((bd[sim.argmax(axis=1)] == bd).mean())
    return out


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA), help="the LINCS folder (load_data.csv, platemap.csv, locations/)")
    p.add_argument("--out", required=True, help="output folder (reused: finished steps are skipped)")
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget per method")
    p.add_argument("--epochs", type=int, default=300, help="schedule length; --minutes usually stops earlier")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args(argv)
    data, out = Path(opts.data).resolve(), ensure_dir(opts.out).resolve()
    logs = ensure_dir(out / "logs")
    t0 = time.perf_counter()
    seconds: dict[str, float] = {"handcrafted": handcrafted(data, out / "handcrafted", logs)}
    ckpts: dict[str, tuple[str, Path]] = {}
    for method in opts.methods:
        seconds[f"train_{method}"] = train(method, data, out / "train" / method, opts.minutes, opts.epochs,
                                           opts.seed, logs)
        ckpts.update({k: (method, v) for k, v in checkpoints(method, out / "train" / method).items()})
    names = compound_names(data)
    rows: list[dict[str, Any]] = []
    evals: dict[str, pd.DataFrame] = {}
    for mode in ("tiles", "cells"):
        folder = ensure_dir(out / mode)
        shutil.copytree(out / "handcrafted", folder / "CellProfiler", dirs_exist_ok=True)
        for label, (method, ckpt) in ckpts.items():
            seconds[f"embed_{mode}_{label}"] = embed(method, ckpt, data, folder / label, mode, logs)
        evals[mode] = evaluate(out, mode, logs, ["CellProfiler"])
        for label in ["CellProfiler", *ckpts]:
            meta, x = site_profiles(folder / label)
            well = evals[mode].set_index("label").loc[label]
            rows.append({"mode": mode if label != "CellProfiler" else "-", "representation": label,
                         "well_replicate_mAP": float(well["replicate_mAP"]),
                         "well_pert_acc_NSB": float(well["pert_acc_NSB"]),
                         "well_batch_silhouette": float(well["silhouette_batch"]),
                         **site_scores(meta, x, names, opts.seed)})
    frame = pd.DataFrame(rows).drop_duplicates(subset=["mode", "representation"]).reset_index(drop=True)
    scored = [c for c in frame.columns if c.endswith("_mAP")]
    for m in ("tiles", "cells"):
        for method in opts.methods:
            base = frame[(frame["mode"] == m) & (frame["representation"] == f"Random-{NAME[method]}")]
            mine = frame[(frame["mode"] == m) & (frame["representation"] == NAME[method])]
            for col in scored:
                frame.loc[mine.index, f"gain_{col}"] = mine[col].to_numpy() - base[col].to_numpy()
    train_logs = {m: [json.loads(x) for x in (out / "train" / m / "log.txt").read_text().splitlines() if x.strip()]
                  for m in opts.methods}
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "minutes_per_method": opts.minutes, "epochs_schedule": opts.epochs, "norm_method": NORM,
        "epochs_trained": {m: sum(1 for r in recs if r.get("event") != "probe") for m, recs in train_logs.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()}, "rows": frame.to_dict(orient="records"),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json_atomic(out / "real_data.json", result)
    cols = [c for c in frame.columns if not c.startswith("gain_")]
    write_text_atomic(out / "real_data.md", table(frame.to_dict(orient="records"), cols) + "\n")
    print(table(frame.to_dict(orient="records"), cols))
    best = frame[frame["representation"].isin(NAME.values())]
    print(f"real_data: {len(frame)} representations in {result['total_seconds'] / 60:.1f} min; trained minus own "
          f"random init, lonafarnib site mAP: "
          + ", ".join(f"{r['representation']} {r['mode']} {r.get('gain_lonafarnib_mAP', float('nan')):+.3f}"
                      for r in best.to_dict(orient="records")) + f" -> {out / 'real_data.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
