"""The one typed description of a training run, built from the paper-named flags of a script or from Python.

``TrainConfig.__post_init__`` is the only place that validates a training run (its flags and the fields the loop
reads), however the config was built: ``config_from_flags``, ``training_config`` or ``dataclasses.replace``.
``TrainConfig.with_world`` then fills in what depends on the number of processes (the absolute learning rate, the
per-process batch) once the launcher is known. Nothing below ``utils.training.loop.train`` sees an
``argparse.Namespace``.

From a notebook::

    from utils.training import train, training_config
    cfg = training_config("dino", preset="small_cpu", path_df="plates/dataset.csv", output_dir="runs/dino")
    train(cfg)
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.locations import CROP_MODES
from data.metadata import column_pairs
from models.checkpoints import plain_args
from utils.errors import ConfigError
from utils.resources import cap_workers
from utils.training.args import DEFAULT_NUM_WORKERS, PARSERS, PRESETS, VAL_GROUPS, parse_args, scale_range
from utils.training.probe import ProbeConfig


@dataclass(frozen=True)
class TrainConfig:
    """One method-independent, validated run description; ``with_world`` resolves the world-size-dependent part."""

    method: str
    flags: Mapping[str, Any]  # every flag after validation, as plain types: checkpoint "args", hp.json, model build
    arch: str
    output_dir: Path
    epochs: int
    accum_iter: int
    min_lr: float
    warmup_epochs: float
    warmup_start_lr: float
    weight_decay: float
    weight_decay_end: float
    clip_grad: float
    clip_mode: str
    betas: tuple[float, float]
    optimizer: str
    ckpt_every: int
    ckpt_pattern: str
    recipe: str
    recipe_overrides: Mapping[str, Any]
    intensity: str
    model_args: Mapping[str, Any]
    path_df: str
    image_root: str | None
    channels: tuple[str, ...]
    seed: int
    num_workers: int
    val_fraction: float
    val_group: str
    val_every: int
    probe: ProbeConfig | None
    stop_on_collapse: bool
    save_init: bool
    max_minutes: float | None
    resume: str
    no_auto_resume: bool
    device: str | None
    compile: bool
    max_steps_per_epoch: int | None
    log_every: int
    local_rank: int | None
    gpus: tuple[int, ...] | None = None
    momentum_teacher: float | None = None
    teacher_temp: tuple[float, float, int] | None = None
    tb_dir: Path | None = None
    start_epoch: int = 0
    pin_mem: bool = True
    precision: str | None = None
    platemap: str | None = None
    column_map: tuple[tuple[str, str], ...] = ()
    crop_mode: str = "tiles"
    locations: str | None = None
    world_size: int = 0  # 0 until with_world: the fields below are only meaningful after it
    lr: float = 0.0
    batch_per_gpu: int = 0
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """The one validation of a training run, however the config was built (flags, Python, ``replace``)."""
        if self.method not in FIELD_RESOLVERS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(FIELD_RESOLVERS)}")
        try:
            _check_flags(self.method, dict(self.flags))
        except KeyError as exc:  # a hand-built config without the script's flags is refused, not half-checked
            raise ConfigError(f"TrainConfig({self.method!r}): flags lack {exc}; build it with training_config() "
                              "or parse_config()") from None
        _check_fields(self)

    def with_world(self, world_size: int) -> TrainConfig:
        """The config for ``world_size`` processes: scaled lr, per-process batch and hp.json's record."""
        lr, per_gpu = WORLD_RESOLVERS[self.method](self.flags, world_size)
        hparams = dict(self.flags) | {"world_size": world_size, "lr_absolute": lr, "batch_per_gpu": per_gpu}
        return dataclasses.replace(self, world_size=world_size, lr=lr, batch_per_gpu=per_gpu, hparams=hparams)


def _check_fields(cfg: TrainConfig) -> None:
    """The resolved fields the loop relies on (they come from the flags, but a config can also be replaced)."""
    for name in ("epochs", "accum_iter", "log_every", "val_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_workers < 0 or cfg.lr < 0 or cfg.weight_decay < 0 or cfg.clip_grad < 0:
        raise ConfigError("TrainConfig: num_workers, lr, weight_decay and clip_grad must be >= 0")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"TrainConfig.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if not cfg.channels or len(set(cfg.channels)) != len(cfg.channels):
        raise ConfigError(f"TrainConfig.channels must be distinct names, got {list(cfg.channels)}")
    if cfg.crop_mode not in CROP_MODES:
        raise ConfigError(f"TrainConfig.crop_mode must be one of {', '.join(CROP_MODES)}, got {cfg.crop_mode!r}")
    if cfg.world_size < 0 or (cfg.world_size > 0 and cfg.batch_per_gpu < 1):
        raise ConfigError("TrainConfig: with_world() gives a positive world size and per-process batch")


def normalise_scales(method: str, f: dict[str, Any]) -> None:
    """Crop scales given as one or two floats become (low, high) tuples, in place (validated by scale_range)."""
    names = {"dino": ("global_crops_scale", "local_crops_scale"), "simclr": ("scale",)}.get(method, ())
    for name in names:
        if f.get(name) is not None:
            f[name] = scale_range(f[name])


def _check_flags(method: str, f: dict[str, Any]) -> None:
    """Flag values argparse cannot check alone (crop scales are checked on a copy: the caller's stay as given)."""
    normalise_scales(method, f)
    if f["dist_url"] != "env://":
        raise ConfigError(f"--dist_url {f['dist_url']} is not supported: launch with torchrun (env://)")
    if method == "dino":
        if f["train_hp"]:
            raise ConfigError("--train_hp true is not supported (the paper's PosPairData never existed): drop the flag")
        if f["same_perturbations"]:
            raise ConfigError("--same_perturbations true is not supported: drop the flag")
        if f["use_annot_prob"] is not None:
            raise ConfigError("--use_annot_prob only applies to --same_perturbations, which is not supported")
        if f["loss"] != "dino":
            raise ConfigError("--loss mi is not implemented: use --loss dino")
        if f["optimizer"] == "lars":
            raise ConfigError("--optimizer lars is not supported: use --optimizer adamw (the paper's) or sgd")
        if f["use_fp16"] and f["precision"] not in (None, "fp16"):
            raise ConfigError(f"--use_fp16 true conflicts with --precision {f['precision']}: give only one")
    for name in ("epochs", "max_epochs", "batch_size", "batch_size_per_gpu", "accum_iter", "samples_per_image",
                 "max_steps_per_epoch", "log_every"):
        value = f.get(name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be >= 1, got {value}")
    for name in ("lr", "blr", "min_lr", "weight_decay", "weight_decay_end", "wd", "num_workers", "clip_grad"):
        value = f.get(name)
        if value is not None and value < 0:
            raise ConfigError(f"--{name} must be >= 0, got {value}")
    for name in ("temperature", "teacher_temp", "warmup_teacher_temp"):
        value = f.get(name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name} must be > 0, got {value}")
    if method == "mae" and not 0 <= f["mask_ratio"] < 1:
        raise ConfigError(f"--mask_ratio must be in [0, 1), got {f['mask_ratio']}")
    if f["max_minutes"] is not None and f["max_minutes"] <= 0:
        raise ConfigError(f"--max_minutes must be > 0, got {f['max_minutes']}")
    if f["probe_csv"] and not Path(f["probe_csv"]).is_file():
        raise ConfigError(f"--probe_csv {f['probe_csv']}: no such file")
    if not 0 <= f["val_fraction"] < 1:
        raise ConfigError(f"--val_fraction must be in [0, 1), got {f['val_fraction']} (0 disables validation)")
    if f["val_group"] not in VAL_GROUPS:
        raise ConfigError(f"--val_group must be one of {', '.join(VAL_GROUPS)}, got {f['val_group']!r}")
    if f["val_every"] < 1:
        raise ConfigError(f"--val_every must be >= 1, got {f['val_every']}")
    if not f["channels"] or len(set(f["channels"])) != len(f["channels"]):
        raise ConfigError(f"--channels must be distinct names, got {f['channels']}")
    if f["crop_mode"] not in CROP_MODES:
        raise ConfigError(f"--crop_mode must be one of {', '.join(CROP_MODES)}, got {f['crop_mode']!r}")
    if f["locations"] is not None:
        if f["crop_mode"] != "cells":
            raise ConfigError("--locations only applies to --crop_mode cells")
        if not Path(f["locations"]).is_dir():
            raise ConfigError(f"--locations {f['locations']}: no such folder "
                              "(expected <plate>/<well>-<site>-Nuclei.csv files)")


def _color_overrides(f: Mapping[str, Any]) -> dict[str, Any]:
    """The --color_aug / --aug_* flags as GpuAugment options for the recipe (None = the mode's default)."""
    gamma = f.get("aug_gamma")
    return {
        "color_mode": f.get("color_aug"),
        "shift": f.get("aug_shift"),
        "brightness": f.get("aug_brightness"),
        "gamma": tuple(gamma) if gamma is not None else None,
    }


def _dino_fields(f: Mapping[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    overrides = {
        "global_crops_size": f["global_crops_size"],
        "local_crops_size": f["local_crops_size"],
        "local_crops_number": f["local_crops_number"],
        "global_crops_scale": f["global_crops_scale"],
        "local_crops_scale": f["local_crops_scale"],
        **_color_overrides(f),
    }
    return dict(
        arch=f["arch"], output_dir=Path(f["output_dir"]), epochs=f["epochs"], accum_iter=1, min_lr=f["min_lr"],
        warmup_epochs=f["warmup_epochs"], warmup_start_lr=0.0,
        weight_decay=f["weight_decay"], weight_decay_end=f["weight_decay_end"],
        clip_grad=f["clip_grad"], clip_mode="per_tensor", betas=(0.9, 0.999), optimizer=f["optimizer"],
        ckpt_every=f["saveckp_freq"], ckpt_pattern="checkpoint{epoch:04}.pth",
        recipe="dino", recipe_overrides=overrides, intensity=f["intensity"] or "paper_train",
        model_args=plain, momentum_teacher=f["momentum_teacher"],
        teacher_temp=(f["warmup_teacher_temp"], f["teacher_temp"], f["warmup_teacher_temp_epochs"]),
        precision="fp16" if f["use_fp16"] else f["precision"],
    )


def _mae_fields(f: Mapping[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    return dict(
        arch=f["model"], output_dir=Path(f["output_dir"]), epochs=f["epochs"], accum_iter=f["accum_iter"],
        min_lr=f["min_lr"], warmup_epochs=f["warmup_epochs"], warmup_start_lr=0.0,
        weight_decay=f["weight_decay"], weight_decay_end=f["weight_decay"],
        clip_grad=f["clip_grad"], clip_mode="global", betas=(0.9, 0.95), optimizer="adamw",
        ckpt_every=f["saveckp_freq"], ckpt_pattern="checkpoint-{epoch:04}.pth",
        recipe="mae", recipe_overrides={"samples_per_image": f["samples_per_image"], "size": f["input_size"],
                                        **_color_overrides(f)},
        intensity=f["intensity"] or "paper_multisource", model_args=plain | {"arch": f["model"]},
        tb_dir=Path(f["log_dir"]) if f["log_dir"] else None, start_epoch=f["start_epoch"], pin_mem=f["pin_mem"],
        precision=f["precision"],
    )


def _simclr_fields(f: Mapping[str, Any], plain: dict[str, Any]) -> dict[str, Any]:
    return dict(
        arch=f["arch"], output_dir=Path(f["ckpt_path"]), epochs=f["max_epochs"], accum_iter=1, min_lr=f["min_lr"],
        warmup_epochs=f["warmup_epochs"], warmup_start_lr=f["min_lr"], weight_decay=f["wd"], weight_decay_end=f["wd"],
        clip_grad=f["clip_grad"], clip_mode="global", betas=(0.9, 0.999), optimizer="adamw",
        ckpt_every=f["every_n_epochs"], ckpt_pattern="checkpoint{epoch:04}.pth",
        recipe="simclr", recipe_overrides={"size": f["size"], "scale": f["scale"], **_color_overrides(f)},
        intensity=f["intensity"] or "paper_train", model_args=plain, precision=f["precision"],
        gpus=tuple(f["gpus"]) if f["gpus"] is not None else None,
    )


def _dino_world(f: Mapping[str, Any], world_size: int) -> tuple[float, int]:
    return f["lr"] * f["batch_size_per_gpu"] * world_size / 256.0, f["batch_size_per_gpu"]


def _mae_world(f: Mapping[str, Any], world_size: int) -> tuple[float, int]:
    if f["world_size"] is not None and f["world_size"] != world_size:
        raise ConfigError(
            f"--world_size {f['world_size']} but the launcher started {world_size} process(es): "
            f"use --nproc_per_node/--nnodes to match, or drop --world_size"
        )
    eff_batch = f["batch_size"] * f["accum_iter"] * world_size * f["samples_per_image"]
    return (f["lr"] if f["lr"] is not None else f["blr"] * eff_batch / 256.0), f["batch_size"]


def _simclr_world(f: Mapping[str, Any], world_size: int) -> tuple[float, int]:
    per_gpu = f["batch_size"] // world_size
    if per_gpu < 1:
        raise ConfigError(f"--batch_size {f['batch_size']} is global and smaller than the {world_size} processes")
    return f["lr"], per_gpu


FIELD_RESOLVERS = {"dino": _dino_fields, "mae": _mae_fields, "simclr": _simclr_fields}
WORLD_RESOLVERS = {"dino": _dino_world, "mae": _mae_world, "simclr": _simclr_world}


def _num_workers(method: str, f: Mapping[str, Any]) -> int:
    """``--num_workers`` capped to the CPUs this process has (a warning says so unless it was the default).

    The flags record (hp.json) keeps the value asked for; only the loader uses the capped one. Negative values pass
    through so ``_check_fields`` reports them.
    """
    preset = PRESETS.get(method, {}).get(f.get("preset") or "", {})
    default = preset.get("num_workers", DEFAULT_NUM_WORKERS)
    return cap_workers("--num_workers", f["num_workers"], default=default)


def config_from_flags(method: str, flags: argparse.Namespace | Mapping[str, Any]) -> TrainConfig:
    """Map a script's parsed flags onto a TrainConfig, which validates them in ``__post_init__``."""
    if method not in FIELD_RESOLVERS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(FIELD_RESOLVERS)}")
    f = dict(flags.items() if isinstance(flags, Mapping) else vars(flags).items())
    normalise_scales(method, f)
    plain = plain_args(f)
    probe = None
    if f["probe_csv"]:
        probe = ProbeConfig(Path(f["probe_csv"]), f["probe_every"], f["probe_size"], f["probe_stride"],
                            f["probe_batch_size"], f["image_root"], f["platemap"], column_pairs(f["column_map"]))
    return TrainConfig(
        method=method, flags=plain, path_df=f["path_df"], image_root=f["image_root"], channels=tuple(f["channels"]),
        seed=f["seed"], num_workers=_num_workers(method, f), val_fraction=f["val_fraction"], val_group=f["val_group"],
        val_every=f["val_every"], probe=probe, stop_on_collapse=f["stop_on_collapse"], save_init=f["save_init"],
        max_minutes=f["max_minutes"], resume=f["resume"], no_auto_resume=f["no_auto_resume"], device=f["device"],
        compile=f["compile"], max_steps_per_epoch=f["max_steps_per_epoch"], log_every=f["log_every"],
        local_rank=f["local_rank"], platemap=f["platemap"], column_map=column_pairs(f["column_map"]),
        crop_mode=f["crop_mode"], locations=f["locations"], **FIELD_RESOLVERS[method](f, plain),
    )


def parse_config(method: str, argv: Sequence[str] | None = None) -> TrainConfig:
    """A script's command line -> validated TrainConfig (what ``train_dino.py`` and friends run)."""
    return config_from_flags(method, parse_args(method, argv))


def training_config(method: str, preset: str | None = None, **flags: Any) -> TrainConfig:
    """A TrainConfig from Python: the script's defaults (or a preset's), then ``flags`` by their dest names.

    Parameters
    ----------
    method:
        ``dino``, ``mae`` or ``simclr``: whose script's flags and defaults apply.
    preset:
        A key of ``utils.training.args.PRESETS[method]`` (e.g. ``small_cpu``) whose values replace the defaults.
    **flags:
        Settings by argparse dest name (``path_df``, ``output_dir``, ``epochs``, ...) as parsed values (numbers,
        lists), not command-line strings; they win over the preset. SimCLR's required ``ckpt_path`` must be given.

    Returns
    -------
    TrainConfig
        Validated by ``config_from_flags``, exactly as a command line with the same flags would be, so a notebook
        run and a script run agree; ``train`` resolves the world size. ConfigError for an unknown method, preset or
        flag, a missing required flag, or any value ``config_from_flags`` rejects.
    """
    if method not in PARSERS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(PARSERS)}")
    parser = PARSERS[method]()
    if preset is not None:
        if preset not in PRESETS[method]:
            raise ConfigError(f"preset {preset!r} is not a {method} preset; choose from {sorted(PRESETS[method])}")
        parser.set_defaults(**PRESETS[method][preset])
    required = {a.dest: "." for a in parser._actions if a.required}  # filled below or rejected as missing
    defaults = vars(parser.parse_args([f"--{k}={v}" for k, v in required.items()]))
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ConfigError(f"{method}: unknown flag(s) {', '.join(unknown)}")
    missing = sorted(k for k in required if k not in flags)
    if missing:
        raise ConfigError(f"{method}: {', '.join(missing)} is required")
    return config_from_flags(method, defaults | flags | {"preset": preset})
