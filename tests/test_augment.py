"""Augmentation tests: box sampling rules, crops against slicing, device ops against per-sample torch/torchvision
references, and the guarantee the paper's code broke: no augmentation writes into its source."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from data.augment import (
    RECIPES,
    GpuAugment,
    ViewSpec,
    _native_boxes,
    _resized_boxes,
    as_scale,
    crop_and_resize,
    get_recipe,
    sample_crop_boxes,
)
from data.cellmask import box_fractions, integral_mask
from data.intensity import uint16_to_float
from utils.errors import ConfigError, DataError

ALL_ON = dict(hflip_p=1.0, vflip_p=1.0, rot90_p=1.0, shift_p=1.0, gamma_p=1.0, blur_p=1.0, noise_p=1.0, drop_p=1.0)


def _site(rng: np.random.Generator, c: int = 5, h: int = 64, w: int = 80) -> np.ndarray:
    """uint16 site whose DNA channel (index 4) has cells only in its top-left 16x16 corner."""
    site = rng.integers(100, 2000, (c, h, w)).astype(np.uint16)
    site[4] = 50
    site[4, :16, :16] = 30000
    return site


class RecordingArray:
    """Array-like that records every index it is asked for, to prove crops read only their boxes."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr, self.shape, self.dtype, self.keys = arr, arr.shape, arr.dtype, []

    def __getitem__(self, key):
        self.keys.append(key)
        return self.arr[key]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _aa_bilinear_halving(n_out: int) -> np.ndarray:
    """(n_out, 2 n_out) weights of an antialiased bilinear 2x downscale (PIL's and torch's triangle filter).

    Each output pixel weighs the four inputs around its 2x2 pair as (1, 3, 3, 1) / 8; at the edges the taps that
    fall outside are dropped and the rest renormalised ((3, 3, 1) / 7).
    """
    m = np.zeros((n_out, 2 * n_out))
    for i in range(n_out):
        for j, weight in zip(range(2 * i - 1, 2 * i + 3), (1, 3, 3, 1)):
            if 0 <= j < 2 * n_out:
                m[i, j] = weight
    return m / m.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------- specs and recipes


def test_recipes_defaults_and_overrides() -> None:
    assert set(RECIPES) == {"dino", "simclr", "mae"}
    dino = get_recipe("dino")
    assert [(v.count, v.size, v.scale) for v in dino.views] == [(2, 224, None), (8, 96, None)]
    aug = dino.gpu_aug_per_view[0]
    assert (aug.color_mode, aug.hflip_p, aug.vflip_p, aug.shift, aug.shift_p, aug.gamma, aug.gamma_p,
            aug.brightness) == ("relative", 0.5, 0.5, 0.5, 1.0, (0.8, 1.25), 1.0, 0.2)  # fmt: skip
    paper = get_recipe("dino", color_mode="paper").gpu_aug_per_view[0]
    assert (paper.color_mode, paper.shift, paper.gamma, paper.brightness) == ("paper", 0.3, (0.5, 1.5), 0.0)
    assert (aug.blur_p, aug.noise_p, aug.drop_p, aug.rot90_p) == (0.0, 0.0, 0.0, 0.75)
    custom = get_recipe("dino", global_crops_scale=[0.2, 0.4], local_crops_scale=(0.05, 0.2), local_crops_number=4)
    assert [(v.count, v.scale) for v in custom.views] == [(2, (0.2, 0.4)), (4, (0.05, 0.2))]
    simclr = get_recipe("simclr", size=128, scale=0.3)
    assert [(v.count, v.size, v.scale) for v in simclr.views] == [(2, 128, (0.3, 1.0))]
    mae = get_recipe("mae", samples_per_image=4)
    assert [(v.count, v.size) for v in mae.views] == [(4, 224)]
    m = mae.gpu_aug_per_view[0]
    assert (m.hflip_p, m.vflip_p, m.rot90_p, m.shift_p, m.gamma_p) == (0.5, 0.5, 0.0, 0.0, 0.0)
    assert get_recipe("dino", blur_p=0.2).gpu_aug_per_view[1].blur_p == 0.2
    with pytest.raises(ConfigError, match="colour_jitter"):
        get_recipe("dino", colour_jitter=1)
    with pytest.raises(ConfigError, match="byol"):
        get_recipe("byol")
    with pytest.raises(ConfigError, match="hflip_p"):
        GpuAugment(hflip_p=1.5)


def test_scale_parsing() -> None:
    assert as_scale(None) is None
    assert as_scale(0.25) == (0.25, 1.0)
    assert as_scale([0.1, 0.3]) == (0.1, 0.3)
    for bad in ((0.5, 0.2), (0.0, 0.5), (0.2, 1.5), (0.1, 0.2, 0.3)):
        with pytest.raises(ConfigError):
            as_scale(bad)
    with pytest.raises(ConfigError):
        ViewSpec(0, 32)


# ------------------------------------------------------------------------------------------------- worker side


def test_native_boxes_follow_first_passing_try_else_last() -> None:
    site = _site(np.random.default_rng(0))
    integral = integral_mask(site[4], 20000.0)
    spec = ViewSpec(count=64, size=24)
    boxes, passed = sample_crop_boxes(integral, 64, 80, spec, np.random.default_rng(3), max_tries=3)
    # replay the same draws and apply the rule by hand (brute force on pixels)
    tries = _native_boxes(np.random.default_rng(3), (64, 3), 64, 80, 24)
    for i in range(64):
        ok = [np.mean(site[4, y : y + h, x : x + w] > 0.7 * 20000.0) >= 0.01 for y, x, h, w in tries[i]]
        expected = tries[i][ok.index(True)] if any(ok) else tries[i][-1]
        np.testing.assert_array_equal(boxes[i], expected)
        assert passed[i] == any(ok)
    assert 0 < passed.sum() < 64  # cells in one corner: some boxes find them within 3 tries, some do not


def test_boxes_contain_cells_when_possible_and_respect_bounds() -> None:
    site = _site(np.random.default_rng(1))
    integral = integral_mask(site[4], 20000.0)
    rng = np.random.default_rng(4)
    for spec in (ViewSpec(50, 32), ViewSpec(50, 20, scale=(0.05, 0.3))):
        boxes, passed = sample_crop_boxes(integral, 64, 80, spec, rng, max_tries=200)
        assert passed.all()
        assert (box_fractions(integral, boxes) >= 0.01).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 64).all()
        assert (boxes[:, 1] + boxes[:, 3] <= 80).all()
    empty = integral_mask(np.zeros((64, 80), np.uint16), 1000.0)
    boxes, passed = sample_crop_boxes(empty, 64, 80, ViewSpec(5, 16), rng, max_tries=7)
    assert not passed.any() and boxes.shape == (5, 4)
    _, passed = sample_crop_boxes(None, 64, 80, ViewSpec(5, 16), rng)
    assert passed.all()
    with pytest.raises(DataError, match="larger than"):
        sample_crop_boxes(None, 64, 80, ViewSpec(1, 65), rng)


def test_resized_boxes_area_ratio_and_fallback() -> None:
    boxes = _resized_boxes(np.random.default_rng(0), (2000,), 100, 120, (0.1, 0.4), (0.75, 4 / 3))
    y, x, h, w = boxes.T
    assert (y >= 0).all() and (x >= 0).all() and (y + h <= 100).all() and (x + w <= 120).all()
    frac = h * w / 12000
    assert frac.min() > 0.09 and frac.max() < 0.42
    assert (w / h).min() > 0.7 and (w / h).max() < 1.42
    assert abs(frac.mean() - 0.25) < 0.01  # uniform area fraction, like torchvision
    # a square box cannot cover 90 % of a 10x100 site: torchvision's centre crop of the allowed ratio
    fb = _resized_boxes(np.random.default_rng(0), (3,), 10, 100, (0.9, 1.0), (1.0, 1.0))
    np.testing.assert_array_equal(fb, [[0, 45, 10, 10]] * 3)


def test_resized_boxes_match_torchvision_distribution() -> None:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(1, 60, 90), [0.2, 0.9], [0.5, 2.0]) for _ in range(3000)])
    ours = _resized_boxes(np.random.default_rng(0), (3000,), 60, 90, (0.2, 0.9), (0.5, 2.0))
    for stat in (lambda b: b[:, 2] * b[:, 3] / 5400, lambda b: np.log(b[:, 3] / b[:, 2])):
        assert abs(stat(ours).mean() - stat(ref).mean()) < 0.03
        assert abs(stat(ours).std() - stat(ref).std()) < 0.03


def test_crop_and_resize_reads_only_boxes_and_copies() -> None:
    site = np.random.default_rng(2).integers(0, 65535, (5, 40, 50)).astype(np.uint16)
    boxes = np.array([[0, 0, 16, 16], [24, 34, 16, 16], [3, 7, 16, 16]])
    rec = RecordingArray(site)
    crops = crop_and_resize(rec, boxes, 16)
    assert crops.dtype == np.uint16 and crops.shape == (3, 5, 16, 16)
    for crop, (y, x, h, w) in zip(crops, boxes):
        np.testing.assert_array_equal(crop, site[:, y : y + h, x : x + w])
    assert rec.keys == [(slice(None), slice(y, y + h), slice(x, x + w)) for y, x, h, w in boxes.tolist()]
    assert not np.shares_memory(crops, site)
    crops[:] = 0
    assert site.any()


def test_crop_and_resize_resamples_with_antialiasing() -> None:
    site = np.full((2, 40, 40), 777, np.uint16)
    site[1] = np.arange(40, dtype=np.uint16)[None] * 100
    out = crop_and_resize(site, np.array([[4, 0, 32, 32]]), 16)
    assert out.dtype == np.uint16
    assert (out[0, 0] == 777).all()
    # on a linear ramp the antialiasing (triangle) filter equals the 2x2 mean away from the borders
    ref = F.avg_pool2d(torch.from_numpy(site[1:, 4:36, 0:32].astype(np.float32))[None], 2)[0, 0].numpy()
    assert np.abs(out[0, 1, :, 1:-1].astype(float) - ref[:, 1:-1]).max() <= 0.5
    with pytest.raises(DataError, match="outside"):
        crop_and_resize(site, np.array([[30, 30, 16, 16]]), 16)


# ------------------------------------------------------------------------------------------------- device side


def test_geometry_matches_flip_and_rot90_reference() -> None:
    x = torch.rand(24, 3, 9, 9)
    aug = GpuAugment(shift_p=0.0, gamma_p=0.0, rot90_p=0.9)
    params = aug.sample_params(x.shape, _gen(0))
    y = aug.apply(x, params)
    assert set(params["rot90"].tolist()) == {0, 1, 2, 3}
    for i in range(24):
        ref = x[i]
        if params["hflip"][i]:
            ref = ref.flip(-1)
        if params["vflip"][i]:
            ref = ref.flip(-2)
        ref = torch.rot90(ref, int(params["rot90"][i]), (-2, -1))
        torch.testing.assert_close(y[i], ref, rtol=0, atol=0)


def test_colour_ops_match_per_sample_formula() -> None:
    x = torch.rand(6, 5, 8, 8)
    aug = GpuAugment(hflip_p=0, vflip_p=0, rot90_p=0, color_mode="paper")  # the paper's defaults: 0.3, (0.5, 1.5)
    assert (aug.shift, aug.gamma) == (0.3, (0.5, 1.5))
    params = aug.sample_params(x.shape, _gen(1))
    y = aug(x, _gen(1))
    s, g = params["shift"], params["gamma"]
    assert s.abs().max() <= 0.3 and (g >= 0.5).all() and (g <= 1.5).all()
    ref = ((x + s[:, :, None, None]).clamp(0, 1) ** g[:, :, None, None]).clamp(0, 1)
    torch.testing.assert_close(y, ref)
    assert len({tuple(row.tolist()) for row in s}) == 6  # per-sample, per-channel draws


def test_paper_mode_replays_the_old_draws_and_rejects_brightness() -> None:
    """Paper mode draws exactly the parameters it always drew (relative mode only appends its own draws)."""
    shape = (5, 5, 8, 8)
    old = GpuAugment(color_mode="paper", blur_p=0.5, noise_p=0.5, drop_p=0.5).sample_params(shape, _gen(11))
    assert set(old) == {"hflip", "vflip", "rot90", "shift", "gamma", "blur", "blur_sigma", "noise", "noise_values",
                        "drop", "drop_channel"}
    rel = GpuAugment(color_mode="relative", shift=0.3, gamma=(0.5, 1.5), blur_p=0.5, noise_p=0.5, drop_p=0.5)
    new = rel.sample_params(shape, _gen(11))
    for key in ("hflip", "vflip", "rot90", "shift", "gamma"):
        torch.testing.assert_close(new[key], old[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="brightness"):
        GpuAugment(color_mode="paper", brightness=0.2)
    with pytest.raises(ConfigError, match="color_mode"):
        GpuAugment(color_mode="absolute")


def test_relative_mode_matches_formula_and_is_scale_equivariant() -> None:
    """x -> clip((x + s * std_c) * b) then r_c * (x / r_c) ** g: the strength follows each view's own range."""
    gen = torch.Generator().manual_seed(12)
    x = 0.02 + 0.05 * torch.rand(6, 5, 16, 16, generator=gen)  # dark, like Cell Painting sites (mean ~0.045)
    aug = GpuAugment(hflip_p=0, vflip_p=0, rot90_p=0)
    params = aug.sample_params(x.shape, _gen(13))
    s, g, b = (params[k][:, :, None, None] for k in ("shift", "gamma", "brightness"))
    assert s.abs().max() <= 0.5 and ((b >= 0.8) & (b <= 1.2)).all() and ((g >= 0.8) & (g <= 1.25)).all()
    std = x.flatten(2).std(2, unbiased=False)[:, :, None, None]
    z = ((x + s * std) * b).clamp(0, 1)
    r = z.flatten(2).amax(2)[:, :, None, None]
    torch.testing.assert_close(aug.apply(x, params), r * (z / r) ** g)
    # 10x brighter (still below 1): the same draws give exactly 10x the result
    torch.testing.assert_close(aug.apply(10 * x, params), 10 * aug.apply(x, params), rtol=1e-5, atol=1e-6)


def test_relative_mode_keeps_per_channel_contrast_on_dark_views_where_paper_mode_destroys_it() -> None:
    gen = torch.Generator().manual_seed(14)
    x = (0.06 + 0.04 * torch.randn(256, 5, 24, 24, generator=gen)).clamp(0, 1)  # raw means ~0.06, std ~0.04
    in_std = x.flatten(2).std(2)
    ratio = {}
    for mode in ("relative", "paper"):
        y = GpuAugment(hflip_p=0, vflip_p=0, rot90_p=0, color_mode=mode)(x, _gen(15))
        ratio[mode] = y.flatten(2).std(2) / in_std
        assert torch.equal(x, (0.06 + 0.04 * torch.randn(256, 5, 24, 24, generator=gen.manual_seed(14))).clamp(0, 1))
    rel = ratio["relative"]
    assert 0.6 < float(rel.min()) and float(rel.max()) < 1.6  # per-channel std stays within a bound of the input's
    assert abs(float(rel.median()) - 1) < 0.15
    assert float((ratio["paper"] < 0.1).float().mean()) > 0.05  # the paper's shift flattens a share of channels


def test_blur_matches_torchvision_per_sample_sigma() -> None:
    x = torch.rand(4, 2, 30, 30)
    aug = GpuAugment(hflip_p=0, vflip_p=0, rot90_p=0, shift_p=0, gamma_p=0, blur_p=1.0, blur_kernel=9)
    params = aug.sample_params(x.shape, _gen(2))
    y = aug.apply(x, params)
    for i in range(4):
        sigma = float(params["blur_sigma"][i])
        ref = TF.gaussian_blur(x[i : i + 1], kernel_size=[9, 9], sigma=[sigma, sigma])
        torch.testing.assert_close(y[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    assert len(set(params["blur_sigma"].tolist())) == 4


def test_noise_and_channel_drop() -> None:
    x = torch.full((8, 5, 32, 32), 0.5)
    y = GpuAugment(hflip_p=0, vflip_p=0, rot90_p=0, shift_p=0, gamma_p=0, noise_p=1.0, noise_std=0.05)(x, _gen(3))
    assert abs(float((y - x).std()) - 0.05) < 0.003 and abs(float((y - x).mean())) < 0.003
    aug = GpuAugment(hflip_p=0, vflip_p=0, rot90_p=0, shift_p=0, gamma_p=0, drop_p=1.0)
    params = aug.sample_params(x.shape, _gen(4))
    y = aug.apply(x, params)
    dropped = (y == 0).flatten(2).all(-1)
    assert (dropped.sum(1) == 1).all()
    assert torch.equal(dropped.float().argmax(1), params["drop_channel"])


def test_per_sample_randomness_and_generator_determinism() -> None:
    x = torch.rand(1, 5, 16, 16).expand(8, -1, -1, -1)
    aug = GpuAugment()
    y = aug(x, _gen(5))
    assert all(not torch.allclose(y[0], y[i]) for i in range(1, 8))
    assert torch.equal(y, aug(x, _gen(5)))
    assert not torch.equal(y, aug(x, _gen(6)))


def test_no_augmentation_writes_into_its_input() -> None:
    x = torch.rand(4, 5, 16, 16)
    before = x.clone()
    ops = [dict(hflip_p=1.0), dict(vflip_p=1.0), dict(rot90_p=1.0), dict(shift_p=1.0), dict(gamma_p=1.0),
           dict(blur_p=1.0), dict(noise_p=1.0), dict(drop_p=1.0), ALL_ON]  # fmt: skip
    nothing = dict(hflip_p=0, vflip_p=0, rot90_p=0, shift_p=0, gamma_p=0)
    for op in ops:
        y = GpuAugment(**{**nothing, **op})(x, _gen(7))
        assert torch.equal(x, before), op
        assert y.data_ptr() != x.data_ptr() and not torch.equal(y, x), op
    idle = GpuAugment(**nothing)(x)
    assert torch.equal(idle, x) and idle.data_ptr() != x.data_ptr()


def test_views_of_one_site_are_independent() -> None:
    """The paper's bug: a crop was a view of the site and the colour ops wrote through it into later views."""
    site = np.random.default_rng(7).integers(0, 65535, (5, 24, 24)).astype(np.uint16)
    pristine = site.copy()
    aug = GpuAugment(**ALL_ON)
    # every crop is the whole site, so in a pipeline that writes in place each view would see earlier views' changes
    boxes, _ = sample_crop_boxes(None, 24, 24, ViewSpec(6, 24), np.random.default_rng(0))
    np.testing.assert_array_equal(boxes, [[0, 0, 24, 24]] * 6)
    crops = crop_and_resize(site, boxes, 24)  # the worker path of TrainCropDataset
    assert not np.shares_memory(crops, site)
    x = uint16_to_float(torch.from_numpy(crops))  # what AugmentRecipe.augment does on the device
    gen = _gen(8)
    views = []
    for k in range(6):
        params = aug.sample_params(x[k : k + 1].shape, gen)
        views.append((aug.apply(x[k : k + 1], params), params))
    assert np.array_equal(site, pristine) and np.array_equal(crops, np.broadcast_to(pristine, crops.shape))
    reference = uint16_to_float(torch.from_numpy(pristine))[None]
    for view, params in views:
        torch.testing.assert_close(view, aug.apply(reference, params), rtol=0, atol=0)
    assert not torch.allclose(views[0][0], views[1][0])
    crops[0] = 0  # one crop's memory is neither the site's nor another crop's
    assert np.array_equal(site, pristine) and np.array_equal(crops[1], pristine)
    # the full recipe on collated uint16 views leaves them untouched as well
    recipe = get_recipe("dino", global_crops_size=16, local_crops_size=8, local_crops_number=3, **ALL_ON)
    raw = [torch.randint(0, 65535, (2 * v.count, 5, v.size, v.size)).to(torch.uint16) for v in recipe.views]
    raw_before = [r.clone() for r in raw]
    out = recipe.augment(raw, _gen(9))
    assert all(torch.equal(r, b) for r, b in zip(raw, raw_before))
    assert [o.shape for o in out] == [r.shape for r in raw] and all(o.dtype == torch.float32 for o in out)


def test_cell_crops_match_slicing_and_rule() -> None:
    """The worker path of TrainCropDataset: boxes from the DNA integral image, then crop_and_resize of those boxes."""
    rng = np.random.default_rng(5)
    sites = [_site(rng, h=48, w=56) for _ in range(3)]
    otsu = [20000.0, 20000.0, 70000.0]  # site 2: nothing exceeds 0.7 x Otsu
    before = [s.copy() for s in sites]
    draw = np.random.default_rng(1)
    for b, (site, thr) in enumerate(zip(sites, otsu)):
        integral = integral_mask(site[4], thr)
        boxes, passed = sample_crop_boxes(integral, 48, 56, ViewSpec(4, 20), draw, max_tries=50)
        crops = crop_and_resize(site, boxes, 20)
        assert crops.shape == (4, 5, 20, 20) and crops.dtype == np.uint16
        np.testing.assert_array_equal(site, before[b])
        for crop, ok, (y0, x0, h, w) in zip(crops, passed, boxes.tolist()):
            assert (h, w) == (20, 20)
            np.testing.assert_array_equal(crop, site[:, y0 : y0 + h, x0 : x0 + w])
            frac = np.mean(site[4, y0 : y0 + h, x0 : x0 + w] > 0.7 * thr)  # brute force on pixels
            assert bool(ok) == (frac >= 0.01)
        assert passed.all() if b < 2 else not passed.any()
    # crops are read from raw uint16 sites only; float [0, 1] values appear on the device (uint16_to_float)
    with pytest.raises(DataError, match="uint16"):
        crop_and_resize(sites[0].astype(np.float32) / 65535, np.array([[0, 0, 20, 20]]), 20)


def test_resized_crops_copy_downscale_and_rule() -> None:
    site = np.random.default_rng(9).integers(0, 65535, (3, 32, 32)).astype(np.uint16)
    boxes, _ = sample_crop_boxes(None, 32, 32, ViewSpec(2, 32, (1.0, 1.0), (1.0, 1.0)), np.random.default_rng(0))
    np.testing.assert_array_equal(boxes, [[0, 0, 32, 32]] * 2)
    whole = crop_and_resize(site, boxes, 32)
    np.testing.assert_array_equal(whole, np.broadcast_to(site, whole.shape))  # box == output size: an exact copy
    # 2x box: antialiased bilinear, i.e. the triangle filter (1, 3, 3, 1) / 8, not the plain 2x2 block mean
    half = crop_and_resize(site, boxes, 16)
    m = _aa_bilinear_halving(16)
    ref = np.einsum("oh,chw,pw->cop", m, site.astype(np.float64), m)
    assert half.shape == (2, 3, 16, 16) and np.abs(half.astype(np.float64) - ref[None]).max() <= 0.5 + 1e-3
    site = _site(np.random.default_rng(6), h=40, w=40)
    integral = integral_mask(site[4], 20000.0)
    spec = ViewSpec(8, 12, scale=(0.05, 0.2))
    boxes, passed = sample_crop_boxes(integral, 40, 40, spec, np.random.default_rng(3), max_tries=100)
    crops = crop_and_resize(site, boxes, 12)
    assert crops.shape == (8, 5, 12, 12) and crops.dtype == np.uint16 and passed.all()
    area = boxes[:, 2] * boxes[:, 3] / 1600
    assert area.min() > 0.04 and area.max() < 0.22
    assert (box_fractions(integral, boxes) >= 0.01).all()
    for y0, x0, h, w in boxes.tolist():
        assert np.mean(site[4, y0 : y0 + h, x0 : x0 + w] > 0.7 * 20000.0) >= 0.01
