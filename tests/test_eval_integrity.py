"""evaluate.py refuses inputs that give wrong numbers: duplicated wells or columns, controls that match nothing, and
representations scored on different wells (compared on the wells they share unless --allow-different-wells)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import evaluate
from utils.cli import run_cli
from utils.errors import DataError
from utils.evaluation import EvalConfig, run_evaluation

N_PERT, N_TARGET, BATCHES, PLATES, DIM = 8, 4, 2, 2, 6
FAST = {"null_size": 50, "replicate_null_size": 20, "progress": False, "figures": False}


def _frame(seed: int = 0, noise: float = 0.8) -> pd.DataFrame:
    """Small plates: every perturbation once per plate plus 2 DMSO wells, with target and batch signal."""
    rng = np.random.default_rng(seed)
    target_sig, pert_sig = rng.normal(size=(N_TARGET, DIM)), rng.normal(size=(N_PERT, DIM)) * 0.8
    rows, feats = [], []
    for b in range(BATCHES):
        for p in range(PLATES):
            for i in range(N_PERT + 2):
                pid = f"P{i:02d}" if i < N_PERT else "DMSO"
                rows.append({"batch": f"B{b}", "plate": f"B{b}_p{p}", "well": f"A{i:02d}", "perturbation_id": pid,
                             "target": f"T{i % N_TARGET}" if i < N_PERT else "control"})
                base = target_sig[i % N_TARGET] + pert_sig[i] if i < N_PERT else np.zeros(DIM)
                feats.append(base + noise * rng.normal(size=DIM))
    return pd.concat([pd.DataFrame(rows), pd.DataFrame(np.array(feats), columns=[f"emb{i}" for i in range(DIM)])],
                     axis=1)


def _write(root: Path, name: str, df: pd.DataFrame) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / name / "well_features.csv"
    df.to_csv(path, index=False)
    return path


def _evaluate(root: Path, out: Path, **kw: object) -> pd.DataFrame:
    """The production entry point (run_evaluation), returning well_metrics.csv indexed by representation."""
    run_evaluation(EvalConfig(input_dir=root, out_dir=out, **FAST, **kw))
    return pd.read_csv(out / "well_metrics.csv").set_index("label")


SCORES = ["pert_acc", "pert_acc_NSB", "target_acc_NSP", "replicate_mAP", "target_mAP", "batch_bal_acc"]


def test_duplicated_well_rows_are_an_error_not_inflated_accuracy(tmp_path: Path) -> None:
    df = _frame()
    _write(tmp_path / "in", "DINO", pd.concat([df, df.iloc[:5]], ignore_index=True))
    with pytest.raises(DataError) as info:
        _evaluate(tmp_path / "in", tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and "well_features.csv" in msg and "5 duplicated (plate, well) row(s)" in msg
    assert "B0_p0/A00" in msg
    assert not (tmp_path / "out" / "well_metrics.csv").exists()


@pytest.mark.parametrize("column", ["emb2", "perturbation_id"])
def test_duplicated_header_columns_are_named(tmp_path: Path, column: str) -> None:
    path = _write(tmp_path, "DINO", _frame())
    header, body = path.read_text().split("\n", 1)
    path.write_text(f"{header},{column}\n" + "\n".join(f"{line},0" for line in body.splitlines()) + "\n")
    assert column + ".1" in pd.read_csv(path).columns  # what pandas would have scored without a word
    with pytest.raises(DataError, match=rf"well_features.csv: the well table header lists column\(s\) '{column}' more"):
        _evaluate(tmp_path, tmp_path / "out")


def test_duplicated_parquet_columns_are_named(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    df = _frame()
    table = pa.table([pa.array(df[c]) for c in df.columns] + [pa.array(df["emb0"])], names=[*df.columns, "emb0"])
    (tmp_path / "DINO").mkdir()
    pq.write_table(table, tmp_path / "DINO" / "well_features.parquet")
    with pytest.raises(DataError, match=r"well_features.parquet: the well table header lists column\(s\) 'emb0' more"):
        _evaluate(tmp_path, tmp_path / "out")


def test_different_well_sets_are_compared_on_their_intersection(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    full, other = _frame(0), _frame(1, noise=1.2)
    short = other[other["plate"] != "B1_p1"]  # 30 of 40 wells: one plate missing
    _write(tmp_path / "two", "A", full)
    _write(tmp_path / "two", "B", short)
    well = _evaluate(tmp_path / "two", tmp_path / "out")
    err = capsys.readouterr().err
    assert "evaluate: comparing 2 representations on the 30 wells they share (A lost 10, B lost 0)" in err
    assert well.loc["A", "n_wells_input"] == 40 and well.loc["A", "n_wells_dropped_to_common"] == 10
    assert well.loc["B", "n_wells_input"] == 30 and well.loc["B", "n_wells_dropped_to_common"] == 0
    assert well.loc["A", "n_wells"] == well.loc["B", "n_wells"] == 3 * N_PERT
    # A's numbers are exactly those of A alone on the shared wells
    _write(tmp_path / "alone", "A", full[full["plate"] != "B1_p1"])
    alone = _evaluate(tmp_path / "alone", tmp_path / "out_alone")
    pd.testing.assert_series_equal(well.loc["A", SCORES], alone.loc["A", SCORES])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "n_wells_dropped_to_common" in summary and "compared on the 30 (plate, well) keys" in summary

    # --allow-different-wells: the old numbers (A on its own 40 wells), with a warning naming the counts
    _write(tmp_path / "full", "A", full)
    own = _evaluate(tmp_path / "full", tmp_path / "out_full")
    with pytest.warns(UserWarning, match=r"different wells \(A 40, B 30; 30 shared\)"):
        allowed = _evaluate(tmp_path / "two", tmp_path / "out_allow", allow_different_wells=True)
    pd.testing.assert_series_equal(allowed.loc["A", SCORES], own.loc["A", SCORES])
    assert allowed.loc["A", "n_wells_dropped_to_common"] == 0 and allowed.loc["A", "n_wells"] == 4 * N_PERT


def test_no_shared_wells_is_an_error_naming_the_representations(tmp_path: Path) -> None:
    a, b = _frame(0), _frame(1)
    b["plate"] = "other_" + b["plate"]
    _write(tmp_path / "in", "A", a)
    _write(tmp_path / "in", "B", b)
    with pytest.raises(DataError, match=r"no \(plate, well\) is shared by all representations \(A 40, B 40 wells"):
        _evaluate(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the output folder is made
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        well = _evaluate(tmp_path / "in", tmp_path / "out", allow_different_wells=True)
    assert list(well["n_wells_input"]) == [40, 40]


def test_controls_that_match_no_well_are_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "DINO", _frame())
    with pytest.raises(DataError) as info:
        _evaluate(tmp_path, tmp_path / "out", controls=("DMS0",))
    msg = str(info.value)
    assert "--controls DMS0 match(es) no well's perturbation_id" in msg and "DMSO" in msg and "\n" not in msg
    # a misspelt id next to negcon wells used to give the default's numbers silently
    df = _frame()
    df["control_type"] = np.where(df["perturbation_id"] == "DMSO", "negcon", "trt")
    _write(tmp_path / "negcon", "DINO", df)
    with pytest.raises(DataError, match="--controls EMPTY match"):
        _evaluate(tmp_path / "negcon", tmp_path / "out", controls=("EMPTY",))


def test_default_controls_may_be_absent_when_control_type_marks_negcon(tmp_path: Path) -> None:
    df = _frame()
    df["control_type"] = np.where(df["perturbation_id"] == "DMSO", "negcon", "trt")
    df["perturbation_id"] = df["perturbation_id"].str.replace("DMSO", "EMPTY_VECTOR")
    _write(tmp_path, "DINO", df)
    assert _evaluate(tmp_path, tmp_path / "out").loc["DINO", "n_wells"] == 4 * N_PERT
    _write(tmp_path / "plain", "DINO", df.drop(columns=["control_type"]))
    with pytest.raises(DataError, match="--controls DMSO match"):  # no negcon annotation: DMSO selects nothing
        _evaluate(tmp_path / "plain", tmp_path / "out2")


def test_cli_duplicated_wells_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    df = _frame()
    _write(tmp_path / "set", "DINO", pd.concat([df, df], ignore_index=True))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: evaluate.main(["-b", str(tmp_path), "-i", "set", "--no-progress", "--no-figures"]))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert info.value.code == 2 and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    assert "40 duplicated (plate, well) row(s) over 40 well(s)" in err[-1]


def test_allow_different_wells_flag_reaches_the_config() -> None:
    assert evaluate.parse_args(["-i", "x", "--allow_different_wells"]).allow_different_wells
    assert not evaluate.parse_args(["-i", "x"]).allow_different_wells
