"""DINO: loss from its definition, weight-normalised head, schedule, EMA teacher, multi-crop passes, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.dino import DINO, DINOHead, DINOLoss, WeightNormLinear, teacher_temp_schedule

ARGS = {"arch": "vit_debug", "out_dim": 24, "head_hidden_dim": 16, "head_bottleneck_dim": 8, "global_crops_size": 32,
        "epochs": 4, "warmup_teacher_temp_epochs": 2, "freeze_last_layer": 1, "drop_path_rate": 0.1}


def _model() -> DINO:
    torch.manual_seed(0)
    return DINO.build(dict(ARGS), in_chans=5)


def test_loss_equals_definition():
    torch.manual_seed(1)
    n_global, n_crops, batch, dim, temp = 2, 5, 3, 7, 0.04
    student, teacher = torch.randn(n_crops * batch, dim), torch.randn(n_global * batch, dim)
    center = torch.randn(1, dim)
    loss_fn = DINOLoss(dim)
    loss_fn.center.copy_(center)
    got = loss_fn(student, teacher, temp, n_global)
    total, terms = 0.0, 0
    for iq in range(n_global):
        for v in range(n_crops):
            if v == iq:
                continue
            for b in range(batch):
                q = F.softmax((teacher[iq * batch + b] - center[0]) / temp, dim=0)
                logp = F.log_softmax(student[v * batch + b] / 0.1, dim=0)
                total += float(-(q * logp).sum()) / batch
            terms += 1
    assert terms == n_global * n_crops - n_global
    assert got.item() == pytest.approx(total / terms, rel=1e-5)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_weight_norm_layer_matches_torch_weight_norm():
    torch.manual_seed(2)
    layer = WeightNormLinear(6, 4)
    layer.weight_g.data.uniform_(0.5, 2.0)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(6, 4, bias=False), dim=0)
    ref.parametrizations.weight.original0.data.copy_(layer.weight_g.data)
    ref.parametrizations.weight.original1.data.copy_(layer.weight_v.data)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), ref(x))
    assert set(layer.state_dict()) == {"weight_g", "weight_v"}
    assert layer.weight_g.shape == (4, 1)


def test_head_keys_and_norm_last_layer():
    head = DINOHead(32, 24, hidden_dim=16, bottleneck_dim=8)
    assert set(head.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight",
                                      "mlp.4.bias", "last_layer.weight_g", "last_layer.weight_v"}
    assert not head.last_layer.weight_g.requires_grad and torch.all(head.last_layer.weight_g == 1)
    assert DINOHead(32, 24, norm_last_layer=False, hidden_dim=16, bottleneck_dim=8).last_layer.weight_g.requires_grad


def test_teacher_temperature_schedule():
    sched = teacher_temp_schedule(0.01, 0.04, 3, 6)
    np.testing.assert_allclose(sched, [0.01, 0.025, 0.04, 0.04, 0.04, 0.04])
    np.testing.assert_allclose(teacher_temp_schedule(0.02, 0.04, 5, 2), [0.02, 0.025])
    assert _model().teacher_temp({"epoch": 1}) == pytest.approx(0.04)
    assert _model().teacher_temp({"epoch": 0, "teacher_temp": 0.07}) == pytest.approx(0.07)


def test_multicrop_one_pass_per_resolution_and_teacher_sees_globals_only():
    model = _model()
    seen: dict[str, list[tuple[int, ...]]] = {"student": [], "teacher": []}
    model.backbone.patch_embed.register_forward_hook(lambda _m, i, _o: seen["student"].append(tuple(i[0].shape)))
    model.teacher.backbone.patch_embed.register_forward_hook(
        lambda _m, i, _o: seen["teacher"].append(tuple(i[0].shape)))
    batch = 2
    views = [torch.randn(2 * batch, 5, 32, 32), torch.randn(3 * batch, 5, 16, 16), torch.randn(batch, 5, 16, 16)]
    loss, scalars = model(views, {"epoch": 0, "step": 0})
    assert seen["student"] == [(2 * batch, 5, 32, 32), (4 * batch, 5, 16, 16)]
    assert seen["teacher"] == [(2 * batch, 5, 32, 32)]
    assert scalars["teacher_temp"] == pytest.approx(0.02)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.backbone.cls_token.grad is not None

    # The same loss, recomputed from separate forwards of each crop.
    model2 = _model()
    model2.load_state_dict(model.state_dict())
    model2.dino_loss.center.zero_()
    model2.eval()
    model.eval()
    model.dino_loss.center.zero_()
    with torch.no_grad():
        loss_a, _ = model(views, {"epoch": 0})
        crops = [views[0], views[1], views[2]]
        student = torch.cat([model2.head(model2.backbone(c)) for c in crops])
        teacher = model2.teacher.head(model2.teacher.backbone(views[0]))
        loss_b = DINOLoss(24)(student, teacher, 0.02, 2)
    torch.testing.assert_close(loss_a, loss_b)


def test_ema_update_and_freeze_last_layer():
    model = _model()
    views = [torch.randn(4, 5, 32, 32), torch.randn(4, 5, 16, 16)]
    loss, _ = model(views, {"epoch": 0})
    loss.backward()
    model.before_optimizer_step({"epoch": 0})
    assert model.head.last_layer.weight_v.grad is None
    assert model.head.mlp[0].weight.grad is not None
    loss, _ = model(views, {"epoch": 1})
    loss.backward()
    model.before_optimizer_step({"epoch": 1})
    assert model.head.last_layer.weight_v.grad is not None

    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher.parameters()]
    student = [*model.backbone.parameters(), *model.head.parameters()]
    model.after_step({"momentum": 0.9})
    for t_old, t_new, s in zip(before, model.teacher.parameters(), student):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s.detach())


def test_head_state_round_trip_uses_paper_key_names():
    model = _model()
    state = model.head_state_dict()
    assert "head.last_layer.weight_g" in state and "teacher.backbone.cls_token" in state
    assert "teacher.head.last_layer.weight_v" in state and "dino_loss.center" in state
    assert not any(k.startswith("backbone.") for k in state)
    other = DINO.build(dict(ARGS), in_chans=5)
    other.load_head_state_dict(state)
    for k, v in other.head_state_dict().items():
        torch.testing.assert_close(v, state[k])
    from utils.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing"):
        other.load_head_state_dict({k: v for k, v in state.items() if k != "dino_loss.center"})


def test_registry_and_paper_param_groups():
    from models.registry import METHODS, build_method, param_groups
    from utils.errors import ConfigError
    from utils.training.optim import apply_schedule

    assert set(METHODS) == {"dino", "mae", "simclr"}
    model = build_method("dino", dict(ARGS), 5)
    decay, no_decay = param_groups(model)
    apply_schedule(torch.optim.AdamW([decay, no_decay], lr=0.0), {"lr": 1e-3, "wd": 0.04})
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and (n.endswith(".bias") or p.ndim == 1)}
    assert "backbone.blocks.0.norm1.weight" in {names[id(p)] for p in no_decay["params"]}
    assert "backbone.blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert not any(n.startswith("teacher.") or n == "head.last_layer.weight_g" for n in
                   (names[id(p)] for g in (decay, no_decay) for p in g["params"]))
    with pytest.raises(ConfigError, match="unknown method"):
        build_method("byol", {}, 5)
