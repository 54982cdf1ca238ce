"""Site metadata as real plates have it: Gallery / JUMP aliases, --map, plate maps, optional target."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data.metadata import ALIASES, column_pairs, fill_negcon_perturbation, map_metadata
from data.schema import DEFAULT_CHANNELS, INFERENCE_REQUIRED, load_site_table
from utils.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def _load_data(tmp_path: Path, wells=("A01", "A02", "B01"), plates=("P1", "P2"), extra=None) -> Path:
    """A JUMP-style load_data.csv (no perturbation columns) with one merged file name per site."""
    rows = []
    for plate in plates:
        for well in wells:
            for site in (1, 2):
                rows.append({"Metadata_Batch": "B1", "Metadata_Plate": plate, "Metadata_Well": well,
                             "Metadata_Site": site, "FileName_Merged": f"{plate}_{well}_{site}.tif", **(extra or {})})
    path = tmp_path / "load_data.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _platemap(tmp_path: Path, rows: list[dict], name: str = "platemap.csv", sep: str = ",") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False, sep=sep)
    return path


MAP_ROWS = [
    {"Metadata_Well": "A01", "Metadata_broad_sample": "", "Metadata_pert_iname": "DMSO",
     "Metadata_control_type": "negcon"},
    {"Metadata_Well": "A02", "Metadata_broad_sample": "BRD-K1", "Metadata_pert_iname": "drug1",
     "Metadata_control_type": "trt"},
    {"Metadata_Well": "B01", "Metadata_broad_sample": "BRD-K2", "Metadata_pert_iname": "drug2",
     "Metadata_control_type": "trt"},
]


def _load(csv: Path, **kw) -> pd.DataFrame:
    return load_site_table(csv, required=INFERENCE_REQUIRED, check_files=False, **kw)


def test_platemap_on_well_alone_fills_every_plate_and_blank_negcon_is_dmso(tmp_path: Path) -> None:
    table = _load(_load_data(tmp_path), platemap=_platemap(tmp_path, MAP_ROWS))
    assert len(table) == 12
    by_well = table.drop_duplicates("well").set_index("well")
    assert by_well.loc["A01", "perturbation_id"] == "DMSO"  # empty broad_sample in a negcon well
    assert by_well.loc["A02", "perturbation_id"] == "BRD-K1"  # broad_sample wins over pert_iname
    assert by_well.loc["B01", "control_type"] == "trt"
    assert "target" not in table.columns  # optional: nothing invented
    assert (table.groupby("plate").size() == 6).all()


def test_platemap_joins_on_plate_and_well_when_it_has_a_plate(tmp_path: Path) -> None:
    rows = [{**r, "Metadata_Plate": p, "Metadata_broad_sample": f"{r['Metadata_broad_sample']}{p}"}
            for p in ("P1", "P2") for r in MAP_ROWS[1:]]
    rows += [{**MAP_ROWS[0], "Metadata_Plate": p} for p in ("P1", "P2")]
    table = _load(_load_data(tmp_path), platemap=_platemap(tmp_path, rows))
    got = table.set_index(["plate", "well"])["perturbation_id"].groupby(level=[0, 1]).first()
    assert got.loc[("P1", "A02")] == "BRD-K1P1" and got.loc[("P2", "A02")] == "BRD-K1P2"
    assert got.loc[("P2", "A01")] == "DMSO"


def test_platemap_tsv_as_lincs_ships_it(tmp_path: Path) -> None:
    rows = [{"well_position": r["Metadata_Well"], "broad_sample": r["Metadata_broad_sample"] or "DMSO"}
            for r in MAP_ROWS]
    table = _load(_load_data(tmp_path), platemap=_platemap(tmp_path, rows, "C-7161.txt", sep="\t"))
    assert sorted(table["perturbation_id"].unique()) == ["BRD-K1", "BRD-K2", "DMSO"]


def test_wells_missing_from_the_platemap_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"2 well\(s\) of the site table are not in the plate map: P1/B01, P2/B01"):
        _load(_load_data(tmp_path), platemap=_platemap(tmp_path, [{**r, "Metadata_Plate": p} for p in ("P1", "P2")
                                                                 for r in MAP_ROWS[:2]]))


def test_well_spelling_difference_gets_a_hint(tmp_path: Path) -> None:
    rows = [{**r, "Metadata_Well": r["Metadata_Well"].replace("0", "")} for r in MAP_ROWS]
    with pytest.raises(DataError, match="spell wells differently, e.g. A1 and A01"):
        _load(_load_data(tmp_path), platemap=_platemap(tmp_path, rows))


def test_duplicated_wells_and_headers_in_the_platemap_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"platemap.csv: 1 well\(s\) listed more than once: A02"):
        _load(_load_data(tmp_path), platemap=_platemap(tmp_path, [*MAP_ROWS, MAP_ROWS[1]]))
    dup = tmp_path / "dup.csv"
    dup.write_text("Metadata_Well,Metadata_broad_sample,Metadata_broad_sample\nA01,x,y\n")
    with pytest.raises(DataError, match=r"dup.csv: the plate map header lists column\(s\) 'Metadata_broad_sample'"):
        _load(_load_data(tmp_path), platemap=dup)
    nowell = _platemap(tmp_path, [{"Metadata_broad_sample": "x"}], "nowell.csv")
    with pytest.raises(DataError, match="nowell.csv: plate map has no well column"):
        _load(_load_data(tmp_path), platemap=nowell)
    with pytest.raises(DataError, match="missing.csv: plate map not found"):
        _load(_load_data(tmp_path), platemap=tmp_path / "missing.csv")


def test_column_map_renames_in_site_table_and_platemap(tmp_path: Path) -> None:
    rows = [{"Metadata_Well": r["Metadata_Well"], "Compound": r["Metadata_pert_iname"]} for r in MAP_ROWS]
    table = _load(_load_data(tmp_path, extra={"Screen": "S9"}), platemap=_platemap(tmp_path, rows),
                  column_map=(("Compound", "perturbation_id"), ("Screen", "target")))
    assert sorted(table["perturbation_id"].unique()) == ["DMSO", "drug1", "drug2"]
    assert set(table["target"]) == {"S9"}
    with pytest.raises(DataError, match="--map source column 'Nope' not found"):
        _load(_load_data(tmp_path), column_map=(("Nope", "target"),))
    with pytest.raises(DataError, match="would overwrite the existing column 'plate'"):
        _load(_load_data(tmp_path, extra={"plate": "X"}), column_map=(("Metadata_Batch", "plate"),))
    with pytest.raises(ConfigError, match="names the source column 'a' twice"):
        column_pairs([("a", "b"), ("a", "c")])


def test_alias_priority_and_internal_names_win() -> None:
    df = pd.DataFrame({"Metadata_pert_iname": ["name"], "Metadata_broad_sample": ["BRD"],
                       "Metadata_JCP2022": ["JCP"], "Metadata_pert_type": ["trt"], "Metadata_moa": ["moa"]})
    got = map_metadata(df)
    assert got.loc[0, "perturbation_id"] == "JCP"
    assert got.loc[0, "pert_type"] == "trt" and got.loc[0, "target"] == "moa"
    assert map_metadata(df.assign(perturbation_id="mine")).loc[0, "perturbation_id"] == "mine"
    for name in ("Metadata_broad_sample", "Metadata_pert_iname", "Metadata_JCP2022", "Metadata_InChIKey"):
        assert name in ALIASES["perturbation_id"]
    assert "Metadata_control_type" in ALIASES["control_type"] and "Metadata_pert_type" in ALIASES["pert_type"]


def test_only_negcon_wells_with_empty_perturbation_become_dmso() -> None:
    df = pd.DataFrame({"perturbation_id": [np.nan, " ", np.nan, "BRD"],
                       "control_type": ["negcon", "negcon", "trt", "negcon"]})
    got = fill_negcon_perturbation(df)["perturbation_id"].tolist()
    assert got[:2] == ["DMSO", "DMSO"] and pd.isna(got[2]) and got[3] == "BRD"


def test_treated_well_without_perturbation_is_reported(tmp_path: Path) -> None:
    rows = [dict(r) for r in MAP_ROWS]
    rows[1]["Metadata_broad_sample"] = ""
    rows[1]["Metadata_pert_iname"] = ""
    with pytest.raises(DataError, match=r"empty 'perturbation_id' \(4\)"):
        _load(_load_data(tmp_path), platemap=_platemap(tmp_path, rows))


def test_every_site_cli_takes_platemap_and_map() -> None:
    for cmd in (["inference.py"], ["train_dino.py"], ["train_mae.py"], ["train_simclr.py"],
                ["-m", "utils.handcrafted"], ["-m", "data.stats"]):
        out = subprocess.run([sys.executable, *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, check=True)
        assert "--platemap" in out.stdout and "--map SRC=DST" in out.stdout, cmd


def test_remote_image_paths_are_one_line_error(tmp_path: Path) -> None:
    """JUMP's load_data CSVs name s3:// folders: an error saying to download them, not 'file not found'."""
    rows = [{"Metadata_Plate": "P1", "Metadata_Well": "A01", "Metadata_Site": 1,
             **{f"FileName_Orig{ch}": f"r01c01f01p01-ch{i}.tiff" for i, ch in enumerate(DEFAULT_CHANNELS, 1)},
             **{f"PathName_Orig{ch}": "s3://cellpainting-gallery/cpg0016-jump/source_4/images/B1/images/P1/"
                for ch in DEFAULT_CHANNELS}}]
    path = tmp_path / "load_data.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        load_site_table(path)
    msg = str(err.value)
    assert "\n" not in msg and "remote image path" in msg and "s3://cellpainting-gallery" in msg
    assert "aws s3 sync" in msg and str(path) in msg
