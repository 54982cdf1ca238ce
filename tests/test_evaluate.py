"""evaluate.py end to end on a folder laid out like the paper's release, plus every bad-input message."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import evaluate
from utils.cli import run_cli
from utils.errors import ConfigError, DataError
from utils.evaluation import EvalConfig, discover_representations, load_representation, plots
from utils.profiles.features import detect_features

N_PERT, N_TARGET, BATCHES, PLATES = 16, 4, 3, 2


def _wells(seed: int = 0, dim: int = 12, noise: float = 0.5) -> tuple[pd.DataFrame, np.ndarray]:
    """Plates with a fixed layout: every perturbation once per plate, 4 DMSO wells, target + batch signal."""
    rng = np.random.default_rng(seed)
    target_sig = rng.normal(size=(N_TARGET, dim))
    pert_sig = rng.normal(size=(N_PERT, dim)) * 0.8
    batch_sig = rng.normal(size=(BATCHES, dim)) * 0.5
    rows, feats = [], []
    for b in range(BATCHES):
        for p in range(PLATES):
            for i in range(N_PERT + 4):
                pid = f"P{i:02d}" if i < N_PERT else "DMSO"
                tgt = f"T{i % N_TARGET}" if i < N_PERT else "control"
                well = f"A{i:02d}" if i < N_PERT else f"H{i:02d}"
                rows.append({"batch": f"B{b}", "plate": f"B{b}_p{p}", "well": well, "perturbation_id": pid,
                             "target": tgt})
                base = target_sig[i % N_TARGET] + pert_sig[i] if i < N_PERT else np.zeros(dim)
                feats.append(base + batch_sig[b] + noise * rng.normal(size=dim))
    return pd.DataFrame(rows), np.array(feats)


def _write_release(root: Path) -> Path:
    """embeddings/<set>/{DINO,MAE,CellProfiler,figures}: non-padded emb, padded emb, CellProfiler names."""
    d = root / "embeddings" / "singlesource"
    meta, x = _wells(0)
    dino = pd.concat([meta, pd.DataFrame(x, columns=[f"emb{i}" for i in range(x.shape[1])])], axis=1)
    (d / "DINO").mkdir(parents=True)
    dino.to_csv(d / "DINO" / "well_features.csv")  # with the pandas index column, as the paper's inference writes
    meta2, x2 = _wells(1, dim=8, noise=1.5)
    mae = pd.concat([meta2, pd.DataFrame(x2, columns=[f"emb_{i:04d}" for i in range(8)])], axis=1)
    (d / "MAE-ViT-S").mkdir()
    mae.to_csv(d / "MAE-ViT-S" / "well_features.csv", index=False)
    meta3, x3 = _wells(2, dim=9)
    names = [f"{c}_AreaShape_{i}" for c in ("Cells", "Cytoplasm", "Nuclei") for i in range(3)]
    cp = pd.concat([meta3.assign(Metadata_Plate=meta3["plate"]), pd.DataFrame(x3, columns=names)], axis=1)
    (d / "CellProfiler").mkdir()
    cp.to_csv(d / "CellProfiler" / "well_features.csv", index=False)
    (d / "figures").mkdir()
    (d / "figures" / "old.png").write_bytes(b"not a folder to evaluate")
    return d


def _run(argv: list[str]) -> None:
    assert evaluate.main(argv + ["--null-size", "200", "--replicate-null-size", "100", "--no-progress"]) == 0


def test_paper_release_layout_end_to_end(tmp_path: Path) -> None:
    d = _write_release(tmp_path)
    _run(["-b", str(tmp_path / "embeddings"), "-i", "singlesource"])
    well = pd.read_csv(d / "well_metrics.csv")
    assert list(well.columns[:7]) == ["label", "pert_acc", "pert_acc_NSB", "target_acc_NSP", "target_acc_NSBP",
                                      "repl_corr", "percent_95"]
    assert sorted(well["label"]) == ["CellProfiler", "DINO", "MAE-ViT-S"]
    assert set(well["feature_set"]) == {"embedding", "CellProfiler"}
    dino = well.set_index("label").loc["DINO"]
    assert dino["pert_acc"] > 0.8 and dino["target_acc_NSP"] > 0.6 and dino["replicate_fraction_retrieved"] > 0.5
    assert dino["n_features"] == 12 and dino["n_wells"] == N_PERT * BATCHES * PLATES
    num = well.select_dtypes("number").drop(columns=["n_features", "n_wells", "n_perturbations", "n_wells_input",
                                                     "n_wells_dropped_to_common"])
    assert ((num.fillna(0) >= -1) & (num.fillna(0) <= 1)).all(axis=None)
    k = pd.read_csv(d / "pert_prec_recall_k.csv")
    assert list(k.columns[:10]) == ["k", "avg_precision_micro", "avg_recall_micro", "avg_f1_micro",
                                    "avg_precision_macro", "avg_recall_macro", "avg_f1_macro", "mean_prec_R",
                                    "AUCPR_k", "label"]
    cor = pd.read_csv(d / "target_prec_recall_cor.csv")
    assert list(cor.columns[:12]) == ["d", "avg_precision_micro", "avg_recall_micro", "avg_f1_micro",
                                      "avg_precision_macro", "avg_recall_macro", "avg_f1_macro", "mAP", "mAP_k",
                                      "AUCPR_dist", "label", "n_queries_with_positives"]
    assert len(cor) == 34 * 3
    maps = pd.read_csv(d / "map_results.csv")
    assert set(maps["task"]) == {"replicate", "target"}
    assert set(maps[maps["task"] == "replicate"]["group"]) == {f"P{i:02d}" for i in range(N_PERT)}
    summary = (d / "summary.md").read_text()
    assert summary.count("| DINO |") == 1 and "CellProfiler" in summary
    for stem in ("pert_metrics_plot", "target_metrics_plot", "pert_pr_curves", "target_pr_curves",
                 "map_replicate", "map_target", "consensus_pca_target"):
        for ext in ("png", "pdf"):
            assert (d / "figures" / f"{stem}.{ext}").stat().st_size > 1000, stem
    assert not list(d.rglob(".*.tmp"))


def test_nsp_mode_well_position_differs_when_layout_is_not_fixed(tmp_path: Path) -> None:
    d = _write_release(tmp_path)
    for sub in ("MAE-ViT-S", "CellProfiler"):
        shutil.rmtree(d / sub)
    path = d / "DINO" / "well_features.csv"
    df = pd.read_csv(path, index_col=0)
    df = df.drop(columns=["plate"])  # one position per plate would repeat (plate, well), an error now
    df["well"] = "A01"  # every well at one position: the paper's NSP excludes everything
    df.to_csv(path)
    _run(["-b", str(tmp_path / "embeddings"), "-i", "singlesource", "--out", str(tmp_path / "a"), "--no-figures"])
    _run(["-b", str(tmp_path / "embeddings"), "-i", "singlesource", "--out", str(tmp_path / "b"),
          "--nsp-mode", "well_position", "--no-figures"])
    assert not (tmp_path / "b" / "figures").exists()
    by_id = pd.read_csv(tmp_path / "a" / "well_metrics.csv").iloc[0]
    by_pos = pd.read_csv(tmp_path / "b" / "well_metrics.csv").iloc[0]
    assert by_id["target_acc_NSP"] > 0.5
    assert np.isnan(by_pos["target_acc_NSP"]) and "target_acc_NSP" in by_pos["notes"]


def _cfg(tmp_path: Path, **kw) -> EvalConfig:
    return EvalConfig(input_dir=tmp_path, out_dir=tmp_path, progress=False, **kw)


def _write(tmp_path: Path, df: pd.DataFrame, name: str = "rep") -> Path:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    path = tmp_path / name / "well_features.csv"
    df.to_csv(path, index=False)
    return path


def _frame() -> pd.DataFrame:
    meta, x = _wells(0, dim=4)
    return pd.concat([meta, pd.DataFrame(x, columns=[f"emb{i}" for i in range(4)])], axis=1)


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, _frame().drop(columns=["batch"]))
    with pytest.raises(DataError, match=r"well_features.csv: missing required column\(s\) batch"):
        load_representation("rep", path, _cfg(tmp_path))
    with pytest.raises(DataError, match=r"column\(s\) control_type \("):  # the label (gene_group) is optional
        load_representation("rep", _write(tmp_path, _frame()), _cfg(tmp_path, orf=True))


def test_nan_and_inf_features_are_rejected_with_column_and_row(tmp_path: Path) -> None:
    df = _frame()
    df.loc[5, "emb2"] = np.inf
    with pytest.raises(DataError, match="column emb2 at CSV row 7"):
        load_representation("rep", _write(tmp_path, df), _cfg(tmp_path))


def test_mixed_feature_sets_and_missing_features_are_rejected() -> None:
    with pytest.raises(DataError, match="folder_x: mixed feature sets"):
        detect_features(["emb0", "Cells_Area", "perturbation_id"], "folder_x")
    with pytest.raises(DataError, match="no feature columns"):
        detect_features(["perturbation_id", "Image_Count"], "folder_x")
    feats, kind = detect_features(["Metadata_Cells_x", "Cells_a", "Nuclei_b", "Image_c", "Cytoplasm_Metadata"], "f")
    assert (feats, kind) == (["Cells_a", "Nuclei_b"], "CellProfiler")
    assert detect_features(["emb_0001", "emb12", "embedding", "emb_x"], "f") == (["emb_0001", "emb12"], "embedding")


def test_folder_without_well_features_is_named(tmp_path: Path) -> None:
    _write(tmp_path, _frame(), "DINO")
    (tmp_path / "MAE").mkdir()
    (tmp_path / "figures").mkdir()
    with pytest.raises(DataError, match="MAE: no well_features.csv"):
        discover_representations(tmp_path)
    (tmp_path / "MAE").rmdir()
    assert [n for n, _ in discover_representations(tmp_path)] == ["DINO"]
    (tmp_path / "SimCLR").mkdir()
    _frame().to_parquet(tmp_path / "SimCLR" / "well_features.parquet", index=False)
    found = dict(discover_representations(tmp_path))
    rep = load_representation("SimCLR", found["SimCLR"], _cfg(tmp_path))
    assert rep.x.shape == (len(_frame()), 4)


def test_single_member_labels_get_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    df = _frame().drop_duplicates("perturbation_id")
    _write(tmp_path, df, "DINO")
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: evaluate.main(["-b", str(tmp_path.parent), "-i", tmp_path.name, "--no-progress"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "every perturbation_id has a single well" in err[-1]


def test_cellprofiler_metadata_names_load_through_map(tmp_path: Path) -> None:
    df = _frame().rename(columns={"perturbation_id": "Metadata_broad_sample", "well": "Metadata_Well",
                                  "batch": "Metadata_Batch_Number"})
    path = _write(tmp_path, df)
    with pytest.raises(DataError, match="missing required column"):
        load_representation("rep", path, _cfg(tmp_path))
    rep = load_representation("rep", path, _cfg(tmp_path, metadata_preset="pycytominer",
                                                 column_map={"Metadata_Batch_Number": "batch"}))
    assert rep.meta["perturbation_id"].iloc[0] == df["Metadata_broad_sample"].iloc[0]
    with pytest.raises(DataError, match="would overwrite the existing column 'target'"):
        load_representation("rep", path, _cfg(tmp_path, column_map={"Metadata_Well": "target"}))


def test_representation_colours_are_stable_and_distinct() -> None:
    names = [f"rep{i}" for i in range(15)] + ["DINO", "CellProfiler"]
    full = plots.representation_colors(names)
    assert len(set(full.values())) == len(names)
    assert full["DINO"] == plots.PALETTE[0] and full["CellProfiler"] == plots.PALETTE[3]
    for subset in (names[:3], names[5:9], ["rep7", "DINO"]):
        sub = plots.representation_colors(subset)
        assert len(set(sub.values())) == len(subset)
        home = {n: plots.RESERVED.get(n, plots._stable_slot(n)) for n in subset}
        for n in subset:
            if home[n] not in {home[o] for o in subset if o != n}:
                assert sub[n] == plots.PALETTE[home[n]]
    assert plots.representation_colors(["x", "y"]) == plots.representation_colors(["y", "x"])


def test_orf_uses_gene_group_and_negcon_controls(tmp_path: Path) -> None:
    df = _frame()
    df["gene_group"] = df["target"]
    df["control_type"] = np.where(df["perturbation_id"] == "DMSO", "negcon", "trt")
    df["perturbation_id"] = df["perturbation_id"].str.replace("DMSO", "EMPTY_VECTOR")
    _write(tmp_path / "ORF", df.drop(columns=["target"]), "DINO")
    _run(["-b", str(tmp_path), "-i", "ORF", "--orf", "--no-figures"])
    well = pd.read_csv(tmp_path / "ORF" / "well_metrics.csv").iloc[0]
    assert {"gene_group_acc_NSP", "gene_group_acc_NSBP", "gene_group_mAP"} <= set(well.index)
    assert well["n_wells"] == N_PERT * BATCHES * PLATES and well["replicate_fraction_retrieved"] > 0.5
    maps = pd.read_csv(tmp_path / "ORF" / "map_results.csv")
    assert set(maps["task"]) == {"replicate", "gene_group"} and "EMPTY_VECTOR" not in set(maps["group"])


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("null_size", -5, "--null-size"),
    ("replicate_null_size", 0, "--replicate-null-size"),
    ("threshold", 1.5, "--threshold"),
    ("nsp_mode", "nearest", "--nsp-mode"),
    ("metadata_preset", "cellprofiler", "--metadata-preset"),
    ("batch_classifier", "svm", "--batch-classifier"),
    ("seed", -1, "--seed"),
    ("column_map", [("Metadata_Well", "well"), ("Metadata_Well", "plate")], "--map"),
])
def test_config_rejects_bad_values_naming_the_flag(tmp_path: Path, field: str, value: object, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        _cfg(tmp_path, **{field: value})
    cfg = _cfg(tmp_path, column_map=[("Metadata_Well", "well")], controls="DMSO")
    assert cfg.column_map == {"Metadata_Well": "well"} and cfg.controls == ("DMSO",)
    with pytest.raises(AttributeError):
        cfg.null_size = 5  # frozen: nothing below run_evaluation can change a setting


def test_hyphen_and_underscore_spellings_parse_the_same(capsys: pytest.CaptureFixture) -> None:
    base = ["-i", "x"]
    pairs = [
        (["--null-size", "7"], ["--null_size", "7"]),
        (["--replicate-null-size", "9"], ["--replicate_null_size", "9"]),
        (["--nsp-mode", "well_position"], ["--nsp_mode", "well_position"]),
        (["--metadata-preset", "pycytominer"], ["--metadata_preset", "pycytominer"]),
        (["--replicate-diffby", "dose"], ["--replicate_diffby", "dose"]),
        (["--batch-classifier", "logistic"], ["--batch_classifier", "logistic"]),
        (["--compare-to", "Random"], ["--compare_to", "Random"]),
        (["--no-progress", "--no-figures"], ["--no_progress", "--no_figures"]),
    ]
    for hyphen, underscore in pairs:
        assert evaluate.parse_args(base + hyphen) == evaluate.parse_args(base + underscore) != evaluate.parse_args(base)
    assert evaluate.parse_args(base + ["--null", "7"]).null_size == 7  # an abbreviation stays unambiguous
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--null-size NULL_SIZE" in help_text and "also accept underscores (--null_size)" in help_text
    assert "[paper]" in help_text and "the paper's evaluate.py has -i/--input" in help_text


def test_without_target_the_target_metrics_are_skipped_and_the_rest_unchanged(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _write_release(tmp_path)
    _run(["-b", str(tmp_path / "embeddings"), "-i", "singlesource", "-o", str(tmp_path / "with")])
    for rep in ("DINO", "MAE-ViT-S", "CellProfiler"):
        path = d / rep / "well_features.csv"
        pd.read_csv(path).drop(columns=["target"]).to_csv(path, index=False)
    capsys.readouterr()
    _run(["-b", str(tmp_path / "embeddings"), "-i", "singlesource", "-o", str(tmp_path / "without")])
    err = capsys.readouterr().err
    assert err.count("no target column (or all empty): target metrics skipped") == 3
    with_t = pd.read_csv(tmp_path / "with" / "well_metrics.csv").set_index("label")
    without = pd.read_csv(tmp_path / "without" / "well_metrics.csv").set_index("label")
    assert list(with_t.columns) == list(without.columns)
    skipped = ["target_acc_NSP", "target_acc_NSBP", "target_mAP", "target_nmAP", "silhouette_target"]
    assert without[skipped].isna().all(axis=None) and with_t[skipped].notna().all(axis=None)
    kept = ["pert_acc", "pert_acc_NSB", "replicate_mAP", "batch_bal_acc", "silhouette_batch", "repl_corr"]
    pd.testing.assert_frame_equal(with_t[kept], without[kept])
    assert set(pd.read_csv(tmp_path / "without" / "map_results.csv")["task"]) == {"replicate"}
    assert "no target labels: target metrics skipped" in without.loc["DINO", "notes"]
