"""Nucleus locations of a site and the single-cell crops centred on them (inference's and training's cell mode).

Where the centres come from, first match wins:

1. ``--locations FOLDER``: the CellProfiler / DeepProfiler convention ``FOLDER/<plate>/<well>-<site>-Nuclei.csv``
   (``locations_path``), ``<site>`` being the site table's ``field`` (load_data's ``Metadata_Site``).
2. The site CSV's ``FileName_NucleiLocations`` column (with an optional ``PathName_NucleiLocations`` folder),
   resolved like an image path by ``data.schema.load_site_table``; an empty cell means "segment this site".
3. Otherwise the project's own nucleus segmentation (``data.segmentation.nucleus_centres``).

A location file is a CSV with ``Nuclei_Location_Center_X`` (column, px) and ``Nuclei_Location_Center_Y`` (row, px),
one row per nucleus, as CellProfiler's ``Nuclei.csv`` export writes it; other columns are ignored, a header
without rows is a site without cells. Inside the project centres are float (n, 2) arrays of (y, x) = (row,
column), the order every other position here uses (``data.tiling``).

A crop of ``size`` px is centred on a nucleus when the nucleus's pixel (the centre rounded to the nearest pixel) is
the crop's pixel (size // 2, size // 2). Crops that cross the image border are dropped or zero-padded
(``EDGE_RULES``); dropping is the default because zero padding shows the model black borders it never saw in
training, and it biases edge cells in a way that differs with cell density, so per-well means would move with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from data.metadata import check_unique_header
from data.schema import LOCATIONS_COLUMN
from utils.errors import DataError
from utils.seeding import sample_seed

X_COLUMN = "Nuclei_Location_Center_X"
Y_COLUMN = "Nuclei_Location_Center_Y"
EDGE_RULES: tuple[str, ...] = ("drop", "pad")
CROP_MODES: tuple[str, ...] = ("tiles", "cells")  # inference and training: the tile grid / random crops, or cells
SHOWN_MISSING = 3


def _site_label(field: Any) -> str:
    """The ``<site>`` of a location file name: 1, not 1.0, for a field that pandas read as float."""
    if isinstance(field, (float, np.floating)) and math.isfinite(field) and float(field).is_integer():
        return str(int(field))
    return str(field)


def locations_path(folder: str | os.PathLike[str], plate: Any, well: Any, field: Any) -> Path:
    """``folder/<plate>/<well>-<site>-Nuclei.csv``: DeepProfiler's and CellProfiler's per-site location files."""
    return Path(folder) / str(plate) / f"{well}-{_site_label(field)}-Nuclei.csv"


def site_locations_file(row: Mapping[str, Any], folder: str | os.PathLike[str] | None) -> Path | None:
    """The location file of one site: from ``folder`` when given, else the site CSV's column; None = segment it."""
    if folder is not None:
        return locations_path(folder, row.get("plate"), row.get("well"), row.get("field"))
    value = row.get(LOCATIONS_COLUMN)
    if value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip():
        return None
    return Path(str(value))


def check_location_files(table: pd.DataFrame, folder: str | os.PathLike[str] | None) -> int:
    """Fail before any work when a site's location file is missing; returns how many sites have one.

    One DataError names the first missing files and how many there are, so a long run cannot stop at its last plate.
    """
    files = [site_locations_file(row, folder) for row in table.to_dict("records")]
    given = [f for f in files if f is not None]
    missing = [str(f) for f in given if not f.is_file()]
    if missing:
        more = f" and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        where = f"--locations {folder}" if folder is not None else f"column {LOCATIONS_COLUMN}"
        raise DataError(f"nucleus locations ({where}): {len(missing)} file(s) missing: "
                        f"{', '.join(missing[:SHOWN_MISSING])}{more}")
    return len(given)


def read_locations(path: str | os.PathLike[str], height: int | None = None, width: int | None = None) -> np.ndarray:
    """Nucleus centres (n, 2) float64 (y, x) of one CellProfiler location CSV, checked against the site's size.

    DataError (one line, naming the file, column, line and value) for a missing or unreadable file, a missing
    column, a non-numeric or empty coordinate, or a centre outside ``[0, width) x [0, height)``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: nucleus location file not found")
    check_unique_header(path, "nucleus location")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file, expected a header with {X_COLUMN} and {Y_COLUMN}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    absent = [c for c in (X_COLUMN, Y_COLUMN) if c not in df.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {', '.join(absent)} (CellProfiler nucleus centres)")
    out = np.zeros((len(df), 2), dtype=np.float64)
    for k, (column, limit) in enumerate(((Y_COLUMN, height), (X_COLUMN, width))):
        text = df[column].str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{path}: {column} on line {i + 2} is {df[column].iloc[i]!r}, not a number "
                            f"({len(bad)} such row(s))")
        outside = np.flatnonzero((values < 0) | (values >= limit)) if limit is not None else np.zeros(0, int)
        if len(outside):
            i = int(outside[0])
            axis = "height" if column == Y_COLUMN else "width"
            raise DataError(f"{path}: {column} on line {i + 2} is {values[i]:g}, outside the site's {axis} of "
                            f"{limit} px ({len(outside)} such row(s)); are the locations of another image size?")
        out[:, k] = values
    return out


def cell_corners(
    centres: np.ndarray, size: int, height: int, width: int, edge: str = "drop"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-left corners (m, 2) int64 (y, x) of the ``size`` px crops centred on ``centres``; kept indices; dropped.

    With ``edge="drop"`` a crop that would cross the border is left out (counted in the third value); with
    ``"pad"`` every crop is kept and ``cut_crops`` fills its outside with zeros.
    """
    if edge not in EDGE_RULES:
        raise ValueError(f"edge rule {edge!r} is not one of {', '.join(EDGE_RULES)}")
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    corners = np.floor(centres + 0.5).astype(np.int64) - int(size) // 2
    if edge == "pad":
        return corners, np.arange(len(corners), dtype=np.int64), 0
    inside = ((corners >= 0).all(axis=1) & (corners[:, 0] + size <= height) & (corners[:, 1] + size <= width))
    kept = np.flatnonzero(inside)
    return corners[kept], kept, int(len(corners) - len(kept))


def cap_cells(count: int, max_cells: int | None, *key: object) -> np.ndarray:
    """Indices of at most ``max_cells`` of ``count`` cells, in their original order, drawn from a generator seeded by
    ``key`` (the site's identity): the same cells in every run, rank and batch order."""
    if max_cells is None or count <= max_cells:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(sample_seed("max_cells", *key))
    return np.sort(rng.choice(count, size=int(max_cells), replace=False)).astype(np.int64)


def cut_crops(pixels: torch.Tensor, sites: Sequence[int] | np.ndarray, corners: np.ndarray, size: int) -> torch.Tensor:
    """Crops (n, C, size, size) of a (B, C, H, W) batch at ``corners`` of the sites ``sites``, zero outside the image.

    One gather on the pixels' device and dtype (uint16 goes through an int16 view: uint16 has few kernels on CUDA);
    the result is new memory, ``pixels`` is never written.
    """
    if pixels.ndim != 4:
        raise DataError(f"cut_crops expects (B, C, H, W) pixels, got shape {tuple(pixels.shape)}")
    _, _, height, width = pixels.shape
    device = pixels.device
    source = pixels.view(torch.int16) if pixels.dtype == torch.uint16 else pixels
    corners = np.asarray(corners, dtype=np.int64).reshape(-1, 2)
    crosses = bool((corners < 0).any() or (corners[:, 0] + size > height).any() or (corners[:, 1] + size > width).any())
    corners_t = torch.as_tensor(corners, device=device)
    site_t = torch.as_tensor(np.asarray(sites, dtype=np.int64).reshape(-1), device=device)
    step = torch.arange(int(size), device=device)
    ys = corners_t[:, :1] + step  # (n, size)
    xs = corners_t[:, 1:] + step
    gathered = source[site_t[:, None, None], :, ys.clamp(0, height - 1)[:, :, None], xs.clamp(0, width - 1)[:, None, :]]
    crops = gathered.permute(0, 3, 1, 2)  # advanced indices first: (n, size, size, C) -> (n, C, size, size)
    if crosses:  # decided on the host: no device sync
        inside = (((ys >= 0) & (ys < height))[:, :, None] & ((xs >= 0) & (xs < width))[:, None, :])[:, None]
        crops = torch.where(inside, crops, torch.zeros((), dtype=crops.dtype, device=device))
    crops = crops.contiguous()
    return crops.view(torch.uint16) if pixels.dtype == torch.uint16 else crops
