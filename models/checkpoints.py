"""Checkpoints: our resumable format, safe loading, and backbones for inference from ours or the paper's releases.

Formats ``load_backbone_for_inference`` reads (detected from the file, see ``FORMATS``):
- ``cellpaint-ssl/1`` (ours): arch, patch size, channels and intensity normalisation come from the checkpoint; for
  DINO the EMA teacher (``heads["teacher.backbone.*"]``) is used, as in the paper, unless ``dino_weights="student"``.
- paper DINO: ``teacher`` / ``student`` dicts with ``module.`` / ``backbone.`` prefixes; ``head.*`` is ignored.
- paper MAE: ``model`` with encoder and decoder keys; the encoder (qkv biases included) is loaded strictly and the
  decoder (``mask_token``, ``decoder_*``) is ignored by design.
- paper SimCLR: a PyTorch Lightning ``.ckpt`` whose ``state_dict`` has ``backbone.*`` and ``mlp.*``; read with
  ``torch.load`` only, so Lightning need not be installed; ``mlp.*`` is ignored.
- a bare ViT state dict (e.g. an ImageNet DINO release), when ``model`` is given.

The architecture recorded in the checkpoint (ours, or the paper's ``args.arch`` / ``args.model`` /
``hyper_parameters["vit"]`` when it is a known name) takes precedence over the ``arch`` argument; the patch size,
width, depth and channel count must agree with the weights, or loading fails.

Intensity defaults for the paper's checkpoints are the constants each model was TRAINED with: ``paper_train`` for
DINO and SimCLR, ``paper_multisource`` for MAE. (The paper's inference used ``paper_multisource`` for all three, a bug.)
Default pooling: CLS after the final norm for DINO and SimCLR; for MAE the mean of the patch tokens AFTER the final
norm (``"mean"``). The paper's MAE inference took the mean with no final norm: that is ``pool="mean_prenorm"``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from data.intensity import IntensityNorm, get_intensity_norm
from models.backbones import ARCHS, FIXED_PATCH, OVERRIDE_KEYS, POOLS, arch_config, create_backbone
from utils.errors import CheckpointError, ConfigError
from utils.fileio import atomic_path

FORMAT = "cellpaint-ssl/1"
PAPER_INTENSITY = {"dino": "paper_train", "simclr": "paper_train", "mae": "paper_multisource"}
DEFAULT_POOL = {"dino": "cls", "simclr": "cls", "mae": "mean"}
# The architecture each method's paper script builds when the user gives none.
DEFAULT_ARCH = {"dino": "vit_small", "simclr": "vit_small_patch16_224", "mae": "vit_small_patch16"}
_MAE_DECODER_PREFIXES = ("mask_token", "decoder_")


def head_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Everything in a method's state_dict except the backbone (heads, teacher, decoder, buffers)."""
    return {k: v for k, v in module.state_dict().items() if not k.startswith("backbone.")}


def load_head_state(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load what ``head_state`` saved, failing on any missing or unexpected key."""
    expected = set(head_state(module))
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(f"head state does not fit the model: missing {missing[:5]}; unexpected {unexpected[:4]}")
    module.load_state_dict(dict(state_dict), strict=False)


def versions() -> dict[str, str]:
    """Library versions recorded in checkpoints and run files."""
    return {"python": platform.python_version(), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "numpy": str(numpy.__version__)}


def plain_args(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Flags as builtin types only (paths become strings), so the checkpoint loads with weights_only=True."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {str(k): _plain(v) for k, v in items.items()}


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def make_checkpoint(
    method: str,
    module: nn.Module,
    *,
    arch: str,
    args: argparse.Namespace | Mapping[str, Any],
    intensity: Any,
    channels: list[str] | tuple[str, ...],
    epoch: int,
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any | None = None,
) -> dict[str, Any]:
    """Our checkpoint dict (docs/CONTRACTS.md): everything needed to resume exactly and to embed later."""
    backbone: VisionTransformer = module.backbone
    return {
        "format": FORMAT,
        "method": method,
        "arch": arch,
        "patch_size": int(backbone.patch_embed.patch_size[0]),
        "in_chans": int(backbone.patch_embed.proj.in_channels),
        "backbone": backbone.state_dict(),
        "heads": module.head_state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "args": plain_args(args),
        "intensity": intensity.to_dict() if hasattr(intensity, "to_dict") else dict(intensity),
        "channels": list(channels),
        "versions": versions(),
    }


def restore_method(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Load our checkpoint's backbone and heads into a freshly built method module (strict)."""
    _check_keys(str(checkpoint.get("arch")), module.backbone, checkpoint["backbone"], "checkpoint")
    module.backbone.load_state_dict(checkpoint["backbone"])
    module.load_head_state_dict(checkpoint["heads"])


_SAFE_LEAVES = (type(None), bool, int, float, str, torch.Tensor, torch.Size, torch.dtype, argparse.Namespace)


def _check_safe(value: Any, where: str) -> None:
    """Refuse, before writing, anything ``torch.load(weights_only=True)`` would later reject."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_safe(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_safe(v, f"{where}[{i}]")
    elif type(value) not in _SAFE_LEAVES and not isinstance(value, torch.Tensor):
        raise TypeError(f"checkpoint value {where} is a {type(value).__qualname__}; store builtin types or tensors")


def save_checkpoint(path: str | os.PathLike[str], obj: Mapping[str, Any]) -> None:
    """torch.save through a temporary file, so a killed run never leaves a truncated checkpoint."""
    _check_safe(obj, "checkpoint")
    with atomic_path(path) as tmp:
        try:
            torch.save(dict(obj), tmp)
        except RuntimeError as exc:  # torch's zip writer reports a short write (full disk, size limit) this way
            reason = (str(exc).strip().splitlines() or ["write failed"])[0][:200]
            raise CheckpointError(f"{path}: cannot write the checkpoint: the disk is full, a file-size limit was "
                                  f"reached or the write failed ({reason}); the previous checkpoint is kept") from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """torch.load(weights_only=True) with only argparse.Namespace allowed (the paper's ``args``), on the CPU."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for files that are not checkpoints
        reason = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), None)
        reason = reason or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        kind = type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({kind}: {reason[:300]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(obj).__name__}")
    return obj


@dataclass
class LoadedBackbone:
    """A ready-to-embed backbone (eval mode, CPU) with the normalisation and pooling it should be used with."""

    backbone: VisionTransformer
    intensity: Any
    pool: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Extracted:
    state: dict[str, torch.Tensor]
    method: str
    fmt: str
    arch: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    intensity: Any = None
    channels: list[str] | None = None
    epoch: int | None = None
    ignored: int = 0
    weights: str = ""


def _is_ours(obj: Mapping[str, Any]) -> bool:
    return str(obj.get("format", "")).startswith("cellpaint-ssl/")


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_dino(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop DDP's ``module.``, the wrapper's ``backbone.`` and the projection ``head.*``."""
    out, ignored = {}, 0
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("head."):
            ignored += 1
            continue
        out[key.removeprefix("backbone.")] = value
    return out, ignored


def _extract_ours(path: str, obj: Mapping[str, Any], model: str | None, opts: dict[str, Any]) -> _Extracted:
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {obj.get('format')!r} is not supported (expected {FORMAT})")
    for key in ("method", "arch", "backbone", "intensity"):
        if key not in obj:
            raise CheckpointError(f"{path}: {FORMAT} checkpoint lacks the key {key!r}")
    method = str(obj["method"])
    state, weights = dict(obj["backbone"]), "backbone"
    if method == "dino" and opts["dino_weights"] == "teacher":
        prefix = "teacher.backbone."
        state = {k[len(prefix):]: v for k, v in obj.get("heads", {}).items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f"{path}: DINO checkpoint has no teacher weights (heads['teacher.backbone.*'])")
        weights = "teacher"
    args = obj.get("args") or {}
    overrides = {k: args[k] for k in OVERRIDE_KEYS if isinstance(args, Mapping) and args.get(k) is not None}
    return _Extracted(
        state, method, FORMAT, arch=str(obj["arch"]), overrides=overrides,
        intensity=IntensityNorm.from_dict(obj["intensity"]), channels=list(obj.get("channels") or []) or None,
        epoch=obj.get("epoch"), weights=weights,
    )


def _recorded_arch(obj: Mapping[str, Any], *names: str) -> str | None:
    """The architecture the paper's script recorded in its ``args`` Namespace, when it is a name we know."""
    args = obj.get("args")
    for name in names:
        value = getattr(args, name, None) if isinstance(args, argparse.Namespace) else None
        if isinstance(value, str) and value in ARCHS:
            return value
    return None


def _extract_dino(path: str, obj: Mapping[str, Any], model: str | None, opts: dict[str, Any]) -> _Extracted:
    which = opts["dino_weights"]
    if which not in obj:
        raise CheckpointError(f"{path}: DINO checkpoint has no {which!r} weights (keys: {sorted(obj)[:8]})")
    state, ignored = _strip_dino(obj[which])
    return _Extracted(state, "dino", "paper-dino", arch=_recorded_arch(obj, "arch"), epoch=obj.get("epoch"),
                      ignored=ignored, weights=which)


def _extract_mae(path: str, obj: Mapping[str, Any], model: str | None, opts: dict[str, Any]) -> _Extracted:
    state = {k: v for k, v in obj["model"].items() if not k.startswith(_MAE_DECODER_PREFIXES)}
    ignored = len(obj["model"]) - len(state)
    return _Extracted(state, "mae", "paper-mae", arch=_recorded_arch(obj, "model", "arch"), epoch=obj.get("epoch"),
                      ignored=ignored, weights="encoder")


def _extract_lightning(path: str, obj: Mapping[str, Any], model: str | None, opts: dict[str, Any]) -> _Extracted:
    state, ignored = {}, 0
    for key, value in obj["state_dict"].items():
        if key.startswith("mlp."):
            ignored += 1
        else:
            state[key.removeprefix("backbone.")] = value
    hp = obj.get("hyper_parameters") or {}
    arch = hp.get("vit") if isinstance(hp, Mapping) and hp.get("vit") in ARCHS else None
    return _Extracted(state, "simclr", "paper-simclr-lightning", arch=arch, epoch=obj.get("epoch"), ignored=ignored,
                      weights="backbone")


def _extract_state_dict(path: str, obj: Mapping[str, Any], model: str | None, opts: dict[str, Any]) -> _Extracted:
    if model is None:
        raise CheckpointError(f"{path}: a bare state dict does not say which method trained it; pass --model")
    state, ignored = _strip_dino(obj)
    return _Extracted(state, model, "state-dict", ignored=ignored, weights="state_dict")


# (name, detector, extractor), tried in order.
FORMATS: list[tuple[str, Callable[[Mapping[str, Any]], bool], Callable[..., _Extracted]]] = [
    ("cellpaint-ssl", _is_ours, _extract_ours),
    ("paper-dino", lambda o: "teacher" in o or "student" in o, _extract_dino),
    ("paper-mae", lambda o: isinstance(o.get("model"), Mapping), _extract_mae),
    ("paper-simclr-lightning", lambda o: isinstance(o.get("state_dict"), Mapping), _extract_lightning),
    ("state-dict", _is_state_dict, _extract_state_dict),
]


def _check_keys(what: str, backbone: nn.Module, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Missing/unexpected keys and wrong shapes are errors, named with the first few keys."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:4])})")
        raise CheckpointError(f"{path}: backbone keys do not match {what}: {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k != "pos_embed" and tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: backbone shapes do not match {what} (wrong --arch?): {'; '.join(wrong[:3])}")


def _grid(path: str, pos_embed: torch.Tensor) -> int:
    n = pos_embed.shape[1] - 1
    side = math.isqrt(max(n, 0))
    if side * side != n:
        raise CheckpointError(f"{path}: pos_embed has {n} patch positions, not a square grid")
    return side


def load_backbone_for_inference(
    path: str | os.PathLike[str],
    model: str | None = None,
    arch: str | None = None,
    *,
    img_size: int | None = None,
    pool: str | None = None,
    dino_weights: str = "teacher",
) -> LoadedBackbone:
    """Build the backbone a checkpoint holds and load it strictly; see the module docstring for the formats.

    Parameters
    ----------
    path:
        Our checkpoint, a paper DINO/MAE/SimCLR release, or a bare ViT state dict (``model`` needed then).
    model:
        ``dino``, ``mae`` or ``simclr``; None takes the method from the file. A file of another method is an error.
    arch:
        Architecture name used only when the checkpoint records none; None falls back to the method's default.
    img_size:
        Image size to embed at; None keeps the checkpoint's grid, else ``pos_embed`` is resampled once, here.
    pool:
        ``cls``, ``mean`` or ``mean_prenorm``; None is the method's default (CLS for DINO/SimCLR, mean for MAE).
    dino_weights:
        ``teacher`` (the EMA teacher, as the paper embeds) or ``student``.

    Returns
    -------
    LoadedBackbone
        The backbone (eval mode, on the CPU), the ``IntensityNorm`` to standardise with (the checkpoint's own, or
        the constants a paper model was trained with), the pooling, and ``info`` for run.json (format, method,
        arch and its source, patch size, channels, image size and grid, width, depth, heads, epoch, which weights,
        ignored keys), so a profile table can be traced to exact weights and settings. ConfigError for a bad
        ``model``, ``pool`` or ``dino_weights``; CheckpointError naming the file for an unreadable or unrecognised
        checkpoint, a method mismatch, missing or unexpected keys, or a patch size or grid that does not fit.
    """
    if model is not None and model not in DEFAULT_POOL:
        raise ConfigError(f"unknown --model {model!r}; choose one of {', '.join(DEFAULT_POOL)}")
    if dino_weights not in ("teacher", "student"):
        raise ConfigError(f"dino_weights must be 'teacher' or 'student', got {dino_weights!r}")
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
    path = str(path)
    obj = load_checkpoint(path)
    for _name, detect, extract in FORMATS:
        if detect(obj):
            ex = extract(path, obj, model, {"dino_weights": dino_weights})
            break
    else:
        raise CheckpointError(f"{path}: not a recognised checkpoint (top-level keys: {sorted(map(str, obj))[:8]})")
    if model is not None and ex.method != model:
        raise CheckpointError(f"{path}: this is a {ex.method} checkpoint ({ex.fmt}) but --model {model} was given")
    state = ex.state
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in state:
            raise CheckpointError(f"{path}: backbone weights lack {key!r} (found {sorted(state)[:4]})")
    # The architecture the checkpoint records (ours; the paper's args.arch / args.model / hyper_parameters.vit) wins:
    # the number of heads cannot be read from the weights, and --arch often holds a default (vit_small_patch16).
    arch_name = ex.arch or arch or DEFAULT_ARCH[ex.method]
    arch_source = "checkpoint" if ex.arch else ("--arch" if arch else "default")
    ckpt_patch = int(state["patch_embed.proj.weight"].shape[-1])
    in_chans = int(state["patch_embed.proj.weight"].shape[1])
    patch = None if arch_name in FIXED_PATCH else ckpt_patch
    cfg = arch_config(arch_name, patch, **ex.overrides)
    if cfg["patch_size"] != ckpt_patch:
        raise CheckpointError(f"{path}: weights have patch {ckpt_patch} but --arch {arch_name} has {cfg['patch_size']}")
    grid = _grid(path, state["pos_embed"])
    size = img_size or grid * ckpt_patch
    backbone = create_backbone(arch_name, in_chans, img_size=size, patch_size=patch, **ex.overrides)
    _check_keys(f"{arch_name} ({cfg['embed_dim']}-d, {cfg['depth']} blocks)", backbone, state, path)
    new_grid = size // ckpt_patch
    if new_grid != grid:
        state = {**state, "pos_embed": resample_abs_pos_embed(state["pos_embed"], [new_grid, new_grid], [grid, grid])}
    if tuple(state["pos_embed"].shape) != tuple(backbone.pos_embed.shape):
        raise CheckpointError(f"{path}: pos_embed {tuple(state['pos_embed'].shape)} cannot fit {arch_name}")
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    intensity = ex.intensity
    if intensity is None:
        intensity = get_intensity_norm(PAPER_INTENSITY[ex.method])
    info = {
        "path": path, "format": ex.fmt, "method": ex.method, "arch": arch_name, "arch_source": arch_source,
        "patch_size": ckpt_patch,
        "in_chans": in_chans, "img_size": size, "checkpoint_grid": grid, "embed_dim": cfg["embed_dim"],
        "depth": cfg["depth"], "num_heads": cfg["num_heads"], "channels": ex.channels, "epoch": ex.epoch,
        "weights": ex.weights, "ignored_keys": ex.ignored, "intensity": getattr(intensity, "name", None),
    }
    return LoadedBackbone(backbone, intensity, pool or DEFAULT_POOL[ex.method], info)
