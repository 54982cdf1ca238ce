"""The one training loop for DINO, MAE and SimCLR: data on the GPU, schedules per step, exact resume, rank-0 logging.

``train(cfg)`` launches (SimCLR's ``--gpus`` spawns one process per id), ``build_run`` assembles what an epoch
needs, ``fit`` runs the epochs with checkpoints, probes, validation, the collapse watch and the time budget.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data.augment import AugmentRecipe
from data.datasets import TrainCropDataset
from data.intensity import IntensityNorm
from models.checkpoints import load_checkpoint, save_checkpoint
from models.collapse import CollapseMonitor
from models.registry import build_method
from utils import distributed
from utils.errors import CollapseError, ConfigError, DivergenceError
from utils.fileio import write_json_atomic
from utils.logging import RunLogger
from utils.precision import autocast, resolve_precision
from utils.seeding import sample_seed, seed_everything
from utils.training.checkpointing import (
    BEST_PROBE_CKPT,
    BEST_PROBE_JSON,
    check_replicas,
    checkpoint_state,
    find_resume,
    read_best_probe,
    restore,
    save_epoch,
)
from utils.training.config import TrainConfig
from utils.training.data import ViewPipeline, build_loader, crop_options, load_intensity_norm, load_table
from utils.training.optim import build_optimizer
from utils.training.probe import Probe, better, run_probe
from utils.training.schedules import Schedules, build_schedules
from utils.training.step import TrainStep
from utils.training.validation import METRIC_TAPS, Validator, split_sites


def train(cfg: TrainConfig) -> Path:
    """Train one method end to end; SimCLR's ``--gpus`` (without a launcher) spawns one process per GPU id."""
    launcher, *_ = distributed.detect_launcher(cfg.local_rank)
    if not (cfg.method == "simclr" and launcher == "single" and torch.cuda.is_available()):
        return run_process(cfg, None)  # a launcher (or the CPU) decides the devices
    visible = torch.cuda.device_count()
    gpus = list(cfg.gpus) if cfg.gpus else list(range(visible))  # the paper's default [0, 1] failed on one GPU
    if any(not 0 <= g < visible for g in gpus):
        ids = " ".join(map(str, gpus))
        raise ConfigError(f"--gpus {ids}: only {visible} GPU(s) visible (ids 0..{visible - 1})")
    if len(gpus) > 1:
        distributed.spawn_local(run_process, len(gpus), (cfg, gpus))
        return cfg.output_dir
    return run_process(cfg, gpus)


def run_process(cfg: TrainConfig, gpus: list[int] | None) -> Path:
    """One training process: join the process group, train, always leave the group."""
    info = distributed.init_distributed(cfg.local_rank, cfg.device, gpus)
    lock = None
    try:
        lock = distributed.claim_output(cfg.output_dir, info)  # rank 0's lock keeps a second run out of the folder
        return fit(build_run(cfg.with_world(info.world_size), info))
    finally:
        if lock is not None:
            lock.release()
        distributed.cleanup()


def build_model(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The method module from the registry, on the device, with backbones compiled in place if asked.

    ``Module.compile()`` keeps the state_dict keys (no ``_orig_mod.``), so checkpoints stay timm-keyed.
    """
    model = build_method(cfg.method, dict(cfg.model_args), len(cfg.channels)).to(device)
    if cfg.compile:
        for module in model.modules():
            if type(module).__name__ == "VisionTransformer":
                module.compile()
    return model


@dataclass
class TrainingRun:
    """Everything the epochs of one run need, assembled once by ``build_run``."""

    cfg: TrainConfig
    info: distributed.DistInfo
    loader: DataLoader
    sampler: DistributedSampler
    dataset: TrainCropDataset
    step: TrainStep
    schedules: Schedules
    logger: RunLogger
    iters: int
    steps_per_epoch: int
    norm: IntensityNorm
    start_epoch: int
    resume_path: Path | None
    probe: Probe | None = None
    validator: Validator | None = None

    def state_at(self, finished: int) -> dict[str, Any]:
        """The checkpoint after ``finished`` epochs."""
        s = self.step
        return checkpoint_state(self.cfg, s.model, s.optimizer, s.scaler, finished, finished * self.steps_per_epoch,
                                self.norm)


def build_run(cfg: TrainConfig, info: distributed.DistInfo) -> TrainingRun:
    """Data, model, optimizer, resume and logging for a world-resolved config; prints the run's one-line plan."""
    device = info.device
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    precision = resolve_precision(cfg.precision, device, "--precision (or --use_fp16 true)")
    table = load_table(cfg)
    norm = load_intensity_norm(cfg, table, info)
    probe = Probe(cfg.probe, cfg.method, cfg.channels, norm, device) if cfg.probe and info.is_main else None
    split = None
    if cfg.val_fraction > 0:
        split = split_sites(table, cfg.val_fraction, cfg.val_group, cfg.seed)
        table, val_table = table.iloc[split.train], table.iloc[split.val]
    loader, dataset, sampler, recipe = build_loader(cfg, info, table)
    validator = None if split is None else build_validator(cfg, info, val_table, recipe)
    iters = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    steps_per_epoch = iters // cfg.accum_iter
    if steps_per_epoch < 1:
        raise ConfigError(f"{iters} batches per epoch are fewer than --accum_iter {cfg.accum_iter}")
    iters = steps_per_epoch * cfg.accum_iter

    seed_everything(cfg.seed)  # identical initial weights on every rank and in every run with this seed
    model = build_model(cfg, device)
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    start_epoch = cfg.start_epoch
    resume_path = find_resume(cfg)
    if resume_path is not None:
        start_epoch, _ = restore(load_checkpoint(resume_path), cfg, model, optimizer, scaler, resume_path)
    tap = METRIC_TAPS[cfg.method](model) if cfg.method in METRIC_TAPS else None
    step = TrainStep(cfg, model, optimizer, scaler, precision, info, cfg.seed, ViewPipeline(recipe, norm, device), tap)
    logger = RunLogger(cfg.output_dir, info.is_main, tb_dir=cfg.tb_dir)
    split_info = {} if split is None else {k: v for k, v in split.summary.items() if k != "val_group_keys"}
    logger.write_hparams(dict(cfg.hparams) | {
        "precision": precision, "iters_per_epoch": iters, "recipe": recipe.to_dict(),
        "resumed_from": str(resume_path) if resume_path else None, "validation": split_info or None})
    if split is not None and info.is_main:
        write_json_atomic(cfg.output_dir / "val_split.json", split.summary)
    logger.truncate_epochs(start_epoch)
    if info.is_main:
        held_out = "" if split is None else (f" (+{split.summary['val_sites']} validation sites in "
                                             f"{split.summary['val_groups']} {cfg.val_group}s)")
        print(f"{cfg.method}: {len(dataset)} sites{held_out}, {info.world_size} process(es) on {device.type}, "
              f"{cfg.batch_per_gpu}/process x {cfg.accum_iter} accum, {iters} iters/epoch, lr {cfg.lr:.3g}, "
              f"{precision}, epochs {start_epoch}->{cfg.epochs}"
              + (f", resumed from {resume_path}" if resume_path else ""))
        if cfg.gpus and device.type == "cpu":
            print(f"note: --gpus {' '.join(map(str, cfg.gpus))} ignored: no CUDA device, training on the CPU")
    return TrainingRun(cfg, info, loader, sampler, dataset, step, build_schedules(cfg, steps_per_epoch), logger,
                       iters, steps_per_epoch, norm, start_epoch, resume_path, probe, validator)


def fit(run: TrainingRun) -> Path:
    """The epochs: train, validate, watch for collapse, checkpoint, probe, stop on the time budget; then report."""
    cfg, info = run.cfg, run.info
    best = read_best_probe(cfg.output_dir) if run.resume_path is not None else None
    if run.start_epoch == 0 and cfg.save_init and info.is_main:  # the run's own random-initialisation baseline
        save_checkpoint(cfg.output_dir / cfg.ckpt_pattern.format(epoch=0), run.state_at(0))
    if cfg.probe is not None and run.start_epoch == 0:
        best = probe_epoch(run, 0, best)
    monitor = CollapseMonitor(cfg.method)
    t_run, last = time.perf_counter(), {}
    end_epoch = cfg.epochs
    for epoch in range(run.start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        last = train_one_epoch(run, epoch)
        if run.validator is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
            last |= validate(run, epoch)
        warning = monitor.update(last)
        last["collapsed"] = warning is not None
        run.logger.log_epoch(last)
        finished = epoch + 1
        if info.is_main:
            save_epoch(run.state_at(finished), cfg.output_dir, cfg, finished)
        out_of_time = over_budget(cfg.max_minutes, time.perf_counter() - t_run, time.perf_counter() - t_epoch,
                                  info) and finished < cfg.epochs
        if cfg.probe is not None and (cfg.probe.due(finished, cfg.epochs) or out_of_time):
            best = probe_epoch(run, finished, best)
        distributed.barrier()
        if warning is not None:
            if cfg.stop_on_collapse:
                run.logger.close()
                raise CollapseError(f"--stop_on_collapse: {warning} (checkpoint of epoch {finished} kept)")
            if info.is_main:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        if out_of_time:
            end_epoch = finished
            if info.is_main:
                print(f"{cfg.method}: --max_minutes {cfg.max_minutes:g} reached after epoch {finished} of "
                      f"{cfg.epochs}; checkpoint {cfg.output_dir / 'checkpoint.pth'} resumes from here", flush=True)
            break
    run.logger.close()
    check_replicas(run.step.model, info, cfg.output_dir)
    if info.is_main:
        print_summary(run, end_epoch, last, time.perf_counter() - t_run)
    return cfg.output_dir


def print_summary(run: TrainingRun, end_epoch: int, last: dict[str, Any], seconds: float) -> None:
    """The run's one-line summary: epochs, final loss, throughput, time, checkpoint."""
    cfg = run.cfg
    seen = (end_epoch - run.start_epoch) * run.iters * cfg.batch_per_gpu * run.info.world_size
    loss_txt = f"{last['train_loss']:.4f}" if last else "n/a (nothing left to train)"
    if "val_loss" in last:
        loss_txt += f", validation loss {last['val_loss']:.4f}"
    print(f"{cfg.method} done: epochs {run.start_epoch}->{end_epoch}, final loss {loss_txt}, "
          f"{seen / max(seconds, 1e-9):.1f} img/s, {seconds:.1f} s, checkpoint {cfg.output_dir / 'checkpoint.pth'}")


def over_budget(max_minutes: float | None, elapsed: float, last_epoch: float, info: distributed.DistInfo) -> bool:
    """Whether another epoch as long as the last one would overrun ``--max_minutes`` (rank 0 decides for all)."""
    if max_minutes is None:
        return False
    decision = torch.tensor(float(elapsed + last_epoch > 60.0 * max_minutes), device=info.device)
    if distributed.is_distributed():
        torch.distributed.broadcast(decision, src=0)
    return bool(decision.item())


def probe_epoch(run: TrainingRun, finished: int, best: dict[str, float] | None) -> dict[str, float] | None:
    """Probe after ``finished`` epochs (0: before the first step), log it, keep checkpoint_best_probe.pth."""
    result = run_probe(run.probe, run.step.model, run.info)
    run.logger.log_probe(finished, result)
    if not run.info.is_main:  # only rank 0 writes the best checkpoint, so only it keeps the bookkeeping
        return best
    init = "" if finished else " (random initialisation)"
    print(f"{run.cfg.method} probe after {finished} epoch(s){init}: target mAP {result['probe_target_map']:.4f}, "
          f"replicate mAP {result['probe_replicate_map']:.4f} ({result['probe_seconds']:.1f} s)", flush=True)
    if better(result, best):
        best = {"epoch": finished, **result}
        save_checkpoint(run.cfg.output_dir / BEST_PROBE_CKPT, run.state_at(finished))
        write_json_atomic(run.cfg.output_dir / BEST_PROBE_JSON, best)
    return best


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


def train_one_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """One pass over the loader; returns the epoch record for log.txt (means over steps and ranks)."""
    cfg, info, device = run.cfg, run.info, run.info.device
    images_per_iter = cfg.batch_per_gpu * info.world_size
    run.sampler.set_epoch(epoch)
    run.dataset.set_epoch(epoch)
    run.step.model.train()
    meter, t_epoch = _Meter(), time.perf_counter()
    with tqdm(total=run.iters, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", disable=not info.is_main,
              dynamic_ncols=True, leave=False) as bar:
        _run_epoch_steps(run, epoch, bar, meter, t_epoch, images_per_iter)
    elapsed = time.perf_counter() - t_epoch
    means = meter.means(device)
    if not math.isfinite(means.get("loss", 0.0)):
        raise DivergenceError(f"{cfg.method}: mean loss of epoch {epoch} is {means['loss']}")
    record: dict[str, Any] = {f"train_{k}": v for k, v in means.items()}
    record |= {"epoch": epoch, "img_per_s": run.iters * images_per_iter / max(elapsed, 1e-9), "epoch_time_s": elapsed}
    if device.type == "cuda":
        record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def _run_epoch_steps(
    run: TrainingRun, epoch: int, bar: tqdm, meter: _Meter, t_epoch: float, images_per_iter: int
) -> None:
    """The iterations of one epoch, logging every --log_every steps; the caller owns the progress bar."""
    cfg, device = run.cfg, run.info.device
    for it, batch in enumerate(run.loader):
        if it >= run.iters:
            break
        step = epoch * run.steps_per_epoch + it // cfg.accum_iter
        values = run.schedules.at(step)
        logs = run.step(run.step.augment(batch["views"], epoch, it), epoch, it, step, values)
        bar.update(1)
        if logs is None:
            continue
        log_now = step % max(cfg.log_every, 1) == 0 or it == run.iters - 1
        if log_now and "embed_std" in logs:  # the SVD of the effective rank only on logged steps
            logs["embed_rank"] = run.step.model.collapse_stats(with_rank=True)["embed_rank"]
        meter.add(logs)
        if log_now:
            host = _host(logs)
            if not math.isfinite(host["loss"]):
                raise DivergenceError(f"{cfg.method}: loss is {host['loss']} at epoch {epoch} iteration {it}; "
                                      "lower --lr or try --precision fp32")
            host["img_per_s"] = (it + 1) * images_per_iter / (time.perf_counter() - t_epoch)
            if device.type == "cuda":
                host["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            run.logger.scalars(step, host)
            bar.set_postfix(loss=f"{host['loss']:.4f}", lr=f"{values['lr']:.2e}")


def build_validator(cfg: TrainConfig, info: distributed.DistInfo, table: Any, recipe: AugmentRecipe) -> Validator:
    """The held-out sites as a fixed-crop dataset (own seed) sharded over ranks."""
    dataset = TrainCropDataset(table, recipe, channels=cfg.channels, seed=sample_seed(cfg.seed, "val_crops"),
                               **crop_options(cfg))
    return Validator(cfg.method, dataset, cfg.batch_per_gpu, info, cfg.seed, max(0, cfg.num_workers),
                     cfg.pin_mem and info.device.type == "cuda")


def validate(run: TrainingRun, epoch: int) -> dict[str, float]:
    """Validation after ``epoch`` with the schedule values of its last step (DINO's teacher temperature)."""
    step = run.step
    last_step = (epoch + 1) * run.steps_per_epoch - 1
    autocast_ctx: Callable[[], Any] = lambda: autocast(step.precision, run.info.device)
    return run.validator.run(step.model, lambda views, gen: step.pipeline(views, gen), autocast_ctx, epoch,
                             last_step, run.schedules.at(last_step))
