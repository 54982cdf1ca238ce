"""Cell-content mask: the DNA-channel Otsu threshold and the paper's "a region holds cells" rule.

Thresholds are in RAW intensity units (the uint16 scale). The rule: a region contains cells when at least
``min_fraction`` (1 %) of its DNA pixels exceed ``factor`` (0.7) times the Otsu threshold. The integral-image helpers
answer that question for any box in O(1), which is what crop sampling needs. Stored thresholds are brought to raw
units by ``data.schema.otsu_to_raw``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

UINT16_MAX = 65535.0
DEFAULT_FACTOR = 0.7
DEFAULT_MIN_FRACTION = 0.01
MIN_SAMPLES_PER_SIDE = 32


def _subsample_step(height: int, width: int, subsample: int) -> int:
    """Keep at least MIN_SAMPLES_PER_SIDE samples per side so small images still get a usable histogram."""
    if subsample < 1:
        raise ValueError(f"subsample must be >= 1, got {subsample}")
    return max(1, min(subsample, min(height, width) // MIN_SAMPLES_PER_SIDE))


def _otsu_from_counts_np(counts: np.ndarray, centers: np.ndarray) -> float:
    """Maximise the between-class variance over the histogram, exactly as skimage does."""
    counts = counts.astype(np.float64)
    weight1 = np.cumsum(counts)
    weight2 = np.cumsum(counts[::-1])[::-1]
    mean1 = np.cumsum(counts * centers) / np.maximum(weight1, 1e-300)
    mean2 = (np.cumsum((counts * centers)[::-1]) / np.maximum(weight2[::-1], 1e-300))[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centers[int(np.argmax(variance12))])


def otsu_threshold(img: np.ndarray | torch.Tensor, nbins: int = 256, subsample: int = 10) -> float:
    """Otsu threshold of one 2-D image (the DNA channel), for sites whose metadata has none.

    Uses an ``nbins`` histogram over [min, max] of the image sampled every ``subsample`` pixels per axis (the paper
    uses 10; the step shrinks so that at least 32 samples per side remain). Returns the centre of the threshold bin,
    in the image's own units; a constant image returns its value.
    """
    if isinstance(img, torch.Tensor):
        return float(otsu_threshold_batch(img.unsqueeze(0), nbins=nbins, subsample=subsample)[0].item())
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"otsu_threshold expects a 2-D image, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("otsu_threshold got an empty image")
    step = _subsample_step(arr.shape[0], arr.shape[1], subsample)
    values = arr[::step, ::step].astype(np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    width = (hi - lo) / nbins
    idx = np.clip(((values - lo) / width).astype(np.int64), 0, nbins - 1)
    counts = np.bincount(idx, minlength=nbins)
    centers = lo + (np.arange(nbins) + 0.5) * width
    return _otsu_from_counts_np(counts, centers)


def otsu_threshold_batch(x: torch.Tensor, nbins: int = 256, subsample: int = 10) -> torch.Tensor:
    """Otsu thresholds of a batch of 2-D images (B, H, W) in one set of tensor ops, so it runs on the device.

    Same definition as ``otsu_threshold``; returns float64 (B,) in the images' units.
    """
    if x.ndim != 3:
        raise ValueError(f"otsu_threshold_batch expects (B, H, W), got shape {tuple(x.shape)}")
    b, h, w = x.shape
    if b == 0:
        return torch.empty(0, dtype=torch.float64, device=x.device)
    step = _subsample_step(h, w, subsample)
    values = x[:, ::step, ::step].reshape(b, -1).to(torch.float64)
    lo = values.amin(dim=1)
    hi = values.amax(dim=1)
    constant = hi <= lo
    width = torch.where(constant, torch.ones_like(lo), (hi - lo) / nbins)
    idx = ((values - lo[:, None]) / width[:, None]).to(torch.int64).clamp_(0, nbins - 1)
    idx = idx + torch.arange(b, device=x.device)[:, None] * nbins
    counts = torch.bincount(idx.reshape(-1), minlength=b * nbins).reshape(b, nbins).to(torch.float64)
    centers = lo[:, None] + (torch.arange(nbins, device=x.device, dtype=torch.float64)[None] + 0.5) * width[:, None]
    weight1 = counts.cumsum(1)
    weight2 = counts.flip(1).cumsum(1).flip(1)
    mean1 = (counts * centers).cumsum(1) / weight1.clamp_min(1e-300)
    mean2 = (counts * centers).flip(1).cumsum(1).flip(1) / weight2.clamp_min(1e-300)
    variance12 = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    best = variance12.argmax(dim=1, keepdim=True)
    threshold = centers.gather(1, best).squeeze(1)
    return torch.where(constant, lo, threshold)


def _as_float_tensor(x: Any) -> torch.Tensor:
    """Compare in float32 because torch.uint16 supports few operations; uint16 values are exact in float32."""
    t = torch.as_tensor(x)
    return t if t.is_floating_point() else t.to(torch.float32)


def cell_fraction(dna: torch.Tensor, otsu: Any, factor: float = DEFAULT_FACTOR) -> torch.Tensor:
    """Fraction of pixels over ``factor * otsu`` in each (h, w) region, the quantity the cell rule thresholds.

    ``dna`` is (..., h, w); ``otsu`` broadcasts to (...) and must be in the same units as ``dna`` (raw uint16 by
    convention; resolve NaN thresholds first, since NaN makes every fraction 0).
    """
    d = _as_float_tensor(dna)
    thr = torch.as_tensor(otsu, dtype=torch.float64, device=d.device) * factor
    thr = thr.to(d.dtype if d.dtype == torch.float64 else torch.float32)
    return (d > thr[..., None, None]).to(torch.float32).mean(dim=(-2, -1))


def has_cells(
    dna: torch.Tensor, otsu: Any, factor: float = DEFAULT_FACTOR, min_fraction: float = DEFAULT_MIN_FRACTION
) -> torch.Tensor:
    """The paper's rule, vectorised over all leading dims: >= ``min_fraction`` of pixels exceed ``factor * otsu``."""
    return cell_fraction(dna, otsu, factor) >= min_fraction


def integral_mask(dna: np.ndarray, otsu: float, factor: float = DEFAULT_FACTOR) -> np.ndarray:
    """Summed-area table (H+1, W+1) of the "over threshold" mask, so any box's cell fraction costs O(1)."""
    arr = np.asarray(dna)
    if arr.ndim != 2:
        raise ValueError(f"integral_mask expects a 2-D DNA image, got shape {arr.shape}")
    dtype = np.int32 if arr.size < 2**31 else np.int64
    out = np.zeros((arr.shape[0] + 1, arr.shape[1] + 1), dtype=dtype)
    np.greater(arr, factor * float(otsu), out=out[1:, 1:], casting="unsafe")
    np.cumsum(out, axis=1, out=out)
    np.cumsum(out, axis=0, out=out)
    return out


def box_fractions(integral: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Cell fraction of each box (n, 4 as y, x, h, w) from the summed-area table, without touching pixels."""
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    y0, x0, h, w = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    y1, x1 = y0 + h, x0 + w
    rows, cols = integral.shape
    if (y0 < 0).any() or (x0 < 0).any() or (h < 1).any() or (w < 1).any() or (y1 >= rows).any() or (x1 >= cols).any():
        raise ValueError(f"boxes fall outside the {rows - 1}x{cols - 1} image or are empty")
    corner = lambda yy, xx: integral[yy, xx].astype(np.int64)
    total = corner(y1, x1) - corner(y0, x1) - corner(y1, x0) + corner(y0, x0)
    return total / (h * w).astype(np.float64)


MASK_BLOCK = 16  # px: the summary's grid; ~19 KB per 1080² site


class CellMaskSummary:
    """A site's over-threshold DNA mask as a summed-area table of 16 px block counts, computed once per site.

    Why: the cell rule asks, for every candidate crop box, which fraction of its DNA pixels exceeds the threshold.
    The full-resolution table (``integral_mask``) costs a read of the whole DNA plane and two cumulative sums for
    every training item (about 7 ms for a 1080² site), more than MAE's one 224 px crop. The block table (about
    19 KB for 1080², cached by ``data.datasets.TrainCropDataset``) bounds each box's count from below (the blocks
    inside it) and from above (the blocks it touches); only a box whose bounds straddle the rule is counted
    exactly, from its own DNA pixels. Every decision equals the full table's (``tests/test_cellmask.py``).
    """

    def __init__(self, dna: np.ndarray, otsu: float, factor: float = DEFAULT_FACTOR, block: int = MASK_BLOCK) -> None:
        arr = np.asarray(dna)
        if arr.ndim != 2:
            raise ValueError(f"CellMaskSummary expects a 2-D DNA image, got shape {arr.shape}")
        self.height, self.width = (int(s) for s in arr.shape)
        self.block = int(block)
        self.threshold = factor * float(otsu)  # the comparison integral_mask makes, in raw units
        hb, wb = -(-self.height // self.block), -(-self.width // self.block)
        mask = np.zeros((hb * self.block, wb * self.block), dtype=bool)
        np.greater(arr, self.threshold, out=mask[: self.height, : self.width])
        counts = mask.reshape(hb, self.block, wb, self.block).sum(axis=(1, 3), dtype=np.int64)
        self.table = np.zeros((hb + 1, wb + 1), dtype=np.int64)
        np.cumsum(np.cumsum(counts, axis=0), axis=1, out=self.table[1:, 1:])

    @property
    def nbytes(self) -> int:
        """Memory the summary holds, for the cache's budget."""
        return int(self.table.nbytes)

    def _sums(self, y0: np.ndarray, x0: np.ndarray, y1: np.ndarray, x1: np.ndarray) -> np.ndarray:
        """Pixel counts over block rectangles [y0, y1) x [x0, x1) in block units (empty rectangles give 0)."""
        y1, x1 = np.maximum(y1, y0), np.maximum(x1, x0)
        t = self.table
        return t[y1, x1] - t[y0, x1] - t[y1, x0] + t[y0, x0]

    def rule(self, site: Any, channel: int) -> Callable[[np.ndarray, float], np.ndarray]:
        """The cell rule for ``sample_crop_boxes``; the few boxes the bounds cannot decide read their own DNA pixels
        as ``site[channel, y0:y1, x0:x1]`` (a lazy site reads only that region)."""
        return lambda boxes, min_fraction: self.passes(boxes, site, channel, min_fraction)

    def passes(self, boxes: np.ndarray, site: Any, channel: int, min_fraction: float) -> np.ndarray:
        """Which boxes (count, tries, 4 as y, x, h, w) pass the rule, exact up to each row's first passing try.

        Tries after a row's first pass may read False: ``sample_crop_boxes`` only uses the first pass of each row,
        so the exact count of undecided boxes stops there.
        """
        b = np.asarray(boxes, dtype=np.int64)
        y0, x0, h, w = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
        y1, x1 = y0 + h, x0 + w
        if (y0 < 0).any() or (x0 < 0).any() or (h < 1).any() or (w < 1).any() or (y1 > self.height).any() or (
                x1 > self.width).any():
            raise ValueError(f"boxes fall outside the {self.height}x{self.width} image or are empty")
        s = self.block
        area = (h * w).astype(np.float64)
        lower = self._sums(-(-y0 // s), -(-x0 // s), y1 // s, x1 // s)
        upper = self._sums(y0 // s, x0 // s, -(-y1 // s), -(-x1 // s))
        ok = lower / area >= min_fraction
        undecided = ~ok & (upper / area >= min_fraction)
        for r in np.flatnonzero(undecided.any(axis=1)):
            first = int(ok[r].argmax()) if ok[r].any() else ok.shape[1]
            for t in np.flatnonzero(undecided[r, :first]):
                region = np.asarray(site[channel, y0[r, t]: y1[r, t], x0[r, t]: x1[r, t]])
                if int(np.count_nonzero(region > self.threshold)) / area[r, t] >= min_fraction:
                    ok[r, t] = True
                    break
        return ok
