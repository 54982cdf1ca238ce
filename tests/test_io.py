"""Site reading: round trips for every layout, lazy crops, and one clear error per kind of bad file."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import tifffile

from data.io import (
    StackedChannels,
    open_site_array,
    read_channel_tiffs,
    read_merged_tiff,
    read_npy,
    read_site,
    write_channel_tiffs,
    write_merged_tiff,
    write_npy,
)
from data.schema import DEFAULT_CHANNELS, load_site_table
from utils.errors import DataError


@pytest.fixture
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 65536, size=(5, 24, 20), dtype=np.uint16)


def channel_paths(folder, stem: str = "s") -> list[str]:
    return [str(folder / f"{stem}_{ch}.tif") for ch in DEFAULT_CHANNELS]


def per_channel_row(paths: list[str], channels=DEFAULT_CHANNELS) -> dict:
    row = {"layout": "per-channel", "Otsu_th": 321.0}
    row.update({f"FileName_Orig{ch}": p for ch, p in zip(channels, paths)})
    return row


def test_merged_round_trip_with_paper_description(tmp_path, pixels):
    path = tmp_path / "site.tif"
    write_merged_tiff(path, pixels, otsu=1234.5)
    arr, otsu = read_merged_tiff(path, n_channels=5)
    assert arr.dtype == np.uint16 and np.array_equal(arr, pixels)
    assert otsu == 1234.5
    with tifffile.TiffFile(path) as tif:
        desc = json.loads(tif.pages.first.description)
        assert desc == {"otsuth": 1234.5, "channels": list(DEFAULT_CHANNELS)}
        assert tif.series[0].dataoffset is not None
        assert all(p.compression == 1 for p in tif.pages)
    assert [p.name for p in tmp_path.iterdir()] == ["site.tif"]


def test_otsu_on_unit_scale_is_converted_to_raw(tmp_path, pixels):
    write_merged_tiff(tmp_path / "a.tif", pixels, otsu=0.1)
    assert read_merged_tiff(tmp_path / "a.tif")[1] == pytest.approx(0.1 * 65535)


def test_description_that_is_not_json_gives_nan_and_row_otsu_is_the_fallback(tmp_path, pixels):
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, description="acquired on a microscope", metadata=None, photometric="minisblack")
    arr, otsu = read_merged_tiff(path)
    assert np.array_equal(arr, pixels) and math.isnan(otsu)
    _, otsu = read_site({"FileName_Merged": str(path), "Otsu_th": 77.0})
    assert otsu == 77.0
    _, otsu = read_site({"FileName_Merged": str(path)})
    assert math.isnan(otsu)


def test_description_otsu_wins_over_row(tmp_path, pixels):
    write_merged_tiff(tmp_path / "a.tif", pixels, otsu=900.0)
    assert read_site({"FileName_Merged": str(tmp_path / "a.tif"), "Otsu_th": 5.0})[1] == 900.0


def test_per_channel_round_trip(tmp_path, pixels):
    paths = channel_paths(tmp_path)
    write_channel_tiffs(paths, pixels)
    assert np.array_equal(read_channel_tiffs(paths), pixels)
    arr, otsu = read_site(per_channel_row(paths))
    assert np.array_equal(arr, pixels) and otsu == 321.0


def test_npy_round_trip(tmp_path, pixels):
    write_npy(tmp_path / "s.npy", pixels)
    assert np.array_equal(read_npy(tmp_path / "s.npy"), pixels)
    arr, otsu = read_site({"FileName_Merged": str(tmp_path / "s.npy"), "Otsu_th": 0.5})
    assert np.array_equal(arr, pixels) and otsu == pytest.approx(0.5 * 65535)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npy"]


def test_jump_and_paper_sites_load_identically_through_tables(tmp_path, pixels):
    write_merged_tiff(tmp_path / "merged.tif", pixels, otsu=1000.0)
    paper_csv = tmp_path / "paper.csv"
    pd.DataFrame([{"FileName_Merged": "merged.tif", "plate": "P", "well": "A01", "field": 1}]).to_csv(
        paper_csv, index=False
    )
    (tmp_path / "jump").mkdir()
    write_channel_tiffs(channel_paths(tmp_path / "jump", "A01_s1"), pixels)
    jump = {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": 1, "Otsu_th": 1000.0}
    for ch in DEFAULT_CHANNELS:
        jump[f"FileName_Orig{ch}"] = f"A01_s1_{ch}.tif"
        jump[f"PathName_Orig{ch}"] = "jump"
    jump_csv = tmp_path / "load_data.csv"
    pd.DataFrame([jump]).to_csv(jump_csv, index=False)

    paper_arr, paper_otsu = read_site(load_site_table(paper_csv).loc[0])
    jump_arr, jump_otsu = read_site(load_site_table(jump_csv).loc[0])
    assert np.array_equal(paper_arr, jump_arr) and np.array_equal(paper_arr, pixels)
    assert paper_otsu == jump_otsu == 1000.0


def test_channel_order_by_declared_names(tmp_path, pixels):
    write_merged_tiff(tmp_path / "a.tif", pixels, otsu=None)
    order = ("DNA", "Mito", "ER")
    expected = pixels[[4, 0, 3]]
    arr, _ = read_site({"FileName_Merged": str(tmp_path / "a.tif")}, channels=order)
    assert np.array_equal(arr, expected)
    lazy = open_site_array({"FileName_Merged": str(tmp_path / "a.tif")}, channels=order)
    assert isinstance(lazy, StackedChannels) and lazy.shape == (3, 24, 20)
    assert np.array_equal(lazy[:, 3:9, 2:7], expected[:, 3:9, 2:7])
    assert np.array_equal(lazy[1], expected[1]) and np.array_equal(np.asarray(lazy), expected)
    with pytest.raises(DataError, match="missing \\['Brightfield'\\]"):
        read_site({"FileName_Merged": str(tmp_path / "a.tif")}, channels=("DNA", "Brightfield"))


def test_open_site_array_memory_maps_uncompressed_files(tmp_path, pixels):
    write_merged_tiff(tmp_path / "a.tif", pixels, otsu=None)
    write_npy(tmp_path / "a.npy", pixels)
    for name in ("a.tif", "a.npy"):
        lazy = open_site_array({"FileName_Merged": str(tmp_path / name)})
        assert isinstance(lazy, np.memmap), name
        assert lazy.shape == pixels.shape and lazy.dtype == np.uint16
        assert np.array_equal(lazy[:, 5:15, 2:12], pixels[:, 5:15, 2:12])
        with pytest.raises(ValueError):
            lazy[0, 0, 0] = 1
    paths = channel_paths(tmp_path)
    write_channel_tiffs(paths, pixels)
    lazy = open_site_array(per_channel_row(paths))
    assert isinstance(lazy, StackedChannels) and all(isinstance(p, np.memmap) for p in lazy.planes)
    assert np.array_equal(lazy[:, 1:4, 7:19], pixels[:, 1:4, 7:19])
    assert np.array_equal(lazy[..., 2:5], pixels[..., 2:5])


def test_compressed_tiff_is_read_whole_with_a_warning(tmp_path, pixels):
    path = tmp_path / "zip.tif"
    tifffile.imwrite(path, pixels, compression="zlib", description=json.dumps({"otsuth": 10.0}), metadata=None)
    with pytest.warns(RuntimeWarning, match="not memory-mappable"):
        lazy = open_site_array({"FileName_Merged": str(path)})
    assert not isinstance(lazy, np.memmap) and np.array_equal(lazy, pixels)
    arr, otsu = read_merged_tiff(path)
    assert np.array_equal(arr, pixels) and otsu == 10.0


def test_interleaved_and_big_endian_tiffs(tmp_path, pixels):
    tifffile.imwrite(tmp_path / "yxs.tif", np.moveaxis(pixels, 0, -1), photometric="minisblack",
                     planarconfig="contig", metadata=None)
    assert np.array_equal(read_merged_tiff(tmp_path / "yxs.tif")[0], pixels)
    tifffile.imwrite(tmp_path / "be.tif", pixels, byteorder=">", metadata=None, photometric="minisblack")
    arr, _ = read_merged_tiff(tmp_path / "be.tif")
    assert arr.dtype == np.dtype("=u2") and np.array_equal(arr, pixels)
    with pytest.warns(RuntimeWarning):
        assert np.array_equal(open_site_array({"FileName_Merged": str(tmp_path / "be.tif")}), pixels)


def test_missing_files_name_the_file(tmp_path):
    for row in ({"FileName_Merged": str(tmp_path / "no.tif")}, {"FileName_Merged": str(tmp_path / "no.npy")},
                per_channel_row(channel_paths(tmp_path))):
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match="not found") as err:
                fn(row)
            assert str(tmp_path) in str(err.value)


def test_corrupt_files(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"this is not a tiff at all" * 10)
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    for name in ("junk.tif", "junk.npy"):
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match="corrupt") as err:
                fn({"FileName_Merged": str(tmp_path / name)})
            assert name in str(err.value)


@pytest.mark.parametrize("keep", [0.98, 0.5, 0.02])
def test_truncated_files(tmp_path, pixels, keep):
    write_merged_tiff(tmp_path / "full.tif", pixels, otsu=1.0)
    write_channel_tiffs(channel_paths(tmp_path), pixels)
    write_npy(tmp_path / "full.npy", pixels)
    sources = {"full.tif": "cut.tif", "full.npy": "cut.npy", "s_DNA.tif": "cut_DNA.tif"}
    for src, dst in sources.items():
        data = (tmp_path / src).read_bytes()
        (tmp_path / dst).write_bytes(data[: int(len(data) * keep)])
    rows = [{"FileName_Merged": str(tmp_path / "cut.tif")}, {"FileName_Merged": str(tmp_path / "cut.npy")},
            per_channel_row(channel_paths(tmp_path)[:4] + [str(tmp_path / "cut_DNA.tif")])]
    for row in rows:
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match="truncated|corrupt") as err:
                fn(row)
            assert "cut" in str(err.value)


def test_wrong_channel_count(tmp_path, pixels):
    write_merged_tiff(tmp_path / "four.tif", pixels[:4], otsu=None)
    write_npy(tmp_path / "four.npy", pixels[:4])
    for name in ("four.tif", "four.npy"):
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match="4 channels, expected 5") as err:
                fn({"FileName_Merged": str(tmp_path / name)})
            assert name in str(err.value)
    with pytest.raises(DataError, match="4 channels, expected 5"):
        read_merged_tiff(tmp_path / "four.tif", n_channels=5)
    write_merged_tiff(tmp_path / "multi.tif", pixels[:2], otsu=None, channels=("a", "b"))
    with pytest.raises(DataError, match="2 planes, expected one channel per file"):
        read_channel_tiffs([tmp_path / "multi.tif"])


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.int16, np.uint32])
def test_wrong_dtype(tmp_path, pixels, dtype):
    bad = pixels.astype(dtype)
    tifffile.imwrite(tmp_path / "bad.tif", bad, metadata=None, photometric="minisblack")
    np.save(tmp_path / "bad.npy", bad)
    tifffile.imwrite(tmp_path / "bad_DNA.tif", bad[4], metadata=None, photometric="minisblack")
    write_channel_tiffs(channel_paths(tmp_path), pixels)
    rows = [{"FileName_Merged": str(tmp_path / "bad.tif")}, {"FileName_Merged": str(tmp_path / "bad.npy")},
            per_channel_row(channel_paths(tmp_path)[:4] + [str(tmp_path / "bad_DNA.tif")])]
    for row in rows:
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match=f"dtype {np.dtype(dtype)}, expected uint16") as err:
                fn(row)
            assert "bad" in str(err.value)


def test_mismatched_channel_shapes(tmp_path, pixels):
    paths = channel_paths(tmp_path)
    write_channel_tiffs(paths, pixels)
    tifffile.imwrite(paths[2], pixels[2, :20], metadata=None, photometric="minisblack")
    for fn in (read_site, open_site_array):
        with pytest.raises(DataError, match="differs from") as err:
            fn(per_channel_row(paths))
        assert os.path.basename(paths[2]) in str(err.value)


def test_writers_refuse_non_uint16_and_bad_shapes(tmp_path, pixels):
    with pytest.raises(DataError, match="uint16"):
        write_merged_tiff(tmp_path / "a.tif", pixels.astype(np.float32), otsu=None)
    with pytest.raises(DataError, match="\\(C,H,W\\)"):
        write_npy(tmp_path / "a.npy", pixels[0])
    with pytest.raises(DataError, match="3 channel names for 5"):
        write_merged_tiff(tmp_path / "a.tif", pixels, otsu=None, channels=("a", "b", "c"))
    assert list(tmp_path.iterdir()) == []
