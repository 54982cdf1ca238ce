"""Single-cell crops: nucleus locations, crop geometry, segmentation centres, inference ``--crop-mode cells`` end
to end (brute force against the backbone), resume, and training crops centred on nuclei.

Planted sites carry their own coordinates: the Mito channel holds ``y * W + x`` at every pixel, so a crop's first
pixel says exactly where the crop was cut, and the DNA channel holds bright disks (nuclei) at known centres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from data.augment import CELL_JITTER, AugmentRecipe, GpuAugment, ViewSpec, sample_cell_boxes
from data.datasets import TrainCropDataset
from data.intensity import PRESETS
from data.io import read_site, write_merged_tiff
from data.locations import (
    X_COLUMN,
    Y_COLUMN,
    cap_cells,
    cell_corners,
    check_location_files,
    cut_crops,
    locations_path,
    read_locations,
)
from data.schema import DEFAULT_CHANNELS, LOCATIONS_COLUMN, load_site_table
from data.segmentation import nucleus_centres
from inference import build_parser
from models.checkpoints import load_backbone_for_inference
from utils.errors import ConfigError, DataError
from utils.inference import InferenceConfig, pipeline
from utils.training import parse_config, training_config

DNA = DEFAULT_CHANNELS.index("DNA")
MITO = DEFAULT_CHANNELS.index("Mito")
SIDE = 96
TILE = 32  # model input: the input size of conftest's tiny checkpoint
CROP = 24  # cell crop, resized to TILE
RADIUS = 7
META = ["batch", "plate", "well", "field"]
# (plate, well, field) -> planted nuclei (y, x). The crops of (5.0, 50.0) and (60.0, 86.0) cross the border; the
# first nucleus also touches it (segmentation drops it), the second does not.
PLANTED: dict[tuple[str, str, int], list[tuple[float, float]]] = {
    ("P1", "A01", 1): [(20.3, 30.7), (50.2, 62.9), (72.6, 25.4), (5.0, 50.0)],
    ("P1", "A01", 2): [(30.0, 40.0), (66.4, 70.2), (60.0, 86.0)],
    ("P1", "B02", 1): [(48.0, 20.0), (25.5, 70.5)],
    ("P1", "B02", 2): [],
}


def _planted_site(centres: list[tuple[float, float]], side: int = SIDE, radius: float = RADIUS,
                  seed: int = 0) -> np.ndarray:
    """Five uint16 channels: Mito = pixel index, DNA = disks on noise, the rest noise (so embeddings differ)."""
    rng = np.random.default_rng(seed)
    px = rng.integers(500, 3000, (len(DEFAULT_CHANNELS), side, side)).astype(np.uint16)
    yy, xx = np.mgrid[:side, :side]
    px[MITO] = (yy * side + xx).astype(np.uint16)
    px[DNA] = rng.integers(800, 1200, (side, side))
    for cy, cx in centres:
        px[DNA][(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 30000
    return px


def _write_locations(path: Path, centres: list[tuple[float, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"ImageNumber": 1, X_COLUMN: [c[1] for c in centres], Y_COLUMN: [c[0] for c in centres]},
                 columns=["ImageNumber", X_COLUMN, Y_COLUMN]).to_csv(path, index=False)


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dataset.csv of one plate of planted sites (merged TIFFs) and ``locations/`` in CellProfiler's convention."""
    root = tmp_path_factory.mktemp("cells")
    rows = []
    for i, ((plate_id, well, field), centres) in enumerate(PLANTED.items()):
        name = f"images/{plate_id}_{well}_{field}.tiff"
        (root / "images").mkdir(exist_ok=True)
        write_merged_tiff(root / name, _planted_site(centres, seed=i), otsu=None)
        _write_locations(locations_path(root / "locations", plate_id, well, field), centres)
        rows.append({"FileName_Merged": name, "batch": "b1", "plate": plate_id, "well": well, "field": field,
                     "perturbation_id": "DMSO" if well == "A01" else "CPD1", "target": "t"})
    pd.DataFrame(rows).to_csv(root / "dataset.csv", index=False)
    return root


def _run(plate: Path, ckpt: Path, out: Path, *extra: str) -> Path:
    argv = ["--ckpt", str(ckpt), "--valset", str(plate / "dataset.csv"), "-o", str(out), "--size", str(TILE),
            "--batch_size", "3", "--num_workers", "1", "--crop-mode", "cells", "--crop-size", str(CROP),
            "--norm_method", "no_post_proc", *extra]
    return pipeline.run_inference(InferenceConfig.from_flags(build_parser().parse_args(argv)))


# ------------------------------------------------------------------------------------------------- crop geometry


def test_crops_are_centred_on_the_nuclei_brute_force() -> None:
    centres = np.array(PLANTED[("P1", "A01", 1)])
    site = _planted_site(list(map(tuple, centres)))
    corners, kept, dropped = cell_corners(centres, CROP, SIDE, SIDE, "drop")
    assert kept.tolist() == [0, 1, 2] and dropped == 1  # (5, 50) is 5 px from the top: its crop would cross it
    crops = cut_crops(torch.from_numpy(site)[None], np.zeros(len(kept), int), corners, CROP).numpy()
    assert crops.dtype == np.uint16 and crops.shape == (3, 5, CROP, CROP)
    for crop, (cy, cx) in zip(crops, centres[kept]):
        y0, x0 = divmod(int(crop[MITO, 0, 0]), SIDE)  # where the crop was cut, read from the pixels themselves
        assert (y0 + CROP // 2, x0 + CROP // 2) == (round(cy), round(cx))
        np.testing.assert_array_equal(crop, site[:, y0 : y0 + CROP, x0 : x0 + CROP])
        disk = crop[DNA] > 20000  # the nucleus sits in the middle of its crop
        ys, xs = np.nonzero(disk)
        assert abs(ys.mean() - (cy - y0)) < 0.5 and abs(xs.mean() - (cx - x0)) < 0.5


def test_edge_cells_dropped_or_zero_padded() -> None:
    centres = np.array([[2.0, 2.0], [48.0, 48.0], [95.0, 40.0], [40.0, 90.4]])
    site = _planted_site([])
    _, kept, dropped = cell_corners(centres, CROP, SIDE, SIDE, "drop")
    assert kept.tolist() == [1] and dropped == 3
    corners, kept, dropped = cell_corners(centres, CROP, SIDE, SIDE, "pad")
    assert kept.tolist() == [0, 1, 2, 3] and dropped == 0
    crops = cut_crops(torch.from_numpy(site)[None], np.zeros(4, int), corners, CROP).numpy()
    padded = np.zeros((5, SIDE + 2 * CROP, SIDE + 2 * CROP), np.uint16)
    padded[:, CROP:-CROP, CROP:-CROP] = site
    for crop, (y0, x0) in zip(crops, corners):
        np.testing.assert_array_equal(crop, padded[:, y0 + CROP : y0 + 2 * CROP, x0 + CROP : x0 + 2 * CROP])
    assert (crops[0, :, : CROP // 2 - 2] == 0).all() and (crops[1] > 0).any(axis=0).all()


def test_max_cells_is_a_seeded_subset_in_order() -> None:
    a, b = cap_cells(50, 7, "P1", "A01", 1), cap_cells(50, 7, "P1", "A01", 1)
    assert a.tolist() == b.tolist() and len(a) == 7 and (np.diff(a) > 0).all()
    assert cap_cells(50, 7, "P1", "A01", 2).tolist() != a.tolist()
    assert cap_cells(5, 7, "x").tolist() == [0, 1, 2, 3, 4] and cap_cells(5, None).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- location reader


def test_read_locations_order_and_convention(tmp_path: Path) -> None:
    path = locations_path(tmp_path, "SQ1", "A01", 2.0)
    assert path == tmp_path / "SQ1" / "A01-2-Nuclei.csv"
    _write_locations(path, [(10.5, 80.25), (0.0, 3.0)])
    np.testing.assert_array_equal(read_locations(path, 100, 90), [[10.5, 80.25], [0.0, 3.0]])  # (y, x)
    path.write_text(f"{X_COLUMN},{Y_COLUMN}\n")
    assert read_locations(path, 100, 100).shape == (0, 2)


@pytest.mark.parametrize("content, needle", [
    (None, "nucleus location file not found"),
    ("", "empty file"),
    ("Location_Center_X,Nuclei_Location_Center_Y\n1,2\n", f"missing column(s) {X_COLUMN}"),
    (f"{X_COLUMN},{Y_COLUMN}\n1,2\nabc,3\n", f"{X_COLUMN} on line 3 is 'abc', not a number"),
    (f"{X_COLUMN},{Y_COLUMN}\n1,2\n3,\n", f"{Y_COLUMN} on line 3 is '', not a number"),
    (f"{X_COLUMN},{Y_COLUMN}\n1,2\n3,150\n", f"{Y_COLUMN} on line 3 is 150, outside the site's height of 100 px"),
    (f"{X_COLUMN},{Y_COLUMN}\n-1,2\n", f"{X_COLUMN} on line 2 is -1, outside"),
])
def test_read_locations_errors_are_one_line(tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "A01-1-Nuclei.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as info:
        read_locations(path, 100, 100)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_location_column_in_site_csv_and_missing_files(plate: Path, tmp_path: Path) -> None:
    df = pd.read_csv(plate / "dataset.csv")
    df["FileName_Merged"] = [str(plate / p) for p in df["FileName_Merged"]]
    df[LOCATIONS_COLUMN] = [f"{w}-{f}-Nuclei.csv" for w, f in zip(df["well"], df["field"])]
    df["PathName_NucleiLocations"] = str(plate / "locations" / "P1")
    df.loc[3, LOCATIONS_COLUMN] = ""  # this site is segmented
    df.to_csv(tmp_path / "with_locations.csv", index=False)
    table = load_site_table(tmp_path / "with_locations.csv")
    assert table[LOCATIONS_COLUMN].iloc[0] == str(plate / "locations" / "P1" / "A01-1-Nuclei.csv")
    assert pd.isna(table[LOCATIONS_COLUMN].iloc[3])
    assert check_location_files(table, None) == 3
    assert check_location_files(table, plate / "locations") == 4
    with pytest.raises(DataError, match=r"--locations .*: 4 file\(s\) missing: .*A01-1-Nuclei.csv"):
        check_location_files(table, tmp_path)


# ------------------------------------------------------------------------------------------------- segmentation


def test_segmentation_centres_land_on_planted_nuclei() -> None:
    planted = [(20.3, 30.7), (50.2, 62.9), (72.6, 25.4), (40.0, 85.0), (80.0, 80.0)]
    found = nucleus_centres(_planted_site(planted, radius=8), DEFAULT_CHANNELS)
    assert found.shape == (len(planted), 2)
    distance = np.linalg.norm(found[:, None] - np.array(planted)[None], axis=2)
    assert (distance.min(axis=0) < 1.0).all() and (distance.min(axis=1) < 1.0).all()
    assert nucleus_centres(_planted_site([]), DEFAULT_CHANNELS).shape == (0, 2)
    with pytest.raises(ConfigError, match="DNA"):
        nucleus_centres(np.zeros((1, 8, 8), np.uint16), ("AGP",))


# ------------------------------------------------------------------------------------------ inference end to end


def _brute_force_cell(ckpt: Path, plate: Path, field_row: dict, y: float, x: float) -> np.ndarray:
    """CLS of one cell crop computed without the pipeline: read, cut, resize, standardise, forward_features."""
    backbone = load_backbone_for_inference(ckpt).backbone.eval()
    row = load_site_table(plate / "dataset.csv").set_index(META).loc[tuple(field_row[k] for k in META)]
    pixels, _ = read_site(row.to_dict())
    cy, cx = int(np.floor(y + 0.5)), int(np.floor(x + 0.5))
    crop = torch.tensor(pixels[:, cy - CROP // 2 : cy + CROP - CROP // 2, cx - CROP // 2 : cx + CROP - CROP // 2],
                        dtype=torch.float32)[None]
    crop = F.interpolate(crop, size=(TILE, TILE), mode="bilinear", antialias=True, align_corners=False)
    norm = PRESETS["paper_train"]
    mean, std = torch.tensor(norm.mean)[:, None, None], torch.tensor(norm.std)[:, None, None]
    with torch.no_grad():
        return backbone.forward_features((crop / 65535.0 - mean) / std)[0, 0].numpy()


def test_inference_cells_end_to_end(plate: Path, ckpt: Path, tmp_path: Path) -> None:
    out = _run(plate, ckpt, tmp_path / "out", "--locations", str(plate / "locations"), "--save-cells",
               "--save-sites")
    run = json.loads((out / "run.json").read_text())
    assert run["cells"]["n_cells"] == 7 and run["cells"]["n_cells_dropped_at_edges"] == 2
    assert run["n_sites_without_cells"] == 1 and run["cells"]["n_sites_from_location_files"] == 4
    assert run["settings"]["crop_mode"] == "cells" and run["settings"]["crop_size"] == CROP
    cells = pd.read_parquet(out / "cell_features.parquet")
    feats = [f"emb{i}" for i in range(32)]
    assert list(cells.columns[:4]) == META and {"x", "y", "site_centre"} <= set(cells.columns)
    assert len(cells) == 7 and not cells["site_centre"].any()
    half = CROP // 2
    kept = {key: [c for c in cs if half <= min(c) and max(c) <= SIDE - half] for key, cs in PLANTED.items()}
    for key, group in cells.groupby(["plate", "well", "field"]):
        np.testing.assert_allclose(group[["y", "x"]].to_numpy(), kept[key])
    # the well profile is the mean of its cells (before normalisation), the site profile too
    wells = pd.read_csv(out / "well_features.csv").set_index(["plate", "well"])
    by_hand = cells.groupby(["plate", "well"])[feats].mean()
    np.testing.assert_allclose(wells.loc[by_hand.index, feats].to_numpy(), by_hand.to_numpy(), atol=1e-6)
    sites = pd.read_csv(out / "site_features.csv")
    assert sites["n_cells"].tolist() == [3, 2, 2, 0] and sites.loc[3, feats].isna().all()
    # and one cell's embedding is the backbone's CLS of its crop, cut and resized by hand
    first = cells.iloc[4].to_dict()
    expected = _brute_force_cell(ckpt, plate, first, first["y"], first["x"])
    np.testing.assert_allclose(cells.loc[4, feats].to_numpy(dtype=np.float32), expected, atol=2e-5)


def test_inference_cells_from_segmentation_and_centre_crop(plate: Path, ckpt: Path, tmp_path: Path) -> None:
    out = _run(plate, ckpt, tmp_path / "seg", "--save-cells", "--empty-sites", "center", "--edge-cells", "pad")
    run = json.loads((out / "run.json").read_text())
    # segmentation drops nuclei touching the border ((5, 50) does); padding keeps (60, 86), whose crop crosses it
    assert run["cells"]["n_sites_segmented"] == 4 and run["cells"]["n_cells"] == 8
    assert run["cells"]["n_cells_dropped_at_edges"] == 0 and run["cells"]["n_sites_centre_crop"] == 1
    cells = pd.read_parquet(out / "cell_features.parquet")
    centre = cells[cells["site_centre"]]
    assert len(centre) == 1 and (centre["well"].iloc[0], centre["field"].iloc[0]) == ("B02", 2)
    for key, group in cells[~cells["site_centre"]].groupby(["plate", "well", "field"]):
        found = group[["y", "x"]].to_numpy()
        distance = np.linalg.norm(found[:, None] - np.array(PLANTED[key])[None], axis=2)
        assert (distance.min(axis=1) < 1.0).all()


def test_resume_with_other_crop_size_is_refused(plate: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    _run(plate, ckpt, out, "--locations", str(plate / "locations"))
    _run(plate, ckpt, out, "--locations", str(plate / "locations"), "--resume")  # same settings: reused
    assert json.loads((out / "run.json").read_text())["resumed_plates"] == ["P1"]
    with pytest.raises(ConfigError, match="different crop_size"):
        _run(plate, ckpt, out, "--locations", str(plate / "locations"), "--resume", "--crop-size", "32")
    with pytest.raises(ConfigError, match="different crop_mode"):  # tiles over cell parts
        pipeline.run_inference(InferenceConfig(ckpt=str(ckpt), valset=str(plate / "dataset.csv"), outdir=str(out),
                                               size=TILE, num_workers=0, resume=True))


@pytest.mark.parametrize("flags, needle", [
    ({"locations": "."}, "--locations only apply to --crop-mode cells"),
    ({"save_cells": True}, "--save-cells only apply to --crop-mode cells"),
    ({"crop_mode": "cells", "stride": 16}, "--stride and --center-tiles only apply to --crop-mode tiles"),
    ({"crop_mode": "cells", "crop_size": 0}, "--crop-size must be a positive"),
    ({"crop_mode": "cells", "max_cells": 0}, "--max-cells must be >= 1"),
    ({"crop_mode": "cells", "edge_cells": "wrap"}, "--edge-cells must be one of drop, pad"),
    ({"crop_mode": "cells", "locations": "/no/such/folder"}, "--locations /no/such/folder: no such folder"),
])
def test_cell_flags_are_checked(ckpt: Path, flags: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        InferenceConfig(ckpt=str(ckpt), outdir="x", **flags)


def test_tiles_mode_fingerprint_and_parts_unchanged(plate: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiles"
    pipeline.run_inference(InferenceConfig(ckpt=str(ckpt), valset=str(plate / "dataset.csv"), outdir=str(out),
                                           size=TILE, num_workers=0, norm_method="no_post_proc", save_sites=True))
    run = json.loads((out / "run.json").read_text())
    assert "crop_mode" not in run["settings"] and "cells" not in run and "n_sites_without_valid_tiles" in run
    part = next((out / "parts").glob("*.npz"))
    with np.load(part) as z:
        assert sorted(z.files) == sorted(["site_rows", "site_emb", "site_valid", "well_rows", "well_emb",
                                          "well_valid"])
    assert "n_valid_tiles" in pd.read_csv(out / "site_features.csv").columns
    assert not (out / "cell_features.parquet").exists()


# ------------------------------------------------------------------------------------------------------- training


def _recipe(count: int = 6, size: int = 32, scale: tuple[float, float] | None = None) -> AugmentRecipe:
    return AugmentRecipe([ViewSpec(count, size, scale)], [GpuAugment()], "test")


def test_sample_cell_boxes_centred_within_jitter() -> None:
    centres = np.array([[30.0, 30.0], [60.0, 64.0]])
    rng = np.random.default_rng(0)
    boxes = sample_cell_boxes(centres, SIDE, SIDE, ViewSpec(200, 24), rng)
    mid = boxes[:, :2] + boxes[:, 2:] // 2
    nearest = np.abs(mid[:, None] - centres[None]).max(axis=2).min(axis=1)
    assert (nearest <= CELL_JITTER).all() and (boxes[:, 2:] == 24).all()
    resized = sample_cell_boxes(centres, SIDE, SIDE, ViewSpec(200, 24, (0.5, 1.0)), rng)
    assert (resized[:, :2] >= 0).all() and (resized[:, :2] + resized[:, 2:] <= SIDE).all()  # clipped inside


@pytest.mark.parametrize("with_files", [True, False])
def test_training_cell_mode_crops_are_centred_on_nuclei(plate: Path, with_files: bool) -> None:
    table = load_site_table(plate / "dataset.csv").iloc[[1, 2]].reset_index(drop=True)  # nuclei >= 16 px from edges
    locations = str(plate / "locations") if with_files else None
    ds = TrainCropDataset(table, _recipe(), seed=3, crop_mode="cells", locations=locations)
    for index, key in enumerate(zip(*(table[k] for k in ("plate", "well", "field")))):
        planted = np.floor(np.array(PLANTED[key]) + 0.5)
        for epoch in range(3):
            item = ds[(epoch, index)]
            assert item["cell_crops"] == 6
            crops = item["views"][0].numpy()
            corners = np.array([divmod(int(c[MITO, 0, 0]), SIDE) for c in crops])
            offset = np.abs(corners[:, None] + 16 - planted[None]).max(axis=2)  # (crop, nucleus), Chebyshev px
            clipped = ((corners == 0) | (corners == SIDE - 32)).any(axis=1)  # shifted inside: centre may move
            assert (offset.min(axis=1)[~clipped] <= CELL_JITTER).all() and (~clipped).sum() >= 3
            inside = ((planted[None] >= corners[:, None]) & (planted[None] < corners[:, None] + 32)).all(axis=2)
            assert inside.any(axis=1).all()  # every crop holds a nucleus, clipped or not
            np.testing.assert_array_equal(crops, ds[(epoch, index)]["views"][0].numpy())  # deterministic


def test_training_cell_mode_falls_back_on_sites_without_nuclei(plate: Path) -> None:
    table = load_site_table(plate / "dataset.csv").iloc[[3]].reset_index(drop=True)  # no nuclei planted
    tiles = TrainCropDataset(table, _recipe(), seed=5)
    cells = TrainCropDataset(table, _recipe(), seed=5, crop_mode="cells", locations=str(plate / "locations"))
    np.testing.assert_array_equal(tiles[(1, 0)]["views"][0].numpy(), cells[(1, 0)]["views"][0].numpy())


def test_training_flags(plate: Path, tmp_path: Path) -> None:
    cfg = training_config("dino", path_df=str(plate / "dataset.csv"), output_dir=str(tmp_path), crop_mode="cells",
                          locations=str(plate / "locations"))
    assert cfg.crop_mode == "cells" and cfg.locations == str(plate / "locations")
    assert training_config("dino", output_dir=str(tmp_path)).crop_mode == "tiles"
    parsed = parse_config("simclr", ["--ckpt_path", str(tmp_path), "--crop-mode", "cells"])  # both spellings
    assert parsed.crop_mode == "cells" and parsed.locations is None and parsed.flags["crop_mode"] == "cells"
    with pytest.raises(ConfigError, match="--locations only applies to --crop_mode cells"):
        training_config("dino", output_dir=str(tmp_path), locations=str(plate))
