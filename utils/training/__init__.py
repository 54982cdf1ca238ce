"""The training pipeline: flags -> one ``TrainConfig`` -> ``train``.

``args`` parses the three scripts' flags, ``config`` validates them into a ``TrainConfig``, ``loop`` runs the epochs
with ``step`` (one iteration), ``data`` (loader, views, intensity), ``optim`` and ``schedules``, ``checkpointing``,
``validation`` (held-out loss and rank metrics), ``probe`` (live retrieval probe through inference and
evaluation) and ``preview`` (the views a run would draw). Training may use inference and evaluation (the probe);
they never import training.
"""

from utils.training.config import TrainConfig, config_from_flags, parse_config, training_config
from utils.training.loop import train

__all__ = ["TrainConfig", "config_from_flags", "parse_config", "train", "training_config"]
