"""The CellProfiler-style handcrafted baseline: segmentation, cp-measure features, normalised well profiles."""

from utils.handcrafted.pipeline import *  # noqa: F401,F403  (temporary during the split)
from utils.handcrafted.pipeline import FEATURE_GROUPS, MeasureOptions, measure_site, segment  # noqa: F401
