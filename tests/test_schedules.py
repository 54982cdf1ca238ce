"""Schedules, optimizer groups, clipping and flag resolution against direct re-computations of the paper's rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.registry import param_groups
from utils.errors import ConfigError
from utils.training import config_from_flags, parse_config
from utils.training.args import parse_args
from utils.training.optim import apply_schedule, clip_gradients
from utils.training.schedules import build_schedules, constant_schedule, cosine_schedule, linear_warmup_constant


def _mae_reference(lr: float, min_lr: float, epochs: int, iters: int, warmup: int) -> np.ndarray:
    """MAE's adjust_learning_rate evaluated at every iteration (fractional epoch = it / iters)."""
    out = []
    for i in range(epochs * iters):
        e = i / iters
        if e < warmup:
            out.append(lr * e / warmup)
        else:
            out.append(min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))))
    return np.array(out)


def test_cosine_matches_mae_rule_per_iteration():
    got = cosine_schedule(6e-4, 1e-6, epochs=10, iters_per_epoch=7, warmup_epochs=3)
    np.testing.assert_allclose(got, _mae_reference(6e-4, 1e-6, 10, 7, 3), rtol=1e-12, atol=1e-15)


def test_cosine_endpoints_and_monotone_after_warmup():
    s = cosine_schedule(1.0, 0.1, epochs=5, iters_per_epoch=4, warmup_epochs=2, start_warmup=0.5)
    assert len(s) == 20
    assert s[0] == pytest.approx(0.5)
    assert s[8] == pytest.approx(1.0)
    assert np.all(np.diff(s[:8]) > 0)
    assert np.all(np.diff(s[8:]) < 0)
    assert 0.1 < s[-1] < 0.2


def test_simclr_warmup_from_and_to_min_lr():
    s = cosine_schedule(1e-3, 1e-6, epochs=200, iters_per_epoch=3, warmup_epochs=30, start_warmup=1e-6)
    assert s[0] == pytest.approx(1e-6)
    assert s[90] == pytest.approx(1e-3)
    assert s[-1] == pytest.approx(1e-6, rel=1e-2)


def test_warmup_longer_than_run_is_clipped():
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=20)
    assert len(s) == 6 and np.all(np.diff(s) > 0) and s[-1] < 1.0


def test_teacher_temperature_ramp_then_constant():
    s = linear_warmup_constant(0.01, 0.04, epochs=4, iters_per_epoch=5, warmup_epochs=2)
    np.testing.assert_allclose(s[:10], np.linspace(0.01, 0.04, 10))
    np.testing.assert_allclose(s[10:], 0.04)
    assert np.all(constant_schedule(0.3, 2, 3) == 0.3)


def test_dino_resolution_scales_lr_and_builds_all_schedules():
    args = parse_config("dino", ["--lr", "0.004", "--batch_size_per_gpu", "64", "--epochs", "4", "--warmup_epochs", "1",
                               "--momentum_teacher", "0.9995", "--warmup_teacher_temp", "0.01"])
    cfg = args.with_world(2)
    assert cfg.lr == pytest.approx(0.004 * 128 / 256)
    sch = build_schedules(cfg, steps_per_epoch=5)
    assert len(sch.lr) == len(sch.wd) == len(sch.momentum) == len(sch.teacher_temp) == 20
    assert sch.wd[0] == pytest.approx(0.04) and sch.wd[-1] > 0.39
    assert sch.momentum[0] == pytest.approx(0.9995) and sch.momentum[-1] == pytest.approx(1.0, abs=1e-5)
    assert sch.teacher_temp[0] == pytest.approx(0.01) and sch.teacher_temp[-1] == pytest.approx(0.04)


def test_mae_lr_counts_samples_per_image_and_checks_world_size():
    argv = ["--world_size", "4", "--samples_per_image", "4", "--batch_size", "64", "--blr", "1.5e-4"]
    cfg = parse_config("mae", argv).with_world(4)
    assert cfg.lr == pytest.approx(1.5e-4 * 64 * 4 * 4 / 256)
    assert cfg.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="--world_size 4"):
        parse_config("mae", argv).with_world(2)


def test_simclr_global_batch_is_divided():
    cfg = parse_config("simclr", ["--ckpt_path", "x", "--batch_size", "256", "--scale", "0.3"]).with_world(3)
    assert cfg.batch_per_gpu == 85 and cfg.recipe_overrides["scale"] == (0.3, 1.0)
    assert cfg.warmup_start_lr == pytest.approx(1e-6) and cfg.warmup_epochs == 30


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_exclude_biases_and_norms_from_decay():
    model = _Tiny()
    groups = param_groups(model)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(model.lin.weight)}
    assert {id(p) for p in groups[1]["params"]} == {id(model.lin.bias), id(model.norm.weight), id(model.norm.bias)}
    opt = torch.optim.AdamW(groups, lr=0.0)
    apply_schedule(opt, {"lr": 0.5, "wd": 0.2})
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]


def test_per_tensor_clip_matches_paper_rule_and_global_clip_matches_torch():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(3, 3))]
    grads = [torch.randn(5) * 10, torch.randn(3, 3) * 0.01]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = clip_gradients(params, 3.0, "per_tensor")
    for p, g in zip(params, grads):
        coef = 3.0 / (g.norm() + 1e-6)
        expected = g * coef if coef < 1 else g
        torch.testing.assert_close(p.grad, expected)
    assert float(total) == pytest.approx(float(torch.stack([g.norm() for g in grads]).norm()))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    ref = [g.clone() for g in grads]
    clip_gradients(params, 3.0, "global")
    scale = min(1.0, 3.0 / (float(torch.stack([g.norm() for g in ref]).norm()) + 1e-6))
    for p, g in zip(params, ref):
        torch.testing.assert_close(p.grad, g * scale)


@pytest.mark.parametrize(
    ("method", "argv", "match"),
    [
        ("dino", ["--train_hp", "true"], "--train_hp"),
        ("dino", ["--loss", "mi"], "--loss dino"),
        ("dino", ["--optimizer", "lars"], "adamw"),
        ("dino", ["--data_path", "/x"], "--path_df"),
        ("mae", ["--dist_on_itp"], "torchrun"),
        ("dino", ["--dist_url", "tcp://h:1"], "torchrun"),
        ("simclr", ["--ckpt_path", "x", "--scale", "0.5", "0.2"], "0 < low <= high"),
        ("dino", ["--lr", "-1"], "--lr must be >= 0"),
        ("dino", ["--num_workers", "-1"], "--num_workers must be >= 0"),
        ("dino", ["--teacher_temp", "0"], "--teacher_temp must be > 0"),
        ("simclr", ["--ckpt_path", "x", "--temperature", "0"], "--temperature must be > 0"),
        ("simclr", ["--ckpt_path", "x", "--wd", "-0.1"], "--wd must be >= 0"),
        ("mae", ["--mask_ratio", "1.0"], r"--mask_ratio must be in \[0, 1\)"),
    ],
)
def test_dead_or_bad_flags_fail_with_advice(method, argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(method, argv)


def test_paper_flag_spellings_parse():
    dino = parse_args("dino", ["--norm_last_layer", "off", "--use_fp16", "1", "--local-rank=1",
                               "--global_crops_scale", "0.2", "0.4", "--local_crops_scale", "0.05"])
    assert dino.norm_last_layer is False and dino.use_fp16 is True and dino.local_rank == 1
    cfg = config_from_flags("dino", dino).with_world(1)
    assert cfg.recipe_overrides["global_crops_scale"] == (0.2, 0.4)
    assert cfg.recipe_overrides["local_crops_scale"] == (0.05, 1.0)
    assert cfg.flags["global_crops_scale"] == [0.2, 0.4] and cfg.precision == "fp16"
    mae = parse_args("mae", ["--no_pin_mem", "--local_rank", "2"])
    assert mae.pin_mem is False and mae.local_rank == 2


README_COMMANDS = {
    "dino": "--arch vit_small --lr 0.004 --path_df SSL_data/dataload/dataset.csv --epochs 200 --freeze_last_layer 3 "
            "--warmup_teacher_temp_epochs 20 --warmup_teacher_temp 0.01 --norm_last_layer true --use_bn_in_head false "
            "--momentum_teacher 0.9995 --warmup_epochs 20 --use_fp16 false --batch_size_per_gpu 64 --num_workers 6 "
            "--output_dir SSL_data/checkpoints/DINO-ViT-S --local-rank=0",
    "mae": "--world_size 4 --path_df SSL_data/dataload/dataset.csv --accum_iter 1 --model mae_vit_small "
           "--samples_per_image 4 --batch_size 64 --norm_pix_loss --mask_ratio 0.5 --epochs 200 --warmup_epochs 30 "
           "--blr 1.5e-4 --weight_decay 0.05 --output_dir SSL_data/checkpoints/MAE-ViT-S",
    "simclr": "--arch vit_small_patch16_224 --gpus 0 1 --batch_size 256 --num_workers 6 "
              "--path_df SSL_data/dataload/dataset.csv --max_epochs 200 --ckpt_path SSL_data/checkpoints/SimCLR-ViT-S "
              "--every_n_epochs 10 --lr 0.001 --wd 0.1",
}


@pytest.mark.parametrize("method", sorted(README_COMMANDS))
def test_readme_commands_resolve_to_the_papers_settings(method):
    world = {"dino": 2, "mae": 4, "simclr": 2}[method]
    cfg = parse_config(method, README_COMMANDS[method].split()).with_world(world)
    expected = {"dino": (0.004 * 128 / 256, 64, 200), "mae": (6e-4, 64, 200), "simclr": (1e-3, 128, 200)}[method]
    assert (cfg.lr, cfg.batch_per_gpu, cfg.epochs) == pytest.approx(expected)
    assert cfg.ckpt_pattern == ("checkpoint-{epoch:04}.pth" if method == "mae" else "checkpoint{epoch:04}.pth")
