"""Retrieval metrics on profile matrices, split by family as copairs splits them.

Every metric works on a float feature matrix plus integer label codes (see ``codes``); the DataFrame handling lives
in ``utils.evaluation``. Similarities are computed one block of query rows at a time, so large N fits in bounded
memory, and every metric of a family consumes the same block. torch is optional (a CUDA GEMM when available) and is
never imported at module import.

- ``nearest_neighbour``: the well-level sweep (1-NN accuracies with exclusions, silhouettes);
- ``curves``: precision/recall over k and distance, F1, AUC, micro/macro averages;
- ``map``: copairs' average precision, mean average precision, nulls and Benjamini-Hochberg;
- ``replicate``: replicate correlations and percent replicating;
- ``batch``: batch classification, MCC, balanced accuracy and the silhouette summary.
"""

from utils.evaluation.metrics._blocks import codes, unit_rows, worker_count
from utils.evaluation.metrics.batch import (
    BATCH_CLASSIFIERS,
    balanced_accuracy,
    batch_classification,
    confusion,
    matthews_corrcoef,
    silhouette_summary,
)
from utils.evaluation.metrics.curves import (
    PAPER_KS,
    PAPER_THRESHOLDS,
    ProfileCurves,
    auc_trapezoid,
    f1,
    micro_macro,
    profile_curves,
)
from utils.evaluation.metrics.map import (
    PairRules,
    average_precision,
    benjamini_hochberg,
    cached_null_distributions,
    expected_ap,
    mean_average_precision,
    normalize_ap,
    null_distributions,
)
from utils.evaluation.metrics.nearest_neighbour import NNTask, WellNeighbourStats, nn_accuracy, well_neighbour_stats
from utils.evaluation.metrics.replicate import percent_replicating, replicate_correlations, replicate_null

__all__ = [
    "BATCH_CLASSIFIERS", "NNTask", "PAPER_KS", "PAPER_THRESHOLDS", "PairRules", "ProfileCurves", "WellNeighbourStats",
    "auc_trapezoid", "average_precision", "balanced_accuracy", "batch_classification", "benjamini_hochberg",
    "cached_null_distributions", "codes", "confusion", "expected_ap", "f1", "matthews_corrcoef",
    "mean_average_precision", "micro_macro", "nn_accuracy", "normalize_ap", "null_distributions",
    "percent_replicating", "profile_curves", "replicate_correlations", "replicate_null", "silhouette_summary",
    "unit_rows", "well_neighbour_stats", "worker_count",
]
