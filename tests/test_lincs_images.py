"""The real LINCS A549 images (8-bit PNG, JUMP load_data.csv + a separate plate map) through the user commands.

The set (``../shared/data/lincs_a549_images``, see its NOTICE.md): 2 plates from two batches, 4 wells each (A01 and
J18 DMSO, A13 orantinib, P13 lonafarnib), 4 sites of 1080 px, CellProfiler nucleus centres per site. The load_data
CSV has no perturbation column; the plate map has ``Metadata_broad_sample`` and ``Metadata_control_type``. Nothing
is converted by hand: the commands read the files as published.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import evaluate
import inference
from data.locations import locations_path, read_locations
from utils.handcrafted.cli import main as handcrafted_main
from utils.handcrafted.measure import COUNT_COLUMN
from utils.handcrafted.profiles import feature_columns

LINCS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lincs_a549_images"
LOAD_DATA, PLATEMAP = LINCS / "load_data.csv", LINCS / "platemap.csv"
LONAFARNIB, ORANTINIB = "BRD-K41599323-001-02-3", "BRD-K55966568-001-05-4"
# PNG crops always read whole files; that warning is asserted in tests/test_io.py
pytestmark = pytest.mark.filterwarnings("ignore:.*PNG \\(always compressed\\) not memory-mappable")

if not LOAD_DATA.exists():
    # CI always has shared/ beside the clone, so there a missing set is a failure, not a skip
    if os.environ.get("CI"):
        raise FileNotFoundError(f"LINCS A549 images not present at {LINCS}")
    pytestmark = [pytestmark, pytest.mark.skip(reason=f"LINCS A549 images not present at {LINCS}")]


@pytest.fixture(scope="module")
def handcrafted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m utils.handcrafted --valset load_data.csv --platemap platemap.csv`` on all 32 sites.

    Texture is left out (``--features intensity,sizeshape``) only to keep this under a minute on 2 cores; the
    default feature set gives the same lonafarnib verdict (docs/REAL_DATA.md).
    """
    out = tmp_path_factory.mktemp("lincs_handcrafted")
    assert handcrafted_main(["--valset", str(LOAD_DATA), "--platemap", str(PLATEMAP), "--workers", "2",
                             "--features", "intensity,sizeshape", "-o", str(out)]) == 0
    return out


def test_nucleus_counts_match_cellprofiler(handcrafted: Path) -> None:
    """The handcrafted segmentation's nuclei per site are within 15 % of CellProfiler's for most sites."""
    sites = pd.read_csv(handcrafted / "site_features.csv", dtype={"plate": str, "well": str})
    assert len(sites) == 32
    ours = sites[COUNT_COLUMN].to_numpy(float)
    theirs = np.array([len(read_locations(locations_path(LINCS / "locations", r.plate, r.well, int(r.field))))
                       for r in sites.itertuples()], dtype=float)
    assert theirs.min() >= 30 and theirs.sum() > 5000  # real counts to compare with, not empty files
    ratio = ours / theirs
    assert np.mean(np.abs(ratio - 1) <= 0.15) >= 0.9, np.round(ratio, 2).tolist()
    assert 0.9 <= np.median(ratio) <= 1.1


def test_handcrafted_lonafarnib_wells_match_across_plates(handcrafted: Path) -> None:
    """The two lonafarnib wells (one per plate, two batches) correlate better with each other than with any DMSO
    well, in the well profiles the command writes (per-plate mad_robustize against DMSO, feature selection)."""
    wells = pd.read_csv(handcrafted / "well_features.csv", dtype={"plate": str, "well": str})
    assert len(wells) == 8 and set(wells["perturbation_id"]) == {"DMSO", LONAFARNIB, ORANTINIB}
    assert (wells["control_type"] == "negcon").sum() == 4
    x = wells[feature_columns(wells)].to_numpy(float)
    assert x.shape[1] >= 10 and np.isfinite(x).all()
    corr = np.corrcoef(x)
    lona = np.flatnonzero(wells["perturbation_id"] == LONAFARNIB)
    dmso = np.flatnonzero(wells["perturbation_id"] == "DMSO")
    assert len(lona) == 2 and wells["plate"].iloc[lona].nunique() == 2
    replicate = corr[lona[0], lona[1]]
    assert replicate > corr[np.ix_(lona, dmso)].max(), (replicate, corr[np.ix_(lona, dmso)].round(3).tolist())
    assert replicate > 0.3


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, ckpt: Path) -> Path:
    """inference.py from load_data.csv + platemap.csv, by tiles and by CellProfiler-located cells."""
    root = tmp_path_factory.mktemp("lincs_embed")
    common = ["--ckpt", str(ckpt), "--valset", str(LOAD_DATA), "--platemap", str(PLATEMAP), "--size", "32",
              "--batch_size", "64", "--num_workers", "1", "--norm_method", "mad_robustize", "--save-sites"]
    assert inference.main([*common, "--stride", "64", "-o", str(root / "tiles" / "Tiny")]) == 0
    assert inference.main([*common, "--crop-mode", "cells", "--crop-size", "64", "--max-cells", "40",
                           "--locations", str(LINCS / "locations"), "--save-cells",
                           "-o", str(root / "cells" / "Tiny")]) == 0
    return root


@pytest.mark.parametrize("mode", ["tiles", "cells"])
def test_inference_end_to_end_from_load_data_and_platemap(embedded: Path, mode: str) -> None:
    out = embedded / mode / "Tiny"
    wells = pd.read_csv(out / "well_features.csv", dtype={"plate": str, "well": str})
    assert len(wells) == 8 and set(wells["plate"]) == {"SQ00015198", "SQ00015230"}
    # the perturbations come from the plate map's Metadata_broad_sample, joined on plate and well
    by_well = wells.set_index(["plate", "well"])["perturbation_id"]
    assert by_well[("SQ00015230", "P13")] == LONAFARNIB and by_well[("SQ00015198", "A13")] == ORANTINIB
    assert (by_well.xs("A01", level="well") == "DMSO").all()
    feats = [c for c in wells.columns if c.startswith("emb")]
    assert len(feats) == 32 and np.isfinite(wells[feats].to_numpy(float)).all()
    sites = pd.read_csv(out / "site_features.csv")
    assert len(sites) == 32
    run = json.loads((out / "run.json").read_text())
    assert run["n_sites"] == 32
    if mode == "cells":
        c = run["cells"]
        assert c["n_sites_from_location_files"] == 32 and c["n_sites_segmented"] == 0
        assert 30 * 32 < c["n_cells"] <= 40 * 32 and c["n_cells_dropped_at_edges"] > 0 and c["n_cells_over_max"] > 0
        cells = pd.read_parquet(out / "cell_features.parquet")
        assert len(cells) == c["n_cells"] and {"x", "y"} <= set(cells.columns)
        # dropped at the edge: a kept crop (centre rounded to a pixel) lies inside the 1080 px site
        assert cells[["x", "y"]].round().min().min() >= 32 and cells[["x", "y"]].round().max().max() <= 1080 - 32


def test_evaluate_runs_on_the_real_folders(embedded: Path, handcrafted: Path, tmp_path: Path) -> None:
    """evaluate.py on the tiles folder beside the handcrafted profiles; no target column, so target metrics are
    skipped with one line and the replicate metrics are finite."""
    shutil.copytree(handcrafted, embedded / "tiles" / "CellProfiler", dirs_exist_ok=True)
    out = tmp_path / "eval"
    assert evaluate.main(["-b", str(embedded), "-i", "tiles", "-o", str(out), "--null-size", "200",
                          "--compare-to", "CellProfiler"]) == 0
    metrics = pd.read_csv(out / "well_metrics.csv").set_index("label")
    assert set(metrics.index) == {"Tiny", "CellProfiler"}
    assert np.isfinite(metrics["replicate_mAP"]).all()
