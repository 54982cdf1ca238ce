"""Evaluation pipeline."""

from utils.evaluation.pipeline import *  # noqa: F401,F403  (temporary during the split)
