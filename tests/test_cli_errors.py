"""Bad input at every entry point ends in one `error: ...` line naming the culprit, never a traceback or a result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

import evaluate
import inference
import train_dino
from data import stats, synthetic
from utils import handcrafted
from utils.cli import run_cli
from utils.profiles import cli as profiles_cli

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
    previous = {}
    if csv != "good":  # a failed rerun into a finished folder keeps the earlier results as they were (transactional)
        (tmp_path / "hc").mkdir()
        for name in ("well_features.csv", "run.json"):
            (tmp_path / "hc" / name).write_text(f"{name} from an earlier run\n")
            previous[name] = (tmp_path / "hc" / name).read_bytes()
    argv = ["--valset", str(env["root"] / f"{csv}.csv"), "-o", str(tmp_path / "hc"), "--workers", "1", *extra]
    _assert_one_line_error(_run(handcrafted.main, argv), capsys.readouterr().err, needle)
    if previous:
        assert {n: (tmp_path / "hc" / n).read_bytes() for n in previous} == previous
        assert not [p.name for p in (tmp_path / "hc").iterdir() if p.name.startswith((".staging", ".lock"))]
    else:
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


# --- issue 12, item 8: file-system oddities, duplicated headers, resource flags, output paths; items 6 and 7 ----------

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) when the body blocks, as a FIFO read would."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: a read blocked")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def odd(env) -> dict[str, Path]:
    """Site tables whose first image is a folder, a broken link, a FIFO, garbage or unreadable; duplicated headers;
    tables without the asked-for controls; a checkpoint whose output is NaN; well tables for ``utils.profiles``."""
    root = env["root"] / "odd"
    root.mkdir()
    table = pd.read_csv(env["good"])
    targets: dict[str, Callable[[Path], object]] = {
        "folder": lambda p: p.mkdir(),
        "broken": lambda p: os.symlink(root / "nowhere.tiff", p),
        "fifo": lambda p: os.mkfifo(p),
        "garbage": lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "unreadable": lambda p: (p.write_bytes(Path(table["FileName_Merged"][0]).read_bytes()), os.chmod(p, 0)),
    }
    for name, make in targets.items():
        image = root / f"{name}.tiff"
        make(image)
        bad = table.copy()
        bad.loc[0, "FileName_Merged"] = str(image)
        bad.to_csv(root / f"{name}.csv", index=False)
    lines = env["good"].read_text().splitlines()
    (root / "dup_header.csv").write_text("\n".join([lines[0] + ",plate"] + [f"{line},again" for line in lines[1:]])
                                         + "\n")
    table.drop(columns=["control_type"]).to_csv(root / "no_control_type.csv", index=False)
    table.assign(perturbation_id="X").to_csv(root / "no_dmso.csv", index=False)
    big = root / "big.tiff"
    pixels = tifffile.imread(table["FileName_Merged"][0])
    tifffile.imwrite(big, np.pad(pixels, ((0, 0), (0, 32), (0, 32))), photometric="minisblack")
    table.assign(FileName_Merged=[str(big), *table["FileName_Merged"][1:]]).to_csv(root / "big_site.csv", index=False)
    ckpt = torch.load(env["ckpt"], map_location="cpu", weights_only=False)
    for part in ("backbone", "heads"):  # every weight NaN: the embeddings of every well are NaN
        ckpt[part] = {k: torch.full_like(v, float("nan")) if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in ckpt[part].items()}
    torch.save(ckpt, root / "nan.pth")
    wells = pd.read_csv(env["root"] / "eval" / "good" / "dino" / "well_features.csv")
    wells.to_csv(root / "wells.csv", index=False)
    wells.assign(**{f"emb{i}": 1.5 for i in range(4)}).to_csv(root / "constant.csv", index=False)
    text = (root / "wells.csv").read_text()
    (root / "dup_feature.csv").write_text(text.replace("emb3", "emb2", 1))
    return {"root": root, "nan": root / "nan.pth", **{p.stem: p for p in root.glob("*.csv")}}


ODD_INFERENCE = {
    "image_is_a_folder": ("folder", [], "folder.tiff: is a folder"),
    "image_broken_symlink": ("broken", [], "broken.tiff: broken symbolic link"),
    "image_fifo": ("fifo", [], "fifo.tiff: is a FIFO"),
    "image_garbage": ("garbage", [], "garbage.tiff: corrupt or unreadable TIFF"),
    "image_unreadable": ("unreadable", [], "unreadable.tiff: permission denied"),
    "site_csv_duplicated_header": ("dup_header", [], "dup_header.csv: the site table header lists column(s) 'plate'"),
    "controls_dmso_match_nothing": ("no_dmso", ["--controls", "DMSO"], "column perturbation_id has no 'DMSO' (it has"),
    "controls_negcon_no_column": ("no_control_type", ["--controls", "negcon"], "has no control_type column"),
    "control_query_matches_nothing": ("good", ["--control-query", "well == 'Z99'"], "column well has no 'Z99'"),
}


@pytest.mark.parametrize("case", list(ODD_INFERENCE))
def test_inference_odd_input(env, odd, tmp_path, capsys, case):
    csv, extra, needle = ODD_INFERENCE[case]
    if case == "image_unreadable" and IS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading the file")
    argv = _inference(env, tmp_path / "emb", "good", *extra)
    argv[argv.index("--valset") + 1] = str(env["good"] if csv == "good" else odd[csv])
    argv[argv.index("--norm_method") + 1] = "no_post_proc"  # a control selection must be checked even here
    with _deadline(60):
        code = _run(inference.main, argv)
    _assert_one_line_error(code, capsys.readouterr().err, needle)
    _assert_no_result(tmp_path / "emb")


def test_inference_skipping_a_fifo_does_not_hang(env, odd, tmp_path, capsys):
    argv = _inference(env, tmp_path / "emb", "good", "--skip_bad_images")
    argv[argv.index("--valset") + 1] = str(odd["fifo"])
    argv[argv.index("--norm_method") + 1] = "no_post_proc"  # 3 wells left: too few to standardise
    with _deadline(60), pytest.warns(RuntimeWarning, match="fifo.tiff: is a FIFO"):
        code = _run(inference.main, argv)
    out = capsys.readouterr()
    assert code == 0 and "1 skipped" in out.out, out.err


def test_inference_degenerate_model_is_named_not_the_controls(env, odd, tmp_path, capsys):
    for method in ("standardize", "no_post_proc"):  # no_post_proc used to write 0 wells and exit 0
        code = _run(inference.main, _inference(env, tmp_path / method, "good", ckpt=odd["nan"])[:-1] + [method])
        out = capsys.readouterr()
        _assert_one_line_error(code, out.err + out.out, "features are all NaN (a degenerate model output")
        _assert_no_result(tmp_path / method)


def test_inference_absurd_resource_flags_are_capped_not_fatal(env, tmp_path, capsys):
    argv = _inference(env, tmp_path / "emb", "good", "--batch_size", str(10**9), "--num_workers", str(10**6))
    with pytest.warns(RuntimeWarning, match="--num_workers 1000000 exceeds the"):
        assert _run(inference.main, argv) == 0  # the site buffer holds at most the table's 4 sites
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["inference", "handcrafted", "training"])
def test_output_folder_that_is_a_file(env, capsys, name):
    out = str(env["afile"])
    argv = {"inference": lambda: (inference.main, _inference(env, env["afile"])),
            "handcrafted": lambda: (handcrafted.main, ["--valset", str(env["good"]), "-o", out, "--workers", "1"]),
            "training": lambda: (train_dino.main, [*DINO_TINY, "--path_df", str(env["good"]), "--output_dir", out])}
    main, args = argv[name]()
    _assert_one_line_error(_run(main, args), capsys.readouterr().err, f"{out}: ")
    assert env["afile"].read_text() == "a file, not a folder\n"


ODD_HANDCRAFTED = {
    "site_csv_duplicated_header": ("dup_header", [], "the site table header lists column(s) 'plate' more than once"),
    "image_fifo": ("fifo", [], "fifo.tiff: is a FIFO"),
    "controls_dmso_match_nothing": ("no_dmso", ["--controls", "DMSO"], "column perturbation_id has no 'DMSO'"),
}


@pytest.mark.parametrize("case", list(ODD_HANDCRAFTED))
def test_handcrafted_odd_input(odd, tmp_path, capsys, case):
    csv, extra, needle = ODD_HANDCRAFTED[case]
    argv = ["--valset", str(odd[csv]), "-o", str(tmp_path / "hc"), "--workers", "1", *extra]
    with _deadline(60):
        _assert_one_line_error(_run(handcrafted.main, argv), capsys.readouterr().err, needle)
    _assert_no_result(tmp_path / "hc")


def test_handcrafted_site_of_another_size_is_measured(odd, tmp_path, capsys):
    """Per-object features do not depend on the field's size (CellProfiler measures such sites too): no traceback."""
    argv = ["--valset", str(odd["big_site"]), "-o", str(tmp_path / "hc"), "--workers", "1", "--norm_method", "none",
            "--feature_select", "none"]
    assert _run(handcrafted.main, argv) == 0, capsys.readouterr().err
    assert "4 sites" in capsys.readouterr().out


def test_handcrafted_huge_workers_is_capped(env, tmp_path):
    with pytest.warns(RuntimeWarning, match="--workers 1000000 exceeds the"):
        cfg = handcrafted.HandcraftedConfig(valset=str(env["good"]), output_dir=str(tmp_path), workers=10**6)
    assert cfg.workers == len(os.sched_getaffinity(0))


def test_training_duplicated_header(env, odd, tmp_path, capsys):
    code = _run(train_dino.main, [*DINO_TINY, "--path_df", str(odd["dup_header"]), "--output_dir", str(tmp_path)])
    _assert_one_line_error(code, capsys.readouterr().err, "dup_header.csv: the site table header lists")


PROFILES_CASES = {
    "controls_negcon_no_column": ("wells", ["--controls", "negcon"], "has no control_type column"),
    "control_query_matches_nothing": ("wells", ["--control-query", "perturbation_id == 'NONE'"],
                                      "column perturbation_id has no 'NONE' (it has 'DMSO'"),
    "constant_features_are_degenerate": ("constant", [], "the profiles are constant, so the model output"),
    "duplicated_feature_header": ("dup_feature", [], "column(s) 'emb2' more than once"),
}


@pytest.mark.parametrize("case", list(PROFILES_CASES))
def test_profiles_odd_input(odd, tmp_path, capsys, case):
    name, extra, needle = PROFILES_CASES[case]
    argv = ["-i", str(odd[name]), "-o", str(tmp_path / "p"), "--norm_method", "standardize", *extra]
    _assert_one_line_error(_run(profiles_cli.main, argv), capsys.readouterr().err, needle)
    _assert_no_result(tmp_path / "p")


def test_profiles_output_folder_that_is_a_file(env, odd, capsys):
    argv = ["-i", str(odd["wells"]), "-o", str(env["afile"]), "--norm_method", "standardize"]
    _assert_one_line_error(_run(profiles_cli.main, argv), capsys.readouterr().err, f"{env['afile']}: exists")


def test_stats_output_file_that_is_a_folder(env, tmp_path, capsys):
    (tmp_path / "norm.json").mkdir()
    code = _run(stats.main, [str(env["good"]), "-o", str(tmp_path / "norm.json"), "--workers", "1"])
    _assert_one_line_error(code, capsys.readouterr().err, "norm.json")
