"""Augmentations for 5-channel 16-bit sites: crop boxes and crops in the loader workers, the rest batched on the device.

Worker side (numpy): ``sample_crop_boxes`` draws boxes that satisfy the cell rule through the integral image, and
``crop_and_resize`` reads only those boxes from a (memory-mapped) site, so a worker never touches the whole site.
Device side (torch, batched, per-sample parameters from an explicit generator): ``GpuAugment`` on the collated
crops. No function here writes into its input: the paper's pipeline did (a crop was a view and the colour ops ran
in place), which corrupted the later views of a site.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.cellmask import DEFAULT_MIN_FRACTION, UINT16_MAX, box_fractions
from data.intensity import uint16_to_float
from utils.errors import ConfigError, DataError

DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many area/ratio draws before a centre crop


def as_scale(value: Any) -> tuple[float, float] | None:
    """Accept the paper's crop-scale flags: None, one float ``s`` (read as (s, 1.0), torchvision's sense) or a pair."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        pair = (float(value), 1.0)
    else:
        items = list(value)
        if len(items) != 2:
            raise ConfigError(f"crop scale {value!r} must be one number or two numbers (min max)")
        pair = (float(items[0]), float(items[1]))
    if not 0.0 < pair[0] <= pair[1] <= 1.0:
        raise ConfigError(f"crop scale {value!r} must satisfy 0 < min <= max <= 1 (fractions of the site area)")
    return pair


@dataclass
class ViewSpec:
    """One group of views: ``count`` crops of ``size`` px, native (scale None, the paper) or random resized."""

    count: int
    size: int
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] = DEFAULT_RATIO

    def __post_init__(self) -> None:
        if int(self.count) < 1 or int(self.size) < 1:
            raise ConfigError(f"view count and size must be >= 1, got count={self.count} size={self.size}")
        self.count, self.size = int(self.count), int(self.size)
        self.scale = as_scale(self.scale)
        lo, hi = (float(r) for r in self.ratio)
        if not 0.0 < lo <= hi:
            raise ConfigError(f"aspect ratio range {self.ratio!r} must satisfy 0 < min <= max")
        self.ratio = (lo, hi)


# ----------------------------------------------------------------------------------------------- worker side (numpy)


def _native_boxes(rng: np.random.Generator, shape: tuple[int, ...], height: int, width: int, size: int) -> np.ndarray:
    """Uniform top-left corners of size x size boxes, like torchvision's RandomCrop."""
    if size > height or size > width:
        raise DataError(f"crop size {size} is larger than the {height}x{width} site")
    y = rng.integers(0, height - size + 1, shape)
    x = rng.integers(0, width - size + 1, shape)
    return np.stack([y, x, np.full(shape, size), np.full(shape, size)], axis=-1)


def _centre_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback box (h, w) when no area/ratio draw fits the site."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return int(round(width / ratio[0])), width
    if in_ratio > ratio[1]:
        return height, int(round(height * ratio[1]))
    return height, width


def _resized_boxes(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> np.ndarray:
    """RandomResizedCrop boxes (area fraction in ``scale``, log-uniform aspect ratio), vectorised over ``shape``."""
    full = shape + (RRC_ATTEMPTS,)
    area = height * width * rng.uniform(scale[0], scale[1], full)
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), full))
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.expand_dims(fits.argmax(axis=-1), -1)
    fb_h, fb_w = _centre_fallback(height, width, ratio)
    any_fit = fits.any(axis=-1)
    h = np.where(any_fit, np.take_along_axis(h, first, -1)[..., 0], fb_h)
    w = np.where(any_fit, np.take_along_axis(w, first, -1)[..., 0], fb_w)
    y = np.where(any_fit, rng.integers(0, height - h + 1), (height - h) // 2)
    x = np.where(any_fit, rng.integers(0, width - w + 1), (width - w) // 2)
    return np.stack([y, x, h, w], axis=-1)


def sample_crop_boxes(
    integral: np.ndarray | Callable[[np.ndarray, float], np.ndarray] | None,
    height: int,
    width: int,
    spec: ViewSpec,
    rng: np.random.Generator,
    max_tries: int = 20,
    min_fraction: float = DEFAULT_MIN_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``spec.count`` crop boxes (y, x, h, w) that contain cells, all tries at once.

    Each box takes the first of ``max_tries`` draws that passes the cell rule, or the last draw when none passes
    (the paper's rule). Returns the boxes and a bool array saying which boxes passed. ``integral`` is the site's
    summed-area table (``integral_mask``), or a rule ``(boxes (count, tries, 4), min_fraction) -> bool (count,
    tries)`` exact up to each row's first pass (``CellMaskSummary.rule``: what training uses), or None for no
    cell rule (one draw per box). The draws never depend on the rule, so both give the same boxes.
    """
    if max_tries < 1:
        raise ConfigError(f"max_tries must be >= 1, got {max_tries}")
    tries = 1 if integral is None else max_tries
    shape = (spec.count, tries)
    if spec.scale is None:
        boxes = _native_boxes(rng, shape, height, width, spec.size)
    else:
        boxes = _resized_boxes(rng, shape, height, width, spec.scale, spec.ratio)
    if integral is None:
        return boxes[:, 0], np.ones(spec.count, dtype=bool)
    if callable(integral):
        ok = integral(boxes, min_fraction)
    elif integral.shape != (height + 1, width + 1):
        raise ValueError(f"integral image {integral.shape} does not match a {height}x{width} site")
    else:
        ok = box_fractions(integral, boxes.reshape(-1, 4)).reshape(shape) >= min_fraction
    passed = ok.any(axis=1)
    pick = np.where(passed, ok.argmax(axis=1), tries - 1)
    return boxes[np.arange(spec.count), pick], passed


CELL_JITTER = 8  # px: a cell-centred box's centre moves up to this far from its nucleus (a nucleus radius is ~11 px)


def sample_cell_boxes(
    centres: np.ndarray,
    height: int,
    width: int,
    spec: ViewSpec,
    rng: np.random.Generator,
    jitter: int = CELL_JITTER,
) -> np.ndarray:
    """``spec.count`` crop boxes (y, x, h, w) centred on randomly chosen nuclei, with a small jitter, inside the site.

    Box sizes follow the recipe as in ``sample_crop_boxes`` (``spec.size`` px, or a RandomResizedCrop area and
    aspect draw); the nucleus of each box is drawn uniformly from ``centres`` ((n, 2) (y, x), n >= 1), its centre
    moved by a uniform integer offset in [-jitter, jitter] per axis, and the box is then shifted, never shrunk,
    to lie inside the image (so a box near the border is no longer centred, but keeps its size and its cell).
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    if len(centres) == 0:
        raise ValueError("sample_cell_boxes needs at least one nucleus centre")
    if spec.scale is None:
        if spec.size > height or spec.size > width:
            raise DataError(f"crop size {spec.size} is larger than the {height}x{width} site")
        h = w = np.full(spec.count, spec.size, dtype=np.int64)
    else:
        boxes = _resized_boxes(rng, (spec.count,), height, width, spec.scale, spec.ratio)
        h, w = boxes[:, 2], boxes[:, 3]
    pick = rng.integers(0, len(centres), spec.count)
    offset = rng.integers(-int(jitter), int(jitter) + 1, (spec.count, 2))
    centre = np.floor(centres[pick] + 0.5).astype(np.int64) + offset
    y = np.clip(centre[:, 0] - h // 2, 0, height - h)
    x = np.clip(centre[:, 1] - w // 2, 0, width - w)
    return np.stack([y, x, h, w], axis=-1)


def _resize_uint16(region: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize of a (C, h, w) uint16 region, rounded back to uint16."""
    t = torch.from_numpy(region.astype(np.float32))[None]
    out = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, UINT16_MAX).numpy().astype(np.uint16)


def crop_and_resize(site_array: Any, boxes: np.ndarray, out_size: int) -> np.ndarray:
    """Read only the boxes from a (C, H, W) site (possibly memory-mapped) and return NEW uint16 (n, C, out, out) crops.

    A box whose size already equals ``out_size`` is copied as is; others are resized with antialiasing on the CPU.
    """
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    channels, height, width = (int(s) for s in site_array.shape)
    out = np.empty((len(boxes), channels, out_size, out_size), dtype=np.uint16)
    for i, (y, x, h, w) in enumerate(boxes.tolist()):
        if y < 0 or x < 0 or h < 1 or w < 1 or y + h > height or x + w > width:
            raise DataError(f"crop box (y={y}, x={x}, h={h}, w={w}) falls outside the {height}x{width} site")
        region = np.asarray(site_array[:, y : y + h, x : x + w])
        if region.dtype != np.uint16:
            raise DataError(f"site pixels must be uint16, got {region.dtype}")
        out[i] = region if (h == out_size and w == out_size) else _resize_uint16(region, out_size)
    return out


# ----------------------------------------------------------------------------------------------- device side (torch)


def _rand(generator: torch.Generator | None, device: torch.device, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its own device), moved to ``device``."""
    gdev = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gdev).to(device)


def _randint(
    generator: torch.Generator | None, device: torch.device, high: torch.Tensor | int, *shape: int
) -> torch.Tensor:
    """Integers in [0, high) with a per-element ``high`` (tensor or int), drawn from ``generator``."""
    u = _rand(generator, device, *shape)
    high_t = torch.as_tensor(high, device=device)
    return torch.minimum((u * high_t).long(), high_t.long() - 1)


COLOR_MODES = ("relative", "paper")
COLOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "relative": {"shift": 0.5, "gamma": (0.8, 1.25), "brightness": 0.2},  # shift in units of the view's std
    "paper": {"shift": 0.3, "gamma": (0.5, 1.5), "brightness": 0.0},  # absolute, on raw [0, 1] intensities
}


def _check_probability(name: str, p: float) -> float:
    """Reject probabilities outside [0, 1] with the option's name."""
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"augmentation probability {name}={p!r} must be in [0, 1]")
    return float(p)


def _check_range(name: str, pair: Sequence[float], low: float) -> tuple[float, float]:
    """Reject (min, max) ranges that are reversed or below ``low``."""
    lo, hi = (float(v) for v in pair)
    if not low <= lo <= hi:
        raise ConfigError(f"augmentation range {name}={tuple(pair)!r} must satisfy {low} <= min <= max")
    return lo, hi


def _gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised 1-D Gaussian kernels (B, size), one per sample, as torchvision builds them."""
    half = (size - 1) * 0.5
    coords = torch.linspace(-half, half, size, device=sigma.device, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (coords[None] / sigma[:, None].float()) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int = 23) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma, as one grouped convolution (reflect padding, like torchvision).

    The kernel shrinks to the largest odd size that reflect padding allows when the image is smaller than it.
    """
    b, c, h, w = x.shape
    size = min(int(kernel_size), 2 * (min(h, w) - 1) + 1)
    if size < 3:
        return x.clone()
    r = size // 2
    kern = _gaussian_kernels(sigma, size).to(x.dtype).repeat_interleave(c, dim=0)
    z = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    z = F.conv2d(z, kern.view(b * c, 1, size, 1), groups=b * c)
    z = F.conv2d(z, kern.view(b * c, 1, 1, size), groups=b * c)
    return z.view(b, c, h, w)


class GpuAugment(nn.Module):
    """Batched per-sample augmentation of float [0, 1] crops on the device; ``forward`` never writes into its input.

    Order: horizontal flip, vertical flip, 90-degree rotation, per-channel intensity jitter (``shift_p``), per-channel
    gamma (``gamma_p``), Gaussian blur (per-sample sigma), Gaussian noise, channel drop. ``rot90_p`` is the chance of
    rotating by 90, 180 or 270 degrees (equally likely), so the default 0.75 makes all four orientations equally
    likely (off in the paper; cells have no orientation). Blur/noise/drop default to p=0.

    ``color_mode`` chooses how the intensity jitter is scaled:

    * ``"relative"`` (default): the jitter is tied to each view's own per-channel dynamic range, so it is equally
      strong on dark and bright images. Per channel, ``x -> x * U(1 - brightness, 1 + brightness) + U(-shift, shift)
      * std_c * b`` (``std_c`` is the view's spatial std of that channel, ``b`` the brightness factor), clipped to
      [0, 1]; then gamma ``x -> r_c * (x / r_c) ** U(gamma)`` with ``r_c`` the view's per-channel maximum. Every step is
      homogeneous of degree one, so ``aug(k * x) == k * aug(x)`` while nothing clips (defaults: brightness 0.2,
      shift 0.5 std, gamma (0.8, 1.25)).
    * ``"paper"``: the paper's absolute ops on raw [0, 1] intensities: additive shift U(-shift, shift) clipped to
      [0, 1], then gamma U(gamma) (defaults shift 0.3, gamma (0.5, 1.5)). On Cell Painting sites, whose per-channel
      means are ~0.06 and spatial std ~0.04, these offsets are 5-8x the image content and turn views black or flat.
    """

    def __init__(
        self,
        hflip_p: float = 0.5,
        vflip_p: float = 0.5,
        rot90_p: float = 0.75,
        shift: float | None = None,
        shift_p: float = 1.0,
        gamma: Sequence[float] | None = None,
        gamma_p: float = 1.0,
        blur_p: float = 0.0,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        blur_kernel: int = 23,
        noise_p: float = 0.0,
        noise_std: float = 0.05,
        drop_p: float = 0.0,
        color_mode: str = "relative",
        brightness: float | None = None,
    ) -> None:
        super().__init__()
        if color_mode not in COLOR_MODES:
            raise ConfigError(f"color_mode={color_mode!r} must be one of {COLOR_MODES}")
        self.color_mode = color_mode
        defaults = COLOR_DEFAULTS[color_mode]
        shift = defaults["shift"] if shift is None else shift
        gamma = defaults["gamma"] if gamma is None else gamma
        brightness = defaults["brightness"] if brightness is None else float(brightness)
        if color_mode == "paper" and brightness != 0.0:
            raise ConfigError("brightness only applies to color_mode='relative' "
                              "(the paper has no multiplicative jitter)")
        if not 0.0 <= brightness < 1.0:
            raise ConfigError(f"brightness={brightness!r} must be in [0, 1)")
        self.brightness = brightness
        self.hflip_p = _check_probability("hflip_p", hflip_p)
        self.vflip_p = _check_probability("vflip_p", vflip_p)
        self.rot90_p = _check_probability("rot90_p", rot90_p)
        self.shift_p = _check_probability("shift_p", shift_p)
        self.gamma_p = _check_probability("gamma_p", gamma_p)
        self.blur_p = _check_probability("blur_p", blur_p)
        self.noise_p = _check_probability("noise_p", noise_p)
        self.drop_p = _check_probability("drop_p", drop_p)
        if shift < 0 or noise_std < 0:
            raise ConfigError(f"shift={shift!r} and noise_std={noise_std!r} must be >= 0")
        self.shift = float(shift)
        self.noise_std = float(noise_std)
        self.gamma = _check_range("gamma", gamma, 1e-6)
        self.blur_sigma = _check_range("blur_sigma", blur_sigma, 1e-6)
        if int(blur_kernel) < 1 or int(blur_kernel) % 2 == 0:
            raise ConfigError(f"blur_kernel={blur_kernel!r} must be a positive odd number")
        self.blur_kernel = int(blur_kernel)

    def config(self) -> dict[str, Any]:
        """The settings as a plain dict, for hp.json and checkpoints."""
        return {name: getattr(self, name) for name in AUG_OPTIONS}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def sample_params(
        self, shape: Sequence[int], generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """Draw every per-sample parameter for a batch of ``shape`` (B, C, h, w), so tests can replay them."""
        b, c, h, w = (int(s) for s in shape)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        u = lambda *s: _rand(generator, dev, *s)
        params: dict[str, torch.Tensor] = {
            "hflip": u(b) < self.hflip_p,
            "vflip": u(b) < self.vflip_p,
        }
        rot = u(b) < self.rot90_p
        params["rot90"] = torch.where(rot, 1 + _randint(generator, dev, 3, b), torch.zeros_like(rot, dtype=torch.long))
        if self.rot90_p > 0 and h != w:
            raise ValueError(f"90-degree rotations need square crops, got {h}x{w}")
        on = u(b) < self.shift_p
        params["shift"] = (u(b, c) * 2 - 1) * self.shift * on[:, None]
        on = u(b) < self.gamma_p
        lo, hi = self.gamma
        params["gamma"] = torch.where(on[:, None], lo + (hi - lo) * u(b, c), torch.ones(b, c, device=dev))
        if self.color_mode == "relative":  # drawn after the paper's parameters, so paper mode replays unchanged
            on = u(b) < self.shift_p
            factor = 1.0 + (u(b, c) * 2 - 1) * self.brightness
            params["brightness"] = torch.where(on[:, None], factor, torch.ones(b, c, device=dev))
        if self.blur_p > 0:
            lo, hi = self.blur_sigma
            params["blur"] = u(b) < self.blur_p
            params["blur_sigma"] = lo + (hi - lo) * u(b)
        if self.noise_p > 0:
            params["noise"] = u(b) < self.noise_p
            gdev = generator.device if generator is not None else dev
            params["noise_values"] = torch.randn((b, c, h, w), generator=generator, device=gdev).to(dev)
        if self.drop_p > 0:
            params["drop"] = u(b) < self.drop_p
            params["drop_channel"] = _randint(generator, dev, c, b)
        return params

    def apply(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply drawn parameters out of place; returns a new tensor even when nothing fires."""
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"GpuAugment expects float (B, C, h, w) in [0, 1], got {x.dtype} {tuple(x.shape)}")
        geometric = self.hflip_p > 0 or self.vflip_p > 0 or self.rot90_p > 0
        y = _dihedral(x, params["hflip"], params["vflip"], params["rot90"]) if geometric else x
        expand = lambda t: t.to(y.dtype)[:, :, None, None]
        if self.color_mode == "relative":
            y = self._relative_intensity(y, params, expand)
        else:
            if self.shift_p > 0 and self.shift > 0:
                y = (y + expand(params["shift"])).clamp(0.0, 1.0)
            if self.gamma_p > 0:
                y = y.clamp(0.0, 1.0).pow(expand(params["gamma"])).clamp(0.0, 1.0)
        if "blur" in params:
            blurred = gaussian_blur_batch(y, params["blur_sigma"], self.blur_kernel)
            y = torch.where(params["blur"][:, None, None, None], blurred, y)
        if "noise" in params:
            noisy = (y + self.noise_std * params["noise_values"].to(y.dtype)).clamp(0.0, 1.0)
            y = torch.where(params["noise"][:, None, None, None], noisy, y)
        if "drop" in params:
            hit = F.one_hot(params["drop_channel"], y.shape[1]).bool() & params["drop"][:, None]
            y = y.masked_fill(hit[:, :, None, None], 0.0)
        return x.clone() if y is x else y

    def _relative_intensity(self, y: torch.Tensor, params: dict[str, torch.Tensor], expand: Callable) -> torch.Tensor:
        """Brightness x offset scaled by the view's own per-channel std, then gamma on x / per-channel max."""
        if self.shift_p > 0 and (self.shift > 0 or self.brightness > 0):
            factor = expand(params["brightness"])
            std = y.flatten(2).std(dim=2, unbiased=False)[:, :, None, None]
            y = ((y + expand(params["shift"]) * std) * factor).clamp(0.0, 1.0)
        if self.gamma_p > 0:
            ref = y.flatten(2).amax(dim=2)[:, :, None, None].clamp_min(1e-8)
            y = ((y / ref).clamp(0.0, 1.0).pow(expand(params["gamma"])) * ref).clamp(0.0, 1.0)
        return y

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch with per-sample parameters drawn from ``generator`` (torch's default one when None)."""
        return self.apply(x, self.sample_params(x.shape, generator, x.device))


def _dihedral(x: torch.Tensor, hflip: torch.Tensor, vflip: torch.Tensor, rot90: torch.Tensor) -> torch.Tensor:
    """Per-sample hflip, then vflip, then rotation by rot90 x 90 degrees (as torch.rot90), in three selects.

    A rotation is a transpose followed by flips (k=1: T then row flip; k=2: both flips; k=3: T then column flip), and
    moving the transpose ahead of the earlier flips swaps them, so the whole thing is one optional transpose and two
    optional flips.
    """
    a, b = hflip, vflip
    t = (rot90 % 2) == 1
    c = (rot90 == 1) | (rot90 == 2)
    d = (rot90 == 2) | (rot90 == 3)
    row_flip = c ^ torch.where(t, a, b)
    col_flip = d ^ torch.where(t, b, a)
    sel = lambda m: m[:, None, None, None]
    y = torch.where(sel(t), x.transpose(-1, -2), x) if x.shape[-1] == x.shape[-2] else x
    y = torch.where(sel(row_flip), y.flip(-2), y)
    return torch.where(sel(col_flip), y.flip(-1), y)


# ----------------------------------------------------------------------------------------------------------- recipes


@dataclass
class AugmentRecipe:
    """What one training method sees: the view groups and the device augmentation of each group."""

    views: list[ViewSpec]
    gpu_aug_per_view: list[GpuAugment]
    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.views) != len(self.gpu_aug_per_view):
            raise ConfigError(f"{len(self.views)} view groups but {len(self.gpu_aug_per_view)} augmentations")

    def to_dict(self) -> dict[str, Any]:
        """Plain description for hp.json."""
        return {
            "name": self.name,
            "views": [dataclasses.asdict(v) for v in self.views],
            "gpu_aug": [a.config() for a in self.gpu_aug_per_view],
        }

    def augment(self, views: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Device step: uint16 (or [0, 1] float) view tensors -> augmented float [0, 1] tensors, one per group."""
        out = []
        for v, aug in zip(views, self.gpu_aug_per_view, strict=True):
            xf = v if v.is_floating_point() else uint16_to_float(v)
            out.append(aug(xf, generator))
        return out


AUG_OPTIONS = tuple(p for p in inspect.signature(GpuAugment.__init__).parameters if p != "self")
MAE_AUG_DEFAULTS = {"rot90_p": 0.0, "shift_p": 0.0, "gamma_p": 0.0}  # flips only (the paper), in either color_mode


def _dino_recipe(
    global_crops_number: int = 2,
    global_crops_size: int = 224,
    global_crops_scale: Any = None,
    local_crops_number: int = 8,
    local_crops_size: int = 96,
    local_crops_scale: Any = None,
    ratio: Sequence[float] = DEFAULT_RATIO,
    **aug: Any,
) -> AugmentRecipe:
    """DINO multi-crop: 2 x 224 global + 8 x 96 local native crops by default (the paper); scales make them resized."""
    views = [ViewSpec(global_crops_number, global_crops_size, global_crops_scale, tuple(ratio))]
    if int(local_crops_number) > 0:
        views.append(ViewSpec(local_crops_number, local_crops_size, local_crops_scale, tuple(ratio)))
    return AugmentRecipe(views, [GpuAugment(**aug) for _ in views], "dino")


def _simclr_recipe(
    size: int = 224, scale: Any = None, n_views: int = 2, ratio: Sequence[float] = DEFAULT_RATIO, **aug: Any
) -> AugmentRecipe:
    """SimCLR: two views of ``size`` (the paper's --size); ``scale`` (the paper's --scale) makes them resized crops."""
    return AugmentRecipe([ViewSpec(n_views, size, scale, tuple(ratio))], [GpuAugment(**aug)], "simclr")


def _mae_recipe(
    samples_per_image: int = 1, size: int = 224, scale: Any = None, ratio: Sequence[float] = DEFAULT_RATIO, **aug: Any
) -> AugmentRecipe:
    """MAE: ``samples_per_image`` cell crops of 224 with flips only (the paper), unless options turn more on."""
    settings = {**MAE_AUG_DEFAULTS, **aug}
    return AugmentRecipe([ViewSpec(samples_per_image, size, scale, tuple(ratio))], [GpuAugment(**settings)], "mae")


RECIPES: dict[str, Callable[..., AugmentRecipe]] = {"dino": _dino_recipe, "simclr": _simclr_recipe, "mae": _mae_recipe}


def get_recipe(name: str, **overrides: Any) -> AugmentRecipe:
    """Build a method's recipe; ``overrides`` are the recipe's own options or any GpuAugment option (None = default)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown augmentation recipe {name!r}; choose one of {sorted(RECIPES)}")
    builder = RECIPES[name]
    own = [p for p in inspect.signature(builder).parameters if p != "aug"]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(own) - set(AUG_OPTIONS))
    if unknown:
        known = sorted(own + list(AUG_OPTIONS))
        raise ConfigError(f"unknown option(s) {unknown} for the {name!r} recipe; known: {known}")
    recipe = builder(**given)
    recipe.options = dict(given)
    return recipe
