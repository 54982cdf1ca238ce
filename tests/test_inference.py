"""End-to-end inference on a tiny synthetic plate set: files, brute-force equality, bad images, resume, torchrun."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data.intensity import PRESETS
from data.io import read_site, write_merged_tiff
from data.prefetch import SitePrefetcher
from data.schema import DEFAULT_CHANNELS, load_site_table
from data.synthetic import generate_plates
from data.tiling import Region
from inference import build_parser, main
from models.checkpoints import load_backbone_for_inference, save_checkpoint
from utils.cli import run_cli
from utils.errors import ConfigError, DataError
from utils.inference import InferenceConfig, pipeline
from utils.inference.context import resolve_device
from utils.profiles.correct import CorrectConfig, correct_profiles

ROOT = Path(__file__).resolve().parents[1]
TILE = 32
META = ["batch", "plate", "well", "perturbation_id", "target"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plates")
    generate_plates(out, plates=2, batches=1, wells=4, sites=2, size=64, seed=3, layout="merged", progress=False)
    return out


def _args(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--valset", str(data / "dataset.csv"), "-o", str(out), "--size", str(TILE),
            "--stride", str(TILE), "--batch_size", "3", "--num_workers", "2", *extra]


def _run(data: Path, ckpt: Path, out: Path, *extra: str) -> Path:
    return pipeline.run_inference(InferenceConfig.from_flags(build_parser().parse_args(_args(data, ckpt, out, *extra))))


def _copy(data: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(data, dst)
    return dst


def _brute_force_wells(data: Path, ckpt: Path) -> pd.DataFrame:
    """Per tile: timm forward_features CLS; per well: np.nanmean over every valid tile of every site."""
    backbone = load_backbone_for_inference(ckpt).backbone.eval()
    table = load_site_table(data / "dataset.csv")
    norm = PRESETS["paper_train"]
    mean, std = np.array(norm.mean)[:, None, None], np.array(norm.std)[:, None, None]
    rows = []
    for key, sites in table.groupby(META, sort=False):
        tiles = []
        for _, row in sites.iterrows():
            pixels, otsu = read_site(row)
            for y in range(0, 64 - TILE + 1, TILE):
                for x in range(0, 64 - TILE + 1, TILE):
                    tile = pixels[:, y : y + TILE, x : x + TILE].astype(np.float64)
                    if (tile[4] > 0.7 * otsu).mean() < 0.01:
                        continue
                    x01 = torch.tensor((tile / 65535.0 - mean) / std, dtype=torch.float32)[None]
                    with torch.no_grad():
                        tiles.append(backbone.forward_features(x01)[0, 0].numpy())
        rows.append([*key, *np.mean(tiles, axis=0)])
    dim = len(rows[0]) - len(META)
    return pd.DataFrame(rows, columns=[*META, *[f"emb{i}" for i in range(dim)]])


def test_end_to_end_files_and_brute_force_equality(data_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(data_dir, ckpt, out, "--norm_method", "no_post_proc", "--save-sites", "--parquet")
    for name in ("well_features", "agg_features", "site_features"):
        assert (out / f"{name}.csv").is_file() and (out / f"{name}.parquet").is_file()
    wells = pd.read_csv(out / "well_features.csv")
    assert list(wells.columns[:5]) == META and not any(c.startswith("Unnamed") for c in wells.columns)
    feats = [c for c in wells.columns if c.startswith("emb")]
    assert feats == [f"emb{i}" for i in range(32)]
    expected = _brute_force_wells(data_dir, ckpt)
    merged = expected.merge(wells, on=META, suffixes=("_ref", ""))
    assert len(merged) == len(expected) == len(wells) == 8
    np.testing.assert_allclose(merged[feats].to_numpy(), merged[[f + "_ref" for f in feats]].to_numpy(), atol=2e-5)
    agg = pd.read_csv(out / "agg_features.csv")
    assert agg.columns[0] == "perturbation_id" and "target" in agg.columns
    np.testing.assert_allclose(agg.set_index("perturbation_id").loc["DMSO", feats].to_numpy(dtype=float),
                               wells.loc[wells["perturbation_id"] == "DMSO", feats].mean().to_numpy(), atol=1e-6)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["skipped_files"] == [] and run["n_sites"] == 16
    assert run["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert run["flags"]["size"] == TILE and "torch" in run["versions"] and run["timings"]["embed_seconds"] > 0


def test_default_normalisation_and_all_methods(
    ckpt: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    wide = tmp_path_factory.mktemp("wide")  # spherize after per-plate steps needs more control wells than features
    generate_plates(wide, plates=2, batches=1, wells=24, sites=1, size=TILE, seed=1, layout="merged", progress=False)
    controls = ["--control-query", "well == well"]
    _run(wide, ckpt, tmp_path / "all", "--norm_method", "all", *controls)
    for method in ("spherize_mad_robustize", "standardize", "no_post_proc", "mad_robustize_spherize"):
        assert (tmp_path / "all" / method / "well_features.csv").is_file()
        assert (tmp_path / "all" / method / "agg_features.csv").is_file()
    _run(wide, ckpt, tmp_path / "default", *controls)
    default = pd.read_csv(tmp_path / "default" / "well_features.csv")
    from_all = pd.read_csv(tmp_path / "all" / "spherize_mad_robustize" / "well_features.csv")
    pd.testing.assert_frame_equal(default, from_all)
    run = json.loads((tmp_path / "default" / "run.json").read_text())
    assert run["flags"]["norm_method"] == "spherize_mad_robustize" and run["control_query"] == "well == well"
    # a chain with Harmony on the plate key: run.json records every step, and the table is the one
    # python -m utils.profiles makes from the raw wells
    _run(wide, ckpt, tmp_path / "raw", "--norm_method", "none", *controls)
    _run(wide, ckpt, tmp_path / "chain", "--norm_method", "standardize_harmony", "--batch-key", "plate", *controls)
    steps = json.loads((tmp_path / "chain" / "run.json").read_text())["normalisation"]["standardize_harmony"]
    assert [s["step"] for s in steps] == ["standardize", "harmony"] and steps[1]["batch_key"] == "plate"
    corrected = correct_profiles(CorrectConfig(input=str(tmp_path / "raw" / "well_features.csv"),
                                               outdir=str(tmp_path / "offline"), norm_method="standardize_harmony",
                                               batch_key="plate", control_query="well == well"))
    assert corrected["steps"][1]["n_batches"] == 2
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "chain" / "well_features.csv"),
                                  pd.read_csv(tmp_path / "offline" / "well_features.csv"), check_exact=False,
                                  atol=1e-5)  # the raw wells went through a float32 CSV


def _corrupt(data: Path) -> Path:
    table = pd.read_csv(data / "dataset.csv")
    bad = data / table["FileName_Merged"].iloc[5]
    bad.write_bytes(b"this is not a TIFF file at all")
    return bad


def test_corrupt_tiff_stops_with_its_name_and_keeps_the_previous_results(
    data_dir: Path, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _copy(data_dir, tmp_path)
    out = tmp_path / "out"
    _run(data, ckpt, out)
    before = {n: (out / n).read_bytes() for n in ("well_features.csv", "agg_features.csv", "run.json")}
    bad = _corrupt(data)
    with pytest.raises(DataError) as info:
        _run(data, ckpt, out)
    assert bad.name in str(info.value) and "\n" not in str(info.value)
    # the failed run changed nothing of the complete one, and left no lock or staged tables
    assert {n: (out / n).read_bytes() for n in before} == before
    assert not (out / ".lock").exists() and not list(out.glob(".staging-*"))
    monkeypatch.setattr(sys, "argv", ["inference.py", *_args(data, ckpt, tmp_path / "cli")])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and last.startswith("error: ") and bad.name in last


def test_skip_bad_images_warns_and_lists_them(data_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    data = _copy(data_dir, tmp_path)
    bad = _corrupt(data)
    with pytest.warns(RuntimeWarning, match="skipping bad image"):
        _run(data, ckpt, tmp_path / "out", "--skip_bad_images")
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [Path(s["files"]).name for s in run["skipped_files"]] == [bad.name]
    assert run["n_sites"] == 15 and len(pd.read_csv(tmp_path / "out" / "well_features.csv")) == 8


def test_wells_without_valid_tiles_are_dropped_or_use_the_centre_rule(
    data_dir: Path, ckpt: Path, tmp_path: Path
) -> None:
    data = _copy(data_dir, tmp_path)
    table = pd.read_csv(data / "dataset.csv")
    well = table.iloc[0]
    for rel in table.loc[(table["plate"] == well["plate"]) & (table["well"] == well["well"]), "FileName_Merged"]:
        write_merged_tiff(data / rel, np.full((5, 64, 64), 10, dtype=np.uint16), otsu=5000.0)
    with pytest.warns(RuntimeWarning, match="no valid tile"):
        _run(data, ckpt, tmp_path / "drop", "--norm_method", "no_post_proc")
    run = json.loads((tmp_path / "drop" / "run.json").read_text())
    assert run["wells_without_valid_tiles"] == [{"batch": well["batch"], "plate": well["plate"], "well": well["well"]}]
    assert run["n_sites_without_valid_tiles"] == 2
    assert len(pd.read_csv(tmp_path / "drop" / "well_features.csv")) == 7
    with pytest.warns(RuntimeWarning, match="no valid tile"):
        _run(data, ckpt, tmp_path / "center", "--norm_method", "no_post_proc", "--empty-sites", "center")
    assert len(pd.read_csv(tmp_path / "center" / "well_features.csv")) == 8
    run = json.loads((tmp_path / "center" / "run.json").read_text())
    assert run["n_sites_without_valid_tiles"] == 2 and run["wells_without_valid_tiles"] == []


def test_resume_skips_finished_plates_and_rejects_changed_settings(
    data_dir: Path, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    _run(data_dir, ckpt, out)
    first = pd.read_csv(out / "well_features.csv")
    calls = []
    real = pipeline.embed_plate
    monkeypatch.setattr(pipeline, "embed_plate", lambda *a, **k: calls.append(1) or real(*a, **k))
    _run(data_dir, ckpt, out, "--resume")
    assert calls == []
    pd.testing.assert_frame_equal(first, pd.read_csv(out / "well_features.csv"))
    assert sorted(json.loads((out / "run.json").read_text())["resumed_plates"]) == ["plate001", "plate002"]
    next(out.joinpath("parts").glob("plate002-*.json")).unlink()
    _run(data_dir, ckpt, out, "--resume")
    assert calls == [1]
    pd.testing.assert_frame_equal(first, pd.read_csv(out / "well_features.csv"))
    _run(data_dir, ckpt, out, "--resume", "--model", "simclr", "--arch", "vit_base")  # our checkpoint decides the arch
    assert calls == [1]
    with pytest.raises(ConfigError, match="stride"):
        _run(data_dir, ckpt, out, "--resume", "--stride", "16")


def test_worker_counts_and_batch_sizes_give_the_same_profiles(data_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    _run(data_dir, ckpt, tmp_path / "a", "--num_workers", "0", "--batch_size", "1")
    _run(data_dir, ckpt, tmp_path / "b", "--num_workers", "3", "--batch_size", "5")
    a, b = (pd.read_csv(tmp_path / d / "well_features.csv") for d in ("a", "b"))
    pd.testing.assert_frame_equal(a, b, atol=1e-6)


def test_prefetcher_reads_regions_like_read_site(data_dir: Path, tmp_path: Path) -> None:
    table = load_site_table(data_dir / "dataset.csv")
    region = Region(64, 64, 8, 16, 40, 32)
    seen = []
    for threads in (0, 2):
        for batch in SitePrefetcher(table, DEFAULT_CHANNELS, region, 5, torch.device("cpu"), threads=threads):
            for j, pos in enumerate(batch.positions):
                pixels, otsu = read_site(table.iloc[pos])
                np.testing.assert_array_equal(batch.pixels[j].numpy(), pixels[:, 8:48, 16:48])
                assert batch.otsu[j].item() == pytest.approx(otsu, rel=1e-6)
                seen.append(int(pos))
    assert seen == list(range(16)) * 2


def test_invalid_gpu_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    (tmp_path / "x.pth").touch()
    args = build_parser().parse_args(["--ckpt", str(tmp_path / "x.pth"), "-o", "o", "--gpus", "3"])
    with pytest.raises(ConfigError, match="--gpus 3"):
        resolve_device(InferenceConfig.from_flags(args))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(data_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    _run(data_dir, ckpt, tmp_path / "single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "inference.py", *_args(data_dir, ckpt, tmp_path / "multi")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = json.loads((tmp_path / "multi" / "run.json").read_text())
    assert run["world_size"] == 2 and sorted(p["rank"] for p in run["plates"]) == [0, 1]
    single = pd.read_csv(tmp_path / "single" / "well_features.csv")
    multi = pd.read_csv(tmp_path / "multi" / "well_features.csv")
    pd.testing.assert_frame_equal(single, multi, atol=1e-6)


def test_median_over_site_profiles_and_layer_concatenation(data_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "median"
    _run(data_dir, ckpt, out, "--norm_method", "no_post_proc", "--operation", "median", "--well-pool", "sites",
         "--save-sites", "--layers", "0", "-1", "--pool", "mean")
    sites = pd.read_csv(out / "site_features.csv")
    wells = pd.read_csv(out / "well_features.csv")
    feats = [c for c in wells.columns if c.startswith("emb")]
    assert len(feats) == 64 and len(sites) == 16 and (sites["n_valid_tiles"] > 0).all()
    for _, well in wells.iterrows():
        mask = np.ones(len(sites), dtype=bool)
        for k in META:
            mask &= (sites[k] == well[k]).to_numpy()
        assert mask.sum() == 2
        np.testing.assert_allclose(well[feats].to_numpy(float), np.median(sites.loc[mask, feats].to_numpy(), axis=0),
                                   rtol=1e-6, atol=1e-6)
    assert json.loads((out / "run.json").read_text())["settings"]["layers"] == [0, -1]


def test_checkpoint_channel_order_is_honoured(data_dir: Path, ckpt: Path, tmp_path: Path) -> None:
    obj = torch.load(ckpt, weights_only=True)
    order = [4, 0, 1, 2, 3]
    obj["channels"] = [obj["channels"][i] for i in order]
    obj["backbone"]["patch_embed.proj.weight"] = obj["backbone"]["patch_embed.proj.weight"][:, order].clone()
    obj["intensity"] = PRESETS["paper_train"].select(obj["channels"]).to_dict()
    permuted = tmp_path / "permuted.pth"
    save_checkpoint(permuted, obj)
    _run(data_dir, ckpt, tmp_path / "a", "--norm_method", "no_post_proc")
    _run(data_dir, permuted, tmp_path / "b", "--norm_method", "no_post_proc")
    a, b = (pd.read_csv(tmp_path / d / "well_features.csv") for d in ("a", "b"))
    pd.testing.assert_frame_equal(a, b, atol=1e-5)
    with pytest.raises(ConfigError, match="do not match the checkpoint"):
        _run(data_dir, permuted, tmp_path / "c", "--channels", "A", "B", "C", "D", "DNA")


@pytest.mark.parametrize("variant", ["plain", "bigendian", "zlib", "declared_order"])
def test_fast_tiff_reader_equals_the_general_reader(tmp_path: Path, variant: str) -> None:
    import tifffile

    from data.io import plain_tiff_layout
    from data.prefetch import read_site_region

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60000, size=(5, 40, 48), dtype=np.uint16)
    path = tmp_path / "site.tiff"
    names = list(DEFAULT_CHANNELS)[::-1] if variant == "declared_order" else list(DEFAULT_CHANNELS)
    stored = pixels[::-1] if variant == "declared_order" else pixels
    desc = json.dumps({"otsuth": 1234.5, "channels": names})
    kwargs = {"zlib": {"compression": "zlib"}, "bigendian": {"byteorder": ">"}}.get(variant, {})
    tifffile.imwrite(path, stored, description=desc, metadata=None, photometric="minisblack", **kwargs)
    assert (plain_tiff_layout(str(path)) is None) == (variant == "zlib")
    row = {"FileName_Merged": str(path), "layout": "merged", "Otsu_th": float("nan")}
    out = np.zeros((5, 24, 40), dtype=np.uint16)
    otsu = read_site_region(row, DEFAULT_CHANNELS, Region(40, 48, 8, 4, 24, 40), out)
    expected, expected_otsu = read_site(row)
    np.testing.assert_array_equal(expected, pixels)
    np.testing.assert_array_equal(out, pixels[:, 8:32, 4:44])
    assert otsu == expected_otsu == 1234.5
