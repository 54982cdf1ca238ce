"""Bioactivity prediction across representations: train and score the FNN on every representation folder and every
split, then one table (mean test AUC +- sd over splits, assays above each AUC threshold) and a per-assay AUC figure.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from supervised_baseline.config import SupervisedConfig, config_from_dict, set_path
from supervised_baseline.metrics import THRESHOLDS
from supervised_baseline.scoring import evaluate
from supervised_baseline.train import train
from utils.errors import ConfigError
from utils.evaluation.loading import discover_representations
from utils.fileio import write_csv_atomic, write_text_atomic
from utils.rundir import Transaction, output_run

FINAL_FILES = ("comparison.csv", "comparison.md", "comparison_per_split.csv", "per_assay_auc.csv", "per_assay_auc.png",
               "per_assay_auc.pdf")
DEFAULT_BASE: dict[str, Any] = {"name": "fnn", "output_dir": ".", "data": {"features": "", "labels": ""}}


@dataclass(frozen=True)
class CompareConfig:
    """Which representations, which labels and splits, the training recipe, and where the comparison goes."""

    input_dir: Path
    labels: str
    out_dir: Path
    splits: str | None = None
    n_splits: int = 3
    base: Mapping[str, Any] = dataclasses.field(default_factory=lambda: DEFAULT_BASE)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    figures: bool = True

    def __post_init__(self) -> None:
        if self.n_splits < 1:
            raise ConfigError(f"--n-splits must be >= 1, got {self.n_splits}")
        if not Path(self.labels).is_file():
            raise ConfigError(f"--labels {self.labels}: no such file")
        self.run_config("check", Path("."), 1)  # a bad recipe fails before any training

    def run_config(self, name: str, features: Path, split: int) -> SupervisedConfig:
        """The SupervisedConfig of one representation and split."""
        raw = json.loads(json.dumps(dict(self.base)))
        for dotted, value in self.overrides.items():
            set_path(raw, dotted, value)
        raw["name"] = f"{raw.get('name', 'fnn')}_{name}"
        raw["output_dir"] = str(self.out_dir / name / f"split{split}")
        raw.pop("checkpoint", None)
        data = raw.setdefault("data", {})
        data.update({"features": str(features), "labels": self.labels, "split": split})
        if self.splits:
            data["splits"] = self.splits
        else:
            data.setdefault("n_splits", self.n_splits)
        return config_from_dict(raw, "compare")


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per representation: mean +- sd over splits of the test summary figures."""
    rows = []
    for rep, group in results.groupby("representation", sort=False):
        row: dict[str, Any] = {"representation": rep, "n_splits": len(group)}
        for key in ("mean_auc", "paper_mean_auc", "mean_f1", *(f"n_auc_ge_{t}" for t in THRESHOLDS),
                    "n_assays_scored"):
            values = pd.to_numeric(group[key], errors="coerce")
            row[key] = float(values.mean())
            row[f"{key}_sd"] = float(values.std(ddof=1)) if values.notna().sum() > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("mean_auc", ascending=False, na_position="last").reset_index(drop=True)


def table_markdown(summary: pd.DataFrame, n_assays: int) -> str:
    """The comparison as Markdown: mean test AUC +- sd over splits and assay counts."""
    lines = [f"| representation | test mean AUC (± sd over splits) | paper convention | mean F1 | "
             f"{' | '.join(f'assays AUC ≥ {t}' for t in THRESHOLDS)} | assays scored (of {n_assays}) |",
             "|---|---|---|---|" + "---|" * len(THRESHOLDS) + "---|"]
    fmt = lambda v, sd: "n/a" if np.isnan(v) else (f"{v:.3f}" if np.isnan(sd) else f"{v:.3f} ± {sd:.3f}")
    for _, r in summary.iterrows():
        counts = " | ".join(f"{r[f'n_auc_ge_{t}']:.1f}" for t in THRESHOLDS)
        lines.append(f"| {r['representation']} | {fmt(r['mean_auc'], r['mean_auc_sd'])} | "
                     f"{fmt(r['paper_mean_auc'], r['paper_mean_auc_sd'])} | {fmt(r['mean_f1'], r['mean_f1_sd'])} | "
                     f"{counts} | {r['n_assays_scored']:.1f} |")
    return "\n".join(lines) + "\n"


def per_assay_figure(per_assay: pd.DataFrame, stem: Path) -> list[Path]:
    """Mean test AUC per assay (over splits), one marker per representation, as PNG and PDF."""
    # lazy: matplotlib costs ~0.3 s and picks a backend; compare --no-figures and the tests never draw
    from utils.evaluation.plots import plt, representation_colors, save_figure

    means = per_assay.groupby(["representation", "assay"], sort=False)["auc"].mean().unstack(0)
    order = means.mean(axis=1).sort_values(ascending=False).index
    colors = representation_colors(list(means.columns))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(order) + 2), 4))
    for rep in means.columns:
        ax.plot(range(len(order)), means.loc[order, rep], "o", label=rep, color=colors[rep], alpha=0.8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(order)), order, rotation=90, fontsize=7)
    ax.set_ylabel("test ROC-AUC (mean over splits)")
    ax.set_title("Bioactivity prediction per assay")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, stem)


def compare(cfg: CompareConfig) -> pd.DataFrame:
    """Train and score every representation on every split; write comparison.csv/.md, per_assay_auc.csv, figure.

    The comparison folder is locked and its tables are staged, so they appear (replacing an earlier comparison's)
    only when every run has finished; each run's own folder is a transaction of its own (``train``, ``evaluate``).
    """
    reps = discover_representations(cfg.input_dir)
    with output_run(cfg.out_dir) as tx:
        summary = _compare(cfg, reps, tx)
        tx.commit({"status": "complete", "representations": [name for name, _ in reps], "n_splits": cfg.n_splits},
                  stale=FINAL_FILES)
    best = summary.iloc[0]
    print(f"compare: {len(reps)} representation(s) x {cfg.n_splits} split(s); best {best['representation']} "
          f"(test mean AUC {best['mean_auc']:.3f}) -> {Path(cfg.out_dir) / 'comparison.md'}", flush=True)
    return summary


def _compare(cfg: CompareConfig, reps: list[tuple[str, Path]], tx: Transaction) -> pd.DataFrame:
    """Run every (representation, split) and stage the comparison tables and figure."""
    results, per_assay = [], []
    for name, path in reps:
        for split in range(1, cfg.n_splits + 1):
            run = cfg.run_config(name, path, split)
            checkpoint = train(run)
            scored = evaluate(dataclasses.replace(run, checkpoint=str(checkpoint)))
            results.append({"representation": name, "split": split, **scored})
            metrics = pd.read_csv(Path(run.output_dir) / "test_metrics.csv")
            per_assay.append(metrics.assign(representation=name, split=split))
    table = pd.DataFrame(results)
    assays = pd.concat(per_assay, ignore_index=True)
    summary = summarise(table)
    write_csv_atomic(table, tx.path("comparison_per_split.csv"))
    write_csv_atomic(summary, tx.path("comparison.csv"))
    write_csv_atomic(assays[["representation", "split", "assay", "auc", "f1", "n_pos", "n_neg"]],
                     tx.path("per_assay_auc.csv"))
    n_assays = int(assays["assay"].nunique())
    write_text_atomic(tx.path("comparison.md"), "# Bioactivity prediction (supervised baseline)\n\n"
                      f"FNN on each representation's well profiles, {cfg.n_splits} compound split(s), test split "
                      "ROC-AUC per assay (assays without both classes in a test split are skipped; the paper "
                      "counted them as 0.5, the 'paper convention' column).\n\n" + table_markdown(summary, n_assays))
    if cfg.figures:
        per_assay_figure(assays, tx.path("per_assay_auc"))
    return summary


def compare_config(input_dir: str | Path, labels: str, out_dir: str | Path | None = None,
                   splits: str | None = None, n_splits: int = 3, base: str | None = None,
                   overrides: Mapping[str, Any] | None = None, figures: bool = True) -> CompareConfig:
    """A CompareConfig from CLI-like values: ``base`` is a JSON config whose recipe (model, training) is reused."""
    raw = DEFAULT_BASE
    if base is not None:
        try:
            raw = json.loads(Path(base).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--config {base}: unreadable JSON ({exc})") from None
    root = Path(input_dir)
    out = Path(out_dir) if out_dir else root.with_name(f"{root.name}_supervised")  # never inside the input folder
    return CompareConfig(root, labels, out, splits, n_splits, raw, dict(overrides or {}), figures)
