"""One typed config per pipeline: the command line and Python build the same frozen config, and each rejects bad
values in one place with a message naming the flag."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import inference
from utils.cli import respell
from utils.errors import ConfigError
from utils.inference import DEFAULTS, InferenceConfig
from utils.training import config_from_flags, parse_config, training_config
from utils.training.args import parse_args


def test_training_config_from_python_equals_the_command_line(tmp_path: Path) -> None:
    csv, out = str(tmp_path / "d.csv"), str(tmp_path / "run")
    cli = parse_config("dino", ["--preset", "small_cpu", "--path_df", csv, "--output_dir", out, "--epochs", "3"])
    py = training_config("dino", preset="small_cpu", path_df=csv, output_dir=out, epochs=3)
    assert py == cli and py.epochs == 3 and py.arch == "vit_tiny"
    assert cli.with_world(2).lr == pytest.approx(2 * cli.with_world(1).lr)
    with pytest.raises(dataclasses.FrozenInstanceError):
        py.epochs = 4  # type: ignore[misc]


def test_training_config_rejects_unknown_missing_and_bad_flags() -> None:
    with pytest.raises(ConfigError, match="unknown flag"):
        training_config("dino", epoch=3)
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        training_config("simclr")
    with pytest.raises(ConfigError, match="--lr must be >= 0"):
        training_config("dino", lr=-1.0)
    with pytest.raises(ConfigError, match="--val_group"):
        config_from_flags("dino", vars(parse_args("dino", [])) | {"val_group": "site"})


def test_inference_config_from_python_equals_the_command_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    ckpt.touch()
    argv = ["--ckpt", str(ckpt), "-o", "out", "--size", "128", "--center-tiles", "--norm_method", "none"]
    cli = InferenceConfig.from_flags(inference.build_parser().parse_args(argv))
    py = InferenceConfig(ckpt=str(ckpt), outdir="out", size=128, center_tiles=True, norm_method="no_post_proc")
    assert cli == py and cli.norm_method == "no_post_proc"
    assert cli.grid.size == 128 and cli.grid.stride == 128 and cli.grid.center
    parsed = vars(inference.build_parser().parse_args(["--ckpt", str(ckpt), "-o", "out"]))
    assert {k: v for k, v in parsed.items() if k in DEFAULTS} == {
        k: list(v) if isinstance(v, tuple) else v for k, v in DEFAULTS.items()}  # defaults live in the config


@pytest.mark.parametrize(
    ("change", "match"),
    [({"size": 0}, "--size"), ({"norm_method": "zscore"}, "--norm_method"), ({"empty_sites": "keep"}, "--empty-sites"),
     ({"channels": ("A", "B")}, "no DNA channel"), ({"precision": "int8"}, "--precision"),
     ({"min_cell_fraction": 2.0}, "--min-cell-fraction"), ({"ckpt": "missing.pth"}, "--ckpt missing.pth")],
)
def test_inference_config_rejects_bad_values(tmp_path: Path, change: dict, match: str) -> None:
    ckpt = tmp_path / "w.pth"
    ckpt.touch()
    with pytest.raises(ConfigError, match=match):
        InferenceConfig(**({"ckpt": str(ckpt), "outdir": "o"} | change))


def test_both_flag_spellings_parse_the_same(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    ckpt.touch()
    base = ["--ckpt", str(ckpt), "-o", "o"]
    p = inference.build_parser()
    assert p.parse_args([*base, "--empty_sites", "center", "--norm-method", "mad_robustize", "--batch-size=4"]) == \
        p.parse_args([*base, "--empty-sites", "center", "--norm_method", "mad_robustize", "--batch_size=4"])
    assert parse_args("dino", ["--batch-size-per-gpu", "8"]).batch_size_per_gpu == 8
    assert respell(["--a-b", "1", "--", "--a-b"], {"--a_b"}) == ["--a_b", "1", "--", "--a-b"]


def test_train_config_validates_however_it_is_built(tmp_path: Path) -> None:
    """The checks live in TrainConfig itself: a replaced field or a hand-built config cannot skip them."""
    cfg = training_config("mae", path_df=str(tmp_path / "d.csv"), output_dir=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="TrainConfig.epochs must be >= 1"):
        dataclasses.replace(cfg, epochs=0)
    with pytest.raises(ConfigError, match="--mask_ratio must be in"):
        dataclasses.replace(cfg, flags={**cfg.flags, "mask_ratio": 1.5})
    with pytest.raises(ConfigError, match="flags lack"):
        dataclasses.replace(cfg, flags={})
    assert dataclasses.replace(cfg, epochs=2).epochs == 2
