"""``HandcraftedConfig``: every setting of one handcrafted run, with its default, validated once on construction.

One field per CLI flag, with the flag's name and the value type argparse gives it (comma lists stay the strings
typed on the command line), so ``dataclasses.asdict(cfg)`` is the ``args`` record of run.json. The CLI takes its
defaults from these fields and the pipeline reads only this object, so a notebook and the command line run the same
code: ``run(HandcraftedConfig(valset="plates/dataset.csv", output_dir="emb/CellProfiler"))``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from data.metadata import column_pairs
from data.schema import DEFAULT_CHANNELS
from data.segmentation import SegmentationParams, required_channels
from utils.errors import ConfigError
from utils.handcrafted.measure import FEATURE_GROUPS, MeasureOptions
from utils.handcrafted.profiles import (
    DEFAULT_SELECT,
    OPERATIONS,
    check_max_sites_per_well,
    check_norm_method,
    check_select_operations,
)
from utils.profiles.controls import CONTROL_CHOICES
from utils.profiles.normalize import NO_NORMALISATION
from utils.resources import available_cpus, cap_workers

DEFAULT_WORKERS = max(1, min(8, available_cpus()))


def split_list(value: str) -> tuple[str, ...]:
    """A comma list flag as a tuple, blanks and surrounding spaces dropped (``"DNA, Mito,"`` -> DNA, Mito)."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class HandcraftedConfig:
    """The settings of one handcrafted run; construction raises ConfigError naming the first bad flag.

    Paths may be given as ``pathlib.Path`` from Python; run.json writes them as text either way.
    """

    valset: str
    output_dir: str
    image_root: str | None = None
    platemap: str | None = None
    column_map: tuple[tuple[str, str], ...] = ()
    channels: str = ",".join(DEFAULT_CHANNELS)
    workers: int = DEFAULT_WORKERS
    features: str = ",".join(MeasureOptions.features)
    texture_channels: str = ",".join(MeasureOptions.texture_channels)
    texture_scale: int = MeasureOptions.texture_scale
    texture_gray_levels: int = MeasureOptions.texture_gray_levels
    intensity_edges: bool = MeasureOptions.intensity_edges
    nucleus_diameter: float = SegmentationParams.nucleus_diameter
    min_nucleus_area: int = SegmentationParams.min_nucleus_area
    max_cell_distance: float = SegmentationParams.max_cell_distance
    discard_border: bool = SegmentationParams.discard_border
    cyto_channels: str = ",".join(SegmentationParams.cyto_channels)
    site_operation: str = "median"
    well_operation: str = "mean"
    max_sites_per_well: int | None = None
    norm_method: str = "mad_robustize"
    controls: str = "auto"
    control_query: str | None = None
    batch_key: str = "batch"
    feature_select: str = ",".join(DEFAULT_SELECT)
    corr_threshold: float = 0.9

    def __post_init__(self) -> None:
        """Check every flag before any site is read, so a typo costs no compute and leaves no output."""
        object.__setattr__(self, "column_map", column_pairs(self.column_map))
        options = self.measurement
        unknown = [f for f in options.features if f not in FEATURE_GROUPS]
        if unknown or not options.features:
            raise ConfigError(f"--features {unknown[0] if unknown else ''!r} is not one of {', '.join(FEATURE_GROUPS)}")
        for name in required_channels(self.segmentation):
            if name not in self.channel_names:
                raise ConfigError(f"channel {name!r} is needed for segmentation but --channels is {self.channels!r}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        # one process per site in flight: more processes than CPUs only cost memory (100000 of them hung the machine)
        object.__setattr__(self, "workers", cap_workers("--workers", self.workers, default=DEFAULT_WORKERS))
        for flag in ("site_operation", "well_operation"):
            if getattr(self, flag) not in OPERATIONS:
                raise ConfigError(f"--{flag} {getattr(self, flag)!r} is not one of {', '.join(OPERATIONS)}")
        check_max_sites_per_well(self.max_sites_per_well)
        check_select_operations(self.select_operations)
        # frozen: the one spelling is stored, so run.json and the normalisation report agree
        object.__setattr__(self, "norm_method", check_norm_method(self.norm_method))
        # --controls is read only to pick the control query, so it is checked only when it will be read
        if self.norm_method != NO_NORMALISATION and not self.control_query and self.controls not in CONTROL_CHOICES:
            raise ConfigError(f"--controls {self.controls!r} is not one of {', '.join(CONTROL_CHOICES)}")

    @property
    def channel_names(self) -> tuple[str, ...]:
        """The site's channels in file order."""
        return split_list(self.channels)

    @property
    def segmentation(self) -> SegmentationParams:
        """The segmentation settings (their ranges are checked by ``SegmentationParams``)."""
        return SegmentationParams(nucleus_diameter=self.nucleus_diameter, min_nucleus_area=self.min_nucleus_area,
                                  max_cell_distance=self.max_cell_distance,
                                  cyto_channels=split_list(self.cyto_channels), discard_border=self.discard_border)

    @property
    def measurement(self) -> MeasureOptions:
        """The measurement settings (their ranges are checked by ``MeasureOptions``)."""
        return MeasureOptions(features=split_list(self.features), texture_channels=split_list(self.texture_channels),
                              texture_scale=self.texture_scale, texture_gray_levels=self.texture_gray_levels,
                              intensity_edges=self.intensity_edges)

    @property
    def select_operations(self) -> tuple[str, ...]:
        """The pycytominer feature-selection operations, in order; ``none`` selects nothing."""
        return () if self.feature_select.strip().lower() == "none" else split_list(self.feature_select)


def defaults() -> dict[str, Any]:
    """Each optional field's default by name, for the CLI parser (required fields are absent)."""
    return {f.name: f.default for f in fields(HandcraftedConfig) if f.default is not MISSING}
