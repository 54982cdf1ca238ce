"""Scoring a trained model on the test part: per-assay ROC-AUC and F1, written as test_metrics.csv and
test_summary.json (with the paper's convention beside ours)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supervised_baseline.config import SupervisedConfig, require_file
from supervised_baseline.data import Standardiser, assign_parts, load_dataset, parts_of
from supervised_baseline.metrics import per_assay, summary
from supervised_baseline.model import FNN
from supervised_baseline.train import TEST_OUTPUTS, load_model_file, predict, resolve_device
from utils.errors import DataError
from utils.fileio import write_csv_atomic, write_json_atomic
from utils.rundir import Transaction, completed_run, output_run


def model_from_file(obj: dict[str, Any]) -> FNN:
    """The FNN of a loaded model_best.pt, with its weights."""
    m = obj["model"]
    model = FNN(int(obj["n_in"]), int(obj["n_out"]), m["hidden"], m["dropout"], m["input_dropout"])
    model.load_state_dict(obj["state_dict"])
    return model


def evaluate(cfg: SupervisedConfig) -> dict[str, Any]:
    """Score ``cfg.checkpoint`` on the test wells of ``cfg.data`` and write the metrics to ``cfg.output_dir``.

    The split is the one the model was trained with (stored in the checkpoint) unless the config names a
    ``data.splits`` file; features are imputed and standardised with the training statistics.
    """
    with output_run(cfg.output_dir) as tx:
        result = _score(cfg, tx)
        tx.commit({**(completed_run(cfg.output_dir) or {}), "status": "complete", "scored": True},
                  stale=TEST_OUTPUTS)
    out = Path(cfg.output_dir)
    mean = "n/a" if result["mean_auc"] is None else f"{result['mean_auc']:.3f}"
    print(f"{cfg.name} split {cfg.data.split}: test mean AUC {mean} over {result['n_assays_scored']} assays "
          f"({result['n_assays_skipped']} skipped: one class only; paper convention {result['paper_mean_auc']:.3f}), "
          f"{result['n_test_wells']} wells -> {out / 'test_metrics.csv'}", flush=True)
    return result


def _score(cfg: SupervisedConfig, tx: Transaction) -> dict[str, Any]:
    """Predict the test wells and stage test_metrics.csv and test_summary.json; a failure stages nothing final."""
    obj = load_model_file(require_file(cfg.checkpoint, "checkpoint"))
    ds = load_dataset(cfg.data)
    missing = [f for f in obj["features"] if f not in ds.features]
    if missing or len(obj["features"]) != len(ds.features):
        raise DataError(f"data.features {cfg.data.features}: does not have the {len(obj['features'])} features the "
                        f"model was trained on (missing e.g. {missing[:3]})")
    order = [ds.features.index(f) for f in obj["features"]]
    assays = list(obj["assays"])
    label_col = {a: j for j, a in enumerate(ds.assays)}
    absent = [a for a in assays if a not in label_col]
    if absent:
        raise DataError(f"data.labels {cfg.data.labels}: lacks assay(s) {absent[:5]} the model predicts")
    if cfg.data.splits:
        parts = assign_parts(ds, cfg.data, cfg.training.seed)
    else:
        parts = parts_of(ds.compounds, obj["split"])
    test = parts == "test"
    if not test.any():
        raise DataError(f"{cfg.checkpoint}: none of its test compounds is in data.features {cfg.data.features}")
    std = Standardiser(*(obj["standardiser"][k].numpy() for k in ("median", "mean", "std")))
    x = std.transform(ds.x[test][:, order])
    y = ds.y[test][:, [label_col[a] for a in assays]]
    device, _ = resolve_device(cfg.training.gpus)
    probabilities = predict(model_from_file(obj).to(device), x, device)
    table = per_assay(probabilities, y, assays)
    result = {**summary(table), "n_test_wells": int(test.sum()), "n_test_compounds": int(len(set(ds.compounds[test]))),
              "checkpoint": str(cfg.checkpoint), "features": str(cfg.data.features), "split": cfg.data.split,
              "best_epoch": int(obj["epoch"])}
    write_csv_atomic(table, tx.path("test_metrics.csv"))
    write_json_atomic(tx.path("test_summary.json"), result)
    return result
