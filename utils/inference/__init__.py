"""Inference pipeline."""

from utils.inference.pipeline import *  # noqa: F401,F403  (temporary during the split)
from utils.inference.pipeline import PRECISIONS, EmbedContext, embed_profiles, run_inference  # noqa: F401
