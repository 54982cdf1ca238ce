"""The CellProfiler-style handcrafted baseline that ``evaluate.py`` scores next to the SSL embeddings.

The paper compares its embeddings against CellProfiler features; this package makes them from the same site table:
segment nuclei and cells (``segment``), measure them with cp_measure under CellProfiler names (``measure``), and
pool them into normalised, feature-selected well profiles (``profiles``). ``config`` holds the settings of a run,
``pipeline.run`` runs one, ``cli`` is ``python -m utils.handcrafted``. Put the output folder at
``<basedir>/<set>/CellProfiler`` to evaluate it beside the embeddings.

From Python::

    from utils.handcrafted import HandcraftedConfig, run
    summary = run(HandcraftedConfig(valset="plates/dataset.csv", output_dir="emb/CellProfiler", workers=4))
"""

from utils.handcrafted.cli import build_parser, main
from utils.handcrafted.config import HandcraftedConfig
from utils.handcrafted.measure import COUNT_COLUMN, FEATURE_GROUPS, MeasureOptions, measure, measure_site, site_profile
from utils.handcrafted.pipeline import compute_site_features, run
from utils.handcrafted.profiles import (
    NORM_METHODS,
    SELECT_OPERATIONS,
    aggregate,
    drop_incomplete,
    limit_sites,
    normalize,
    select_features,
)
from utils.handcrafted.segment import Segmentation, SegmentationParams, segment, segment_cells, segment_nuclei

__all__ = [
    "COUNT_COLUMN", "FEATURE_GROUPS", "NORM_METHODS", "SELECT_OPERATIONS", "HandcraftedConfig", "MeasureOptions",
    "Segmentation", "SegmentationParams", "aggregate", "build_parser", "compute_site_features", "drop_incomplete",
    "limit_sites", "main", "measure", "measure_site", "normalize", "run", "segment", "segment_cells",
    "segment_nuclei", "select_features", "site_profile",
]
