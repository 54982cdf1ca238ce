"""Size/stride tiling of whole sites as one tensor op, with the paper's cell rule deciding which tiles count."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data.cellmask import DEFAULT_FACTOR, DEFAULT_MIN_FRACTION, has_cells
from utils.errors import ConfigError, DataError


def _grid(length: int, size: int, stride: int, center: bool, axis: str) -> tuple[int, int]:
    """(number of tiles, offset of the first tile) along one axis."""
    if length < size:
        raise DataError(f"image {axis} {length} px is smaller than the tile size {size} px")
    count = (length - size) // stride + 1
    covered = (count - 1) * stride + size
    return count, ((length - covered) // 2 if center else 0)


def _check_size_stride(size: int, stride: int | None) -> int:
    if int(size) != size or size < 1:
        raise ConfigError(f"tile size must be a positive integer, got {size!r}")
    stride = size if stride is None else stride
    if int(stride) != stride or stride < 1:
        raise ConfigError(f"tile stride must be a positive integer, got {stride!r}")
    return int(stride)


def tile_positions(height: int, width: int, size: int, stride: int | None = None, center: bool = False) -> np.ndarray:
    """Top-left (y, x) of every tile, row-major; ``center`` splits the uncovered border evenly instead of right/bottom.

    The default (``center=False``, ``stride=size``) is the paper's grid: a 1080² site with size 224 gives 4×4 tiles
    covering the top-left 896² pixels.
    """
    stride = _check_size_stride(size, stride)
    ny, oy = _grid(int(height), int(size), stride, center, "height")
    nx, ox = _grid(int(width), int(size), stride, center, "width")
    ys = oy + stride * np.arange(ny, dtype=np.int64)
    xs = ox + stride * np.arange(nx, dtype=np.int64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1)


@dataclass(frozen=True)
class Region:
    """The part of every site that the tiles cover (offset and extent in a height x width site): read only it."""

    height: int
    width: int
    y0: int
    x0: int
    h: int
    w: int


@dataclass(frozen=True)
class TileGrid:
    """Tile size, stride and centring: the one description of how sites are cut, which every consumer reads.

    ``stride`` None means ``size`` (the paper's non-overlapping grid); ``center`` splits the uncovered border evenly
    instead of leaving it at the right and bottom. Invalid values raise ``ConfigError`` here, once.
    """

    size: int
    stride: int | None = None
    center: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stride", _check_size_stride(self.size, self.stride))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "center", bool(self.center))

    def layout(self, height: int, width: int) -> TileLayout:
        """The grid on one site shape: computed once per shape, then shared by the reader and the tiler."""
        return TileLayout(self, int(height), int(width))


@dataclass(frozen=True)
class TileLayout:
    """A ``TileGrid`` placed on a site shape: tile positions, the covered region, and tiling of that region."""

    grid: TileGrid
    height: int
    width: int
    positions: np.ndarray = field(init=False, repr=False)
    region: Region = field(init=False)
    rows_cols: tuple[int, int] = field(init=False)  # tiles down and across

    def __post_init__(self) -> None:
        g = self.grid
        pos = tile_positions(self.height, self.width, g.size, g.stride, g.center)
        y0, x0 = int(pos[:, 0].min()), int(pos[:, 1].min())
        h, w = int(pos[:, 0].max()) + g.size - y0, int(pos[:, 1].max()) + g.size - x0
        object.__setattr__(self, "positions", pos)
        object.__setattr__(self, "region", Region(self.height, self.width, y0, x0, h, w))
        ny = len(np.unique(pos[:, 0]))
        object.__setattr__(self, "rows_cols", (ny, len(pos) // ny))

    @property
    def n_tiles(self) -> int:
        """Tiles per site."""
        return len(self.positions)

    def tile(self, region_pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tiles (B, n, C, size, size) of a batch that holds only the covered region (what the reader returns).

        Uses the grid computed for this shape; nothing is recomputed per batch. ``dtype`` converts while gathering:
        inference asks for float32, so the uint16 pixels are read once, not tiled and then converted.
        """
        r = self.region
        if tuple(region_pixels.shape[-2:]) != (r.h, r.w) or region_pixels.ndim != 4:
            raise DataError(f"TileLayout.tile expects (B, C, {r.h}, {r.w}) region pixels, "
                            f"got shape {tuple(region_pixels.shape)}")
        return _unfold(region_pixels, 0, 0, *self.rows_cols, self.grid.size, self.grid.stride, dtype)


def _unfold(batch: torch.Tensor, oy: int, ox: int, ny: int, nx: int, size: int, stride: int,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, ny*nx, C, size, size) tiles starting at (oy, ox) via one unfold and one copy (converting to ``dtype``
    on the way); always new memory."""
    region = batch[:, :, oy : oy + (ny - 1) * stride + size, ox : ox + (nx - 1) * stride + size]
    windows = region.unfold(2, size, stride).unfold(3, size, stride)  # (B, C, ny, nx, size, size), a view
    b, c = batch.shape[:2]
    tiles = torch.empty((b, ny, nx, c, size, size), dtype=dtype or batch.dtype, device=batch.device)
    tiles.copy_(windows.permute(0, 2, 3, 1, 4, 5))
    return tiles.view(b, ny * nx, c, size, size)


def tile_batch(
    x: torch.Tensor, size: int, stride: int | None = None, center: bool = False
) -> tuple[torch.Tensor, np.ndarray]:
    """Tiles (B, n, C, size, size) of a (B,C,H,W) batch via one unfold, and their (n, 2) positions.

    A single (C,H,W) site gives (n, C, size, size). The result is a new tensor; ``x`` is never written.

    Parameters
    ----------
    x:
        (B, C, H, W) or (C, H, W) sites of any dtype (uint16 in inference), on any device.
    size:
        Tile side in pixels; H and W must be at least this.
    stride:
        Step between tiles; None means ``size`` (the paper's non-overlapping grid).
    center:
        Split the uncovered border evenly instead of leaving it at the right and bottom.

    Returns
    -------
    tuple[torch.Tensor, numpy.ndarray]
        The tiles, row-major, on ``x``'s device and dtype, and their (n, 2) top-left (y, x) positions from
        ``tile_positions``, so a caller can map each tile back to the site. ConfigError for a bad size or stride,
        DataError for a wrong number of dimensions or a site smaller than a tile.
    """
    if x.ndim not in (3, 4):
        raise DataError(f"tile_batch expects (C,H,W) or (B,C,H,W), got shape {tuple(x.shape)}")
    single = x.ndim == 3
    batch = x[None] if single else x
    stride = _check_size_stride(size, stride)
    height, width = batch.shape[-2:]
    positions = tile_positions(height, width, size, stride, center)
    ny = len(np.unique(positions[:, 0]))
    nx = len(positions) // ny
    oy, ox = (int(v) for v in positions[0])
    tiles = _unfold(batch, oy, ox, ny, nx, int(size), stride)
    return (tiles[0] if single else tiles), positions


def tile_validity(
    tiles: torch.Tensor,
    otsu: torch.Tensor,
    dna_index: int,
    factor: float = DEFAULT_FACTOR,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    keep_middle_if_none: bool = False,
    check_finite: bool = True,
) -> torch.Tensor:
    """Which tiles hold cells (B, n), by the paper's rule on the DNA channel, for all tiles at once.

    ``otsu`` (B,) is in the tiles' units (raw uint16 by convention); NaN is refused, so compute missing thresholds
    first (``data.cellmask.otsu_threshold_batch``). ``keep_middle_if_none`` reproduces the paper's inference rule:
    a site with no valid tile keeps its middle tile (index n // 2). ``check_finite=False`` skips the NaN check,
    which reads the thresholds back to the host: inference, whose thresholds are never NaN, must not stall the
    device queue on every batch.

    Parameters
    ----------
    tiles:
        (B, n, C, s, s) tiles in raw units (``tile_batch`` or ``TileLayout.tile``).
    otsu:
        (B,) per-site Otsu thresholds in the same units (tensor or array; moved to the tiles' device).
    dna_index:
        Position of the DNA channel in dim 2 (negative allowed); look it up by name, never assume 4.
    factor, min_fraction:
        The rule: a tile is valid when at least ``min_fraction`` of its DNA pixels exceed ``factor * otsu``.
    keep_middle_if_none:
        Apply ``middle_tile_if_empty`` (the paper's inference rule) to the result.
    check_finite:
        Raise on NaN thresholds (one host sync); False leaves the caller to guarantee finite thresholds.

    Returns
    -------
    torch.Tensor
        bool (B, n) on the tiles' device, True where a tile has cells, so invalid tiles can be masked out (NaN)
        before pooling. DataError for a wrong tiles shape, a ``dna_index`` out of range, a threshold count that is
        not B, or (with ``check_finite``) a NaN threshold.
    """
    if tiles.ndim != 5:
        raise DataError(f"tile_validity expects tiles (B, n, C, s, s), got shape {tuple(tiles.shape)}")
    n_channels = tiles.shape[2]
    if not -n_channels <= dna_index < n_channels:
        raise DataError(f"dna_index {dna_index} out of range for {n_channels} channels")
    thresholds = torch.as_tensor(otsu, dtype=torch.float64, device=tiles.device).reshape(-1)
    if thresholds.numel() != tiles.shape[0]:
        raise DataError(f"{thresholds.numel()} Otsu thresholds for a batch of {tiles.shape[0]} sites")
    if check_finite and bool(torch.isnan(thresholds).any()):
        raise DataError("NaN Otsu threshold: compute it from the site (data.cellmask.otsu_threshold_batch) first")
    valid = has_cells(tiles[:, :, dna_index], thresholds[:, None], factor=factor, min_fraction=min_fraction)
    return middle_tile_if_empty(valid) if keep_middle_if_none else valid


def middle_tile_if_empty(valid: torch.Tensor) -> torch.Tensor:
    """The paper's rule for a site without any valid tile: its middle tile (index n // 2) counts. In place, no sync."""
    if valid.shape[1] > 0:
        valid[:, valid.shape[1] // 2] |= ~valid.any(dim=1)
    return valid
