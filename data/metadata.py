"""Per-site metadata as users have it: JUMP / Cell Painting Gallery names, ``--map`` renames and a separate plate map.

Real plates rarely carry the paper's column names. JUMP's ``load_data.csv`` has ``Metadata_Plate`` / ``Metadata_Well``
and no perturbation at all; the perturbations live in a plate map keyed by plate and well (or by well alone, when
one map serves every plate). This module turns both into the internal names (``batch``, ``plate``, ``well``,
``field``, ``perturbation_id``, ``target``, ``control_type``, ...) before the site table is validated, so every
pipeline sees the same schema whatever the source. DataFrame in, DataFrame out; every problem names the file and
the column or wells to fix.
"""

from __future__ import annotations

import csv
import gzip
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from utils.errors import ConfigError, DataError

# Accepted source names per internal column, in priority order; the internal name itself always wins. Perturbation
# ids prefer unique identifiers (JUMP's JCP2022, the Broad sample id, the InChIKey) over the human-readable name.
ALIASES: dict[str, tuple[str, ...]] = {
    "batch": ("Metadata_Batch", "Metadata_batch"),
    "plate": ("Metadata_Plate", "Metadata_plate"),
    "well": ("Metadata_Well", "Metadata_well", "well_position", "Metadata_well_position"),
    "field": ("Metadata_Site", "Metadata_Field", "Metadata_site", "Metadata_field"),
    "perturbation_id": (
        "Metadata_perturbation_id",
        "Metadata_JCP2022",
        "Metadata_broad_sample",
        "broad_sample",
        "Metadata_InChIKey",
        "Metadata_pert_iname",
        "pert_iname",
    ),
    "target": ("Metadata_target", "Metadata_Target", "Metadata_moa"),
    "control_type": ("Metadata_control_type", "Metadata_ControlType"),
    "pert_type": ("Metadata_pert_type",),
    "gene_group": ("Metadata_gene_group",),
}
NEGCON = "negcon"
DMSO = "DMSO"
PLATE_KEYS: tuple[str, ...] = ("plate", "well")
MAP_SUFFIXES_TSV: tuple[str, ...] = (".tsv", ".txt")
SHOWN = 5


def column_pairs(value: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
    """``--map`` pairs as a tuple (hashable, for frozen configs); a source named twice is ambiguous, so an error."""
    if value is None:
        return ()
    pairs = tuple((str(s), str(d)) for s, d in (value.items() if isinstance(value, Mapping) else value))
    sources = [s for s, _ in pairs]
    twice = sorted({s for s in sources if sources.count(s) > 1})
    if twice:
        raise ConfigError(f"--map names the source column {twice[0]!r} twice")
    return pairs


def apply_column_map(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], source: str,
                     strict: bool = True) -> pd.DataFrame:
    """Copy each ``--map`` SRC column onto DST (the original stays), refusing to overwrite an existing column.

    ``strict=False`` skips sources the table lacks: one ``--map`` serves a site CSV and its plate map, and the
    caller then checks that each source is in one of them (``check_sources``).
    """
    if not pairs:
        return df
    df = df.copy()
    for src, dst in pairs:
        if src not in df.columns and not strict:
            continue
        if src not in df.columns:
            raise DataError(f"{source}: --map source column {src!r} not found (columns: {_some(df.columns)})")
        if dst in df.columns and dst != src:
            raise DataError(f"{source}: --map {src}={dst} would overwrite the existing column {dst!r}")
        df[dst] = df[src]
    return df


def check_sources(pairs: Sequence[tuple[str, str]], tables: Mapping[str, pd.DataFrame]) -> None:
    """Every ``--map`` source must be a column of at least one of ``tables`` (file name -> table)."""
    for src, _ in pairs:
        if not any(src in t.columns for t in tables.values()):
            raise DataError(f"--map source column {src!r} not found in {' or '.join(tables)}")


def map_metadata(df: pd.DataFrame) -> pd.DataFrame:
    """Copy JUMP / Cell Painting Gallery metadata columns under the internal names, keeping the originals.

    The first alias present (``ALIASES`` order) fills an internal column the table lacks; an internal column that
    exists is never replaced, so the paper's own names win.
    """
    out = df.copy()
    for name, aliases in ALIASES.items():
        if name in out.columns:
            continue
        for alias in aliases:
            if alias in out.columns:
                out[name] = out[alias]
                break
    return out


def fill_negcon_perturbation(df: pd.DataFrame) -> pd.DataFrame:
    """An empty perturbation in a negcon well is DMSO, as in JUMP and LINCS plate maps (which leave it blank)."""
    if "control_type" not in df.columns:
        return df
    pert = df["perturbation_id"] if "perturbation_id" in df.columns else pd.Series(np.nan, index=df.index)
    empty = pert.isna() | (pert.astype(str).str.strip() == "")
    fill = empty & (df["control_type"].astype(str).str.strip().str.lower() == NEGCON)
    if not fill.any():
        return df
    out = df.copy()
    out["perturbation_id"] = pert.astype(object).where(~fill, DMSO)
    return out


def read_platemap(path: str | os.PathLike[str], pairs: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """A plate map (CSV, or tab-separated .tsv/.txt as LINCS ships them) with internal names, every cell as text.

    It must give ``well`` (under any alias) and may give ``plate``; duplicated headers or (plate, well) keys are
    errors naming them, because a map that says two things about one well would silently pick one.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: plate map not found")
    sep = "\t" if path.suffix.lower() in MAP_SUFFIXES_TSV else ","
    check_unique_header(path, "plate map", sep)
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty plate map, expected a header and one row per well") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable plate map ({str(exc).splitlines()[0]})") from None
    if table.empty:
        raise DataError(f"{path}: plate map has a header but no wells")
    table = map_metadata(apply_column_map(table, pairs, str(path), strict=False))
    if "well" not in table.columns:
        raise DataError(f"{path}: plate map has no well column (give 'well', 'Metadata_Well' or --map SRC=well)")
    keys = [k for k in PLATE_KEYS if k in table.columns]
    empty = table[keys].isna().any(axis=1) | (table[keys].astype(str).apply(lambda c: c.str.strip()) == "").any(axis=1)
    if empty.any():
        raise DataError(f"{path}: empty {'/'.join(keys)} at line(s) {_lines(np.flatnonzero(empty.to_numpy()))}")
    dup = table.duplicated(subset=keys, keep=False)
    if dup.any():
        shown = table.loc[dup, keys].drop_duplicates().astype(str).agg("/".join, axis=1).tolist()
        raise DataError(f"{path}: {len(shown)} well(s) listed more than once: {_some(shown)}")
    return table


def header_names(path: str | os.PathLike[str], sep: str = ",") -> list[str]:
    """The header row as written, because pandas renames a repeated column to ``name.1`` and hides the clash.

    Reads CSV/TSV (``.gz`` through gzip) and parquet (its schema); an empty text file raises EmptyDataError.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: only parquet inputs need it

        return [str(n) for n in pq.read_schema(path).names]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
        row = next(csv.reader(fh, delimiter=sep), None)
    if row is None:
        raise pd.errors.EmptyDataError("no header")
    return [c.strip() for c in row]


def repeated_names(names: Sequence[object]) -> list[str]:
    """Names listed more than once, in first-seen order; blank names (pandas index columns) are ignored."""
    counts = Counter(str(n).strip() for n in names if str(n).strip())
    return [name for name, k in counts.items() if k > 1]


def repeated_names_message(source: object, what: str, repeated: Sequence[str]) -> str:
    """The one wording every reader uses for a header that repeats a column."""
    shown = ", ".join(repr(r) for r in repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
    return (f"{source}: the {what} header lists column(s) {shown} more than once; pandas would silently rename the "
            "copies, so remove or rename them")


def check_unique_header(path: str | os.PathLike[str], what: str, sep: str = ",") -> None:
    """Raise a one-line DataError naming ``path`` and its repeated columns, read from the raw header.

    A header that cannot be read at all is left to the caller's own read, which names the real problem.
    """
    try:
        names = header_names(path, sep)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, pd.errors.EmptyDataError):
        return
    repeated = repeated_names(names)
    if repeated:
        raise DataError(repeated_names_message(path, what, repeated))


def join_platemap(sites: pd.DataFrame, platemap: pd.DataFrame, source: str) -> pd.DataFrame:
    """Add the plate map's per-well columns to every site, on (plate, well), or on well when the map has no plate.

    A site well the map lacks is an error naming it (its perturbation would be unknown). Columns the map shares
    with the site table are taken from the map, with a warning naming them, because the map is the annotation.
    """
    keys = [k for k in PLATE_KEYS if k in platemap.columns]
    absent = [k for k in keys if k not in sites.columns]
    if absent:
        raise DataError(f"{source}: the site table has no {', '.join(absent)} column to join the plate map on")
    site_keys = sites[keys].astype(str)
    map_keys = platemap[keys].astype(str)
    known = pd.MultiIndex.from_frame(map_keys)
    wanted = pd.MultiIndex.from_frame(site_keys)
    missing = wanted[~wanted.isin(known)].unique()
    if len(missing):
        named = ["/".join(k) for k in missing]
        hint = _padding_hint(site_keys["well"], map_keys["well"])
        raise DataError(f"{source}: {len(named)} well(s) of the site table are not in the plate map: "
                        f"{_some(named)}{hint}")
    key_aliases = {a for k in keys for a in ALIASES.get(k, ())}
    extra = platemap.drop(columns=[c for c in platemap.columns if c in keys or c in key_aliases])
    shared = [c for c in extra.columns if c in sites.columns]
    if shared:
        warnings.warn(f"{source}: plate map replaces the site table's column(s) {', '.join(shared)}",
                      UserWarning, stacklevel=3)
    position = pd.MultiIndex.from_frame(map_keys).get_indexer(wanted)
    joined = extra.iloc[position].set_axis(sites.index)
    return pd.concat([sites.drop(columns=shared), joined], axis=1)


def _padding_hint(site_wells: pd.Series, map_wells: pd.Series) -> str:
    """Point at A1 / A01 spelling differences, the usual reason a plate map matches nothing."""
    def canon(w: str) -> str:
        letters = w.rstrip("0123456789")
        digits = w[len(letters):]
        return f"{letters.upper()}{int(digits):02d}" if digits else w

    site = {canon(w) for w in site_wells.unique()}
    mapped = {canon(w) for w in map_wells.unique()}
    if site & mapped and not set(site_wells.unique()) & set(map_wells.unique()):
        return " (the two tables spell wells differently, e.g. A1 and A01; use one spelling)"
    return ""


def _lines(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(i) + 2) for i in rows[:SHOWN])
    return shown + (f" and {len(rows) - SHOWN} more" if len(rows) > SHOWN else "")


def _some(items: Iterable[object]) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")
