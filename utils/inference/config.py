"""The one typed description of an inference run: every flag of ``inference.py`` as a frozen, validated field.

``InferenceConfig`` holds the defaults (the parser reads them from here) and ``__post_init__`` is the only place
that checks the values, whether the config comes from the command line (``from_flags``) or from Python::

    from utils.inference import InferenceConfig, run_inference
    run_inference(InferenceConfig(ckpt="runs/dino/checkpoint.pth", valset="plates/dataset.csv", outdir="emb/DINO"))
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.locations import CROP_MODES, EDGE_RULES
from data.metadata import column_pairs
from data.schema import DEFAULT_CHANNELS
from data.tiling import TileGrid
from models.backbones import ARCHS
from utils.errors import ConfigError
from utils.precision import AUTO, DTYPES
from utils.profiles import CONTROL_CHOICES, NORM_METHODS, OPERATIONS, SCOPES, canonical_method, parse_chain
from utils.resources import cap_workers

MODELS = ("dino", "mae", "simclr")
POOLS = ("cls", "mean", "mean_prenorm")
EMPTY_SITE_RULES = ("drop", "center")
WELL_POOLS = ("tiles", "sites")
MAD_REFERENCES = ("all", "controls")
DEVICES = ("auto", "cpu", "cuda")
PRECISION_CHOICES = (AUTO, *DTYPES)
ALL_METHODS = "all"
DEFAULT_NUM_WORKERS = 6
READER_THREADS_PER_CPU = 4  # reader threads mostly wait on the disk (memory-mapped reads), so a few per CPU pay off
IN_MEMORY = "<in-memory weights>"  # ckpt of a config used by embed_profiles around a live model (the probe)


@dataclass(frozen=True)
class InferenceConfig:
    """Every inference setting; field names are the flags' dest names, so run.json's "flags" keep their keys."""

    ckpt: str
    outdir: str
    model: str | None = None
    arch: str = "vit_small_patch16"
    valset: str = "data/JUMP_valset.csv"
    batch_size: int = 32
    num_workers: int = DEFAULT_NUM_WORKERS
    size: int = 224
    stride: int | None = None
    gpus: tuple[int, ...] | None = None
    norm_method: str = "spherize_mad_robustize"
    operation: str = "mean"
    l2norm: bool = False
    pool: str | None = None
    layers: tuple[int, ...] | None = None
    channels: tuple[str, ...] = tuple(DEFAULT_CHANNELS)
    intensity: str | None = None
    image_root: str | None = None
    platemap: str | None = None
    column_map: tuple[tuple[str, str], ...] = ()
    center_tiles: bool = False
    empty_sites: str = "drop"
    well_pool: str = "tiles"
    cell_factor: float = 0.7
    min_cell_fraction: float = 0.01
    crop_mode: str = "tiles"
    crop_size: int = 128
    locations: str | None = None
    edge_cells: str = "drop"
    max_cells: int | None = None
    controls: str = "auto"
    control_query: str | None = None
    norm_scope: str = "paper"
    batch_key: str = "batch"
    mad_reference: str = "all"
    device: str = "auto"
    precision: str = AUTO
    compile: bool = False
    resume: bool = False
    skip_bad_images: bool = False
    save_sites: bool = False
    save_cells: bool = False
    parquet: bool = False
    local_rank: int | None = None

    def __post_init__(self) -> None:
        for name in ("gpus", "layers", "channels"):  # lists from argparse become tuples: the config is hashable
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "column_map", column_pairs(self.column_map))
        object.__setattr__(self, "norm_method", canonical_method(self.norm_method))
        self._check()
        threads = cap_workers("--num_workers", self.num_workers, per_cpu=READER_THREADS_PER_CPU,
                              default=DEFAULT_NUM_WORKERS)
        object.__setattr__(self, "num_workers", threads)

    def _check(self) -> None:
        """Reject impossible values before any work starts, naming the flag."""
        if self.model is not None and self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r} is not one of {', '.join(MODELS)}")
        if self.operation not in OPERATIONS:
            raise ConfigError(f"--operation {self.operation!r} must be mean or median")
        if self.norm_method != ALL_METHODS:
            parse_chain(self.norm_method)  # a chain name or file: unknown steps are a ConfigError naming them
        if not self.batch_key:
            raise ConfigError("--batch-key must name a metadata column")
        if self.size < 1 or (self.stride is not None and self.stride < 1):
            raise ConfigError("--size and --stride must be positive")
        if self.batch_size < 1:
            raise ConfigError("--batch_size must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("--num_workers must be >= 0")
        for flag, value, allowed in (("--empty-sites", self.empty_sites, EMPTY_SITE_RULES),
                                     ("--well-pool", self.well_pool, WELL_POOLS),
                                     ("--norm-scope", self.norm_scope, SCOPES),
                                     ("--mad-reference", self.mad_reference, MAD_REFERENCES),
                                     ("--controls", self.controls, CONTROL_CHOICES),
                                     ("--device", self.device, DEVICES),
                                     ("--precision", self.precision, PRECISION_CHOICES)):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if self.pool is not None and self.pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.ckpt != IN_MEMORY and not Path(self.ckpt).is_file():
            raise ConfigError(f"--ckpt {self.ckpt}: no such file")
        if self.arch not in ARCHS:
            raise ConfigError(f"--arch {self.arch!r} is not one of {', '.join(sorted(ARCHS))}")
        if not math.isfinite(self.cell_factor) or self.cell_factor < 0:
            raise ConfigError(f"--cell-factor must be >= 0, got {self.cell_factor}")
        if not 0.0 <= self.min_cell_fraction <= 1.0:
            raise ConfigError(f"--min-cell-fraction is a fraction of tile pixels in [0, 1], "
                              f"got {self.min_cell_fraction}")
        if not self.channels or len(set(self.channels)) != len(self.channels):
            raise ConfigError(f"--channels must be distinct names, got {list(self.channels)}")
        if "DNA" not in self.channels:
            raise ConfigError(f"--channels {list(self.channels)} has no DNA channel, which the cell mask needs")
        self._check_crops()

    def _check_crops(self) -> None:
        """The single-cell flags: valid values, and none given where the crop mode ignores it."""
        for flag, value, allowed in (("--crop-mode", self.crop_mode, CROP_MODES),
                                     ("--edge-cells", self.edge_cells, EDGE_RULES)):
            if value not in allowed:
                raise ConfigError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        if int(self.crop_size) != self.crop_size or self.crop_size < 1:
            raise ConfigError(f"--crop-size must be a positive number of pixels, got {self.crop_size!r}")
        if self.max_cells is not None and self.max_cells < 1:
            raise ConfigError(f"--max-cells must be >= 1 (omit it for every cell), got {self.max_cells}")
        if self.locations is not None and not Path(self.locations).is_dir():
            raise ConfigError(f"--locations {self.locations}: no such folder "
                              "(expected <plate>/<well>-<site>-Nuclei.csv files)")
        if self.crop_mode == "tiles":
            given = [flag for flag, value in (("--locations", self.locations), ("--max-cells", self.max_cells),
                                              ("--save-cells", self.save_cells or None)) if value is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} only apply to --crop-mode cells")
        elif self.stride is not None or self.center_tiles:
            raise ConfigError("--stride and --center-tiles only apply to --crop-mode tiles (cells: --crop-size)")

    @classmethod
    def from_flags(cls, flags: argparse.Namespace | Mapping[str, Any]) -> InferenceConfig:
        """The config of parsed ``inference.py`` flags (unknown keys are an error, so a renamed flag cannot hide)."""
        values = dict(flags.items() if isinstance(flags, Mapping) else vars(flags).items())
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"inference: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def grid(self) -> TileGrid:
        """How sites are cut into tiles (``--size``, ``--stride``, ``--center-tiles``)."""
        return TileGrid(self.size, self.stride, self.center_tiles)

    @property
    def methods(self) -> list[str]:
        """The normalisation methods to write: one, or every method for ``--norm_method all``."""
        return list(NORM_METHODS) if self.norm_method == ALL_METHODS else [self.norm_method]

    def flags(self) -> dict[str, Any]:
        """The settings as plain JSON types, for run.json."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(value: Any) -> Any:
    """Tuples (also nested, as in column_map) as lists, the JSON form."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(InferenceConfig)
                            if f.default is not dataclasses.MISSING}
