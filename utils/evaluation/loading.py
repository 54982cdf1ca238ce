"""Find the representation folders, read their well tables, and reject what would give wrong numbers.

Every check happens here, before any metric runs, so a bad table fails with the file, column and row to fix rather
than as a NaN (or a wrong number) in the results.
"""

from __future__ import annotations

import csv
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from data.metadata import apply_column_map as apply_explicit_map
from data.metadata import header_names, repeated_names, repeated_names_message
from utils.errors import DataError
from utils.evaluation.config import DEFAULT_CONTROLS, METADATA_PRESETS, EvalConfig
from utils.profiles.features import detect_features, finite_features
from utils.rundir import RUN_FILE, completed_run

WELL_FILES = ("well_features.csv", "well_features.csv.gz", "well_features.parquet")
SKIP_DIRS = {"figures"}
WELL_KEY = ("plate", "well")  # what one well is, across representations of the same plates


@dataclass
class Representation:
    """One folder's wells: metadata (paper names), feature matrix, and which feature set it uses."""

    name: str
    path: Path
    meta: pd.DataFrame
    x: np.ndarray
    features: list[str]
    kind: str


def discover_representations(root: Path) -> list[tuple[str, Path]]:
    """Every subfolder except figures/ and hidden ones must hold a well_features.csv; say which does not.

    A folder this project wrote is trusted through its run.json only (``utils.rundir.completed_run``): a run killed
    while swapping its tables in, or a run.json that is not "complete", is an error, because the tables beside it
    may mix two runs. Folders without run.json (published embeddings, other tools) are read as they are.
    """
    if not root.is_dir():
        raise DataError(f"{root}: input directory does not exist (check -b/--basedir and -i/--input)")
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name in SKIP_DIRS or sub.name.startswith("."):
            continue
        files = [sub / f for f in WELL_FILES if (sub / f).is_file()]
        if not files:
            raise DataError(f"{sub}: no well_features.csv (every folder in {root} except figures/ is a representation)")
        run = completed_run(sub)
        if run is not None and run.get("status", "complete") != "complete":
            raise DataError(f"{sub / RUN_FILE}: status {run.get('status')!r}, not 'complete'; rerun it first")
        found.append((sub.name, files[0]))
    if not found:
        raise DataError(f"{root}: no representation folders with a well_features.csv")
    return found


def apply_column_map(df: pd.DataFrame, mapping: Mapping[str, str], preset: str, source: str) -> pd.DataFrame:
    """Copy CellProfiler/pycytominer metadata columns onto the paper's names (explicit map first, then preset).

    ``preset`` is a key of METADATA_PRESETS (EvalConfig checks it). Columns are copied, not renamed, so the
    original names stay available to --replicate-diffby.
    """
    df = apply_explicit_map(df, tuple(mapping.items()), source).copy()
    for src, dst in METADATA_PRESETS[preset].items():
        if src in df.columns and dst not in df.columns:
            df[dst] = df[src]
    return df


def required_columns(cfg: EvalConfig) -> list[str]:
    """perturbation_id, batch and well (plus control_type for ORF sets); the label column is optional, since most
    real plates annotate no target: without it the label-level metrics are skipped, with a note."""
    cols = ["perturbation_id", "batch", "well"]
    return cols + ["control_type"] if cfg.orf else cols


def _some(values: Iterable[object], n: int = 5) -> str:
    """The first ``n`` values joined by commas, with an ellipsis when there are more (for one-line errors)."""
    values = [str(v) for v in values]
    return ", ".join(values[:n]) + (", ..." if len(values) > n else "")


def check_unique_columns(columns: Sequence[object], source: object) -> None:
    """Reject repeated column names in a frame or a raw header (``data.metadata`` words the error for every reader)."""
    repeated = repeated_names(columns)
    if repeated:
        raise DataError(repeated_names_message(source, "well table", repeated))


def check_unique_wells(df: pd.DataFrame, source: object) -> None:
    """Reject a (plate, well) that appears on more than one row.

    A repeated well is its own nearest neighbour, which inflates every accuracy and mAP (a site-level or
    concatenated table looks like a well table otherwise). Tables without a plate column cannot be checked:
    one well name recurs on every plate of a batch.
    """
    if "plate" not in df.columns:
        return
    keys = df[list(WELL_KEY)].astype(str)
    extra = keys.duplicated()
    if extra.any():
        pairs = keys[keys.duplicated(keep=False)].drop_duplicates()
        first = _some((f"{p}/{w}" for p, w in pairs.itertuples(index=False)), 3)
        raise DataError(f"{source}: {int(extra.sum())} duplicated (plate, well) row(s) over {len(pairs)} well(s), "
                        f"first {first}: each well must appear once (aggregate sites to wells first)")


def load_representation(name: str, path: Path, cfg: EvalConfig) -> Representation:
    """Read one well table, map metadata names, pick features, and reject what would give wrong numbers."""
    kind = "parquet file" if path.suffix == ".parquet" else "CSV"
    errors = (OSError, ValueError, csv.Error, pd.errors.ParserError, UnicodeDecodeError)
    try:
        header = header_names(path)
    except errors as exc:
        raise DataError(f"{path}: cannot read {kind} ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    check_unique_columns(header, path)  # before reading: pandas renames CSV copies, and pyarrow fails on them
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)
    except errors as exc:
        raise DataError(f"{path}: cannot read {kind} ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed: ")])
    df = apply_column_map(df, cfg.column_map, cfg.metadata_preset, str(path))
    return representation_from_frame(name, df, cfg, path)


def representation_from_frame(name: str, df: pd.DataFrame, cfg: EvalConfig, path: Path) -> Representation:
    """Check an in-memory well table (paper metadata names) and split it into metadata and features.

    ``load_representation`` reads files through this, and the training probe hands it the frame it embedded, so
    both are checked and scored by the same code.
    """
    check_unique_columns(list(df.columns), path)
    missing = [c for c in required_columns(cfg) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            "(map CellProfiler names with --map Metadata_X=name or --metadata-preset pycytominer)"
        )
    if df.empty:
        raise DataError(f"{path}: no rows")
    features, kind = detect_features(list(df.columns), str(path))
    finite_features(df, features, str(path))
    for col in ("perturbation_id", "batch", "well"):
        if df[col].isna().any():
            first = int(np.argmax(df[col].isna().to_numpy())) + 2
            raise DataError(f"{path}: column {col} has missing values (first at CSV row {first})")
    check_unique_wells(df, path)
    meta = df.drop(columns=features).reset_index(drop=True)
    if cfg.label not in meta.columns:
        meta[cfg.label] = pd.Series(pd.NA, index=meta.index, dtype="string")
    x = df[features].to_numpy(dtype=np.float64)
    return Representation(name=name, path=path, meta=meta, x=x, features=features, kind=kind)


def check_controls(rep: Representation, cfg: EvalConfig) -> None:
    """Reject a control selection that selects nothing, or a ``--controls`` value that matches no well.

    Controls are ``perturbation_id`` in ``cfg.controls``, or ``control_type == negcon`` where annotated
    (``utils.profiles.controls.ids_query``). A misspelt id used to be accepted: the negcon wells (or none at all)
    stood in for it and the run reported the default's numbers. The default id (DMSO) may be absent when
    ``control_type`` marks the negcon wells, as in ORF sets.
    """
    ids = rep.meta["perturbation_id"].astype(str)
    present = set(ids)
    common = ids.value_counts().index  # the most frequent first: controls usually are
    absent = [c for c in cfg.controls if str(c) not in present]
    negcon = "control_type" in rep.meta.columns and bool((rep.meta["control_type"].astype(str) == "negcon").any())
    if absent and (tuple(cfg.controls) != DEFAULT_CONTROLS or not negcon):
        raise DataError(f"{rep.path}: --controls {' '.join(map(str, absent))} match(es) no well's perturbation_id "
                        f"(values present include {_some(common)})")


def _well_index(rep: Representation) -> pd.MultiIndex:
    """The (plate, well) keys of a representation's rows, as text, so 1 and "1" name the same plate."""
    return pd.MultiIndex.from_frame(rep.meta[list(WELL_KEY)].astype(str))


WellCounts = dict[str, dict[str, int | None]]  # per representation: n_wells_input, n_wells_dropped_to_common


def align_wells(reps: list[Representation], cfg: EvalConfig) -> tuple[list[Representation], WellCounts]:
    """Restrict several representations to the (plate, well) keys they all have, so their numbers are comparable.

    Every metric depends on which wells take part (a lost well removes a neighbour and a replicate), so scoring
    56 wells against 36 ranks the sets, not the representations. With ``cfg.allow_different_wells`` each keeps
    its own wells and a warning names the counts.

    Returns
    -------
    tuple
        The representations (rows outside the shared keys removed, order kept) and, per name, ``n_wells_input``
        (rows read, controls included) and ``n_wells_dropped_to_common`` (rows removed here; None when some table
        has no plate column, so nothing could be matched). DataError when no key is shared, or when the counts
        differ and some table has no plate column to match wells by.
    """
    counts: WellCounts = {r.name: {"n_wells_input": len(r.meta), "n_wells_dropped_to_common": 0} for r in reps}
    if len(reps) < 2:
        return reps, counts
    sizes = ", ".join(f"{r.name} {len(r.meta)}" for r in reps)
    no_plate = [r.name for r in reps if "plate" not in r.meta.columns]
    if no_plate:
        if len({len(r.meta) for r in reps}) == 1 or cfg.allow_different_wells:
            print(f"evaluate: {', '.join(no_plate)} without a plate column: wells cannot be matched, so each "
                  f"representation is scored on its own wells ({sizes})", file=sys.stderr)
            for c in counts.values():
                c["n_wells_dropped_to_common"] = None  # unknown, not zero: nothing was matched
            return reps, counts
        raise DataError(f"cannot match wells across representations: {', '.join(no_plate)} without a plate column "
                        f"and the well counts differ ({sizes}); add one (e.g. --map Metadata_Plate=plate) or pass "
                        "--allow-different-wells")
    keys = [_well_index(r) for r in reps]
    common = keys[0]
    for k in keys[1:]:
        common = common.intersection(k)
    if cfg.allow_different_wells:
        if any(len(k) != len(common) for k in keys):
            warnings.warn(f"--allow-different-wells: representations scored on different wells ({sizes}; "
                          f"{len(common)} shared), so their numbers are not comparable", stacklevel=2)
        return reps, counts
    if len(common) == 0:
        first = "; ".join(f"{r.name} e.g. {'/'.join(k[0])}" for r, k in zip(reps, keys))
        raise DataError(f"no (plate, well) is shared by all representations ({sizes} wells; {first}): were they "
                        "computed on the same plates? (--allow-different-wells scores each on its own)")
    aligned = []
    for rep, k in zip(reps, keys):
        keep = k.isin(common)
        counts[rep.name]["n_wells_dropped_to_common"] = int((~keep).sum())
        aligned.append(rep if keep.all() else
                       replace(rep, meta=rep.meta[keep].reset_index(drop=True), x=rep.x[keep]))
    lost = ", ".join(f"{n} lost {c['n_wells_dropped_to_common']}" for n, c in counts.items())
    print(f"evaluate: comparing {len(reps)} representations on the {len(common)} wells they share ({lost})",
          file=sys.stderr)
    return aligned, counts
