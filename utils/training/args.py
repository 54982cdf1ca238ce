"""Parsers for the three training scripts: the paper's flags, our additions, presets, and clear errors for dead flags.

Parsing only: ``utils.training.config`` validates the values and builds the one ``TrainConfig``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from data.locations import CROP_MODES
from data.schema import DEFAULT_CHANNELS
from utils.cli import SPELLING_NOTE, FlagParser, add_metadata_flags, bool_flag
from utils.errors import ConfigError

VAL_GROUPS = ("well", "plate")
DEFAULT_NUM_WORKERS = 6


class _Unsupported(argparse.Action):
    """A paper flag we do not implement: using it fails with a message that says what to use instead."""

    def __init__(self, option_strings: Sequence[str], dest: str, advice: str = "", **kwargs: Any) -> None:
        self.advice = advice
        kwargs.setdefault("nargs", "?")
        kwargs.setdefault("default", None)
        kwargs.setdefault("help", f"not supported: {advice}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        raise ConfigError(f"{option} is not supported: {self.advice}")


def _unsupported(parser: argparse.ArgumentParser, flag: str, advice: str, **kwargs: Any) -> None:
    parser.add_argument(flag, action=_Unsupported, advice=advice, **kwargs)


def scale_range(values: list[float]) -> tuple[float, float]:
    """Accept one float (a lower bound, upper 1.0) or two floats for a crop-area scale range."""
    if len(values) not in (1, 2):
        raise ConfigError(f"a crop scale takes one or two floats (LOW [HIGH]), got {values}")
    if len(values) == 1:
        values = [values[0], 1.0]
    low, high = values
    if not 0 < low <= high <= 1:
        raise ConfigError(f"crop scale {values} must satisfy 0 < low <= high <= 1")
    return float(low), float(high)


def add_common(
    parser: argparse.ArgumentParser, *, path_df: str, seed: int, output_dir: str | None, val_fraction: float = 0.0,
    saveckp: tuple[int, str] | None = None,
) -> None:
    """Options shared by all three methods (data, validation, launch, precision, speed)."""
    data = parser.add_argument_group("data")
    data.add_argument("--path_df", default=path_df, help="dataset CSV, one row per site (paper or JUMP columns)")
    data.add_argument("--image_root", default=None, help="folder that relative image paths in --path_df are under")
    add_metadata_flags(data)
    data.add_argument("--channels", nargs="+", default=list(DEFAULT_CHANNELS), help="channel names, in file order")
    data.add_argument(
        "--intensity", default=None, help="intensity normalisation: a preset name (paper_train, paper_multisource, "
        "paper_default), a stats.json, or 'dataset' (statistics of 200 sites of --path_df, computed at start); "
        "stored in the checkpoint (default: the constants the paper trained with)"
    )
    data.add_argument("--num_workers", type=int, default=DEFAULT_NUM_WORKERS,
                      help="DataLoader workers per process (capped to the CPUs available, with a warning)")
    data.add_argument("--crop_mode", choices=CROP_MODES, default="tiles",
                      help="tiles: crops anywhere that pass the cell rule (the paper); cells: every crop centred on a "
                           "random nucleus of the site, with a small jitter, same crop sizes (docs/TRAINING.md)")
    data.add_argument("--locations", default=None,
                      help="--crop_mode cells: folder of CellProfiler nucleus centres, "
                           "<plate>/<well>-<site>-Nuclei.csv (default: the CSV's FileName_NucleiLocations column, "
                           "else nuclei segmented per site once per worker)")
    _unsupported(data, "--data_path", "the paper never read it; give the dataset CSV with --path_df (and --image_root)")
    val = parser.add_argument_group("validation")
    val.add_argument("--val_fraction", type=float, default=val_fraction,
                     help=f"fraction of sites held out for validation, whole groups at a time; 0 = no validation "
                     f"(default {val_fraction:g})")
    val.add_argument("--val_group", choices=tuple(VAL_GROUPS), default="well",
                     help="hold out whole wells (plate + well) or whole plates (default well)")
    val.add_argument("--val_every", type=int, default=1, help="validate every N epochs and after the last one")
    learn = parser.add_argument_group("learning diagnostics")
    learn.add_argument("--probe_csv", default=None,
                       help="labelled site CSV (e.g. a held-out plate) embedded and scored during training: "
                            "probe_target_map / probe_replicate_map in log.txt and TensorBoard, epoch 0 = random init")
    learn.add_argument("--probe_every", type=int, default=1, help="probe every N finished epochs (and after the last)")
    learn.add_argument("--probe_size", type=int, default=128, help="probe tile size in pixels (inference's --size)")
    learn.add_argument("--probe_stride", type=int, default=None, help="probe tile stride (default: --probe_size)")
    learn.add_argument("--probe_batch_size", type=int, default=8, help="probe sites per device batch")
    learn.add_argument("--stop_on_collapse", action="store_true",
                       help="end the run with an error when the collapse diagnostics stay collapsed (docs/LEARNING.md)")
    learn.add_argument("--save_init", action="store_true",
                       help="also write the weights before the first step (checkpoint0000.pth; MAE: "
                            "checkpoint-0000.pth): the run's own random-initialisation baseline for inference")
    run = parser.add_argument_group("run")
    run.add_argument("--preset", default=None,
                     help="a documented recipe that sets this script's defaults (small_cpu; docs/LEARNING.md); "
                          "flags given explicitly override it")
    run.add_argument("--max_minutes", type=float, default=None,
                     help="stop after the last epoch that fits in this wall-clock budget (checked after each epoch "
                          "from the last epoch's duration); schedules keep their --epochs length")
    if output_dir is not None:
        run.add_argument("--output_dir", default=output_dir, help="checkpoints, log.txt, hp.json and TensorBoard")
    run.add_argument("--seed", type=int, default=seed)
    run.add_argument("--resume", default="", help="checkpoint to resume from (default: OUTPUT/checkpoint.pth if any)")
    run.add_argument("--no_auto_resume", action="store_true", help="start fresh even if OUTPUT/checkpoint.pth exists")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    run.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                     help="autocast dtype (default bf16 on GPU, fp32 on CPU); fp16 uses a GradScaler")
    run.add_argument("--compile", action="store_true", help="torch.compile the backbones")
    run.add_argument("--max_steps_per_epoch", type=int, default=None, help="cap iterations per epoch (tests, demos)")
    run.add_argument("--log_every", type=int, default=10, help="TensorBoard scalars every N optimizer steps")
    run.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                     help="set by the deprecated torch.distributed.launch; torchrun uses LOCAL_RANK")
    run.add_argument("--dist_url", default="env://", help="only env:// (torchrun, launch, SLURM + MASTER_ADDR)")
    if saveckp is not None:  # DINO's and MAE's numbered checkpoints (SimCLR has --every_n_epochs)
        every, pattern = saveckp
        parser.add_argument("--saveckp_freq", type=int, default=every, help=f"also keep {pattern} every N epochs")


def _add_color_aug(parser: argparse.ArgumentParser) -> None:
    """--color_aug: intensity jitter relative to each view's per-channel range (default) or the paper's absolute one."""
    parser.add_argument(
        "--color_aug", choices=("relative", "paper"), default="relative",
        help="relative (default): brightness/offset/gamma jitter scaled by each view's own per-channel statistics; "
        "paper: the paper's absolute shift U(-0.3, 0.3) and gamma U(0.5, 1.5) on raw [0, 1] intensities, which "
        "blacks out or flattens dark Cell Painting views (see docs/LEARNING.md)",
    )
    parser.add_argument("--aug_shift", type=float, default=None,
                        help="per-channel offset range: in units of the view's std with --color_aug relative "
                        "(default 0.5), absolute on [0, 1] with paper (default 0.3); 0 = off")
    parser.add_argument("--aug_brightness", type=float, default=None,
                        help="relative mode: per-channel multiplicative jitter U(1-a, 1+a) (default 0.2); 0 = off")
    parser.add_argument("--aug_gamma", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                        help="per-channel gamma range (default 0.8 1.25 relative, 0.5 1.5 paper); 1 1 = off")


def _script_parser(prog: str, description: str) -> FlagParser:
    """A training script's parser: both flag spellings, and the help says which one the paper used."""
    return FlagParser(prog, description=description, epilog=SPELLING_NOTE + " The paper's flags use underscores.")


def dino_parser() -> argparse.ArgumentParser:
    """The paper's train_dino.py flags (defaults from its code) plus our common options."""
    p = _script_parser("train_dino.py", "DINO self-supervised training on Cell Painting sites.")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="vit_small", help="backbone name from models.backbones.ARCHS")
    m.add_argument("--patch_size", type=int, default=None, help="default: the --arch name's (16 for vit_small)")
    m.add_argument("--out_dim", type=int, default=20000)
    m.add_argument("--norm_last_layer", type=bool_flag, default=True)
    m.add_argument("--momentum_teacher", type=float, default=0.996)
    m.add_argument("--use_bn_in_head", type=bool_flag, default=False)
    m.add_argument("--train_hp", type=bool_flag, default=False,
                   help="unsupported (the paper's PosPairData was never written); leave false")
    m.add_argument("--warmup_teacher_temp", type=float, default=0.02)
    m.add_argument("--teacher_temp", type=float, default=0.04)
    m.add_argument("--warmup_teacher_temp_epochs", type=int, default=20)
    m.add_argument("--loss", default="dino", choices=("dino", "mi"), help="only dino is implemented")
    m.add_argument("--drop_path_rate", type=float, default=0.1)
    m.add_argument("--koleo_weight", type=float, default=0.0,
                   help="weight of the KoLeo regulariser on the student's global-view features (DINOv2 uses 0.1); "
                        "it keeps them spread when small data pulls DINO towards the uniform solution")
    m.add_argument("--head_hidden_dim", type=int, default=2048, help="DINO head MLP width")
    m.add_argument("--head_bottleneck_dim", type=int, default=256, help="DINO head bottleneck before the last layer")
    t = p.add_argument_group("training")
    t.add_argument("--same_perturbations", type=bool_flag, default=False, help="unsupported; leave false")
    t.add_argument("--use_annot_prob", type=float, default=None, help="only used by --same_perturbations (unsupported)")
    t.add_argument("--use_fp16", type=bool_flag, default=None, help="true = --precision fp16 with a GradScaler")
    t.add_argument("--weight_decay", type=float, default=0.04)
    t.add_argument("--weight_decay_end", type=float, default=0.4)
    t.add_argument("--clip_grad", type=float, default=3.0, help="per-parameter-tensor gradient norm clip; 0 = off")
    t.add_argument("--batch_size_per_gpu", type=int, default=64)
    t.add_argument("--epochs", type=int, default=200)
    t.add_argument("--freeze_last_layer", type=int, default=3)
    t.add_argument("--lr", type=float, default=0.004, help="peak lr at a total batch of 256 (scaled linearly)")
    t.add_argument("--warmup_epochs", type=int, default=20)
    t.add_argument("--min_lr", type=float, default=1e-6)
    t.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "lars"))
    c = p.add_argument_group("crops")
    c.add_argument("--global_crops_scale", type=float, nargs="+", default=None,
                   help="area fraction of the site (e.g. 0.2 0.4) for resized global crops; default: native crops")
    c.add_argument("--local_crops_number", type=int, default=8)
    c.add_argument("--local_crops_scale", type=float, nargs="+", default=None,
                   help="area fraction of the site for resized local crops; default: native crops")
    c.add_argument("--global_crops_size", type=int, default=224)
    c.add_argument("--local_crops_size", type=int, default=96)
    _add_color_aug(c)
    add_common(p, path_df="data/JUMP_trainset.csv", seed=0, output_dir=".", saveckp=(10, "checkpoint{epoch:04}.pth"))
    return p


def mae_parser() -> argparse.ArgumentParser:
    """The paper's train_mae.py flags (defaults from its code) plus our common options."""
    p = _script_parser("train_mae.py", "MAE self-supervised training on Cell Painting sites.")
    p.add_argument("--batch_size", type=int, default=64, help="images per GPU (each gives --samples_per_image views)")
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--accum_iter", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--samples_per_image", type=int, default=1)
    p.add_argument("--model", default="mae_vit_small", help="mae_vit_small, mae_vit_base_patch16, ...")
    p.add_argument("--input_size", type=int, default=224, help="crop size of each view")
    p.add_argument("--mask_ratio", type=float, default=0.75)
    p.add_argument("--norm_pix_loss", action="store_true")
    p.add_argument("--decoder_embed_dim", type=int, default=None, help="default: the paper's for the encoder width")
    p.add_argument("--decoder_depth", type=int, default=None)
    p.add_argument("--decoder_num_heads", type=int, default=None)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * effective batch / 256)")
    p.add_argument("--blr", type=float, default=1e-3, help="base lr at an effective batch of 256")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--warmup_epochs", type=int, default=40)
    p.add_argument("--clip_grad", type=float, default=0.0, help="global gradient norm clip; 0 = off (the paper)")
    p.add_argument("--log_dir", default=None, help="TensorBoard folder (default: OUTPUT/tensorboard)")
    p.add_argument("--start_epoch", type=int, default=0, help="first epoch when not resuming")
    p.add_argument("--pin_mem", action="store_true", default=True)
    p.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")
    p.add_argument("--world_size", type=int, default=None, help="checked against the launcher's world size")
    _unsupported(p, "--dist_on_itp", "launch with torchrun or SLURM instead of OpenMPI/ITP", nargs=0)
    _add_color_aug(p)
    add_common(p, path_df="data/JUMP_trainset.csv", seed=0, output_dir="./output_dir",
               saveckp=(20, "checkpoint-{epoch:04}.pth"))
    return p


def simclr_parser() -> argparse.ArgumentParser:
    """The paper's train_simclr.py flags (defaults from its code) plus our common options."""
    p = _script_parser("train_simclr.py", "SimCLR self-supervised training on Cell Painting.")
    p.add_argument("--arch", default="vit_small_patch16_224", help="backbone name from models.backbones.ARCHS")
    p.add_argument("--gpus", type=int, nargs="*", default=None,
                   help="GPU ids; without a launcher, one process per id is spawned (default: every visible GPU; "
                        "ignored on CPU)")
    p.add_argument("--batch_size", type=int, default=256, help="GLOBAL batch, divided by the number of processes")
    p.add_argument("--max_epochs", type=int, default=200)
    p.add_argument("--ckpt_path", required=True, help="output folder for checkpoints and logs")
    p.add_argument("--every_n_epochs", type=int, default=10, help="keep checkpoint{epoch:04}.pth every N epochs")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--hidden_dim", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--scale", type=float, nargs="+", default=None,
                   help="random resized crop area fraction: LOW or LOW HIGH (default: native crops)")
    p.add_argument("--warmup_epochs", type=int, default=30)
    p.add_argument("--min_lr", type=float, default=1e-6, help="warm-up start and final lr")
    p.add_argument("--clip_grad", type=float, default=3.0, help="global gradient norm clip; 0 = off")
    p.add_argument("--drop_path_rate", type=float, default=0.0)
    _add_color_aug(p)
    add_common(p, path_df="SSL_data/dataload/dataset.csv", seed=42, output_dir=None, val_fraction=0.2)
    return p


PARSERS = {"dino": dino_parser, "mae": mae_parser, "simclr": simclr_parser}


# Documented recipes (docs/LEARNING.md): a preset sets defaults, and any flag given on the command line wins.
# small_cpu is the recipe under which each method beats its own random initialisation on 256 px synthetic sites
# within 10 minutes on 2 CPU cores (bench/bench_learning.py measures it).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "dino": {
        "small_cpu": {
            "arch": "vit_tiny", "batch_size_per_gpu": 32, "global_crops_size": 96, "local_crops_size": 48,
            "local_crops_number": 4, "out_dim": 1024, "intensity": "dataset", "lr": 0.0005,
            "momentum_teacher": 0.996, "warmup_teacher_temp": 0.02, "teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 4, "freeze_last_layer": 1, "koleo_weight": 0.1, "epochs": 30,
            "warmup_epochs": 2, "num_workers": 2, "probe_every": 5,
        },
    },
    "mae": {
        "small_cpu": {
            "model": "vit_tiny", "batch_size": 64, "input_size": 96, "samples_per_image": 1, "norm_pix_loss": True,
            "intensity": "dataset", "blr": 1.5e-3, "epochs": 20, "warmup_epochs": 2, "num_workers": 2,
            "probe_every": 10,
        },
    },
    "simclr": {
        "small_cpu": {
            "arch": "vit_tiny", "batch_size": 64, "size": 96, "intensity": "dataset", "lr": 5e-4, "temperature": 0.1,
            "max_epochs": 30, "warmup_epochs": 2, "num_workers": 2, "val_fraction": 0.0, "probe_every": 8,
        },
    },
}


def parse_args(method: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a script's flags (argparse only; ``utils.training.config.config_from_flags`` validates them).

    ``--preset NAME`` first replaces the parser's defaults with the preset's values, then the command line is parsed
    again, so explicit flags always win over the preset.
    """
    parser = PARSERS[method]()
    args = parser.parse_args(argv)
    if args.preset is not None:
        presets = PRESETS[method]
        if args.preset not in presets:
            raise ConfigError(f"--preset {args.preset!r} is not a {method} preset; choose from {sorted(presets)}")
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    return args
