"""Site reading: round trips for every layout, lazy crops, and one clear error per kind of bad file."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from data.io import (
    StackedChannels,
    open_plain_merged,
    open_site_array,
    read_channel_tiffs,
    read_merged_tiff,
    read_npy,
    read_site,
    site_shape,
    write_channel_tiffs,
    write_merged_tiff,
    write_npy,
)
from data.schema import DEFAULT_CHANNELS, load_site_table
from data.stats import compute_intensity_norm, dataset_intensity_norm
from utils.errors import DataError

LINCS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "lincs_a549_images"
LINCS_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
# PNG crops always read whole files; the tests that care about that warning assert it with pytest.warns
pytestmark = pytest.mark.filterwarnings("ignore:.*PNG \\(always compressed\\) not memory-mappable")


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


@pytest.mark.parametrize("dtype", [np.int16, np.uint32, np.float64, np.int8])
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
            with pytest.raises(DataError, match=f"dtype {np.dtype(dtype)} is not supported; expected uint8, uint16 "
                                                f"or float32") as err:
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


# ------------------------------------------------------------------------------------------- formats and bit depths


def ref_uint8(x: np.ndarray) -> np.ndarray:
    """Reference conversion of 8-bit data to raw units, computed independently of the reader: x/255 on 65535."""
    return np.rint(x.astype(np.float64) / 255.0 * 65535.0).astype(np.uint16)


def ref_float(x: np.ndarray) -> np.ndarray:
    return np.rint(x.astype(np.float64) * 65535.0).astype(np.uint16)


@pytest.fixture
def sources() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, size=(5, 24, 20), dtype=np.uint8)
    u8[0, 0, 0], u8[0, 0, 1] = 0, 255
    u16 = rng.integers(0, 65536, size=(5, 24, 20), dtype=np.uint16)
    f32 = rng.random((5, 24, 20), dtype=np.float32)
    f32[0, 0, 0], f32[0, 0, 1] = 0.0, 1.0
    return {"uint8": u8, "uint16": u16, "float32": f32}


def _expected(sources: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    x = sources[dtype]
    return ref_uint8(x) if dtype == "uint8" else x if dtype == "uint16" else ref_float(x)


def _write_format(folder: Path, fmt: str, arr: np.ndarray) -> dict:
    """A hand-made row for one (container, layout) with the pixels of ``arr`` in the file's own dtype."""
    if fmt == "tiff-merged":
        tifffile.imwrite(folder / "m.tif", arr, metadata=None, photometric="minisblack")
        return {"FileName_Merged": str(folder / "m.tif")}
    if fmt == "npy":
        np.save(folder / "m.npy", arr)
        return {"FileName_Merged": str(folder / "m.npy")}
    paths = []
    for ch, plane in zip(DEFAULT_CHANNELS, arr):
        if fmt == "png":
            paths.append(str(folder / f"s_{ch}.png"))
            Image.fromarray(plane).save(paths[-1])
        else:
            paths.append(str(folder / f"s_{ch}.tif"))
            tifffile.imwrite(paths[-1], plane, metadata=None, photometric="minisblack")
    return per_channel_row(paths)


FORMATS = [("png", "uint8"), ("png", "uint16"), ("tiff-merged", "uint8"), ("tiff-merged", "uint16"),
           ("tiff-merged", "float32"), ("tiff-channels", "uint8"), ("tiff-channels", "uint16"),
           ("tiff-channels", "float32"), ("npy", "uint8"), ("npy", "uint16"), ("npy", "float32")]


@pytest.mark.filterwarnings("ignore:.*not memory-mappable")
@pytest.mark.parametrize("fmt,dtype", FORMATS)
def test_every_format_reads_to_the_same_raw_units(tmp_path, sources, fmt, dtype):
    row = _write_format(tmp_path, fmt, sources[dtype])
    expected = _expected(sources, dtype)
    arr, _ = read_site(row)
    assert arr.dtype == np.uint16 and arr.shape == (5, 24, 20)
    assert np.array_equal(arr, expected)
    lazy = open_site_array(row)
    assert lazy.dtype == np.uint16 and tuple(lazy.shape) == (5, 24, 20)
    assert np.array_equal(np.asarray(lazy), expected)
    assert np.array_equal(lazy[:, 3:9, 2:7], expected[:, 3:9, 2:7])
    assert site_shape(row) == (5, 24, 20)


def test_uint8_maps_onto_the_unit_scale_exactly(sources):
    """x/255 == 257x/65535 for every 8-bit level, so an 8-bit PNG and its 16-bit TIFF give one [0,1] image."""
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(ref_uint8(levels), levels.astype(np.uint16) * 257)
    assert np.allclose(ref_uint8(levels) / 65535.0, levels / 255.0, atol=0, rtol=1e-15)


def test_non_uint16_and_png_warn_that_crops_read_the_whole_file(tmp_path, sources):
    for fmt, dtype in (("png", "uint8"), ("tiff-channels", "float32"), ("npy", "uint8")):
        folder = tmp_path / f"{fmt}_{dtype}"
        folder.mkdir()
        row = _write_format(folder, fmt, sources[dtype])
        with pytest.warns(RuntimeWarning, match="not memory-mappable") as record:
            open_site_array(row)
        assert str(folder) in str(record[0].message)
        if fmt == "png":
            assert "PNG" in str(record[0].message)


def test_inference_reader_gives_no_crop_advice(tmp_path, sources):
    """Inference reads whole sites anyway, so the 'convert for fast training' advice is not given there."""
    import warnings

    from data.prefetch import read_site_region
    from data.tiling import Region

    row = _write_format(tmp_path, "png", sources["uint8"])
    c, h, w = open_site_array(row, warn_full_read=False).shape
    out = np.empty((c, h, w), np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_site_region(row, DEFAULT_CHANNELS, Region(h, w, 0, 0, h, w), out)
    np.testing.assert_array_equal(out, read_site(row)[0])


def test_uncompressed_uint16_keeps_the_memory_mapped_fast_paths(tmp_path, pixels):
    write_merged_tiff(tmp_path / "a.tif", pixels, otsu=None)
    assert isinstance(open_site_array({"FileName_Merged": str(tmp_path / "a.tif")}), np.memmap)
    fast = open_plain_merged({"FileName_Merged": str(tmp_path / "a.tif")}, DEFAULT_CHANNELS)
    assert fast is not None and isinstance(fast[0], np.memmap)
    tifffile.imwrite(tmp_path / "u8.tif", (pixels >> 8).astype(np.uint8), metadata=None, photometric="minisblack")
    assert open_plain_merged({"FileName_Merged": str(tmp_path / "u8.tif")}, DEFAULT_CHANNELS) is None


@pytest.mark.filterwarnings("ignore:.*not memory-mappable")
@pytest.mark.parametrize("bad,found", [(-0.5, "found [-0.5, "), (2.0, ", 2]"), (np.nan, "] and NaN"),
                                       (np.inf, ", inf]")])
def test_float_outside_unit_range_names_file_and_range(tmp_path, sources, bad, found):
    arr = sources["float32"].copy()
    arr[2, 5, 5] = bad
    for fmt in ("tiff-merged", "tiff-channels", "npy"):
        folder = tmp_path / fmt
        folder.mkdir()
        row = _write_format(folder, fmt, arr)
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match="float32 values must lie in \\[0, 1\\]") as err:
                fn(row)
            msg = str(err.value)
            assert str(folder) in msg and found in msg and "\n" not in msg


def test_channels_last_arrays_are_named_as_such(tmp_path, pixels):
    hwc = np.ascontiguousarray(np.moveaxis(pixels, 0, -1))  # (24, 20, 5)
    np.save(tmp_path / "hwc.npy", hwc)
    tifffile.imwrite(tmp_path / "hwc.tif", hwc, metadata=None, photometric="minisblack")
    for name in ("hwc.npy", "hwc.tif"):
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match="looks channels-last \\(H,W,C\\); expected channels first "
                                                "\\(C,H,W\\) with C=5") as err:
                fn({"FileName_Merged": str(tmp_path / name)})
            assert name in str(err.value) and "(24, 20, 5)" in str(err.value)


@pytest.mark.parametrize("mode,expect", [("RGB", "RGB (3 channels) PNG"), ("RGBA", "RGBA (4 channels) PNG"),
                                         ("LA", "LA (2 channels) PNG"), ("P", "palette (colour-mapped) PNG"),
                                         ("1", "1-bit PNG")])
def test_non_grayscale_png_for_one_channel_is_refused(tmp_path, pixels, mode, expect):
    paths = [str(tmp_path / f"s_{ch}.png") for ch in DEFAULT_CHANNELS]
    for p, plane in zip(paths, pixels):
        Image.fromarray((plane >> 8).astype(np.uint8)).save(p)
    Image.fromarray((pixels[2] >> 8).astype(np.uint8)).convert(mode).save(paths[2])
    for fn in (read_site, open_site_array, site_shape):
        with pytest.raises(DataError, match="expected one grayscale channel per file") as err:
            fn(per_channel_row(paths))
        assert os.path.basename(paths[2]) in str(err.value) and expect in str(err.value)


def test_broken_pngs_name_the_file(tmp_path, pixels):
    good = tmp_path / "good.png"
    Image.fromarray(pixels[0]).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not a png" * 20)
    tifffile.imwrite(tmp_path / "tiff.png", pixels[0], metadata=None, photometric="minisblack")
    for name, pattern in (("cut.png", "corrupt or truncated PNG"), ("junk.png", "corrupt or unreadable PNG"),
                          ("tiff.png", "not a PNG file"), ("gone.png", "not found")):
        paths = [str(good)] * 4 + [str(tmp_path / name)]
        for fn in (read_site, open_site_array):
            with pytest.raises(DataError, match=pattern) as err:
                fn(per_channel_row(paths))
            assert name in str(err.value)


def test_png_shapes_must_match_and_merged_png_is_refused(tmp_path, pixels):
    paths = [str(tmp_path / f"s_{ch}.png") for ch in DEFAULT_CHANNELS]
    for p, plane in zip(paths, pixels):
        Image.fromarray(plane).save(p)
    Image.fromarray(pixels[3, :20]).save(paths[3])
    for fn in (read_site, open_site_array, site_shape):
        with pytest.raises(DataError, match="differs from") as err:
            fn(per_channel_row(paths))
        assert os.path.basename(paths[3]) in str(err.value)
    for fn in (read_site, open_site_array):
        with pytest.raises(DataError, match="a PNG holds one channel, not a merged site"):
            fn({"FileName_Merged": paths[0]})


def test_site_tables_accept_png_per_channel_and_refuse_merged_png(tmp_path, pixels):
    row = {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": 1}
    for ch, plane in zip(DEFAULT_CHANNELS, pixels):
        Image.fromarray(plane).save(tmp_path / f"A01_{ch}.png")
        row[f"FileName_Orig{ch}"] = f"A01_{ch}.png"
    pd.DataFrame([row]).to_csv(tmp_path / "load_data.csv", index=False)
    table = load_site_table(tmp_path / "load_data.csv")
    assert table.loc[0, "layout"] == "per-channel"
    assert np.array_equal(read_site(table.loc[0])[0], pixels)
    bad = dict(row, FileName_OrigDNA="A01_DNA.jpg")
    pd.DataFrame([bad, {"FileName_Merged": "m.png", "Metadata_Plate": "P", "Metadata_Well": "A02"}]).to_csv(
        tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError) as err:
        load_site_table(tmp_path / "bad.csv", check_files=False)
    msg = str(err.value)
    assert "A01_DNA.jpg; use .tif/.tiff or .png" in msg
    assert "m.png; a PNG holds one channel" in msg


# ------------------------------------------------------------------------------------ the real LINCS A549 images


@pytest.fixture(scope="module")
def lincs_table() -> pd.DataFrame:
    if not (LINCS / "load_data.csv").exists():
        # CI always has shared/ beside the clone, so there a missing set is a failure, not a skip
        if os.environ.get("CI"):
            pytest.fail(f"LINCS A549 images not present at {LINCS}")
        pytest.skip(f"LINCS A549 images not present at {LINCS}")
    return load_site_table(LINCS / "load_data.csv", channels=LINCS_CHANNELS)


def _as_tiff_row(row: pd.Series, folder: Path) -> dict:
    """The same site as 16-bit TIFFs, converted here by the bit-depth rule (x 257), for reference."""
    out = dict(row)
    for ch in LINCS_CHANNELS:
        plane = np.asarray(Image.open(row[f"FileName_Orig{ch}"]))
        assert plane.dtype == np.uint8
        path = folder / (Path(row[f"FileName_Orig{ch}"]).stem + ".tif")
        tifffile.imwrite(path, plane.astype(np.uint16) * 257, metadata=None, photometric="minisblack")
        out[f"FileName_Orig{ch}"] = str(path)
    return out


@pytest.mark.filterwarnings("ignore:.*not memory-mappable")
def test_lincs_pngs_read_like_their_16_bit_tiffs(lincs_table, tmp_path):
    assert len(lincs_table) == 32 and set(lincs_table["layout"]) == {"per-channel"}
    assert set(lincs_table["plate"]) == {"SQ00015198", "SQ00015230"}
    for i in (0, 17):
        row = lincs_table.iloc[i]
        ref_row = _as_tiff_row(row, tmp_path)
        start = time.perf_counter()
        png, otsu = read_site(row, LINCS_CHANNELS)
        png_s = time.perf_counter() - start
        tif, _ = read_site(ref_row, LINCS_CHANNELS)
        assert png.shape == (5, 1080, 1080) and png.dtype == np.uint16 and math.isnan(otsu)
        assert np.array_equal(png, tif)
        assert site_shape(row.to_dict(), LINCS_CHANNELS) == (5, 1080, 1080)
        lazy, ref_lazy = open_site_array(row, LINCS_CHANNELS), open_site_array(ref_row, LINCS_CHANNELS)
        assert np.array_equal(lazy[:, 100:324, 500:724], ref_lazy[:, 100:324, 500:724])
        assert np.array_equal(lazy[4], tif[4])
        assert png_s < 5.0  # about 0.1 s on one core; a regression to per-pixel Python would be far slower


def test_lincs_stats_on_two_sites(lincs_table):
    norm, used = dataset_intensity_norm(lincs_table.iloc[[0, 17]], LINCS_CHANNELS, n_sites=None, workers=1,
                                        progress=False, name="lincs")
    assert used == 2 and norm.channels == LINCS_CHANNELS
    assert all(0.0 < m < 1.0 for m in norm.mean) and all(s > 0 for s in norm.std)
    reference = compute_intensity_norm(
        (ref_uint8(np.stack([np.asarray(Image.open(lincs_table.iloc[i][f"FileName_Orig{ch}"]))
                             for ch in LINCS_CHANNELS])) for i in (0, 17)), LINCS_CHANNELS, name="lincs")
    assert np.allclose(norm.mean, reference.mean, rtol=0, atol=1e-12)
    assert np.allclose(norm.std, reference.std, rtol=0, atol=1e-12)
