"""Learning diagnostics: collapse indicators, the collapse warning, the live retrieval probe and its side effects."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from models.collapse import CollapseMonitor, dino_stats, effective_rank, embedding_spread, teacher_entropy
from models.dino import DINOLoss
from utils.logging import RunLogger

ROOT = Path(__file__).resolve().parents[1]
DINO_TINY = ["--arch", "vit_debug_patch8", "--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim",
             "16", "--global_crops_size", "32", "--local_crops_size", "16", "--local_crops_number", "2",
             "--batch_size_per_gpu", "4", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
             "--num_workers", "0", "--max_steps_per_epoch", "2", "--device", "cpu"]


# ------------------------------------------------------------------------------------------------ collapse metrics


def test_constant_embedding_is_collapsed() -> None:
    z = torch.ones(32, 16) * torch.arange(16.0)
    spread = embedding_spread(z)
    assert float(spread["embed_std"]) == pytest.approx(0.0, abs=1e-6)
    assert float(spread["embed_std_ratio"]) == pytest.approx(0.0, abs=1e-5)
    assert float(effective_rank(z)) == pytest.approx(1.0)


def test_spread_embedding_is_healthy() -> None:
    z = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    spread = embedding_spread(z)
    assert float(spread["embed_std_ratio"]) == pytest.approx(1.0, abs=0.05)  # unit vectors: per-dim var 1/d
    assert float(effective_rank(z)) > 0.9 * 16
    one_direction = torch.randn(4096, 1, generator=torch.Generator().manual_seed(1)) * torch.ones(1, 16)
    assert float(effective_rank(one_direction)) == pytest.approx(1.0, abs=1e-3)


def test_effective_rank_matches_definition() -> None:
    z = torch.randn(20, 6, generator=torch.Generator().manual_seed(2))
    unit = z / z.norm(dim=1, keepdim=True)
    s = np.linalg.svd((unit - unit.mean(0)).numpy(), compute_uv=False)
    p = s / s.sum()
    assert float(effective_rank(z)) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-5)


def test_teacher_entropy_extremes() -> None:
    k = 50
    uniform = teacher_entropy(torch.zeros(8, k), torch.zeros(1, k), 0.04)
    assert float(uniform) == pytest.approx(math.log(k), rel=1e-6)
    peaked = teacher_entropy(torch.eye(8, k) * 10.0, torch.zeros(1, k), 0.04)
    assert float(peaked) < 1e-6


def test_dino_kl_is_loss_minus_teacher_entropy() -> None:
    """KL(teacher || student) from dino_stats equals the direct mean KL over the loss's cross-view pairs."""
    g = torch.Generator().manual_seed(3)
    n_global, n_crops, batch, k, temp = 2, 4, 5, 12, 0.07
    teacher = torch.randn(n_global * batch, k, generator=g)
    student = torch.randn(n_crops * batch, k, generator=g)
    loss_fn = DINOLoss(k)
    loss_fn.center.copy_(torch.randn(1, k, generator=g) * 0.1)
    center = loss_fn.center.clone()
    loss = loss_fn(student, teacher, temp, n_global)
    stats = dino_stats(teacher, center, temp, loss)
    q = F.softmax((teacher - center) / temp, dim=-1).view(n_global, batch, k)
    logp = F.log_softmax(student / loss_fn.student_temp, dim=-1).view(n_crops, batch, k)
    kls = [(q[a] * (q[a].log() - logp[v])).sum(-1).mean() for a in range(n_global) for v in range(n_crops) if a != v]
    assert float(stats["kl_teacher_student"]) == pytest.approx(float(torch.stack(kls).mean()), rel=1e-5)
    assert float(stats["teacher_entropy_max"]) == pytest.approx(math.log(k))
    assert float(stats["center_norm"]) == pytest.approx(float(center.norm()))


def test_monitor_needs_patience() -> None:
    monitor = CollapseMonitor("simclr", patience=2)
    collapsed = {"train_embed_std_ratio": 0.01}
    assert monitor.update(collapsed) is None
    message = monitor.update(collapsed)
    assert message is not None and "collapsed" in message and "--lr" in message
    assert monitor.update({"train_embed_std_ratio": 0.9}) is None  # a healthy epoch resets the streak
    uniform = {"train_teacher_entropy": 8.31, "train_teacher_entropy_max": math.log(4096),
               "train_embed_std_ratio": 0.5}
    dino = CollapseMonitor("dino", patience=1)
    assert "uniform" in dino.update(uniform)


def test_logger_keeps_probe_lines_on_resume(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, True, tensorboard=False)
    log.log_probe(0, {"probe_target_map": 0.1})
    log.log_epoch({"epoch": 0, "train_loss": 1.0})
    log.log_probe(1, {"probe_target_map": 0.2})
    log.log_epoch({"epoch": 1, "train_loss": 0.9})
    log.log_probe(2, {"probe_target_map": 0.3})
    log.truncate_epochs(1)
    lines = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [(r.get("event", "train"), r["epoch"]) for r in lines] == [("probe", 0), ("train", 0), ("probe", 1)]


# ---------------------------------------------------------------------------------------------------- the probe


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> dict[str, Path]:
    """Two tiny training plates and two held-out probe plates of one synthetic experiment (replicates across them)."""
    from data.synthetic import generate_plates

    out = tmp_path_factory.mktemp("learning")
    generate_plates(out, plates=4, batches=2, wells=12, sites=1, size=64, seed=1, layout="merged", workers=1,
                    progress=False)
    df = pd.read_csv(out / "dataset.csv")
    probe_plates = sorted(df["plate"].unique())[-2:]
    df[~df["plate"].isin(probe_plates)].to_csv(out / "train.csv", index=False)
    df[df["plate"].isin(probe_plates)].to_csv(out / "probe.csv", index=False)
    return {"train": out / "train.csv", "probe": out / "probe.csv", "root": out}


def _dino(plates: dict[str, Path], out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "train_dino.py"), *DINO_TINY, "--path_df", str(plates["train"]),
            "--output_dir", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"})


def test_probe_equals_evaluate(plates: dict[str, Path], tmp_path: Path) -> None:
    """The probe's mAP is evaluate.py's mAP on the same well table (written to disk and read back)."""
    from data.intensity import get_intensity_norm
    from models.backbones import create_backbone
    from utils.evaluation import EvalConfig, run_evaluation
    from utils.inference import embed_profiles
    from utils.training.probe import Probe, ProbeConfig

    torch.manual_seed(0)
    backbone = create_backbone("vit_debug_patch8", 5, img_size=32).eval()
    channels = ("Mito", "AGP", "RNA", "ER", "DNA")
    probe = Probe(ProbeConfig(plates["probe"], size=32), "dino", channels, get_intensity_norm("paper_train"),
                  torch.device("cpu"))
    with torch.no_grad():
        wells = embed_profiles(probe.context(backbone), probe.table, probe.inference)
    ours = probe.score_wells(wells)
    folder = tmp_path / "emb" / "probe"
    folder.mkdir(parents=True)
    wells.to_csv(folder / "well_features.csv", index=False)
    out = run_evaluation(EvalConfig(input_dir=tmp_path / "emb", out_dir=tmp_path / "emb", progress=False,
                                    figures=False))
    metrics = pd.read_csv(out / "well_metrics.csv").iloc[0]
    assert np.isfinite(ours["probe_target_map"]) and np.isfinite(ours["probe_replicate_map"])
    assert ours["probe_target_map"] == pytest.approx(metrics["target_mAP"], abs=1e-12)
    assert ours["probe_replicate_map"] == pytest.approx(metrics["replicate_mAP"], abs=1e-12)


def test_probe_leaves_training_unchanged(plates: dict[str, Path], tmp_path: Path) -> None:
    """Same weights with and without --probe_csv; the probe logs epoch 0 first and keeps the best checkpoint."""
    plain = _dino(plates, tmp_path / "plain", "--epochs", "2")
    assert plain.returncode == 0, plain.stderr[-2000:]
    probed = _dino(plates, tmp_path / "probed", "--epochs", "2", "--probe_csv", str(plates["probe"]),
                   "--probe_size", "32", "--save_init")
    assert probed.returncode == 0, probed.stderr[-2000:]
    a = torch.load(tmp_path / "plain" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "probed" / "checkpoint.pth", weights_only=True)
    for part in ("backbone", "heads"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs with the probe on"
    lines = [json.loads(x) for x in (tmp_path / "probed" / "log.txt").read_text().splitlines()]
    probes = [r for r in lines if r.get("event") == "probe"]
    assert [r["epoch"] for r in probes] == [0, 1, 2]
    assert lines[0].get("event") == "probe"  # before any training line
    assert all(np.isfinite(r["probe_target_map"]) for r in probes)
    best = json.loads((tmp_path / "probed" / "best_probe.json").read_text())
    assert best["probe_target_map"] == max(r["probe_target_map"] for r in probes)
    ckpt = torch.load(tmp_path / "probed" / "checkpoint_best_probe.pth", weights_only=True)
    assert ckpt["epoch"] == best["epoch"]
    init = torch.load(tmp_path / "probed" / "checkpoint0000.pth", weights_only=True)
    assert init["epoch"] == 0 and not torch.equal(init["backbone"]["pos_embed"], b["backbone"]["pos_embed"])
    train_lines = [r for r in lines if r.get("event") != "probe"]
    for key in ("train_embed_std_ratio", "train_embed_rank", "train_teacher_entropy", "train_kl_teacher_student",
                "train_center_norm"):
        assert all(np.isfinite(r[key]) for r in train_lines), key


def test_collapse_warning_fires(plates: dict[str, Path], tmp_path: Path) -> None:
    """A teacher temperature far too high makes the teacher uniform: warned about, and fatal with --stop_on_collapse."""
    hot = ["--epochs", "3", "--teacher_temp", "1000", "--warmup_teacher_temp", "1000"]
    run = _dino(plates, tmp_path / "hot", *hot)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "looks collapsed" in run.stderr and "uniform" in run.stderr
    lines = [json.loads(x) for x in (tmp_path / "hot" / "log.txt").read_text().splitlines()]
    assert [r["collapsed"] for r in lines] == [False, True, True]
    stop = _dino(plates, tmp_path / "stop", *hot, "--stop_on_collapse")
    assert stop.returncode == 2
    last = stop.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --stop_on_collapse") and "Traceback" not in stop.stderr
    assert (tmp_path / "stop" / "checkpoint.pth").is_file()


def test_max_minutes_stops_after_an_epoch(plates: dict[str, Path], tmp_path: Path) -> None:
    run = _dino(plates, tmp_path / "budget", "--epochs", "5", "--max_minutes", "0.0001")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "--max_minutes 0.0001 reached after epoch 1 of 5" in run.stdout
    lines = [json.loads(x) for x in (tmp_path / "budget" / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0]
    assert torch.load(tmp_path / "budget" / "checkpoint.pth", weights_only=True)["epoch"] == 1


# ------------------------------------------------------------------------------------------- presets and the gains


def test_preset_sets_defaults_and_flags_win() -> None:
    from utils.errors import ConfigError
    from utils.training.args import PRESETS, parse_args

    args = parse_args("dino", ["--preset", "small_cpu"])
    for key, value in PRESETS["dino"]["small_cpu"].items():
        assert getattr(args, key) == value, key
    assert parse_args("dino", ["--preset", "small_cpu", "--out_dim", "77"]).out_dim == 77
    assert parse_args("simclr", ["--preset", "small_cpu", "--ckpt_path", "x"]).arch == "vit_tiny"
    assert parse_args("mae", ["--preset", "small_cpu"]).norm_pix_loss is True
    with pytest.raises(ConfigError, match="not a dino preset"):
        parse_args("dino", ["--preset", "huge"])


def test_gains_table_names_sign_and_verdict(tmp_path: Path) -> None:
    from utils.errors import ConfigError
    from utils.evaluation import EvalConfig, gains_markdown

    well = pd.DataFrame({"label": ["DINO", "Random", "CellProfiler"], "target_mAP": [0.30, 0.20, 0.40],
                         "replicate_mAP": [0.50, 0.55, 0.45]})
    cfg = EvalConfig(input_dir=tmp_path, out_dir=tmp_path, compare_to=("Random", "CellProfiler"))
    text = "\n".join(gains_markdown(well, cfg))
    assert "| DINO | Random | +0.100 | -0.050 | better on target only |" in text
    assert "| DINO | CellProfiler | -0.100 | +0.050 | better on replicate only |" in text
    assert not any(line.startswith(("| Random |", "| CellProfiler |")) for line in text.splitlines())
    with pytest.raises(ConfigError, match="no such representation"):
        gains_markdown(well, EvalConfig(input_dir=tmp_path, out_dir=tmp_path, compare_to=("Nope",)))


@pytest.mark.slow
def test_probe_under_torchrun_is_computed_once(plates: dict[str, Path], tmp_path: Path) -> None:
    """Two gloo ranks: rank 0 probes and broadcasts; one probe line per epoch, identical replicas."""
    import os

    from utils.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "train_dino.py", *DINO_TINY, "--batch_size_per_gpu", "2", "--path_df", str(plates["train"]),
           "--output_dir", str(out), "--epochs", "2", "--probe_csv", str(plates["probe"]), "--probe_size", "32",
           "--intensity", "dataset"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r.get("event") == "probe"] == [0, 1, 2]
    assert proc.stdout.count("probe after 1 epoch(s)") == 1
    assert json.loads((out / "rank_weights.json").read_text())["identical"]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["intensity"]["name"] == "dataset"  # broadcast


def test_dataset_intensity_is_the_training_tables_statistics(plates: dict[str, Path], tmp_path: Path) -> None:
    """--intensity dataset stores data.stats' figures for the training table in the checkpoint."""
    from data.schema import TRAIN_REQUIRED, load_site_table
    from data.stats import dataset_intensity_norm
    from utils.training import parse_config, train

    out = tmp_path / "ds"
    train(parse_config("dino", [*DINO_TINY, "--path_df", str(plates["train"]), "--output_dir", str(out),
                                      "--epochs", "1", "--intensity", "dataset"]))
    stored = torch.load(out / "checkpoint.pth", weights_only=True)["intensity"]
    table = load_site_table(plates["train"], channels=tuple(stored["channels"]), required=TRAIN_REQUIRED)
    expected, _ = dataset_intensity_norm(table, stored["channels"], n_sites=200, seed=0, progress=False)
    assert stored["mean"] == pytest.approx(list(expected.mean), rel=1e-12)
    assert stored["std"] == pytest.approx(list(expected.std), rel=1e-12)


def test_koleo_matches_brute_force_nearest_neighbour() -> None:
    from models.dino import koleo_loss

    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(4))
    unit = x / x.norm(dim=1, keepdim=True)
    nearest = [min(float((unit[i] - unit[j]).norm()) for j in range(9) if j != i) for i in range(9)]
    assert float(koleo_loss(x)) == pytest.approx(-float(np.mean(np.log(nearest))), rel=1e-5)
    spread = koleo_loss(torch.eye(4))
    bunched = koleo_loss(torch.eye(4) + 5.0)
    assert float(spread) < float(bunched)  # features closer together cost more


def test_bad_learning_flags_are_one_line_errors(tmp_path: Path) -> None:
    from utils.errors import ConfigError
    from utils.training import parse_config

    with pytest.raises(ConfigError, match="--probe_csv .*: no such file"):
        parse_config("dino", ["--probe_csv", str(tmp_path / "missing.csv")])
    with pytest.raises(ConfigError, match="--max_minutes must be > 0"):
        parse_config("mae", ["--max_minutes", "0"])
    csv = tmp_path / "probe.csv"
    csv.write_text("x\n")
    with pytest.raises(ConfigError, match="--probe_every must be >= 1"):
        parse_config("dino", ["--probe_csv", str(csv), "--probe_every", "0"])
    assert parse_config("dino", []).probe is None


def test_augment_preview_writes_views_and_stats(plates: dict[str, Path], tmp_path: Path) -> None:
    """The view-inspection tool draws training views as a run does and reports their statistics."""
    from utils.training.preview import main

    out = tmp_path / "preview"
    assert main(["--path_df", str(plates["train"]), "--method", "simclr", "--out", str(out), "--batches", "1",
                 "--batch", "4", "--show", "2", "--arch", "vit_debug_patch8", "--size", "32"]) == 0
    assert (out / "views.png").stat().st_size > 0 and (out / "views.pdf").stat().st_size > 0
    stats = json.loads((out / "view_stats.json").read_text())
    assert stats


def test_unknown_compare_to_fails_before_any_output(tmp_path: Path) -> None:
    from utils.errors import ConfigError
    from utils.evaluation import EvalConfig, run_evaluation

    folder = tmp_path / "emb" / "A"
    folder.mkdir(parents=True)
    pd.DataFrame({"perturbation_id": ["x", "x"], "batch": ["b", "b"], "well": ["A01", "A02"], "target": ["t", "t"],
                  "emb0": [0.0, 1.0]}).to_csv(folder / "well_features.csv", index=False)
    with pytest.raises(ConfigError, match="--compare-to Nope: no such representation folder"):
        run_evaluation(EvalConfig(input_dir=tmp_path / "emb", out_dir=tmp_path / "out", compare_to=("Nope",)))
    assert not (tmp_path / "out").exists()


def test_best_probe_rule() -> None:
    from utils.training.probe import better

    nan = float("nan")
    assert better({"probe_target_map": 0.2}, None)
    assert not better({"probe_target_map": nan}, None)
    assert better({"probe_target_map": 0.2}, {"probe_target_map": nan})
    assert not better({"probe_target_map": 0.1}, {"probe_target_map": 0.2})
    assert not better({"probe_target_map": 0.2}, {"probe_target_map": 0.2})  # ties keep the earlier checkpoint


def test_bad_probe_csv_fails_before_the_run_writes_anything(plates: dict[str, Path], tmp_path: Path) -> None:
    notarget = tmp_path / "nopert.csv"  # target is optional (replicate mAP then picks the best probe)
    frame = pd.read_csv(plates["probe"]).drop(columns=["perturbation_id"])
    frame["FileName_Merged"] = [str(plates["root"] / p) for p in frame["FileName_Merged"]]  # absolute: CSV moved
    frame.to_csv(notarget, index=False)
    run = _dino(plates, tmp_path / "out", "--epochs", "1", "--probe_csv", str(notarget))
    assert run.returncode == 2 and "empty 'perturbation_id'" in run.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
    bad = _dino(plates, tmp_path / "out2", "--epochs", "1", "--intensity", "nonsense")
    assert bad.returncode == 2 and "nor 'dataset'" in bad.stderr.strip().splitlines()[-1]
