"""Run logging (TensorBoard, JSON-lines log.txt, hp.json) that only rank 0 performs, so ranks never race on files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from utils.fileio import ensure_dir, write_json_atomic, write_text_atomic


def _plain(value: Any) -> Any:
    """Turn tensors and numpy scalars into JSON-friendly floats."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _kept(record: dict[str, Any], first_epoch: int) -> bool:
    """Whether a log.txt line survives a resume at ``first_epoch`` (see ``RunLogger.truncate_epochs``)."""
    epoch = record.get("epoch", -1)
    return epoch <= first_epoch if record.get("event") == "probe" else epoch < first_epoch


class RunLogger:
    """TensorBoard scalars, a per-epoch JSON line in ``log.txt`` and ``hp.json``; silent on non-main ranks."""

    def __init__(
        self, out_dir: str | Path, is_main: bool, tensorboard: bool = True, tb_dir: str | Path | None = None
    ) -> None:
        self.out_dir = Path(out_dir)
        self.is_main = is_main
        self._writer = None
        if is_main:
            ensure_dir(self.out_dir)
            if tensorboard:
                # lazy: tensorboard costs about a second to import; other ranks and tensorboard=False skip it
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(tb_dir or self.out_dir / "tensorboard"))

    @property
    def log_path(self) -> Path:
        """The JSON-lines file with one record per finished epoch."""
        return self.out_dir / "log.txt"

    def write_hparams(self, hparams: dict[str, Any]) -> None:
        """Write the run's flags to ``hp.json`` (atomically)."""
        if self.is_main:
            write_json_atomic(self.out_dir / "hp.json", {k: _plain(v) for k, v in hparams.items()})

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train/") -> None:
        """Log scalars against the global optimizer step."""
        if self._writer is None:
            return
        for key, value in values.items():
            value = _plain(value)
            if isinstance(value, (int, float)):
                self._writer.add_scalar(prefix + key, value, step)

    def truncate_epochs(self, first_epoch: int) -> None:
        """Drop log lines of epochs that a resumed run will redo, so each epoch appears once.

        A training line's ``epoch`` is the 0-based epoch it trained; a probe line's counts finished epochs (0 is
        before the first step), so a run resumed at ``first_epoch`` keeps probes up to and including it.
        """
        if not self.is_main or not self.log_path.exists():
            return
        kept = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        kept = [line for line in kept if _kept(json.loads(line), first_epoch)]
        write_text_atomic(self.log_path, "".join(line + "\n" for line in kept))

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one JSON line for a finished epoch (rewritten atomically) and flush TensorBoard."""
        if not self.is_main:
            return
        previous = self.log_path.read_text() if self.log_path.exists() else ""
        line = json.dumps({k: _plain(v) for k, v in record.items()}, sort_keys=False)
        write_text_atomic(self.log_path, previous + line + "\n")
        if self._writer is not None:
            epoch = int(record.get("epoch", 0))
            for key, value in record.items():
                value = _plain(value)
                if key != "epoch" and isinstance(value, (int, float)):
                    self._writer.add_scalar("epoch/" + key, value, epoch)
            self._writer.flush()

    def log_probe(self, finished_epochs: int, values: dict[str, Any]) -> None:
        """Append a probe line ``{"event": "probe", "epoch": finished epochs, ...}`` and TensorBoard ``probe/*``."""
        if not self.is_main:
            return
        record = {"event": "probe", "epoch": int(finished_epochs), **{k: _plain(v) for k, v in values.items()}}
        previous = self.log_path.read_text() if self.log_path.exists() else ""
        write_text_atomic(self.log_path, previous + json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar("probe/" + key.removeprefix("probe_"), float(value), int(finished_epochs))
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
