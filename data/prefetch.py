"""Fast site loader for inference: reader threads fill reused (pinned) uint16 host buffers ahead of the device.

Why not a DataLoader: worker processes copy every site through shared memory and collate it again, which costs
more than the model on a fast GPU. Here each site is read once, straight from the (memory-mapped) file into a slot
of a preallocated batch buffer, only over the rows and columns the tiles cover. A ring of ``depth`` buffers lets the
threads read the next batches while the device embeds the current one; on CUDA the host-to-device copy runs on a
side stream from pinned memory and the slot is reused only after that copy has finished.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from data.io import open_plain_merged, open_site_array, site_otsu
from data.schema import image_paths
from data.tiling import Region
from utils.errors import ConfigError, DataError


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


def read_site_region(
    row: Mapping[str, Any], channels: Sequence[str], region: Region, out: np.ndarray
) -> float:
    """Copy the region of one site into ``out`` (C, h, w) and return its Otsu threshold (raw units, NaN if unknown)."""
    fast = open_plain_merged(row, channels)
    if fast is not None:
        arr, otsu = fast
    else:
        arr, otsu = open_site_array(row, channels, warn_full_read=False), None  # a whole site is wanted here
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
        # a batch never holds more sites than the table has, so --batch_size 10**9 allocates one plate, not 10**9
        self.batch_size = min(batch_size, max(1, len(self.rows)))
        self.device = torch.device(device)
        self.threads = max(0, int(threads))
        n_batches = math.ceil(len(self.rows) / batch_size)
        self.depth = max(1, min(depth if self.threads > 0 else 1, n_batches))
        self.pin = self.device.type == "cuda" if pin_memory is None else pin_memory

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _alloc(self) -> torch.Tensor:
        shape = (self.batch_size, len(self.channels), self.region.h, self.region.w)
        try:
            buf = torch.empty(shape, dtype=torch.uint16, pin_memory=self.pin)
        except (RuntimeError, MemoryError):  # torch reports a failed host allocation as RuntimeError
            gib = math.prod(shape) * 2 / 2**30
            raise ConfigError(f"--batch_size {self.batch_size}: a buffer of {self.batch_size} sites {shape[1:]} "
                              f"needs {gib:.1f} GiB of host memory, which cannot be allocated; lower --batch_size"
                              ) from None
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
