"""Torch datasets over a site table: cell crops for training (uint16, read crop by crop) and whole sites for inference.

Training randomness comes only from ``utils.seeding.sample_seed(seed, epoch, index)``, so a batch does not depend on
the number of workers, the rank that loads it or the order in which workers run, and a run resumed at an epoch
boundary sees exactly the crops the uninterrupted run would have seen.

``crop_mode="cells"`` centres the crops on nuclei (``data.augment.sample_cell_boxes``). A site's nuclei are a
function of the site alone (its location file, or ``data.segmentation.nucleus_centres`` of its DNA channel), so
caching them per worker changes no draw; a site without any nucleus falls back to the cell-mask sampling, with the
same generator, so it gets exactly the crops ``crop_mode="tiles"`` would give it.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from data.augment import AugmentRecipe, crop_and_resize, sample_cell_boxes, sample_crop_boxes
from data.cellmask import DEFAULT_FACTOR, DEFAULT_MIN_FRACTION, CellMaskSummary, otsu_threshold
from data.io import open_site_array, site_otsu
from data.locations import CROP_MODES, read_locations, site_locations_file
from data.schema import DEFAULT_CHANNELS, image_paths
from data.segmentation import nucleus_centres
from utils.errors import ConfigError, DataError
from utils.seeding import sample_seed

MASK_CACHE_MIB = 256  # per loader process: about 13,000 summaries of 1080² sites


def dna_index(channels: Sequence[str]) -> int:
    """Position of the DNA channel, looked up by name (never assumed to be 4)."""
    if "DNA" not in channels:
        raise ConfigError(f"channels {list(channels)} have no 'DNA' channel, which the cell mask needs")
    return list(channels).index("DNA")


def _site_name(row: Any, channels: Sequence[str]) -> str:
    """The first file of a site, for error messages."""
    try:
        paths = image_paths(row, channels)
    except Exception:  # the message must not fail on a malformed row
        paths = []
    return paths[0] if paths else f"site row {getattr(row, 'name', '?')}"


class TrainCropDataset(Dataset):
    """One item per site: the recipe's crops as uint16 tensors, reading only the crop boxes and the DNA channel.

    Item ``i`` is ``{"views": [uint16 (count, C, size, size) per ViewSpec], "index": i, "cell_crops": n}`` where
    ``n`` counts the crops that satisfied the cell rule (in cell mode: the crops centred on a nucleus). Keys may
    also be ``(epoch, i)`` pairs, which ignore ``set_epoch``: use them with persistent workers, whose copy of the
    dataset never sees ``set_epoch``.

    ``crop_mode="cells"`` centres every crop on a randomly chosen nucleus of the site (``locations``: a folder of
    CellProfiler location files, else the site table's location column, else segmentation, computed once per site
    and worker: about 0.2 s for a 1080 px site on one core, once per site and worker for the whole run; later
    items of the site cost less than in tiles mode).

    Tiles mode tests candidate boxes against the site's ``CellMaskSummary``, computed from its whole DNA plane on
    the site's first visit in each loader process and kept in an LRU cache of ``mask_cache_mib`` MiB (0: none, the
    summary is rebuilt every item). After that an item reads only its crops (and, rarely, the DNA of a box the
    summary's bounds cannot decide); the crops are the same with or without the cache.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        recipe: AugmentRecipe,
        channels: Sequence[str] = DEFAULT_CHANNELS,
        seed: int = 0,
        *,
        max_tries: int = 20,
        factor: float = DEFAULT_FACTOR,
        min_fraction: float = DEFAULT_MIN_FRACTION,
        crop_mode: str = "tiles",
        locations: str | None = None,
        mask_cache_mib: float = MASK_CACHE_MIB,
    ) -> None:
        if len(table) == 0:
            raise DataError("the training table has no sites")
        if crop_mode not in CROP_MODES:
            raise ConfigError(f"crop mode {crop_mode!r} is not one of {', '.join(CROP_MODES)}")
        self.table = table.reset_index(drop=True)
        self.recipe = recipe
        self.channels = tuple(channels)
        self.dna = dna_index(self.channels)
        self.seed = int(seed)
        self.epoch = 0
        self.max_tries = int(max_tries)
        self.factor = float(factor)
        self.min_fraction = float(min_fraction)
        self._otsu_cache: dict[int, float] = {}
        self.crop_mode = crop_mode
        self.locations = locations
        self._centre_cache: dict[int, np.ndarray] = {}
        self.mask_cache_bytes = int(max(0.0, float(mask_cache_mib)) * 2**20)
        self._mask_cache: OrderedDict[int, CellMaskSummary] = OrderedDict()
        self._mask_cache_used = 0

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops ``__getitem__`` returns (call before each epoch's iterator is created)."""
        self.epoch = int(epoch)

    def _metadata_otsu(self, index: int, row: pd.Series) -> float:
        """The stored threshold (TIFF description, then Otsu_th; already raw units), cached per process."""
        if index not in self._otsu_cache:
            self._otsu_cache[index] = float(site_otsu(row))
        return self._otsu_cache[index]

    def mask_summary(self, index: int, row: pd.Series, site: Any) -> CellMaskSummary:
        """The site's cell-mask summary, from the LRU cache or from its whole DNA plane (then cached)."""
        summary = self._mask_cache.get(index)
        if summary is not None:
            self._mask_cache.move_to_end(index)
            return summary
        dna = np.asarray(site[self.dna])
        otsu = self._metadata_otsu(index, row)
        if math.isnan(otsu):
            otsu = otsu_threshold(dna)
        summary = CellMaskSummary(dna, otsu, self.factor)
        if summary.nbytes <= self.mask_cache_bytes:
            self._mask_cache[index] = summary
            self._mask_cache_used += summary.nbytes
            while self._mask_cache_used > self.mask_cache_bytes:
                self._mask_cache_used -= self._mask_cache.popitem(last=False)[1].nbytes
        return summary

    def nucleus_centres(self, index: int, row: pd.Series, site: Any) -> np.ndarray:
        """The site's nuclei (n, 2) (y, x): its location file, else segmentation of its DNA; cached per process."""
        if index not in self._centre_cache:
            _, height, width = (int(s) for s in site.shape)
            path = site_locations_file(row, self.locations)
            if path is not None:
                centres = read_locations(path, height, width)
            else:
                centres = nucleus_centres(np.asarray(site[self.dna])[None], ("DNA",))
            self._centre_cache[index] = centres
        return self._centre_cache[index]

    def _cell_views(self, index: int, row: pd.Series, site: Any, rng: np.random.Generator) -> list[torch.Tensor] | None:
        """The recipe's crops centred on nuclei; None for a site without nuclei (the caller samples as in tiles)."""
        centres = self.nucleus_centres(index, row, site)
        if len(centres) == 0:
            return None
        _, height, width = (int(s) for s in site.shape)
        views = []
        for spec in self.recipe.views:
            try:
                crops = crop_and_resize(site, sample_cell_boxes(centres, height, width, spec, rng), spec.size)
            except DataError as exc:
                raise DataError(f"{_site_name(row, self.channels)}: {exc}") from None
            views.append(torch.from_numpy(crops))
        return views

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        if not 0 <= index < len(self.table):
            raise IndexError(f"site index {index} out of range for {len(self.table)} sites")
        row = self.table.iloc[index]
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        site = open_site_array(row, self.channels)
        if self.crop_mode == "cells":
            cell_views = self._cell_views(index, row, site, rng)
            if cell_views is not None:
                return {"views": cell_views, "index": index, "cell_crops": sum(len(v) for v in cell_views)}
        _, height, width = (int(s) for s in site.shape)
        rule = self.mask_summary(index, row, site).rule(site, self.dna)
        views, cell_crops = [], 0
        for spec in self.recipe.views:
            try:
                boxes, passed = sample_crop_boxes(
                    rule, height, width, spec, rng, max_tries=self.max_tries, min_fraction=self.min_fraction
                )
                crops = crop_and_resize(site, boxes, spec.size)
            except DataError as exc:
                raise DataError(f"{_site_name(row, self.channels)}: {exc}") from None
            views.append(torch.from_numpy(crops))
            cell_crops += int(passed.sum())
        return {"views": views, "index": index, "cell_crops": cell_crops}


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: give Python/NumPy in each worker a distinct seed derived from torch's.

    Our datasets draw only from per-item generators; this protects any other code that uses global RNGs.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def collate_views(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack items into one uint16 tensor per ViewSpec, (count*B, C, s, s) view-major, as the methods expect.

    Rows 0..B-1 are crop 0 of every sample, rows B..2B-1 crop 1, and so on.
    """
    if not batch:
        raise ValueError("collate_views got an empty batch")
    n_groups = len(batch[0]["views"])
    views = []
    for g in range(n_groups):
        stacked = torch.stack([item["views"][g] for item in batch], dim=1)
        views.append(stacked.reshape(-1, *stacked.shape[2:]))
    return {
        "views": views,
        "index": torch.tensor([int(item["index"]) for item in batch], dtype=torch.long),
        "cell_crops": torch.tensor([int(item.get("cell_crops", 0)) for item in batch], dtype=torch.long),
    }
