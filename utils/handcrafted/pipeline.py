"""CellProfiler-style handcrafted baseline: segment nuclei and cells, measure them with cp_measure, and aggregate
per-object measurements into normalised, feature-selected well profiles that ``evaluate.py`` scores next to the SSL
embeddings (the paper compares against CellProfiler features).

``python -m utils.handcrafted --valset DATASET_CSV -o OUTDIR [--workers N] [--features intensity,sizeshape,texture]
[--norm_method mad_robustize|standardize|none] [--max_sites_per_well K]`` writes ``OUTDIR/well_features.csv``
(metadata + ``Cells_``/``Nuclei_``/``Cytoplasm_`` features), ``OUTDIR/site_features.csv`` (raw site medians) and
``OUTDIR/run.json``. Put OUTDIR at ``<basedir>/<set>/CellProfiler`` to evaluate it beside the embeddings.

Per site: nuclei from the DNA channel (Gaussian smoothing; Otsu threshold raised to at least median + 5 robust SDs so
a blank field yields no objects; hole filling; a distance-transform watershed that splits touching nuclei; specks
and, like CellProfiler's default, nuclei touching the image edge dropped); cells by a watershed on the inverted
cytoplasm image (sum of ``cyto_channels``, AGP + RNA) seeded by the nuclei, inside a foreground mask and within
``max_cell_distance`` px of a nucleus; cytoplasm = cell minus nucleus. Object k is the same cell in all three.

Measurements (``FEATURE_GROUPS``) run on intensities scaled to [0, 1] (x / 65535, CellProfiler's convention), with
CellProfiler names: ``Nuclei_AreaShape_Area``, ``Cells_Intensity_MeanIntensity_DNA``,
``Cytoplasm_Texture_Contrast_DNA_3_00_64`` (scale 3, direction 00, 64 grey levels), plus ``Cells_Count``. The default
(intensity, sizeshape, texture on DNA and Mito) takes a few seconds per 1080 px site on one core; granularity,
correlation and radial distribution are opt-in (several times slower). Position features are left out.

Aggregation: objects -> site median -> well mean. Wells without any segmented cell and features that are not finite
in every well are dropped and reported in run.json. Normalisation: pycytominer per plate fitted on the negative
control wells (``samples`` = the control query: ``control_type == 'negcon'`` when annotated, else
``perturbation_id == 'DMSO'``), for mad_robustize as well (the paper fitted it on all wells); features with zero MAD
in a plate's controls are dropped first. Feature selection: pycytominer variance_threshold, correlation_threshold
(0.9), drop_na_columns and blocklist over all wells.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed
from tqdm import tqdm

from data.cellmask import otsu_threshold
from data.io import read_site
from data.schema import DEFAULT_CHANNELS, INFERENCE_REQUIRED, load_site_table
from utils.cli import bool_flag, run_cli
from utils.errors import ConfigError, DataError
from utils.fileio import ensure_dir, write_csv_atomic, write_json_atomic

SCALE = 65535.0
COMPARTMENTS: tuple[str, ...] = ("Nuclei", "Cells", "Cytoplasm")
WELL_KEYS: tuple[str, ...] = ("batch", "plate", "well")
WELL_METADATA: tuple[str, ...] = (*WELL_KEYS, "perturbation_id", "target", "control_type", "gene_group")
COUNT_COLUMN = "Cells_Count"
OPERATIONS: tuple[str, ...] = ("median", "mean")
NORM_METHODS: tuple[str, ...] = ("mad_robustize", "standardize", "none")
SELECT_OPERATIONS: tuple[str, ...] = ("variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist")
DEFAULT_SELECT: tuple[str, ...] = SELECT_OPERATIONS
TEXTURE_KEY = re.compile(r"^(?P<feature>[A-Za-z0-9]+)_(?P<suffix>\d+_\d+_\d+)$")


def _check_range(obj: Any, above: dict[str, float], at_least: dict[str, float]) -> None:
    """Reject sizes and levels that would segment nothing or crash deep inside scikit-image / cp_measure."""
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
        _check_range(self, {"nucleus_diameter": 0.0, "max_cell_distance": 0.0, "cell_threshold_factor": 0.0},
                     {"smoothing": 0.0, "min_nucleus_area": 0.0, "min_contrast": 0.0})


@dataclass(frozen=True)
class MeasureOptions:
    """Which feature groups to measure and on which channels; heavier groups are opt-in."""

    features: tuple[str, ...] = ("intensity", "sizeshape", "texture")
    texture_channels: tuple[str, ...] = ("DNA", "Mito")
    texture_scale: int = 3
    texture_gray_levels: int = 64
    intensity_edges: bool = False

    def __post_init__(self) -> None:
        _check_range(self, {}, {"texture_scale": 1, "texture_gray_levels": 2})


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
        return int(self.nuclei.max(initial=0))

    def compartment(self, name: str) -> np.ndarray:
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
    """Nuclei, cells and cytoplasm of one (C,H,W) site, sharing object ids across compartments."""
    channels = list(channels)
    for name in ("DNA", *params.cyto_channels):
        if name not in channels:
            raise ConfigError(f"segmentation needs channel {name!r}; the site has {', '.join(channels)}")
    if pixels.ndim != 3 or pixels.shape[0] != len(channels):
        raise DataError(f"expected a ({len(channels)}, H, W) site, got shape {pixels.shape}")
    found = segment_nuclei(pixels[channels.index("DNA")], params)
    nuclei = _drop_border(found) if params.discard_border else found
    cyto = sum(pixels[channels.index(c)].astype(np.float32) for c in params.cyto_channels)
    cells = segment_cells(cyto, nuclei, params, exclude=(found > 0) & (nuclei == 0))
    return Segmentation(nuclei=nuclei, cells=cells)


# ---- measurements ---------------------------------------------------------------------------------------------------

MeasureFn = Callable[[np.ndarray, np.ndarray, Sequence[str], MeasureOptions], dict[str, np.ndarray]]


def _core(name: str) -> Callable[..., dict[str, Any]]:
    from cp_measure.bulk import get_core_measurements

    return get_core_measurements()[name]


def _measure_sizeshape(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                       opts: MeasureOptions) -> dict[str, np.ndarray]:
    out = _core("sizeshape")(labels, None, calculate_advanced=False)
    return {f"AreaShape_{k}": np.asarray(v, dtype=np.float64) for k, v in out.items() if not _positional(k)}


def _positional(name: str) -> bool:
    """Position in the field of view carries no biology (CellProfiler profiles blocklist these)."""
    return name.startswith(("Center_", "BoundingBoxM", "Location_")) or name == "Orientation"


def _measure_intensity(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                       opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("intensity")
    out: dict[str, np.ndarray] = {}
    for ch, image in zip(channels, images):
        for k, v in fn(labels, image, edge_measurements=opts.intensity_edges).items():
            if not _positional(k):
                out[f"{k}_{ch}"] = np.asarray(v, dtype=np.float64)
    return out


def _measure_texture(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                     opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("texture")
    out: dict[str, np.ndarray] = {}
    for ch, image in zip(channels, images):
        if ch not in opts.texture_channels:
            continue
        for k, v in fn(labels, image, scale=opts.texture_scale, gray_levels=opts.texture_gray_levels).items():
            match = TEXTURE_KEY.match(k)
            if match is None:
                raise RuntimeError(f"unexpected cp_measure texture feature name {k!r}")
            out[f"Texture_{match['feature']}_{ch}_{match['suffix']}"] = np.asarray(v, dtype=np.float64)
    return out


def _measure_granularity(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                         opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("granularity")
    out: dict[str, np.ndarray] = {}
    for ch, image in zip(channels, images):
        for k, v in fn(labels, image).items():
            out[f"{k}_{ch}"] = np.asarray(v, dtype=np.float64)
    return out


def _measure_correlation(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                         opts: MeasureOptions) -> dict[str, np.ndarray]:
    from cp_measure.bulk import get_correlation_measurements

    fn = get_correlation_measurements()["pearson"]
    out: dict[str, np.ndarray] = {}
    for i in range(len(channels)):
        for j in range(i + 1, len(channels)):
            res = fn(images[i], images[j], labels)
            out[f"Correlation_Correlation_{channels[i]}_{channels[j]}"] = np.asarray(
                res["Correlation_Pearson"], dtype=np.float64)
    return out


def _measure_radial(labels: np.ndarray, images: np.ndarray, channels: Sequence[str],
                    opts: MeasureOptions) -> dict[str, np.ndarray]:
    fn = _core("radial_distribution")
    out: dict[str, np.ndarray] = {}
    for ch, image in zip(channels, images):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an empty ring of a small object gives NaN, kept as NaN
            measured = fn(labels, image)
        for k, v in measured.items():
            category, _, rest = k.partition("_")
            out[f"{category}_{rest.split('_')[0]}_{ch}_{'_'.join(rest.split('_')[1:])}"] = np.asarray(
                v, dtype=np.float64)
    return out


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
    compartment prefix (``Intensity_MeanIntensity_DNA``).
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
    """Per-object table (one row per nucleus id) with Nuclei_/Cells_/Cytoplasm_ columns."""
    columns: dict[str, np.ndarray] = {}
    for compartment in COMPARTMENTS:
        for key, values in measure(seg.compartment(compartment), pixels, channels, options, seg.count).items():
            columns[f"{compartment}_{key}"] = values
    return pd.DataFrame(columns, index=pd.RangeIndex(1, seg.count + 1, name="ObjectNumber"))


def site_profile(objects: pd.DataFrame, operation: str = "median") -> dict[str, float]:
    """Collapse per-object rows to one site row (NaN objects skipped) and add the cell count."""
    values = objects.median() if operation == "median" else objects.mean()
    return {COUNT_COLUMN: float(len(objects)), **{k: float(v) for k, v in values.items()}}


@dataclass(frozen=True)
class SiteJob:
    """Everything a worker needs for one site (picklable)."""

    row: dict[str, Any]
    channels: tuple[str, ...]
    params: SegmentationParams
    options: MeasureOptions
    operation: str


def process_site(job: SiteJob) -> dict[str, float]:
    """Read, segment and measure one site; runs in a worker process."""
    pixels, _ = read_site(job.row, job.channels)
    seg = segment(pixels, job.channels, job.params)
    return site_profile(measure_site(seg, pixels, job.channels, job.options), job.operation)


# ---- aggregation, normalisation, selection --------------------------------------------------------------------------


def feature_columns(df: pd.DataFrame) -> list[str]:
    """CellProfiler feature columns, as evaluate.py reads them."""
    return [c for c in df.columns if c.startswith(COMPARTMENTS) and "metadata" not in c.lower()]


def aggregate(site_df: pd.DataFrame, operation: str = "mean") -> pd.DataFrame:
    """Well profiles from site rows: features pooled per (batch, plate, well), metadata carried from the first site."""
    if operation not in OPERATIONS:
        raise ConfigError(f"well aggregation {operation!r} is not one of {', '.join(OPERATIONS)}")
    missing = [c for c in WELL_KEYS if c not in site_df.columns]
    if missing:
        raise DataError(f"site table lacks column(s) {', '.join(missing)} needed to aggregate wells")
    features = feature_columns(site_df)
    meta = [c for c in WELL_METADATA if c in site_df.columns]
    grouped = site_df.groupby(list(WELL_KEYS), sort=False, dropna=False)
    values = grouped[features].mean() if operation == "mean" else grouped[features].median()
    carried = grouped[[c for c in meta if c not in WELL_KEYS]].first()
    out = carried.join(values).reset_index()
    out.insert(len(meta), "n_sites", grouped.size().to_numpy())
    return out


def drop_incomplete(wells: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Drop wells in which no cell was found, then features that are not finite in every remaining well.

    Both are reported (not imputed), because pycytominer and evaluate.py need finite profiles.
    """
    features = feature_columns(wells)
    empty = wells[COUNT_COLUMN].fillna(0).to_numpy() <= 0
    kept = wells.loc[~empty].reset_index(drop=True)
    values = kept[features].replace([np.inf, -np.inf], np.nan)
    bad = [f for f in features if values[f].isna().any()]
    report = {"dropped_empty_wells": [f"{r.plate}/{r.well}" for r in wells.loc[empty].itertuples()],
              "dropped_nonfinite_features": len(bad)}
    if kept.empty:
        raise DataError("no cell was segmented in any well; check --channels and --nucleus_diameter")
    return kept.drop(columns=bad), report


def _zero_mad_features(df: pd.DataFrame, features: Sequence[str], controls: np.ndarray) -> list[str]:
    """Features whose control MAD is zero on some plate: mad_robustize would divide by ~0 there."""
    bad: set[str] = set()
    for _, idx in df[controls].groupby("plate", sort=False).groups.items():
        values = df.loc[idx, list(features)].to_numpy(dtype=np.float64)
        mad = np.median(np.abs(values - np.median(values, axis=0)), axis=0)
        bad.update(f for f, m in zip(features, mad) if not m > 0)
    return [f for f in features if f in bad]


def normalize(df: pd.DataFrame, method: str = "mad_robustize", control_query: str | None = None,
              controls: str = "auto") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-plate pycytominer normalisation fitted on the negative-control wells (``samples`` = the control query).

    Features whose control MAD is zero on some plate are dropped first for mad_robustize (and reported); the input
    must be finite (see ``drop_incomplete``).
    """
    from utils.profiles import control_mask, normalize_profiles, resolve_control_query

    if method not in NORM_METHODS:
        raise ConfigError(f"--norm_method {method!r} is not one of {', '.join(NORM_METHODS)}")
    features = feature_columns(df)
    meta = [c for c in df.columns if c not in features]
    report: dict[str, Any] = {"method": method}
    if method == "none":
        return df, report
    query = resolve_control_query(df, controls, control_query)
    report["control_query"] = query
    if not np.isfinite(df[features].to_numpy(dtype=np.float64)).all():
        raise DataError("normalisation: well profiles contain NaN or inf features; run drop_incomplete first")
    finite = list(features)
    ctrl = control_mask(df, query)
    if not ctrl.any():
        raise DataError(f"{method}: no control wells match {query!r}; pass --controls or --control_query")
    per_plate = pd.Series(ctrl, index=df.index).groupby(df["plate"], sort=False).sum()
    if (per_plate < 2).any():
        plate = per_plate.index[int(np.argmax((per_plate < 2).to_numpy()))]
        raise DataError(f"{method}: plate {plate!r} has {int(per_plate[plate])} control well(s) matching {query!r} "
                        "with segmented cells; need at least 2 (or use --norm_method none)")
    if method == "mad_robustize":
        zero = set(_zero_mad_features(df, finite, ctrl))
        report["dropped_zero_mad_features"] = len(zero)
        finite = [f for f in finite if f not in zero]
    if not finite:
        raise DataError(f"{method}: no feature is finite in every well with a non-zero spread in the controls")
    out, kept = normalize_profiles(df[[*meta, *finite]], finite, meta, method, query, scope="plate",
                                   mad_reference="controls", variance_threshold=0.0)
    report["dropped_constant_features"] = len(finite) - len(kept)
    return out, report


def select_features(df: pd.DataFrame, operations: Sequence[str] = DEFAULT_SELECT,
                    corr_threshold: float = 0.9, na_cutoff: float = 0.05) -> pd.DataFrame:
    """pycytominer feature selection over all wells (CellProfiler profiling defaults)."""
    from pycytominer import feature_select

    unknown = [op for op in operations if op not in SELECT_OPERATIONS]
    if unknown:
        raise ConfigError(f"--feature_select {unknown[0]!r} is not one of {', '.join(SELECT_OPERATIONS)}, none")
    features = feature_columns(df)
    if not operations or not features:
        return df
    return feature_select(profiles=df, features=features, samples="all", operation=list(operations),
                          corr_threshold=corr_threshold, na_cutoff=na_cutoff)


# ---- CLI ------------------------------------------------------------------------------------------------------------


def limit_sites(table: pd.DataFrame, max_sites_per_well: int | None) -> pd.DataFrame:
    """The first ``max_sites_per_well`` sites of each well in table order, for quick baselines on big plates."""
    if max_sites_per_well is None:
        return table
    if max_sites_per_well < 1:
        raise ConfigError(f"--max_sites_per_well must be >= 1, got {max_sites_per_well}")
    return table.groupby(list(WELL_KEYS), sort=False, dropna=False).head(max_sites_per_well).reset_index(drop=True)


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def compute_site_features(table: pd.DataFrame, channels: Sequence[str], params: SegmentationParams,
                          options: MeasureOptions, operation: str = "median", workers: int = 1) -> pd.DataFrame:
    """One feature row per site of ``table`` (same order), in parallel over sites."""
    jobs = [SiteJob(row, tuple(channels), params, options, operation) for row in table.to_dict("records")]
    rows: list[dict[str, float]] = []
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = pool.map(process_site, jobs, chunksize=1) if pool else map(process_site, jobs)
        with tqdm(total=len(jobs), desc="sites", unit="site", dynamic_ncols=True) as bar:
            for row in results:
                rows.append(row)
                bar.update()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # a bad site stops the run without finishing the queue
    features = pd.DataFrame(rows)
    meta = [c for c in (*WELL_METADATA[:3], "field", *WELL_METADATA[3:]) if c in table.columns]
    return pd.concat([table[meta].reset_index(drop=True), features], axis=1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m utils.handcrafted",
        description="CellProfiler-style handcrafted well profiles (segmentation + cp_measure + pycytominer).")
    p.add_argument("--valset", required=True, help="dataset CSV (paper or JUMP load_data columns)")
    p.add_argument("-o", "--output_dir", required=True, help="writes well_features.csv, site_features.csv, run.json")
    p.add_argument("--image_root", default=None, help="folder relative image paths are resolved against")
    p.add_argument("--channels", default=",".join(DEFAULT_CHANNELS), help="channel names in file order")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    p.add_argument("--features", default=",".join(MeasureOptions.features),
                   help=f"comma list of {', '.join(FEATURE_GROUPS)}")
    p.add_argument("--texture_channels", default=",".join(MeasureOptions.texture_channels))
    p.add_argument("--texture_scale", type=int, default=MeasureOptions.texture_scale)
    p.add_argument("--texture_gray_levels", type=int, default=MeasureOptions.texture_gray_levels)
    p.add_argument("--intensity_edges", type=bool_flag, default=False, help="also measure object-edge intensities")
    p.add_argument("--nucleus_diameter", type=float, default=SegmentationParams.nucleus_diameter)
    p.add_argument("--min_nucleus_area", type=int, default=SegmentationParams.min_nucleus_area)
    p.add_argument("--max_cell_distance", type=float, default=SegmentationParams.max_cell_distance)
    p.add_argument("--discard_border", type=bool_flag, default=True, help="drop nuclei touching the image edge")
    p.add_argument("--cyto_channels", default=",".join(SegmentationParams.cyto_channels))
    p.add_argument("--site_operation", choices=OPERATIONS, default="median", help="objects -> site")
    p.add_argument("--well_operation", choices=OPERATIONS, default="mean", help="sites -> well")
    p.add_argument("--max_sites_per_well", type=int, default=None)
    p.add_argument("--norm_method", choices=NORM_METHODS, default="mad_robustize")
    p.add_argument("--controls", default="auto", help="auto (negcon if annotated, else DMSO), DMSO or negcon")
    p.add_argument("--control_query", default=None, help="pandas query selecting control wells (overrides --controls)")
    p.add_argument("--feature_select", default=",".join(DEFAULT_SELECT), help="comma list of pycytominer ops or none")
    p.add_argument("--corr_threshold", type=float, default=0.9)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole pipeline from parsed arguments; returns the run summary written to run.json."""
    start = time.time()
    channels = _split(args.channels)
    options = MeasureOptions(features=_split(args.features), texture_channels=_split(args.texture_channels),
                             texture_scale=args.texture_scale, texture_gray_levels=args.texture_gray_levels,
                             intensity_edges=args.intensity_edges)
    unknown = [f for f in options.features if f not in FEATURE_GROUPS]
    if unknown or not options.features:
        raise ConfigError(f"--features {unknown[0] if unknown else ''!r} is not one of {', '.join(FEATURE_GROUPS)}")
    params = SegmentationParams(nucleus_diameter=args.nucleus_diameter, min_nucleus_area=args.min_nucleus_area,
                                max_cell_distance=args.max_cell_distance, cyto_channels=_split(args.cyto_channels),
                                discard_border=args.discard_border)
    for name in ("DNA", *params.cyto_channels):
        if name not in channels:
            raise ConfigError(f"channel {name!r} is needed for segmentation but --channels is {args.channels!r}")
    select = () if args.feature_select.strip().lower() == "none" else _split(args.feature_select)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    table = load_site_table(args.valset, image_root=args.image_root, channels=channels, required=INFERENCE_REQUIRED)
    table = limit_sites(table, args.max_sites_per_well)
    out = ensure_dir(args.output_dir)
    for stale in ("site_features.csv", "well_features.csv", "run.json"):  # a failed rerun must not look complete
        (out / stale).unlink(missing_ok=True)
    sites = compute_site_features(table, channels, params, options, args.site_operation, args.workers)
    wells, clean_report = drop_incomplete(aggregate(sites, args.well_operation))
    normalised, norm_report = normalize(wells, args.norm_method, args.control_query, args.controls)
    selected = select_features(normalised, select, args.corr_threshold)
    if not feature_columns(selected):
        raise DataError("feature selection removed every feature; try --feature_select none or fewer operations")
    write_csv_atomic(sites, out / "site_features.csv")
    write_csv_atomic(selected, out / "well_features.csv")
    summary = {
        "n_sites": len(sites), "n_wells": len(selected), "n_objects": int(sites[COUNT_COLUMN].sum()),
        "n_features_measured": len(feature_columns(wells)), "n_features": len(feature_columns(selected)),
        "empty_sites": int((sites[COUNT_COLUMN] == 0).sum()), **clean_report, "normalisation": norm_report,
        "feature_select": list(select), "segmentation": asdict(params), "measurement": asdict(options),
        "site_operation": args.site_operation, "well_operation": args.well_operation,
        "args": vars(args), "versions": {p: metadata.version(p) for p in ("cp-measure", "pycytominer")},
        "seconds": round(time.time() - start, 2),
    }
    write_json_atomic(out / "run.json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = run(args)
    dropped = f", {len(s['dropped_empty_wells'])} wells without cells dropped" if s["dropped_empty_wells"] else ""
    print(f"handcrafted: {s['n_sites']} sites, {s['n_objects']} cells, {s['n_wells']} wells{dropped}, "
          f"{s['n_features']}/{s['n_features_measured']} features kept ({s['normalisation']['method']}) "
          f"in {s['seconds']:.1f} s -> {Path(args.output_dir) / 'well_features.csv'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
