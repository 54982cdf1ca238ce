"""Correction steps and chains against independent references: brute-force loops, lstsq, pycytominer, sklearn."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pycytominer import feature_select, normalize
from scipy.stats import norm
from sklearn.metrics import silhouette_score

from utils.errors import ConfigError, DataError
from utils.evaluation import EvalConfig, run_evaluation
from utils.handcrafted import HandcraftedConfig
from utils.inference import InferenceConfig
from utils.profiles import chain_name, normalize_profiles, parse_chain
from utils.profiles.chain import ChainContext, apply_chain, make_step
from utils.profiles.correct import CorrectConfig, correct_profiles
from utils.profiles.corrections import (
    harmony,
    outlier_features,
    rank_inverse_normal,
    row_column_effects,
    well_position_effects,
    well_row_column,
)

ROOT = Path(__file__).resolve().parents[1]
DMSO = "perturbation_id == 'DMSO'"
ROWS = "ABCDEFGH"


def _plates(n_plates: int = 6, n_batches: int = 2, dim: int = 8, seed: int = 0, batch_shift: float = 3.0,
            prefix: str = "emb") -> pd.DataFrame:
    """96-well plates sharing one layout: DMSO in column 1 and 12, four compounds of two targets elsewhere, a
    per-batch shift, an edge effect by position and a row gradient."""
    rng = np.random.default_rng(seed)
    targets = {f"c{k}": f"t{k % 2}" for k in range(4)}
    directions = {t: rng.normal(size=dim) * 2 for t in ("t0", "t1")}
    batch_dirs = [rng.normal(size=dim) * batch_shift for _ in range(n_batches)]
    rows, values = [], []
    for p in range(n_plates):
        b = p % n_batches
        for r in range(8):
            for c in range(12):
                well = f"{ROWS[r]}{c + 1:02d}"
                pert = "DMSO" if c in (0, 11) else f"c{(r + c) % 4}"
                v = rng.normal(size=dim) + batch_dirs[b] + 0.3 * r
                if pert != "DMSO":
                    v += directions[targets[pert]]
                if r in (0, 7):
                    v += 1.5
                rows.append({"batch": f"b{b}", "plate": f"p{p}", "well": well, "perturbation_id": pert,
                             "target": targets.get(pert, "DMSO")})
                values.append(v)
    feats = [f"{prefix}{i}" for i in range(dim)]
    return pd.concat([pd.DataFrame(rows), pd.DataFrame(np.array(values), columns=feats)], axis=1)


def _feats(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith(("emb", "Cells_"))]


def _meta(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in _feats(df)]


# --- pure corrections ---------------------------------------------------------------------------------------


def test_well_names_parse_to_rows_and_columns() -> None:
    rows, cols = well_row_column(pd.Series(["A01", "b2", "P24", "AA03", "r02c11"]))
    assert rows.tolist() == [0, 1, 15, 26, 1]
    assert cols.tolist() == [0, 1, 23, 2, 10]
    for bad in ("W00", "well 7", "A"):
        with pytest.raises(DataError, match=f"well {bad!r} is not a plate position"):
            well_row_column(pd.Series(["A01", bad]))


def test_well_position_effects_equal_a_brute_force_loop() -> None:
    rng = np.random.default_rng(1)
    positions = rng.integers(0, 10, size=200)
    x = rng.normal(size=(200, 3)) + positions[:, None] * 0.5
    reference = rng.random(200) < 0.6
    effect, left = well_position_effects(x, positions, reference, min_wells=3)
    grand = x[reference].mean(axis=0)
    expected = np.zeros_like(x)
    n_left = 0
    for p in np.unique(positions):
        ref_p = reference & (positions == p)
        if ref_p.sum() >= 3:
            expected[positions == p] = x[ref_p].mean(axis=0) - grand
        else:
            n_left += 1
    np.testing.assert_allclose(effect, expected, atol=1e-12)
    assert left == n_left


def test_well_position_on_all_wells_is_jumps_subtraction_up_to_a_constant() -> None:
    df = _plates(n_plates=6)
    feats = _feats(df)
    steps = [make_step("well_position")]
    out = apply_chain(df, feats, _meta(df), steps, ChainContext(DMSO, variance_threshold=0.0)).profiles
    jump = df[feats] - df.groupby("well")[feats].transform("mean")  # jump-profiling-recipe's wellpos
    diff = out[feats].to_numpy() - jump.to_numpy()
    np.testing.assert_allclose(diff, np.broadcast_to(diff[0], diff.shape), atol=1e-9)


def test_well_position_refuses_a_single_plate() -> None:
    df = _plates(n_plates=1, n_batches=1)
    with pytest.raises(DataError, match="no well position has 3 or more reference wells.*row_column"):
        normalize_profiles(df, _feats(df), _meta(df), "well_position", DMSO)


@pytest.mark.parametrize("balanced", [True, False])
def test_row_column_effects_equal_least_squares(balanced: bool) -> None:
    rng = np.random.default_rng(2)
    r, c = np.divmod(np.arange(96), 12)
    x = rng.normal(size=(96, 4)) + r[:, None] * 0.4 - (c[:, None] - 5) ** 2 * 0.05
    reference = np.ones(96, bool) if balanced else rng.random(96) < 0.5
    effect = row_column_effects(x, r, c, reference)
    rr, cc = r[reference], c[reference]
    design = np.column_stack([np.ones(reference.sum()), np.eye(8)[rr], np.eye(12)[cc]])
    coef, *_ = np.linalg.lstsq(design, x[reference], rcond=None)
    fitted = design @ coef
    np.testing.assert_allclose(effect[reference], fitted - fitted.mean(axis=0), atol=1e-7)


def _rank_int_loop(x: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        for i in range(x.shape[0]):
            pool = list(x[:, j]) if reference is None else list(x[reference, j]) + ([] if reference[i] else [x[i, j]])
            below = sum(v < x[i, j] for v in pool)
            ties = sum(v == x[i, j] for v in pool)
            rank = below + (ties + 1) / 2
            out[i, j] = norm.ppf((rank - 3 / 8) / (len(pool) + 1 / 4))
    return out


def test_rank_inverse_normal_equals_a_brute_force_loop_with_ties() -> None:
    rng = np.random.default_rng(3)
    x = np.round(rng.normal(size=(40, 3)), 1)  # rounding makes ties
    np.testing.assert_allclose(rank_inverse_normal(x), _rank_int_loop(x, None), atol=1e-12)
    ref = rng.random(40) < 0.4
    np.testing.assert_allclose(rank_inverse_normal(x, ref), _rank_int_loop(x, ref), atol=1e-12)


def test_outlier_rule_is_the_99th_percentile_of_abs() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 4))
    x[:10, 1] = 1e4  # 3% of wells: above the 99th percentile
    x[0, 2] = 1e4  # one well: below it, so kept and clipped
    assert outlier_features(x).tolist() == [False, True, False, False]
    df = pd.DataFrame(x, columns=[f"emb{i}" for i in range(4)]).assign(perturbation_id="DMSO", plate="p")
    rec: list[dict] = []
    out, kept = normalize_profiles(df, [f"emb{i}" for i in range(4)], ["perturbation_id", "plate"], "outlier", DMSO,
                                   records=rec)
    assert kept == ["emb0", "emb2", "emb3"] and out["emb2"].max() == 100.0
    assert rec[0]["dropped_features"] == 1 and rec[0]["clipped_values"] == 1


def test_harmony_removes_a_batch_shift_and_keeps_targets() -> None:
    df = _plates(n_plates=8, n_batches=4, batch_shift=4.0)
    feats = _feats(df)
    x = df[feats].to_numpy()
    z = harmony(x, df["batch"], seed=0)
    assert z.shape == x.shape
    np.testing.assert_array_equal(z, harmony(x, df["batch"], seed=0))  # seeded
    trt = (df["perturbation_id"] != "DMSO").to_numpy()
    assert silhouette_score(z, df["batch"]) < silhouette_score(x, df["batch"]) - 0.2
    assert silhouette_score(z[trt], df["target"][trt]) > silhouette_score(x[trt], df["target"][trt])
    with pytest.raises(DataError, match="single value"):
        harmony(x, pd.Series("b", index=df.index, name="batch"))


# --- chains ---------------------------------------------------------------------------------------------------


def test_chain_names_parse_to_registered_steps() -> None:
    assert [s.name for s in parse_chain("spherize_mad_robustize")] == ["spherize", "mad_robustize"]
    steps = parse_chain("mad_robustize_spherize_harmony")
    assert [s.name for s in steps] == ["mad_robustize", "spherize", "harmony"]
    jump = parse_chain("jump_harmony")
    assert [s.name for s in jump] == ["well_position", "mad_robustize", "outlier", "feature_select", "spherize",
                                      "harmony"]
    assert jump[1].fit_on == "controls"
    assert chain_name(parse_chain("rank_int@controls_row_column")) == "rank_int@controls_row_column"
    assert parse_chain("none") == [] and chain_name([]) == "no_post_proc"
    for bad, message in (("zscore", "'zscore' starts no known step"), ("harmony@controls", "transductive"),
                         ("well_position@everything", "cannot be fitted on 'everything'")):
        with pytest.raises(ConfigError, match=message):
            parse_chain(bad)


def test_chain_files_in_json_and_toml(tmp_path: Path) -> None:
    spec = {"steps": ["mad_robustize@controls", {"name": "feature_select", "operations": ["variance_threshold"]},
                      {"name": "harmony", "batch_key": "plate", "nclust": 4}]}
    (tmp_path / "c.json").write_text(json.dumps(spec))
    (tmp_path / "c.toml").write_text('steps = ["mad_robustize@controls", '
                                     '{name = "feature_select", operations = ["variance_threshold"]}, '
                                     '{name = "harmony", batch_key = "plate", nclust = 4}]\n')
    a, b = parse_chain(str(tmp_path / "c.json")), parse_chain(str(tmp_path / "c.toml"))
    assert a == b and a[2].param("batch_key") == "plate" and a[0].fit_on == "controls"
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "harmony", "bogus": 1}]))
    with pytest.raises(ConfigError, match="bad.json: step 1: step 'harmony' has no setting 'bogus'"):
        parse_chain(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="chain file not found"):
        parse_chain(str(tmp_path / "missing.toml"))


def test_paper_chain_still_equals_chained_pycytominer() -> None:
    df = _plates(n_plates=2, n_batches=1, dim=5)
    feats, meta = _feats(df), _meta(df)
    out, kept = normalize_profiles(df, feats, meta, "mad_robustize_standardize", DMSO)
    ref = pd.concat([normalize(profiles=g, features=feats, meta_features=meta, samples="all", method="mad_robustize")
                     for _, g in df.groupby("plate", sort=False)]).loc[df.index]
    ref = pd.concat([normalize(profiles=g, features=feats, meta_features=meta, samples=DMSO, method="standardize")
                     for _, g in ref.groupby("plate", sort=False)]).loc[df.index]
    np.testing.assert_allclose(out[kept].to_numpy(), ref[feats].to_numpy(), atol=1e-9)


def test_feature_select_step_equals_pycytominer_and_skips_the_blocklist_on_embeddings() -> None:
    df = _plates(n_plates=2, n_batches=1, dim=6)
    feats = _feats(df)
    df["emb5"] = df["emb4"] * 2 + 1e-3 * np.random.default_rng(0).normal(size=len(df))  # correlated: dropped
    rec: list[dict] = []
    out, kept = normalize_profiles(df, feats, _meta(df), "feature_select", DMSO, records=rec)
    ref = feature_select(profiles=df, features=feats, samples="all",
                         operation=["variance_threshold", "correlation_threshold", "drop_na_columns"])
    assert kept == [f for f in feats if f in ref.columns] and "emb5" not in kept
    assert rec[0]["skipped_operations"] == ["blocklist"]


def test_each_step_is_fitted_where_asked_and_recorded() -> None:
    df = _plates(n_plates=2, n_batches=1)
    rec: list[dict] = []
    normalize_profiles(df, _feats(df), _meta(df), "rank_int@controls_standardize", DMSO, records=rec)
    assert [(r["step"], r["fit_on"], r["fitted_on"]) for r in rec] == [
        ("rank_int", "controls", DMSO), ("standardize", "controls", DMSO)]
    assert rec[0]["scope"] == "global" and rec[1]["scope"] == "plate"


def test_inference_and_handcrafted_configs_accept_chains(tmp_path: Path) -> None:
    ckpt = tmp_path / "c.pth"
    ckpt.write_bytes(b"")
    cfg = InferenceConfig(ckpt=str(ckpt), outdir="o", norm_method="jump_harmony", batch_key="plate")
    assert cfg.methods == ["jump_harmony"]
    with pytest.raises(ConfigError, match="'zscore' starts no known step"):
        InferenceConfig(ckpt=str(ckpt), outdir="o", norm_method="mad_robustize_zscore")
    assert HandcraftedConfig(valset="v", output_dir="o", norm_method="mad_robustize_spherize_harmony").norm_method \
        == "mad_robustize_spherize_harmony"


# --- python -m utils.profiles -----------------------------------------------------------------------------------


def test_cli_corrects_the_papers_released_layout_and_evaluate_reads_it(tmp_path: Path) -> None:
    df = _plates(n_plates=8, n_batches=4, dim=12)
    paper = df[["batch", "plate", "well", "perturbation_id", "target", *_feats(df)]]  # the paper's column order
    src = tmp_path / "DINO" / "well_features.csv"
    src.parent.mkdir()
    paper.to_csv(src, index=False)
    out = tmp_path / "emb" / "DINO_harmony"
    proc = subprocess.run([sys.executable, "-m", "utils.profiles", "-i", str(src), "-o", str(out),
                           "--norm_method", "mad_robustize_spherize_harmony", "--batch-key", "batch"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "profiles: 768 wells (128 controls)" in proc.stdout
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and [s["step"] for s in run["steps"]] == ["mad_robustize", "spherize",
                                                                                  "harmony"]
    corrected = pd.read_csv(out / "well_features.csv")
    assert list(corrected.columns[:5]) == ["batch", "plate", "well", "perturbation_id", "target"]
    x = corrected[_feats(corrected)].to_numpy()
    assert silhouette_score(x, corrected["batch"]) < silhouette_score(paper[_feats(paper)], paper["batch"])
    (tmp_path / "emb" / "DINO").mkdir()
    paper.to_csv(tmp_path / "emb" / "DINO" / "well_features.csv", index=False)
    run_evaluation(EvalConfig(input_dir=tmp_path / "emb", out_dir=tmp_path / "eval", figures=False,
                              null_size=200, progress=False))
    metrics = pd.read_csv(tmp_path / "eval" / "well_metrics.csv").set_index("label")
    assert set(metrics.index) == {"DINO", "DINO_harmony"}
    assert metrics.loc["DINO_harmony", "batch_bal_acc"] < metrics.loc["DINO", "batch_bal_acc"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.profiles", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    df = _plates(n_plates=2, n_batches=1, dim=4)
    src = tmp_path / "w.csv"
    df.to_csv(src, index=False)
    cases = [
        (["-i", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o"), "--norm_method", "standardize"], "no such file"),
        (["-i", str(src), "-o", str(tmp_path / "o"), "--norm_method", "zscore"], "'zscore' starts no known step"),
        (["-i", str(src), "-o", str(tmp_path / "o"), "--norm_method", "harmony", "--batch-key", "source"],
         "batch key column 'source' not found"),
        (["-i", str(src), "-o", str(tmp_path / "o"), "--norm_method", "standardize", "--control-query",
          "perturbation_id == 'none'"], "no control wells match"),
    ]
    for argv, message in cases:
        proc = _cli(*argv)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "run.json").exists()
    bad = df.copy()
    bad.loc[3, "emb2"] = np.nan
    bad.to_csv(tmp_path / "nan.csv", index=False)
    proc = _cli("-i", str(tmp_path / "nan.csv"), "-o", str(tmp_path / "o2"), "--norm_method", "standardize")
    assert proc.returncode == 2 and "first in column emb2 at CSV row 5" in proc.stderr
    same = tmp_path / "well_features.csv"
    same.write_bytes(src.read_bytes())
    with pytest.raises(ConfigError, match="would overwrite the input"):
        CorrectConfig(input=str(same), outdir=str(tmp_path), norm_method="standardize")


def test_cellprofiler_profiles_with_jump_metadata_names(tmp_path: Path) -> None:
    df = _plates(n_plates=6, n_batches=2, dim=6, prefix="Cells_AreaShape_F")
    renamed = df.rename(columns={"plate": "Metadata_Plate", "well": "Metadata_Well", "batch": "Metadata_Batch",
                                 "perturbation_id": "Metadata_broad_sample"})
    renamed.to_parquet(tmp_path / "cp.parquet")
    run = correct_profiles(CorrectConfig(input=str(tmp_path / "cp.parquet"), outdir=str(tmp_path / "out"),
                                         norm_method="well_position_mad_robustize@controls_rank_int"))
    assert run["feature_kind"] == "CellProfiler" and run["n_controls"] == 96
    out = pd.read_csv(tmp_path / "out" / "well_features.csv")
    assert {"Metadata_Plate", "plate", "well"} <= set(out.columns)
