"""Training pipeline."""

from utils.training.loop import *  # noqa: F401,F403  (temporary during the split)
from utils.training.loop import apply_schedule, build_schedules, clip_gradients, param_groups, train  # noqa: F401
