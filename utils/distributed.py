"""Process-group set-up for every launcher we support, so the training loop never has to know how it was started."""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.errors import ConfigError, UserError
from utils.rundir import OutputLock


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``is_main`` decides who writes files and prints."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    launcher: str

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one member is running."""
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from exc


def detect_launcher(local_rank_flag: int | None = None) -> tuple[str, int, int, int]:
    """Return (launcher, rank, world_size, local_rank) from torchrun/launch env, SLURM, or a plain single process."""
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        local = _env_int("LOCAL_RANK")
        if local is None:
            local = local_rank_flag if local_rank_flag is not None and local_rank_flag >= 0 else 0
        return "torchrun", rank, world, local
    slurm_world = _env_int("SLURM_NTASKS")
    if slurm_world is not None and slurm_world > 1:
        rank = _env_int("SLURM_PROCID") or 0
        local = _env_int("SLURM_LOCALID") or 0
        if not os.environ.get("MASTER_ADDR"):
            raise ConfigError(
                "SLURM job with SLURM_NTASKS>1 but MASTER_ADDR is not set: export MASTER_ADDR=<first node> "
                "(e.g. $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)) and MASTER_PORT before srun"
            )
        os.environ.setdefault("MASTER_PORT", "29500")
        return "slurm", rank, slurm_world, local
    return "single", 0, 1, 0


def resolve_device(requested: str | None, local_rank: int, gpus: list[int] | None = None) -> torch.device:
    """Pick cuda:<local gpu> when CUDA is available (or asked for), else the CPU."""
    if requested is not None and requested.startswith("cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested is not None and requested.startswith("cuda"):
            raise ConfigError(f"--device {requested} requested but CUDA is not available: use --device cpu")
        return torch.device("cpu")
    if requested is not None and ":" in requested:
        return torch.device(requested)
    # Without --gpus, wrap like the paper (SLURM tasks often see only their own GPU, so local rank 1 -> cuda:0).
    index = gpus[local_rank] if gpus else local_rank % torch.cuda.device_count()
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"GPU {index} requested but only {torch.cuda.device_count()} visible (check --gpus / CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", index)


def init_distributed(
    local_rank: int | None = None, device: str | None = None, gpus: list[int] | None = None, timeout_min: int = 30
) -> DistInfo:
    """Initialise the process group (NCCL on GPU, gloo on CPU) for torchrun, torch.distributed.launch, SLURM or none."""
    launcher, rank, world, local = detect_launcher(local_rank)
    dev = resolve_device(device, local, gpus)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "rank": rank, "world_size": world}
        kwargs["timeout"] = datetime.timedelta(minutes=timeout_min)
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, is_main=rank == 0, launcher=launcher)


def claim_output(folder: str | os.PathLike[str], info: DistInfo) -> OutputLock | None:
    """Rank 0 locks the output folder and every rank learns the outcome, so a held folder stops the whole job with
    the same one-line error instead of leaving the other ranks waiting at their first collective."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = OutputLock(folder).acquire()
        except UserError as exc:
            error = str(exc)
    if info.distributed and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    return lock


def is_distributed() -> bool:
    """True inside an initialised process group with more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    """Number of processes, 1 outside a process group."""
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group so the interpreter exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (returns a new tensor)."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients flowing to the local part."""
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


def free_port() -> int:
    """An unused local TCP port for a self-spawned process group."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawned(local_rank: int, fn: Callable[..., Any], world: int, args: tuple[Any, ...]) -> None:
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)})
    fn(*args)


def spawn_local(fn: Callable[..., Any], nprocs: int, args: tuple[Any, ...]) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes with torchrun-style env (SimCLR's ``--gpus 0 1`` launch)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    mp.spawn(_spawned, args=(fn, nprocs, args), nprocs=nprocs, join=True)
