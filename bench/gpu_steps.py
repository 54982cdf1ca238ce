"""The GPU check's in-process pieces: one training step per method and precision, and a 2-process DDP check.

Both go through the project's own code (``parse_config``, ``build_model``, ``build_optimizer``, ``TrainStep``,
``init_distributed``), on random views of the recipe's shapes, so a pass means the training loop's step works on
this device and precision, not a re-implementation of it. ``bench/gpu_check.py`` runs them as subprocesses and reads
the one ``GPU_CHECK_RESULT {json}`` line each prints.

    python bench/gpu_steps.py train --device cuda --precisions bf16 fp16
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/gpu_steps.py ddp --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MARK = "GPU_CHECK_RESULT"
METHODS = ("dino", "mae", "simclr")

# ViT-S/16 with the paper's view shapes on the GPU (batches small enough for a quick step); the 2-block debug ViT
# with tiny views on the CPU, so a dry run and the tests take seconds.
GPU_FLAGS = {
    "dino": ["--arch", "vit_small", "--batch_size_per_gpu", "16"],
    "mae": ["--model", "vit_small", "--batch_size", "32", "--mask_ratio", "0.75", "--norm_pix_loss"],
    "simclr": ["--arch", "vit_small", "--batch_size", "32"],
}
TOY_FLAGS = {
    "dino": ["--arch", "vit_debug_patch8", "--batch_size_per_gpu", "2", "--global_crops_size", "32",
             "--local_crops_size", "16", "--local_crops_number", "2", "--out_dim", "64"],
    "mae": ["--model", "vit_debug_patch8", "--batch_size", "2", "--input_size", "32"],
    "simclr": ["--arch", "vit_debug_patch8", "--batch_size", "2", "--size", "32"],
}


def method_flags(method: str, toy: bool) -> list[str]:
    """The training flags of one check; SimCLR's required --ckpt_path is never written to (no checkpoint saved)."""
    flags = list((TOY_FLAGS if toy else GPU_FLAGS)[method])
    if method == "simclr":
        flags += ["--ckpt_path", "unused"]
    return flags


def build_stepper(method: str, precision: str, device: torch.device, toy: bool, info: Any = None) -> tuple[Any, ...]:
    """(TrainStep, views, schedule values, GradScaler) for one method, as bench_train.py builds its bare step.

    The schedule is read at mid-training (step 50 of 100 per epoch, like bench_train.py): at step 0 the warm-up lr
    is 0 and a correct step would not move the weights.
    """
    from data.augment import get_recipe
    from utils.distributed import DistInfo
    from utils.training import parse_config
    from utils.training.loop import build_model
    from utils.training.optim import build_optimizer
    from utils.training.schedules import build_schedules
    from utils.training.step import TrainStep

    info = info or DistInfo(rank=0, world_size=1, local_rank=0, device=device, is_main=True, launcher="single")
    argv = [*method_flags(method, toy), "--path_df", "unused.csv", "--device", str(device), "--precision", precision]
    cfg = parse_config(method, argv).with_world(info.world_size)
    recipe = get_recipe(cfg.recipe, **{k: v for k, v in cfg.recipe_overrides.items() if v is not None})
    torch.manual_seed(0)
    model = build_model(cfg, device).train()
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    values = build_schedules(cfg, steps_per_epoch=100).at(50 * cfg.epochs)
    stepper = TrainStep(cfg, model, optimizer, scaler, precision, info, cfg.seed)
    gen = torch.Generator(device=device).manual_seed(1 + info.rank)
    batch = cfg.batch_per_gpu
    views = [torch.randn(v.count * batch, len(cfg.channels), v.size, v.size, device=device, generator=gen)
             for v in recipe.views]
    return stepper, views, values, scaler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(stepper: Any, views: list[torch.Tensor], values: dict[str, float], steps: int,
              device: torch.device) -> tuple[list[float], list[float], int]:
    """(losses, step seconds, changed parameter tensors) after ``steps`` optimizer steps from the initial weights."""
    before = [p.detach().clone() for p in stepper.trainable]
    losses, seconds = [], []
    for i in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        logs = stepper(views, 0, i, i, values)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(logs["loss"]))
    changed = sum(int(not torch.equal(a, p.detach())) for a, p in zip(before, stepper.trainable, strict=True))
    return losses, seconds, changed


def train_step_case(method: str, precision: str, device: torch.device, toy: bool, steps: int = 4) -> dict[str, Any]:
    """One (method, precision) case: pass when every loss is finite and the weights moved.

    Several steps, because fp16's GradScaler skips the optimizer step while it lowers its initial scale after an
    overflow; the time is the mean of the steps after the first (CUDA kernels and autotuning warm up on the first).
    """
    if precision == "fp16" and device.type != "cuda":
        return {"method": method, "precision": precision, "status": "skip", "reason": "fp16 needs CUDA"}
    t0 = time.perf_counter()
    try:
        stepper, views, values, scaler = build_stepper(method, precision, device, toy)
        losses, seconds, changed = run_steps(stepper, views, values, steps, device)
    except Exception as exc:  # a crash is this case's failure; the other cases still run
        return {"method": method, "precision": precision, "status": "fail", "reason": f"{type(exc).__name__}: {exc}",
                "seconds": round(time.perf_counter() - t0, 2)}
    finite = all(math.isfinite(x) for x in losses)
    timed = seconds[1:] or seconds
    reasons = [r for r, bad in (("non-finite loss", not finite), ("weights unchanged", changed == 0)) if bad]
    return {
        "method": method, "precision": precision, "status": "fail" if reasons else "pass", "reason": "; ".join(reasons),
        "losses": losses, "step_ms": round(1000 * sum(timed) / len(timed), 2), "changed_tensors": changed,
        "trainable_tensors": len(stepper.trainable), "grad_scale": float(scaler.get_scale()) if scaler.is_enabled()
        else None, "batch": stepper.cfg.batch_per_gpu, "arch": stepper.cfg.arch, "device": str(device),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def train_cases(device: torch.device, precisions: list[str], toy: bool) -> list[dict[str, Any]]:
    """Every method in every precision."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return [train_step_case(m, p, device, toy) for m in METHODS for p in precisions]


def ddp_check(device_flag: str, toy: bool) -> dict[str, Any]:
    """Inside a 2-process launch: the process group, all_reduce, all_gather with gradients, then two DDP DINO steps.

    Pass when the collectives give the exact expected values, the losses are finite and, after the steps, the
    weights moved and every rank holds identical weights (``rank_digests``, as the training loop's check_replicas).
    """
    from utils import distributed
    from utils.training.checkpointing import rank_digests

    info = distributed.init_distributed(device=device_flag)
    try:
        world = info.world_size
        reduced = float(distributed.all_reduce_mean(torch.tensor([float(info.rank)], device=info.device)).item())
        x = torch.full((2, 3), float(info.rank + 1), device=info.device, requires_grad=True)
        gathered = distributed.all_gather_with_grad(x)
        gathered.sum().backward()
        want = torch.cat([torch.full((2, 3), float(r + 1), device=info.device) for r in range(world)])
        stepper, views, values, _ = build_stepper("dino", "bf16", info.device, toy, info)
        losses, seconds, changed = run_steps(stepper, views, values, 2, info.device)
        digests = rank_digests(stepper.model)
        checks = {
            "all_reduce_mean": abs(reduced - (world - 1) / 2) < 1e-6,
            "all_gather": bool(torch.equal(gathered.detach(), want)),
            "all_gather_grad": bool(torch.equal(x.grad, torch.full_like(x, float(world)))),
            "finite_loss": all(math.isfinite(v) for v in losses),
            "weights_changed": changed > 0,
            "replicas_identical": len(set(digests)) == 1,
        }
        return {"status": "pass" if world > 1 and all(checks.values()) else "fail", "world_size": world,
                "backend": torch.distributed.get_backend() if world > 1 else None, "device": str(info.device),
                "checks": checks, "losses": losses, "step_ms": round(1000 * seconds[-1], 2), "is_main": info.is_main}
    finally:
        distributed.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Run one piece and print its result line; exit 1 when a case failed, so the runner sees it without parsing."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("train", "ddp"))
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--toy", action="store_true", help="2-block debug ViT and tiny views (CPU dry run)")
    opts = p.parse_args(argv)
    if opts.what == "train":
        cases = train_cases(torch.device(opts.device), opts.precisions, opts.toy)
        print(f"{MARK} {json.dumps(cases)}", flush=True)
        return int(any(c["status"] == "fail" for c in cases))
    result = ddp_check(opts.device, opts.toy)
    if result.pop("is_main"):
        print(f"{MARK} {json.dumps(result)}", flush=True)
    return int(result["status"] != "pass")


if __name__ == "__main__":
    sys.exit(main())
