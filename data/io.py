"""Site pixels from merged TIFFs, per-channel TIFFs or .npy files, kept as uint16 and checked before use."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import tifffile

from data.schema import (
    DEFAULT_CHANNELS,
    LAYOUT_COLUMN,
    MERGED_COLUMN,
    OTSU_COLUMN,
    filename_column,
    layout_of_path,
    otsu_to_raw,
)
from utils.errors import DataError
from utils.fileio import atomic_path

_UINT16 = np.dtype(np.uint16)
_fallback_warned: set[str] = set()


class _ThreadErrors(logging.Handler):
    """Collects tifffile's logged errors (it logs, rather than raises, on a truncated page chain)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def _open_tiff(path: str) -> Iterator[tifffile.TiffFile]:
    """Open a TIFF, turning every failure (missing, not a TIFF, broken page chain) into a DataError naming it."""
    handler = _ThreadErrors()
    tlog = logging.getLogger("tifffile")
    tlog.addHandler(handler)
    try:
        try:
            tif = tifffile.TiffFile(path)
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a folder, expected an image file") from None
        except Exception as exc:  # tifffile raises many types on garbage input
            raise DataError(f"{path}: corrupt or unreadable TIFF ({_short(exc)})") from None
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


def _check_dtype(dtype: np.dtype, path: str) -> None:
    if dtype.kind != "u" or dtype.itemsize != 2:
        raise DataError(f"{path}: dtype {dtype}, expected uint16")


def _read_tiff(path: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Whole (C,H,W) uint16 array and the page-0 description of one TIFF."""
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
    return np.ascontiguousarray(arr, dtype=_UINT16), desc


def _declared_channels(desc: Mapping[str, Any]) -> list[str] | None:
    names = desc.get("channels")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return names
    return None


def _channel_index(n_file: int, declared: list[str] | None, channels: Sequence[str], path: str) -> list[int]:
    """Indices of ``channels`` in a file: by name when the file declares names, else the file order must match."""
    if declared is not None and len(declared) == n_file:
        absent = [c for c in channels if c not in declared]
        if absent:
            raise DataError(f"{path}: file declares channels {declared}, missing {absent}")
        return [declared.index(c) for c in channels]
    if n_file != len(channels):
        raise DataError(f"{path}: {n_file} channels, expected {len(channels)} ({', '.join(channels)})")
    return list(range(n_file))


def read_merged_tiff(path: str | os.PathLike[str], n_channels: int | None = None) -> tuple[np.ndarray, float]:
    """The paper's release format: a (C,H,W) uint16 TIFF with the Otsu threshold (raw units) in its description."""
    path = str(path)
    arr, desc = _read_tiff(path)
    if n_channels is not None and arr.shape[0] != n_channels:
        raise DataError(f"{path}: {arr.shape[0]} channels, expected {n_channels}")
    return arr, _otsu_from_description(desc, path)


def read_channel_tiffs(paths: Sequence[str | os.PathLike[str]]) -> np.ndarray:
    """Stack one single-plane TIFF per channel (the JUMP layout) in the order given."""
    planes = []
    first_shape: tuple[int, ...] | None = None
    for p in paths:
        p = str(p)
        arr, _ = _read_tiff(p)
        if arr.shape[0] != 1:
            raise DataError(f"{p}: {arr.shape[0]} planes, expected one channel per file")
        if first_shape is None:
            first_shape = arr.shape[1:]
        elif arr.shape[1:] != first_shape:
            raise DataError(f"{p}: shape {arr.shape[1:]} differs from {first_shape} of {paths[0]}")
        planes.append(arr[0])
    if not planes:
        raise DataError("no channel files given")
    return np.stack(planes)


def _load_npy(path: str) -> np.ndarray:
    """Memory-mapped (C,H,W) uint16 .npy, checked for dtype and rank."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
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
    """A whole (C,H,W) uint16 .npy site in memory (the paper's second format; Otsu comes from the CSV)."""
    arr = _load_npy(str(path))
    try:
        return np.array(arr, dtype=_UINT16)  # a real copy: no open file handle, writable, native byte order
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: unreadable .npy data ({_short(exc)})") from None


def _layout(row: Mapping[str, Any]) -> str:
    """Row layout from the table, or inferred for hand-made rows."""
    layout = row.get(LAYOUT_COLUMN)
    if isinstance(layout, str) and layout:
        return layout
    merged = row.get(MERGED_COLUMN)
    if isinstance(merged, str) and merged:
        inferred = layout_of_path(merged)
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
    idx = _channel_index(arr.shape[0], _declared_channels(desc), channels, path)
    if idx != list(range(arr.shape[0])):
        arr = np.ascontiguousarray(arr[idx])
    otsu = _otsu_from_description(desc, path)
    return arr, otsu if not math.isnan(otsu) else _row_otsu(row)


def _read_npy_site(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[np.ndarray, float]:
    path = str(row[MERGED_COLUMN])
    arr = read_npy(path)
    _channel_index(arr.shape[0], None, channels, path)
    return arr, _row_otsu(row)


def _read_per_channel_site(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[np.ndarray, float]:
    return read_channel_tiffs(_channel_paths(row, channels)), _row_otsu(row)


_SITE_READERS = {"merged": _read_merged_site, "npy": _read_npy_site, "per-channel": _read_per_channel_site}


def read_site(row: Mapping[str, Any], channels: Sequence[str] = DEFAULT_CHANNELS) -> tuple[np.ndarray, float]:
    """One site as uint16 (C,H,W) in ``channels`` order plus its Otsu threshold in raw units (NaN if unknown).

    The threshold comes from the merged TIFF's description when it has one, else from the row's ``Otsu_th``.
    """
    layout = _layout(row)
    reader = _SITE_READERS.get(layout)
    if reader is None:
        raise DataError(f"unknown site layout {layout!r}; expected one of {sorted(_SITE_READERS)}")
    return reader(row, tuple(channels))


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


def _memmap_tiff(path: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(C,H,W) memmap of an uncompressed, contiguous, native-order uint16 TIFF; None when the file does not allow it."""
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
    if offset is None or axes.endswith("S") or not dtype.isnative:
        return None
    try:
        mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (ValueError, OSError) as exc:
        raise DataError(f"{path}: truncated or unreadable TIFF data ({_short(exc)})") from None
    return _to_chw(mm, axes, path), desc


def _warn_full_read(path: str) -> None:
    """Say once per process that a compressed file is read whole, so slow training has a visible cause."""
    folder = os.path.dirname(path)
    if folder not in _fallback_warned:
        _fallback_warned.add(folder)
        warnings.warn(
            f"{path}: TIFF not memory-mappable (compressed, interleaved or non-contiguous), read whole for every crop "
            f"(files in {folder})",
            RuntimeWarning,
            stacklevel=3,
        )


def _open_merged(row: Mapping[str, Any], channels: Sequence[str]) -> np.ndarray | StackedChannels:
    path = str(row[MERGED_COLUMN])
    mapped = _memmap_tiff(path)
    if mapped is None:
        _warn_full_read(path)
        return _read_merged_site(row, channels)[0]
    mm, desc = mapped
    idx = _channel_index(mm.shape[0], _declared_channels(desc), channels, path)
    if idx == list(range(mm.shape[0])):
        return mm
    return StackedChannels([mm[i] for i in idx])


def _open_npy(row: Mapping[str, Any], channels: Sequence[str]) -> np.ndarray:
    path = str(row[MERGED_COLUMN])
    arr = _load_npy(path)
    _channel_index(arr.shape[0], None, channels, path)
    if not arr.dtype.isnative:
        return read_npy(path)
    return arr


def _open_per_channel(row: Mapping[str, Any], channels: Sequence[str]) -> StackedChannels:
    paths = _channel_paths(row, channels)
    planes = []
    for p in paths:
        mapped = _memmap_tiff(p)
        if mapped is None:
            _warn_full_read(p)
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
    row: Mapping[str, Any], channels: Sequence[str] = DEFAULT_CHANNELS
) -> np.ndarray | StackedChannels:
    """Lazy read-only (C,H,W) uint16 site, so a worker reads only the bytes of its crops.

    Uncompressed contiguous TIFFs and .npy files are memory-mapped. Compressed or non-contiguous TIFFs cannot be,
    so they are read whole (a RuntimeWarning says so once per folder); the result is then an in-memory array.
    """
    layout = _layout(row)
    opener = _SITE_OPENERS.get(layout)
    if opener is None:
        raise DataError(f"unknown site layout {layout!r}; expected one of {sorted(_SITE_OPENERS)}")
    return opener(row, tuple(channels))


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
    """(C, H, W) of one site without reading its pixels."""
    return tuple(int(n) for n in open_site_array(row, channels).shape)  # type: ignore[return-value]


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
    """
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
