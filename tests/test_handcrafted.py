"""Handcrafted baseline: segmentation, measurements against numpy, aggregation, normalisation and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.schema import DEFAULT_CHANNELS
from data.segmentation import Segmentation, SegmentationParams, segment
from utils.cli import run_cli
from utils.errors import ConfigError, DataError
from utils.handcrafted.cli import build_parser, main
from utils.handcrafted.config import HandcraftedConfig
from utils.handcrafted.measure import COUNT_COLUMN, FEATURE_GROUPS, MeasureOptions, measure, measure_site, site_profile
from utils.handcrafted.profiles import aggregate, drop_incomplete, limit_sites, normalize
from utils.profiles.features import feature_columns
from utils.profiles.normalize import NO_NORMALISATION

DNA = DEFAULT_CHANNELS.index("DNA")
SMALL = SegmentationParams(nucleus_diameter=16.0, min_nucleus_area=30, max_cell_distance=20.0)


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _site(centres: list[tuple[float, float]], size: int = 128, rn: float = 8.0, rc: float = 18.0,
          speck: bool = True, seed: int = 0) -> np.ndarray:
    """Five-channel uint16 site: bright DNA disks (nuclei) inside dimmer AGP/RNA disks (cells), plus noise."""
    rng = np.random.default_rng(seed)
    px = rng.normal(1000, 30, size=(len(DEFAULT_CHANNELS), size, size))
    for cy, cx in centres:
        px[DNA][_disk((size, size), cy, cx, rn)] = 20000
        for ch in ("AGP", "RNA", "Mito", "ER"):
            px[DEFAULT_CHANNELS.index(ch)][_disk((size, size), cy, cx, rc)] += 8000
    if speck:
        px[DNA, 2:4, 120:122] = 20000  # 4 px: below min_nucleus_area
    return np.clip(px, 0, 65535).astype(np.uint16)


def test_segment_counts_disk_nuclei_and_splits_touching_ones() -> None:
    centres = [(20, 20), (20, 90), (64, 40), (64, 55), (105, 25), (100, 100)]  # (64,40)-(64,55) touch (15 < 16)
    seg = segment(_site(centres), DEFAULT_CHANNELS, SMALL)
    assert seg.count == len(centres)
    at_centres = [int(seg.nuclei[int(cy), int(cx)]) for cy, cx in centres]
    assert sorted(at_centres) == list(range(1, len(centres) + 1))
    # each cell contains its own nucleus, and cytoplasm excludes nuclei
    for k in range(1, seg.count + 1):
        assert np.all(seg.cells[seg.nuclei == k] == k)
    assert not np.any((seg.cytoplasm > 0) & (seg.nuclei > 0))
    assert (seg.cells > 0).sum() > 3 * (seg.nuclei > 0).sum()
    nucleus_area = np.bincount(seg.nuclei.ravel())[1:]
    isolated = [seg.nuclei[20, 20], seg.nuclei[100, 100]]
    assert np.allclose(nucleus_area[np.array(isolated) - 1], np.pi * 8**2, rtol=0.15)


def test_segment_discards_border_nuclei_unless_asked() -> None:
    centres = [(50, 50), (64, 4)]  # the second nucleus is cut by the left edge
    pixels = _site(centres, speck=False)
    seg = segment(pixels, DEFAULT_CHANNELS, SMALL)
    assert seg.count == 1 and seg.nuclei[50, 50] == 1
    assert seg.cells[64, 4] == 0  # the dropped nucleus is claimed by no cell
    kept = segment(pixels, DEFAULT_CHANNELS, dataclasses.replace(SMALL, discard_border=False))
    assert kept.count == 2


def test_segment_empty_site_has_no_objects() -> None:
    seg = segment(_site([], speck=False), DEFAULT_CHANNELS, SMALL)
    assert seg.count == 0
    assert measure_site(seg, _site([], speck=False)).empty


def _known_objects() -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((40, 50), dtype=np.int32)
    labels[3:13, 4:20] = 1  # a 10x16 rectangle
    labels[_disk((40, 50), 27, 32, 7)] = 3  # label 2 absent: a gap
    pixels = np.random.default_rng(1).integers(0, 65535, size=(len(DEFAULT_CHANNELS), 40, 50)).astype(np.uint16)
    return labels, pixels


def test_measure_matches_numpy_reference() -> None:
    labels, pixels = _known_objects()
    out = measure(labels, pixels, DEFAULT_CHANNELS, MeasureOptions(features=("intensity", "sizeshape")))
    assert np.isnan(out["AreaShape_Area"][1])  # absent label 2
    for k in (1, 3):
        mask = labels == k
        assert out["AreaShape_Area"][k - 1] == mask.sum()
        for c, ch in enumerate(DEFAULT_CHANNELS):
            values = pixels[c][mask].astype(np.float64) / 65535.0
            assert out[f"Intensity_MeanIntensity_{ch}"][k - 1] == pytest.approx(values.mean(), rel=1e-9)
            assert out[f"Intensity_IntegratedIntensity_{ch}"][k - 1] == pytest.approx(values.sum(), rel=1e-9)
            assert out[f"Intensity_StdIntensity_{ch}"][k - 1] == pytest.approx(values.std(), rel=1e-9)
            assert out[f"Intensity_MaxIntensity_{ch}"][k - 1] == pytest.approx(values.max(), rel=1e-12)
            assert out[f"Intensity_MedianIntensity_{ch}"][k - 1] == pytest.approx(np.median(values), rel=1e-9)
    assert out["AreaShape_BoundingBoxArea"][0] == 160
    assert not any(k.startswith(("Location_", "AreaShape_Center")) for k in out)


def test_measure_site_compartments_and_texture_names() -> None:
    labels, pixels = _known_objects()
    nuclei = np.zeros_like(labels)
    nuclei[25:29, 30:34] = 1  # a 4x4 nucleus inside the disk
    cells = (labels == 3).astype(np.int32)
    seg = Segmentation(nuclei=nuclei, cells=cells)
    opts = MeasureOptions(features=("intensity", "sizeshape", "texture"), texture_channels=("DNA",))
    objects = measure_site(seg, pixels, DEFAULT_CHANNELS, opts)
    assert len(objects) == 1
    row = objects.iloc[0]
    assert row["Nuclei_AreaShape_Area"] == 16
    assert row["Cells_AreaShape_Area"] == (labels == 3).sum()
    assert row["Cytoplasm_AreaShape_Area"] == (labels == 3).sum() - 16
    cyto = (cells == 1) & (nuclei == 0)
    ref = pixels[DNA][cyto].astype(np.float64).mean() / 65535.0
    assert row["Cytoplasm_Intensity_MeanIntensity_DNA"] == pytest.approx(ref, rel=1e-9)
    texture = [c for c in objects.columns if "_Texture_" in c]
    assert "Cells_Texture_Contrast_DNA_3_00_64" in texture
    assert not any("_Mito_" in c for c in texture)
    profile = site_profile(objects)
    assert profile[COUNT_COLUMN] == 1.0


def test_site_profile_median_and_aggregate_mean() -> None:
    objects = pd.DataFrame({"Cells_AreaShape_Area": [1.0, 5.0, np.nan, 3.0]})
    assert site_profile(objects)["Cells_AreaShape_Area"] == 3.0
    assert site_profile(objects, "mean")["Cells_AreaShape_Area"] == 3.0
    sites = pd.DataFrame({
        "batch": ["b"] * 5, "plate": ["p1", "p1", "p1", "p2", "p2"], "well": ["A01", "A01", "B02", "A01", "A01"],
        "perturbation_id": ["x", "x", "y", "x", "x"], "target": ["t"] * 5,
        "Cells_Count": [2.0, 4.0, 1.0, 3.0, 5.0], "Nuclei_AreaShape_Area": [10.0, 20.0, 30.0, np.nan, 50.0],
    })
    wells = aggregate(sites)
    assert list(wells[["plate", "well"]].itertuples(index=False, name=None)) == [("p1", "A01"), ("p1", "B02"),
                                                                                  ("p2", "A01")]
    for (plate, well), group in sites.groupby(["plate", "well"]):
        got = wells[(wells.plate == plate) & (wells.well == well)].iloc[0]
        assert got["Cells_Count"] == group["Cells_Count"].mean()
        assert got["Nuclei_AreaShape_Area"] == np.nanmean(group["Nuclei_AreaShape_Area"])
        assert got["n_sites"] == len(group)
    assert feature_columns(wells) == ["Cells_Count", "Nuclei_AreaShape_Area"]


def test_limit_sites_keeps_first_sites_per_well_in_order() -> None:
    table = pd.DataFrame({"batch": "b", "plate": "p", "well": ["A1", "A1", "B1", "A1", "B1"], "field": [1, 2, 1, 3, 2]})
    out = limit_sites(table, 2)
    assert list(zip(out.well, out.field)) == [("A1", 1), ("A1", 2), ("B1", 1), ("B1", 2)]
    assert limit_sites(table, None) is table
    with pytest.raises(ConfigError, match="max_sites_per_well"):
        limit_sites(table, 0)


@pytest.mark.parametrize("method", ["mad_robustize", "standardize"])
def test_drop_incomplete_and_normalize_match_pycytominer(method: str) -> None:
    from pycytominer import normalize as pyc_normalize

    rng = np.random.default_rng(3)
    n = 12
    wells = pd.DataFrame({
        "batch": "b", "plate": np.repeat(["p1", "p2"], n // 2), "well": [f"A{i:02d}" for i in range(n)],
        "perturbation_id": np.tile(["DMSO", "DMSO", "DMSO", "c1", "c2", "c3"], 2), "target": "t",
        "control_type": np.tile(["negcon"] * 3 + ["trt"] * 3, 2),
        "Cells_Count": rng.integers(5, 50, n).astype(float), "Nuclei_AreaShape_Area": rng.normal(100, 10, n),
        "Cells_Intensity_MeanIntensity_DNA": rng.normal(0.2, 0.01, n), "Cytoplasm_Broken": np.nan,
    })
    wells.loc[4, "Cells_Count"] = 0.0
    clean, report = drop_incomplete(wells)
    assert report["dropped_empty_wells"] == ["p1/A04"] and report["dropped_nonfinite_features"] == 1
    out, norm_report = normalize(clean, method)
    assert norm_report["control_query"] == "control_type == 'negcon'"
    features = feature_columns(out)
    assert features == ["Cells_Count", "Nuclei_AreaShape_Area", "Cells_Intensity_MeanIntensity_DNA"]
    for plate, part in clean.groupby("plate"):
        ref = pyc_normalize(profiles=part, features=features, samples="control_type == 'negcon'",
                            method=method, meta_features=[c for c in part.columns if c not in features])
        got = out[out.plate == plate]
        np.testing.assert_allclose(got[features].to_numpy(), ref[features].to_numpy(), rtol=1e-9)


def test_mad_robustize_drops_features_constant_in_controls() -> None:
    wells = pd.DataFrame({
        "batch": "b", "plate": "p", "well": ["A1", "A2", "A3", "A4"], "perturbation_id": ["DMSO", "DMSO", "x", "y"],
        "target": "t", "Cells_Count": [3.0, 3.0, 5.0, 7.0], "Cells_AreaShape_Area": [1.0, 2.0, 3.0, 5.0],
    })
    out, report = normalize(wells, "mad_robustize")
    assert report["control_query"] == "perturbation_id == 'DMSO'" and report["dropped_zero_mad_features"] == 1
    assert feature_columns(out) == ["Cells_AreaShape_Area"]
    np.testing.assert_allclose(out["Cells_AreaShape_Area"], (wells["Cells_AreaShape_Area"] - 1.5) / (0.5 * 1.4826))


def test_mad_robustize_drops_features_constant_in_controls_up_to_rounding() -> None:
    """An 8-bit MAD-type feature equal in every control but for rounding (1e-17 on 1e-2) would be scaled by 1e15."""
    mad = 0.0117647058823529
    wells = pd.DataFrame({
        "batch": "b", "plate": "p", "well": ["A1", "A2", "A3", "A4", "A5"],
        "perturbation_id": ["DMSO", "DMSO", "DMSO", "x", "y"], "target": "t",
        "Cells_Intensity_MADIntensity_AGP": [mad, mad + 1.7e-18, mad + 3.5e-18, 0.02, 0.03],
        "Cells_AreaShape_Area": [1.0, 2.0, 4.0, 3.0, 5.0],
    })
    out, report = normalize(wells, "mad_robustize")
    assert report["dropped_zero_mad_features"] == 1 and feature_columns(out) == ["Cells_AreaShape_Area"]
    # a small but real spread is kept: tolerance is relative to the feature's magnitude, not absolute
    wells["Cells_Intensity_MADIntensity_AGP"] = [mad, mad * 1.001, mad * 1.002, 0.02, 0.03]
    out, report = normalize(wells, "mad_robustize")
    assert report["dropped_zero_mad_features"] == 0 and len(feature_columns(out)) == 2
    assert np.abs(out[feature_columns(out)].to_numpy()).max() < 1e4


def test_normalize_needs_two_control_wells_per_plate() -> None:
    wells = pd.DataFrame({
        "batch": "b", "plate": ["p1"] * 3 + ["p2"] * 3, "well": ["A1", "A2", "A3"] * 2,
        "perturbation_id": ["DMSO", "DMSO", "x", "DMSO", "x", "y"], "target": "t",
        "Cells_AreaShape_Area": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    })
    with pytest.raises(DataError, match="plate 'p2' has 1 control well"):
        normalize(wells, "mad_robustize")
    assert normalize(wells, "none")[0] is wells
    assert normalize(wells, NO_NORMALISATION)[0] is wells


@pytest.fixture(scope="module")
def plate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.synthetic import generate_plates

    out = tmp_path_factory.mktemp("plate")
    generate_plates(out, plates=1, batches=1, wells=8, sites=1, size=160, seed=0, progress=False)
    return out / "dataset.csv"


def test_cli_end_to_end_on_synthetic_plate(plate: Path, tmp_path: Path) -> None:
    out = tmp_path / "hc"
    args = ["--valset", str(plate), "-o", str(out), "--workers", "2", "--feature_select", "drop_na_columns,blocklist"]
    assert main(args) == 0
    wells = pd.read_csv(out / "well_features.csv")
    sites = pd.read_csv(plate)
    assert len(wells) == sites["well"].nunique() == 8
    assert wells["well"].is_unique
    for col in ("batch", "plate", "well", "perturbation_id", "target", "control_type"):
        assert col in wells.columns
    assert not wells.columns[0].startswith("Unnamed")
    features = feature_columns(wells)
    for prefix in ("Cells_", "Nuclei_", "Cytoplasm_"):
        assert any(c.startswith(prefix) for c in features)
    assert "Nuclei_AreaShape_Area" in features and "Cells_Intensity_MeanIntensity_DNA" in features
    assert np.isfinite(wells[features].to_numpy()).all()
    ctrl = wells[wells.control_type == "negcon"]
    assert np.allclose(ctrl["Nuclei_AreaShape_Area"].median(), 0.0, atol=1e-9)  # mad_robustize on 2 controls
    run = json.loads((out / "run.json").read_text())
    assert run["n_sites"] == 8 and run["n_wells"] == 8 and run["n_objects"] > 0
    expected = dataclasses.asdict(HandcraftedConfig(**vars(build_parser().parse_args(args))))
    assert run["args"] == json.loads(json.dumps(expected))  # run.json holds JSON types (lists, not tuples)
    site_rows = pd.read_csv(out / "site_features.csv")
    assert (site_rows[COUNT_COLUMN] >= 1).all()


def test_cli_corrupt_tiff_is_one_line_error(plate: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = pd.read_csv(plate)
    bad = tmp_path / "broken.tiff"
    bad.write_bytes(b"II*\x00 not really a tiff")
    table.loc[0, "FileName_Merged"] = str(bad)
    csv = tmp_path / "dataset.csv"
    table.to_csv(csv, index=False)
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: main(["--valset", str(csv), "--image_root", str(plate.parent), "-o", str(tmp_path / "o"),
                              "--workers", "1"]))
    assert exc.value.code == 2
    line = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # after the tqdm bar
    assert line.startswith("error: ") and str(bad) in line
    assert not (tmp_path / "o" / "well_features.csv").exists()


def test_bad_feature_group_is_config_error(plate: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bogus"):
        main(["--valset", str(plate), "-o", str(tmp_path), "--features", "intensity,bogus"])


def test_measure_rejects_wrong_channel_count() -> None:
    with pytest.raises(DataError, match="shape"):
        segment(np.zeros((3, 32, 32), dtype=np.uint16), DEFAULT_CHANNELS, SMALL)


def test_every_feature_group_names_channels_in_cellprofiler_style() -> None:
    labels, pixels = _known_objects()
    for group in FEATURE_GROUPS:
        out = measure(labels, pixels, DEFAULT_CHANNELS, MeasureOptions(features=(group,), texture_channels=("ER",)))
        assert out, group
        assert all(len(v) == 3 and np.isnan(v[1]) for v in out.values()), group
        if group not in ("sizeshape",):
            assert all(any(f"_{ch}" in k for ch in DEFAULT_CHANNELS) for k in out), group
    radial = measure(labels, pixels, DEFAULT_CHANNELS, MeasureOptions(features=("radial",)))
    assert "RadialDistribution_FracAtD_DNA_1of4" in radial
    assert "Granularity_1_Mito" in measure(labels, pixels, DEFAULT_CHANNELS, MeasureOptions(features=("granularity",)))
    assert "Correlation_Correlation_Mito_DNA" in measure(labels, pixels, DEFAULT_CHANNELS,
                                                         MeasureOptions(features=("correlation",)))


# ---- configuration: one place that validates, one set of defaults, both flag spellings ---------------------------

BAD_SETTINGS = {
    "workers": ({"workers": 0}, "--workers must be >= 1"),
    "features": ({"features": "intensity,bogus"}, "--features 'bogus'"),
    "no_features": ({"features": ","}, "--features ''"),
    "channels": ({"channels": "DNA,RNA,ER,Mito"}, "channel 'AGP' is needed for segmentation but --channels"),
    "cyto_channels": ({"cyto_channels": "AGP,Foo"}, "channel 'Foo' is needed for segmentation"),
    "feature_select": ({"feature_select": "variance_threshold,bogus"}, "--feature_select 'bogus'"),
    "max_sites_per_well": ({"max_sites_per_well": 0}, "--max_sites_per_well must be >= 1"),
    "norm_method": ({"norm_method": "zscore"}, "--norm_method 'zscore'"),
    "site_operation": ({"site_operation": "max"}, "--site_operation 'max'"),
    "well_operation": ({"well_operation": "max"}, "--well_operation 'max'"),
    "controls": ({"controls": "bogus"}, "--controls 'bogus'"),
    "nucleus_diameter": ({"nucleus_diameter": -3.0}, "nucleus_diameter must be > 0"),
    "min_nucleus_area": ({"min_nucleus_area": -1}, "min_nucleus_area must be >= 0"),
    "max_cell_distance": ({"max_cell_distance": 0.0}, "max_cell_distance must be > 0"),
    "texture_scale": ({"texture_scale": 0}, "texture_scale must be >= 1"),
    "texture_gray_levels": ({"texture_gray_levels": 1}, "texture_gray_levels must be >= 2"),
}


def _argv(settings: dict[str, object], valset: str = "missing.csv", out: str = "out") -> list[str]:
    argv = ["--valset", valset, "-o", out]
    for name, value in settings.items():
        argv += [f"--{name}", str(value)]
    return argv


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_config_rejects_a_bad_setting_from_python_and_from_the_cli(case: str, tmp_path: Path) -> None:
    settings, message = BAD_SETTINGS[case]
    with pytest.raises(ConfigError, match=message) as from_python:
        HandcraftedConfig(valset="missing.csv", output_dir=str(tmp_path / "o"), **settings)
    # the CLI fails with the same message before it reads the (missing) site table or creates the output folder
    with pytest.raises(ConfigError) as from_cli:
        main(_argv(settings, out=str(tmp_path / "o")))
    assert str(from_cli.value) == str(from_python.value)
    assert not (tmp_path / "o").exists()


def test_controls_are_checked_only_where_they_are_read() -> None:
    assert HandcraftedConfig(valset="v", output_dir="o", controls="bogus", norm_method="none").controls == "bogus"
    assert HandcraftedConfig(valset="v", output_dir="o", controls="bogus", control_query="plate == 'p'")


def test_cli_defaults_are_the_config_defaults() -> None:
    parsed = vars(build_parser().parse_args(["--valset", "v", "-o", "o"]))
    assert list(parsed) == [f.name for f in dataclasses.fields(HandcraftedConfig)]  # one flag per field, in order
    assert HandcraftedConfig(**parsed) == HandcraftedConfig(valset="v", output_dir="o")


def test_norm_method_none_is_an_alias_of_no_post_proc() -> None:
    assert NO_NORMALISATION == "no_post_proc"
    none = HandcraftedConfig(**vars(build_parser().parse_args(["--valset", "v", "-o", "o", "--norm_method", "none"])))
    assert none.norm_method == NO_NORMALISATION
    assert none == HandcraftedConfig(valset="v", output_dir="o", norm_method="no_post_proc")
    assert dataclasses.asdict(none)["norm_method"] == NO_NORMALISATION  # what run.json records


def test_hyphen_spellings_parse_to_the_same_config() -> None:
    settings = {"image_root": "/images", "channels": "DNA,AGP,RNA", "workers": 3, "features": "intensity,texture",
                "texture_channels": "DNA", "texture_scale": 2, "texture_gray_levels": 32, "intensity_edges": "true",
                "nucleus_diameter": 18.5, "min_nucleus_area": 25, "max_cell_distance": 40.0,
                "discard_border": "false", "cyto_channels": "AGP,RNA", "site_operation": "mean",
                "well_operation": "median", "max_sites_per_well": 2, "norm_method": "standardize",
                "controls": "DMSO", "control_query": "plate == 'p'", "batch_key": "plate",
                "feature_select": "blocklist",
                "corr_threshold": 0.8, "platemap": "map.csv"}
    fields = {f.name for f in dataclasses.fields(HandcraftedConfig)}
    assert set(settings) == fields - {"valset", "output_dir", "column_map"}  # every optional flag is exercised
    mapped = build_parser().parse_args(["--valset", "v.csv", "-o", "o", "--map", "A=b", "--map", "C=d"])
    assert HandcraftedConfig(**vars(mapped)).column_map == (("A", "b"), ("C", "d"))
    underscore = build_parser().parse_args(_argv(settings))
    hyphen = build_parser().parse_args(
        ["--valset", "missing.csv", "--output-dir", "out",
         *[token.replace("_", "-") if token.startswith("--") else token for token in _argv(settings)[4:]]])
    assert underscore == hyphen
    cfg = HandcraftedConfig(**vars(hyphen))
    assert cfg.channel_names == ("DNA", "AGP", "RNA") and cfg.select_operations == ("blocklist",)
    assert cfg.segmentation.discard_border is False and cfg.measurement.intensity_edges is True
    assert cfg.max_sites_per_well == 2 and cfg.corr_threshold == 0.8
