"""Synthetic Cell Painting plates with known ground truth, so every representation in this project can be scored.

A site is rendered from a phenotype vector ``z`` (one value per entry of ``PARAMS``, in units of a typical
compound effect; 0 = untreated) plus optical and camera nuisance. A plate design assigns DMSO negative controls,
positive controls and compounds (grouped by target, several per target, some inactive) to wells; each compound's
phenotype is its target's direction in ``PARAMS`` space, perturbed per compound and scaled by its potency.
Batches and plates add channel gains, background, vignetting, focus blur and small biological drifts.

Pixel scale is fixed (a nucleus has a radius of about 11 px, as in 1080x1080 JUMP sites), so a smaller ``size``
is a smaller field of view with fewer cells, not a zoomed-out one.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import ndtri
from tqdm import tqdm

from data.cellmask import otsu_threshold
from data.io import write_channel_tiffs, write_merged_tiff
from data.schema import DEFAULT_CHANNELS
from utils.cli import FlagParser, run_cli
from utils.errors import ConfigError
from utils.fileio import ensure_dir, write_csv_atomic, write_json_atomic
from utils.rundir import OutputLock
from utils.seeding import sample_seed

FORMAT = "cellpaint-ssl-synthetic/1"
CHANNELS: tuple[str, ...] = DEFAULT_CHANNELS
LAYOUTS: tuple[str, ...] = ("merged", "per-channel")
NEGCON_ID = "DMSO"
NEGCON_TARGET = "DMSO"
PLATE_ROWS = "ABCDEFGHIJKLMNOP"
PLATE_COLS = 24
PLATE_WELLS: tuple[str, ...] = tuple(f"{r}{c:02d}" for r in PLATE_ROWS for c in range(1, PLATE_COLS + 1))

# Morphological parameters and what one unit of z does to the rendered cells (recorded in ground_truth.json).
PARAM_EFFECTS: dict[str, str] = {
    "cell_count": "cell density x exp(0.35 z)",
    "cell_size": "cell radius x exp(0.12 z)",
    "nucleus_size": "nucleus radius x exp(0.10 z)",
    "nucleus_elongation": "nucleus aspect (1+e)^2 with e = 0.12 + 0.07 z",
    "nucleus_irregularity": "nuclear outline harmonics amplitude 0.05 + 0.04 z",
    "dna_intensity": "DNA stain x exp(0.15 z)",
    "dna_texture": "chromatin texture amplitude x exp(0.35 z)",
    "mito_intensity": "Mito stain x exp(0.15 z)",
    "mito_fragmentation": "fraction of punctate (vs filamentous) mitochondria sigmoid(-1 + 0.9 z)",
    "agp_intensity": "AGP stain x exp(0.15 z)",
    "golgi_dispersion": "Golgi fragmentation and spread sigmoid(-1.5 + z)",
    "rna_intensity": "RNA stain x exp(0.15 z)",
    "nucleoli_size": "nucleolus radius x exp(0.15 z)",
    "er_intensity": "ER stain x exp(0.15 z)",
    "er_spread": "ER decay length from the nucleus x exp(0.25 z)",
    "mitotic_fraction": "fraction of rounded mitotic cells sigmoid(logit(0.03) + 0.7 z)",
}
PARAMS: tuple[str, ...] = tuple(PARAM_EFFECTS)
_P = {name: i for i, name in enumerate(PARAMS)}
_INTENSITY_PARAM = {"Mito": "mito_intensity", "AGP": "agp_intensity", "RNA": "rna_intensity",
                    "ER": "er_intensity", "DNA": "dna_intensity"}

# Raw uint16 levels: stained signal at unit strength and camera background, per channel (CHANNELS order).
SIGNAL_LEVEL: dict[str, float] = {"Mito": 30000.0, "AGP": 22000.0, "RNA": 20000.0, "ER": 24000.0, "DNA": 26000.0}
BACKGROUND_LEVEL: dict[str, float] = {"Mito": 2200.0, "AGP": 2800.0, "RNA": 2400.0, "ER": 2600.0, "DNA": 1600.0}
BASE_DENSITY = 190.0 / 1080.0**2  # cells per pixel at z = 0
BASE_NUCLEUS_RADIUS = 11.0
BASE_CELL_RADIUS = 34.0
MIN_SIZE = 32
ANGLE_BINS = 180  # cell and nucleus outlines are tabulated per 2 degrees (sub-pixel steps at these radii)
_NORMAL_QUANTILES = ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)
FIBRE_PERIOD = 5.0  # px between neighbouring stress fibres
TRUNCATE = 3.0  # Gaussian kernels end at 3 sigma: invisible at uint16 noise levels, 25 % faster

# Design constants (documented in docs/DATA.md, "Synthetic plates").
NEGCON_FRACTION = 0.125
N_POSCONS = 2
POSCON_POTENCY = 5.0
MAX_REPLICATES = 4
COMPOUNDS_PER_TARGET = 4
INACTIVE_FRACTION = 0.25
LABEL_HIT_P = 0.85
LABEL_BACKGROUND_P = 0.05
LABEL_MISSING_P = 0.3
BATCH_DRIFT_SD = 0.15  # biological drift of z per batch (seeding density, passage), per plate on top of it
PLATE_DRIFT_SD = 0.08
WELL_SD = 0.2  # well-to-well biological variation of z
SITE_SD = 0.08  # site-to-site variation of z within a well
EDGE_EFFECT = {"cell_count": -0.4, "cell_size": 0.2}  # outer-ring wells


@dataclass(frozen=True)
class Nuisance:
    """Optics and camera of one site: what a batch-aware analysis has to see through."""

    gain: tuple[float, ...] = (1.0,) * len(CHANNELS)
    background: tuple[float, ...] = tuple(BACKGROUND_LEVEL[c] for c in CHANNELS)
    vignette: float = 0.2
    vignette_center: tuple[float, float] = (0.0, 0.0)
    blur: float = 0.5
    read_noise: float = 40.0


@dataclass(frozen=True)
class SiteParams:
    """Everything ``render_site`` needs: the phenotype vector z (PARAMS order) and the nuisance."""

    phenotype: tuple[float, ...] = (0.0,) * len(PARAMS)
    nuisance: Nuisance = field(default_factory=Nuisance)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _physical(z: Sequence[float]) -> dict[str, float]:
    """Site-level physical quantities of a phenotype vector (see PARAM_EFFECTS)."""
    if len(z) != len(PARAMS):
        raise ValueError(f"phenotype has {len(z)} values, expected {len(PARAMS)} ({', '.join(PARAMS)})")
    g = {name: float(z[i]) for name, i in _P.items()}
    phys = {
        "density": BASE_DENSITY * math.exp(0.35 * g["cell_count"]),
        "cell_radius": BASE_CELL_RADIUS * math.exp(0.12 * g["cell_size"]),
        "nucleus_radius": BASE_NUCLEUS_RADIUS * math.exp(0.10 * g["nucleus_size"]),
        "elongation": min(max(0.12 + 0.07 * g["nucleus_elongation"], 0.0), 0.6),
        "irregularity": min(max(0.05 + 0.04 * g["nucleus_irregularity"], 0.0), 0.3),
        "dna_texture": 0.22 * math.exp(0.35 * g["dna_texture"]),
        "mito_fragmentation": _sigmoid(-1.0 + 0.9 * g["mito_fragmentation"]),
        "golgi_dispersion": _sigmoid(-1.5 + 1.0 * g["golgi_dispersion"]),
        "nucleoli_radius": 1.7 * math.exp(0.15 * g["nucleoli_size"]),
        "er_spread": 8.0 * math.exp(0.25 * g["er_spread"]),
        "mitotic_fraction": _sigmoid(math.log(0.03 / 0.97) + 0.7 * g["mitotic_fraction"]),
    }
    for ch, name in _INTENSITY_PARAM.items():
        phys[f"intensity_{ch}"] = math.exp(0.15 * g[name])
    return phys


def _place_cells(density: float, min_dist: float, lo: float, hi: float, rng: np.random.Generator) -> np.ndarray:
    """Random cell centres (n, 2) in [lo, hi)^2 that keep nuclei apart (greedy dart throwing over a k-d tree)."""
    n_target = int(rng.poisson(density * (hi - lo) ** 2))
    if n_target == 0:
        return np.zeros((0, 2))
    cand = rng.uniform(lo, hi, size=(2 * n_target + 8, 2))
    pairs = cKDTree(cand).query_pairs(min_dist, output_type="ndarray")
    both = np.concatenate([pairs, pairs[:, ::-1]]) if len(pairs) else np.zeros((0, 2), dtype=np.int64)
    both = both[np.argsort(both[:, 0], kind="stable")]
    starts = np.searchsorted(both[:, 0], np.arange(len(cand) + 1))
    blocked = np.zeros(len(cand), dtype=bool)
    keep: list[int] = []
    for i in range(len(cand)):
        if blocked[i]:
            continue
        keep.append(i)
        if len(keep) == n_target:
            break
        blocked[both[starts[i]:starts[i + 1], 1]] = True
    return cand[keep]


def _sample_cells(phys: dict[str, float], size: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], int]:
    """Per-cell geometry and stain strengths around the site-level values; also the canvas margin used."""
    margin = int(1.3 * phys["cell_radius"]) + 4
    min_dist = 2.0 * phys["nucleus_radius"] * (1.0 + phys["elongation"]) + 2.0
    centres = _place_cells(phys["density"], min_dist, -margin, size + margin, rng)
    n = len(centres)
    mitotic = rng.random(n) < phys["mitotic_fraction"]
    rn = phys["nucleus_radius"] * np.exp(rng.normal(0.0, 0.12, n)) * np.where(mitotic, 0.6, 1.0)
    elong = np.clip(phys["elongation"] + rng.normal(0.0, 0.06, n), 0.0, 0.7) * ~mitotic
    rc = phys["cell_radius"] * np.exp(rng.normal(0.0, 0.12, n))
    rc = np.where(mitotic, 1.9 * rn, np.maximum(rc, 1.7 * rn * (1.0 + elong)))
    omega = rng.uniform(0.0, math.pi, n)
    cells = {
        "cy": centres[:, 0], "cx": centres[:, 1], "rn": rn, "rc": rc,
        "a": rn * (1.0 + elong), "b": rn / (1.0 + elong), "cos": np.cos(omega), "sin": np.sin(omega),
        "mitotic": mitotic.astype(float),
        "frag": np.clip(phys["mito_fragmentation"] + rng.normal(0.0, 0.1, n), 0.0, 1.0),
    }
    irr = phys["irregularity"] * np.where(mitotic, 0.2, 1.0)
    for k in ("n2c", "n2s", "n3c", "n3s"):
        cells[k] = rng.normal(0.0, 1.0, n) * irr / math.sqrt(2.0)
    for k in ("c2c", "c2s", "c3c", "c3s"):
        cells[k] = rng.normal(0.0, 0.12, n) * np.where(mitotic, 0.1, 1.0)
    for ch in CHANNELS:
        cells[f"I_{ch}"] = phys[f"intensity_{ch}"] * np.exp(rng.normal(0.0, 0.2, n))
    cells["I_DNA"] = cells["I_DNA"] * np.where(mitotic, 2.0, 1.0)
    cells["tex"] = phys["dna_texture"] * np.exp(rng.normal(0.0, 0.15, n)) * np.where(mitotic, 1.6, 1.0)
    return cells, margin


def _white_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard normal float32 noise from 65536 quantiles: indistinguishable here and twice as fast as ziggurat."""
    return _NORMAL_QUANTILES[rng.integers(0, _NORMAL_QUANTILES.size, size=shape, dtype=np.uint16)]


def _unit_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation (texture and ridge fields)."""
    field_ = ndimage.gaussian_filter(_white_noise(shape, rng), sigma, truncate=TRUNCATE)
    return field_ / max(float(field_.std()), 1e-6)


def _ridges(shape: tuple[int, int], sigma: float, width: float, rng: np.random.Generator) -> np.ndarray:
    """Thin network-like lines at the zero crossings of smooth noise (ER sheets, mitochondrial tubules)."""
    n = _unit_noise(shape, sigma, rng)
    return np.exp(-((n / width) ** 2))


def _splat(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian spots of unit peak (times weight) at sub-pixel points, stamped with one bincount (no image filter)."""
    radius = int(math.ceil(TRUNCATE * sigma))
    offsets = np.arange(-radius, radius + 1)
    iy = np.floor(ys).astype(np.int64)[:, None] + offsets
    ix = np.floor(xs).astype(np.int64)[:, None] + offsets
    gy = np.exp(-((iy - ys[:, None]) ** 2) / (2 * sigma**2)) * weights[:, None]
    gx = np.exp(-((ix - xs[:, None]) ** 2) / (2 * sigma**2))
    ok = ((iy >= 0) & (iy < shape[0]))[:, :, None] & ((ix >= 0) & (ix < shape[1]))[:, None, :]
    flat = iy[:, :, None] * shape[1] + ix[:, None, :]
    values = gy[:, :, None] * gx[:, None, :]
    image = np.bincount(flat[ok], weights=values[ok], minlength=shape[0] * shape[1])
    return image.reshape(shape).astype(np.float32)


def _polar_points(
    cells: dict[str, np.ndarray], owner: np.ndarray, radius: np.ndarray, angle: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Image coordinates of points at (radius, angle) around their owner cells' centres."""
    return cells["cy"][owner] + radius * np.sin(angle), cells["cx"][owner] + radius * np.cos(angle)


def _nearest_cell(cells: dict[str, np.ndarray], size: int, margin: int) -> np.ndarray:
    """Index of the nearest cell centre for every pixel (a Voronoi partition; cells beyond the border count)."""
    canvas = size + 2 * margin
    iy = np.clip(np.rint(cells["cy"] + margin).astype(np.int64), 0, canvas - 1)
    ix = np.clip(np.rint(cells["cx"] + margin).astype(np.int64), 0, canvas - 1)
    seeds = np.ones((canvas, canvas), dtype=bool)
    seeds[iy, ix] = False
    ids = np.zeros((canvas, canvas), dtype=np.int32)
    ids[iy, ix] = np.arange(len(iy), dtype=np.int32)
    near = ndimage.distance_transform_edt(seeds, return_distances=False, return_indices=True)
    inner = slice(margin, margin + size)
    return ids[near[0][inner, inner], near[1][inner, inner]]


def _outline_tables(cells: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per cell and angle bin: 1/nucleus radius and the cell radius, so pixels need one lookup, not trigonometry."""
    theta = (np.arange(ANGLE_BINS, dtype=np.float64) + 0.5) * (2 * math.pi / ANGLE_BINS) - math.pi
    harmonics = np.stack([np.cos(2 * theta), np.sin(2 * theta), np.cos(3 * theta), np.sin(3 * theta)])
    shape_n = np.maximum(1.0 + np.stack([cells[k] for k in ("n2c", "n2s", "n3c", "n3s")], 1) @ harmonics, 0.5)
    shape_c = np.maximum(1.0 + np.stack([cells[k] for k in ("c2c", "c2s", "c3c", "c3s")], 1) @ harmonics, 0.5)
    cos, sin = np.cos(theta)[None, :], np.sin(theta)[None, :]
    along = cos * cells["cos"][:, None] + sin * cells["sin"][:, None]
    across = sin * cells["cos"][:, None] - cos * cells["sin"][:, None]
    inv_nucleus = np.sqrt((along / cells["a"][:, None]) ** 2 + (across / cells["b"][:, None]) ** 2) / shape_n
    return inv_nucleus.astype(np.float32).ravel(), (cells["rc"][:, None] * shape_c).astype(np.float32).ravel()


class _Geometry:
    """Per-pixel cell ownership (nearest centre) and the shape fields every channel is built from."""

    def __init__(self, cells: dict[str, np.ndarray], size: int, margin: int) -> None:
        self.label = _nearest_cell(cells, size, margin)
        inv_nucleus, cell_radius = _outline_tables(cells)
        table = np.stack([cells[k] for k in ("cy", "cx", "rn", "cos", "sin")]).astype(np.float32)
        cy, cx, rn_px, cos, sin = np.take(table, self.label, axis=1)
        grid = np.arange(size, dtype=np.float32)
        dy = grid[:, None] - cy
        dx = grid[None, :] - cx
        r = np.sqrt(dx * dx + dy * dy)
        angle = (np.arctan2(dy, dx) + np.float32(math.pi)) * np.float32(ANGLE_BINS / (2 * math.pi))
        lookup = self.label * ANGLE_BINS + np.minimum(angle.astype(np.int32), ANGLE_BINS - 1)
        self.rn = r * inv_nucleus[lookup]
        rc_px = cell_radius[lookup]
        self.nucleus = np.clip((1.0 - self.rn) * rn_px / 1.2 + 0.5, 0.0, 1.0)
        self.rc = r / rc_px
        cell = np.clip((1.0 - self.rc) * rc_px / 1.5 + 0.5, 0.0, 1.0)
        self.cytoplasm = cell * (1.0 - self.nucleus)
        self.from_nucleus = np.maximum(self.rn - 1.0, 0.0) * rn_px
        edge = np.zeros((size, size), dtype=bool)
        edge[:, 1:] |= self.label[:, 1:] != self.label[:, :-1]
        edge[1:, :] |= self.label[1:, :] != self.label[:-1, :]
        ring = np.exp(-(((self.rc - 1.0) * rc_px / 1.2) ** 2))
        self.membrane = np.maximum(ring, edge * (self.rc < 1.0)).astype(np.float32)
        self.envelope = np.exp(-(((self.rn - 1.0) * rn_px / 1.5) ** 2))
        self.cell = cell
        # Stress fibres: thin straight bundles along the cell's long axis (the nucleus orientation), ~5 px apart.
        across = (dy * cos - dx * sin) * np.float32(2 * math.pi / FIBRE_PERIOD)
        fibres = 0.5 + 0.5 * np.cos(across)
        fibres *= fibres
        self.fibres = fibres * fibres * fibres


def _cell_value(cells: dict[str, np.ndarray], key: str, label: np.ndarray) -> np.ndarray:
    return cells[key].astype(np.float32)[label]


def _stains(phys: dict[str, float], cells: dict[str, np.ndarray], size: int, margin: int,
            rng: np.random.Generator) -> np.ndarray:
    """Noise-free stain images (5, H, W) at unit scale, before optics and camera."""
    shape = (size, size)
    out = np.zeros((len(CHANNELS), size, size), dtype=np.float32)
    n = len(cells["cy"])
    if n == 0:
        return out
    geo = _Geometry(cells, size, margin)
    lab = geo.label

    # Nucleoli: 1-4 spots inside each interphase nucleus (RNA bright, DNA-poor).
    k_nucleoli = rng.integers(1, 5, n) * (cells["mitotic"] < 0.5)
    owner = np.repeat(np.arange(n), k_nucleoli)
    pos = _polar_points(cells, owner, cells["rn"][owner] * 0.55 * np.sqrt(rng.random(len(owner))),
                        rng.uniform(0, 2 * math.pi, len(owner)))
    nucleoli = _splat(shape, *pos, rng.uniform(0.6, 1.0, len(owner)), phys["nucleoli_radius"])
    nucleoli = np.minimum(nucleoli, 1.5) * geo.nucleus

    # Golgi: one compact ribbon beside the nucleus, or scattered fragments when dispersed.
    disp = phys["golgi_dispersion"]
    k_golgi = 1 + rng.binomial(6, disp, n)
    owner = np.repeat(np.arange(n), k_golgi)
    side = rng.uniform(0, 2 * math.pi, n)[owner]
    dist = cells["rn"][owner] * (1.25 + rng.normal(0.0, 0.15 + 0.6 * disp, len(owner)))
    ang = side + rng.normal(0.0, 0.35 + 1.2 * disp, len(owner))
    golgi = _splat(shape, *_polar_points(cells, owner, np.abs(dist), ang),
                   (1.6 / np.sqrt(k_golgi[owner])).astype(float), 2.2)
    golgi *= geo.cytoplasm

    # Mitochondria: punctate fragments near the nucleus plus a tubular network, mixed per cell.
    k_mito = rng.poisson(0.06 * cells["rc"] ** 2 / 4.0)
    owner = np.repeat(np.arange(n), k_mito)
    radius = cells["rn"][owner] + rng.exponential(0.6 * phys["er_spread"] + 4.0, len(owner))
    puncta = _splat(shape, *_polar_points(cells, owner, radius, rng.uniform(0, 2 * math.pi, len(owner))),
                    rng.uniform(0.5, 1.0, len(owner)), 1.1)
    frag = _cell_value(cells, "frag", lab)
    mito_net = _ridges(shape, 1.6, 0.35, rng)
    perinuclear = np.exp(-geo.from_nucleus / (1.5 * phys["er_spread"] + 6.0))
    mito = geo.cytoplasm * (frag * np.minimum(puncta, 1.5) + (1.0 - frag) * mito_net * perinuclear)

    chromatin = _unit_noise(shape, 1.0, rng)
    er_net = _ridges(shape, 1.2, 0.45, rng)
    er_decay = np.exp(-geo.from_nucleus / phys["er_spread"])
    tex = _cell_value(cells, "tex", lab)

    dna = geo.nucleus * np.maximum(1.0 + tex * chromatin, 0.05) * (1.0 - 0.45 * np.minimum(nucleoli, 1.0))
    er = geo.cytoplasm * er_decay * (0.35 + 0.65 * er_net) + 0.6 * geo.envelope * geo.cell
    rna = (geo.cytoplasm * np.exp(-geo.from_nucleus / (1.3 * phys["er_spread"] + 4.0)) * (0.3 + 0.3 * er_net)
           + 0.2 * geo.nucleus + 1.1 * nucleoli)
    membrane = ndimage.gaussian_filter(geo.membrane, 0.7, truncate=TRUNCATE) * geo.cell
    actin = 0.15 * geo.cytoplasm * (0.8 + 0.25 * chromatin) + 0.25 * geo.cytoplasm * geo.fibres * er_net
    agp = membrane + actin + 0.9 * np.minimum(golgi, 2.0)
    for i, (ch, img) in enumerate(zip(CHANNELS, _by_channel(mito=mito, agp=agp, rna=rna, er=er, dna=dna))):
        out[i] = img * _cell_value(cells, f"I_{ch}", lab)
    return out


def _by_channel(**images: np.ndarray) -> list[np.ndarray]:
    """Order the stain images by CHANNELS (looked up by name, never by position)."""
    return [images[ch.lower()] for ch in CHANNELS]


def _camera(signal: np.ndarray, nuisance: Nuisance, rng: np.random.Generator) -> np.ndarray:
    """Focus blur, vignetting, channel gains, background, shot and read noise, then uint16 quantisation."""
    c, h, w = signal.shape
    if nuisance.blur > 0.05:
        signal = ndimage.gaussian_filter(signal, (0.0, nuisance.blur, nuisance.blur), truncate=TRUNCATE)
    yy = (np.arange(h, dtype=np.float32) / max(h - 1, 1) - 0.5 - nuisance.vignette_center[0])[:, None]
    xx = (np.arange(w, dtype=np.float32) / max(w - 1, 1) - 0.5 - nuisance.vignette_center[1])[None, :]
    vignette = 1.0 - nuisance.vignette * (yy * yy + xx * xx) * 2.0
    level = np.array([SIGNAL_LEVEL[ch] for ch in CHANNELS], dtype=np.float32) * np.asarray(nuisance.gain, np.float32)
    background = np.asarray(nuisance.background, dtype=np.float32)
    shading = 0.6 + 0.4 * vignette
    expected = np.empty_like(signal)
    for i in range(c):  # in place, channel by channel: this stage touches the most memory
        np.multiply(signal[i], vignette, out=expected[i])
        expected[i] *= level[i]
        expected[i] += background[i] * shading
    sd = np.maximum(expected, 0.0)
    sd += np.float32(nuisance.read_noise) ** 2
    np.sqrt(sd, out=sd)
    noisy = _white_noise(expected.shape, rng)
    noisy *= sd
    noisy += expected
    np.rint(noisy, out=noisy)
    np.clip(noisy, 0, 65535, out=noisy)
    return noisy.astype(np.uint16)


def render_site(params: SiteParams, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one (5, size, size) uint16 site in DEFAULT_CHANNELS order, so tests and demos need no real data."""
    if size < MIN_SIZE:
        raise ConfigError(f"--size {size} is too small: use at least {MIN_SIZE} px")
    phys = _physical(params.phenotype)
    cells, margin = _sample_cells(phys, size, rng)
    return _camera(_stains(phys, cells, size, margin, rng), params.nuisance, rng)


# ----------------------------------------------------------------------------------------------------------------
# Plate design


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


@dataclass
class Design:
    """The whole experiment: who is in which well, what it does, and the nuisance of every batch and plate."""

    targets: dict[str, dict[str, Any]]
    compounds: dict[str, dict[str, Any]]
    assays: dict[str, list[str]]
    batches: dict[str, dict[str, Any]]
    plates: dict[str, dict[str, Any]]
    wells: pd.DataFrame  # one row per well: batch, plate, well, perturbation_id, target, control_type, z
    seed: int
    _z: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def well_z(self, plate: str, well: str) -> np.ndarray:
        """Phenotype vector of one well (compound effect + plate drift + well noise + edge effect)."""
        if not self._z:
            self._z.update(((r.plate, r.well), r.z) for r in self.wells.itertuples(index=False))
        if (plate, well) not in self._z:
            raise ConfigError(f"no well {well} on plate {plate} in this design")
        return self._z[(plate, well)]


def _batch_nuisance(rng: np.random.Generator, strength: float = 1.0) -> dict[str, Any]:
    """One batch's optics, camera and biological drift; ``strength`` scales the spread of gain, background and drift
    across batches (1 is the default experiment; the batch-correction study uses stronger batches)."""
    nc = len(CHANNELS)
    return {
        "gain": np.exp(rng.normal(0.0, 0.2 * strength, nc)).tolist(),
        "background": (np.array([BACKGROUND_LEVEL[c] for c in CHANNELS])
                       * np.exp(rng.normal(0.0, 0.25 * strength, nc))).tolist(),
        "vignette": float(rng.uniform(0.1, 0.35)),
        "blur": float(rng.uniform(0.3, 1.2)),
        "read_noise": float(rng.uniform(30.0, 60.0)),
        "phenotype_offset": rng.normal(0.0, BATCH_DRIFT_SD * strength, len(PARAMS)).tolist(),
    }


def _plate_nuisance(batch: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    nc = len(CHANNELS)
    drift = np.asarray(batch["phenotype_offset"]) + rng.normal(0.0, PLATE_DRIFT_SD, len(PARAMS))
    return {
        "gain": (np.asarray(batch["gain"]) * np.exp(rng.normal(0.0, 0.05, nc))).tolist(),
        "background": (np.asarray(batch["background"]) * np.exp(rng.normal(0.0, 0.07, nc))).tolist(),
        "vignette": float(np.clip(batch["vignette"] + rng.normal(0.0, 0.03), 0.0, 0.6)),
        "vignette_center": rng.normal(0.0, 0.06, 2).tolist(),
        "blur": float(max(batch["blur"] + rng.normal(0.0, 0.15), 0.0)),
        "read_noise": batch["read_noise"],
        "phenotype_offset": drift.tolist(),
    }


def _library(n_compounds: int, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """Targets with phenotype directions, compounds with potencies, assays with hit targets."""
    n_targets = max(1, min(n_compounds // 2, round(n_compounds / COMPOUNDS_PER_TARGET)))
    targets: dict[str, dict[str, Any]] = {}
    for t in range(n_targets):
        direction = np.zeros(len(PARAMS))
        hit = rng.choice(len(PARAMS), size=int(rng.integers(3, 7)), replace=False)
        direction[hit] = rng.normal(0.0, 1.0, len(hit))
        targets[f"TGT{t + 1:03d}"] = {"direction": _unit(direction).tolist(), "strength": float(rng.uniform(0.5, 2.0))}
    names = list(targets)
    members = rng.permutation(np.arange(n_compounds) % n_targets)
    compounds: dict[str, dict[str, Any]] = {}
    for c in range(n_compounds):
        t = names[members[c]]
        active = bool(rng.random() >= INACTIVE_FRACTION)
        potency = 2.0 * targets[t]["strength"] * float(np.exp(rng.normal(0.0, 0.5))) if active else 0.0
        direction = _unit(np.asarray(targets[t]["direction"]) + 0.35 * _unit(rng.normal(0.0, 1.0, len(PARAMS))))
        compounds[f"CPD{c + 1:04d}"] = {"target": t, "control_type": "trt", "active": active, "potency": potency,
                                        "direction": direction.tolist()}
    for k in range(N_POSCONS):
        t = names[k % n_targets]
        compounds[f"POSCON{k + 1}"] = {"target": t, "control_type": "poscon", "active": True,
                                       "potency": POSCON_POTENCY, "direction": targets[t]["direction"]}
    n_assays = min(24, max(4, n_targets))
    assays = {f"assay{a + 1:02d}": sorted(rng.choice(names, size=min(len(names), int(rng.integers(1, 3))),
                                                     replace=False).tolist()) for a in range(n_assays)}
    for info in compounds.values():
        info["phenotype"] = (info["potency"] * np.asarray(info["direction"])).tolist()
        labels = {}
        for assay, hits in assays.items():
            p = LABEL_HIT_P if info["target"] in hits else LABEL_BACKGROUND_P
            value = float(rng.random() < p)
            labels[assay] = None if rng.random() < LABEL_MISSING_P else value
        info["labels"] = labels
    return targets, compounds, assays


def _assign_plates(n_compounds: int, replicates: int, capacity: list[int], rng: np.random.Generator) -> list[list[int]]:
    """Spread each compound's replicates over distinct plates (when there are enough), balancing plate load."""
    free = list(capacity)
    n_plates = len(free)
    content: list[list[int]] = [[] for _ in capacity]
    for c in rng.permutation(n_compounds).tolist():
        chosen: list[int] = []
        for _ in range(replicates):
            open_plates = [p for p in range(n_plates) if free[p] > 0]
            if not open_plates:
                break
            fresh = [p for p in open_plates if p not in chosen] or open_plates
            best = max(fresh, key=lambda p: (free[p], -((p - c) % n_plates)))
            chosen.append(best)
            free[best] -= 1
            content[best].append(c)
    return content


def build_design(plates: int, batches: int, wells: int, seed: int, batch_strength: float = 1.0) -> Design:
    """Lay out the experiment deterministically from the seed, before any pixel is rendered."""
    _check_design_args(plates, batches, wells)
    if not 0.0 <= batch_strength <= 10.0:
        raise ConfigError(f"--batch-strength must be between 0 and 10, got {batch_strength}")
    rng = np.random.default_rng(sample_seed(seed, "synthetic-design"))
    n_neg = max(2, round(NEGCON_FRACTION * wells))
    n_pos = N_POSCONS if wells - n_neg >= 2 * N_POSCONS else 0
    slots = wells - n_neg - n_pos
    replicates = min(MAX_REPLICATES, max(2, plates))
    n_compounds = max(1, slots * plates // replicates)
    targets, compounds, assays = _library(n_compounds, rng)
    trt_ids = [c for c, info in compounds.items() if info["control_type"] == "trt"]
    pos_ids = [c for c, info in compounds.items() if info["control_type"] == "poscon"][:n_pos]
    content = _assign_plates(n_compounds, replicates, [slots] * plates, rng)

    batch_names = [f"batch{b + 1:02d}" for b in range(batches)]
    batch_info = {b: _batch_nuisance(rng, batch_strength) for b in batch_names}
    plate_info: dict[str, dict[str, Any]] = {}
    rows = []
    for p in range(plates):
        plate, batch = f"plate{p + 1:03d}", batch_names[p % batches]
        info = _plate_nuisance(batch_info[batch], rng)
        perts = [trt_ids[c] for c in content[p]][:wells - n_pos] + pos_ids
        perts += [NEGCON_ID] * (wells - len(perts))
        positions = sorted(rng.choice(len(PLATE_WELLS), size=wells, replace=False).tolist())
        layout = dict(zip((PLATE_WELLS[i] for i in positions), (perts[i] for i in rng.permutation(wells))))
        info.update(batch=batch, layout=layout)
        plate_info[plate] = info
        offset = np.asarray(info["phenotype_offset"])
        for well, pert in layout.items():
            cpd = compounds.get(pert)
            z = offset + rng.normal(0.0, WELL_SD, len(PARAMS)) + _edge_effect(well)
            if cpd is not None:
                z = z + np.asarray(cpd["phenotype"])
            rows.append({"batch": batch, "plate": plate, "well": well, "perturbation_id": pert,
                         "target": cpd["target"] if cpd else NEGCON_TARGET,
                         "control_type": cpd["control_type"] if cpd else "negcon", "z": z})
    return Design(targets, compounds, assays, batch_info, plate_info, pd.DataFrame(rows), seed)


def _edge_effect(well: str) -> np.ndarray:
    """Outer-ring wells grow fewer, flatter cells (evaporation), a classic plate-position artefact."""
    z = np.zeros(len(PARAMS))
    if well[0] in (PLATE_ROWS[0], PLATE_ROWS[-1]) or int(well[1:]) in (1, PLATE_COLS):
        for name, shift in EDGE_EFFECT.items():
            z[_P[name]] += shift
    return z


def _check_design_args(plates: int, batches: int, wells: int) -> None:
    if plates < 1:
        raise ConfigError(f"--plates must be >= 1, got {plates}")
    if not 1 <= batches <= plates:
        raise ConfigError(f"--batches must be between 1 and --plates ({plates}), got {batches}")
    if not 4 <= wells <= len(PLATE_WELLS):
        raise ConfigError(f"--wells must be between 4 and {len(PLATE_WELLS)} (a 384-well plate), got {wells}")


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _site_path(batch: str, plate: str, well: str, site: int, channel: str | None) -> str:
    suffix = f"_{channel}" if channel else ""
    return f"images/{batch}/{plate}/{plate}_{well}_s{site}{suffix}.tiff"


def _render_and_write(task: tuple[SiteParams, int, int, str, list[str]]) -> float:
    """Worker: render one site, write it, return its DNA Otsu threshold (raw units)."""
    params, size, site_seed, layout, paths = task
    pixels = render_site(params, size, np.random.default_rng(site_seed))
    otsu = float(otsu_threshold(pixels[CHANNELS.index("DNA")]))
    if layout == "merged":
        write_merged_tiff(paths[0], pixels, otsu)
    else:
        write_channel_tiffs(paths, pixels)
    return otsu


def site_params(design: Design, plate: str, well: str, field_: int) -> tuple[SiteParams, int]:
    """The parameters and render seed of one site, so a test can re-render exactly what generate_plates wrote."""
    z = design.well_z(plate, well)
    info = design.plates[plate]
    rng = np.random.default_rng(sample_seed(design.seed, "synthetic-site", plate, well, field_))
    nuisance = Nuisance(
        gain=tuple(info["gain"]), background=tuple(info["background"]), vignette=info["vignette"],
        vignette_center=tuple(info["vignette_center"]), read_noise=info["read_noise"],
        blur=float(max(info["blur"] + rng.normal(0.0, 0.1), 0.0)),
    )
    z = z + rng.normal(0.0, SITE_SD, len(PARAMS))
    params = SiteParams(phenotype=tuple(float(v) for v in z), nuisance=nuisance)
    return params, sample_seed(design.seed, "synthetic-render", plate, well, field_)


def _map(tasks: list, workers: int) -> Iterator[float]:
    if workers == 1:
        yield from map(_render_and_write, tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_render_and_write, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers))))


def ground_truth(design: Design, args: dict[str, Any]) -> dict[str, Any]:
    """The JSON a metric or a test reads to know what the images should reveal."""
    return {
        "format": FORMAT,
        "generator": args,
        "channels": list(CHANNELS),
        "params": [{"name": name, "effect": effect} for name, effect in PARAM_EFFECTS.items()],
        "negcon": {"perturbation_id": NEGCON_ID, "target": NEGCON_TARGET, "control_type": "negcon"},
        "targets": design.targets,
        "compounds": design.compounds,
        "assays": design.assays,
        "batches": design.batches,
        "plates": design.plates,
        "levels": {"signal": SIGNAL_LEVEL, "background": BACKGROUND_LEVEL},
        "variation": {"batch_drift_sd": BATCH_DRIFT_SD, "plate_drift_sd": PLATE_DRIFT_SD, "well_sd": WELL_SD,
                      "site_sd": SITE_SD, "edge_effect": EDGE_EFFECT},
    }


def generate_plates(
    out_dir: str | os.PathLike[str], *, plates: int = 4, batches: int = 2, wells: int = 48, sites: int = 2,
    size: int = 1080, seed: int = 0, layout: str = "merged", workers: int = 1, progress: bool = True,
    batch_strength: float = 1.0,
) -> pd.DataFrame:
    """Write a synthetic experiment (images, dataset.csv, ground_truth.json) and return its site table."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if sites < 1:
        raise ConfigError(f"--sites must be >= 1, got {sites}")
    if size < MIN_SIZE:
        raise ConfigError(f"--size must be >= {MIN_SIZE} px, got {size}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    args = {"plates": plates, "batches": batches, "wells": wells, "sites": sites, "size": size, "seed": seed,
            "layout": layout, "batch_strength": batch_strength}
    design = build_design(plates, batches, wells, seed, batch_strength)
    with OutputLock(out):  # two generators into one folder would mix their images and tables
        return _generate(out, design, args, workers, progress)


def _generate(out: Path, design: Design, args: dict[str, Any], workers: int, progress: bool) -> pd.DataFrame:
    """Render every site into ``out`` and write ground_truth.json, then dataset.csv last (the completion mark)."""
    sites, size, layout = args["sites"], args["size"], args["layout"]
    for stale in ("dataset.csv", "ground_truth.json"):  # a folder being regenerated must not look complete
        (out / stale).unlink(missing_ok=True)
    rows, tasks = [], []
    for well in design.wells.itertuples(index=False):
        cpd = design.compounds.get(well.perturbation_id)
        labels = cpd["labels"] if cpd else dict.fromkeys(design.assays)
        for site in range(1, sites + 1):
            params, render_seed = site_params(design, well.plate, well.well, site)
            channels = [None] if layout == "merged" else list(CHANNELS)
            rel = [_site_path(well.batch, well.plate, well.well, site, ch) for ch in channels]
            tasks.append((params, size, render_seed, layout, [str(out / p) for p in rel]))
            files = {"FileName_Merged": rel[0]} if layout == "merged" else {
                f"FileName_Orig{ch}": p for ch, p in zip(CHANNELS, rel)}
            rows.append({**files, "batch": well.batch, "plate": well.plate, "well": well.well, "field": site,
                         "perturbation_id": well.perturbation_id, "target": well.target,
                         "control_type": well.control_type,
                         **{f"label_{a}": (np.nan if v is None else v) for a, v in labels.items()}})
    ensure_dir(out / "images")
    otsu = list(tqdm(_map(tasks, workers), total=len(tasks), desc="synthetic sites", unit="site",
                     disable=not progress))
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("control_type") + 1, "Otsu_th", np.round(otsu, 3))
    write_json_atomic(out / "ground_truth.json", ground_truth(design, args))
    write_csv_atomic(table, out / "dataset.csv")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate a synthetic plate set and print a one-line summary."""
    parser = FlagParser(prog="python -m data.synthetic", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (dataset.csv, ground_truth.json, images/)")
    parser.add_argument("--plates", type=int, default=4, help="total plates, spread round-robin over batches")
    parser.add_argument("--batches", type=int, default=2, help="number of batches")
    parser.add_argument("--wells", type=int, default=48, help="wells used per plate (of a 384-well layout)")
    parser.add_argument("--sites", type=int, default=2, help="sites (fields) per well")
    parser.add_argument("--size", type=int, default=1080, help="site width and height in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (whatever --workers is)")
    parser.add_argument("--layout", choices=LAYOUTS, default="merged",
                        help="merged: one (5,H,W) TIFF per site; per-channel: one TIFF per channel (JUMP)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    parser.add_argument("--batch-strength", type=float, default=1.0,
                        help="scale of the batch-to-batch spread of gain, background and biological drift")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = generate_plates(args.out, plates=args.plates, batches=args.batches, wells=args.wells, sites=args.sites,
                            size=args.size, seed=args.seed, layout=args.layout, workers=args.workers,
                            batch_strength=args.batch_strength)
    elapsed = time.perf_counter() - start
    counts = table.drop_duplicates(["plate", "well"])["control_type"].value_counts()
    print(f"synthetic: {len(table)} sites ({args.plates} plate(s) in {args.batches} batch(es), "
          f"{table['perturbation_id'].nunique() - 1} perturbations, {counts.get('negcon', 0)} DMSO wells) "
          f"at {args.size} px in {elapsed:.1f} s ({len(table) / elapsed:.1f} sites/s) -> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
