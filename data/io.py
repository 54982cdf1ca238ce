"""Site pixels from merged TIFFs, per-channel TIFFs or PNGs, or .npy files, as uint16 raw units and checked before use.

Every format lands on one scale, uint16 "raw units" where 65535 is full scale, so everything downstream (the Otsu rule,
exact uint16 histograms, the [0,1] normalisation) sees the same numbers whatever the file's bit depth: uint8 is
multiplied by 257 (exact: x/255 == 257x/65535), uint16 is kept, float32 is read as CellProfiler's [0,1] scale.
When a row names illumination functions (``FileName_Illum{Ch}``), every reader divides each channel by its function.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from data.schema import (
    DEFAULT_CHANNELS,
    LAYOUT_COLUMN,
    MERGED_COLUMN,
    OTSU_COLUMN,
    PNG_SUFFIXES,
    filename_column,
    illum_filename_column,
    layout_of_path,
    not_a_regular_file,
    otsu_to_raw,
)
from utils.errors import DataError
from utils.fileio import atomic_path

_UINT16 = np.dtype(np.uint16)
_fallback_warned: set[str] = set()

RAW_MAX = 65535
UINT8_TO_RAW = 257  # 255 * 257 == 65535, so x / 255 == x * 257 / 65535 exactly
SUPPORTED_DTYPES: tuple[str, ...] = ("uint8", "uint16", "float32")
ILLUM_CACHE_SIZE = 256  # illumination functions kept open per process (memory-mapped: page cache, not copies)


class _ThreadErrors(logging.Handler):
    """Collects tifffile's logged errors (it logs, rather than raises, on a truncated page chain)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def check_regular_file(path: str | os.PathLike[str], kind: str = "image") -> None:
    """Raise a DataError naming ``path`` unless it is an existing regular file (symlinks to one are fine)."""
    why = not_a_regular_file(path)
    if why == "file not found":
        raise DataError(f"{path}: {kind} file not found")
    if why is not None:
        raise DataError(f"{path}: {why}, expected {'an' if kind[0] in 'aeiou' else 'a'} {kind} file")


def _open_image(opener: Any, path: str, kind: str) -> Any:
    """``opener(path)`` with every failure as one DataError naming the file: missing, not a regular file (a FIFO
    would block the open), unreadable, or garbage (the libraries raise many exception types on garbage input)."""
    check_regular_file(path)
    try:
        return opener(path)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected an image file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied (the file is not readable by this user)") from None
    except Exception as exc:
        raise DataError(f"{path}: corrupt or unreadable {kind} ({_short(exc)})") from None


@contextmanager
def _open_tiff(path: str) -> Iterator[tifffile.TiffFile]:
    """Open a TIFF, turning every failure (missing, not a TIFF, broken page chain) into a DataError naming it."""
    handler = _ThreadErrors()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(handler)
    try:
        tif = _open_image(tifffile.TiffFile, path, "TIFF")
        with tif:
            try:
                len(tif.pages)  # index the whole page chain now, so a truncated chain is logged here
            except Exception as exc:
                raise DataError(f"{path}: corrupt TIFF page chain ({_short(exc)})") from None
            if handler.messages:
                raise DataError(f"{path}: corrupt or truncated TIFF ({handler.messages[0][:160]})")
            yield tif
            if handler.messages:
                raise DataError(f"{path}: corrupt or truncated TIFF ({handler.messages[0][:160]})")
    finally:
        tlog.removeHandler(handler)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def _description(tif: tifffile.TiffFile) -> dict[str, Any]:
    """Page-0 ImageDescription as a dict; a description that is not a JSON object counts as empty."""
    text = tif.pages.first.description
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except (ValueError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _otsu_from_description(desc: Mapping[str, Any], path: str) -> float:
    """The paper's ``otsuth`` key in raw uint16 units, NaN when absent."""
    value = desc.get("otsuth")
    if value is None:
        return math.nan
    try:
        return otsu_to_raw(float(value))
    except (TypeError, ValueError):
        raise DataError(f"{path}: ImageDescription otsuth {value!r} is not a valid threshold") from None


def _check_extent(tif: tifffile.TiffFile, path: str) -> None:
    """Reject files whose pixel data end past the end of the file (truncated downloads or copies)."""
    size = os.path.getsize(path)
    for page in tif.pages:
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            if offset + count > size:
                raise DataError(f"{path}: truncated TIFF (pixel data end at byte {offset + count}, file has {size})")


def _to_chw(arr: np.ndarray, axes: str, path: str) -> np.ndarray:
    """Bring a tifffile series to (C,H,W): drop singleton axes, move interleaved samples first."""
    if axes.endswith("S") and arr.ndim >= 3:
        arr = np.moveaxis(arr, -1, 0)
    lead = arr.shape[:-2]
    kept = [n for n in lead if n != 1]
    if len(kept) > 1:
        raise DataError(f"{path}: image has shape {arr.shape} (axes {axes}), expected (C,H,W)")
    return arr.reshape((int(np.prod(lead, dtype=np.int64)),) + arr.shape[-2:])


def _is_raw_dtype(dtype: np.dtype) -> bool:
    """uint16 in either byte order: the internal representation, readable without conversion."""
    return dtype.kind == "u" and dtype.itemsize == 2


def _check_dtype(dtype: np.dtype, path: str) -> None:
    """Refuse pixel types without a defined mapping to the [0,1] scale (signed, 32/64-bit, bool)."""
    supported = (dtype.kind == "u" and dtype.itemsize in (1, 2)) or (dtype.kind == "f" and dtype.itemsize == 4)
    if not supported:
        raise DataError(f"{path}: dtype {dtype.name} is not supported; expected {', '.join(SUPPORTED_DTYPES[:-1])} "
                        f"or {SUPPORTED_DTYPES[-1]}")


def to_raw_uint16(pixels: np.ndarray, path: str) -> np.ndarray:
    """Bring uint8 / uint16 / float32 pixels to uint16 raw units (a new or native-order array), by bit depth.

    Why one rule: downstream code divides by 65535 and thresholds in raw units, so an 8-bit PNG and the 16-bit TIFF it
    came from must give the same [0,1] image. uint8 is multiplied by 257 (exact), uint16 is kept, float32 is read as
    the [0,1] scale (CellProfiler's convention) times 65535, rounded; float values outside [0,1] or NaN are refused
    rather than clipped, because they mean the file is on another scale.
    """
    dtype = pixels.dtype
    _check_dtype(dtype, path)
    if _is_raw_dtype(dtype):
        return np.ascontiguousarray(pixels, dtype=_UINT16)
    if dtype.kind == "u":
        out = np.asarray(pixels).astype(_UINT16)
        out *= UINT8_TO_RAW
        return out
    values = np.asarray(pixels, dtype=np.float64)
    has_nan = bool(np.isnan(values).any())
    finite = not has_nan or not np.isnan(values).all()
    lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if finite else (math.nan, math.nan)
    if has_nan or lo < 0.0 or hi > 1.0:
        found = (f"[{lo:g}, {hi:g}]" if finite else "only") + (" and NaN" if has_nan else "")
        raise DataError(f"{path}: {dtype.name} values must lie in [0, 1] (float images are read on the [0,1] scale), "
                        f"found {found}")
    return np.rint(values * RAW_MAX).astype(_UINT16)


def _count_message(path: str, shape: Sequence[int], expected: int, channels: Sequence[str] = ()) -> str:
    """Wrong channel count, recognising the common (H,W,C) mistake so the fix is obvious."""
    names = f" ({', '.join(channels)})" if channels else ""
    if len(shape) == 3 and shape[-1] == expected and shape[0] != expected:
        return (f"{path}: array of shape {tuple(int(n) for n in shape)} looks channels-last (H,W,C); expected "
                f"channels first (C,H,W) with C={expected}{names}")
    return f"{path}: {shape[0]} channels, expected {expected}{names}"


def _read_tiff(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Whole (C,H,W) array in uint16 raw units and the page-0 description of one TIFF."""
    path = str(path)
    with _open_tiff(path) as tif:
        if not tif.series:
            raise DataError(f"{path}: corrupt or truncated TIFF (no image pages)")
        series = tif.series[0]
        _check_dtype(np.dtype(series.dtype), path)
        _check_extent(tif, path)
        desc = _description(tif)
        try:
            arr = series.asarray()
        except Exception as exc:
            raise DataError(f"{path}: corrupt TIFF pixel data ({_short(exc)})") from None
        axes = series.axes
    arr = _to_chw(arr, axes, path)
    return to_raw_uint16(arr, path), desc


def _declared_channels(desc: Mapping[str, Any]) -> list[str] | None:
    names = desc.get("channels")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def _channel_index(
    shape: Sequence[int], declared: list[str] | None, channels: Sequence[str], path: str
) -> list[int]:
    """Indices of ``channels`` in a (C,H,W) file: by declared name when the file has names, else in file order."""
    n_file = int(shape[0])
    if declared is not None and len(declared) == n_file:
        absent = [c for c in channels if c not in declared]
        if absent:
            raise DataError(f"{path}: file declares channels {declared}, missing {absent}")
        return [declared.index(c) for c in channels]
    if n_file != len(channels):
        raise DataError(_count_message(path, shape, len(channels), channels))
    return list(range(n_file))


def read_merged_tiff(path: str | os.PathLike[str], n_channels: int | None = None) -> tuple[np.ndarray, float]:
    """The paper's release format: a (C,H,W) TIFF (uint16, or uint8/float32 converted to raw units) with the Otsu
    threshold (raw units) in its description."""
    path = str(path)
    arr, desc = _read_tiff(path)
    if n_channels is not None and arr.shape[0] != n_channels:
        raise DataError(_count_message(path, arr.shape, n_channels))
    return arr, _otsu_from_description(desc, path)


_PNG_GRAY_MODES = ("L", "I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit grayscale as older Pillow opens it


def _is_png(path: str) -> bool:
    return path.lower().endswith(PNG_SUFFIXES)


@contextmanager
def _open_png(path: str) -> Iterator[Image.Image]:
    """Open a PNG header (no decoding yet), refusing anything but one grayscale channel, errors naming the file."""
    image = _open_image(Image.open, path, "PNG")
    with image:
        if image.format != "PNG":
            raise DataError(f"{path}: not a PNG file (its content is {image.format})")
        if image.mode not in _PNG_GRAY_MODES:
            bands = f"{image.mode} ({len(image.getbands())} channels)"
            kind = {"1": "1-bit", "P": "palette (colour-mapped)"}.get(image.mode, bands)
            raise DataError(f"{path}: {kind} PNG; expected one grayscale channel per file (8- or 16-bit)")
        yield image


def _read_png(path: str) -> np.ndarray:
    """One 8- or 16-bit grayscale PNG as an (H,W) plane in uint16 raw units (PNG is always compressed: read whole)."""
    with _open_png(path) as image:
        try:
            image.load()
            arr = np.asarray(image)
        except Exception as exc:
            raise DataError(f"{path}: corrupt or truncated PNG ({_short(exc)})") from None
        mode = image.mode
    if mode == "I":
        if arr.size and (arr.min() < 0 or arr.max() > RAW_MAX):
            raise DataError(f"{path}: PNG values span [{arr.min()}, {arr.max()}], beyond 16 bits")
        arr = arr.astype(_UINT16)
    if arr.ndim != 2:
        raise DataError(f"{path}: PNG has shape {arr.shape}, expected one grayscale channel per file")
    return to_raw_uint16(arr, path)


def _png_shape(path: str) -> tuple[int, int]:
    """(H, W) of a PNG from its header, without decoding the pixels."""
    with _open_png(path) as image:
        return int(image.height), int(image.width)


def _read_plane(path: str) -> np.ndarray:
    """One per-channel file (PNG by extension, else TIFF) as an (H,W) plane in uint16 raw units."""
    if _is_png(path):
        return _read_png(path)
    arr, _ = _read_tiff(path)
    if arr.shape[0] != 1:
        raise DataError(f"{path}: {arr.shape[0]} planes, expected one channel per file")
    return arr[0]


def read_channel_files(paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """Stack one single-plane file per channel (the JUMP layout: TIFF or PNG) in the order given, in raw units."""
    planes: list[np.ndarray] = []
    for p in paths:
        p = str(p)
        plane = _read_plane(p)
        if planes and plane.shape != planes[0].shape:
            raise DataError(f"{p}: shape {plane.shape} differs from {planes[0].shape} of {paths[0]}")
        planes.append(plane)
    if not planes:
        raise DataError("no channel files given")
    return np.stack(planes)


read_channel_tiffs = read_channel_files  # the name callers used before PNG support; same reader


def _load_npy(path: str) -> np.ndarray:
    """Memory-mapped (C,H,W) .npy (uint8, uint16 or float32, not yet converted), checked for dtype and rank."""
    check_regular_file(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied (the file is not readable by this user)") from None
    except Exception as exc:
        raise DataError(f"{path}: corrupt or truncated .npy ({_short(exc)})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: .npy holds {type(arr).__name__}, expected one array")
    _check_dtype(arr.dtype, path)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(f"{path}: array shape {arr.shape}, expected (C,H,W)")
    return arr


def read_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A whole (C,H,W) .npy site in memory in uint16 raw units (the paper's second format; Otsu comes from the CSV)."""
    arr = _load_npy(str(path))
    try:
        values = np.array(arr)  # a real copy: no open file handle, writable
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable .npy data ({_short(exc)})") from None
    return to_raw_uint16(values, str(path))  # native byte order, raw units


def _layout(row: Mapping[str, Any]) -> str:
    """Row layout from the table, or inferred for hand-made rows."""
    layout = row.get(LAYOUT_COLUMN)
    if isinstance(layout, str) and layout:
        return layout
    merged = row.get(MERGED_COLUMN)
    if isinstance(merged, str) and merged:
        inferred = layout_of_path(merged)
        if inferred is None and _is_png(merged):
            raise DataError(f"{merged}: a PNG holds one channel, not a merged site; list one PNG per channel "
                            f"(FileName_Orig* columns)")
        if inferred is None:
            raise DataError(f"{merged}: unsupported image extension (use .tif/.tiff or .npy)")
        return inferred
    return "per-channel"


def _row_otsu(row: Mapping[str, Any]) -> float:
    value = row.get(OTSU_COLUMN)
    if value is None:
        return math.nan
    try:
        return otsu_to_raw(float(value))
    except (TypeError, ValueError):
        raise DataError(f"Otsu_th {value!r} is not a valid threshold (site {_site_name(row)})") from None


def _site_name(row: Mapping[str, Any]) -> str:
    merged = row.get(MERGED_COLUMN)
    return str(merged) if isinstance(merged, str) and merged else str(row.get(filename_column("DNA"), "?"))


def _channel_paths(row: Mapping[str, Any], channels: Sequence[str]) -> list[str]:
    paths = []
    for ch in channels:
        value = row.get(filename_column(ch))
        if not isinstance(value, str) or not value:
            raise DataError(f"site row has no {filename_column(ch)} (channels {list(channels)})")
        paths.append(value)
    return paths


def _read_merged_site(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[np.ndarray, float]:
    path = str(row[MERGED_COLUMN])
    arr, desc = _read_tiff(path)
    idx = _channel_index(arr.shape, _declared_channels(desc), channels, path)
    if idx != list(range(arr.shape[0])):
        arr = np.ascontiguousarray(arr[idx])
    otsu = _otsu_from_description(desc, path)
    return arr, otsu if not math.isnan(otsu) else _row_otsu(row)


def _read_npy_site(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[np.ndarray, float]:
    path = str(row[MERGED_COLUMN])
    arr = read_npy(path)
    _channel_index(arr.shape, None, channels, path)
    return arr, _row_otsu(row)


def _read_per_channel_site(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[np.ndarray, float]:
    return read_channel_files(_channel_paths(row, channels)), _row_otsu(row)


_SITE_READERS = {"merged": _read_merged_site, "npy": _read_npy_site, "per-channel": _read_per_channel_site}

_illum_lock = threading.Lock()
_illum_cache: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()


def _read_illum(path: str) -> np.ndarray:
    """Validated (H,W) illumination function, memory-mapped in its stored dtype so reader processes share the page
    cache instead of each holding a copy (CellProfiler writes float64; regions are cast to float32 when applied)."""
    check_regular_file(path, "illumination")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: illumination file not found") from None
    except Exception as exc:
        raise DataError(f"{path}: corrupt or unreadable illumination .npy ({_short(exc)})") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: holds {type(arr).__name__}, expected one (H,W) illumination array")
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{path}: illumination function has dtype {arr.dtype.name}, expected a float array")
    if arr.ndim != 2:
        raise DataError(f"{path}: illumination function has shape {arr.shape}, expected (H,W)")
    try:
        values = np.asarray(arr, dtype=np.float32)  # checked as it is applied: a float64 1e-50 is 0 in float32
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable illumination data ({_short(exc)})") from None
    if not np.isfinite(values).all():
        raise DataError(f"{path}: illumination function holds NaN or infinite values")
    lowest = float(values.min()) if values.size else 0.0
    if lowest <= 0.0:
        raise DataError(f"{path}: illumination function has values <= 0 (min {lowest:g}); it must be positive")
    return arr


def load_illum(path: str | os.PathLike[str]) -> np.ndarray:
    """An illumination function, read and checked once per process (keyed by path, size and mtime; thread-safe).

    The key includes the file's size and modification time so a function rewritten in place is read again.
    """
    path = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: illumination file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: unreadable illumination file ({exc.strerror})") from None
    key = (path, st.st_size, st.st_mtime_ns)
    with _illum_lock:
        found = _illum_cache.get(key)
        if found is None:
            found = _illum_cache[key] = _read_illum(path)
            while len(_illum_cache) > ILLUM_CACHE_SIZE:
                _illum_cache.popitem(last=False)
        _illum_cache.move_to_end(key)
        return found


def apply_illumination(raw: np.ndarray, illum: np.ndarray) -> np.ndarray:
    """``raw / illum`` in float32, rounded to the nearest level and clipped to uint16 (the one correction rule)."""
    corrected = np.divide(np.asarray(raw), np.asarray(illum), dtype=np.float32)
    np.rint(corrected, out=corrected)
    np.clip(corrected, 0, RAW_MAX, out=corrected)
    return corrected.astype(_UINT16)


def _illum_paths(row: Mapping[str, Any], channels: Sequence[str]) -> list[str] | None:
    """The row's illumination files in ``channels`` order, None when it names none."""
    values = [row.get(illum_filename_column(ch)) for ch in channels]
    given = [isinstance(v, str) and v.strip() != "" for v in values]
    if not any(given):
        return None
    if not all(given):
        absent = [illum_filename_column(ch) for ch, ok in zip(channels, given) if not ok]
        raise DataError(f"site {_site_name(row)}: illumination files for some channels but no {', '.join(absent)}")
    return [str(v) for v in values]


def _site_illum(row: Mapping[str, Any], channels: Sequence[str], plane_shape: Sequence[int]) -> list[np.ndarray] | None:
    """The row's illumination functions, each checked against the site's (H,W); None when the row names none."""
    paths = _illum_paths(row, channels)
    if paths is None:
        return None
    functions = []
    for path in paths:
        illum = load_illum(path)
        if tuple(illum.shape) != tuple(plane_shape):
            raise DataError(f"{path}: illumination function shape {tuple(illum.shape)} differs from the image's "
                            f"{tuple(int(n) for n in plane_shape)} (site {_site_name(row)})")
        functions.append(illum)
    return functions


def read_site(
    row: Mapping[str, Any], channels: Sequence[str] = DEFAULT_CHANNELS, illum: bool = True
) -> tuple[np.ndarray, float]:
    """One site as uint16 (C,H,W) in ``channels`` order plus its Otsu threshold in raw units (NaN if unknown).

    The threshold comes from the merged TIFF's description when it has one, else from the row's ``Otsu_th``.
    With ``illum`` (the default) a row's ``FileName_Illum{Ch}`` functions divide their channels; ``illum=False``
    gives the uncorrected pixels (what ``data.illum`` averages).
    """
    layout = _layout(row)
    reader = _SITE_READERS.get(layout)
    if reader is None:
        raise DataError(f"unknown site layout {layout!r}; expected one of {sorted(_SITE_READERS)}")
    channels = tuple(channels)
    pixels, otsu = reader(row, channels)
    functions = _site_illum(row, channels, pixels.shape[1:]) if illum else None
    if functions is not None:
        pixels = np.stack([apply_illumination(plane, f) for plane, f in zip(pixels, functions)])
    return pixels, otsu


class StackedChannels:
    """Read-only (C,H,W) view over per-channel planes that reads only the indexed region of each plane."""

    def __init__(self, planes: Sequence[np.ndarray]) -> None:
        self.planes = list(planes)
        self.shape = (len(self.planes),) + tuple(self.planes[0].shape)
        self.dtype = self.planes[0].dtype
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if key and key[0] is Ellipsis:
            key = (slice(None), Ellipsis) + key[1:] if len(key) > 1 else (slice(None),)
        channel_key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if isinstance(channel_key, (int, np.integer)):
            return np.asarray(self.planes[channel_key][rest])
        chosen = np.arange(len(self.planes))[channel_key]
        return np.stack([np.asarray(self.planes[int(c)][rest]) for c in chosen])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = np.stack([np.asarray(p) for p in self.planes])
        return arr if dtype is None else arr.astype(dtype)


class IlluminatedPlane:
    """An (H,W) channel divided by its illumination function on access: a crop reads and corrects only its region."""

    def __init__(self, plane: Any, illum: np.ndarray) -> None:
        self.plane = plane
        self.illum = illum
        self.shape = tuple(int(n) for n in plane.shape)
        self.dtype = _UINT16
        self.ndim = 2

    def __getitem__(self, key: Any) -> np.ndarray:
        return apply_illumination(np.asarray(self.plane[key]), np.asarray(self.illum[key]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[...]
        return arr if dtype is None else arr.astype(dtype)


def _memmap_tiff(path: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(C,H,W) memmap of an uncompressed, contiguous, native-order uint16 TIFF; None when the file does not allow it.

    Other supported dtypes (uint8, float32) also give None: they need converting, so the caller reads them whole.
    """
    with _open_tiff(path) as tif:
        if not tif.series:
            raise DataError(f"{path}: corrupt or truncated TIFF (no image pages)")
        series = tif.series[0]
        dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
        _check_dtype(dtype, path)
        _check_extent(tif, path)
        desc = _description(tif)
        offset = series.dataoffset
        axes, shape = series.axes, tuple(series.shape)
    if offset is None or axes.endswith("S") or not dtype.isnative or not _is_raw_dtype(dtype):
        return None
    try:
        mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: truncated or unreadable TIFF data ({_short(exc)})") from None
    return _to_chw(mm, axes, path), desc


def _warn_full_read(path: str, warn: bool = True) -> None:
    """Say once per folder that files are read whole for every crop, so slow training has a visible cause.

    ``warn=False`` for readers that want the whole site anyway (inference), where the advice would mislead.
    """
    folder = os.path.dirname(path)
    if warn and folder not in _fallback_warned:
        _fallback_warned.add(folder)
        why = ("PNG (always compressed)" if _is_png(path) else
               "TIFF (compressed, interleaved, non-contiguous or not uint16)" if path.lower().endswith(
                   (".tif", ".tiff")) else ".npy (not uint16)")
        warnings.warn(
            f"{path}: {why} not memory-mappable, read whole for every crop (files in {folder}); write them as "
            f"uncompressed uint16 TIFF (data.io.write_merged_tiff) for fast training",
            RuntimeWarning,
            stacklevel=3,
        )


def _open_merged(row: Mapping[str, Any], channels: Sequence[str], warn: bool = True) -> np.ndarray | StackedChannels:
    path = str(row[MERGED_COLUMN])
    mapped = _memmap_tiff(path)
    if mapped is None:
        _warn_full_read(path, warn)
        return _read_merged_site(row, channels)[0]
    mm, desc = mapped
    idx = _channel_index(mm.shape, _declared_channels(desc), channels, path)
    if idx == list(range(mm.shape[0])):
        return mm
    return StackedChannels([mm[i] for i in idx])


def _open_npy(row: Mapping[str, Any], channels: Sequence[str], warn: bool = True) -> np.ndarray:
    path = str(row[MERGED_COLUMN])
    arr = _load_npy(path)
    _channel_index(arr.shape, None, channels, path)
    if not _is_raw_dtype(arr.dtype):
        _warn_full_read(path, warn)
        return read_npy(path)
    if not arr.dtype.isnative:
        return read_npy(path)
    return arr


def _open_per_channel(row: Mapping[str, Any], channels: Sequence[str], warn: bool = True) -> StackedChannels:
    paths = _channel_paths(row, channels)
    planes = []
    for p in paths:
        if _is_png(p):
            _warn_full_read(p, warn)
            plane = _read_png(p)[None]
        else:
            mapped = _memmap_tiff(p)
            if mapped is None:
                _warn_full_read(p, warn)
                plane, _ = _read_tiff(p)
            else:
                plane = mapped[0]
        if plane.shape[0] != 1:
            raise DataError(f"{p}: {plane.shape[0]} planes, expected one channel per file")
        if planes and plane.shape[1:] != planes[0].shape:
            raise DataError(f"{p}: shape {plane.shape[1:]} differs from {planes[0].shape} of {paths[0]}")
        planes.append(plane[0])
    return StackedChannels(planes)


_SITE_OPENERS = {"merged": _open_merged, "npy": _open_npy, "per-channel": _open_per_channel}


def open_site_array(
    row: Mapping[str, Any], channels: Sequence[str] = DEFAULT_CHANNELS, illum: bool = True,
    warn_full_read: bool = True,
) -> np.ndarray | StackedChannels:
    """Lazy read-only (C,H,W) uint16 site, so a worker reads only the bytes of its crops.

    Uncompressed contiguous uint16 TIFFs and .npy files are memory-mapped. PNGs, other dtypes and compressed or
    non-contiguous TIFFs cannot be, so they are read whole and converted (a RuntimeWarning says so once per folder,
    unless ``warn_full_read`` is False);
    the result is then an in-memory array. A row with illumination functions gives a ``StackedChannels`` of
    ``IlluminatedPlane``: each indexed region is divided by the same region of its function, as ``read_site`` does.
    """
    layout = _layout(row)
    opener = _SITE_OPENERS.get(layout)
    if opener is None:
        raise DataError(f"unknown site layout {layout!r}; expected one of {sorted(_SITE_OPENERS)}")
    channels = tuple(channels)
    site = opener(row, channels, warn_full_read)
    functions = _site_illum(row, channels, site.shape[1:]) if illum else None
    if functions is None:
        return site
    planes = site.planes if isinstance(site, StackedChannels) else [site[c] for c in range(site.shape[0])]
    return StackedChannels([IlluminatedPlane(plane, f) for plane, f in zip(planes, functions)])


def site_otsu(row: Mapping[str, Any]) -> float:
    """Threshold as ``read_site`` resolves it: the merged TIFF's description first, then the row's ``Otsu_th``."""
    path = row.get(MERGED_COLUMN)
    if isinstance(path, str) and path.lower().endswith((".tif", ".tiff")):
        with _open_tiff(path) as tif:
            value = _otsu_from_description(_description(tif), path)
        if not math.isnan(value):
            return value
    return _row_otsu(row)


def site_shape(row: Mapping[str, Any], channels: Sequence[str] = DEFAULT_CHANNELS) -> tuple[int, int, int]:
    """(C, H, W) of one site without reading its pixels (PNG sizes come from their headers)."""
    channels = tuple(channels)
    if _layout(row) == "per-channel":
        paths = _channel_paths(row, channels)
        if all(_is_png(p) for p in paths):
            shapes = [_png_shape(p) for p in paths]
            for p, shape in zip(paths, shapes):
                if shape != shapes[0]:
                    raise DataError(f"{p}: shape {shape} differs from {shapes[0]} of {paths[0]}")
            return (len(paths),) + shapes[0]
    return tuple(int(n) for n in open_site_array(row, channels, illum=False).shape)  # type: ignore[return-value]


_TIFF_FORMATS = {2: "s", 3: "H", 4: "I"}  # ASCII, SHORT, LONG: all that plain uncompressed uint16 pages use
_TIFF_SIZES = {"s": 1, "H": 2, "I": 4}


def _ifd_value(fh: Any, order: str, typ: int, count: int, raw: bytes) -> Any:
    fmt = _TIFF_FORMATS.get(typ)
    if fmt is None:
        return None
    size = _TIFF_SIZES[fmt] * count
    if size > 4:
        fh.seek(struct.unpack(order + "I", raw)[0])
        raw = fh.read(size)
    if fmt == "s":
        return raw[:count].rstrip(b"\0").decode("utf-8", "replace")
    return struct.unpack(f"{order}{count}{fmt}", raw[:size])


def plain_tiff_layout(path: str, max_pages: int = 64) -> tuple[np.memmap, str] | None:
    """(pages, H, W) memmap and page-0 description of a classic, uncompressed, contiguous uint16 multi-page TIFF.

    Why: tifffile's general parser costs milliseconds of GIL-holding Python per file, which caps a thread pool at a
    few hundred sites/s. The paper's merged TIFFs (and ours) are plain strips, so reading a few IFD entries suffices.
    Anything else (BigTIFF, compression, tiles, interleaved samples, gaps) returns None: the caller then uses
    ``data.io.open_site_array``, which reads every layout and names the file in its errors.
    """
    if not_a_regular_file(path) is not None:
        return None  # the general reader names what is wrong; opening a FIFO here would block
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            order = {b"II": "<", b"MM": ">"}.get(head[:2])
            if order is None or struct.unpack(order + "H", head[2:4])[0] != 42:
                return None
            ifd, pages, description = struct.unpack(order + "I", head[4:8])[0], [], ""
            while ifd and len(pages) < max_pages:
                fh.seek(ifd)
                (n,) = struct.unpack(order + "H", fh.read(2))
                entries = fh.read(12 * n)
                (ifd,) = struct.unpack(order + "I", fh.read(4))
                tags: dict[int, Any] = {}
                for i in range(n):
                    tag, typ, count, raw = struct.unpack(order + "HHI4s", entries[12 * i : 12 * i + 12])
                    if tag in (256, 257, 258, 259, 270, 273, 277, 279, 284, 322, 339):
                        tags[tag] = _ifd_value(fh, order, typ, count, raw)
                if not pages:
                    description = tags.get(270) or ""
                pages.append(tags)
        if ifd or not pages:
            return None
        first = pages[0]
        height, width = first[257][0], first[256][0]
        start, cursor = first[273][0], first[273][0]
        for tags in pages:
            plain = (tags.get(258, (1,))[0] == 16 and tags.get(259, (1,))[0] == 1 and tags.get(277, (1,))[0] == 1
                     and tags.get(339, (1,))[0] == 1 and 322 not in tags)
            if not plain or tags[257][0] != height or tags[256][0] != width:
                return None
            for offset, count in zip(tags[273], tags[279]):
                if offset != cursor:
                    return None
                cursor += count
        if cursor - start != len(pages) * height * width * 2 or os.path.getsize(path) < cursor:
            return None
        mm = np.memmap(path, dtype=order + "u2", mode="r", offset=start, shape=(len(pages), height, width))
        return mm, description
    except (OSError, struct.error, KeyError, IndexError, TypeError, ValueError):
        return None


def open_plain_merged(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[Any, float] | None:
    """Pixels (lazy) and Otsu of a plain merged TIFF row, or None to take the general reader (``open_site_array``).

    The inference prefetcher's fast path: no tifffile parsing, so reader threads do not contend for the GIL.
    A row with illumination functions gives None, so the general reader applies them.
    """
    if any(isinstance(value, str) and value for value in (row.get(illum_filename_column(ch)) for ch in channels)):
        return None
    path = row.get(MERGED_COLUMN)
    if row.get(LAYOUT_COLUMN) not in (None, "merged") or not isinstance(path, str):
        return None
    if not path.lower().endswith((".tif", ".tiff")):
        return None
    found = plain_tiff_layout(path)
    if found is None:
        return None
    mm, text = found
    try:
        desc = json.loads(text) if text else {}
    except ValueError:
        desc = {}
    desc = desc if isinstance(desc, dict) else {}
    declared = desc.get("channels")
    if isinstance(declared, list) and len(declared) == mm.shape[0] and all(isinstance(c, str) for c in declared):
        if any(c not in declared for c in channels):
            return None
        idx = [declared.index(c) for c in channels]
        pixels: Any = mm if idx == list(range(mm.shape[0])) else StackedChannels([mm[i] for i in idx])
    elif mm.shape[0] == len(channels):
        pixels = mm
    else:
        return None
    try:
        otsu = _otsu_from_description(desc, path)
    except DataError:
        return None  # the general reader reports the bad threshold with the file's name
    return pixels, otsu if not math.isnan(otsu) else _row_otsu(row)




def _check_pixels(pixels: np.ndarray, path: str) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.dtype != _UINT16:
        raise DataError(f"{path}: refusing to write dtype {arr.dtype}, expected uint16")
    if arr.ndim != 3:
        raise DataError(f"{path}: refusing to write shape {arr.shape}, expected (C,H,W)")
    return np.ascontiguousarray(arr)


def write_merged_tiff(
    path: str | os.PathLike[str],
    pixels_uint16_CHW: np.ndarray,
    otsu: float | None,
    channels: Sequence[str] | None = None,
) -> None:
    """Write a site in the paper's release format: uncompressed, contiguous (memory-mappable) and atomic.

    ``channels`` defaults to DEFAULT_CHANNELS when the channel count matches, and is stored in the description.
    """
    arr = _check_pixels(pixels_uint16_CHW, str(path))
    if channels is None and arr.shape[0] == len(DEFAULT_CHANNELS):
        channels = DEFAULT_CHANNELS
    if channels is not None and len(channels) != arr.shape[0]:
        raise DataError(f"{path}: {len(channels)} channel names for {arr.shape[0]} channels")
    desc: dict[str, Any] = {}
    if otsu is not None and not math.isnan(float(otsu)):
        desc["otsuth"] = float(otsu)
    if channels is not None:
        desc["channels"] = list(channels)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        tifffile.imwrite(fh, arr, description=json.dumps(desc), metadata=None, photometric="minisblack")


def write_channel_tiffs(paths: Sequence[str | os.PathLike[str]], pixels_uint16_CHW: np.ndarray) -> None:
    """Write one uncompressed single-plane TIFF per channel (the JUMP layout), each atomically."""
    arr = _check_pixels(pixels_uint16_CHW, str(paths[0]) if paths else "<no paths>")
    if len(paths) != arr.shape[0]:
        raise DataError(f"{len(paths)} paths for {arr.shape[0]} channels")
    for p, plane in zip(paths, arr):
        with atomic_path(p) as tmp, open(tmp, "wb") as fh:
            tifffile.imwrite(fh, plane, metadata=None, photometric="minisblack")


def write_npy(path: str | os.PathLike[str], pixels_uint16_CHW: np.ndarray) -> None:
    """Write a (C,H,W) uint16 site as .npy atomically (np.save would append .npy to a temporary name)."""
    arr = _check_pixels(pixels_uint16_CHW, str(path))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
