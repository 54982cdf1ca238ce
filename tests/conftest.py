"""Shared fixtures: tiny synthetic plates, made once per session per size and reused by every test that asks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from data.intensity import PRESETS
from data.schema import DEFAULT_CHANNELS
from data.synthetic import generate_plates
from models.backbones import create_backbone
from models.checkpoints import FORMAT, save_checkpoint

TINY_INPUT = 32  # the tiny checkpoint's input size (the tiles of tests/test_inference.py and crops of test_cells.py)


@pytest.fixture(scope="session")
def make_plate(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``make_plate(wells)``: the dataset.csv of one merged-TIFF plate with ``wells`` wells of 2 sites of 64 px."""
    made: dict[int, Path] = {}

    def make(wells: int) -> Path:
        if wells not in made:
            out = tmp_path_factory.mktemp(f"plate{wells}")
            generate_plates(out, plates=1, batches=1, wells=wells, sites=2, size=64, seed=0, layout="merged",
                            workers=1, progress=False)
            made[wells] = out / "dataset.csv"
        return made[wells]

    return make


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SimCLR-format ViT checkpoint (32 px input, patch 8, 2 blocks), made once for the inference tests."""
    torch.manual_seed(0)
    bb = create_backbone("vit_tiny", 5, img_size=TINY_INPUT, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    obj = {"format": FORMAT, "method": "simclr", "arch": "vit_tiny", "patch_size": 8, "in_chans": 5,
           "backbone": bb.state_dict(), "heads": {}, "optimizer": None, "scaler": None, "epoch": 1, "step": 1,
           "args": {"embed_dim": 32, "depth": 2, "num_heads": 2}, "intensity": PRESETS["paper_train"].to_dict(),
           "channels": list(DEFAULT_CHANNELS), "versions": {}}
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(path, obj)
    return path
