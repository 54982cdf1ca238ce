"""Intensity normalisation as one serialisable object, so training and inference use the same constants."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.schema import DEFAULT_CHANNELS
from utils.errors import DataError
from utils.fileio import write_json_atomic

UINT16_MAX = 65535.0
FORMAT = "cellpaint-ssl/intensity/1"
_INFO_KEYS = ("format", "source")


def uint16_to_float(x: torch.Tensor) -> torch.Tensor:
    """Float32 in [0, 1] on the tensor's own device, so uint16 data cross the bus at half the size of float."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"uint16_to_float expects a torch.Tensor, got {type(x).__name__}")
    return x.to(torch.float32) / UINT16_MAX


def _floats(values: Any, what: str, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f"intensity norm '{name}': {what} must be a list of numbers, got {values!r}") from None
    if any(not math.isfinite(v) for v in out):
        raise DataError(f"intensity norm '{name}': {what} has a non-finite value {list(out)}")
    return out


@dataclass(frozen=True)
class IntensityNorm:
    """Divide raw intensities by ``scale`` and standardise each channel with ``mean``/``std`` (on the [0,1] scale)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: tuple[str, ...] = DEFAULT_CHANNELS
    name: str = "custom"
    scale: float = UINT16_MAX
    percentiles: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        mean = _floats(self.mean, "mean", self.name)
        std = _floats(self.std, "std", self.name)
        channels = tuple(str(c) for c in self.channels)
        if not (len(mean) == len(std) == len(channels)) or not channels:
            raise DataError(
                f"intensity norm '{self.name}': {len(mean)} means, {len(std)} stds for {len(channels)} channels"
            )
        if len(set(channels)) != len(channels):
            raise DataError(f"intensity norm '{self.name}': repeated channel names {list(channels)}")
        if any(s <= 0 for s in std):
            raise DataError(f"intensity norm '{self.name}': std must be > 0, got {list(std)}")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise DataError(f"intensity norm '{self.name}': scale must be > 0, got {self.scale!r}")
        percentiles = None
        if self.percentiles is not None:
            percentiles = {}
            for key, values in self.percentiles.items():
                vals = list(_floats(values, f"percentile {key}", self.name))
                if len(vals) != len(channels):
                    raise DataError(f"intensity norm '{self.name}': percentile {key} has {len(vals)} values")
                percentiles[str(key)] = vals
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "percentiles", percentiles)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, stored in checkpoints and stats files."""
        return {
            "format": FORMAT,
            "name": self.name,
            "channels": list(self.channels),
            "mean": list(self.mean),
            "std": list(self.std),
            "scale": self.scale,
            "percentiles": None if self.percentiles is None else {k: list(v) for k, v in self.percentiles.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IntensityNorm:
        """Rebuild from ``to_dict`` output; unknown keys are an error so a typo cannot go unnoticed."""
        if not isinstance(d, Mapping):
            raise DataError(f"intensity norm must be a JSON object, got {type(d).__name__}")
        known = {"name", "channels", "mean", "std", "scale", "percentiles", *_INFO_KEYS}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(f"intensity norm has unknown keys {unknown}; expected {sorted(known)}")
        missing = [k for k in ("mean", "std", "channels") if k not in d]
        if missing:
            raise DataError(f"intensity norm is missing keys {missing}")
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            channels=tuple(d["channels"]),
            name=str(d.get("name", "custom")),
            scale=d.get("scale", UINT16_MAX),
            percentiles=d.get("percentiles"),
        )

    def save(self, path: str | os.PathLike[str], source: Mapping[str, Any] | None = None) -> None:
        """Write the JSON atomically; ``source`` records how the numbers were obtained."""
        d = self.to_dict()
        if source is not None:
            d["source"] = dict(source)
        write_json_atomic(path, d)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> IntensityNorm:
        """Read a JSON written by ``save`` (or by ``python -m data.stats``)."""
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: intensity norm file not found") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(d)
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None

    def _stats_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std shaped (C,1,1) on ``x``'s device, after checking the channel dimension (-3)."""
        if x.ndim < 3 or x.shape[-3] != len(self.channels):
            raise DataError(
                f"intensity norm '{self.name}' has {len(self.channels)} channels {list(self.channels)}, "
                f"input shape {tuple(x.shape)} has {x.shape[-3] if x.ndim >= 3 else 'no'} at dim -3"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def standardize(self, x01: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std along dim -3 for [0,1]-scaled input of shape (..., C, H, W)."""
        mean, std = self._stats_for(x01)
        return (x01 - mean) / std

    def apply(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw intensities (uint16 / int / float) to standardised float32, on the input's device."""
        mean, std = self._stats_for(x_raw)
        return (x_raw.to(torch.float32) / self.scale - mean.float()) / std.float()

    def select(self, channels: Sequence[str]) -> IntensityNorm:
        """The same constants for a subset or reordering of channels, looked up by name."""
        absent = [c for c in channels if c not in self.channels]
        if absent:
            raise DataError(f"intensity norm '{self.name}' has no channels {absent}; it has {list(self.channels)}")
        idx = [self.channels.index(c) for c in channels]
        percentiles = None
        if self.percentiles is not None:
            percentiles = {k: [v[i] for i in idx] for k, v in self.percentiles.items()}
        return IntensityNorm(
            mean=tuple(self.mean[i] for i in idx),
            std=tuple(self.std[i] for i in idx),
            channels=tuple(channels),
            name=self.name,
            scale=self.scale,
            percentiles=percentiles,
        )


PRESETS: dict[str, IntensityNorm] = {
    "paper_train": IntensityNorm(
        mean=(0.13849893, 0.18710597, 0.1586524, 0.15757588, 0.08674719),
        std=(0.13005716, 0.15461144, 0.15929441, 0.16021383, 0.16686504),
        name="paper_train",
    ),
    "paper_multisource": IntensityNorm(
        mean=(0.12528631, 0.17596765, 0.14736995, 0.13445823, 0.08349566),
        std=(0.12594905, 0.15605405, 0.16031352, 0.15751939, 0.15773378),
        name="paper_multisource",
    ),
    "paper_default": IntensityNorm(
        mean=(0.11715667, 0.13620728, 0.13002591, 0.13321745, 0.09648295),
        std=(0.12511064, 0.13302808, 0.15570045, 0.15732856, 0.1533618),
        name="paper_default",
    ),
}


def get_intensity_norm(name_or_json_path: str | os.PathLike[str]) -> IntensityNorm:
    """A preset by name or a JSON file by path, the one way every script resolves its normalisation flag."""
    key = str(name_or_json_path)
    if key in PRESETS:
        return PRESETS[key]
    if Path(key).is_file():
        return IntensityNorm.load(key)
    raise DataError(f"unknown intensity normalisation {key!r}: not a preset ({', '.join(PRESETS)}) nor a JSON file")
