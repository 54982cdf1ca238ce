"""Segmentation of one site into nuclei, cells and cytoplasm that share object ids.

Nuclei come from the DNA channel: Gaussian smoothing; an Otsu threshold raised to at least median + 5 robust SDs so
a blank field yields no objects; hole filling; a distance-transform watershed that splits touching nuclei; specks
and, like CellProfiler's default, nuclei touching the image edge dropped. Cells come from a watershed on the
inverted cytoplasm image (the sum of ``cyto_channels``, AGP + RNA) seeded by the nuclei, inside a foreground mask
and within ``max_cell_distance`` px of a nucleus. Cytoplasm is the cell minus its nucleus, so object k is the same
cell in all three label images and the measurements of the three compartments line up row by row.

It lives in the data layer because three pipelines use it: the handcrafted baseline (``segment``), and single-cell
inference and training (``nucleus_centres``), which may not import ``utils.handcrafted`` (docs/ARCHITECTURE.md,
"Layers").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from data.cellmask import otsu_threshold
from data.schema import DEFAULT_CHANNELS
from utils.errors import ConfigError, DataError


def check_range(obj: Any, above: dict[str, float], at_least: dict[str, float]) -> None:
    """Reject sizes and levels that would segment nothing or crash deep inside scikit-image / cp_measure.

    Shared by ``SegmentationParams`` and ``MeasureOptions``; the message names the field, which is also the flag.
    """
    for name, low in above.items():
        value = getattr(obj, name)
        if not math.isfinite(value) or value <= low:
            raise ConfigError(f"{name} must be > {low}, got {value}")
    for name, low in at_least.items():
        value = getattr(obj, name)
        if not math.isfinite(value) or value < low:
            raise ConfigError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class SegmentationParams:
    """Object sizes in pixels, defaulting to JUMP-like 1080x1080 sites (nucleus radius about 11 px)."""

    nucleus_diameter: float = 22.0
    smoothing: float = 1.5
    min_nucleus_area: int = 40
    cyto_channels: tuple[str, ...] = ("AGP", "RNA")
    cell_threshold_factor: float = 0.6
    max_cell_distance: float = 60.0
    min_contrast: float = 5.0
    discard_border: bool = True

    def __post_init__(self) -> None:
        check_range(self, {"nucleus_diameter": 0.0, "max_cell_distance": 0.0, "cell_threshold_factor": 0.0},
                    {"smoothing": 0.0, "min_nucleus_area": 0.0, "min_contrast": 0.0})


def required_channels(params: SegmentationParams) -> tuple[str, ...]:
    """The channels segmentation reads: DNA for the nuclei, then the cytoplasm channels for the cells."""
    return ("DNA", *params.cyto_channels)


@dataclass
class Segmentation:
    """Label images that share object ids: nucleus k lies inside cell k; cytoplasm k = cell k minus nucleus k."""

    nuclei: np.ndarray
    cells: np.ndarray
    cytoplasm: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.cytoplasm = np.where(self.nuclei > 0, 0, self.cells).astype(self.cells.dtype)

    @property
    def count(self) -> int:
        """Number of objects (the highest nucleus id; ids are 1..count without gaps after segmentation)."""
        return int(self.nuclei.max(initial=0))

    def compartment(self, name: str) -> np.ndarray:
        """The label image of ``Nuclei``, ``Cells`` or ``Cytoplasm`` (CellProfiler's compartment names)."""
        return {"Nuclei": self.nuclei, "Cells": self.cells, "Cytoplasm": self.cytoplasm}[name]


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(image.astype(np.float32), sigma) if sigma > 0 else image.astype(np.float32)


def _relabel(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Keep the labels flagged in ``keep`` (indexed by label) and renumber them 1..N in label order."""
    keep = keep.copy()
    keep[0] = False
    lut = np.zeros(len(keep), dtype=np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels]


def _remove_small(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Drop objects under ``min_area`` pixels (specks, debris)."""
    return _relabel(labels, np.bincount(labels.ravel()) >= min_area)


def _drop_border(labels: np.ndarray) -> np.ndarray:
    """Drop objects that touch the image edge: their size and intensity are truncated (CellProfiler's default)."""
    keep = np.ones(int(labels.max(initial=0)) + 1, dtype=bool)
    keep[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    return _relabel(labels, keep)


def _noise_floor(image: np.ndarray, k: float) -> float:
    """Median + k robust SDs: Otsu splits even a blank field in two, so a threshold must clear the background noise.

    Assumes nuclei cover less than half of the field (the median and MAD then describe the background).
    """
    median = float(np.median(image))
    return median + k * 1.4826 * float(np.median(np.abs(image - median)))


def segment_nuclei(dna: np.ndarray, params: SegmentationParams = SegmentationParams()) -> np.ndarray:
    """Nuclei as int32 labels 1..N: Otsu foreground, then a distance watershed so touching nuclei come apart."""
    smooth = _smooth(dna, params.smoothing)
    threshold = max(otsu_threshold(smooth, subsample=1), _noise_floor(smooth, params.min_contrast))
    foreground = ndimage.binary_fill_holes(smooth > threshold)
    if not foreground.any() or foreground.all():
        return np.zeros(dna.shape, dtype=np.int32)
    foreground = _remove_small(ndimage.label(foreground)[0], params.min_nucleus_area) > 0
    distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(foreground).astype(np.float32), 1.0)
    components = ndimage.label(foreground)[0]
    min_distance = max(1, int(round(params.nucleus_diameter / 3)))
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(dna.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # a component without a peak (a flat plateau) becomes its own seed
    unseeded = np.setdiff1d(np.unique(components[foreground]), components[tuple(peaks.T)])
    if len(unseeded):
        lut = np.zeros(int(components.max()) + 1, dtype=np.int32)
        lut[unseeded] = np.arange(len(peaks) + 1, len(peaks) + 1 + len(unseeded), dtype=np.int32)
        markers = np.where(markers == 0, lut[components], markers)
    nuclei = watershed(-distance, markers, mask=foreground)
    return _remove_small(nuclei.astype(np.int32), params.min_nucleus_area)


def segment_cells(
    cyto: np.ndarray,
    nuclei: np.ndarray,
    params: SegmentationParams = SegmentationParams(),
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Cells grown from the nuclei over the inverted cytoplasm image, inside the cytoplasm foreground.

    ``exclude`` marks pixels no cell may claim (the discarded border nuclei).
    """
    if nuclei.max(initial=0) == 0:
        return np.zeros_like(nuclei)
    smooth = _smooth(cyto, params.smoothing)
    threshold = params.cell_threshold_factor * otsu_threshold(smooth, subsample=1)
    near = ndimage.distance_transform_edt(nuclei == 0) <= params.max_cell_distance
    mask = (smooth > threshold) & near
    if exclude is not None:
        mask &= ~exclude
    mask |= nuclei > 0
    cells = watershed(-smooth, nuclei, mask=mask)
    return cells.astype(np.int32)


def segment(
    pixels: np.ndarray, channels: Sequence[str] = DEFAULT_CHANNELS, params: SegmentationParams = SegmentationParams()
) -> Segmentation:
    """Nuclei, cells and cytoplasm of one site, sharing object ids across compartments.

    Border nuclei are dropped after the nuclei are found but before the cells grow, and the pixels they covered are
    closed to every cell, so a truncated cell never borrows a neighbour's area.

    Parameters
    ----------
    pixels:
        One site as a (C, H, W) array in raw units (uint16 in practice), channels in the order of ``channels``.
    channels:
        The channel names of ``pixels``; must include DNA and every channel of ``params.cyto_channels``.
    params:
        Object sizes and thresholds; the defaults suit 1080 px JUMP-like sites.

    Returns
    -------
    Segmentation
        int32 label images of nuclei, cells and cytoplasm, with ids 1..count shared by the three.
    """
    channels = list(channels)
    for name in required_channels(params):
        if name not in channels:
            raise ConfigError(f"segmentation needs channel {name!r}; the site has {', '.join(channels)}")
    if pixels.ndim != 3 or pixels.shape[0] != len(channels):
        raise DataError(f"expected a ({len(channels)}, H, W) site, got shape {pixels.shape}")
    found = segment_nuclei(pixels[channels.index("DNA")], params)
    nuclei = _drop_border(found) if params.discard_border else found
    cyto = sum(pixels[channels.index(c)].astype(np.float32) for c in params.cyto_channels)
    cells = segment_cells(cyto, nuclei, params, exclude=(found > 0) & (nuclei == 0))
    return Segmentation(nuclei=nuclei, cells=cells)


def nucleus_centres(
    pixels: np.ndarray, channels: Sequence[str] = DEFAULT_CHANNELS, params: SegmentationParams = SegmentationParams()
) -> np.ndarray:
    """Centres (n, 2) as float64 (y, x) = (row, column) of the nuclei ``segment`` would find, in label order.

    Only the DNA channel is read and no cells are grown, so this costs about half of ``segment``: what
    single-cell crops need when a site has no CellProfiler locations. Border nuclei are dropped as in ``segment``
    (``params.discard_border``), like CellProfiler's IdentifyPrimaryObjects, so the centres match its location
    files' convention. A site without nuclei gives a (0, 2) array.

    Parameters
    ----------
    pixels:
        One site as a (C, H, W) array in raw units, channels in the order of ``channels`` (only DNA is used).
    channels:
        The channel names of ``pixels``; must include DNA.
    params:
        Nucleus sizes and thresholds; the defaults suit 1080 px JUMP-like sites.
    """
    channels = list(channels)
    if "DNA" not in channels:
        raise ConfigError(f"nucleus centres need channel 'DNA'; the site has {', '.join(channels)}")
    if pixels.ndim != 3 or pixels.shape[0] != len(channels):
        raise DataError(f"expected a ({len(channels)}, H, W) site, got shape {pixels.shape}")
    found = segment_nuclei(np.asarray(pixels[channels.index("DNA")]), params)
    nuclei = _drop_border(found) if params.discard_border else found
    count = int(nuclei.max(initial=0))
    if count == 0:
        return np.zeros((0, 2), dtype=np.float64)
    inside = np.flatnonzero(nuclei)  # nucleus pixels only: a few percent of the site
    labels = nuclei.ravel()[inside]
    rows, cols = np.divmod(inside, nuclei.shape[1])
    area = np.bincount(labels, minlength=count + 1)[1:].astype(np.float64)
    y = np.bincount(labels, weights=rows, minlength=count + 1)[1:] / area
    x = np.bincount(labels, weights=cols, minlength=count + 1)[1:] / area
    return np.stack([y, x], axis=1)
