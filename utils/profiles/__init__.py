"""Profiles as DataFrames (pycytominer style: DataFrame in, DataFrame out, explicit feature and metadata lists).

``features`` finds feature columns, ``aggregate`` pools tiles/sites/wells, ``controls`` resolves the negative
controls, ``normalize`` (pycytominer steps) and ``corrections`` (well position, rank-INT, Harmony, ...) are the
steps that ``chain`` runs in order against them, ``consensus`` pools wells into perturbations. Inference, the
handcrafted baseline and evaluation all use these, and nothing here imports another pipeline.
"""

from utils.profiles.aggregate import OPERATIONS, aggregate_profiles, aggregate_sites, aggregate_wells
from utils.profiles.chain import CHAINS, STEPS, apply_chain, chain_name, normalize_profiles, parse_chain
from utils.profiles.consensus import consensus
from utils.profiles.controls import CONTROL_CHOICES, CONTROL_PRESETS, control_mask, ids_query, resolve_control_query
from utils.profiles.features import detect_features, embedding_names, feature_columns
from utils.profiles.normalize import (
    NO_NORMALISATION,
    NORM_ALIASES,
    NORM_CHOICES,
    NORM_METHODS,
    SCOPES,
    VARIANCE_THRESHOLD,
    canonical_method,
    l2_normalize_rows,
    variance_filter,
)

__all__ = [
    "CHAINS", "STEPS", "apply_chain", "chain_name", "parse_chain",
    "CONTROL_CHOICES", "CONTROL_PRESETS", "NORM_ALIASES", "NORM_CHOICES", "NORM_METHODS", "NO_NORMALISATION",
    "OPERATIONS", "SCOPES", "VARIANCE_THRESHOLD", "aggregate_profiles", "aggregate_sites", "aggregate_wells",
    "canonical_method", "consensus", "control_mask", "detect_features", "embedding_names", "feature_columns",
    "ids_query", "l2_normalize_rows", "normalize_profiles", "resolve_control_query", "variance_filter",
]
