"""Held-out validation for the training loop: a (plate, well)-grouped split, fixed-seed loss and contrastive ranks.

The paper split SimCLR's CSV by row order (leaking wells across the split) and validated with fresh random
augmentations each epoch. Here the split is grouped and seeded, and every validation pass sees the same crops,
augmentations and masks, so its numbers are comparable from epoch to epoch. Validation never touches the training
RNG streams, the weights, the optimizer or the model buffers, so exact resume is unaffected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.datasets import collate_views, seed_worker
from utils import distributed
from utils.errors import ConfigError
from utils.seeding import keyed_generator, sample_seed

GROUP_COLUMNS: dict[str, tuple[str, ...]] = {"well": ("plate", "well"), "plate": ("plate",)}
TOP_K = (1, 5)


@dataclass
class Split:
    """Row positions of the training and validation sites and a summary for hp.json / val_split.json."""

    train: np.ndarray
    val: np.ndarray
    summary: dict[str, Any]


def split_sites(table: pd.DataFrame, fraction: float, group: str, seed: int) -> Split:
    """Hold out whole groups (wells or plates) whose sites sum closest to ``fraction``, independent of row order."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val_fraction must be in (0, 1) to split, got {fraction}")
    if group not in GROUP_COLUMNS:
        raise ConfigError(f"--val_group {group!r}: choose from {sorted(GROUP_COLUMNS)}")
    columns = GROUP_COLUMNS[group]
    missing = [c for c in columns if c not in table.columns or table[c].isna().all()]
    if missing:
        raise ConfigError(f"--val_group {group} needs column(s) {missing} in the dataset CSV: add them, "
                          "use --val_group plate, or disable validation with --val_fraction 0")
    keys = table[list(columns)].astype(str).agg("/".join, axis=1).to_numpy()
    groups, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)  # sorted: no row-order effect
    if len(groups) < 2:
        raise ConfigError(f"--val_fraction {fraction}: the dataset has a single {group} ({groups[0]}), so no grouped "
                          "split exists; use --val_group well or --val_fraction 0")
    order = np.random.default_rng(sample_seed(seed, "val_split", group)).permutation(len(groups))
    cumulative = np.cumsum(sizes[order])[:-1]  # at least one group stays in training
    n_val_groups = int(np.argmin(np.abs(cumulative - fraction * len(table)))) + 1
    is_val_group = np.zeros(len(groups), dtype=bool)
    is_val_group[order[:n_val_groups]] = True
    val_mask = is_val_group[inverse]
    summary = {
        "val_group": group, "val_fraction_requested": fraction, "val_fraction": float(val_mask.mean()),
        "train_sites": int((~val_mask).sum()), "val_sites": int(val_mask.sum()), "train_groups": int(
            len(groups) - n_val_groups), "val_groups": int(n_val_groups), "seed": seed,
        "val_group_keys": sorted(groups[is_val_group].tolist()),
    }
    return Split(np.flatnonzero(~val_mask), np.flatnonzero(val_mask), summary)


def positive_ranks(sim: torch.Tensor, pos_idx: torch.Tensor, self_idx: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's positive among its 2N-1 candidates (all keys but itself); ties count in its favour.

    ``sim`` is (queries, keys); rank = number of other candidates scoring strictly higher than the positive.
    """
    rows = torch.arange(sim.shape[0], device=sim.device)
    pos = sim[rows, pos_idx]
    higher = sim > pos[:, None]
    higher[rows, self_idx] = False
    return higher.sum(dim=1)


def rank_metrics(ranks: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's SimCLR metrics: top-1 and top-5 accuracy of the positive, and its mean 1-based position."""
    ranks = ranks.double()
    out = {f"acc_top{k}": (ranks < k).double().mean() for k in TOP_K}
    out["acc_mean_pos"] = 1.0 + ranks.mean()
    return out


def _gather_views(q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(views, n, d) from every rank as (views, n_total, d) in one collective (no gradient), and this rank's offset."""
    if not distributed.is_distributed():
        return q, 0
    parts = [torch.empty_like(q) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, q.contiguous())
    return torch.cat(parts, dim=1), dist.get_rank() * q.shape[1]


@torch.no_grad()
def contrastive_metrics(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Ranks of the positive for the 2N views ``z`` (view-major: rows i and i+N pair), against every rank's views."""
    q = torch.nn.functional.normalize(z.detach().float(), dim=1)
    q1, q2 = q.chunk(2)
    keys, offset = _gather_views(torch.stack([q1, q2]))
    k1, k2 = keys.unbind(0)
    n_local, n_total = q1.shape[0], k1.shape[0]
    sim = torch.cat([q1, q2]) @ torch.cat([k1, k2]).T
    local = torch.arange(n_local, device=z.device) + offset
    self_idx = torch.cat([local, local + n_total])
    pos_idx = torch.cat([local + n_total, local])
    return rank_metrics(positive_ranks(sim, pos_idx, self_idx))


class ProjectionTap:
    """Captures the projection output of each forward (a hook on ``mlp``), for the contrastive accuracy metrics."""

    def __init__(self, model: nn.Module) -> None:
        self.output: torch.Tensor | None = None
        self._handle = model.mlp.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self.output = output.detach()

    def metrics(self) -> dict[str, torch.Tensor]:
        """Metrics of the last forward's views (a collective when distributed: every rank calls it)."""
        if self.output is None:
            raise RuntimeError("ProjectionTap.metrics called before a forward pass")
        out, self.output = contrastive_metrics(self.output), None
        return out

    def close(self) -> None:
        """Remove the hook."""
        self._handle.remove()


METRIC_TAPS: dict[str, Callable[[nn.Module], ProjectionTap]] = {"simclr": ProjectionTap}


@contextmanager
def frozen_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, no gradients, buffers restored (DINO's centre) and global RNGs untouched for the duration."""
    was_training = model.training
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(buffers[name])
        model.train(was_training)


class Validator:
    """One validation pass over this rank's fixed shard of the held-out sites, averaged over ranks."""

    def __init__(
        self, method: str, dataset: Any, batch_per_gpu: int, info: distributed.DistInfo, seed: int,
        num_workers: int, pin_memory: bool,
    ) -> None:
        self.method, self.info, self.seed = method, info, seed
        self.dataset = dataset
        self.dataset.set_epoch(0)  # the same crops every pass
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False,
                                     drop_last=True)
        shard = len(sampler)
        if shard < 1 or (method == "simclr" and shard * info.world_size < 2):
            raise ConfigError(f"the validation split has {len(dataset)} site(s), too few for {info.world_size} "
                              "process(es): raise --val_fraction or disable validation with --val_fraction 0")
        self.batch = min(batch_per_gpu, shard)  # equal on every rank, so collectives line up
        self.loader = DataLoader(
            dataset, batch_size=self.batch, sampler=sampler, num_workers=num_workers, collate_fn=collate_views,
            pin_memory=pin_memory, drop_last=True, worker_init_fn=seed_worker, persistent_workers=num_workers > 0,
            generator=keyed_generator(seed, "cpu", "val_loader"),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def run(
        self, model: nn.Module, prepare: Callable[[list[torch.Tensor], torch.Generator], list[torch.Tensor]],
        autocast: Callable[[], Any], epoch: int, step: int, values: dict[str, float],
    ) -> dict[str, float]:
        """``val_loss`` (+ ``val_acc_*`` for SimCLR) with fixed crop, augmentation and mask seeds."""
        device = self.info.device
        tap = METRIC_TAPS[self.method](model) if self.method in METRIC_TAPS else None
        sums: dict[str, torch.Tensor] = {}
        try:
            with frozen_state(model, device):
                bar = tqdm(total=len(self.loader), desc=f"{self.method} validation", leave=False, dynamic_ncols=True,
                           disable=not self.info.is_main)
                for it, batch in enumerate(self.loader):
                    gen = keyed_generator(self.seed, device, "val_augment", it, self.info.rank)
                    views = prepare(batch["views"], gen)
                    state = {"epoch": epoch, "step": step, "iteration": it, **values,
                             "generator": keyed_generator(self.seed, device, "val_model", it, self.info.rank)}
                    with autocast():
                        loss, _ = model(views, state)
                    logs = {"loss": loss.detach().double(), **(tap.metrics() if tap is not None else {})}
                    for key, value in logs.items():
                        sums[key] = sums[key] + value if key in sums else value
                    bar.update(1)
                bar.close()
        finally:
            if tap is not None:
                tap.close()
        keys = sorted(sums)
        vec = torch.stack([sums[k].to(device=device, dtype=torch.float64) for k in keys]) / len(self.loader)
        vec = distributed.all_reduce_mean(vec)
        out = {f"val_{k}": v for k, v in zip(keys, vec.cpu().tolist())}
        if not math.isfinite(out["val_loss"]):
            raise FloatingPointError(f"{self.method}: validation loss is {out['val_loss']} after epoch {epoch}")
        return out
