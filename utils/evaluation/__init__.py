"""Evaluation pipeline: compare representation folders on the paper's metrics, copairs-style mAP and batch effects.

``config`` holds EvalConfig (the one place settings are validated), ``loading`` reads and checks the well tables,
``pipeline`` computes every metric (``metrics`` has the metric families), ``report`` writes tables and summary,
``plots`` draws the figures. From a notebook::

    from pathlib import Path
    from utils.evaluation import EvalConfig, run_evaluation
    run_evaluation(EvalConfig(input_dir=Path("SSL_data/embeddings/singlesource"), out_dir=Path("results")))
"""

from utils.evaluation.config import METADATA_PRESETS, NSP_MODES, EvalConfig, default_device
from utils.evaluation.loading import (
    Representation,
    apply_column_map,
    discover_representations,
    load_representation,
    representation_from_frame,
    required_columns,
)
from utils.evaluation.pipeline import (
    consensus_profiles,
    control_wells,
    evaluate_representation,
    map_columns,
    retrieval_maps,
    run_evaluation,
    zscore,
)
from utils.evaluation.report import RepResult, check_compare_to, gains_markdown, summary_markdown, write_outputs

__all__ = [
    "METADATA_PRESETS", "NSP_MODES", "EvalConfig", "RepResult", "Representation", "apply_column_map",
    "check_compare_to", "consensus_profiles", "control_wells", "default_device", "discover_representations",
    "evaluate_representation", "gains_markdown", "load_representation", "map_columns", "representation_from_frame",
    "required_columns", "retrieval_maps", "run_evaluation", "summary_markdown", "write_outputs", "zscore",
]
