"""Dataset tests on tiny sites in all three layouts: crops are windows of the site, randomness depends only on
(seed, epoch, index), workers do not change batches, only crop regions are read, Otsu comes from metadata first."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import data.datasets as datasets
from data.augment import get_recipe
from data.datasets import TrainCropDataset, collate_views, seed_worker
from data.io import write_channel_tiffs, write_merged_tiff, write_npy
from data.prefetch import SitePrefetcher
from data.schema import DEFAULT_CHANNELS, load_site_table
from data.tiling import TileGrid
from utils.errors import ConfigError, DataError

SIZE = 48


def _pixels(seed: int) -> np.ndarray:
    """A 5 x 48 x 48 uint16 site with a few bright nuclei in the DNA channel."""
    rng = np.random.default_rng(seed)
    site = rng.integers(200, 3000, (5, SIZE, SIZE)).astype(np.uint16)
    dna = DEFAULT_CHANNELS.index("DNA")
    site[dna] = rng.integers(100, 400, (SIZE, SIZE))
    for _ in range(3):
        y, x = rng.integers(0, SIZE - 6, 2)
        site[dna, y : y + 6, x : x + 6] = 20000
    return site


@pytest.fixture()
def sites(tmp_path: Path) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Six sites: merged TIFFs with and without otsuth, a per-channel site, and a .npy site with Otsu_th in the CSV."""
    pixels = [_pixels(i) for i in range(6)]
    rows = []
    for i in range(4):
        write_merged_tiff(tmp_path / f"s{i}.tiff", pixels[i], otsu=15000.0 if i % 2 == 0 else None)
        rows.append({"FileName_Merged": f"s{i}.tiff", "Otsu_th": math.nan})
    write_npy(tmp_path / "s4.npy", pixels[4])
    rows.append({"FileName_Merged": "s4.npy", "Otsu_th": 15000.0 / 65535})  # [0, 1] scale in the CSV
    names = [f"s5_{ch}.tiff" for ch in DEFAULT_CHANNELS]
    write_channel_tiffs([tmp_path / n for n in names], pixels[5])
    rows.append(
        {
            "FileName_Merged": "",
            "Otsu_th": math.nan,
            **{f"FileName_Orig{c}": n for c, n in zip(DEFAULT_CHANNELS, names)},
        }
    )
    df = pd.DataFrame(rows).assign(batch="b1", plate="p1", well=[f"A0{i + 1}" for i in range(6)], field=1)
    merged = df.iloc[:5].drop(columns=[c for c in df.columns if c.startswith("FileName_Orig")])
    merged.to_csv(tmp_path / "merged.csv", index=False)
    per_channel = df.iloc[5:].drop(columns=["FileName_Merged"])
    per_channel.to_csv(tmp_path / "per_channel.csv", index=False)
    table = pd.concat(
        [load_site_table(tmp_path / "merged.csv"), load_site_table(tmp_path / "per_channel.csv")], ignore_index=True
    )
    return table, pixels


def _recipe():
    return get_recipe("dino", global_crops_size=24, local_crops_size=12, local_crops_number=3)


def _window_positions(site: np.ndarray, crop: np.ndarray) -> list[tuple[int, int]]:
    """Every (y, x) at which ``crop`` is an exact window of ``site`` (brute force)."""
    s = crop.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(site, (s, s), axis=(1, 2))
    hits = np.all(windows == crop[:, None, None], axis=(0, 3, 4))
    return [tuple(p) for p in np.argwhere(hits)]


def test_train_items_are_uint16_windows_with_cells(sites) -> None:
    table, pixels = sites
    ds = TrainCropDataset(table, _recipe(), seed=3)
    assert len(ds) == 6
    dna = DEFAULT_CHANNELS.index("DNA")
    for i in range(6):
        item = ds[i]
        assert item["index"] == i
        views = item["views"]
        assert [tuple(v.shape) for v in views] == [(2, 5, 24, 24), (3, 5, 12, 12)]
        assert all(v.dtype == torch.uint16 for v in views)
        assert item["cell_crops"] == 5  # nuclei cover >1 % of every window size here, found within 20 tries
        for v in views:
            for crop in v.numpy():
                assert _window_positions(pixels[i], crop), f"site {i}: crop is not a window of the site"
                assert np.mean(crop[dna] > 0.7 * 15000) >= 0.01 or i in (1, 3, 5)


def test_randomness_depends_only_on_seed_epoch_index(sites) -> None:
    table, _ = sites
    a = TrainCropDataset(table, _recipe(), seed=1)
    b = TrainCropDataset(table, _recipe(), seed=1)
    same = lambda x, y: all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
    _ = b[5], b[0]  # reading other items first changes nothing
    assert same(a[2], b[2])
    a.set_epoch(4)
    assert not same(a[2], b[2])
    assert same(a[2], b[(4, 2)])
    b.set_epoch(4)
    assert same(a[2], b[2])
    assert not same(a[2], TrainCropDataset(table, _recipe(), seed=2)[(4, 2)])
    assert not same(a[2], a[3])


def test_worker_count_does_not_change_batches(sites) -> None:
    table, _ = sites
    ds = TrainCropDataset(table, _recipe(), seed=7)
    ds.set_epoch(2)

    def batches(workers: int) -> list[dict]:
        loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_views, worker_init_fn=seed_worker)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 2
    for s, p in zip(serial, parallel):
        assert torch.equal(s["index"], p["index"]) and torch.equal(s["cell_crops"], p["cell_crops"])
        assert all(torch.equal(u, v) for u, v in zip(s["views"], p["views"]))


def test_collate_is_view_major(sites) -> None:
    table, _ = sites
    ds = TrainCropDataset(table, _recipe())
    items = [ds[i] for i in (0, 4, 5)]
    batch = collate_views(items)
    assert [tuple(v.shape) for v in batch["views"]] == [(6, 5, 24, 24), (9, 5, 12, 12)]
    assert batch["views"][0].dtype == torch.uint16 and batch["index"].tolist() == [0, 4, 5]
    for g, count in enumerate((2, 3)):
        for k in range(count):
            for b in range(3):
                assert torch.equal(batch["views"][g][k * 3 + b], items[b]["views"][g][k])


class _Recorder:
    """Wraps a site array and records the indices read from it."""

    def __init__(self, arr, log: list) -> None:
        self.arr, self.shape, self.log = arr, arr.shape, log

    def __getitem__(self, key):
        self.log.append(key)
        return self.arr[key]


def test_reads_only_dna_plane_and_crop_boxes(sites, monkeypatch) -> None:
    table, _ = sites
    log: list = []
    real = datasets.open_site_array
    monkeypatch.setattr(datasets, "open_site_array", lambda row, ch: _Recorder(real(row, ch), log))
    item = TrainCropDataset(table, _recipe())[0]
    dna = DEFAULT_CHANNELS.index("DNA")
    assert log[0] == dna  # the whole DNA plane once, for the site's cell-mask summary
    # then the DNA of the few boxes the summary's bounds leave open (many on a 48 px site), and the 5 crops
    assert all(key[0] == dna and key[1].stop - key[1].start <= 24 for key in log[1:] if key[0] != slice(None))
    crops = [key for key in log[1:] if key[0] == slice(None)]
    assert len(crops) == 5
    for key, size in zip(crops, [24, 24, 12, 12, 12]):
        assert key[0] == slice(None)
        assert key[1].stop - key[1].start == size and key[2].stop - key[2].start == size
    assert item["cell_crops"] == 5


def test_otsu_from_metadata_first_then_computed(sites, tmp_path: Path) -> None:
    table, pixels = sites
    ds = TrainCropDataset(table, _recipe())
    assert ds._metadata_otsu(0, table.iloc[0]) == 15000.0  # TIFF description
    assert math.isnan(ds._metadata_otsu(1, table.iloc[1]))  # none stored: computed from the DNA channel
    assert ds._metadata_otsu(4, table.iloc[4]) == pytest.approx(15000.0)  # CSV value on the [0, 1] scale
    assert ds[1]["cell_crops"] == 5
    # a stored threshold too high for any pixel wins over a computed one: no crop passes the rule
    write_merged_tiff(tmp_path / "s1.tiff", pixels[1], otsu=60000.0)
    fresh = TrainCropDataset(table, _recipe())
    assert fresh[1]["cell_crops"] == 0


def test_inference_reader_gives_whole_sites_in_table_order(sites) -> None:
    """What inference reads (the prefetcher, over a grid that covers the whole site): pixels and Otsu per row."""
    table, pixels = sites
    region = TileGrid(SIZE).layout(SIZE, SIZE).region
    batches = list(SitePrefetcher(table, DEFAULT_CHANNELS, region, batch_size=6, device=torch.device("cpu"), threads=0))
    assert len(batches) == 1
    batch = batches[0]
    assert batch.count == 6 and batch.positions.tolist() == list(range(6)) and batch.pixels.dtype == torch.uint16
    for i in range(6):
        np.testing.assert_array_equal(batch.pixels[i].numpy(), pixels[i])
    otsu = batch.otsu.tolist()
    assert otsu[0] == 15000.0 and math.isnan(otsu[1]) and otsu[4] == pytest.approx(15000.0)
    assert batch.pixels.shape == (6, 5, SIZE, SIZE)


def test_bad_configurations(sites) -> None:
    table, _ = sites
    with pytest.raises(ConfigError, match="DNA"):
        TrainCropDataset(table, _recipe(), channels=("Mito", "AGP", "RNA", "ER", "Hoechst"))
    with pytest.raises(DataError, match="s0.tiff.*larger than"):
        TrainCropDataset(table, get_recipe("simclr", size=64))[0]
    with pytest.raises(DataError, match="no sites"):
        TrainCropDataset(table.iloc[:0], _recipe())


def test_a_cached_site_reads_only_its_crops_and_gives_the_same_crops(sites, monkeypatch) -> None:
    """The cell-mask summary is computed on a site's first visit; later items read only their crop boxes (and the
    DNA of a box its bounds cannot decide), and every crop equals the uncached path's and the full integral's."""
    from data.augment import sample_crop_boxes
    from data.cellmask import integral_mask, otsu_threshold
    from utils.seeding import sample_seed

    table, pixels = sites
    log: list = []
    real = datasets.open_site_array
    monkeypatch.setattr(datasets, "open_site_array", lambda row, ch: _Recorder(real(row, ch), log))
    cached = TrainCropDataset(table, _recipe(), seed=4)
    first = cached[(0, 1)]
    assert log[0] == DEFAULT_CHANNELS.index("DNA")
    log.clear()
    again = cached[(1, 1)]
    assert all(isinstance(key, tuple) for key in log)  # no whole-plane read
    assert all(key[1].stop - key[1].start <= 24 for key in log)
    uncached = TrainCropDataset(table, _recipe(), seed=4, mask_cache_mib=0)
    for key, item in (((0, 1), first), ((1, 1), again)):
        ref = uncached[key]
        assert all(torch.equal(a, b) for a, b in zip(item["views"], ref["views"]))
        assert item["cell_crops"] == ref["cell_crops"]
        # the reference: boxes drawn with the same generator, tested on the full-resolution summed-area table
        rng = np.random.default_rng(sample_seed(4, key[0], key[1]))
        site, dna = pixels[1], pixels[1][DEFAULT_CHANNELS.index("DNA")]
        otsu = cached._metadata_otsu(1, table.iloc[1])  # NaN for this site: computed from its DNA, as the loader does
        integral = integral_mask(dna, otsu_threshold(dna) if math.isnan(otsu) else otsu)
        for spec, view in zip(_recipe().views, item["views"]):
            boxes, _ = sample_crop_boxes(integral, SIZE, SIZE, spec, rng)
            want = np.stack([site[:, y: y + h, x: x + w] for y, x, h, w in boxes])
            assert np.array_equal(view.numpy(), want)
