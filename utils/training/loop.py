"""The one training loop for DINO, MAE and SimCLR: data on the GPU, schedules per step, exact resume, rank-0 logging."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models.checkpoints import save_checkpoint
from utils import distributed
from models.collapse import CollapseMonitor
from utils.errors import CheckpointError, CollapseError, ConfigError, DataError, DivergenceError
from utils.fileio import write_json_atomic
from utils.logging import RunLogger
from utils.training.probe import Probe, ProbeConfig, better, run_probe
from utils.training.schedules import cosine_schedule, linear_warmup_constant
from utils.seeding import sample_seed, seed_everything
from utils.training.args import RunConfig, plain_args, resolve_config

BEST_PROBE_CKPT = "checkpoint_best_probe.pth"
DATASET_INTENSITY = "dataset"
BEST_PROBE_JSON = "best_probe.json"


@dataclass
class Schedules:
    """Per-optimizer-step values, precomputed so a resumed run reads exactly what the first run read."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray | None
    teacher_temp: np.ndarray | None

    def at(self, step: int) -> dict[str, float]:
        """The scheduled values for one optimizer step (the last value past the end)."""
        i = min(step, len(self.lr) - 1)
        values = {"lr": float(self.lr[i]), "wd": float(self.wd[i])}
        if self.momentum is not None:
            values["momentum"] = float(self.momentum[i])
        if self.teacher_temp is not None:
            values["teacher_temp"] = float(self.teacher_temp[i])
        return values


def build_schedules(cfg: RunConfig, steps_per_epoch: int) -> Schedules:
    """LR (warm-up + cosine), weight decay (cosine), teacher momentum (cosine to 1) and teacher temperature."""
    lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.warmup_start_lr)
    wd = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
    momentum = None
    if cfg.momentum_teacher is not None:
        momentum = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)
    temp = None
    if cfg.teacher_temp is not None:
        warm, final, warm_epochs = cfg.teacher_temp
        temp = linear_warmup_constant(warm, final, cfg.epochs, steps_per_epoch, warm_epochs)
    return Schedules(lr=lr, wd=wd, momentum=momentum, teacher_temp=temp)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two AdamW groups as in the paper: weights decay, biases and 1-D (norm) parameters do not."""
    if hasattr(model, "param_groups"):
        groups = list(model.param_groups())
    else:
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    for group in groups:
        group["apply_wd"] = group.get("weight_decay", None) != 0.0
    return [g for g in groups if len(g["params"]) > 0]


def build_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD for DINO's flag) over the paper's parameter groups; lr and wd are set every step."""
    groups = param_groups(model)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=cfg.betas)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    raise ConfigError(f"optimizer {cfg.optimizer!r} is not supported: use adamw or sgd")


def apply_schedule(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    """Set this step's lr on every group and wd on the groups that decay."""
    for group in optimizer.param_groups:
        group["lr"] = values["lr"]
        group["weight_decay"] = values["wd"] if group.get("apply_wd", True) else 0.0


def clip_gradients(params: list[nn.Parameter], max_norm: float, mode: str) -> torch.Tensor:
    """DINO clips each parameter tensor on its own (the paper); the others clip the global norm.

    Returns the global gradient norm before clipping as a device tensor (no host sync).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm(grads)).float()
    if max_norm > 0:
        if mode == "per_tensor":
            coefs = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, [c.to(g.dtype) for g, c in zip(grads, coefs.unbind())])
        else:
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return norms.norm(2)


def resolve_precision(requested: str | None, device: torch.device) -> str:
    """bf16 on GPU and fp32 on CPU unless asked otherwise; fp16 needs CUDA."""
    if requested is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 / --use_fp16 true needs a CUDA device: use --precision bf16 or fp32")
    return requested


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for the chosen precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_generator(seed: int, device: torch.device, *keys: object) -> torch.Generator:
    """A fresh generator keyed by (seed, purpose, epoch, step, rank): reproducible and resumable at any epoch."""
    return torch.Generator(device=device).manual_seed(sample_seed(seed, *keys))


class ViewPipeline:
    """Moves uint16 views to the device and augments + standardises them there, one batched call per view spec."""

    def __init__(self, recipe: Any, norm: Any, device: torch.device) -> None:
        from data.intensity import uint16_to_float

        self.to_float = uint16_to_float
        self.augs = [aug.to(device) if aug is not None else None for aug in recipe.gpu_aug_per_view]
        self.norm = norm
        self.device = device

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """uint16 (count*B, C, s, s) per spec (view-major, from collate_views) -> augmented, standardised floats."""
        out = []
        for x, aug in zip(views, self.augs):
            x = self.to_float(x.to(self.device, non_blocking=True))
            if aug is not None:
                x = aug(x, generator=generator)
            out.append(self.norm.standardize(x))
        return out


class EpochKeySampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys: persistent workers keep a dataset copy that never sees ``set_epoch``."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        epoch = self.sampler.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def load_table(args: argparse.Namespace) -> Any:
    """The validated site table of ``--path_df``."""
    from data.schema import TRAIN_REQUIRED, load_site_table

    return load_site_table(args.path_df, image_root=args.image_root, channels=tuple(args.channels),
                           required=TRAIN_REQUIRED)


def build_recipe(cfg: RunConfig) -> Any:
    """The method's view recipe with the flags' overrides."""
    from data.augment import get_recipe

    return get_recipe(cfg.recipe, **{k: v for k, v in cfg.recipe_overrides.items() if v is not None})


def build_loader(
    cfg: RunConfig, args: argparse.Namespace, info: distributed.DistInfo, table: Any = None
) -> tuple[DataLoader, Any, DistributedSampler, Any]:
    """Site table (default: all of --path_df) -> crop dataset -> DataLoader with a shuffling DistributedSampler."""
    from data.datasets import TrainCropDataset, collate_views, seed_worker

    table = load_table(args) if table is None else table
    recipe = build_recipe(cfg)
    dataset = TrainCropDataset(table, recipe, channels=tuple(args.channels), seed=args.seed)
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    workers = max(0, args.num_workers)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_per_gpu, sampler=EpochKeySampler(sampler), num_workers=workers,
        collate_fn=collate_views,
        pin_memory=cfg.pin_mem and info.device.type == "cuda", drop_last=True, worker_init_fn=seed_worker,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"{args.path_df}: {len(dataset)} training sites give no full batch of {cfg.batch_per_gpu} per process on "
            f"{info.world_size} process(es): lower the batch size or add sites"
        )
    return loader, dataset, sampler, recipe


def build_model(method: str, cfg: RunConfig, in_chans: int, device: torch.device, compile_: bool) -> nn.Module:
    """Instantiate the method module from the registry, on the device, with backbones compiled in place if asked.

    ``Module.compile()`` keeps the state_dict keys (no ``_orig_mod.``), so checkpoints stay timm-keyed.
    """
    from models.registry import METHODS

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}: choose from {sorted(METHODS)}")
    model = METHODS[method].build(cfg.model_args, in_chans).to(device)
    if compile_:
        for module in model.modules():
            if type(module).__name__ == "VisionTransformer":
                module.compile()
    return model


def checkpoint_state(
    cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    epoch: int, step: int, args: argparse.Namespace, norm: Any,
) -> dict[str, Any]:
    """Everything needed to resume exactly and to embed later, in plain types (weights_only loadable)."""
    from models.checkpoints import make_checkpoint

    return make_checkpoint(
        cfg.method, model, arch=cfg.arch, args=plain_args(args), intensity=norm, channels=list(args.channels),
        epoch=epoch, step=step, optimizer=optimizer, scaler=scaler,
    )


def restore(
    ckpt: dict[str, Any], cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, path: Path,
) -> tuple[int, int]:
    """Load model, heads, optimizer and scaler; return (finished epochs, optimizer step)."""
    from models.checkpoints import FORMAT, restore_method

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


def find_resume(args: argparse.Namespace, out_dir: Path) -> Path | None:
    """--resume PATH, else OUTPUT/checkpoint.pth when it exists (automatic resume)."""
    if args.resume:
        path = Path(args.resume)
        if not path.is_file():
            raise CheckpointError(f"--resume {path}: no such file")
        return path
    latest = out_dir / "checkpoint.pth"
    if latest.is_file() and not args.no_auto_resume:
        return latest
    return None


def load_intensity_norm(cfg: RunConfig, channels: list[str], table: Any = None, seed: int = 0,
                        info: distributed.DistInfo | None = None, workers: int = 2) -> Any:
    """The --intensity preset or stats.json, reordered to --channels (every channel needs statistics).

    ``dataset`` computes the statistics of 200 seeded sites of the training table itself (``data.stats``) on rank 0
    and broadcasts them, so the sites are read once; they go into the checkpoint, so inference standardises with
    them too. The paper's constants fit only the paper's images (docs/LEARNING.md, cause 2).
    """
    from data.intensity import IntensityNorm, get_intensity_norm

    if cfg.intensity == DATASET_INTENSITY:
        from data.stats import dataset_intensity_norm

        if table is None:
            raise ConfigError("--intensity dataset needs the training site table")
        box: list[Any] = [None]
        if info is None or info.is_main:
            try:
                box[0] = dataset_intensity_norm(table, channels, n_sites=200, seed=seed, workers=max(1, workers),
                                                name="dataset")[0].to_dict()
            except DataError as exc:  # sent to the other ranks too, so none waits for statistics that never come
                box[0] = {"error": f"--intensity dataset: {exc}"}
        if distributed.is_distributed():
            torch.distributed.broadcast_object_list(box, src=0)
        if "error" in box[0]:
            raise DataError(box[0]["error"])
        return IntensityNorm.from_dict(box[0])
    try:
        norm = get_intensity_norm(cfg.intensity)
    except DataError as exc:
        raise ConfigError(f"--intensity: {exc}, nor '{DATASET_INTENSITY}' (this data set's own statistics)") from None
    if tuple(norm.channels) != tuple(channels):
        missing = sorted(set(channels) - set(norm.channels))
        if missing:
            raise ConfigError(f"--intensity {cfg.intensity}: no statistics for channel(s) {missing}; "
                              f"it has {list(norm.channels)}")
        norm = norm.select(list(channels))
    return norm


class _Meter:
    """Running sums for the epoch summary, kept on the device so steps never wait for the host.

    Each key has its own count: the effective rank, for one, is only computed on the logged steps.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self, device: torch.device) -> dict[str, float]:
        """Mean over this rank's steps, averaged over ranks (one sync per epoch)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        vec = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device).reshape(())
                           / self.counts[k] for k in keys])
        vec = distributed.all_reduce_mean(vec) if distributed.is_distributed() else vec
        return dict(zip(keys, vec.cpu().tolist()))


def _host(values: dict[str, Any]) -> dict[str, float]:
    """Scalars as floats (one sync), for TensorBoard and the progress bar."""
    return {k: float(v) for k, v in values.items()}


def train(method: str, args: argparse.Namespace) -> Path:
    """Train one method end to end; SimCLR's ``--gpus`` (without a launcher) spawns one process per GPU id."""
    launcher, *_ = distributed.detect_launcher(args.local_rank)
    if not (hasattr(args, "gpus") and launcher == "single" and torch.cuda.is_available()):
        return _train_process(method, args, None)  # a launcher (or the CPU) decides the devices
    visible = torch.cuda.device_count()
    gpus = args.gpus or list(range(visible))  # the paper's default [0, 1] failed on one-GPU machines
    if any(not 0 <= g < visible for g in gpus):
        ids = " ".join(map(str, gpus))
        raise ConfigError(f"--gpus {ids}: only {visible} GPU(s) visible (ids 0..{visible - 1})")
    if len(gpus) > 1:
        distributed.spawn_local(_train_process, len(gpus), (method, args, list(gpus)))
        return Path(args.ckpt_path)
    return _train_process(method, args, list(gpus))


class Stepper:
    """One training iteration (device augmentation, forward, backward, clip, optimizer, EMA), shared with the bench."""

    def __init__(
        self, cfg: RunConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
        precision: str, info: distributed.DistInfo, seed: int, pipeline: ViewPipeline | None = None,
        tap: Any = None,
    ) -> None:
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.precision, self.info, self.seed, self.pipeline, self.tap = precision, info, seed, pipeline, tap
        self.device = info.device
        self.ddp = model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids)
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def prepare(self, views: list[torch.Tensor], epoch: int, it: int) -> list[torch.Tensor]:
        """uint16 loader views -> augmented, standardised device tensors (generator keyed by epoch/iteration/rank)."""
        assert self.pipeline is not None
        return self.pipeline(views, step_generator(self.seed, self.device, "augment", epoch, it, self.info.rank))

    def step(
        self, views: list[torch.Tensor], epoch: int, it: int, step: int, values: dict[str, float]
    ) -> dict[str, Any] | None:
        """Forward/backward one micro-batch; after the last of an accumulation, clip and step and return the logs."""
        accum = self.cfg.accum_iter
        micro = it % accum
        if micro == 0:
            apply_schedule(self.optimizer, values)
        torch.manual_seed(sample_seed(self.seed, "global", epoch, it, self.info.rank))  # drop-path etc.
        state = {"epoch": epoch, "step": step, "iteration": it, **values,
                 "generator": step_generator(self.seed, self.device, "model", epoch, it, self.info.rank)}
        sync = micro == accum - 1
        no_sync = self.ddp.no_sync() if (self.info.distributed and not sync) else contextlib.nullcontext()
        with no_sync:
            with autocast(self.precision, self.device):
                loss, logs = self.ddp(views, state)
            self.scaler.scale(loss / accum).backward()
        if not sync:
            return None
        if self.tap is not None:  # e.g. SimCLR's top-1/top-5/mean-position of the positive, from the forward
            logs = {**logs, **self.tap.metrics()}
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.trainable, self.cfg.clip_grad, self.cfg.clip_mode)
        self.model.before_optimizer_step(state)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_step(state)
        return {"loss": loss.detach(), **logs, **values, "grad_norm": grad_norm, **self.model.collapse_stats()}


def _train_process(method: str, args: argparse.Namespace, gpus: list[int] | None) -> Path:
    info = distributed.init_distributed(args.local_rank, args.device, gpus)
    try:
        return _run(method, args, info)
    finally:
        distributed.cleanup()


@dataclass
class _Run:
    """What one epoch of training needs, built once by ``_run``."""

    method: str
    cfg: RunConfig
    args: argparse.Namespace
    info: distributed.DistInfo
    loader: DataLoader
    sampler: DistributedSampler
    dataset: Any
    stepper: Stepper
    schedules: Schedules
    logger: RunLogger
    iters: int
    steps_per_epoch: int
    validator: Any = None


def _run(method: str, args: argparse.Namespace, info: distributed.DistInfo) -> Path:
    """Set up data, model, optimizer and logging, resume if a checkpoint exists, then train epoch by epoch."""
    cfg = resolve_config(method, args, info.world_size)
    probe_cfg = probe_config(args)  # bad probe flags fail before any data is read
    device = info.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    precision = resolve_precision(cfg.precision, device)
    table = load_table(args)
    norm = load_intensity_norm(cfg, list(args.channels), table, args.seed, info, args.num_workers)
    probe = Probe(probe_cfg, method, tuple(args.channels), norm, device) if probe_cfg and info.is_main else None
    split = None
    if args.val_fraction > 0:
        from utils.training.validation import split_sites

        split = split_sites(table, args.val_fraction, args.val_group, args.seed)
        table, val_table = table.iloc[split.train], table.iloc[split.val]
    loader, dataset, sampler, recipe = build_loader(cfg, args, info, table)
    validator = None if split is None else build_validator(method, cfg, args, info, val_table, recipe)
    iters = len(loader) if args.max_steps_per_epoch is None else min(len(loader), args.max_steps_per_epoch)
    steps_per_epoch = iters // cfg.accum_iter
    if steps_per_epoch < 1:
        raise ConfigError(f"{iters} batches per epoch are fewer than --accum_iter {cfg.accum_iter}")
    iters = steps_per_epoch * cfg.accum_iter

    seed_everything(args.seed)  # identical initial weights on every rank and in every run with this seed
    model = build_model(method, cfg, len(args.channels), device, args.compile)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    start_epoch = cfg.start_epoch
    resume_path = find_resume(args, cfg.output_dir)
    if resume_path is not None:
        from models.checkpoints import load_checkpoint

        start_epoch, _ = restore(load_checkpoint(resume_path), cfg, model, optimizer, scaler, resume_path)
    from utils.training.validation import METRIC_TAPS

    tap = METRIC_TAPS[method](model) if method in METRIC_TAPS else None
    stepper = Stepper(cfg, model, optimizer, scaler, precision, info, args.seed, ViewPipeline(recipe, norm, device),
                      tap)
    logger = RunLogger(cfg.output_dir, info.is_main, tb_dir=cfg.tb_dir)
    split_info = {} if split is None else {k: v for k, v in split.summary.items() if k != "val_group_keys"}
    logger.write_hparams(cfg.hparams | {"precision": precision, "iters_per_epoch": iters, "recipe": recipe.to_dict(),
                                        "resumed_from": str(resume_path) if resume_path else None,
                                        "validation": split_info or None})
    if split is not None and info.is_main:
        write_json_atomic(cfg.output_dir / "val_split.json", split.summary)
    logger.truncate_epochs(start_epoch)
    if info.is_main:
        held_out = "" if split is None else (f" (+{split.summary['val_sites']} validation sites in "
                                             f"{split.summary['val_groups']} {args.val_group}s)")
        print(f"{method}: {len(dataset)} sites{held_out}, {info.world_size} process(es) on {device.type}, "
              f"{cfg.batch_per_gpu}/process x {cfg.accum_iter} accum, {iters} iters/epoch, lr {cfg.lr:.3g}, "
              f"{precision}, epochs {start_epoch}->{cfg.epochs}"
              + (f", resumed from {resume_path}" if resume_path else ""))
        if getattr(args, "gpus", None) and device.type == "cpu":
            print(f"note: --gpus {' '.join(map(str, args.gpus))} ignored: no CUDA device, training on the CPU")

    run = _Run(method, cfg, args, info, loader, sampler, dataset, stepper, build_schedules(cfg, steps_per_epoch),
               logger, iters, steps_per_epoch, validator)
    best = read_best_probe(cfg.output_dir) if resume_path is not None else None
    state_at = lambda done: checkpoint_state(cfg, model, optimizer, scaler, done, done * steps_per_epoch, args, norm)
    if start_epoch == 0 and args.save_init and info.is_main:  # the run's own random-initialisation baseline
        save_checkpoint(cfg.output_dir / cfg.ckpt_pattern.format(epoch=0), state_at(0))
    if probe_cfg is not None and start_epoch == 0:
        best = probe_epoch(run, probe, 0, best, state_at)
    monitor = CollapseMonitor(method)
    t_run, last = time.perf_counter(), {}
    end_epoch = cfg.epochs
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        last = train_one_epoch(run, epoch)
        if validator is not None and ((epoch + 1) % args.val_every == 0 or epoch + 1 == cfg.epochs):
            last |= validate(run, epoch)
        warning = monitor.update(last)
        last["collapsed"] = warning is not None
        logger.log_epoch(last)
        finished = epoch + 1
        if info.is_main:
            _save(state_at(finished), cfg.output_dir, cfg, finished)
        out_of_time = over_budget(args.max_minutes, time.perf_counter() - t_run, time.perf_counter() - t_epoch,
                                  info) and finished < cfg.epochs
        if probe_cfg is not None and (probe_cfg.due(finished, cfg.epochs) or out_of_time):
            best = probe_epoch(run, probe, finished, best, state_at)
        distributed.barrier()
        if warning is not None:
            if args.stop_on_collapse:
                logger.close()
                raise CollapseError(f"--stop_on_collapse: {warning} (checkpoint of epoch {finished} kept)")
            if info.is_main:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        if out_of_time:
            end_epoch = finished
            if info.is_main:
                print(f"{method}: --max_minutes {args.max_minutes:g} reached after epoch {finished} of {cfg.epochs}; "
                      f"checkpoint {cfg.output_dir / 'checkpoint.pth'} resumes from here", flush=True)
            break
    logger.close()
    _check_replicas(model, info, cfg.output_dir)
    if info.is_main:
        total = time.perf_counter() - t_run
        seen = (end_epoch - start_epoch) * iters * cfg.batch_per_gpu * info.world_size
        loss_txt = f"{last['train_loss']:.4f}" if last else "n/a (nothing left to train)"
        if "val_loss" in last:
            loss_txt += f", validation loss {last['val_loss']:.4f}"
        print(f"{method} done: epochs {start_epoch}->{end_epoch}, final loss {loss_txt}, "
              f"{seen / max(total, 1e-9):.1f} img/s, {total:.1f} s, checkpoint {cfg.output_dir / 'checkpoint.pth'}")
    return cfg.output_dir


def over_budget(max_minutes: float | None, elapsed: float, last_epoch: float, info: distributed.DistInfo) -> bool:
    """Whether another epoch as long as the last one would overrun ``--max_minutes`` (rank 0 decides for all)."""
    if max_minutes is None:
        return False
    decision = torch.tensor(float(elapsed + last_epoch > 60.0 * max_minutes), device=info.device)
    if distributed.is_distributed():
        torch.distributed.broadcast(decision, src=0)
    return bool(decision.item())


def probe_config(args: argparse.Namespace) -> ProbeConfig | None:
    """The probe settings of ``--probe_csv`` and friends, validated on every rank; None without ``--probe_csv``."""
    if not args.probe_csv:
        return None
    return ProbeConfig(Path(args.probe_csv), args.probe_every, args.probe_size, args.probe_stride,
                       args.probe_batch_size, args.image_root)


def read_best_probe(out_dir: Path) -> dict[str, float] | None:
    """The best probe so far of a run being resumed (best_probe.json), so a resume keeps the right best checkpoint."""
    path = out_dir / BEST_PROBE_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc}); delete it to restart the best-probe bookkeeping") from None


def probe_epoch(
    run: _Run, probe: Probe | None, finished: int, best: dict[str, float] | None, state_at: Any
) -> dict[str, float] | None:
    """Probe after ``finished`` epochs (0: before the first step), log it, keep checkpoint_best_probe.pth."""
    result = run_probe(probe, run.stepper.model, run.info)
    run.logger.log_probe(finished, result)
    if not run.info.is_main:  # only rank 0 writes the best checkpoint, so only it keeps the bookkeeping
        return best
    init = "" if finished else " (random initialisation)"
    print(f"{run.method} probe after {finished} epoch(s){init}: target mAP {result['probe_target_map']:.4f}, "
          f"replicate mAP {result['probe_replicate_map']:.4f} ({result['probe_seconds']:.1f} s)", flush=True)
    if better(result, best):
        best = {"epoch": finished, **result}
        save_checkpoint(run.cfg.output_dir / BEST_PROBE_CKPT, state_at(finished))
        write_json_atomic(run.cfg.output_dir / BEST_PROBE_JSON, best)
    return best


def train_one_epoch(run: _Run, epoch: int) -> dict[str, Any]:
    """One pass over the loader; returns the epoch record for log.txt (means over steps and ranks)."""
    cfg, info, device = run.cfg, run.info, run.info.device
    images_per_iter = cfg.batch_per_gpu * info.world_size
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    run.stepper.model.train()
    meter, t_epoch = _Meter(), time.perf_counter()
    with tqdm(total=run.iters, desc=f"{run.method} epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main,
              dynamic_ncols=True, leave=False) as bar:
        _run_epoch_steps(run, epoch, bar, meter, t_epoch, images_per_iter)
    elapsed = time.perf_counter() - t_epoch
    means = meter.means(device)
    if not math.isfinite(means.get("loss", 0.0)):
        raise DivergenceError(f"{run.method}: mean loss of epoch {epoch} is {means['loss']}")
    record: dict[str, Any] = {f"train_{k}": v for k, v in means.items()}
    record |= {"epoch": epoch, "img_per_s": run.iters * images_per_iter / max(elapsed, 1e-9), "epoch_time_s": elapsed}
    if device.type == "cuda":
        record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def _run_epoch_steps(run: _Run, epoch: int, bar: tqdm, meter: _Meter, t_epoch: float, images_per_iter: int) -> None:
    """The iterations of one epoch, logging every --log_every steps; the caller owns the progress bar."""
    cfg, device = run.cfg, run.info.device
    for it, batch in enumerate(run.loader):
        if it >= run.iters:
            break
        step = epoch * run.steps_per_epoch + it // cfg.accum_iter
        values = run.schedules.at(step)
        logs = run.stepper.step(run.stepper.prepare(batch["views"], epoch, it), epoch, it, step, values)
        bar.update(1)
        if logs is None:
            continue
        log_now = step % max(run.args.log_every, 1) == 0 or it == run.iters - 1
        if log_now and "embed_std" in logs:  # the SVD of the effective rank only on logged steps
            logs["embed_rank"] = run.stepper.model.collapse_stats(with_rank=True)["embed_rank"]
        meter.add(logs)
        if log_now:
            host = _host(logs)
            if not math.isfinite(host["loss"]):
                raise DivergenceError(f"{run.method}: loss is {host['loss']} at epoch {epoch} iteration {it}; "
                                      "lower --lr or try --precision fp32")
            host["img_per_s"] = (it + 1) * images_per_iter / (time.perf_counter() - t_epoch)
            if device.type == "cuda":
                host["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            run.logger.scalars(step, host)
            bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{values['lr']:.2e}")


def build_validator(
    method: str, cfg: RunConfig, args: argparse.Namespace, info: distributed.DistInfo, table: Any, recipe: Any
) -> Any:
    """The held-out sites as a fixed-crop dataset (own seed) sharded over ranks."""
    from data.datasets import TrainCropDataset
    from utils.training.validation import Validator

    dataset = TrainCropDataset(table, recipe, channels=tuple(args.channels), seed=sample_seed(args.seed, "val_crops"))
    return Validator(method, dataset, cfg.batch_per_gpu, info, args.seed, max(0, args.num_workers),
                     cfg.pin_mem and info.device.type == "cuda")


def validate(run: _Run, epoch: int) -> dict[str, float]:
    """Validation after ``epoch`` with the schedule values of its last step (DINO's teacher temperature)."""
    stepper = run.stepper
    step = (epoch + 1) * run.steps_per_epoch - 1
    return run.validator.run(
        stepper.model, lambda views, gen: stepper.pipeline(views, gen),
        lambda: autocast(stepper.precision, run.info.device), epoch, step, run.schedules.at(step),
    )


def _check_replicas(model: nn.Module, info: distributed.DistInfo, out_dir: Path) -> None:
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


def _save(ckpt: dict[str, Any], out_dir: Path, cfg: RunConfig, finished: int) -> None:
    """checkpoint.pth every epoch; the numbered file every ``ckpt_every`` finished epochs and at the end."""
    save_checkpoint(out_dir / "checkpoint.pth", ckpt)
    if (cfg.ckpt_every > 0 and finished % cfg.ckpt_every == 0) or finished == cfg.epochs:
        save_checkpoint(out_dir / cfg.ckpt_pattern.format(epoch=finished), ckpt)
