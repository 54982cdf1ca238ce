"""Atomic file writes, so a killed run never leaves a partial file that looks complete."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utils.errors import ConfigError


def _default_file_mode() -> int:
    """The mode open() would give a new file, because mkstemp's private 0600 would hide outputs from co-workers."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create an output folder up front, so an impossible output path fails before the work, naming the folder."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot create output folder ({exc.strerror})") from None
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    target = Path(path)
    if target.is_dir():  # os.replace would fail only after the whole file was written, with a bare IsADirectoryError
        raise ConfigError(f"{target}: is a folder, expected a file path to write")
    ensure_dir(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot write ({exc.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            if exc.filename is None and exc.errno is not None:  # a write through a handle names no file: name it
                raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(target)) from exc
            raise
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], Any]) -> None:
    """Call ``writer(tmp_path)`` and atomically move the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically, indented for people to read."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_csv_atomic(df: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """Write a DataFrame as CSV atomically and without the unnamed index column."""
    kwargs.setdefault("index", False)
    atomic_write(path, lambda tmp: df.to_csv(tmp, **kwargs))
