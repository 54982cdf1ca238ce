"""Site tables: both CSV conventions, path resolution and all-at-once validation."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest

from data.io import write_channel_tiffs, write_merged_tiff, write_npy
from data.schema import (
    DEFAULT_CHANNELS,
    INFERENCE_REQUIRED,
    find_missing_files,
    image_paths,
    load_site_table,
    otsu_to_raw,
)
from utils.errors import DataError

PIX = np.arange(5 * 8 * 8, dtype=np.uint16).reshape(5, 8, 8)


def paper_row(path: str, well: str = "A01", field: int = 1, **extra: object) -> dict:
    row = {"FileName_Merged": path, "batch": "b1", "plate": "P1", "well": well, "field": field,
           "perturbation_id": "DMSO", "target": "none"}
    row.update(extra)
    return row


def jump_row(folder: str, well: str = "A01", site: int = 1, with_path: bool = True) -> dict:
    row = {"Metadata_Batch": "b1", "Metadata_Plate": "P1", "Metadata_Well": well, "Metadata_Site": site}
    for ch in DEFAULT_CHANNELS:
        name = f"{well}_s{site}_{ch}.tif"
        row[f"FileName_Orig{ch}"] = name if with_path else os.path.join(folder, name)
        if with_path:
            row[f"PathName_Orig{ch}"] = folder
    return row


def write_csv(path, rows: list[dict]) -> str:
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def make_paper_table(tmp_path, n: int = 3) -> str:
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        write_merged_tiff(tmp_path / "img" / f"s{i}.tif", PIX, otsu=100.0)
        rows.append(paper_row(f"img/s{i}.tif", well=f"A0{i + 1}"))
    return write_csv(tmp_path / "dataset.csv", rows)


def test_paper_convention_resolves_relative_paths_against_csv_folder(tmp_path):
    csv = make_paper_table(tmp_path)
    df = load_site_table(csv, required=INFERENCE_REQUIRED)
    assert list(df.index) == [0, 1, 2]
    assert (df["layout"] == "merged").all()
    assert df.loc[0, "FileName_Merged"] == str(tmp_path / "img" / "s0.tif")
    assert os.path.isabs(df.loc[2, "FileName_Merged"])
    assert df["Otsu_th"].isna().all()
    assert image_paths(df.loc[1]) == [str(tmp_path / "img" / "s1.tif")]


def test_image_root_overrides_csv_folder(tmp_path):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    write_merged_tiff(root / "img" / "a.tif", PIX, None)
    (tmp_path / "meta").mkdir()
    csv = write_csv(tmp_path / "meta" / "d.csv", [paper_row("img/a.tif")])
    with pytest.raises(DataError, match="missing file"):
        load_site_table(csv)
    df = load_site_table(csv, image_root=root)
    assert df.loc[0, "FileName_Merged"] == str(root / "img" / "a.tif")


def test_jump_convention_maps_metadata_and_channel_paths(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    write_channel_tiffs([img / f"A01_s1_{ch}.tif" for ch in DEFAULT_CHANNELS], PIX)
    write_channel_tiffs([img / f"A01_s2_{ch}.tif" for ch in DEFAULT_CHANNELS], PIX)
    rows = [jump_row("images", site=1), jump_row(str(img), site=2, with_path=False)]
    csv = write_csv(tmp_path / "load_data.csv", rows)
    df = load_site_table(csv, required=("batch", "plate", "well", "field"))
    assert (df["layout"] == "per-channel").all()
    assert df.loc[0, "batch"] == "b1" and df.loc[0, "plate"] == "P1" and df.loc[1, "field"] == 2
    assert "Metadata_Plate" in df.columns
    assert df.loc[0, "FileName_OrigDNA"] == str(img / "A01_s1_DNA.tif")
    assert df.loc[1, "FileName_OrigMito"] == str(img / "A01_s2_Mito.tif")
    assert image_paths(df.loc[0]) == [str(img / f"A01_s1_{ch}.tif") for ch in DEFAULT_CHANNELS]


def test_jump_table_without_batch_names_the_alias_when_batch_required(tmp_path):
    row = jump_row("images")
    del row["Metadata_Batch"]
    csv = write_csv(tmp_path / "load_data.csv", [row])
    with pytest.raises(DataError) as err:
        load_site_table(csv, required=("batch",), check_files=False)
    msg = str(err.value)
    assert "'batch'" in msg and "Metadata_Batch" in msg and "load_data.csv" in msg
    assert "\n" not in msg


def test_metadata_stays_string_and_other_columns_are_preserved(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"")
    csv = write_csv(tmp_path / "d.csv", [paper_row("a.npy", plate="0001", extra_col=7.5, Otsu_th=0.25)])
    df = load_site_table(csv, check_files=False)
    assert df.loc[0, "plate"] == "0001"
    assert df.loc[0, "extra_col"] == 7.5
    assert df.loc[0, "layout"] == "npy"
    assert df.loc[0, "Otsu_th"] == pytest.approx(0.25 * 65535)


def test_otsu_units_rule():
    assert otsu_to_raw(0.5) == pytest.approx(0.5 * 65535)
    assert otsu_to_raw(1.0) == pytest.approx(65535)
    assert otsu_to_raw(1200.0) == 1200.0
    assert math.isnan(otsu_to_raw(None)) and math.isnan(otsu_to_raw(float("nan")))
    with pytest.raises(DataError, match="invalid Otsu threshold"):
        otsu_to_raw(-3.0)


def test_negative_and_infinite_otsu_in_csv_are_reported(tmp_path):
    rows = [paper_row("a.tif", well="A01", Otsu_th=-1), paper_row("b.tif", well="A02", Otsu_th="inf"),
            paper_row("c.tif", well="A03", Otsu_th=0.5)]
    csv = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as err:
        load_site_table(csv, check_files=False)
    assert "invalid Otsu_th (2): line 2 ('-1'), line 3 ('inf')" in str(err.value)


def test_every_problem_is_reported_at_once_with_line_numbers(tmp_path):
    write_npy(tmp_path / "ok.npy", PIX)
    rows = [
        paper_row("ok.npy", well="A01"),
        paper_row("gone1.tif", well="A02"),
        paper_row("ok.npy", well="A01"),  # duplicate site and duplicate path
        paper_row("gone2.npy", well="A03", Otsu_th="high"),
        paper_row("image.png", well="A04"),
    ]
    csv = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as err:
        load_site_table(csv)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing file" in msg and "line 3" in msg and "gone1.tif" in msg and "line 5" in msg
    assert "duplicate site" in msg and "line 4 repeats line 2" in msg
    assert "duplicate image path" in msg
    assert "invalid Otsu_th" in msg and "'high'" in msg
    assert "unsupported image extension" in msg and "image.png" in msg


def test_missing_required_columns_are_named_with_file(tmp_path):
    csv = write_csv(tmp_path / "d.csv", [{"FileName_Merged": "a.tif", "plate": "P"}])
    with pytest.raises(DataError) as err:
        load_site_table(csv, required=INFERENCE_REQUIRED, check_files=False)
    msg = str(err.value)
    for col in ("batch", "well", "field", "perturbation_id"):
        assert f"'{col}'" in msg
    assert "'target'" not in msg  # optional: most real plates annotate no target
    assert "'plate'" not in msg
    assert str(tmp_path / "d.csv") in msg


def test_missing_image_column(tmp_path):
    csv = write_csv(tmp_path / "d.csv", [{"plate": "P", "well": "A01"}])
    with pytest.raises(DataError, match="FileName_Merged"):
        load_site_table(csv)
    csv = write_csv(tmp_path / "j.csv", [{"FileName_OrigDNA": "a.tif", "FileName_OrigER": "b.tif"}])
    with pytest.raises(DataError, match="FileName_OrigMito"):
        load_site_table(csv)


def test_channel_selection_only_needs_those_columns(tmp_path):
    write_channel_tiffs([tmp_path / "d.tif", tmp_path / "e.tif"], PIX[:2])
    csv = write_csv(tmp_path / "j.csv", [{"FileName_OrigDNA": "d.tif", "FileName_OrigER": "e.tif"}])
    df = load_site_table(csv, channels=("DNA", "ER"))
    assert df.loc[0, "FileName_OrigER"] == str(tmp_path / "e.tif")


def test_partly_empty_channel_names_and_empty_required_values(tmp_path):
    row = jump_row("x")
    row["FileName_OrigER"] = ""
    csv = write_csv(tmp_path / "j.csv", [row, dict(jump_row("x", site=2), Metadata_Plate="")])
    with pytest.raises(DataError) as err:
        load_site_table(csv, required=("plate",), check_files=False)
    assert "empty channel file name" in str(err.value) and "FileName_OrigER" in str(err.value)
    assert "empty 'plate'" in str(err.value) and "line 3" in str(err.value)


def test_same_file_for_two_channels_is_a_duplicate(tmp_path):
    row = jump_row(str(tmp_path), with_path=False)
    row["FileName_OrigER"] = row["FileName_OrigDNA"]
    csv = write_csv(tmp_path / "j.csv", [row])
    with pytest.raises(DataError, match="repeats the same line"):
        load_site_table(csv, check_files=False)


def test_empty_and_unreadable_tables(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_site_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("FileName_Merged,plate\n")
    with pytest.raises(DataError, match="empty table"):
        load_site_table(tmp_path / "header.csv")
    with pytest.raises(DataError, match="not found"):
        load_site_table(tmp_path / "nope.csv")


def test_many_missing_files_are_summarised_with_a_count(tmp_path):
    rows = [paper_row(f"m{i}.tif", well=f"A{i:02d}") for i in range(40)]
    csv = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as err:
        load_site_table(csv)
    msg = str(err.value)
    assert "missing file (40)" in msg and "and 37 more" in msg


def test_find_missing_files_matches_a_stat_per_file(tmp_path):
    for i in range(0, 40, 2):
        (tmp_path / f"f{i}.tif").write_bytes(b"x")
    (tmp_path / "f5.tif").mkdir()  # a folder is not an image file
    paths = [str(tmp_path / f"f{i}.tif") for i in range(40)] + [str(tmp_path / "nodir" / "a.tif")]
    expected = {p for p in paths if not os.path.isfile(p)}
    assert find_missing_files(paths) == expected
    assert str(tmp_path / "f5.tif") in expected


def test_path_forms_resolve_like_os_path_join(tmp_path):
    base = tmp_path / "base"
    (base / "sub").mkdir(parents=True)
    cases = [  # (PathName, FileName)
        ("sub", "a.tif"), ("sub/", "b.tif"), ("./sub/../sub", "c.tif"), (str(base / "sub"), "d.tif"),
        ("", "sub/e.tif"), (None, "./sub/f.tif"), ("ignored", str(base / "sub" / "g.tif")), ("..", "base/sub/h.tif"),
    ]
    rows = []
    for i, (folder, name) in enumerate(cases):
        row = {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": i}
        for ch in ("DNA", "ER"):
            row[f"FileName_Orig{ch}"] = name.replace(".tif", f"_{ch}.tif")
            row[f"PathName_Orig{ch}"] = folder
        rows.append(row)
    csv = write_csv(base / "t.csv", rows)
    df = load_site_table(csv, channels=("DNA", "ER"), check_files=False)
    for i, (folder, name) in enumerate(cases):
        rel = os.path.join(folder, name.replace(".tif", "_ER.tif")) if folder else name.replace(".tif", "_ER.tif")
        assert df.loc[i, "FileName_OrigER"] == os.path.normpath(os.path.join(str(base), rel)), (folder, name)


def test_image_root_must_be_a_folder(tmp_path):
    csv = make_paper_table(tmp_path, n=1)
    with pytest.raises(DataError, match="image root .* is not a folder"):
        load_site_table(csv, image_root=tmp_path / "nowhere")


def test_mixed_layouts_in_one_table(tmp_path):
    write_merged_tiff(tmp_path / "m.tif", PIX, None)
    write_channel_tiffs([tmp_path / f"c_{ch}.tif" for ch in DEFAULT_CHANNELS], PIX)
    row = {f"FileName_Orig{ch}": f"c_{ch}.tif" for ch in DEFAULT_CHANNELS}
    csv = write_csv(tmp_path / "d.csv", [{"FileName_Merged": "m.tif"}, dict(row, FileName_Merged="")])
    df = load_site_table(csv)
    assert df["layout"].tolist() == ["merged", "per-channel"]
    assert pd.isna(df.loc[0, "FileName_OrigDNA"]) and pd.isna(df.loc[1, "FileName_Merged"])
