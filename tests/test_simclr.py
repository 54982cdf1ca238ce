"""SimCLR: NT-Xent from its definition, and gathered negatives over 2 gloo ranks equal the single-process batch."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from models.dino import DINOLoss
from models.simclr import SimCLR, nt_xent

DIM, HALF = 6, 3


def _nt_xent_by_loop(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [float(z[i] @ z[k]) / temperature for k in range(2 * n) if k != i]
        total += -float(z[i] @ z[pos]) / temperature + math.log(sum(math.exp(s) for s in sims))
    return total / (2 * n)


def test_nt_xent_equals_definition():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, DIM), torch.randn(5, DIM)
    assert nt_xent(z1, z2, 0.2).item() == pytest.approx(_nt_xent_by_loop(z1, z2, 0.2), rel=1e-5)
    assert nt_xent(z1, z2, 0.5, gather=False).item() == pytest.approx(_nt_xent_by_loop(z1, z2, 0.5), rel=1e-5)


def _data() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    proj = torch.nn.Linear(4, DIM)
    return proj, torch.randn(2 * HALF, 4), torch.randn(2 * HALF, 4)


def _dino_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher outputs (2 global crops x 2*HALF samples) and student outputs (3 crops), view-major."""
    torch.manual_seed(2)
    return torch.randn(2, 2 * HALF, DIM), torch.randn(3, 2 * HALF, DIM)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        proj, x1, x2 = _data()
        part = slice(rank * HALF, (rank + 1) * HALF)
        loss = nt_xent(proj(x1[part]), proj(x2[part]), 0.2, gather=True)
        loss.backward()
        grads = [p.grad.clone() for p in proj.parameters()]
        for g in grads:  # what DDP does: average gradients over ranks
            torch.distributed.all_reduce(g)
            g /= world
        value = loss.detach().clone()
        torch.distributed.all_reduce(value)
        # The same ranks also check DINO's centre, which must be the EMA of the mean over ALL ranks' teacher outputs.
        teacher, student = _dino_outputs()
        dino = DINOLoss(DIM)
        dino(student[:, part].reshape(-1, DIM), teacher[:, part].reshape(-1, DIM), 0.04, 2)
        torch.save({"loss": value / world, "grads": grads, "center": dino.center},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_loss_grads_and_dino_centre_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    proj, x1, x2 = _data()
    loss = nt_xent(proj(x1), proj(x2), 0.2, gather=True)
    loss.backward()
    teacher, _ = _dino_outputs()
    centre = 0.1 * teacher.reshape(-1, DIM).mean(0, keepdim=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["center"], centre)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for g, p in zip(got["grads"], proj.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_simclr_module_keys_and_forward():
    torch.manual_seed(0)
    model = SimCLR.build({"arch": "vit_debug_patch8", "size": 32, "hidden_dim": 8}, in_chans=5)
    assert {k: tuple(v.shape) for k, v in model.head_state_dict().items()} == {
        "mlp.0.weight": (32, 32), "mlp.0.bias": (32,), "mlp.2.weight": (8, 32), "mlp.2.bias": (8,)}
    x = torch.randn(6, 5, 32, 32)
    loss, _ = model([x], {"epoch": 0})
    z = model.mlp(model.backbone(x))
    torch.testing.assert_close(loss, nt_xent(z[:3], z[3:], 0.2))
    loss2, _ = model([x[:3], x[3:]], {"epoch": 0})
    torch.testing.assert_close(loss, loss2)
    loss.backward()
    assert model.backbone.cls_token.grad is not None
