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

from data.segmentation import SegmentationParams, segment
from utils.handcrafted.cli import build_parser, main
from utils.handcrafted.config import HandcraftedConfig
from utils.handcrafted.measure import FEATURE_GROUPS, MeasureOptions, measure_site
from utils.handcrafted.pipeline import run
from utils.handcrafted.profiles import NORM_METHODS, normalize

__all__ = ["FEATURE_GROUPS", "NORM_METHODS", "HandcraftedConfig", "MeasureOptions", "SegmentationParams",
           "build_parser", "main", "measure_site", "normalize", "run", "segment"]
