"""Training data: the site table, the crop dataset and its loader, the view recipe, and intensity statistics.

Views leave the workers as uint16 crops; ``ViewPipeline`` augments and standardises them on the device.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from data.augment import AugmentRecipe, get_recipe
from data.datasets import TrainCropDataset, collate_views, seed_worker
from data.intensity import IntensityNorm, get_intensity_norm, uint16_to_float
from data.schema import TRAIN_REQUIRED, load_site_table
from data.stats import dataset_intensity_norm
from utils import distributed
from utils.errors import ConfigError, DataError
from utils.training.config import TrainConfig

DATASET_INTENSITY = "dataset"


class ViewPipeline:
    """Moves uint16 views to the device and augments + standardises them there, one batched call per view spec."""

    def __init__(self, recipe: AugmentRecipe, norm: IntensityNorm, device: torch.device) -> None:
        self.to_float = uint16_to_float
        self.augs = [aug.to(device) if aug is not None else None for aug in recipe.gpu_aug_per_view]
        self.norm = norm
        self.device = device

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """uint16 (count*B, C, s, s) per spec (view-major, from collate_views) -> augmented, standardised floats."""
        out = []
        for x, aug in zip(views, self.augs):
            x = self.to_float(x.to(self.device, non_blocking=True))
            if aug is not None:
                x = aug(x, generator=generator)
            out.append(self.norm.standardize(x))
        return out


class EpochKeySampler(torch.utils.data.Sampler):
    """Yields (epoch, index) keys: persistent workers keep a dataset copy that never sees ``set_epoch``."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        epoch = self.sampler.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def load_table(cfg: TrainConfig) -> pd.DataFrame:
    """The validated site table of ``--path_df``."""
    return load_site_table(cfg.path_df, image_root=cfg.image_root, channels=cfg.channels, required=TRAIN_REQUIRED,
                           platemap=cfg.platemap, column_map=cfg.column_map)


def crop_options(cfg: TrainConfig) -> dict[str, Any]:
    """Where ``TrainCropDataset`` centres its crops (``--crop_mode``, ``--locations``), for every dataset of a run."""
    return {"crop_mode": cfg.crop_mode, "locations": cfg.locations}


def build_recipe(cfg: TrainConfig) -> AugmentRecipe:
    """The method's view recipe with the flags' overrides."""
    return get_recipe(cfg.recipe, **{k: v for k, v in cfg.recipe_overrides.items() if v is not None})


def build_loader(
    cfg: TrainConfig, info: distributed.DistInfo, table: pd.DataFrame | None = None
) -> tuple[DataLoader, TrainCropDataset, DistributedSampler, AugmentRecipe]:
    """Site table (default: all of --path_df) -> crop dataset -> DataLoader with a shuffling DistributedSampler."""
    table = load_table(cfg) if table is None else table
    recipe = build_recipe(cfg)
    dataset = TrainCropDataset(table, recipe, channels=cfg.channels, seed=cfg.seed, **crop_options(cfg))
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    workers = max(0, cfg.num_workers)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_per_gpu, sampler=EpochKeySampler(sampler), num_workers=workers,
        collate_fn=collate_views,
        pin_memory=cfg.pin_mem and info.device.type == "cuda", drop_last=True, worker_init_fn=seed_worker,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"{cfg.path_df}: {len(dataset)} training sites give no full batch of {cfg.batch_per_gpu} per process on "
            f"{info.world_size} process(es): lower the batch size or add sites"
        )
    return loader, dataset, sampler, recipe


def load_intensity_norm(cfg: TrainConfig, table: pd.DataFrame | None = None,
                        info: distributed.DistInfo | None = None) -> IntensityNorm:
    """The --intensity preset or stats.json, reordered to --channels (every channel needs statistics).

    ``dataset`` computes the statistics of 200 seeded sites of the training table itself (``data.stats``) on rank 0
    and broadcasts them, so the sites are read once; they go into the checkpoint, so inference standardises with
    them too. The paper's constants fit only the paper's images (docs/LEARNING.md, cause 2).
    """
    channels = list(cfg.channels)
    if cfg.intensity == DATASET_INTENSITY:
        if table is None:
            raise ConfigError("--intensity dataset needs the training site table")
        box: list[Any] = [None]
        if info is None or info.is_main:
            try:
                box[0] = dataset_intensity_norm(table, channels, n_sites=200, seed=cfg.seed,
                                                workers=max(1, cfg.num_workers), name="dataset")[0].to_dict()
            except DataError as exc:  # sent to the other ranks too, so none waits for statistics that never come
                box[0] = {"error": f"--intensity dataset: {exc}"}
        if distributed.is_distributed():
            torch.distributed.broadcast_object_list(box, src=0)
        if "error" in box[0]:
            raise DataError(box[0]["error"])
        return IntensityNorm.from_dict(box[0])
    try:
        norm = get_intensity_norm(cfg.intensity)
    except DataError as exc:
        raise ConfigError(f"--intensity: {exc}, nor '{DATASET_INTENSITY}' (this data set's own statistics)") from None
    if tuple(norm.channels) != tuple(channels):
        missing = sorted(set(channels) - set(norm.channels))
        if missing:
            raise ConfigError(f"--intensity {cfg.intensity}: no statistics for channel(s) {missing}; "
                              f"it has {list(norm.channels)}")
        norm = norm.select(list(channels))
    return norm
