"""The inference pipeline: checkpoint + site table -> tile embeddings -> normalised well and perturbation profiles.

Inference uses ``utils.profiles`` (pooling, controls, normalisation); training's probe uses inference
(``make_context``, ``embed_profiles``); inference never imports training, evaluation or handcrafted.
"""

from utils.inference.config import DEFAULTS, IN_MEMORY, InferenceConfig
from utils.inference.context import EmbedContext, embed_sites, load_context, make_context
from utils.inference.pipeline import embed_profiles, run_inference

__all__ = ["DEFAULTS", "IN_MEMORY", "EmbedContext", "InferenceConfig", "embed_profiles", "embed_sites",
           "load_context", "make_context", "run_inference"]
