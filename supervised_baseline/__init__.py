"""Supervised bioactivity baseline on well profiles (the paper's hti-cnn FNN, README section 6).

Any representation's ``well_features.csv`` (embeddings or CellProfiler features) plus compound labels -> an FNN per
compound split -> test ROC-AUC and F1 per assay; ``compare`` does it for several representations. The paper's
commands run through the shims in ``hti-cnn-master/``; the schema is in supervised_baseline/README.md.

From Python::

    from supervised_baseline import evaluate, load_config, train
    cfg = load_config("supervised_baseline/hti-cnn-master/configs/fnn_dino.json", {"training.epochs": 20})
    best = train(cfg)
"""

from supervised_baseline.compare import CompareConfig, compare, compare_config
from supervised_baseline.config import SupervisedConfig, config_from_dict, load_config
from supervised_baseline.scoring import evaluate
from supervised_baseline.train import train

__all__ = ["CompareConfig", "SupervisedConfig", "compare", "compare_config", "config_from_dict", "evaluate",
           "load_config", "train"]
