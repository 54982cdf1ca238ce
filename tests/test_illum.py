"""Illumination correction: the function recovers a planted field, the CSV round-trips, and every reader divides."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy import ndimage

from data.illum import (
    OUTPUT_CSV,
    PlateMean,
    check_plate_name,
    disk_footprint,
    downscale_mean,
    illum_path,
    illumination_function,
    main,
    resize_bilinear,
)
from data.io import (
    IlluminatedPlane,
    StackedChannels,
    apply_illumination,
    load_illum,
    open_plain_merged,
    open_site_array,
    read_site,
    write_merged_tiff,
)
from data.prefetch import read_site_region
from data.schema import DEFAULT_CHANNELS, load_site_table
from data.stats import compute_intensity_norm, dataset_intensity_norm
from data.synthetic import generate_plates
from data.tiling import Region
from utils.cli import run_cli
from utils.errors import ConfigError, DataError

SIZE = 192


def planted_field(size: int) -> np.ndarray:
    """A smooth vignetting field: 1 in the centre, 0.5 in the corners."""
    y = (np.arange(size) + 0.5) / size - 0.5
    return 1.0 - (y[:, None] ** 2 + y[None, :] ** 2)


def corner_centre_ratio(images: np.ndarray) -> np.ndarray:
    """Mean of the four corner blocks over the mean of the centre block, per leading index."""
    h, w = images.shape[-2:]
    k = h // 8
    centre = images[..., h // 2 - k // 2 : h // 2 + k // 2, w // 2 - k // 2 : w // 2 + k // 2].mean(axis=(-1, -2))
    corners = [images[..., ys, xs].mean(axis=(-1, -2)) for ys in (slice(0, k), slice(-k, None))
               for xs in (slice(0, k), slice(-k, None))]
    return np.mean(corners, axis=0) / centre


def by_hand(raw: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """The documented rule written out: float32 division, round half to even, clip to uint16."""
    q = raw.astype(np.float32) / illum.astype(np.float32)
    return np.clip(np.rint(q), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def vignetted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-channel synthetic plate (32 sites) whose every file is multiplied by ``planted_field``."""
    out = tmp_path_factory.mktemp("vignette")
    generate_plates(out, plates=1, batches=1, wells=16, sites=2, size=SIZE, seed=0, layout="per-channel",
                    workers=1, progress=False)
    field = planted_field(SIZE)
    table = load_site_table(out / "dataset.csv")
    for _, row in table.iterrows():
        for ch in DEFAULT_CHANNELS:
            path = row[f"FileName_Orig{ch}"]
            plane = tifffile.imread(path)
            tifffile.imwrite(path, np.rint(plane * field).astype(np.uint16), metadata=None, photometric="minisblack")
    return out / "dataset.csv"


@pytest.fixture(scope="module")
def corrected(vignetted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI run once on the vignetted plate; returns the written load_data_with_illum.csv."""
    out = tmp_path_factory.mktemp("illum_out")
    assert main([str(vignetted), "-o", str(out), "--median_size", "11", "--workers", "1"]) == 0
    return out / OUTPUT_CSV


# ------------------------------------------------------------------------------------------------ pure functions


def test_downscale_and_resize_keep_constants_and_shapes():
    image = np.full((23, 18), 0.25)
    thumb = downscale_mean(image, 4)
    assert thumb.shape == (6, 5) and np.allclose(thumb, 0.25)
    ramp = np.arange(24, dtype=np.float64)[:, None] * np.ones((1, 8))
    assert np.allclose(downscale_mean(ramp, 4)[:, 0], [1.5, 5.5, 9.5, 13.5, 17.5, 21.5])
    big = resize_bilinear(thumb, (23, 18))
    assert big.shape == (23, 18) and np.allclose(big, 0.25)
    up = resize_bilinear(downscale_mean(ramp, 4), (24, 8))
    assert np.allclose(up[2:-2, 0], ramp[2:-2, 0])  # linear data survive the round trip away from the edges
    assert disk_footprint(5).sum() == 21 and disk_footprint(1).shape == (1, 1)
    with pytest.raises(ConfigError, match="--downscale"):
        downscale_mean(image, 0)


def test_function_recovers_a_planted_field_and_flattens_it():
    rng = np.random.default_rng(0)
    size = 256
    cells = ndimage.gaussian_filter((rng.random((size, size)) < 0.003).astype(float), 3) * 3  # sparse bright blobs
    content = 0.2 + cells + 0.01 * rng.standard_normal((size, size))
    field = planted_field(size)
    mean = content * field
    function = illumination_function(mean, downscale=4, median_size=9)
    assert function.dtype == np.float32 and function.shape == mean.shape
    assert function.min() == pytest.approx(1.0) and np.isfinite(function).all()
    assert np.corrcoef(function.ravel(), field.ravel())[0, 1] > 0.97
    flat = mean / function
    assert corner_centre_ratio(mean) < 0.62
    assert corner_centre_ratio(flat) == pytest.approx(1.0, abs=0.08)


def test_robust_minimum_clips_below_at_one():
    mean = np.linspace(0.1, 0.5, 64 * 64).reshape(64, 64)
    function = illumination_function(mean, downscale=2, median_size=3, percentile=10)
    robust = np.percentile(resize_bilinear(ndimage.median_filter(downscale_mean(mean, 2), footprint=disk_footprint(3),
                                                                 mode="nearest"), (64, 64)), 10)
    assert function.min() == 1.0 and (function == 1.0).mean() == pytest.approx(0.1, abs=0.02)
    assert function.max() == pytest.approx(0.5 / robust, rel=0.02)
    with pytest.raises(DataError, match="blank"):
        illumination_function(np.zeros((16, 16)), downscale=2, median_size=3, name="plate P DNA")


def test_plate_mean_and_names():
    acc = PlateMean("P1")
    acc.add(np.full((2, 4, 4), 65535, np.uint16), "a.tif")
    acc.add(np.zeros((2, 4, 4), np.uint16), "b.tif")
    assert np.allclose(acc.mean(), 0.5)
    with pytest.raises(DataError, match="c.tif: shape \\(2, 4, 5\\) differs from \\(2, 4, 4\\) of a.tif \\(plate P1"):
        acc.add(np.zeros((2, 4, 5), np.uint16), "c.tif")
    assert illum_path("/o", "P1", "DNA") == Path("/o/P1/P1_IllumDNA.npy")
    for bad in ("", "..", "a/b", None):
        with pytest.raises(DataError, match="cannot be used as a folder name"):
            check_plate_name(bad)


def test_apply_illumination_rounds_clips_and_is_the_hand_rule():
    raw = np.array([[0, 1, 3, 65535]], np.uint16)
    illum = np.array([[1.0, 2.0, 2.0, 0.5]], np.float32)
    assert apply_illumination(raw, illum).tolist() == [[0, 0, 2, 65535]]  # 0.5 -> 0, 1.5 -> 2, clipped
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 65536, (40, 30), dtype=np.uint16)
    illum = (1 + rng.random((40, 30))).astype(np.float32)
    assert np.array_equal(apply_illumination(raw, illum), by_hand(raw, illum))


# ------------------------------------------------------------------------------------ end to end on a vignetted plate


def test_cli_output_flattens_the_planted_field(corrected: Path):
    table = load_site_table(corrected)
    out = corrected.parent
    plate = table["plate"].iloc[0]
    for ch in DEFAULT_CHANNELS:
        path = out / plate / f"{plate}_Illum{ch}.npy"
        function = np.load(path, allow_pickle=False)
        assert function.dtype == np.float32 and function.shape == (SIZE, SIZE) and function.min() >= 1.0
        assert table[f"FileName_Illum{ch}"].eq(str(path)).all()
    raw = np.mean([read_site(r, illum=False)[0].astype(float) for _, r in table.iterrows()], axis=0)
    flat = np.mean([read_site(r)[0].astype(float) for _, r in table.iterrows()], axis=0)
    assert (corner_centre_ratio(raw) < 0.72).all()
    assert np.abs(corner_centre_ratio(flat) - 1.0).max() < 0.15
    assert not [p.name for p in out.rglob("*.tmp")]


def test_written_csv_keeps_the_input_and_works_from_its_own_folder(vignetted: Path, corrected: Path, tmp_path):
    before = pd.read_csv(vignetted, dtype=str, keep_default_na=False)
    after = pd.read_csv(corrected, dtype=str, keep_default_na=False)
    assert len(after) == len(before) and set(before.columns) <= set(after.columns)
    for col in ("plate", "well", "field", "perturbation_id", "Otsu_th"):
        assert after[col].tolist() == before[col].tolist()
    for ch in DEFAULT_CHANNELS:
        assert all(os.path.isabs(p) for p in after[f"PathName_Orig{ch}"])
        assert all(os.path.isabs(p) for p in after[f"PathName_Illum{ch}"])
    moved = tmp_path / "elsewhere.csv"
    shutil.copy(corrected, moved)
    assert load_site_table(moved)["FileName_IllumDNA"].tolist() == load_site_table(corrected)[
        "FileName_IllumDNA"].tolist()


def test_every_reader_applies_the_functions(corrected: Path):
    table = load_site_table(corrected)
    row = table.iloc[3]
    raw, otsu = read_site(row, illum=False)
    functions = [np.load(row[f"FileName_Illum{ch}"]) for ch in DEFAULT_CHANNELS]
    expected = np.stack([by_hand(plane, f) for plane, f in zip(raw, functions)])
    pixels, otsu2 = read_site(row)
    assert np.array_equal(pixels, expected) and otsu2 == otsu
    assert not np.array_equal(pixels, raw)
    lazy = open_site_array(row)
    assert isinstance(lazy, StackedChannels) and all(isinstance(p, IlluminatedPlane) for p in lazy.planes)
    assert all(isinstance(p.plane, np.memmap) and isinstance(p.illum, np.memmap) for p in lazy.planes)
    for ys, xs in ((slice(0, 64), slice(0, 64)), (slice(50, 131), slice(17, 190)), (slice(None), slice(None))):
        assert np.array_equal(lazy[:, ys, xs], expected[:, ys, xs])
    assert np.array_equal(lazy[4], expected[4]) and np.array_equal(np.asarray(lazy), expected)
    out = np.empty((5, 64, 96), np.uint16)
    read_site_region(row.to_dict(), DEFAULT_CHANNELS, Region(SIZE, SIZE, 10, 20, 64, 96), out)
    assert np.array_equal(out, expected[:, 10:74, 20:116])
    rows = table.iloc[:2]
    norm, _ = dataset_intensity_norm(rows, DEFAULT_CHANNELS, n_sites=None, workers=1, progress=False)
    ref = compute_intensity_norm((read_site(r)[0] for _, r in rows.iterrows()), DEFAULT_CHANNELS)
    assert np.allclose(norm.mean, ref.mean, atol=1e-12) and np.allclose(norm.std, ref.std, atol=1e-12)


def test_merged_rows_with_illum_leave_the_plain_fast_path(make_plate: Callable[[int], Path], tmp_path):
    csv = make_plate(4)
    row = load_site_table(csv).iloc[0].to_dict()
    assert open_plain_merged(row, DEFAULT_CHANNELS) is not None
    shape = open_site_array(row).shape[1:]
    illum = np.linspace(1.0, 2.0, shape[0] * shape[1], dtype=np.float32).reshape(shape)
    for ch in DEFAULT_CHANNELS:
        np.save(tmp_path / f"I{ch}.npy", illum.astype(np.float64) if ch == "DNA" else illum)  # CellProfiler: float64
        row[f"FileName_Illum{ch}"] = str(tmp_path / f"I{ch}.npy")
    assert open_plain_merged(row, DEFAULT_CHANNELS) is None
    raw, _ = read_site(row, illum=False)
    expected = by_hand(raw, illum[None])
    assert np.array_equal(read_site(row)[0], expected)
    assert np.array_equal(open_site_array(row)[:, 5:40, 7:33], expected[:, 5:40, 7:33])
    out = np.empty((5, shape[0], shape[1]), np.uint16)
    read_site_region(row, DEFAULT_CHANNELS, Region(shape[0], shape[1], 0, 0, shape[0], shape[1]), out)
    assert np.array_equal(out, expected)


# ----------------------------------------------------------------------------------------------- bad illum input


def _site(tmp_path: Path) -> dict:
    pixels = np.random.default_rng(0).integers(0, 65536, (5, 24, 20), dtype=np.uint16)
    write_merged_tiff(tmp_path / "s.tif", pixels, otsu=None)
    return {"FileName_Merged": str(tmp_path / "s.tif")}


@pytest.mark.parametrize("content,pattern", [
    (np.ones((20, 24), np.float32), "shape \\(20, 24\\) differs from the image's \\(24, 20\\)"),
    (np.full((24, 20), np.nan, np.float32), "NaN or infinite"),
    (np.zeros((24, 20), np.float32), "values <= 0 \\(min 0\\)"),
    (-np.ones((24, 20)), "values <= 0 \\(min -1\\)"),
    (np.ones((1, 24, 20), np.float32), "shape \\(1, 24, 20\\), expected \\(H,W\\)"),
    (np.ones((24, 20), bool), "dtype bool, expected a float array"),
    (np.array([{"a": 1}], dtype=object), "corrupt or unreadable illumination .npy"),
])
def test_bad_illumination_files_are_one_line_errors_naming_them(tmp_path, content, pattern):
    row = _site(tmp_path)
    bad = tmp_path / "bad_illum.npy"
    np.save(bad, content, allow_pickle=True)
    for ch in DEFAULT_CHANNELS:
        good = tmp_path / f"ok_{ch}.npy"
        np.save(good, np.ones((24, 20), np.float32))
        row[f"FileName_Illum{ch}"] = str(good)
    row["FileName_IllumRNA"] = str(bad)
    for fn in (read_site, open_site_array):
        with pytest.raises(DataError, match=pattern) as err:
            fn(row)
        assert "bad_illum.npy" in str(err.value) and "\n" not in str(err.value)


def test_partial_illumination_in_a_row_is_refused(tmp_path):
    row = _site(tmp_path)
    np.save(tmp_path / "i.npy", np.ones((24, 20), np.float32))
    row["FileName_IllumDNA"] = str(tmp_path / "i.npy")
    with pytest.raises(DataError, match="no FileName_IllumMito, FileName_IllumAGP"):
        read_site(row)


def test_load_illum_reads_once_and_rereads_a_rewritten_file(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, np.full((8, 8), 2.0, np.float32))
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_illum(path), range(16)))
    assert all(a is loaded[0] for a in loaded) and float(loaded[0][0, 0]) == 2.0
    np.save(path, np.full((8, 9), 3.0, np.float64))
    again = load_illum(path)
    assert again is not loaded[0] and again.shape == (8, 9) and float(again[0, 0]) == 3.0
    assert isinstance(again, np.memmap)  # float64 stays memory-mapped (shared page cache), cast when applied


def test_site_table_resolves_and_checks_illumination_columns(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 65536, (5, 24, 20), dtype=np.uint16)
    write_merged_tiff(tmp_path / "a.tif", pixels, otsu=None)
    write_merged_tiff(tmp_path / "b.tif", pixels, otsu=None)
    (tmp_path / "illum").mkdir()
    for ch in DEFAULT_CHANNELS:
        np.save(tmp_path / "illum" / f"P_Illum{ch}.npy", np.full((24, 20), 2.0, np.float32))
    rows = []
    for name, well in (("a.tif", "A01"), ("b.tif", "A02")):
        row = {"FileName_Merged": name, "plate": "P", "well": well, "field": 1}
        for ch in DEFAULT_CHANNELS:
            row[f"FileName_Illum{ch}"] = f"P_Illum{ch}.npy"
            row[f"PathName_Illum{ch}"] = "illum"
        rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "ok.csv", index=False)
    table = load_site_table(tmp_path / "ok.csv")
    assert table.loc[0, "FileName_IllumDNA"] == str(tmp_path / "illum" / "P_IllumDNA.npy")
    assert np.array_equal(read_site(table.loc[1])[0], by_hand(pixels, np.full((24, 20), 2.0, np.float32)[None]))

    broken = [dict(rows[0], FileName_IllumDNA="gone.npy", FileName_IllumER="gone2.npy"),
              dict(rows[1], FileName_IllumAGP="", FileName_IllumRNA="P_IllumRNA.mat")]
    pd.DataFrame(broken).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError) as err:
        load_site_table(tmp_path / "bad.csv")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "bad.csv") in msg
    assert "missing illumination file (1): line 2 (" in msg and "gone2.npy and 1 more of this site" in msg
    assert "empty illumination file name (1): line 3 (FileName_IllumAGP)" in msg
    assert "unsupported illumination file extension (1): line 3" in msg and "P_IllumRNA.mat; use .npy" in msg

    partial = pd.DataFrame(rows).drop(columns=["FileName_IllumMito", "FileName_IllumAGP"])
    partial.to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(DataError, match="missing column.*'FileName_IllumMito', 'FileName_IllumAGP'.*correct every "
                                        "channel or none"):
        load_site_table(tmp_path / "partial.csv", check_files=False)
    only_dna = load_site_table(tmp_path / "partial.csv", channels=("DNA", "ER"))
    assert only_dna.loc[0, "FileName_IllumDNA"].endswith("P_IllumDNA.npy")


def test_cli_bad_input_is_one_line(make_plate: Callable[[int], Path], tmp_path, capsys):
    csv = make_plate(4)
    cases = [
        ([str(csv), "-o", str(tmp_path / "o"), "--downscale", "0"], "--downscale must be >= 1"),
        ([str(csv), "-o", str(tmp_path / "o"), "--median_size", "0"], "--median_size must be >= 1"),
        ([str(csv), "-o", str(tmp_path / "o"), "--percentile", "100"], "--percentile must be in"),
        (["-o", str(tmp_path / "o")], "no site CSV"),
        ([str(tmp_path / "none.csv"), "-o", str(tmp_path / "o")], "dataset CSV not found"),
    ]
    no_plate = tmp_path / "noplate.csv"
    pd.read_csv(csv).drop(columns=["plate"]).to_csv(no_plate, index=False)
    cases.append(([str(no_plate), "-o", str(tmp_path / "o"), "--image_root", str(csv.parent)], "'plate'"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda argv=argv: main(argv))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_accepts_the_csv_as_a_flag_and_merged_plates(make_plate: Callable[[int], Path], tmp_path, capsys):
    csv = make_plate(4)
    assert main(["--valset", str(csv), "-o", str(tmp_path / "o"), "--median_size", "3", "--workers", "1"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("illum: 8 sites, 1 plates x 5 channels -> ") and OUTPUT_CSV in summary
    table = load_site_table(tmp_path / "o" / OUTPUT_CSV)
    assert set(table["layout"]) == {"merged"} and all(os.path.isabs(p) for p in table["FileName_Merged"])
    assert read_site(table.iloc[0])[0].shape == (5, 64, 64)
