"""Synthetic plates: deterministic, complete, loadable in both layouts, and carrying the signal they claim."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from data import synthetic
from data.cellmask import otsu_threshold
from data.io import read_merged_tiff, read_site
from data.schema import DEFAULT_CHANNELS, load_site_table
from data.synthetic import (
    PARAMS,
    PLATE_WELLS,
    SiteParams,
    build_design,
    generate_plates,
    render_site,
    site_params,
)
from utils.errors import ConfigError

TINY = {"plates": 2, "batches": 2, "wells": 12, "sites": 2, "size": 64, "seed": 3}
DNA = DEFAULT_CHANNELS.index("DNA")
NUCLEUS_THRESHOLD = 6000
VISIBLE = ("cell_count", "mito_intensity", "agp_intensity", "rna_intensity", "er_intensity", "dna_intensity")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("merged")
    generate_plates(out, layout="merged", workers=1, progress=False, **TINY)
    return out


def test_same_seed_gives_identical_files_whatever_the_worker_count(merged: Path, tmp_path: Path) -> None:
    generate_plates(tmp_path / "par", layout="merged", workers=2, progress=False, **TINY)
    first, second = _files(merged), _files(tmp_path / "par")
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = {**TINY, "seed": TINY["seed"] + 1}
    generate_plates(tmp_path / "other", layout="merged", workers=1, progress=False, **other)
    changed = _files(tmp_path / "other")
    assert changed["dataset.csv"] != first["dataset.csv"]
    images = {v for k, v in first.items() if k.endswith(".tiff")}
    assert not images & {v for k, v in changed.items() if k.endswith(".tiff")}, "another seed, other pixels"


def test_csv_columns_counts_and_design(merged: Path) -> None:
    table = pd.read_csv(merged / "dataset.csv")
    expected = ["FileName_Merged", "batch", "plate", "well", "field", "perturbation_id", "target", "control_type",
                "Otsu_th"]
    assert list(table.columns[: len(expected)]) == expected
    labels = [c for c in table.columns if c.startswith("label_")]
    assert labels and len(table.columns) == len(expected) + len(labels)
    assert len(table) == TINY["plates"] * TINY["wells"] * TINY["sites"]
    assert table.groupby("plate")["well"].nunique().eq(TINY["wells"]).all()
    assert set(table["well"]) <= set(PLATE_WELLS)
    assert sorted(table["field"].unique()) == [1, 2]
    assert not table.duplicated(["plate", "well", "field"]).any()
    assert table.groupby("plate")["batch"].nunique().eq(1).all() and table["batch"].nunique() == TINY["batches"]
    wells = table.drop_duplicates(["plate", "well"])
    assert set(wells["control_type"]) == {"negcon", "poscon", "trt"}
    assert wells[wells["control_type"] == "negcon"].groupby("plate").size().min() >= 2
    neg = wells[wells["control_type"] == "negcon"]
    assert set(neg["perturbation_id"]) == {"DMSO"} and set(neg["target"]) == {"DMSO"}
    trt = wells[wells["control_type"] == "trt"]
    assert trt.groupby("perturbation_id")["plate"].nunique().min() == 2, "replicates sit on different plates"
    assert (table["Otsu_th"] > 0).all()
    values = table[labels].to_numpy()
    assert set(np.unique(values[~np.isnan(values)])) <= {0.0, 1.0}
    assert np.isnan(table.loc[table["perturbation_id"] == "DMSO", labels].to_numpy()).all()
    assert not np.isnan(table.loc[table["control_type"] == "trt", labels].to_numpy()).all()


def test_ground_truth_matches_the_table(merged: Path) -> None:
    truth = json.loads((merged / "ground_truth.json").read_text())
    table = pd.read_csv(merged / "dataset.csv")
    assert truth["channels"] == list(DEFAULT_CHANNELS)
    assert [p["name"] for p in truth["params"]] == list(PARAMS)
    for row in table.drop_duplicates("perturbation_id").itertuples():
        if row.perturbation_id == "DMSO":
            continue
        info = truth["compounds"][row.perturbation_id]
        assert info["target"] == row.target and info["control_type"] == row.control_type
        assert np.allclose(info["phenotype"], info["potency"] * np.asarray(info["direction"]))
        for assay, value in info["labels"].items():
            column = table.loc[table["perturbation_id"] == row.perturbation_id, f"label_{assay}"]
            assert column.isna().all() if value is None else column.eq(value).all()
    assert set(truth["batches"]) == set(table["batch"]) and set(truth["plates"]) == set(table["plate"])
    for plate, info in truth["plates"].items():
        assert len(info["gain"]) == len(DEFAULT_CHANNELS) and info["batch"] in truth["batches"]
        rows = table[table["plate"] == plate].drop_duplicates("well")
        assert dict(zip(rows["well"], rows["perturbation_id"])) == info["layout"]


def test_batch_strength_scales_the_batch_spread_and_one_is_the_default() -> None:
    default = build_design(plates=8, batches=4, wells=32, seed=0)
    same = build_design(plates=8, batches=4, wells=32, seed=0, batch_strength=1.0)
    strong = build_design(plates=8, batches=4, wells=32, seed=0, batch_strength=3.0)
    assert same.batches == default.batches
    for b in default.batches:
        for key in ("gain", "phenotype_offset"):
            base = np.log(default.batches[b][key]) if key == "gain" else np.asarray(default.batches[b][key])
            big = np.log(strong.batches[b][key]) if key == "gain" else np.asarray(strong.batches[b][key])
            np.testing.assert_allclose(big, 3.0 * base, rtol=1e-9, atol=1e-12)  # the same draws, three times wider
    layout = ["plate", "well", "perturbation_id"]
    assert strong.wells[layout].equals(default.wells[layout])
    with pytest.raises(ConfigError, match="--batch-strength"):
        build_design(plates=2, batches=2, wells=32, seed=0, batch_strength=-1.0)


def test_larger_design_groups_compounds_by_target_with_inactives() -> None:
    design = build_design(plates=4, batches=2, wells=96, seed=0)
    trt = {c: i for c, i in design.compounds.items() if i["control_type"] == "trt"}
    per_target = pd.Series([i["target"] for i in trt.values()]).value_counts()
    assert len(per_target) >= 5 and per_target.min() >= 2
    assert any(not i["active"] and i["potency"] == 0 for i in trt.values())
    assert sum(i["active"] for i in trt.values()) > len(trt) / 2
    wells = design.wells[design.wells["control_type"] == "trt"]
    assert wells.groupby("perturbation_id")["plate"].nunique().min() == 4
    for name, target in design.targets.items():
        assert np.isclose(np.linalg.norm(target["direction"]), 1.0), name


def test_bioactivity_labels_follow_the_target_with_noise_and_gaps() -> None:
    design = build_design(plates=4, batches=2, wells=192, seed=1)
    hit, other, missing = [], [], []
    for info in design.compounds.values():
        for assay, value in info["labels"].items():
            missing.append(value is None)
            if value is not None:
                (hit if info["target"] in design.assays[assay] else other).append(value)
    assert 0.2 < np.mean(missing) < 0.4
    assert np.mean(hit) > 0.7 and np.mean(other) < 0.1
    assert 0 < np.mean(hit) < 1 and 0 < np.mean(other), "labels carry noise in both directions"


def test_both_layouts_load_through_the_schema_with_identical_pixels(merged: Path, tmp_path: Path) -> None:
    generate_plates(tmp_path, layout="per-channel", workers=1, progress=False, **TINY)
    per_channel = load_site_table(tmp_path / "dataset.csv")
    assert set(per_channel["layout"]) == {"per-channel"}
    assert all(f"FileName_Orig{ch}" in pd.read_csv(tmp_path / "dataset.csv").columns for ch in DEFAULT_CHANNELS)
    table = load_site_table(merged / "dataset.csv")
    assert set(table["layout"]) == {"merged"}
    for i in (0, len(table) - 1):
        pixels, otsu = read_site(table.iloc[i])
        assert pixels.dtype == np.uint16 and pixels.shape == (5, TINY["size"], TINY["size"])
        assert otsu == pytest.approx(table["Otsu_th"].iloc[i], abs=1e-2)
        assert otsu == pytest.approx(otsu_threshold(pixels[DNA]), abs=1e-2)
        same, _ = read_site(per_channel.iloc[i])
        np.testing.assert_array_equal(pixels, same)


def test_site_params_re_render_what_was_written(merged: Path) -> None:
    design = build_design(TINY["plates"], TINY["batches"], TINY["wells"], TINY["seed"])
    row = pd.read_csv(merged / "dataset.csv").iloc[5]
    params, seed = site_params(design, row["plate"], row["well"], int(row["field"]))
    pixels, otsu = read_merged_tiff(merged / row["FileName_Merged"])
    np.testing.assert_array_equal(render_site(params, TINY["size"], np.random.default_rng(seed)), pixels)
    assert otsu == pytest.approx(row["Otsu_th"], abs=1e-2)


def test_a_failed_run_leaves_no_dataset_csv_even_over_an_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> np.ndarray:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "render_site", broken)
    (tmp_path / "dataset.csv").write_text("FileName_Merged\nold.tiff\n")  # a previous run being regenerated
    with pytest.raises(RuntimeError):
        generate_plates(tmp_path, layout="merged", workers=1, progress=False, **TINY)
    assert not (tmp_path / "dataset.csv").exists() and not (tmp_path / "ground_truth.json").exists()


def _nuclei(dna: np.ndarray) -> int:
    """Count nuclei with a fixed threshold between background and stain (Otsu is meaningless on empty fields)."""
    labels, _ = ndimage.label(dna > NUCLEUS_THRESHOLD)
    return int((np.bincount(labels.ravel())[1:] >= 30).sum())


def _render(params: SiteParams, size: int, seeds: range) -> list[np.ndarray]:
    return [render_site(params, size, np.random.default_rng(s)) for s in seeds]


def test_render_site_stains_respond_to_their_parameters() -> None:
    base = SiteParams()
    sites = _render(base, 96, range(2))
    assert all(s.dtype == np.uint16 and s.shape == (5, 96, 96) for s in sites)
    dna = sites[0][DNA].astype(float)
    assert np.percentile(dna, 99) > 4 * np.percentile(dna, 10), "nuclei stand out from the background"

    def shifted(name: str, value: float) -> SiteParams:
        z = np.zeros(len(PARAMS))
        z[PARAMS.index(name)] = value
        return SiteParams(phenotype=tuple(z))

    dense = sum(_nuclei(s[DNA]) for s in _render(shifted("cell_count", 3.0), 160, range(4)))
    sparse = sum(_nuclei(s[DNA]) for s in _render(shifted("cell_count", -3.0), 160, range(4)))
    assert dense > 2 * sparse
    mito = DEFAULT_CHANNELS.index("Mito")
    for bright, plain in zip(_render(shifted("mito_intensity", 3.0), 128, range(2)), _render(base, 128, range(2))):
        np.testing.assert_array_equal(np.delete(bright, mito, axis=0), np.delete(plain, mito, axis=0))
        cells = plain[mito] > np.percentile(plain[mito], 90)
        assert bright[mito][cells].mean() > 1.3 * plain[mito][cells].mean()


def _well_features(design: synthetic.Design, wells: pd.DataFrame, size: int) -> dict[str, np.ndarray]:
    """Per well, the mean over 2 sites of log channel means, log channel 5th percentiles and the nucleus count."""
    out: dict[str, list[np.ndarray]] = {"mean": [], "p5": [], "nuclei": []}
    for row in wells.itertuples():
        sites = []
        for site in (1, 2):
            params, seed = site_params(design, row.plate, row.well, site)
            sites.append(render_site(params, size, np.random.default_rng(seed)).astype(float))
        out["mean"].append(np.mean([np.log(px.mean((1, 2))) for px in sites], 0))
        out["p5"].append(np.mean([np.log(np.percentile(px, 5, axis=(1, 2))) for px in sites], 0))
        out["nuclei"].append([np.mean([_nuclei(px[DNA]) for px in sites])])
    return {k: np.asarray(v) for k, v in out.items()}


def test_handcrafted_features_separate_a_strong_target_from_dmso() -> None:
    design = build_design(plates=4, batches=2, wells=32, seed=0)
    visible = [PARAMS.index(p) for p in VISIBLE]
    active = {c: i for c, i in design.compounds.items() if i["control_type"] == "trt" and i["active"]}
    score = {t: sum(i["potency"] * np.linalg.norm(np.asarray(i["direction"])[visible])
                    for i in active.values() if i["target"] == t) for t in design.targets}
    strong = max(score, key=score.get)
    members = [c for c, i in active.items() if i["target"] == strong]
    wells = design.wells[design.wells["perturbation_id"].isin(members) | (design.wells["control_type"] == "negcon")]
    per_well = _well_features(design, wells, 160)
    features = np.hstack([per_well["mean"], per_well["nuclei"]])
    for plate in wells["plate"].unique():  # per-plate DMSO centring, as any profiling pipeline does
        on_plate = (wells["plate"] == plate).to_numpy()
        features[on_plate] -= np.median(features[on_plate & (wells["control_type"] == "negcon").to_numpy()], 0)
    y = wells["perturbation_id"].isin(members).to_numpy()
    assert y.sum() >= 8 and (~y).sum() >= 8
    model = make_pipeline(StandardScaler(), LogisticRegression())
    accuracy = cross_val_score(model, features, y, cv=StratifiedKFold(4, shuffle=True, random_state=0)).mean()
    chance = max(y.mean(), 1 - y.mean())
    assert accuracy >= chance + 0.2, (accuracy, chance)


def test_dmso_wells_differ_between_batches() -> None:
    design = build_design(plates=4, batches=2, wells=32, seed=0)
    wells = design.wells[design.wells["control_type"] == "negcon"]
    first = (wells["batch"] == "batch01").to_numpy()
    per_well = _well_features(design, wells, 256)
    for stat in ("p5", "mean"):
        features = per_well[stat]
        within = np.sqrt((features[first].var(0, ddof=1) + features[~first].var(0, ddof=1)) / 2)
        between = np.abs(features[first].mean(0) - features[~first].mean(0))
        p_values = stats.ttest_ind(features[first], features[~first]).pvalue
        assert (between / within).max() > 2.0 and p_values.min() < 1e-3, (stat, between / within, p_values)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"plates": 0}, "--plates"),
        ({"plates": 2, "batches": 3}, "--batches"),
        ({"wells": 3}, "--wells"),
        ({"wells": 385}, "--wells"),
        ({"sites": 0}, "--sites"),
        ({"size": 16}, "--size"),
        ({"layout": "npz"}, "--layout"),
        ({"workers": 0}, "--workers"),
    ],
)
def test_bad_arguments_raise_one_line_config_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {**TINY, "layout": "merged", "workers": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        generate_plates(tmp_path, progress=False, **args)
    assert not (tmp_path / "dataset.csv").exists()


def test_cli_writes_a_plate_set_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--plates", "1", "--batches", "1", "--wells", "4", "--sites", "1", "--size", "48",
            "--workers", "1", "--layout", "per-channel"]
    assert synthetic.main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "4 sites" in line and "sites/s" in line and str(tmp_path) in line
    assert len(load_site_table(tmp_path / "dataset.csv")) == 4
