"""Shared fixtures: tiny synthetic plates, made once per session per size and reused by every test that asks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from data.synthetic import generate_plates


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
