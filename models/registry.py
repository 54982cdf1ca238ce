"""The method registry the training loop dispatches on, and the paper's AdamW parameter groups."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.dino import DINO
from models.mae import MaskedAutoencoder
from models.simclr import SimCLR

# Each entry: build(args: dict, in_chans) -> module with .backbone, forward(views, state) -> (loss, scalars),
# after_step(state), before_optimizer_step(state), head_state_dict(), load_head_state_dict(state_dict).
METHODS: dict[str, type[nn.Module]] = {"dino": DINO, "mae": MaskedAutoencoder, "simclr": SimCLR}

MAE = MaskedAutoencoder


def build_method(name: str, args: dict[str, Any], in_chans: int) -> nn.Module:
    """Look a method up by name, failing with the list of valid names."""
    from utils.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name].build(args, in_chans)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Group 0 decays (weights), group 1 does not (biases and 1-D params such as norms); frozen params are left out."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
