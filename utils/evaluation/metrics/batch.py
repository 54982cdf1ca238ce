"""Batch-effect diagnostics: how well batch can be predicted from features, and how wells cluster by a label.

A representation that predicts batch well (high balanced accuracy and MCC) or clusters by batch (high batch
silhouette) carries technical variation that retrieval numbers alone do not show.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from utils.errors import DataError


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Confusion matrix over the union of labels (rows true, columns predicted)."""
    labels, inv = np.unique(np.r_[y_true, y_pred], return_inverse=True)
    t, p = inv[: len(y_true)], inv[len(y_true) :]
    return np.bincount(t * len(labels) + p, minlength=len(labels) ** 2).reshape(len(labels), len(labels))


def matthews_corrcoef(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Multiclass MCC (Gorodkin's R_K) from the confusion matrix; 0 when undefined, like sklearn."""
    c = confusion(np.asarray(y_true), np.asarray(y_pred)).astype(np.float64)
    t, p = c.sum(axis=1), c.sum(axis=0)
    n, correct = c.sum(), np.trace(c)
    cov_ytyp = correct * n - t @ p
    cov_ypyp = n * n - p @ p
    cov_ytyt = n * n - t @ t
    denom = cov_ytyt * cov_ypyp
    return float(cov_ytyp / np.sqrt(denom)) if denom > 0 else 0.0


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in y_true."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes, inv = np.unique(y_true, return_inverse=True)
    hit = (y_true == y_pred).astype(float)
    return float(np.mean(np.bincount(inv, weights=hit) / np.bincount(inv)))


# The classifier factories import sklearn lazily: it costs about 0.6 s at start-up, and the training probe imports
# this package for its mAP alone.


def _ridge() -> object:
    """Closed-form linear classifier: fast, and enough to expose a linearly separable batch effect."""
    from sklearn.linear_model import RidgeClassifier  # lazy: scikit-learn costs ~1 s; only --batch metrics use it

    return RidgeClassifier(alpha=1.0)


def _logistic() -> object:
    """Multinomial logistic regression, for users who prefer a probabilistic linear model."""
    from sklearn.linear_model import LogisticRegression  # lazy: as above

    return LogisticRegression(max_iter=1000)


def _forest() -> object:
    """The paper's random forest (200 trees, seed 100): slow, catches non-linear batch effects."""
    from sklearn.ensemble import RandomForestClassifier  # lazy: as above

    return RandomForestClassifier(n_estimators=200, random_state=100, n_jobs=1)


BATCH_CLASSIFIERS = {"ridge": _ridge, "logistic": _logistic, "random_forest": _forest}


def batch_classification(
    feats: np.ndarray, batches: np.ndarray, classifier: str = "ridge", folds: int = 5, seed: int = 507
) -> dict[str, float | str]:
    """Cross-validated balanced accuracy and MCC of predicting batch from features (high = strong batch effect)."""
    # lazy for the same start-up cost as the classifier factories above
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if classifier not in BATCH_CLASSIFIERS:
        raise DataError(f"unknown batch classifier {classifier!r}: choose from {', '.join(BATCH_CLASSIFIERS)}")
    batches = np.asarray(batches)
    _, counts = np.unique(batches, return_counts=True)
    nan = {"batch_bal_acc": np.nan, "batch_mcc": np.nan}
    if len(counts) < 2:
        return {**nan, "reason": "batch classification needs two or more batches"}
    k = int(min(folds, counts.min()))
    if k < 2:
        return {**nan, "reason": "batch classification needs two or more wells in every batch"}
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    with threadpool_limits(limits=1, user_api="blas"):  # small solves: threads only add contention
        pred = cross_val_predict(BATCH_CLASSIFIERS[classifier](), feats, batches, cv=cv)
    return {"batch_bal_acc": balanced_accuracy(batches, pred), "batch_mcc": matthews_corrcoef(batches, pred),
            "reason": ""}


def silhouette_summary(per_sample: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """Mean silhouette with sklearn's validity rule (2 <= labels <= samples - 1), else NaN and why."""
    ok = labels >= 0
    n_labels = len(np.unique(labels[ok]))
    if not 2 <= n_labels <= ok.sum() - 1:
        return float("nan"), f"silhouette needs 2..n-1 labels, got {n_labels} among {int(ok.sum())} profiles"
    return float(np.mean(per_sample[ok])), ""
