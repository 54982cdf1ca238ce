"""Training of the supervised baseline: one readable loop, validation before training and after every epoch, model
selection by mean validation ROC-AUC, atomic ``model_best.pt`` (weights_only-loadable)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from supervised_baseline.config import SupervisedConfig
from supervised_baseline.data import Dataset, Standardiser, assign_parts, load_dataset, split_table
from supervised_baseline.metrics import mean_auc, per_assay
from supervised_baseline.model import FNN, masked_bce
from utils.errors import CheckpointError, ConfigError
from utils.fileio import atomic_path, write_csv_atomic, write_json_atomic
from utils.logging import RunLogger
from utils.rundir import output_run
from utils.seeding import keyed_generator, seed_everything

FORMAT = "cellpaint-ssl/supervised/1"
BEST = "model_best.pt"


TEST_OUTPUTS = ("test_metrics.csv", "test_summary.json")


TRAIN_OUTPUTS = (BEST, "train_summary.json", "splits.csv", "log.txt", "hp.json")


def resolve_device(gpus: tuple[int, ...] | None) -> tuple[torch.device, list[int]]:
    """The device and the GPU ids to use; without CUDA the run uses the CPU and says so."""
    if not torch.cuda.is_available():
        if gpus:
            print(f"note: no CUDA device; --g {' '.join(map(str, gpus))} ignored, running on the CPU", flush=True)
        return torch.device("cpu"), []
    visible = torch.cuda.device_count()
    ids = [g for g in (gpus or (0,)) if 0 <= g < visible]
    if gpus and len(ids) < len(gpus):
        print(f"note: GPU id(s) {sorted(set(gpus) - set(ids))} not visible ({visible} GPU(s)); "
              f"using {ids or [0]}", flush=True)
    ids = ids or [0]
    return torch.device(f"cuda:{ids[0]}"), ids


def build_model(n_in: int, n_out: int, cfg: SupervisedConfig) -> FNN:
    """The configured FNN."""
    m = cfg.model
    return FNN(n_in, n_out, m.hidden, m.dropout, m.input_dropout)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, device: torch.device, batch: int = 4096) -> np.ndarray:
    """Sigmoid probabilities (wells x assays) in eval mode."""
    model.eval()
    out = [torch.sigmoid(model(torch.from_numpy(x[i:i + batch]).to(device))).float().cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def validation(model: nn.Module, x: np.ndarray, y: np.ndarray, assays: list[str],
               device: torch.device) -> dict[str, float]:
    """Validation loss on the logits (the paper fed probabilities into its logit loss, a bug) and mean ROC-AUC."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x).to(device)).float().cpu()
    loss = float(masked_bce(logits, torch.from_numpy(y).float()))
    table = per_assay(torch.sigmoid(logits).numpy(), y, assays)
    return {"val_loss": loss, "val_mean_auc": mean_auc(table), "val_assays_scored": int(table["auc"].notna().sum())}


def better(new: dict[str, float], best: dict[str, float] | None) -> bool:
    """Higher mean validation AUC wins; when no validation assay has both classes, the lower loss does."""
    if best is None:
        return True
    a, b = new["val_mean_auc"], best["val_mean_auc"]
    if math.isnan(a) or math.isnan(b):
        return math.isnan(b) and (not math.isnan(a) or new["val_loss"] < best["val_loss"])
    return a > b


def checkpoint(model: nn.Module, ds: Dataset, std: Standardiser, cfg: SupervisedConfig, parts: np.ndarray,
               epoch: int, record: dict[str, float]) -> dict[str, Any]:
    """Everything evaluation needs, in plain types and tensors (loads with ``torch.load(weights_only=True)``)."""
    module = model.module if isinstance(model, nn.DataParallel) else model
    return {
        "format": FORMAT, "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "n_in": len(ds.features), "n_out": len(ds.assays), "features": list(ds.features), "assays": list(ds.assays),
        "kind": ds.kind, "model": {"hidden": list(cfg.model.hidden), "dropout": cfg.model.dropout,
                                   "input_dropout": cfg.model.input_dropout},
        "standardiser": {k: torch.from_numpy(getattr(std, k).astype(np.float64)) for k in ("median", "mean", "std")},
        "split": {str(c): str(p) for c, p in zip(ds.compounds, parts)},
        "config": cfg.to_dict(), "epoch": epoch, **{k: float(v) for k, v in record.items()},
    }


def save(obj: dict[str, Any], path: Path) -> None:
    """Atomic torch.save: a killed run never leaves a half-written model."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_model_file(path: str | Path) -> dict[str, Any]:
    """A ``model_best.pt`` of this tool, loaded with weights_only=True (checkpoints are untrusted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe file; report it as one line
        raise CheckpointError(f"checkpoint {path}: not loadable with weights_only=True ({str(exc).splitlines()[0]})"
                              ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a supervised-baseline model (format {FORMAT})")
    return obj


def train(cfg: SupervisedConfig) -> Path:
    """Train the FNN on the train part, select on val, write model_best.pt, splits.csv, log.txt, hp.json.

    The folder is locked and every file is staged (``utils.rundir``): a failed or killed rerun leaves the previous
    model and its scores as they were, and a finished one replaces them all together (old test scores go, since
    they belong to the old model). A rerun never resumes: log.txt starts afresh.
    """
    with output_run(cfg.output_dir) as tx:
        summary = _train(cfg, tx.root())
        tx.commit({"status": "complete", "stage": "trained", **summary}, stale=(*TRAIN_OUTPUTS, *TEST_OUTPUTS))
    best = Path(cfg.output_dir) / BEST
    print(f"{cfg.name} split {cfg.data.split}: {summary['n_train']} train / {summary['n_val']} val wells, "
          f"{summary['n_assays']} assays, best val mean AUC {summary['val_mean_auc']:.3f} at epoch "
          f"{summary['best_epoch']}, {summary['seconds']:.1f} s -> {best}", flush=True)
    return best


def _train(cfg: SupervisedConfig, out: Path) -> dict[str, Any]:
    """The training loop, writing into ``out`` (the staging folder); returns the run's summary."""
    t0 = time.perf_counter()
    t = cfg.training
    ds = load_dataset(cfg.data)
    parts = assign_parts(ds, cfg.data, t.seed)
    write_csv_atomic(split_table(ds, parts), out / "splits.csv")
    train_ds, val_ds = ds.subset(parts == "train"), ds.subset(parts == "val")
    std = Standardiser.fit(train_ds.x)
    xt, xv = std.transform(train_ds.x), std.transform(val_ds.x)
    yt, yv = train_ds.y.astype(np.float32), val_ds.y.astype(np.float32)
    if np.isnan(yt).all():
        raise ConfigError(f"split {cfg.data.split}: the train part has no labelled entry")
    seed_everything(t.seed)
    device, ids = resolve_device(t.gpus)
    model: nn.Module = build_model(xt.shape[1], yt.shape[1], cfg).to(device)
    if len(ids) > 1:
        model = nn.DataParallel(model, device_ids=ids)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    loader = DataLoader(TensorDataset(torch.from_numpy(xt), torch.from_numpy(yt)), batch_size=t.batchsize,
                        shuffle=True, num_workers=t.workers, generator=keyed_generator(t.seed, "cpu", "loader"),
                        persistent_workers=t.workers > 0, pin_memory=device.type == "cuda")
    logger = RunLogger(out, True)
    logger.write_hparams(cfg.to_dict() | {"n_wells": {p: int((parts == p).sum()) for p in ("train", "val", "test")},
                                          "n_features": len(ds.features), "n_assays": len(ds.assays),
                                          "device": str(device), "gpus": ids})
    best = validation(model, xv, yv, ds.assays, device)  # before training, as the paper did
    logger.log_epoch({"epoch": 0, **best})
    save(checkpoint(model, ds, std, cfg, parts, 0, best), out / BEST)
    best_epoch = 0
    bar = tqdm(range(1, t.epochs + 1), desc=f"{cfg.name} split {cfg.data.split}", unit="epoch", leave=False)
    for epoch in bar:
        model.train()
        loss_sum, n_batches = torch.zeros((), device=device), 0
        for xb, yb in loader:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            loss = masked_bce(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t.clip_grad > 0:
                nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad)
            optimizer.step()
            loss_sum += loss.detach()  # summed on the device: no host sync per step
            n_batches += 1
        record = {"train_loss": float(loss_sum) / max(n_batches, 1), **validation(model, xv, yv, ds.assays, device)}
        logger.log_epoch({"epoch": epoch, **record})
        logger.scalars(epoch, record, prefix="")
        bar.set_postfix(loss=f"{record['train_loss']:.4f}", val_auc=f"{record['val_mean_auc']:.3f}")
        if better(record, best):
            best, best_epoch = record, epoch
            save(checkpoint(model, ds, std, cfg, parts, epoch, record), out / BEST)
    logger.close()
    summary = {"best_epoch": best_epoch, **best, "seconds": time.perf_counter() - t0,
               "n_train": int((parts == "train").sum()), "n_val": int((parts == "val").sum()),
               "n_assays": len(ds.assays)}
    write_json_atomic(out / "train_summary.json", summary)
    return summary
