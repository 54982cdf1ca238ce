"""Cell-mask tests: Otsu against skimage, the 1 %-over-0.7xOtsu rule against loops, box fractions against slicing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu

from data.cellmask import (
    box_fractions,
    cell_fraction,
    has_cells,
    integral_mask,
    otsu_threshold,
    otsu_threshold_batch,
)
from data.schema import otsu_to_raw
from utils.errors import DataError


def _nuclei_image(rng: np.random.Generator, size: int = 64, n: int = 4) -> np.ndarray:
    """A dim noisy background with a few bright discs, like a DNA channel."""
    yy, xx = np.mgrid[:size, :size]
    img = rng.normal(800, 60, (size, size))
    for _ in range(n):
        cy, cx = rng.integers(0, size, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(9, 40)] += rng.normal(9000, 1500)
    return np.clip(img, 0, 65535).astype(np.uint16)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_matches_skimage_within_one_bin(seed: int) -> None:
    rng = np.random.default_rng(seed)
    img = _nuclei_image(rng, size=48 + 8 * seed, n=2 + seed)
    ref = threshold_otsu(img.astype(np.float64), nbins=256)
    bin_width = (float(img.max()) - float(img.min())) / 256
    assert abs(otsu_threshold(img, subsample=1) - ref) <= bin_width
    assert abs(otsu_threshold(torch.from_numpy(img), subsample=1) - ref) <= bin_width


def test_otsu_batch_matches_single_and_skimage() -> None:
    rng = np.random.default_rng(5)
    imgs = np.stack([_nuclei_image(rng, 40, n) for n in (1, 3, 6)])
    imgs[1] = 1234  # a constant image returns its value, like skimage
    batch = otsu_threshold_batch(torch.from_numpy(imgs), subsample=1)
    assert batch.shape == (3,) and batch.dtype == torch.float64
    for i in range(3):
        ref = float(threshold_otsu(imgs[i].astype(np.float64), nbins=256))
        width = max((float(imgs[i].max()) - float(imgs[i].min())) / 256, 1e-9)
        assert abs(batch[i].item() - ref) <= width
        assert batch[i].item() == pytest.approx(otsu_threshold(imgs[i], subsample=1))


def test_otsu_subsampling_uses_strided_pixels() -> None:
    rng = np.random.default_rng(7)
    img = _nuclei_image(rng, 320, 20)
    sub = img[::10, ::10].astype(np.float64)
    width = (sub.max() - sub.min()) / 256
    assert abs(otsu_threshold(img, subsample=10) - threshold_otsu(sub, nbins=256)) <= width
    # too small for a 10x step: the step shrinks to keep 32 samples per side
    small = img[:64, :64]
    sub2 = small[::2, ::2].astype(np.float64)
    assert abs(otsu_threshold(small, subsample=10) - threshold_otsu(sub2)) <= (sub2.max() - sub2.min()) / 256


def test_cell_rule_matches_loop() -> None:
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 3000, (3, 4, 10, 10)).astype(np.uint16)
    tiles[0, 0] = 0
    tiles[0, 0, 0, 0] = 3000  # exactly 1 %: passes (>= 1 %)
    tiles[0, 1] = 0
    otsu = np.array([1000.0, 2000.0, 3500.0])
    got_frac = cell_fraction(torch.from_numpy(tiles), torch.tensor(otsu)[:, None])
    got = has_cells(torch.from_numpy(tiles), torch.tensor(otsu)[:, None])
    assert got.shape == (3, 4) and got.dtype == torch.bool
    for b in range(3):
        for n in range(4):
            frac = float(np.mean(tiles[b, n].astype(float) > 0.7 * otsu[b]))
            assert got_frac[b, n].item() == pytest.approx(frac)
            assert bool(got[b, n]) == (frac >= 0.01)
    assert bool(got[0, 0]) and not bool(got[0, 1])
    assert has_cells(torch.from_numpy(tiles), torch.tensor(otsu)[:, None], factor=0.0, min_fraction=0.0).all()


def test_integral_box_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(11)
    dna = _nuclei_image(rng, 37, 5)[:, :29]
    otsu = otsu_threshold(dna, subsample=1)
    integral = integral_mask(dna, otsu)
    assert integral.shape == (38, 30)
    n = 200
    h = rng.integers(1, 38, n)
    w = rng.integers(1, 30, n)
    y = rng.integers(0, 38 - h)
    x = rng.integers(0, 30 - w)
    boxes = np.stack([y, x, h, w], 1)
    got = box_fractions(integral, boxes)
    for i in range(n):
        region = dna[y[i] : y[i] + h[i], x[i] : x[i] + w[i]]
        assert got[i] == pytest.approx(np.mean(region > 0.7 * otsu))
    with pytest.raises(ValueError):
        box_fractions(integral, np.array([[30, 0, 8, 4]]))


def test_otsu_to_raw_scales_scalars_arrays_and_tensors() -> None:
    """The one Otsu units rule (data.schema.otsu_to_raw), element-wise on numpy arrays and torch tensors too."""
    assert otsu_to_raw(0.5) == pytest.approx(0.5 * 65535)
    assert otsu_to_raw(1.0) == pytest.approx(65535.0)
    assert otsu_to_raw(1234.0) == 1234.0
    assert math.isnan(otsu_to_raw(float("nan")))
    assert isinstance(otsu_to_raw(1234), float) and math.isnan(otsu_to_raw(None))
    np.testing.assert_allclose(otsu_to_raw(np.array([0.1, 500.0])), [0.1 * 65535, 500.0])
    t = otsu_to_raw(torch.tensor([0.2, 800.0, float("nan")]))
    assert t[0].item() == pytest.approx(0.2 * 65535) and t[1].item() == 800.0 and math.isnan(t[2].item())
    with pytest.raises(DataError, match="-3"):
        otsu_to_raw(-3.0)
    with pytest.raises(DataError, match="-3"):
        otsu_to_raw(np.array([5.0, -3.0]))
    with pytest.raises(DataError, match="inf"):
        otsu_to_raw(torch.tensor([2.0, float("inf")]))


@pytest.mark.parametrize("block", [16, 5])
def test_mask_summary_decides_every_first_pass_like_the_full_integral(block: int) -> None:
    """CellMaskSummary's bounds plus exact counts of undecided boxes give the full table's first pass in every row,
    on sparse, dense and near-threshold boxes (min_fraction values where the bounds often straddle)."""
    from data.cellmask import CellMaskSummary

    rng = np.random.default_rng(5)
    dna = _nuclei_image(rng, 150, 12)[:, :133]
    otsu = otsu_threshold(dna, subsample=1)
    integral = integral_mask(dna, otsu)
    summary = CellMaskSummary(dna, otsu, block=block)
    site = dna[None]
    count, tries = 300, 6
    h = rng.integers(1, 80, (count, tries))
    w = rng.integers(1, 80, (count, tries))
    y = rng.integers(0, 150 - h + 1)
    x = rng.integers(0, 133 - w + 1)
    boxes = np.stack([y, x, h, w], -1)
    undecided_seen = 0
    for min_fraction in (0.0, 0.01, 0.05, 0.2, 0.5, 1.0):
        full = (box_fractions(integral, boxes.reshape(-1, 4)) >= min_fraction).reshape(count, tries)
        got = summary.passes(boxes, site, 0, min_fraction)
        assert np.array_equal(got.any(axis=1), full.any(axis=1))
        rows = full.any(axis=1)
        assert np.array_equal(got[rows].argmax(axis=1), full[rows].argmax(axis=1))
        single = summary.passes(boxes[:, :1], site, 0, min_fraction)
        assert np.array_equal(single[:, 0], full[:, 0])
        undecided_seen += int((single[:, 0] != (summary._sums(
            -(-y[:, 0] // block), -(-x[:, 0] // block), (y + h)[:, 0] // block, (x + w)[:, 0] // block)
            / (h * w)[:, 0] >= min_fraction)).sum())
    assert undecided_seen > 0  # the exact-count path was exercised, not only the bounds
    with pytest.raises(ValueError):
        summary.passes(np.array([[[140, 0, 20, 4]]]), site, 0, 0.01)
