"""Tiling: grid counts and positions, tile pixels against direct slicing, and the vectorised cell rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.tiling import TileGrid, tile_batch, tile_positions, tile_validity
from utils.errors import ConfigError, DataError


def reference_positions(height, width, size, stride, center):
    """Brute force: walk the grid with while-loops, then shift it by half the leftover border."""
    ys, xs = [], []
    y = 0
    while y + size <= height:
        ys.append(y)
        y += stride
    x = 0
    while x + size <= width:
        xs.append(x)
        x += stride
    oy = (height - (ys[-1] + size)) // 2 if center else 0
    ox = (width - (xs[-1] + size)) // 2 if center else 0
    return [(yy + oy, xx + ox) for yy in ys for xx in xs]


def test_paper_grid_on_1080_site():
    pos = tile_positions(1080, 1080, 224)
    assert pos.shape == (16, 2)
    assert pos[:5].tolist() == [[0, 0], [0, 224], [0, 448], [0, 672], [224, 0]]
    assert pos[-1].tolist() == [672, 672]


def test_centred_grid_splits_the_border():
    pos = tile_positions(1080, 1080, 224, center=True)
    assert pos[0].tolist() == [92, 92] and pos[-1].tolist() == [92 + 672, 92 + 672]
    pos = tile_positions(300, 500, 224, center=True)
    assert pos.tolist() == [[38, 26], [38, 250]]


@pytest.mark.parametrize("height,width,size,stride", [(300, 500, 224, None), (300, 500, 100, 64), (64, 48, 16, 5),
                                                     (17, 17, 17, None), (1080, 1080, 224, 112)])
@pytest.mark.parametrize("center", [False, True])
def test_positions_match_brute_force(height, width, size, stride, center):
    pos = tile_positions(height, width, size, stride, center)
    assert pos.dtype == np.int64
    assert [tuple(p) for p in pos.tolist()] == reference_positions(height, width, size, stride or size, center)


@pytest.mark.parametrize("shape,size,stride,center", [((2, 3, 30, 50), 8, None, False), ((2, 3, 30, 50), 8, 5, True),
                                                      ((3, 21, 13), 6, 4, False), ((1, 5, 16, 16), 16, None, False)])
def test_tiles_equal_direct_slicing(shape, size, stride, center):
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65536, shape, generator=gen, dtype=torch.int32).to(torch.uint16)
    before = x.clone()
    tiles, pos = tile_batch(x, size, stride, center)
    batched = x if x.ndim == 4 else x[None]
    expected = torch.stack([
        torch.stack([batched[b, :, y : y + size, xx : xx + size] for y, xx in pos.tolist()])
        for b in range(batched.shape[0])
    ])
    if x.ndim == 3:
        expected = expected[0]
    assert tiles.dtype == torch.uint16 and tiles.shape == expected.shape
    assert torch.equal(tiles.to(torch.int32), expected.to(torch.int32))
    assert np.array_equal(pos, tile_positions(*shape[-2:], size, stride, center))
    tiles.fill_(0)
    assert torch.equal(x.to(torch.int32), before.to(torch.int32))


def reference_validity(tiles: np.ndarray, otsu: np.ndarray, dna: int, factor: float, min_fraction: float):
    out = np.zeros(tiles.shape[:2], dtype=bool)
    for b in range(tiles.shape[0]):
        for i in range(tiles.shape[1]):
            plane = tiles[b, i, dna].astype(np.float64)
            out[b, i] = (plane > factor * otsu[b]).mean() >= min_fraction
    return out


def test_validity_matches_per_tile_loop():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 200, size=(3, 2, 40, 40)).astype(np.uint16)
    x[0, 1, 3:9, 5:12] = 5000  # cells in a few tiles of site 0
    x[1, 1, 30:31, 30:31] = 5000  # one bright pixel: 1/100 of a 10x10 tile, exactly the 1 % limit
    tiles, _ = tile_batch(torch.from_numpy(x.astype(np.int32)).to(torch.uint16), 10)
    otsu = np.array([2000.0, 2000.0, 2000.0])
    valid = tile_validity(tiles, torch.tensor(otsu), dna_index=1)
    expected = reference_validity(tiles.to(torch.int32).numpy(), otsu, 1, 0.7, 0.01)
    assert valid.dtype == torch.bool and valid.shape == (3, 16)
    assert np.array_equal(valid.numpy(), expected)
    assert expected[0].sum() >= 2 and expected[1].sum() == 1 and expected[2].sum() == 0
    strict = tile_validity(tiles, torch.tensor(otsu), dna_index=1, min_fraction=0.02)
    assert np.array_equal(strict.numpy(), reference_validity(tiles.to(torch.int32).numpy(), otsu, 1, 0.7, 0.02))


def test_keep_middle_if_none():
    tiles = torch.zeros(2, 5, 2, 4, 4, dtype=torch.int32)
    tiles[0, 1, 1] = 100
    valid = tile_validity(tiles, torch.tensor([50.0, 50.0]), dna_index=1, keep_middle_if_none=True)
    assert valid.tolist() == [[False, True, False, False, False], [False, False, True, False, False]]


def test_bad_inputs():
    with pytest.raises(DataError, match="height 100 px is smaller than the tile size 224"):
        tile_positions(100, 500, 224)
    with pytest.raises(ConfigError, match="stride"):
        tile_positions(100, 100, 10, stride=0)
    with pytest.raises(ConfigError, match="size"):
        tile_batch(torch.zeros(3, 8, 8), 0)
    with pytest.raises(DataError, match="NaN Otsu"):
        tile_validity(torch.zeros(1, 2, 3, 4, 4), torch.tensor([float("nan")]), dna_index=2)
    with pytest.raises(DataError, match="2 Otsu thresholds for a batch of 1"):
        tile_validity(torch.zeros(1, 2, 3, 4, 4), torch.tensor([1.0, 2.0]), dna_index=2)
    with pytest.raises(DataError, match="\\(C,H,W\\) or \\(B,C,H,W\\)"):
        tile_batch(torch.zeros(8, 8), 4)


@pytest.mark.parametrize("center", [False, True])
def test_layout_tiles_of_the_region_equal_tiles_of_the_whole_site(center: bool) -> None:
    """What inference does (read only layout.region, then layout.tile) equals tiling the whole site."""
    x = torch.arange(2 * 3 * 50 * 70, dtype=torch.int32).reshape(2, 3, 50, 70)
    layout = TileGrid(16, 12, center).layout(50, 70)
    r = layout.region
    expected, positions = tile_batch(x, 16, 12, center)
    assert np.array_equal(positions, layout.positions)
    region = x[:, :, r.y0 : r.y0 + r.h, r.x0 : r.x0 + r.w]
    assert torch.equal(layout.tile(region), expected)
    # inference's form: uint16 pixels gathered and converted to float32 in one copy, same values
    pixels = (region % 65536).to(torch.uint16)
    converted = layout.tile(pixels, torch.float32)
    assert converted.dtype == torch.float32 and converted.is_contiguous()
    assert torch.equal(converted, layout.tile(pixels).to(torch.float32))
    assert torch.equal(converted, (expected % 65536).to(torch.float32))
    with pytest.raises(DataError, match="region pixels"):
        layout.tile(x)
