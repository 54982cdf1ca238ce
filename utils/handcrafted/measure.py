"""Per-object CellProfiler features of a segmented site, measured with cp_measure, and their site profile.

Measurements (``FEATURE_GROUPS``) run on intensities scaled to [0, 1] (x / 65535, CellProfiler's convention) and
carry CellProfiler names, so tools written for CellProfiler profiles read them: ``Nuclei_AreaShape_Area``,
``Cells_Intensity_MeanIntensity_DNA``, ``Cytoplasm_Texture_Contrast_DNA_3_00_64`` (scale 3, direction 00, 64 grey
levels), plus ``Cells_Count``. The default (intensity, sizeshape, texture on DNA and Mito) takes a few seconds per
1080 px site on one core; granularity, correlation and radial distribution are opt-in (several times slower).
Position features are left out: where a cell lies in the field of view carries no biology.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from data.schema import DEFAULT_CHANNELS
from data.segmentation import Segmentation, check_range

SCALE = 65535.0
COMPARTMENTS: tuple[str, ...] = ("Nuclei", "Cells", "Cytoplasm")
COUNT_COLUMN = "Cells_Count"
TEXTURE_KEY = re.compile(r"^(?P<feature>[A-Za-z0-9]+)_(?P<suffix>\d+_\d+_\d+)$")


@dataclass(frozen=True)
class MeasureOptions:
    """Which feature groups to measure and on which channels; heavier groups are opt-in."""

    features: tuple[str, ...] = ("intensity", "sizeshape", "texture")
    texture_channels: tuple[str, ...] = ("DNA", "Mito")
    texture_scale: int = 3
    texture_gray_levels: int = 64
    intensity_edges: bool = False

    def __post_init__(self) -> None:
        check_range(self, {}, {"texture_scale": 1, "texture_gray_levels": 2})


MeasureFn = Callable[[np.ndarray, np.ndarray, Sequence[str], MeasureOptions], dict[str, np.ndarray]]


def _core(name: str) -> Callable[..., dict[str, Any]]:
    # lazy: importing cp_measure costs ~0.7 s, which --help and the config checks must not pay
    from cp_measure.bulk import get_core_measurements

    return get_core_measurements()[name]


def _positional(name: str) -> bool:
    """Position in the field of view carries no biology (CellProfiler profiles blocklist these)."""
    return name.startswith(("Center_", "BoundingBoxM", "Location_")) or name == "Orientation"


def _measure_sizeshape(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                       opts: MeasureOptions) -> dict[str, np.ndarray]:
    out = _core("sizeshape")(labels, None, calculate_advanced=False)
    return {f"AreaShape_{k}": np.asarray(v, dtype=np.float64) for k, v in out.items() if not _positional(k)}


def _per_channel(
    images: np.ndarray, channels: Sequence[str], measure: Callable[[np.ndarray], dict[str, Any]],
    rename: Callable[[str, str], str | None], only: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run one cp-measure function on each channel's image and name its features ``rename(feature, channel)``
    (None drops a feature); ``only`` limits the channels."""
    out: dict[str, np.ndarray] = {}
    for ch, image in zip(channels, images):
        if only is not None and ch not in only:
            continue
        for k, v in measure(image).items():
            name = rename(k, ch)
            if name is not None:
                out[name] = np.asarray(v, dtype=np.float64)
    return out


def _measure_intensity(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                       opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("intensity")
    return _per_channel(images, channels, lambda image: fn(labels, image, edge_measurements=opts.intensity_edges),
                        lambda k, ch: None if _positional(k) else f"{k}_{ch}")


def _texture_name(feature: str, channel: str) -> str:
    match = TEXTURE_KEY.match(feature)
    if match is None:
        raise RuntimeError(f"unexpected cp_measure texture feature name {feature!r}")
    return f"Texture_{match['feature']}_{channel}_{match['suffix']}"


def _measure_texture(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                     opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("texture")
    return _per_channel(images, channels,
                        lambda image: fn(labels, image, scale=opts.texture_scale, gray_levels=opts.texture_gray_levels),
                        _texture_name, only=opts.texture_channels)


def _measure_granularity(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                         opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("granularity")
    return _per_channel(images, channels, lambda image: fn(labels, image), lambda k, ch: f"{k}_{ch}")


def _measure_correlation(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                         opts: MeasureOptions) -> dict[str, np.ndarray]:
    # lazy: importing cp_measure costs ~0.7 s, which --help and the config checks must not pay
    from cp_measure.bulk import get_correlation_measurements

    fn = get_correlation_measurements()["pearson"]
    out: dict[str, np.ndarray] = {}
    for i in range(len(channels)):
        for j in range(i + 1, len(channels)):
            res = fn(images[i], images[j], labels)
            out[f"Correlation_Correlation_{channels[i]}_{channels[j]}"] = np.asarray(
                res["Correlation_Pearson"], dtype=np.float64)
    return out


def _radial_name(feature: str, channel: str) -> str:
    category, _, rest = feature.partition("_")
    return f"{category}_{rest.split('_')[0]}_{channel}_{'_'.join(rest.split('_')[1:])}"


def _measure_radial(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                    opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("radial_distribution")

    def measure(image: np.ndarray) -> dict[str, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty ring of a small object gives NaN, kept as NaN
            return fn(labels, image)

    return _per_channel(images, channels, measure, _radial_name)


# Feature groups by CLI name; "intensity", "sizeshape" and "texture" are the fast default.
FEATURE_GROUPS: dict[str, MeasureFn] = {
    "intensity": _measure_intensity,
    "sizeshape": _measure_sizeshape,
    "texture": _measure_texture,
    "granularity": _measure_granularity,
    "correlation": _measure_correlation,
    "radial": _measure_radial,
}


def measure(
    labels: np.ndarray,
    pixels: np.ndarray,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    options: MeasureOptions = MeasureOptions(),
    n_objects: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-object features of one compartment, one array per feature indexed by label - 1 (NaN for absent ids).

    ``pixels`` is (C,H,W) in raw uint16 units; it is scaled to [0, 1] like CellProfiler does. Feature names lack the
    compartment prefix (``Intensity_MeanIntensity_DNA``). ``n_objects`` pads every array to the same length, so a
    compartment in which some object is empty (a cell that is all nucleus has no cytoplasm) still lines up by id.
    """
    n = int(labels.max(initial=0)) if n_objects is None else n_objects
    if labels.max(initial=0) > n:
        raise ValueError(f"label {int(labels.max())} exceeds n_objects={n}")
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=n + 1)[1:])
    if len(present) == 0:
        return {}
    images = pixels.astype(np.float64) / SCALE
    out: dict[str, np.ndarray] = {}
    for name in options.features:
        for key, values in FEATURE_GROUPS[name](labels, images, list(channels), options).items():
            if len(values) != len(present):
                raise RuntimeError(f"cp_measure returned {len(values)} values for {len(present)} objects ({key})")
            full = np.full(n, np.nan)
            full[present] = values
            out[key] = full
    return out


def measure_site(
    seg: Segmentation,
    pixels: np.ndarray,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    options: MeasureOptions = MeasureOptions(),
) -> pd.DataFrame:
    """Per-object table of one site: one row per object id, ``Nuclei_``/``Cells_``/``Cytoplasm_`` columns.

    Parameters
    ----------
    seg:
        The site's segmentation (``segment``); its object ids index the rows.
    pixels:
        The same (C, H, W) site in raw uint16 units; scaled to [0, 1] before measuring, as CellProfiler does.
    channels:
        The channel names of ``pixels``, used in the feature names (``Cells_Intensity_MeanIntensity_DNA``).
    options:
        The feature groups and their settings; the default is the fast intensity, sizeshape, texture set.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``ObjectNumber`` 1..count; NaN where an object is empty in a compartment. Empty for no objects.
    """
    columns: dict[str, np.ndarray] = {}
    for compartment in COMPARTMENTS:
        for key, values in measure(seg.compartment(compartment), pixels, channels, options, seg.count).items():
            columns[f"{compartment}_{key}"] = values
    return pd.DataFrame(columns, index=pd.RangeIndex(1, seg.count + 1, name="ObjectNumber"))


def site_profile(objects: pd.DataFrame, operation: str = "median") -> dict[str, float]:
    """Collapse per-object rows to one site row (NaN objects skipped) and add the cell count.

    The median is the default because a few mis-segmented objects would drag a mean.
    """
    values = objects.median() if operation == "median" else objects.mean()
    return {COUNT_COLUMN: float(len(objects)), **{k: float(v) for k, v in values.items()}}
