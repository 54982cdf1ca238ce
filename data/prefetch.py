"""Fast site loader for inference: reader threads fill reused (pinned) uint16 host buffers ahead of the device.

Why not a DataLoader: worker processes copy every site through shared memory and collate it again, which costs
more than the model on a fast GPU. Here each site is read once, straight from the (memory-mapped) file into a slot
of a preallocated batch buffer, only over the rows and columns the tiles cover. A ring of ``depth`` buffers lets the
threads read the next batches while the device embeds the current one; on CUDA the host-to-device copy runs on a
side stream from pinned memory and the slot is reused only after that copy has finished.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch

from data.io import StackedChannels, open_site_array
from data.schema import DEFAULT_CHANNELS, LAYOUT_COLUMN, MERGED_COLUMN, OTSU_COLUMN, image_paths, otsu_to_raw
from utils.errors import DataError


@dataclass(frozen=True)
class Region:
    """The part of every site that the tiles cover: read only these bytes."""

    height: int
    width: int
    y0: int
    x0: int
    h: int
    w: int


@dataclass
class SiteBatch:
    """One batch on the device; ``pixels``/``otsu`` are padded to the buffer size, the first ``count`` rows are real."""

    pixels: torch.Tensor
    otsu: torch.Tensor
    positions: np.ndarray
    ok: np.ndarray
    errors: list[tuple[int, str]]
    otsu_missing: bool = True

    @property
    def count(self) -> int:
        """Number of real sites in the batch (the rest of the buffer is padding)."""
        return len(self.positions)


def _description_otsu(path: str) -> float:
    """The paper's ``otsuth`` from page 0 of a merged TIFF, in raw units; NaN when it has none."""
    try:
        with tifffile.TiffFile(path) as tif:
            text = tif.pages.first.description
    except Exception as exc:  # open_site_array already validated the file; keep the message one line anyway
        raise DataError(f"{path}: cannot read the TIFF description ({type(exc).__name__})") from None
    try:
        desc = json.loads(text) if text else {}
    except ValueError:
        return math.nan
    value = desc.get("otsuth") if isinstance(desc, dict) else None
    try:
        return otsu_to_raw(None if value is None else float(value))
    except (TypeError, ValueError):
        raise DataError(f"{path}: ImageDescription otsuth {value!r} is not a number") from None


def site_otsu(row: Mapping[str, Any]) -> float:
    """Threshold as ``data.io.read_site`` resolves it: the TIFF description first, then the row's ``Otsu_th``."""
    path = row.get(MERGED_COLUMN)
    if isinstance(path, str) and path.lower().endswith((".tif", ".tiff")):
        value = _description_otsu(path)
        if not math.isnan(value):
            return value
    stored = row.get(OTSU_COLUMN)
    return math.nan if stored is None else otsu_to_raw(float(stored))


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


def _fast_merged(row: Mapping[str, Any], channels: Sequence[str]) -> tuple[Any, float] | None:
    """Pixels (lazy) and Otsu of a plain merged TIFF row, or None to take the general reader."""
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
    value = desc.get("otsuth")
    try:
        otsu = otsu_to_raw(None if value is None else float(value))
    except (TypeError, ValueError):
        return None
    if math.isnan(otsu):
        stored = row.get(OTSU_COLUMN)
        otsu = math.nan if stored is None else otsu_to_raw(float(stored))
    return pixels, otsu


def read_site_region(
    row: Mapping[str, Any], channels: Sequence[str], region: Region, out: np.ndarray
) -> float:
    """Copy the region of one site into ``out`` (C, h, w) and return its Otsu threshold (raw units, NaN if unknown)."""
    fast = _fast_merged(row, channels)
    if fast is not None:
        arr, otsu = fast
    else:
        arr, otsu = open_site_array(row, channels), None
    expected = (len(channels), region.height, region.width)
    if tuple(arr.shape) != expected:
        name = image_paths(row, channels)[0] if image_paths(row, channels) else "site"
        raise DataError(f"{name}: shape {tuple(arr.shape)} differs from {expected} of the other sites of its plate")
    try:
        np.copyto(out, arr[:, region.y0 : region.y0 + region.h, region.x0 : region.x0 + region.w])
    except (OSError, ValueError) as exc:
        name = ", ".join(image_paths(row, channels))
        raise DataError(f"{name}: unreadable pixel data ({exc})") from None
    return site_otsu(row) if otsu is None else otsu


class _Inline:
    """Executor stand-in for ``threads=0``: runs each read at submit time in the calling thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # re-raised by result(), like a real executor
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None


class SitePrefetcher:
    """Iterate a site table in order as device batches of raw uint16 pixels and Otsu thresholds.

    A site that cannot be read does not stop the iteration: it is reported in ``SiteBatch.errors`` (its position
    and a one-line message naming the file) and flagged in ``ok``; the caller decides to raise or to skip it.
    The yielded ``pixels`` may alias a host buffer on CPU: use them before asking for the next batch.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        channels: Sequence[str],
        region: Region,
        batch_size: int,
        device: torch.device,
        threads: int = 4,
        depth: int = 3,
        pin_memory: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.rows = table.to_dict("records")
        self.channels = tuple(channels)
        self.region = region
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.threads = max(0, int(threads))
        n_batches = math.ceil(len(self.rows) / batch_size)
        self.depth = max(1, min(depth if self.threads > 0 else 1, n_batches))
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _alloc(self) -> torch.Tensor:
        shape = (self.batch_size, len(self.channels), self.region.h, self.region.w)
        buf = torch.empty(shape, dtype=torch.uint16, pin_memory=self.pin)
        buf.zero_()
        return buf

    def _read(self, host: np.ndarray, j: int, pos: int) -> tuple[float, str | None]:
        try:
            return read_site_region(self.rows[pos], self.channels, self.region, host[j]), None
        except DataError as exc:
            return math.nan, str(exc)

    def __iter__(self) -> Iterator[SiteBatch]:
        order = list(range(len(self.rows)))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if not batches:
            return
        buffers = [self._alloc() for _ in range(self.depth)]
        hosts = [b.numpy() for b in buffers]
        copied: list[torch.cuda.Event | None] = [None] * self.depth
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        executor: Any = ThreadPoolExecutor(self.threads, "site-reader") if self.threads > 0 else _Inline()
        pending: deque[tuple[int, list[Future]]] = deque()

        def submit(k: int) -> None:
            slot = k % self.depth
            event = copied[slot]
            if event is not None:
                event.synchronize()
            futures = [executor.submit(self._read, hosts[slot], j, pos) for j, pos in enumerate(batches[k])]
            pending.append((k, futures))

        try:
            for k in range(self.depth):
                submit(k)
            while pending:
                k, futures = pending.popleft()
                slot = k % self.depth
                results = [f.result() for f in futures]
                positions = np.asarray(batches[k], dtype=np.int64)
                errors = [(int(p), msg) for p, (_, msg) in zip(positions, results) if msg is not None]
                ok = np.array([msg is None for _, msg in results], dtype=bool)
                otsu = torch.full((self.batch_size,), math.nan, dtype=torch.float32)
                otsu[: len(results)] = torch.tensor([v for v, _ in results], dtype=torch.float32)
                missing = bool(torch.isnan(otsu[: len(results)]).any())
                pixels = self._to_device(buffers[slot], stream, copied, slot)
                yield SiteBatch(pixels, otsu.to(self.device, non_blocking=True), positions, ok, errors, missing)
                if k + self.depth < len(batches):
                    submit(k + self.depth)
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def _to_device(
        self, buf: torch.Tensor, stream: torch.cuda.Stream | None, copied: list[Any], slot: int
    ) -> torch.Tensor:
        if stream is None:
            return buf if self.device.type == "cpu" else buf.to(self.device)
        with torch.cuda.stream(stream):
            dev = buf.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        copied[slot] = event
        torch.cuda.current_stream(self.device).wait_stream(stream)
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev
