"""Stable seeds derived from keys, so every random draw is reproducible and independent of worker counts."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def sample_seed(*keys: object) -> int:
    """Hash the keys (seed, epoch, index, ...) into a 63-bit seed that is stable across processes and runs."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch for code that still draws from the global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def keyed_generator(seed: int, device: torch.device | str, *keys: object) -> torch.Generator:
    """A fresh generator seeded from ``(seed, *keys)``: the same keys give the same draws in any run or resume.

    Training keys it by (purpose, epoch, iteration, rank); validation by (purpose, batch, rank) only, so every
    validation pass draws the same crops.
    """
    return torch.Generator(device=device).manual_seed(sample_seed(seed, *keys))
