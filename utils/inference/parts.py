"""Per-plate intermediate results on disk (``<outdir>/parts``): written atomically, npz first and the json sidecar
last, so a plate is done exactly when its sidecar exists; ``--resume`` reuses a part only when its fingerprint
(checkpoint hash, tiling, pooling, channels, sites, ...) matches the run's."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.errors import ConfigError, DataError
from utils.fileio import atomic_path, write_json_atomic
from utils.inference.cells import PlateCells, pool_plate_cells
from utils.inference.config import InferenceConfig
from utils.inference.plates import PlateResult, PlateTiles, pool_plate

PARTS_DIR = "parts"
PART_FORMAT = "cellpaint-ssl/inference-part/1"
CELL_ARRAYS = ("cell_rows", "cell_yx", "cell_emb", "cell_centre")  # only in parts of --crop-mode cells --save-cells


def part_name(plate: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(plate))[:60]
    return f"{safe}-{hashlib.sha1(str(plate).encode()).hexdigest()[:8]}"


def save_part(directory: Path, plate: str, result: PlateResult, fingerprint: dict[str, Any]) -> None:
    name = part_name(plate)
    arrays = {k: getattr(result, k) for k in ("site_rows", "site_emb", "site_valid", "well_rows", "well_emb",
                                                "well_valid")}
    arrays |= {k: getattr(result, k) for k in CELL_ARRAYS if getattr(result, k) is not None}
    with atomic_path(directory / f"{name}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    write_json_atomic(directory / f"{name}.json", {"format": PART_FORMAT, "fingerprint": fingerprint,
                                                   "report": result.report})


def load_part(
    directory: Path, plate: str, arrays: bool = True, sites: bool = True, cells: bool = False
) -> tuple[PlateResult | None, dict[str, Any]] | None:
    """A finished plate (None when absent); site and cell embeddings only when asked, so merging stays small."""
    name = part_name(plate)
    meta_path, npz_path = directory / f"{name}.json", directory / f"{name}.npz"
    if not meta_path.is_file() or not npz_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not arrays:
            return None, meta
        with np.load(npz_path, allow_pickle=False) as z:
            loaded = {k: z[k] if sites or not k.startswith("site_") else np.zeros(0) for k in z.files
                      if cells or k not in CELL_ARRAYS}
        result = PlateResult(**loaded, report=meta["report"])
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DataError(f"{npz_path}: unreadable intermediate result ({exc}); delete it and rerun") from None
    return result, meta


def check_resumed(meta: dict[str, Any], fingerprint: dict[str, Any], path: Path) -> None:
    old = meta.get("fingerprint", {})
    changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
    if changed:
        raise ConfigError(
            f"--resume: {path} was computed with different {', '.join(changed)}; use a new --outdir or drop --resume"
        )


def pool_and_save(
    parts: Path, plate_table: pd.DataFrame, tiles: PlateTiles | PlateCells, cfg: InferenceConfig,
    fingerprint: dict[str, Any], rank: int,
) -> None:
    """Runs on a helper thread, so pooling and writing one plate overlaps with embedding the next."""
    if isinstance(tiles, PlateCells):
        result = pool_plate_cells(plate_table, tiles, cfg)
    else:
        result = pool_plate(plate_table, tiles, cfg)
    result.report["rank"] = rank
    save_part(parts, str(plate_table["plate"].iloc[0]), result, fingerprint)
