"""Checkpoints: our format round trip, safe loading, and the paper's three release layouts -> identical embeddings."""

from __future__ import annotations

import argparse
import pathlib
import sys

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from data.intensity import PRESETS, IntensityNorm
from models.backbones import create_backbone, embed
from models.checkpoints import (
    FORMAT,
    load_backbone_for_inference,
    load_checkpoint,
    make_checkpoint,
    restore_method,
    save_checkpoint,
)
from models.dino import DINO
from utils.errors import CheckpointError

ARCH = "vit_debug_patch8"


def _reference(state: dict[str, torch.Tensor], img_size: int = 32) -> VisionTransformer:
    """A plain timm ViT (no dynamic size) holding ``state``: the independent forward we compare against."""
    ref = VisionTransformer(img_size=img_size, patch_size=8, in_chans=5, num_classes=0, embed_dim=32, depth=2,
                            num_heads=2, qkv_bias=True)
    for mod in ref.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-6
    ref.load_state_dict(state)
    return ref.eval()


def _vit_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = create_backbone(ARCH, 5, img_size=32).state_dict()
    return {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}  # non-zero biases everywhere


def _assert_embeds_like_timm(loaded, state, pool="cls"):
    x = torch.randn(3, 5, 32, 32)
    ref = _reference(state)
    with torch.no_grad():
        tokens = ref.forward_features(x)
        want = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
        torch.testing.assert_close(embed(loaded.backbone, x, loaded.pool), want, rtol=0, atol=1e-6)


def _paper_dino(tmp_path: pathlib.Path, arch: str | None = ARCH) -> tuple[pathlib.Path, dict, dict]:
    teacher, student = _vit_state(1), _vit_state(2)
    head = {"mlp.0.weight": torch.randn(16, 32), "mlp.0.bias": torch.randn(16), "last_layer.weight_g": torch.ones(8, 1),
            "last_layer.weight_v": torch.randn(8, 16)}
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **{f"head.{k}": v for k, v in head.items()}},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 200,
        "args": argparse.Namespace(arch=arch, out_dim=8, lr=0.004, path_df="x.csv"),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    path = tmp_path / "checkpoint0200.pth"
    torch.save(ckpt, path)
    return path, teacher, student


def test_paper_dino_uses_teacher_and_paper_train_constants(tmp_path):
    path, teacher, student = _paper_dino(tmp_path)
    loaded = load_backbone_for_inference(path, "dino", "vit_small_patch16")  # args.arch in the file wins
    assert loaded.info["arch"] == ARCH and loaded.info["arch_source"] == "checkpoint"
    assert loaded.pool == "cls" and loaded.intensity == PRESETS["paper_train"]
    assert loaded.info["weights"] == "teacher" and loaded.info["ignored_keys"] == 4 and loaded.info["epoch"] == 200
    _assert_embeds_like_timm(loaded, teacher)
    _assert_embeds_like_timm(load_backbone_for_inference(path, "dino", ARCH, dino_weights="student"), student)


def test_paper_mae_loads_qkv_biases_and_ignores_decoder(tmp_path):
    enc = _vit_state(3)
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_pos_embed": torch.randn(1, 17, 16),
               "decoder_embed.weight": torch.randn(16, 32), "decoder_embed.bias": torch.randn(16),
               "decoder_blocks.0.attn.qkv.bias": torch.randn(48), "decoder_norm.weight": torch.randn(16),
               "decoder_pred.weight": torch.randn(320, 16), "decoder_pred.bias": torch.randn(320)}
    ckpt = {"model": {**enc, **decoder}, "optimizer": {"state": {}, "param_groups": []}, "epoch": 199,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0},
            "args": argparse.Namespace(model="unknown_name", mask_ratio=0.5, norm_pix_loss=True)}
    path = tmp_path / "checkpoint-0199.pth"
    torch.save(ckpt, path)
    loaded = load_backbone_for_inference(path, "mae", ARCH)
    assert loaded.pool == "mean" and loaded.intensity == PRESETS["paper_multisource"]
    assert loaded.info["ignored_keys"] == len(decoder)
    torch.testing.assert_close(loaded.backbone.blocks[0].attn.qkv.bias, enc["blocks.0.attn.qkv.bias"])
    _assert_embeds_like_timm(loaded, enc, pool="mean")
    prenorm = load_backbone_for_inference(path, "mae", ARCH, pool="mean_prenorm")
    x = torch.randn(2, 5, 32, 32)
    ref = _reference(enc)
    seen = []
    ref.blocks[-1].register_forward_hook(lambda _m, _i, o: seen.append(o))
    with torch.no_grad():
        ref.forward_features(x)
        torch.testing.assert_close(embed(prenorm.backbone, x, prenorm.pool), seen[0][:, 1:].mean(1), rtol=0, atol=1e-6)

    del ckpt["model"]["blocks.1.attn.qkv.bias"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"0199.pth: backbone keys .*missing 1 \(blocks.1.attn.qkv.bias"):
        load_backbone_for_inference(path, "mae", ARCH)


def test_simclr_lightning_ckpt_loads_without_lightning(tmp_path):
    enc = _vit_state(4)
    ckpt = {"epoch": 199, "global_step": 1000, "pytorch-lightning_version": "1.6.5",
            "state_dict": {**{f"backbone.{k}": v for k, v in enc.items()}, "mlp.0.weight": torch.randn(64, 32),
                           "mlp.0.bias": torch.randn(64), "mlp.2.weight": torch.randn(16, 64),
                           "mlp.2.bias": torch.randn(16)},
            "hparams_name": "kwargs",
            "hyper_parameters": {"hidden_dim": 16, "lr": 1e-3, "temperature": 0.2, "vit": ARCH}}
    path = tmp_path / "epoch=199-step=1000.ckpt"
    torch.save(ckpt, path)
    loaded = load_backbone_for_inference(path, "simclr", "vit_small_patch16")  # hyper_parameters["vit"] wins
    assert loaded.pool == "cls" and loaded.intensity == PRESETS["paper_train"] and loaded.info["ignored_keys"] == 4
    _assert_embeds_like_timm(loaded, enc)
    assert "pytorch_lightning" not in sys.modules and "lightning" not in sys.modules


def test_our_format_round_trip_and_inference(tmp_path):
    torch.manual_seed(0)
    args = {"arch": ARCH, "out_dim": 8, "head_hidden_dim": 16, "head_bottleneck_dim": 8, "global_crops_size": 32,
            "epochs": 2, "output_dir": pathlib.Path("/tmp/run")}
    model = DINO.build(args, 5)
    with torch.no_grad():
        for p in model.teacher.backbone.parameters():
            p.add_(torch.randn_like(p))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    norm = IntensityNorm(mean=(0.1,) * 5, std=(0.2,) * 5, name="mine")
    ckpt = make_checkpoint("dino", model, arch=ARCH, args=argparse.Namespace(**args), intensity=norm,
                           channels=["Mito", "AGP", "RNA", "ER", "DNA"], epoch=1, step=10, optimizer=optim)
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, ckpt)
    back = load_checkpoint(path)
    with pytest.raises(TypeError, match=r"checkpoint\['extra'\] is a PurePosixPath"):
        save_checkpoint(tmp_path / "bad.pth", {**ckpt, "extra": pathlib.PurePosixPath("/x")})
    assert not (tmp_path / "bad.pth").exists()
    assert back["format"] == FORMAT and back["args"]["output_dir"] == "/tmp/run" and back["patch_size"] == 8
    fresh = DINO.build(args, 5)
    restore_method(fresh, back)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    loaded = load_backbone_for_inference(path, "dino", "vit_small_patch16")  # our arch wins over the CLI default
    assert loaded.intensity == norm and loaded.info["channels"] == ["Mito", "AGP", "RNA", "ER", "DNA"]
    assert loaded.info["weights"] == "teacher"
    _assert_embeds_like_timm(loaded, model.teacher.backbone.state_dict())
    student = load_backbone_for_inference(path, None, None, dino_weights="student")
    _assert_embeds_like_timm(student, model.backbone.state_dict())
    with pytest.raises(CheckpointError, match="dino checkpoint .* --model mae"):
        load_backbone_for_inference(path, "mae", None)


def test_pos_embed_interpolated_to_another_grid(tmp_path):
    path, teacher, _ = _paper_dino(tmp_path)
    loaded = load_backbone_for_inference(path, "dino", ARCH, img_size=48)
    want = resample_abs_pos_embed(teacher["pos_embed"], [6, 6], [4, 4])
    torch.testing.assert_close(loaded.backbone.pos_embed.data, want)
    x = torch.randn(2, 5, 48, 48)
    dynamic = create_backbone(ARCH, 5, img_size=32)
    dynamic.load_state_dict(teacher)
    with torch.no_grad():
        torch.testing.assert_close(embed(loaded.backbone, x), embed(dynamic.eval(), x), rtol=0, atol=1e-5)


def test_clear_failures(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.pth: not a loadable PyTorch checkpoint"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="missing.pth: checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"args": pathlib.PurePosixPath("/x")}, evil)
    with pytest.raises(CheckpointError, match="evil.pth: .*Unsupported global"):
        load_checkpoint(evil)
    other = tmp_path / "other.pth"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(CheckpointError, match="other.pth: not a recognised checkpoint"):
        load_backbone_for_inference(other, "dino", ARCH)

    path, teacher, _ = _paper_dino(tmp_path, arch=None)
    with pytest.raises(CheckpointError, match=r"keys do not match vit_small.*missing 120"):
        load_backbone_for_inference(path, "dino", "vit_small")
    with pytest.raises(CheckpointError, match="this is a dino checkpoint"):
        load_backbone_for_inference(path, "simclr", ARCH)
    ckpt = torch.load(path, weights_only=False)
    ckpt["teacher"]["backbone.blocks.0.attn.extra"] = torch.zeros(1)
    ckpt["teacher"]["backbone.blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 \(blocks.0.attn.extra\)"):
        load_backbone_for_inference(path, "dino", ARCH)
    del ckpt["teacher"]["backbone.blocks.0.attn.extra"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"shapes do not match .*blocks.0.mlp.fc1.weight \(7, 32\)"):
        load_backbone_for_inference(path, "dino", ARCH)
