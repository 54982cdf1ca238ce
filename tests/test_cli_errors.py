"""Bad input at every entry point ends in one `error: ...` line naming the culprit, never a traceback or a result."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

import evaluate
import inference
import train_dino
from data import stats, synthetic
from utils import handcrafted
from utils.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
FINAL_FILES = ("well_features.csv", "agg_features.csv", "run.json", "norm.json", "dataset.csv", "checkpoint.pth",
               "well_metrics.csv")
DINO_TINY = ["--arch", "vit_debug_patch8", "--out_dim", "16", "--head_hidden_dim", "16", "--head_bottleneck_dim", "8",
             "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "1",
             "--batch_size_per_gpu", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
             "--use_fp16", "false", "--epochs", "1", "--num_workers", "0", "--max_steps_per_epoch", "1",
             "--device", "cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """One 4-site plate of 64 px, its broken variants, a tiny DINO checkpoint and evaluation folders, made once."""
    root = tmp_path_factory.mktemp("cli")
    synthetic.generate_plates(root / "plate", plates=1, batches=1, wells=4, sites=1, size=64, seed=0,
                              layout="merged", workers=1, progress=False)
    table = pd.read_csv(root / "plate" / "dataset.csv")
    table["FileName_Merged"] = [str(root / "plate" / p) for p in table["FileName_Merged"]]
    paths = {"root": root, "good": root / "good.csv", "afile": root / "afile", "text": root / "text.pth"}
    table.to_csv(paths["good"], index=False)
    paths["afile"].write_text("a file, not a folder\n")
    paths["text"].write_text("not a checkpoint\n")
    (root / "empty.csv").write_text("")
    (root / "folder.csv").mkdir()
    table.drop(columns=["well"]).to_csv(root / "no_well.csv", index=False)
    pixels = tifffile.imread(table["FileName_Merged"][0])
    raw = Path(table["FileName_Merged"][0]).read_bytes()
    images: dict[str, Callable[[Path], object]] = {
        "missing": lambda p: None,
        "zero": lambda p: p.write_bytes(b""),
        "trunc": lambda p: p.write_bytes(raw[: len(raw) // 2]),
        "ch4": lambda p: tifffile.imwrite(p, pixels[:4], photometric="minisblack"),
        "f32": lambda p: tifffile.imwrite(p, pixels.astype(np.float32)),
    }
    for name, write in images.items():
        image = root / f"{name}.tiff"
        write(image)
        bad = table.copy()
        bad.loc[0, "FileName_Merged"] = str(image)
        bad.to_csv(root / f"{name}.csv", index=False)
    _run(train_dino.main, [*DINO_TINY, "--path_df", str(paths["good"]), "--output_dir", str(root / "dino")])
    paths["ckpt"] = root / "dino" / "checkpoint.pth"
    rng = np.random.default_rng(0)
    perts = ["DMSO", "DMSO", "A", "A", "B", "B", "C", "C"]
    wells = pd.DataFrame({"batch": "b1", "plate": "p1", "well": [f"A{i:02d}" for i in range(1, 9)],
                          "perturbation_id": perts, "target": ["DMSO", "DMSO", "T1", "T1", "T1", "T1", "T2", "T2"]})
    wells = pd.concat([wells, pd.DataFrame(rng.normal(size=(8, 4)), columns=[f"emb{i}" for i in range(4)])], axis=1)
    variants = {"good": wells, "no_pid": wells.drop(columns=["perturbation_id"]),
                "nofeat": wells.drop(columns=[f"emb{i}" for i in range(4)]),
                "nan": wells.assign(emb2=[1.0, 2.0, np.nan, 0.0, 0.0, 1.0, 2.0, 3.0]),
                "inf": wells.assign(emb1=[1.0, 2.0, 3.0, 0.0, np.inf, 1.0, 2.0, 3.0]),
                "single": wells.assign(perturbation_id=["DMSO", "DMSO", "A", "B", "C", "D", "E", "F"])}
    for name, frame in variants.items():
        folder = root / "eval" / name / "dino"
        folder.mkdir(parents=True)
        frame.to_csv(folder / "well_features.csv", index=False)
    (root / "eval" / "emptydir").mkdir()
    return paths


def _run(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run an entry point's main through run_cli, as ``python script.py argv`` would, and return the exit code."""
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    return int(info.value.code or 0)


def _assert_one_line_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert code == 2, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("error: "), err
    assert needle in lines[-1], lines[-1]


def _assert_no_result(folder: Path) -> None:
    left = [p.name for p in folder.rglob("*") if p.name in FINAL_FILES] if folder.exists() else []
    assert not left, f"a failed run left {left} in {folder}"


def _inference(env: dict[str, Path], out: Path, csv: str = "good", *extra: str, ckpt: Path | None = None) -> list[str]:
    return ["--ckpt", str(ckpt or env["ckpt"]), "--valset", str(env["root"] / f"{csv}.csv"), "-o", str(out),
            "--size", "32", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--norm_method", "standardize", *extra]


INFERENCE_CASES = {
    "csv_missing": ("nope", [], "nope.csv"),
    "csv_is_folder": ("folder", [], "folder.csv"),
    "csv_empty": ("empty", [], "empty.csv: empty file"),
    "no_well_column": ("no_well", [], "'well'"),
    "image_missing": ("missing", [], "missing.tiff"),
    "image_zero_bytes": ("zero", [], "zero.tiff"),
    "image_truncated": ("trunc", [], "trunc.tiff"),
    "image_4_channels": ("ch4", [], "4 channels, expected 5"),
    "image_float32": ("f32", [], "float32 values must lie in [0, 1]"),
    "stride_0": ("good", ["--stride", "0"], "--stride"),
    "tile_larger_than_image": ("good", ["--size", "128"], "smaller than the tile size 128"),
    "size_not_patch_multiple": ("good", ["--size", "36"], "--size 36 is not a multiple"),
    "unknown_arch": ("good", ["--arch", "vit_nope"], "'vit_nope'"),
    "min_cell_fraction_2": ("good", ["--min-cell-fraction", "2"], "--min-cell-fraction"),
    "negative_cell_factor": ("good", ["--cell-factor", "-1"], "--cell-factor"),
    "other_method": ("good", ["--model", "mae"], "--model mae"),
}


@pytest.mark.parametrize("case", list(INFERENCE_CASES))
def test_inference_bad_input(env, tmp_path, capsys, case):
    csv, extra, needle = INFERENCE_CASES[case]
    out = tmp_path / "emb"
    _assert_one_line_error(_run(inference.main, _inference(env, out, csv, *extra)), capsys.readouterr().err, needle)
    _assert_no_result(out)


def test_inference_bad_checkpoint_and_output(env, tmp_path, capsys):
    code = _run(inference.main, _inference(env, tmp_path / "emb", ckpt=env["text"]))
    _assert_one_line_error(code, capsys.readouterr().err, "text.pth: not a loadable")
    code = _run(inference.main, _inference(env, env["afile"] / "emb"))
    _assert_one_line_error(code, capsys.readouterr().err, "afile/emb: cannot create output folder")


EVAL_CASES = {
    "nan": ("nan", [], "column emb2"),
    "inf": ("inf", [], "column emb1"),
    "no_perturbation_id": ("no_pid", [], "perturbation_id"),
    "no_features": ("nofeat", [], "no feature columns"),
    "single_member_labels": ("single", [], "single well"),
    "empty_folder": ("emptydir", [], "emptydir: no representation folders"),
    "threshold_above_1": ("good", ["--threshold", "2"], "--threshold 2.0"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_evaluate_bad_input(env, tmp_path, capsys, case):
    name, extra, needle = EVAL_CASES[case]
    argv = ["-b", str(env["root"] / "eval"), "-i", name, "-o", str(tmp_path / "ev"), "--no-figures",
            "--no-progress", "--null-size", "20", "--replicate-null-size", "10", *extra]
    _assert_one_line_error(_run(evaluate.main, argv), capsys.readouterr().err, needle)
    _assert_no_result(tmp_path / "ev")


def test_evaluate_output_under_a_file(env, capsys):
    argv = ["-b", str(env["root"] / "eval"), "-i", "good", "-o", str(env["afile"] / "ev"), "--no-figures",
            "--no-progress"]
    _assert_one_line_error(_run(evaluate.main, argv), capsys.readouterr().err, "cannot create output folder")


HANDCRAFTED_CASES = {
    "negative_nucleus_diameter": ("good", ["--nucleus_diameter", "-3"], "nucleus_diameter must be > 0"),
    "texture_scale_0": ("good", ["--texture_scale", "0"], "texture_scale must be >= 1"),
    "image_4_channels": ("ch4", [], "ch4.tiff: 4 channels"),
}


@pytest.mark.parametrize("case", list(HANDCRAFTED_CASES))
def test_handcrafted_bad_input(env, tmp_path, capsys, case):
    csv, extra, needle = HANDCRAFTED_CASES[case]
    if csv != "good":  # a failed rerun into a finished folder must not leave the earlier result looking current
        (tmp_path / "hc").mkdir()
        for name in ("well_features.csv", "run.json"):
            (tmp_path / "hc" / name).write_text("from an earlier run\n")
    argv = ["--valset", str(env["root"] / f"{csv}.csv"), "-o", str(tmp_path / "hc"), "--workers", "1", *extra]
    _assert_one_line_error(_run(handcrafted.main, argv), capsys.readouterr().err, needle)
    _assert_no_result(tmp_path / "hc")


def test_handcrafted_output_under_a_file(env, capsys):
    argv = ["--valset", str(env["good"]), "-o", str(env["afile"] / "hc"), "--workers", "1"]
    _assert_one_line_error(_run(handcrafted.main, argv), capsys.readouterr().err, "cannot create output folder")


def test_stats_bad_input(env, tmp_path, capsys):
    code = _run(stats.main, [str(env["good"]), "-o", str(tmp_path / "norm.json"), "--workers", "0"])
    _assert_one_line_error(code, capsys.readouterr().err, "--workers must be >= 1")
    code = _run(stats.main, [str(env["root"] / "f32.csv"), "-o", str(tmp_path / "norm.json"), "--workers", "1"])
    _assert_one_line_error(code, capsys.readouterr().err, "f32.tiff: float32 values must lie in [0, 1]")
    code = _run(stats.main, [str(env["good"]), "-o", str(env["afile"] / "norm.json"), "--workers", "1"])
    _assert_one_line_error(code, capsys.readouterr().err, "cannot create output folder")
    _assert_no_result(tmp_path)


def test_training_bad_input(env, tmp_path, capsys):
    code = _run(train_dino.main, [*DINO_TINY, "--path_df", str(env["good"]), "--output_dir", str(env["afile"] / "t")])
    _assert_one_line_error(code, capsys.readouterr().err, "afile/t: cannot create output folder")
    code = _run(train_dino.main, [*DINO_TINY, "--path_df", str(env["good"]), "--output_dir",
                                  str(tmp_path / "t"), "--resume", str(env["text"])])
    _assert_one_line_error(code, capsys.readouterr().err, "text.pth")
    _assert_no_result(tmp_path / "t")


def _subprocess(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_real_entry_points_print_one_line(env, tmp_path):
    """The scripts themselves (not only their main functions) exit 2 with one line on stderr."""
    runs = {
        "evaluate nan": (_subprocess("evaluate.py", "-b", str(env["root"] / "eval"), "-i", "nan", "-o",
                                     str(tmp_path / "ev"), "--no-figures"), "column emb2"),
        "synthetic out under a file": (_subprocess("-m", "data.synthetic", "--out", str(env["afile"] / "syn"),
                                                   "--plates", "1", "--batches", "1", "--wells", "4", "--sites", "1",
                                                   "--size", "32", "--workers", "1"), "cannot create output folder"),
        "handcrafted bad flag": (_subprocess("-m", "utils.handcrafted", "--valset", str(env["good"]), "-o",
                                             str(tmp_path / "hc"), "--texture_scale", "0"), "texture_scale"),
    }
    for name, (proc, needle) in runs.items():
        assert proc.returncode == 2, (name, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], (name, proc.stderr)
        assert proc.stderr.startswith("error: ") and needle in proc.stderr, (name, proc.stderr)
