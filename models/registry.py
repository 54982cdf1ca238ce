"""The one method registry (name -> SSL method class) and the paper's AdamW parameter groups.

The training loop, the benchmarks and the tests all look methods up here, so a new method is one entry.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from models.dino import DINO
from models.mae import MaskedAutoencoder
from models.simclr import SimCLR
from utils.errors import ConfigError

# Each entry: build(args: dict, in_chans) -> module with .backbone, forward(views, state) -> (loss, scalars),
# after_step(state), before_optimizer_step(state), head_state_dict(), load_head_state_dict(state_dict).
METHODS: dict[str, type[nn.Module]] = {"dino": DINO, "mae": MaskedAutoencoder, "simclr": SimCLR}


def build_method(name: str, args: dict[str, Any], in_chans: int) -> nn.Module:
    """Look a method up by name and build it from its flags, failing with the list of valid names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name].build(args, in_chans)


def param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups as in the paper: weights decay; biases and 1-D (norm) parameters do not.

    A module may define its own ``param_groups()``. Frozen parameters and empty groups are left out. Each group
    carries ``apply_wd``, which ``utils.training.optim.apply_schedule`` reads to set the scheduled weight decay.
    """
    if hasattr(module, "param_groups"):
        groups = list(module.param_groups())
    else:
        decay, no_decay = [], []
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    for group in groups:
        group["apply_wd"] = group.get("weight_decay", None) != 0.0
    return [g for g in groups if len(g["params"]) > 0]
