"""ViT backbones, the three self-supervised methods, and checkpoint import/export."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """``models.METHODS`` without importing every method whenever a submodule is imported."""
    if name == "METHODS":
        from models.registry import METHODS  # lazy: importing a submodule must not load every method (and timm)

        return METHODS
    raise AttributeError(f"module 'models' has no attribute {name!r}")
