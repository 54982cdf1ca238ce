"""Training checkpoints: what goes in them, exact restore, automatic resume, which files are kept, and the proof
that every DDP replica ended with the same weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.checkpoints import FORMAT, make_checkpoint, restore_method, save_checkpoint
from utils import distributed
from utils.errors import CheckpointError
from utils.fileio import write_json_atomic
from utils.training.config import TrainConfig

BEST_PROBE_CKPT = "checkpoint_best_probe.pth"
BEST_PROBE_JSON = "best_probe.json"


def checkpoint_state(
    cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    epoch: int, step: int, norm: Any,
) -> dict[str, Any]:
    """Everything needed to resume exactly and to embed later, in plain types (weights_only loadable)."""
    return make_checkpoint(
        cfg.method, model, arch=cfg.arch, args=dict(cfg.flags), intensity=norm, channels=list(cfg.channels),
        epoch=epoch, step=step, optimizer=optimizer, scaler=scaler,
    )


def restore(
    ckpt: dict[str, Any], cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, path: Path,
) -> tuple[int, int]:
    """Load model, heads, optimizer and scaler; return (finished epochs, optimizer step)."""
    if ckpt.get("format") != FORMAT or ckpt.get("method") != cfg.method:
        raise CheckpointError(
            f"{path}: not a {cfg.method} training checkpoint of this tool "
            f"(format={ckpt.get('format')!r}, method={ckpt.get('method')!r}); start a new --output_dir"
        )
    try:
        restore_method(model, ckpt)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from exc
    return int(ckpt["epoch"]), int(ckpt["step"])


def find_resume(cfg: TrainConfig) -> Path | None:
    """--resume PATH, else OUTPUT/checkpoint.pth when it exists (automatic resume)."""
    if cfg.resume:
        path = Path(cfg.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such file")
        return path
    latest = cfg.output_dir / "checkpoint.pth"
    if latest.is_file() and not cfg.no_auto_resume:
        return latest
    return None


def read_best_probe(out_dir: Path) -> dict[str, float] | None:
    """The best probe so far of a run being resumed (best_probe.json), so a resume keeps the right best checkpoint."""
    path = out_dir / BEST_PROBE_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); delete it to restart the best-probe bookkeeping") from None


def check_replicas(model: nn.Module, info: distributed.DistInfo, out_dir: Path) -> None:
    """Write every rank's weight hash to rank_weights.json and fail loudly if DDP let the replicas drift apart."""
    digests = rank_digests(model)
    if info.is_main:
        write_json_atomic(out_dir / "rank_weights.json", {"digests": digests, "identical": len(set(digests)) == 1})
    if len(set(digests)) != 1:
        raise RuntimeError(f"model weights differ across ranks: {digests}")


def rank_digests(model: nn.Module) -> list[str]:
    """A hash of every rank's full model state, gathered on all ranks, to prove DDP kept the replicas identical."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    if not distributed.is_distributed():
        return [digest]
    out: list[Any] = [None] * distributed.get_world_size()
    torch.distributed.all_gather_object(out, digest)
    return [str(d) for d in out]


def save_epoch(ckpt: dict[str, Any], out_dir: Path, cfg: TrainConfig, finished: int) -> None:
    """checkpoint.pth every epoch; the numbered file every ``ckpt_every`` finished epochs and at the end."""
    save_checkpoint(out_dir / "checkpoint.pth", ckpt)
    if (cfg.ckpt_every > 0 and finished % cfg.ckpt_every == 0) or finished == cfg.epochs:
        save_checkpoint(out_dir / cfg.ckpt_pattern.format(epoch=finished), ckpt)
