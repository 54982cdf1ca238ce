"""One site table for both CSV conventions (the paper's merged files and JUMP load_data), validated in one pass."""

from __future__ import annotations

import math
import os
import stat
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data.metadata import (
    ALIASES,
    apply_column_map,
    check_sources,
    check_unique_header,
    fill_negcon_perturbation,
    join_platemap,
    map_metadata,
    read_platemap,
)
from utils.errors import DataError

DEFAULT_CHANNELS: tuple[str, ...] = ("Mito", "AGP", "RNA", "ER", "DNA")
METADATA_COLUMNS: tuple[str, ...] = ("batch", "plate", "well", "field", "perturbation_id", "target")
OPTIONAL_METADATA: tuple[str, ...] = ("target", "control_type", "pert_type", "gene_group")
# target is optional: most real plates (JUMP, LINCS) annotate no target, and only target-level metrics need one.
INFERENCE_REQUIRED: tuple[str, ...] = ("batch", "plate", "well", "field", "perturbation_id")
TRAIN_REQUIRED: tuple[str, ...] = ()

MERGED_COLUMN = "FileName_Merged"
LOCATIONS_COLUMN = "FileName_NucleiLocations"  # per-site nucleus-centre CSV (data/locations.py), not an image
LOCATIONS_FOLDER_COLUMN = "PathName_NucleiLocations"
OTSU_COLUMN = "Otsu_th"
LAYOUT_COLUMN = "layout"
LAYOUTS: tuple[str, ...] = ("merged", "npy", "per-channel")
TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
NPY_SUFFIXES: tuple[str, ...] = (".npy",)
PNG_SUFFIXES: tuple[str, ...] = (".png",)
CHANNEL_SUFFIXES: tuple[str, ...] = TIFF_SUFFIXES + PNG_SUFFIXES  # one file per channel: TIFF or PNG
ILLUM_SUFFIXES: tuple[str, ...] = NPY_SUFFIXES  # CellProfiler / JUMP illumination functions

STRING_COLUMNS: tuple[str, ...] = ("batch", "plate", "well", "perturbation_id", "target", "control_type", "pert_type",
                                   "gene_group")
SHOWN_PER_KIND = 3


def filename_column(channel: str) -> str:
    """JUMP load_data column holding a channel's file name."""
    return f"FileName_Orig{channel}"


def pathname_column(channel: str) -> str:
    """JUMP load_data column holding a channel's folder."""
    return f"PathName_Orig{channel}"


def illum_filename_column(channel: str) -> str:
    """JUMP load_data_with_illum column holding a channel's illumination function (.npy)."""
    return f"FileName_Illum{channel}"


def illum_pathname_column(channel: str) -> str:
    """JUMP load_data_with_illum column holding the folder of a channel's illumination function."""
    return f"PathName_Illum{channel}"


def layout_of_path(path: str) -> str | None:
    """Layout implied by a merged-file extension (None when unsupported, PNG included: it holds one channel)."""
    lower = str(path).lower()
    if lower.endswith(TIFF_SUFFIXES):
        return "merged"
    if lower.endswith(NPY_SUFFIXES):
        return "npy"
    return None


def image_paths(row: Mapping[str, Any], channels: Sequence[str] = DEFAULT_CHANNELS) -> list[str]:
    """Files that make up one site, so error messages and skip lists can name them."""
    layout = row.get(LAYOUT_COLUMN)
    merged = row.get(MERGED_COLUMN)
    if layout in ("merged", "npy") or (layout is None and _present(merged)):
        return [str(merged)]
    return [str(row.get(filename_column(ch))) for ch in channels]


class _Problems:
    """Collects validation problems by kind so one error can report all of them."""

    def __init__(self) -> None:
        self.by_kind: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, detail: str) -> None:
        self.by_kind[kind].append(detail)

    def __bool__(self) -> bool:
        return bool(self.by_kind)

    def message(self, csv_path: str) -> str:
        total = sum(len(v) for v in self.by_kind.values())
        parts = []
        for kind, details in self.by_kind.items():
            shown = ", ".join(details[:SHOWN_PER_KIND])
            more = f" and {len(details) - SHOWN_PER_KIND} more" if len(details) > SHOWN_PER_KIND else ""
            parts.append(f"{kind} ({len(details)}): {shown}{more}")
        noun = "problem" if total == 1 else "problems"
        return f"{csv_path}: {total} {noun} (line numbers count the header as line 1): " + "; ".join(parts)


def _present(value: Any) -> bool:
    """True for a non-empty cell (NaN, None and blank strings count as empty)."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() != ""


def _line(index: int) -> str:
    """CSV line of a 0-based data row (the header is line 1)."""
    return f"line {index + 2}"


def _read_csv(csv_path: Path) -> pd.DataFrame:
    """Read the CSV with metadata and path columns as strings so plate '0001' stays '0001'."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: dataset CSV not found")
    string_cols = set(STRING_COLUMNS) | {MERGED_COLUMN, OTSU_COLUMN}
    for name in STRING_COLUMNS:
        string_cols.update(ALIASES.get(name, ()))
    try:
        header = pd.read_csv(csv_path, nrows=0).columns
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: empty file, expected a header row and one row per site") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    check_unique_header(csv_path, "site table")
    string_cols.update(c for c in header if c.startswith(("FileName_", "PathName_")))
    try:
        return pd.read_csv(csv_path, dtype={c: str for c in string_cols if c in header}, keep_default_na=True)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({str(exc).splitlines()[0]})") from None


def _missing_column_hint(name: str) -> str:
    """The internal name plus the load_data / Gallery names that would have filled it, so the fix is obvious."""
    aliases = ALIASES.get(name)
    if not aliases:
        return f"'{name}'"
    known = "', '".join(aliases[:3])
    where = "; per-well metadata can come from --platemap" if name in ("perturbation_id", "target",
                                                                        "control_type") else ""
    return f"'{name}' (or '{known}'{where})"


def _resolve(base: str, value: Any) -> str:
    """Absolute, normalised path of a CSV cell relative to ``base``."""
    return os.path.normpath(os.path.join(base, os.path.expanduser(str(value).strip())))


def _present_mask(series: pd.Series) -> np.ndarray:
    """Non-empty cells of a column (NaN and blank strings count as empty), vectorised."""
    return (series.notna() & (series.astype(str).str.strip() != "")).to_numpy()


def _cell_text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value).strip()


def _resolve_column(base: str, names: pd.Series, folders: pd.Series | None) -> np.ndarray:
    """Absolute paths for a column of file names (and optional folders), normalising each distinct folder once."""
    folder_cells = folders.tolist() if folders is not None else None
    resolved: dict[str, str] = {}
    out = []
    for i, value in enumerate(names.tolist()):
        name = _cell_text(value)
        if folder_cells is not None:
            folder = _cell_text(folder_cells[i])
            if folder and not name.startswith(("/", "~")):
                name = folder.rstrip("/") + "/" + name
        folder, sep, leaf = name.rpartition("/")
        if leaf in ("", ".", ".."):
            out.append(_resolve(base, name))
            continue
        folder = folder or ("/" if sep else "")
        absolute = resolved.get(folder)
        if absolute is None:
            absolute = resolved[folder] = _resolve(base, folder) if folder else base
        out.append(absolute + leaf if absolute.endswith("/") else absolute + "/" + leaf)
    return np.array(out, dtype=object)


def _remote_rows(df: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """Rows whose file or folder cells are URLs (JUMP's load_data CSVs name ``s3://`` folders)."""
    hit = np.zeros(len(df), dtype=bool)
    for c in columns:
        if c in df.columns:
            hit |= df[c].fillna("").astype(str).str.contains("://", regex=False).to_numpy()
    return hit


def _first_remote(row: pd.Series) -> str:
    return next(str(v) for v in row.to_numpy() if "://" in str(v))


def _resolve_paths(
    df: pd.DataFrame, base: str, channels: Sequence[str], problems: _Problems, csv_path: Path
) -> None:
    """Fill ``layout``, absolute ``FileName_Merged`` and ``FileName_Orig*`` columns, recording unusable rows."""
    n = len(df)
    has_merged_col = MERGED_COLUMN in df.columns
    per_channel_cols = [filename_column(ch) for ch in channels]
    has_all_channel_cols = all(c in df.columns for c in per_channel_cols)
    if not has_merged_col and not has_all_channel_cols:
        absent = [c for c in per_channel_cols if c not in df.columns]
        if any(c.startswith("FileName_Orig") for c in df.columns):
            problems.add("missing column", f"{', '.join(repr(c) for c in absent)} in {csv_path}")
        else:
            problems.add(
                "missing column",
                f"'{MERGED_COLUMN}' (or per-channel {', '.join(repr(c) for c in per_channel_cols)}) in {csv_path}",
            )
        return

    layouts = np.full(n, None, dtype=object)
    merged_abs = np.full(n, None, dtype=object)
    flagged = np.zeros(n, dtype=bool)
    if has_merged_col:
        merged = df[MERGED_COLUMN]
        present = _present_mask(merged)
        lower = merged.fillna("").astype(str).str.strip().str.lower()
        is_tif = lower.str.endswith(TIFF_SUFFIXES).to_numpy() & present
        is_npy = lower.str.endswith(NPY_SUFFIXES).to_numpy() & present
        flagged = present & ~is_tif & ~is_npy
        for i in np.flatnonzero(flagged):
            name = str(merged.iloc[i])
            fix = ("a PNG holds one channel: list one file per channel in FileName_Orig*"
                   if name.strip().lower().endswith(PNG_SUFFIXES) else "use .tif/.tiff or .npy")
            problems.add("unsupported image extension", f"{_line(int(i))} ({name}; {fix})")
        layouts[is_tif] = "merged"
        layouts[is_npy] = "npy"
        ok = is_tif | is_npy
        if ok.any():
            merged_abs[ok] = _resolve_column(base, merged[ok], None)

    channel_abs = {ch: np.full(n, None, dtype=object) for ch in channels}
    if has_all_channel_cols:
        filled = np.stack([_present_mask(df[c]) for c in per_channel_cols], axis=1)
        candidates = pd.isna(layouts) & ~flagged
        partial = candidates & filled.any(axis=1) & ~filled.all(axis=1)
        for i in np.flatnonzero(partial):
            empty = [per_channel_cols[c] for c in np.flatnonzero(~filled[i])]
            problems.add("empty channel file name", f"{_line(int(i))} ({', '.join(empty)})")
        flagged = flagged | partial
        rows = candidates & filled.all(axis=1)
        remote = rows & _remote_rows(df, [c for ch in channels for c in (filename_column(ch), pathname_column(ch))])
        for i in np.flatnonzero(remote):
            problems.add("remote image path (only local files are read: download them, e.g. with aws s3 sync "
                         "--no-sign-request, and point PathName_Orig* at the copy)",
                         f"{_line(int(i))} ({_first_remote(df.iloc[int(i)])})")
        flagged = flagged | remote
        rows = rows & ~remote
        if rows.any():
            bad_ext = np.zeros(n, dtype=bool)
            for ch in channels:
                folder_col = pathname_column(ch)
                folders = df.loc[rows, folder_col] if folder_col in df.columns else None
                channel_abs[ch][rows] = _resolve_column(base, df.loc[rows, filename_column(ch)], folders)
                lower = pd.Series(channel_abs[ch][rows]).str.lower()
                bad_ext[np.flatnonzero(rows)[~lower.str.endswith(CHANNEL_SUFFIXES).to_numpy()]] = True
            for i in np.flatnonzero(bad_ext):
                paths = [channel_abs[ch][i] for ch in channels]
                bad = next(p for p in paths if not p.lower().endswith(CHANNEL_SUFFIXES))
                problems.add("unsupported image extension", f"{_line(int(i))} ({bad}; use .tif/.tiff or .png)")
            layouts[rows] = "per-channel"

    for i in np.flatnonzero(pd.isna(layouts) & ~flagged):
        problems.add("no image path", _line(int(i)))

    df[LAYOUT_COLUMN] = layouts
    df[MERGED_COLUMN] = merged_abs
    for ch in channels:
        df[filename_column(ch)] = channel_abs[ch]


def _resolve_illum(
    df: pd.DataFrame, base: str, channels: Sequence[str], problems: _Problems, csv_path: Path, check_files: bool
) -> None:
    """Absolute ``FileName_Illum{Ch}`` paths (JUMP's load_data_with_illum.csv), so every reader divides by them.

    All or none of the requested channels must have an illumination column: correcting some channels and not others
    would silently change their relative intensities. Paths resolve like image paths (``PathName_Illum{Ch}`` first).
    """
    columns = [illum_filename_column(ch) for ch in channels]
    given = [c for c in columns if c in df.columns]
    if not given:
        return
    absent = [c for c in columns if c not in df.columns]
    if absent:
        problems.add("missing column", f"{', '.join(repr(c) for c in absent)} in {csv_path} (it has "
                                       f"{', '.join(repr(c) for c in given)}; correct every channel or none)")
        return
    n = len(df)
    unsupported: set[str] = set()
    for ch, col in zip(channels, columns):
        filled = _present_mask(df[col])
        for i in np.flatnonzero(~filled):
            problems.add("empty illumination file name", f"{_line(int(i))} ({col})")
        resolved = np.full(n, None, dtype=object)
        if filled.any():
            folder_col = illum_pathname_column(ch)
            folders = df.loc[filled, folder_col] if folder_col in df.columns else None
            resolved[filled] = _resolve_column(base, df.loc[filled, col], folders)
            bad = ~pd.Series(resolved[filled]).str.lower().str.endswith(ILLUM_SUFFIXES).to_numpy()
            for i in np.flatnonzero(filled)[bad]:
                problems.add("unsupported illumination file extension", f"{_line(int(i))} ({resolved[i]}; use .npy)")
                unsupported.add(resolved[i])
        df[col] = resolved
    if not check_files:
        return
    cells = [df[col].tolist() for col in columns]
    missing = find_missing_files({p for col in cells for p in col if isinstance(p, str) and p} - unsupported)
    if not missing:
        return
    for i in range(n):
        lost = [col[i] for col in cells if col[i] in missing]
        if lost:
            more = f" and {len(lost) - 1} more of this site" if len(lost) > 1 else ""
            problems.add("missing illumination file", f"{_line(i)} ({lost[0]}{more})")


def _resolve_locations(df: pd.DataFrame, base: str) -> None:
    """Make ``FileName_NucleiLocations`` absolute like an image path (its ``PathName_`` folder first, then ``base``).

    Empty cells stay None (that site's nuclei come from segmentation); the files are checked when read
    (``data.locations``), because only single-cell crops read them.
    """
    if LOCATIONS_COLUMN not in df.columns:
        return
    present = _present_mask(df[LOCATIONS_COLUMN])
    resolved = np.full(len(df), None, dtype=object)
    if present.any():
        folders = df.loc[present, LOCATIONS_FOLDER_COLUMN] if LOCATIONS_FOLDER_COLUMN in df.columns else None
        resolved[present] = _resolve_column(base, df.loc[present, LOCATIONS_COLUMN], folders)
    df[LOCATIONS_COLUMN] = resolved


def _listing(directory: str, cache: dict[str, set[str] | None]) -> set[str] | None:
    """File names in ``directory`` from one scandir (None when the folder does not exist)."""
    if directory not in cache:
        try:
            with os.scandir(directory) as entries:
                cache[directory] = {e.name for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            cache[directory] = None
    return cache[directory]


def not_a_regular_file(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a broken symlink, a folder, a FIFO...), or None when it can.

    Why before opening: ``open()`` on a FIFO blocks until a writer appears, so a named pipe called ``x.tiff`` hung
    the readers; ``os.stat`` never blocks, and it also tells a broken symlink and a folder from a missing file.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "file not found"
    except PermissionError:
        return "permission denied (cannot look up the file)"
    except OSError as exc:
        return f"cannot be looked up ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file; reading it would block"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is a device or other special file, not a regular file"


def find_missing_files(paths: Iterable[str]) -> set[str]:
    """Which of ``paths`` are not existing files, listing each folder once instead of one stat per file."""
    by_dir: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for p in paths:
        folder, _, name = p.rpartition("/")
        by_dir[folder or "/"].append((p, name))
    missing: set[str] = set()
    cache: dict[str, set[str] | None] = {}
    for directory, files in by_dir.items():
        if len(files) < 16:
            missing.update(p for p, _ in files if not os.path.isfile(p))
            continue
        names = _listing(directory, cache)
        if names is None:
            missing.update(p for p, _ in files)
            continue
        missing.update(p for p, name in files if name not in names)
    return missing


def _check_files(row_paths: list[list[str]], problems: _Problems) -> None:
    """Record every site with missing image files, naming the first missing file of each.

    A path that exists but is no regular file (a folder, a FIFO, a broken symlink) is reported as what it is, not
    as missing, so the fix is obvious; only those few paths are stat'ed again.
    """
    missing = find_missing_files(p for paths in row_paths for p in paths)
    if not missing:
        return
    why = {p: not_a_regular_file(p) for p in missing}
    for i, paths in enumerate(row_paths):
        absent = [p for p in paths if p in missing]
        if not absent:
            continue
        more = f" and {len(absent) - 1} more of this site" if len(absent) > 1 else ""
        reason = why[absent[0]]
        if reason in (None, "file not found"):
            problems.add("missing file", f"{_line(i)} ({absent[0]}{more})")
        else:
            problems.add("not a readable image file", f"{_line(i)} ({absent[0]}: {reason}{more})")


def _check_duplicates(df: pd.DataFrame, row_paths: list[list[str]], problems: _Problems) -> None:
    """Record sites listed twice, by (plate, well, field) and by file path."""
    keys = [c for c in ("plate", "well", "field") if c in df.columns]
    if len(keys) == 3:
        dup = df.duplicated(subset=keys, keep="first")
        if dup.any():
            first = {}
            for i, key in enumerate(zip(*(df[k].tolist() for k in keys))):
                if key in first:
                    problems.add(
                        "duplicate site (plate, well, field)",
                        f"{_line(i)} repeats {_line(first[key])} {tuple(str(k) for k in key)}",
                    )
                else:
                    first[key] = i
    seen: dict[str, int] = {}
    for i, paths in enumerate(row_paths):
        for p in paths:
            if p in seen:
                where = "the same line" if seen[p] == i else _line(seen[p])
                problems.add("duplicate image path", f"{_line(i)} repeats {where} ({p})")
            else:
                seen[p] = i


def _row_paths(df: pd.DataFrame, channels: Sequence[str]) -> list[list[str]]:
    merged = df[MERGED_COLUMN].tolist()
    per_channel = [df[filename_column(ch)].tolist() for ch in channels] if channels else []
    out = []
    for i, layout in enumerate(df[LAYOUT_COLUMN].tolist()):
        if layout in ("merged", "npy"):
            out.append([merged[i]])
        elif layout == "per-channel":
            out.append([col[i] for col in per_channel])
        else:
            out.append([])
    return out


def _parse_otsu(df: pd.DataFrame, problems: _Problems) -> None:
    """Make ``Otsu_th`` float in raw uint16 units (NaN when unknown), by the rule of ``otsu_to_raw``."""
    if OTSU_COLUMN not in df.columns:
        df[OTSU_COLUMN] = np.nan
        return
    values = pd.to_numeric(df[OTSU_COLUMN], errors="coerce").astype(float).to_numpy()
    non_numeric = np.isnan(values) & _present_mask(df[OTSU_COLUMN])
    invalid = np.isinf(values) | (values < 0)
    for i in np.flatnonzero(non_numeric | invalid):
        problems.add("invalid Otsu_th", f"{_line(int(i))} ({df[OTSU_COLUMN].iloc[i]!r})")
    df[OTSU_COLUMN] = otsu_to_raw(np.where(invalid, np.nan, values))


def otsu_to_raw(value: Any, scale: float = 65535.0) -> Any:
    """Bring a stored Otsu threshold to raw uint16 units, because the paper's files mix two scales (docs/DATA.md).

    Rule: a threshold <= 1.0 is read as the [0, 1] scale (the image divided by 65535) and multiplied by ``scale``;
    anything larger is already raw. NaN (unknown) stays NaN. A scalar (or None, which gives NaN) returns a float;
    numpy arrays and torch tensors are converted element-wise (integer inputs become float64). A negative or
    infinite threshold raises DataError.
    """
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported; no import cost otherwise
    if torch is not None and isinstance(value, torch.Tensor):
        v = value if value.is_floating_point() else value.to(torch.float64)
        bad = torch.isinf(v) | (v < 0)
        if bool(bad.any()):
            raise DataError(f"invalid Otsu threshold {v[bad].flatten()[0].item()!r}: must be >= 0 and finite")
        return torch.where(v <= 1.0, v * scale, v)
    if isinstance(value, np.ndarray):
        v = value.astype(np.float64)
        bad = np.isinf(v) | (v < 0)
        if bad.any():
            raise DataError(f"invalid Otsu threshold {v[bad].flat[0]!r}: must be >= 0 and finite")
        return np.where(v <= 1.0, v * scale, v)
    if value is None:
        return math.nan
    v = float(value)
    if math.isnan(v):
        return math.nan
    if math.isinf(v) or v < 0:
        raise DataError(f"invalid Otsu threshold {v!r}: must be >= 0 and finite")
    return v * scale if v <= 1.0 else v


def load_site_table(
    csv_path: str | os.PathLike[str],
    image_root: str | os.PathLike[str] | None = None,
    channels: Sequence[str] = DEFAULT_CHANNELS,
    required: Sequence[str] = (),
    check_files: bool = True,
    platemap: str | os.PathLike[str] | None = None,
    column_map: Sequence[tuple[str, str]] = (),
) -> pd.DataFrame:
    """Load a site CSV in either convention into the internal schema, reporting every problem in one DataError.

    ``column_map`` (``--map SRC=DST`` pairs) copies columns onto other names first, in the site CSV and in the plate
    map; then JUMP / Cell Painting Gallery names are mapped (``data.metadata.ALIASES``); then ``platemap`` (a CSV or
    TSV of per-well metadata, ``--platemap``) is joined on plate and well, or on well alone when it has no plate
    column. An empty perturbation in a negcon well becomes DMSO.
    """
    csv_path = Path(csv_path)
    channels = tuple(channels)
    if len(set(channels)) != len(channels) or not channels:
        raise DataError(f"channels must be distinct and non-empty, got {list(channels)}")
    df = _read_csv(csv_path)
    if len(df) == 0:
        raise DataError(f"{csv_path}: empty table (a header but no site rows)")
    df = df.reset_index(drop=True)
    if platemap is None:
        df = map_metadata(apply_column_map(df, column_map, str(csv_path)))
    else:
        plate_map = read_platemap(platemap, column_map)
        check_sources(column_map, {str(csv_path): df, str(platemap): plate_map})
        df = map_metadata(apply_column_map(df, column_map, str(csv_path), strict=False))
        df = map_metadata(join_platemap(df, plate_map, f"{csv_path} + {platemap}"))
    df = fill_negcon_perturbation(df)
    if image_root is not None and not Path(image_root).is_dir():
        raise DataError(f"image root {image_root} is not a folder")
    base = os.path.abspath(image_root if image_root is not None else csv_path.parent)

    problems = _Problems()
    absent = [_missing_column_hint(name) for name in required if name not in df.columns]
    if absent:
        problems.add("missing column", f"{', '.join(absent)} in {csv_path}")
    for name in STRING_COLUMNS:
        if name in df.columns:
            df[name] = df[name].where(df[name].isna(), df[name].astype(str))
    for name in required:
        if name in df.columns:
            empty = np.flatnonzero(~_present_mask(df[name]))
            for i in empty:
                problems.add(f"empty '{name}'", _line(int(i)))
    _parse_otsu(df, problems)
    _resolve_paths(df, base, channels, problems, csv_path)
    _resolve_locations(df, base)
    _resolve_illum(df, base, channels, problems, csv_path, check_files)
    if LAYOUT_COLUMN in df.columns:
        row_paths = _row_paths(df, channels)
        _check_duplicates(df, row_paths, problems)
        if check_files:
            _check_files(row_paths, problems)
    if problems:
        raise DataError(problems.message(str(csv_path)))
    return df
