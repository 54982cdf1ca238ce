"""Per-assay test metrics over the labelled wells: ROC-AUC and F1 at 0.5 (scikit-learn), with the counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score, roc_auc_score

THRESHOLDS = (0.9, 0.8, 0.7)


def per_assay(probabilities: np.ndarray, labels: np.ndarray, assays: Sequence[str]) -> pd.DataFrame:
    """One row per assay: auc and f1 (NaN when the labelled wells lack one class: the assay is skipped), n_pos, n_neg.

    Only labelled entries count (NaN labels are unknown). F1 thresholds the predicted probability at 0.5.
    """
    rows = []
    for j, assay in enumerate(assays):
        known = ~np.isnan(labels[:, j])
        y, p = labels[known, j].astype(int), probabilities[known, j]
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        scored = n_pos > 0 and n_neg > 0
        rows.append({"assay": str(assay),
                     "auc": float(roc_auc_score(y, p)) if scored else np.nan,
                     "f1": float(f1_score(y, p >= 0.5, zero_division=0.0)) if scored else np.nan,
                     "n_pos": n_pos, "n_neg": n_neg})
    return pd.DataFrame(rows, columns=["assay", "auc", "f1", "n_pos", "n_neg"])


def mean_auc(table: pd.DataFrame) -> float:
    """Mean AUC over the scored assays (NaN when none is scored): the model-selection criterion."""
    scored = table["auc"].dropna()
    return float(scored.mean()) if len(scored) else float("nan")


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """The test summary: means over scored assays, counts above each AUC threshold, and the paper's convention
    (an assay without both classes counts as AUC 0.5 and F1 0), so figures compare with the paper's."""
    scored = table.dropna(subset=["auc"])
    out: dict[str, Any] = {
        "mean_auc": float(scored["auc"].mean()) if len(scored) else None,
        "mean_f1": float(scored["f1"].mean()) if len(scored) else None,
        **{f"n_auc_ge_{t}": int((scored["auc"] >= t).sum()) for t in THRESHOLDS},
        "n_assays_scored": int(len(scored)),
        "n_assays_skipped": int(len(table) - len(scored)),
        "paper_mean_auc": float(table["auc"].fillna(0.5).mean()) if len(table) else None,
        "paper_mean_f1": float(table["f1"].fillna(0.0).mean()) if len(table) else None,
    }
    return out
