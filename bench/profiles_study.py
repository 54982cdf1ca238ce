"""Batch-correction study: the paper's normalisation against the JUMP recipe, with and without Harmony, for the
handcrafted features, a trained DINO and DINO's own random initialisation, on synthetic plates with strong batch
effects and on the real LINCS data.

    python bench/profiles_study.py --out bench_out/profiles --minutes 5

Every profile table is corrected with the command a user types (``python -m utils.profiles``) and every folder is
scored by one ``evaluate.py`` call per data set, so the numbers are the production ones:

1. synthetic: ``python -m data.synthetic`` (8 plates in 4 batches, ``--batch-strength 3``), then
   ``python -m utils.handcrafted --norm_method none --feature_select none`` (raw CellProfiler-style wells),
   ``train_dino.py --preset small_cpu --save_init`` and ``inference.py --norm_method none`` for the trained and the
   initial checkpoint (raw embeddings);
2. real LINCS images (``../shared/data/lincs_a549_images``: 2 plates in 2 batches, 4 wells each) from the site
   tables of ``bench/real_data.py`` (``--real`` names its output folder; skipped with a note when absent);
3. real LINCS CellProfiler profiles (``../shared/data/lincs_SQ00015054``: one plate of 384 wells);
4. each raw table x each chain (``CHAINS``) -> ``python -m utils.profiles``; a chain that cannot run on a data set
   (Harmony on one plate, well-position means from one well each) is reported with its one-line error;
5. ``evaluate.py`` over all folders of a data set; the batch, biology and overall scores, replicate and target
   mAP and the batch classifier come from ``well_metrics.csv``.

Writes ``OUT/profiles_study.json`` and ``OUT/profiles_study.md`` (the tables of docs/PROFILES.md). The acceptance
check is printed: on the synthetic plates Harmony must lower the batch signal (raise the batch-removal score) of
every representation without lowering its target mAP by more than ``MARGIN``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from utils.fileio import ensure_dir, write_csv_atomic, write_json_atomic, write_text_atomic  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
LINCS_PROFILES = SHARED / "lincs_SQ00015054" / "SQ00015054_normalized_feature_select.csv.gz"
MARGIN = 0.05  # the largest target-mAP loss Harmony may cost on the synthetic plates
EPOCHS = 15  # about 20 s an epoch on 2 cores: the schedule ends inside --minutes 5
# The paper's default per representation (inference: spherize_mad_robustize; handcrafted: mad_robustize), the same
# with Harmony last, the JUMP recipe and the JUMP recipe with Harmony.
CHAINS: dict[str, dict[str, str]] = {
    "paper": {"embedding": "spherize_mad_robustize", "CellProfiler": "mad_robustize"},
    "paper+harmony": {"embedding": "spherize_mad_robustize_harmony", "CellProfiler": "mad_robustize_harmony"},
    "jump": {"embedding": "jump", "CellProfiler": "jump"},
    "jump+harmony": {"embedding": "jump_harmony", "CellProfiler": "jump_harmony"},
}
# One plate (SQ00015054), or two plates with four wells each (the LINCS images), share too few positions for
# well-position means: the JUMP recipe with row/column effects in their place is what can run there.
SINGLE_PLATE_CHAINS: dict[str, dict[str, str]] = {
    "jump-rowcol": {kind: "row_column_mad_robustize@controls_outlier_feature_select_spherize"
                    for kind in ("embedding", "CellProfiler")},
    "jump-rowcol+harmony": {kind: "row_column_mad_robustize@controls_outlier_feature_select_spherize_harmony"
                            for kind in ("embedding", "CellProfiler")},
}
METRICS = ("batch_score", "bio_score", "overall_score", "replicate_mAP", "target_mAP", "batch_bal_acc",
           "silhouette_batch")
SYN_FLAGS = ["--plates", "8", "--batches", "4", "--wells", "48", "--sites", "1", "--size", "256", "--seed", "0",
             "--batch-strength", "3"]


def sh(cmd: list[str], log: Path, check: bool = True) -> tuple[int, str]:
    """Run one command (a fixed argument list, no shell); returns its exit code and last stderr/stdout line."""
    with open(log, "w") as fh:
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "MPLBACKEND": "Agg"})
    lines = log.read_text().strip().splitlines()
    last = lines[-1] if lines else ""
    if check and done.returncode:
        raise SystemExit(f"profiles_study: {' '.join(cmd[:2])} failed ({done.returncode}); see {log}: {last}")
    return done.returncode, last


def synthetic_raw(out: Path, minutes: float, logs: Path) -> dict[str, Path]:
    """Raw well tables of the synthetic plates: handcrafted, DINO and DINO's initialisation."""
    plates = out / "plates"
    if not (plates / "dataset.csv").is_file():
        sh(["-m", "data.synthetic", "--out", str(plates), *SYN_FLAGS, "--workers", "2"], logs / "synthetic.log")
    csv = str(plates / "dataset.csv")
    raw = ensure_dir(out / "raw")
    if not (raw / "CellProfiler" / "run.json").is_file():
        sh(["-m", "utils.handcrafted", "--valset", csv, "-o", str(raw / "CellProfiler"), "--workers", "2",
            "--norm_method", "none", "--feature_select", "none"], logs / "handcrafted.log")
    train = out / "train"
    if not (train / "checkpoint.pth").is_file():
        sh(["train_dino.py", "--preset", "small_cpu", "--path_df", csv, "--output_dir", str(train), "--save_init",
            "--max_minutes", str(minutes), "--epochs", str(EPOCHS), "--num_workers", "2", "--no_auto_resume"],
           logs / "train_dino.log")
    for name, ckpt in (("DINO", train / "checkpoint.pth"), ("Random-DINO", train / "checkpoint0000.pth")):
        if not (raw / name / "run.json").is_file():
            sh(["inference.py", "--ckpt", str(ckpt), "--valset", csv, "--arch", "vit_tiny", "--size", "128",
                "--stride", "128", "--batch_size", "16", "--num_workers", "2", "--norm_method", "none",
                "-o", str(raw / name)], logs / f"embed_{name}.log")
    return {name: raw / name / "well_features.csv" for name in ("CellProfiler", "DINO", "Random-DINO")}


def real_image_raw(real: Path, out: Path) -> dict[str, Path]:
    """Raw well tables of the LINCS images from bench/real_data.py's site tables (mean of sites per well)."""
    from utils.profiles import aggregate_wells, feature_columns

    sources = {"CellProfiler": real / "handcrafted", "DINO": real / "tiles" / "DINO",
               "Random-DINO": real / "tiles" / "Random-DINO"}
    tables = {}
    for name, folder in sources.items():
        path = folder / "site_features.csv"
        if not path.is_file():
            return {}
        sites = pd.read_csv(path)
        feats = feature_columns(sites)
        sites = sites[np.isfinite(sites[feats].to_numpy(float)).all(axis=1)]
        keys = [c for c in ("batch", "plate", "well", "perturbation_id", "target", "control_type")
                if c in sites.columns]  # constant within a well, so they key the groups and stay as metadata
        wells = aggregate_wells(sites, feats, keys, "mean")
        target = ensure_dir(out / "raw" / name) / "well_features.csv"
        write_csv_atomic(wells, target)
        tables[name] = target
    return tables


def kind_of(path: Path) -> str:
    """embedding or CellProfiler, from the header."""
    from utils.profiles.features import detect_features

    return detect_features(list(pd.read_csv(path, nrows=0).columns), str(path))[1]


def correct_all(tables: dict[str, Path], chains: dict[str, dict[str, str]], out: Path, logs: Path,
                extra: list[str]) -> dict[str, str]:
    """Every table x chain through ``python -m utils.profiles``; returns folder -> error for those that failed."""
    failed = {}
    for name, path in tables.items():
        kind = kind_of(path)
        for label, per_kind in chains.items():
            chain = per_kind.get(kind)
            if chain is None:
                continue
            folder = out / f"{name}.{label}"
            if (folder / "run.json").is_file():
                continue
            code, last = sh(["-m", "utils.profiles", "-i", str(path), "-o", str(folder), "--norm_method", chain,
                             *extra], logs / f"profiles_{folder.name}.log", check=False)
            if code:
                failed[folder.name] = last.removeprefix("error: ")
    return failed


def evaluate(folder: Path, out: Path, logs: Path, extra: list[str]) -> pd.DataFrame:
    """One evaluate.py call over every corrected folder of a data set."""
    sh(["evaluate.py", "-b", str(folder.parent), "-i", folder.name, "-o", str(out), "--null-size", "10000",
        *extra], logs / f"evaluate_{folder.name}.log")
    return pd.read_csv(out / "well_metrics.csv")


def rows_of(metrics: pd.DataFrame, folder: Path, failed: dict[str, str], dataset: str) -> list[dict[str, Any]]:
    """One row per representation and chain, the failures included with their reason; the correction's wall time
    (its run.json) and its ratio to the paper chain of the same table, timed in the same study."""
    rows = []
    seconds = {}
    for r in metrics.to_dict("records"):
        run = json.loads((folder / str(r["label"]) / "run.json").read_text())
        seconds[str(r["label"])] = float(run["seconds"])
    for r in metrics.to_dict("records"):
        name, _, chain = str(r["label"]).partition(".")
        ref = seconds.get(f"{name}.paper")
        rows.append({"dataset": dataset, "representation": name, "chain": chain,
                     **{m: float(r[m]) if m in r and pd.notna(r[m]) else float("nan") for m in METRICS},
                     "n_wells": int(r["n_wells"]), "seconds": seconds[str(r["label"])],
                     "x_paper_time": seconds[str(r["label"])] / ref if ref else float("nan")})
    for folder, why in failed.items():
        name, _, chain = folder.partition(".")
        rows.append({"dataset": dataset, "representation": name, "chain": chain, "error": why})
    order = [*CHAINS, *SINGLE_PLATE_CHAINS]
    return sorted(rows, key=lambda r: (r["representation"], order.index(r["chain"]) if r["chain"] in order else 99))


def acceptance(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Harmony against its own chain without it, per representation, on the synthetic plates."""
    out = []
    syn = {(r["representation"], r["chain"]): r for r in rows if r["dataset"] == "synthetic" and "error" not in r}
    for (name, chain), with_h in syn.items():
        base = syn.get((name, chain.removesuffix("+harmony")))
        if not chain.endswith("+harmony") or base is None:
            continue
        d_batch = with_h["batch_score"] - base["batch_score"]
        d_target = with_h["target_mAP"] - base["target_mAP"]
        out.append({"representation": name, "chain": chain, "batch_score_gain": d_batch,
                    "batch_bal_acc_change": with_h["batch_bal_acc"] - base["batch_bal_acc"],
                    "target_mAP_change": d_target, "passes": bool(d_batch > 0 and d_target >= -MARGIN)})
    return out


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            cells = [str(r.get(c, "")) for c in cols[:3]] + [f"not run: {r['error']}"] + [""] * (len(cols) - 4)
        else:
            cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (reused: finished steps are skipped)")
    p.add_argument("--minutes", type=float, default=5.0, help="DINO training budget on the synthetic plates")
    p.add_argument("--real", default=str(ROOT / "bench_out" / "real"),
                   help="bench/real_data.py's output folder (its site tables); skipped when absent")
    opts = p.parse_args(argv)
    out = ensure_dir(opts.out).resolve()
    logs = ensure_dir(out / "logs")
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []

    syn = ensure_dir(out / "synthetic")
    tables = synthetic_raw(syn, opts.minutes, logs)
    corrected = ensure_dir(syn / "corrected")
    failed = correct_all(tables, CHAINS, corrected, logs, [])
    rows += rows_of(evaluate(corrected, syn / "eval", logs, []), corrected, failed, "synthetic")

    real = Path(opts.real)
    lincs = ensure_dir(out / "lincs_images")
    img_tables = real_image_raw(real, lincs) if real.is_dir() else {}
    if img_tables:
        corrected = ensure_dir(lincs / "corrected")
        failed = correct_all(img_tables, {**CHAINS, **SINGLE_PLATE_CHAINS}, corrected, logs, [])
        rows += rows_of(evaluate(corrected, lincs / "eval", logs, []), corrected, failed, "LINCS images")
    else:
        notes.append(f"LINCS images skipped: no site tables under {real} (run bench/real_data.py first)")

    prof = ensure_dir(out / "lincs_profiles")
    corrected = ensure_dir(prof / "corrected")
    lincs_map = ["--map", "Metadata_Batch_Number=batch"]
    failed = correct_all({"CellProfiler": LINCS_PROFILES}, {**CHAINS, **SINGLE_PLATE_CHAINS}, corrected, logs,
                         lincs_map)
    metrics = evaluate(corrected, prof / "eval", logs, [])  # the corrected tables carry batch already
    rows += rows_of(metrics, corrected, failed, "LINCS SQ00015054")

    verdicts = acceptance(rows)
    cols = ["dataset", "representation", "chain", *METRICS, "n_wells", "seconds", "x_paper_time"]
    md = [f"Batch-correction study ({date.today().isoformat()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {time.perf_counter() - t0:.0f} s). Scores from evaluate.py; "
          "higher batch_score = less batch signal.", "", table(rows, cols), "",
          f"Harmony against the same chain without it on the synthetic plates (pass: batch score up, target mAP "
          f"down by at most {MARGIN}):", "",
          table(verdicts, ["representation", "chain", "batch_score_gain", "batch_bal_acc_change",
                           "target_mAP_change", "passes"]), "", *notes]
    write_json_atomic(out / "profiles_study.json", {"rows": rows, "acceptance": verdicts, "notes": notes,
                                                    "margin": MARGIN, "synthetic": SYN_FLAGS,
                                                    "seconds": round(time.perf_counter() - t0, 1)})
    write_text_atomic(out / "profiles_study.md", "\n".join(md) + "\n")
    passed = sum(v["passes"] for v in verdicts)
    print(f"profiles_study: {len(rows)} rows, Harmony passes {passed}/{len(verdicts)} on the synthetic plates "
          f"in {time.perf_counter() - t0:.0f} s -> {out / 'profiles_study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
