"""Write what the evaluation computed: the paper's CSVs, map_results.csv, summary.md and the figures.

Every file is written atomically, so an interrupted run never leaves a half-written table that looks complete.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from utils.errors import ConfigError
from utils.evaluation.config import EvalConfig
from utils.fileio import write_csv_atomic, write_text_atomic


@dataclass
class RepResult:
    """Everything computed for one representation, ready to be written."""

    well: dict[str, object]
    pert_k: pd.DataFrame
    pert_cor: pd.DataFrame
    target_k: pd.DataFrame
    target_cor: pd.DataFrame
    map_results: pd.DataFrame
    consensus: tuple[np.ndarray, np.ndarray]


def summary_markdown(well: pd.DataFrame, cfg: EvalConfig) -> str:
    """One row per representation with the headline numbers, then the reasons for any NaN."""
    lab = cfg.label
    cols = ["label", "feature_set", "n_wells", "n_wells_input", "n_wells_dropped_to_common", "pert_acc",
            "pert_acc_NSB", f"{lab}_acc_NSP", f"{lab}_acc_NSBP", "percent_95", "pert_mAP", f"{lab}_level_mAP",
            "replicate_mAP", "replicate_fraction_retrieved", f"{lab}_mAP", f"{lab}_fraction_retrieved",
            "batch_bal_acc", "batch_mcc", "silhouette_batch", "silhouette_target", "batch_score", "bio_score",
            "overall_score"]
    lines = [f"# Evaluation of {cfg.input_dir}", "", f"NSP mode: {cfg.nsp_mode}; seed {cfg.seed}; "
             f"null size {cfg.null_size}. Metric definitions: docs/EVALUATION.md.", "",
             *wells_markdown(well, cfg), "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in well.iterrows():
        cells = []
        for c in cols:
            v = row.get(c, np.nan)
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += gains_markdown(well, cfg)
    notes = [(r["label"], r["notes"]) for _, r in well.iterrows() if r["notes"]]
    if notes:
        lines += ["", "## Notes (why a value is NaN)", ""] + [f"- **{n}**: {t}" for n, t in notes]
    return "\n".join(lines) + "\n"


def wells_markdown(well: pd.DataFrame, cfg: EvalConfig) -> list[str]:
    """One sentence on which wells the representations were scored on, so a reader can tell they are comparable.

    ``n_wells`` counts the scored non-control wells, ``n_wells_input`` the rows read and
    ``n_wells_dropped_to_common`` those left out because another representation lacks them.
    """
    if "n_wells_input" not in well.columns or len(well) < 2:
        return []
    if cfg.allow_different_wells:
        sizes = ", ".join(f"{r['label']} {r['n_wells_input']}" for _, r in well.iterrows())
        return [f"Wells: each representation on its own wells (--allow-different-wells: {sizes}); the numbers are "
                "comparable only where these are the same wells.", ""]
    if well["n_wells_dropped_to_common"].isna().any():
        return ["Wells: not matched across representations (a table has no plate column); each on its own wells.",
                ""]
    lost = int(well["n_wells_dropped_to_common"].sum())
    kept = int(well["n_wells_input"].iloc[0] - well["n_wells_dropped_to_common"].iloc[0])
    return [f"Wells: compared on the {kept} (plate, well) keys all {len(well)} representations share; "
            f"{lost} row(s) outside them were left out (n_wells_dropped_to_common).", ""]


def gains_markdown(well: pd.DataFrame, cfg: EvalConfig) -> list[str]:
    """Per representation, the signed gain in label and replicate mAP over each ``--compare-to`` baseline.

    A trained model is a result only against its own random initialisation and the handcrafted features, so the
    summary says in words whether each one beats them.
    """
    if not cfg.compare_to:
        return []
    lab = cfg.label
    by_label = well.set_index("label")
    check_compare_to(cfg, list(by_label.index))
    lines = ["", "## Gains over the baselines", "",
             f"Differences in mAP (representation minus baseline); positive means better. "
             f"Baselines: {', '.join(cfg.compare_to)}.", "",
             f"| label | baseline | {lab}_mAP gain | replicate_mAP gain | verdict |", "|---|---|---|---|---|"]
    for name, row in by_label.iterrows():
        if name in cfg.compare_to:
            continue
        for base in cfg.compare_to:
            d_t = float(row[f"{lab}_mAP"]) - float(by_label.loc[base, f"{lab}_mAP"])
            d_r = float(row["replicate_mAP"]) - float(by_label.loc[base, "replicate_mAP"])
            if not np.isfinite(d_t) and np.isfinite(d_r) and not np.isfinite(float(row[f"{lab}_mAP"])):
                verdict = (f"{'better' if d_r > 0 else 'worse' if d_r < 0 else 'no different'} on replicate "
                           f"(no {lab} labels)")
                lines.append(f"| {name} | {base} | n/a | {d_r:+.3f} | {verdict} |")
                continue
            verdict = ("undefined (a mAP is NaN, see the notes)" if not (np.isfinite(d_t) and np.isfinite(d_r))
                       else "better on both" if d_t > 0 and d_r > 0 else "worse on both" if d_t < 0 and d_r < 0
                       else f"better on {lab} only" if d_t > 0 else "better on replicate only" if d_r > 0
                       else "no difference")
            lines.append(f"| {name} | {base} | {d_t:+.3f} | {d_r:+.3f} | {verdict} |")
    return lines


def check_compare_to(cfg: EvalConfig, names: Sequence[str]) -> None:
    """Every ``--compare-to`` baseline must be one of the representation folders (checked before any work).

    This needs the folder listing, so it cannot live in EvalConfig's own checks.
    """
    missing = [b for b in cfg.compare_to if b not in names]
    if missing:
        raise ConfigError(f"--compare-to {' '.join(missing)}: no such representation folder in {cfg.input_dir} "
                          f"(found {', '.join(map(str, names))})")


def write_outputs(results: dict[str, RepResult], cfg: EvalConfig, out: Path) -> list[Path]:
    """The paper's CSVs, map_results.csv, summary.md and figures/ under ``out`` (the run's staging folder, swapped
    into ``cfg.out_dir`` with run.json once everything is written); returns the paths relative to ``out``."""
    lab = cfg.label
    well = pd.DataFrame([r.well for r in results.values()])
    frames = {
        "pert_prec_recall_k.csv": pd.concat([r.pert_k for r in results.values()], ignore_index=True),
        "pert_prec_recall_cor.csv": pd.concat([r.pert_cor for r in results.values()], ignore_index=True),
        "target_prec_recall_k.csv": pd.concat([r.target_k for r in results.values()], ignore_index=True),
        "target_prec_recall_cor.csv": pd.concat([r.target_cor for r in results.values()], ignore_index=True),
    }
    map_df = pd.concat([r.map_results for r in results.values()], ignore_index=True)
    for name, key in (("pert", "pert_prec_recall_cor.csv"), (f"{lab}_level", "target_prec_recall_cor.csv")):
        first = frames[key].groupby("label", sort=False)["mAP"].first() if len(frames[key]) else pd.Series()
        well[f"{name}_mAP"] = well["label"].map(first).astype(float)
    paper = ["label", "pert_acc", "pert_acc_NSB", f"{lab}_acc_NSP", f"{lab}_acc_NSBP", "repl_corr", "percent_95"]
    well = well[paper + [c for c in well.columns if c not in paper and c != "notes"] + ["notes"]]
    written = []
    for fname, df in [("well_metrics.csv", well), *frames.items(), ("map_results.csv", map_df)]:
        write_csv_atomic(df, out / fname)
        written.append(out / fname)
    write_text_atomic(out / "summary.md", summary_markdown(well, cfg))
    for _, row in well.iterrows():
        print(f"[{row['label']}] batch {row['batch_score']:.3f} bio {row['bio_score']:.3f} overall "
              f"{row['overall_score']:.3f} (0.4 x batch + 0.6 x bio)", file=sys.stderr)
    written.append(out / "summary.md")
    if cfg.figures:
        written += write_figures(results, well, frames, map_df, cfg, out / "figures")
    return [p.relative_to(out) for p in written]


def write_figures(results: dict[str, RepResult], well: pd.DataFrame, frames: dict[str, pd.DataFrame],
                  map_df: pd.DataFrame, cfg: EvalConfig, fig: Path) -> list[Path]:
    """The paper's scatter plots, PR curves, mAP per group and the consensus PCA, as PNG and PDF."""
    # lazy: matplotlib costs about 0.3 s to import and plots selects the Agg backend on import; the training probe
    # imports this package for its mAP and never draws, and --no-figures runs need neither
    from utils.evaluation import plots

    lab = cfg.label
    fig.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    labelled = any(len(r.consensus[1]) for r in results.values())  # no label column anywhere: no label figures
    written += plots.map_vs_accuracy(well, "pert_acc_NSB", "pert_mAP", fig / "pert_metrics_plot", "perturbation")
    if labelled:
        written += plots.map_vs_accuracy(well, f"{lab}_acc_NSBP", f"{lab}_level_mAP", fig / f"{lab}_metrics_plot",
                                         lab)
    written += plots.pr_curves(frames["pert_prec_recall_k.csv"], frames["pert_prec_recall_cor.csv"],
                               fig / "pert_pr_curves", "perturbation")
    if labelled:
        written += plots.pr_curves(frames["target_prec_recall_k.csv"], frames["target_prec_recall_cor.csv"],
                                   fig / f"{lab}_pr_curves", lab)
    for task in ("replicate", lab) if labelled else ("replicate",):
        part = map_df[map_df["task"] == task] if not map_df.empty else map_df
        written += plots.map_per_group(part, fig / f"map_{task}", f"{task} retrieval mAP")
    written += plots.batch_vs_bio(well, fig / "batch_vs_bio")
    if labelled:
        written += plots.consensus_pca({n: r.consensus for n, r in results.items()}, fig / f"consensus_pca_{lab}")
    return written
