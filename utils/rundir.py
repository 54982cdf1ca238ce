"""Output folders that are never shared by two runs and never left half-written.

Why: a run's results are a set of files (tables, figures, ``run.json``), and a crash, a full disk, a refused
``--resume`` or a second run into the same folder must never leave that set mixed or looking complete when it is
not. Three pieces, used together through :func:`output_run`:

- :class:`OutputLock`: ``<folder>/.lock`` names its holder (pid, host, start time, command). It is created with
  ``os.link`` from a finished temporary file, so it exists only with its content. A second run stops with a
  one-line error naming the holder; a lock whose process is dead on this host is taken over with a warning (one
  taker wins: the stale file is renamed away before the new one is linked). torchrun ranks share rank 0's lock.
- :class:`Transaction`: final files are written under ``<folder>/.staging-<pid>/`` (:meth:`Transaction.path`).
  :meth:`Transaction.commit` writes the file list to ``COMMIT`` in the staging folder, removes the old
  ``run.json``, moves each file into place, removes the previous run's final files that this run did not make,
  and moves ``run.json`` in last. A failure before ``COMMIT`` leaves the previous results untouched; a kill during
  the moves is finished (rolled forward) by the next run's :func:`recover`, and until then the folder has no
  ``run.json``.
- :func:`completed_run`: what readers call. ``run.json`` present (and no interrupted commit) is what "complete"
  means; nothing else is trusted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from utils.errors import ConfigError, DataError
from utils.fileio import ensure_dir, write_json_atomic

LOCK_NAME = ".lock"
STAGING_PREFIX = ".staging-"
COMMIT_NAME = "COMMIT"
RUN_FILE = "run.json"


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500]}


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (EPERM means it exists and is someone else's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(lock: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-12-03T08:00:00+0000 (python inference.py ...)``."""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
            f" ({holder.get('command', '?')})")


class OutputLock:
    """An exclusive claim on an output folder by one run (one process, or rank 0 of a torchrun job)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.holder = _holder()
        self.held = False
        self.created = False  # the folder did not exist before this lock: an empty one is removed on release

    def acquire(self) -> OutputLock:
        """Take the lock, or raise a ConfigError naming the run that holds it."""
        self.created = not self.folder.exists()
        ensure_dir(self.folder)
        tmp = self.folder / f".lock.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(self.holder))
            for _ in range(3):
                try:
                    os.link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot lock the output folder ({exc.strerror})") from None
        finally:
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"{self.folder}: could not take the output lock {self.path}; retry")

    def _take_over_if_stale(self) -> None:
        holder = _read_holder(self.path)
        if holder is None:  # released meanwhile: try again
            return
        pid = holder.get("pid")
        same_host = holder.get("host") == self.holder["host"]
        if holder and same_host and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
            stale = self.folder / f".lock.stale-{pid}"
            try:
                os.replace(self.path, stale)  # one taker wins; the others see a fresh lock next time
            except FileNotFoundError:
                return
            stale.unlink(missing_ok=True)
            warnings.warn(f"{self.folder}: took over a stale lock of {describe_holder(holder)}: that process is gone",
                          RuntimeWarning, stacklevel=3)
            return
        if not holder:
            raise ConfigError(f"{self.folder}: output folder is locked ({self.path} is unreadable); if no run is "
                              "writing here, remove it")
        where = "" if same_host else " (another host: remove the lock by hand if that run is gone)"
        raise ConfigError(f"{self.folder}: output folder is in use by {describe_holder(holder)}{where}; "
                          "wait for it to finish or use another output folder")

    def release(self) -> None:
        """Remove the lock if it is still this run's, and the folder too if this run made it and left it empty
        (a run that failed before writing anything leaves no trace)."""
        if self.held:
            holder = _read_holder(self.path)
            if holder and holder.get("pid") == self.holder["pid"] and holder.get("host") == self.holder["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False
            if self.created:
                try:
                    self.folder.rmdir()
                except OSError:  # not empty (results, or another run's files): it stays
                    pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _move_staged(staging: Path, folder: Path, files: list[str], stale: Iterable[str]) -> None:
    """The swap: old run.json out, new files in, the old run's leftovers out, run.json in last."""
    (folder / RUN_FILE).unlink(missing_ok=True)
    for rel in files:
        src = staging / rel
        if rel == RUN_FILE or not src.exists():  # already moved by an interrupted commit
            continue
        dst = folder / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_dir() and not src.is_dir():
            raise DataError(f"{dst}: is a folder, where this run writes a file; remove or rename it")
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)
    made = set(files)
    for rel in stale:
        if rel not in made and (folder / rel).is_file():
            (folder / rel).unlink()
    if (staging / RUN_FILE).exists():
        os.replace(staging / RUN_FILE, folder / RUN_FILE)
    shutil.rmtree(staging, ignore_errors=True)


def recover(folder: str | os.PathLike[str]) -> list[str]:
    """Finish commits a killed run had started and remove staging folders of runs that never reached commit.

    Call with the lock held. Returns one line per action, for the caller to report.
    """
    folder, done = Path(folder), []
    if not folder.is_dir():
        return done
    for staging in sorted(folder.glob(f"{STAGING_PREFIX}*")):
        if not staging.is_dir():
            continue
        commit = staging / COMMIT_NAME
        if commit.is_file():
            try:
                plan = json.loads(commit.read_text())
                _move_staged(staging, folder, list(plan["files"]), plan.get("stale", []))
            except (OSError, ValueError, KeyError) as exc:
                raise DataError(f"{staging}: cannot finish the interrupted commit ({exc}); remove it") from None
            done.append(f"{folder}: finished an interrupted commit ({len(plan['files'])} files)")
        else:
            shutil.rmtree(staging, ignore_errors=True)
            done.append(f"{folder}: removed the unfinished outputs of an earlier run ({staging.name})")
    return done


class Transaction:
    """Final files of one run, staged inside the output folder and swapped in together at the end."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.staging = self.folder / f"{STAGING_PREFIX}{os.getpid()}"
        self.committed = False

    def path(self, rel: str | os.PathLike[str]) -> Path:
        """Where to write the final file ``<folder>/<rel>`` now; its parent folder exists."""
        rel = Path(rel)
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"staged outputs are relative to the output folder, got {rel}")
        target = self.staging / rel
        ensure_dir(target.parent)
        return target

    def root(self) -> Path:
        """The staging folder itself, for writers that fill a folder (a logger, TensorBoard); it exists."""
        return ensure_dir(self.staging)

    def files(self) -> list[str]:
        """Every staged file, relative to the folder."""
        if not self.staging.is_dir():
            return []
        return sorted(str(p.relative_to(self.staging)) for p in self.staging.rglob("*")
                      if p.is_file() and p.name != COMMIT_NAME)

    def commit(self, run: dict[str, Any] | None = None, stale: Iterable[str] = ()) -> list[str]:
        """Swap the staged files in, ``run.json`` (``run``, when given) last; ``stale``: final-file names of an
        earlier run that this one does not replace are removed. Returns the final paths."""
        if run is not None:
            write_json_atomic(self.path(RUN_FILE), run)
        files = self.files()
        write_json_atomic(self.staging / COMMIT_NAME, {"files": files, "stale": sorted(set(stale))})
        _move_staged(self.staging, self.folder, files, stale)
        self.committed = True
        return [str(self.folder / f) for f in files]

    def abort(self) -> None:
        """Drop the staged files: the previous results stay as they were."""
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()  # a failure anywhere before commit leaves the previous complete results as they were


def recover_and_report(folder: str | os.PathLike[str]) -> None:
    """``recover`` with each action reported on stderr; every locking entry point calls this once it holds the lock."""
    for line in recover(folder):
        print(line, file=sys.stderr)


@contextmanager
def output_run(folder: str | os.PathLike[str], lock: bool = True) -> Iterator[Transaction]:
    """Lock ``folder`` (unless ``lock`` is False: a non-zero torchrun rank, or a caller holding it), finish or
    clean what a killed run left, and yield a Transaction that is aborted unless committed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder}: output folder is a file; give a folder")
    held = OutputLock(folder).acquire() if lock else None
    try:
        if lock:
            recover_and_report(folder)
        with Transaction(folder) as tx:
            yield tx
    finally:
        if held is not None:
            held.release()


def interrupted(folder: str | os.PathLike[str]) -> bool:
    """Whether a commit into ``folder`` was started and not finished (its run.json may be missing or stale)."""
    return any((s / COMMIT_NAME).is_file() for s in Path(folder).glob(f"{STAGING_PREFIX}*"))


def completed_run(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's run.json when its run is complete, None when it has none; a DataError when a commit was
    interrupted or run.json is unreadable, because then the tables beside it are a mix."""
    folder = Path(folder)
    if interrupted(folder):
        raise DataError(f"{folder}: a run was killed while swapping its results in; rerun it into this folder to "
                        "finish, or use another folder")
    run_path = folder / RUN_FILE
    if not run_path.is_file():
        return None
    try:
        run = json.loads(run_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{run_path}: unreadable ({exc})") from None
    if not isinstance(run, dict):
        raise DataError(f"{run_path}: not a run record")
    return run
