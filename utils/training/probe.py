"""A live retrieval probe: during training, embed held-out labelled sites as inference would and score them.

Each probe runs the weights inference would use (``SSLMethod.inference_backbone``: DINO's teacher) through the
inference pipeline's own code (``utils.inference.embed_profiles``: tiles, the cell rule, site and well pooling, the
default normalisation) and scores the wells with evaluate.py's own mAP (``utils.evaluation.retrieval_maps``), so a
probe figure is the figure ``inference.py`` + ``evaluate.py`` would give for that checkpoint. The probe before the
first step is the run's own random-initialisation baseline.

The probe is computed once, on rank 0, under ``frozen_state`` (eval mode, no gradients, buffers and RNG restored),
and broadcast, so every rank logs the same figures and the training trajectory is the one a run without a probe
follows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from data.intensity import IntensityNorm
from data.schema import INFERENCE_REQUIRED, load_site_table
from models.backbones import embed
from models.checkpoints import DEFAULT_POOL
from utils import distributed
from utils.errors import ConfigError, DataError
from utils.evaluation import EvalConfig, map_columns, representation_from_frame, retrieval_maps
from utils.inference import IN_MEMORY, EmbedContext, InferenceConfig, embed_profiles, make_context
from utils.training.validation import frozen_state

DEFAULT_TILE = 128  # the probe's tile size; 224 (inference's default) costs 3x more and needs larger sites


@dataclass(frozen=True)
class ProbeConfig:
    """Where the probe sites are and how they are tiled; everything else is inference's and evaluate.py's default."""

    csv: Path
    every: int = 1
    size: int = DEFAULT_TILE
    stride: int | None = None
    batch_size: int = 8
    image_root: str | None = None
    platemap: str | None = None
    column_map: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ConfigError(f"--probe_every must be >= 1, got {self.every}")
        if self.size < 1 or (self.stride is not None and self.stride < 1) or self.batch_size < 1:
            raise ConfigError("--probe_size, --probe_stride and --probe_batch_size must be positive")

    def due(self, finished_epochs: int, total_epochs: int) -> bool:
        """Probe before the first step, every ``every`` finished epochs, and after the last one."""
        return finished_epochs == 0 or finished_epochs % self.every == 0 or finished_epochs == total_epochs


class Probe:
    """Embeds the probe plate(s) with the current weights and returns ``probe_target_map``/``probe_replicate_map``."""

    def __init__(self, cfg: ProbeConfig, method: str, channels: tuple[str, ...], norm: IntensityNorm,
                 device: torch.device) -> None:
        self.cfg, self.method, self.channels, self.device = cfg, method, tuple(channels), device
        self.table = load_site_table(cfg.csv, cfg.image_root, self.channels, required=INFERENCE_REQUIRED,
                                     platemap=cfg.platemap, column_map=cfg.column_map)
        if "target" not in self.table.columns or self.table["target"].isna().all():
            print(f"training probe: {cfg.csv} has no target labels; probe_target_map is NaN and the best-probe "
                  "checkpoint is chosen by replicate mAP", flush=True)
        if "DNA" not in self.channels:
            raise ConfigError(f"--channels {list(self.channels)} has no DNA channel, which the probe's cell rule needs")
        # inference's defaults for everything else, so the probe is inference
        self.inference = InferenceConfig(ckpt=IN_MEMORY, outdir="-", valset=str(cfg.csv), size=cfg.size,
                                         stride=cfg.stride, batch_size=cfg.batch_size, num_workers=0,
                                         channels=self.channels)
        self.norm = norm.select(list(self.channels))

    def context(self, backbone: nn.Module) -> EmbedContext:
        """An inference embedding context around an in-memory backbone (no checkpoint file involved)."""
        pool = DEFAULT_POOL[self.method]

        def embed_fn(x: torch.Tensor) -> torch.Tensor:
            return embed(backbone, x, pool, None)

        return make_context(self.inference, embed_fn, self.norm, self.device, self.channels, fingerprint={})

    def score_wells(self, wells: pd.DataFrame) -> dict[str, float]:
        """evaluate.py's replicate and target mAP of a normalised well table."""
        return score_wells(wells, self.cfg.csv)

    def run(self, model: nn.Module) -> dict[str, float]:
        """Embed and score the probe sites with the model's inference weights, leaving the model as it was."""
        t0 = time.perf_counter()
        with frozen_state(model, self.device):
            wells = embed_profiles(self.context(model.inference_backbone()), self.table, self.inference)
        out = self.score_wells(wells)
        out["probe_seconds"] = time.perf_counter() - t0
        return out


def score_wells(wells: pd.DataFrame, source: Path) -> dict[str, float]:
    """``probe_target_map`` and ``probe_replicate_map`` of any normalised well table (embeddings or CellProfiler
    features), with evaluate.py's defaults: DMSO controls, copairs-style mAP."""
    cfg = EvalConfig(input_dir=source.parent, out_dir=source.parent, progress=False, figures=False)
    rep = representation_from_frame("probe", wells, cfg, source)
    cols = map_columns(retrieval_maps(rep, cfg), cfg.label)
    return {"probe_target_map": cols[f"{cfg.label}_mAP"], "probe_replicate_map": cols["replicate_mAP"]}


def run_probe(probe: Probe | None, model: nn.Module, info: distributed.DistInfo) -> dict[str, float]:
    """Rank 0 probes and every rank receives the figures (or rank 0's error, raised everywhere)."""
    result: dict[str, Any] = {}
    if info.is_main:
        if probe is None:
            raise RuntimeError("run_probe: rank 0 has no Probe")
        try:
            result = probe.run(model)
        except (DataError, ConfigError) as exc:
            result = {"error": f"training probe: {exc}"}
    if distributed.is_distributed():
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    if "error" in result:
        raise DataError(result["error"])
    return {k: float(v) for k, v in result.items()}


def better(new: dict[str, float], best: dict[str, float] | None) -> bool:
    """A probe beats the best so far on target mAP (NaN never wins, and any finite value beats a NaN best).

    A probe plate without target labels has a NaN target mAP at every epoch; replicate mAP then decides, so the
    best-probe checkpoint still means something on real plates, which rarely annotate targets.
    """
    key = "probe_target_map"
    if not np.isfinite(new.get(key, np.nan)) and (best is None or not np.isfinite(best.get(key, np.nan))):
        key = "probe_replicate_map"
    value = new.get(key, float("nan"))
    previous = float("nan") if best is None else best.get(key, float("nan"))
    return bool(np.isfinite(value) and not value <= previous)
