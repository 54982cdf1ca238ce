"""Correct a precomputed well table: read any ``well_features.csv``, run a normalisation chain, write it back out.

This is how published embeddings (the paper's ``emb0..`` tables, Bray-style ``emb_0000`` ones, CellProfiler
profiles) get the same chains inference and the handcrafted baseline run, without re-embedding anything:
``python -m utils.profiles -i WELLS -o OUTDIR --norm_method CHAIN``. ``OUTDIR/well_features.csv`` comes first and
``OUTDIR/run.json`` last, both written atomically, so a folder with a run.json is complete.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.metadata import (
    apply_column_map,
    check_unique_header,
    column_pairs,
    fill_negcon_perturbation,
    map_metadata,
)
from utils.errors import ConfigError, DataError
from utils.fileio import atomic_path
from utils.profiles.chain import ChainContext, apply_chain, chain_name, parse_chain, with_overrides
from utils.profiles.controls import CONTROL_CHOICES, resolve_control_query
from utils.profiles.features import detect_features, finite_features
from utils.profiles.normalize import SCOPES, VARIANCE_THRESHOLD
from utils.rundir import Transaction, output_run

WELL_FILE = "well_features.csv"
READ_SUFFIXES: tuple[str, ...] = (".csv", ".gz", ".parquet", ".tsv")


@dataclass(frozen=True)
class CorrectConfig:
    """Every setting of ``python -m utils.profiles``; built from the flags or from Python, validated here."""

    input: str
    outdir: str
    norm_method: str
    batch_key: str = "batch"
    controls: str = "auto"
    control_query: str | None = None
    column_map: tuple[tuple[str, str], ...] = ()
    norm_scope: str = "paper"
    mad_reference: str = "all"
    l2norm: bool = False
    variance_threshold: float = VARIANCE_THRESHOLD
    seed: int = 0
    parquet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "column_map", column_pairs(self.column_map))
        parse_chain(self.norm_method)
        if self.controls not in CONTROL_CHOICES:
            raise ConfigError(f"--controls {self.controls!r} is not one of {', '.join(CONTROL_CHOICES)}")
        if self.norm_scope not in SCOPES:
            raise ConfigError(f"--norm-scope {self.norm_scope!r} is not one of {', '.join(SCOPES)}")
        if self.mad_reference not in ("all", "controls"):
            raise ConfigError(f"--mad-reference {self.mad_reference!r} is not one of all, controls")
        if not self.batch_key:
            raise ConfigError("--batch-key must name a metadata column")
        if not np.isfinite(self.variance_threshold) or self.variance_threshold < 0:
            raise ConfigError(f"--variance-threshold must be >= 0, got {self.variance_threshold}")
        src = Path(self.input)
        if not src.is_file():
            raise ConfigError(f"-i {self.input}: no such file")
        out = Path(self.outdir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"-o {self.outdir}: exists and is not a folder")
        if (out / self.output_name).resolve() == src.resolve():
            raise ConfigError(f"-o {self.outdir}: would overwrite the input {self.input}; choose another folder")

    @property
    def output_name(self) -> str:
        """well_features.csv, or .parquet with --parquet."""
        return "well_features.parquet" if self.parquet else WELL_FILE


OUTPUT_NAMES = ("well_features.csv", "well_features.parquet", "run.json")


def read_wells(path: Path, pairs: tuple[tuple[str, str], ...] = ()) -> pd.DataFrame:
    """A well table from CSV/TSV/parquet with metadata under the internal names (``--map``, then JUMP aliases)."""
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            sep = "\t" if path.suffix == ".tsv" or path.name.endswith(".tsv.gz") else ","
            check_unique_header(path, "well table", sep)
            df = pd.read_csv(path, sep=sep, low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the well table ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if df.columns.duplicated().any():
        raise DataError(f"{path}: duplicated column {df.columns[df.columns.duplicated()][0]!r}")
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed: ")])
    df = map_metadata(apply_column_map(df, pairs, str(path)))
    return fill_negcon_perturbation(df) if "perturbation_id" in df.columns else df


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("numpy", "pandas", "pycytominer", "harmonypy", "scikit-learn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def correct_profiles(cfg: CorrectConfig) -> dict[str, Any]:
    """Read ``cfg.input``, run the chain, and swap ``OUTDIR/well_features.csv`` and ``OUTDIR/run.json`` in together.

    The output folder is locked for the run (``utils.rundir``); a failure leaves an earlier run's results as they were.

    Returns
    -------
    dict
        What run.json holds: input, chain, control query, wells and features in and out, one record per step,
        the settings and versions, and the wall time.
    """
    with output_run(cfg.outdir) as tx:
        return _correct(cfg, tx)


def _correct(cfg: CorrectConfig, tx: Transaction) -> dict[str, Any]:
    """The run inside its locked folder: read, correct, stage, commit."""
    start = time.perf_counter()
    src = Path(cfg.input)
    df = read_wells(src, cfg.column_map)
    features, kind = detect_features(list(df.columns), str(src))
    meta = [c for c in df.columns if c not in features]
    finite_features(df, features, str(src))
    if df.empty:
        raise DataError(f"{src}: no rows")
    query = resolve_control_query(df, cfg.controls, cfg.control_query)
    steps = with_overrides(parse_chain(cfg.norm_method), cfg.norm_scope, cfg.mad_reference)
    ctx = ChainContext(query, batch_key=cfg.batch_key, variance_threshold=cfg.variance_threshold, seed=cfg.seed)
    result = apply_chain(df, features, meta, steps, ctx, l2norm=cfg.l2norm)
    target = tx.folder / cfg.output_name
    with atomic_path(tx.path(cfg.output_name)) as tmp:
        if cfg.parquet:
            result.profiles.to_parquet(tmp, index=False)
        else:
            result.profiles.to_csv(tmp, index=False)
    run = {
        "status": "complete",
        "input": str(src.resolve()),
        "output": str(target),
        "chain": chain_name(steps),
        "norm_method": cfg.norm_method,
        "feature_kind": kind,
        "control_query": query,
        "n_wells": int(len(result.profiles)),
        "n_controls": int(result.profiles.query(query, engine="python").shape[0]),
        "n_features_in": len(features),
        "n_features": len(result.features),
        "steps": result.records,
        "settings": asdict(cfg),
        "versions": _versions(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    tx.commit(run, stale=OUTPUT_NAMES)
    return run
