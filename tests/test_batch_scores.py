"""Batch-removal and biology scores against independent references: loops, BFS, sklearn."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import silhouette_samples

from utils.evaluation import EvalConfig, run_evaluation
from utils.evaluation.metrics.integration import (
    batch_removal,
    classifier_score,
    graph_connectivity,
    ilisi_score,
    knn_indices,
    overall,
)
from utils.evaluation.pipeline import zscore


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _blobs(shift: float, n: int = 120, n_batches: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    batches = np.repeat(np.arange(n_batches), n // n_batches)
    centres = rng.normal(size=(n_batches, 10)) * shift
    return rng.normal(size=(n, 10)) + centres[batches] + 0.1, batches


def _knn_loop(unit: np.ndarray, k: int) -> list[list[int]]:
    out = []
    for i in range(len(unit)):
        d = sorted((1 - float(unit[i] @ unit[j]), j) for j in range(len(unit)) if j != i)
        out.append([j for _, j in d[:k]])
    return out


def test_knn_and_ilisi_equal_loops() -> None:
    x, b = _blobs(1.0, n=60)
    unit = _unit(x)
    nn = knn_indices(unit, 7, block=16)
    loop = _knn_loop(unit, 7)
    assert [sorted(r) for r in nn.tolist()] == [sorted(r) for r in loop]
    expected = []
    for row in loop:
        p = np.bincount(b[row], minlength=3) / len(row)
        expected.append((1 / (p**2).sum() - 1) / 2)
    assert ilisi_score(nn, b) == pytest.approx(np.mean(expected))


def test_graph_connectivity_equals_bfs() -> None:
    x, b = _blobs(0.5, n=60, seed=1)
    labels = np.random.default_rng(2).integers(-1, 4, size=60)
    nn = knn_indices(_unit(x), 5)
    adj = {i: set() for i in range(60)}
    for i, row in enumerate(nn):
        for j in row:
            adj[i].add(int(j))
            adj[int(j)].add(i)
    shares = []
    for lab in sorted(set(labels[labels >= 0])):
        members = set(np.flatnonzero(labels == lab).tolist())
        if len(members) < 2:
            continue
        seen, best = set(), 0
        for start in members:
            if start in seen:
                continue
            comp, queue = {start}, deque([start])
            while queue:
                for nb in adj[queue.popleft()] & members:
                    if nb not in comp:
                        comp.add(nb)
                        queue.append(nb)
            seen |= comp
            best = max(best, len(comp))
        shares.append(best / len(members))
    assert graph_connectivity(nn, labels) == pytest.approx(np.mean(shares))


def test_mixed_batches_score_high_and_separated_batches_low() -> None:
    mixed_x, b = _blobs(0.0)
    sep_x, _ = _blobs(8.0)
    scores = {}
    for name, x in (("mixed", mixed_x), ("separated", sep_x)):
        unit = _unit(x - x.mean(axis=0))
        sil = silhouette_samples(unit, b, metric="cosine")
        acc = 1 / 3 if name == "mixed" else 1.0
        scores[name], _ = batch_removal(unit, b, np.zeros(len(b), int), sil, acc)
    assert scores["mixed"]["ilisi"] > 0.8 and scores["separated"]["ilisi"] < 0.05
    assert scores["mixed"]["silhouette"] > 0.9 and scores["separated"]["silhouette"] < 0.5
    assert scores["mixed"]["batch_score"] > 0.8 > 0.4 > scores["separated"]["batch_score"]
    assert classifier_score(1 / 3, 3) == 1.0 and classifier_score(1.0, 3) == 0.0
    assert classifier_score(2 / 3, 3) == pytest.approx(0.5)


def test_one_batch_is_undefined_not_perfect() -> None:
    x, _ = _blobs(0.0, n=30)
    scores, notes = batch_removal(_unit(x), np.zeros(30, int), np.zeros(30, int), np.full(30, np.nan), np.nan)
    assert np.isnan(scores["batch_score"]) and all(np.isnan(v) for v in scores.values())
    assert "one batch only" in notes[0]
    assert np.isnan(overall(float("nan"), 0.5)) and overall(0.5, 1.0) == pytest.approx(0.8)


def _wells(tmp: Path, name: str, shift: float) -> None:
    rng = np.random.default_rng(3)
    rows = []
    for batch in range(3):
        for plate in range(2):
            for w in range(24):
                pert = "DMSO" if w < 6 else f"c{w % 6}"
                rows.append({"batch": f"b{batch}", "plate": f"p{batch}{plate}", "well": f"A{w + 1:02d}",
                             "perturbation_id": pert, "target": "DMSO" if pert == "DMSO" else f"t{w % 3}"})
    df = pd.DataFrame(rows)
    signal = {t: rng.normal(size=8) for t in df["target"].unique()}
    batch_dir = {b: rng.normal(size=8) * shift for b in df["batch"].unique()}
    x = np.stack([signal[t] * (t != "DMSO") + batch_dir[b] + rng.normal(size=8)
                  for t, b in zip(df["target"], df["batch"])])
    folder = tmp / "emb" / name
    folder.mkdir(parents=True)
    pd.concat([df, pd.DataFrame(x, columns=[f"emb{i}" for i in range(8)])], axis=1).to_csv(
        folder / "well_features.csv", index=False)


def test_evaluate_writes_scores_summary_and_figure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _wells(tmp_path, "clean", 0.0)
    _wells(tmp_path, "batchy", 5.0)
    out = run_evaluation(EvalConfig(tmp_path / "emb", tmp_path / "eval", null_size=200, progress=False))
    well = pd.read_csv(out / "well_metrics.csv").set_index("label")
    for col in ("batch_removal_silhouette", "batch_removal_classifier", "batch_removal_ilisi",
                "batch_removal_graph_connectivity", "batch_score", "bio_score", "overall_score"):
        assert col in well.columns, col
    assert well.loc["clean", "batch_score"] > well.loc["batchy", "batch_score"] + 0.2
    for name in well.index:
        r = well.loc[name]
        assert r["overall_score"] == pytest.approx(0.4 * r["batch_score"] + 0.6 * r["bio_score"])
        assert r["bio_score"] == pytest.approx(np.mean([r["replicate_mAP"], r["target_mAP"]]))
    df = pd.read_csv(tmp_path / "emb" / "batchy" / "well_features.csv")
    trt = df[df["perturbation_id"] != "DMSO"]
    xz = zscore(trt[[f"emb{i}" for i in range(8)]].to_numpy())
    sil = silhouette_samples(xz, trt["batch"], metric="cosine")  # the reference of the per-well silhouettes
    assert well.loc["batchy", "batch_removal_silhouette"] == pytest.approx(np.mean(1 - np.abs(sil)), abs=1e-9)
    assert (out / "figures" / "batch_vs_bio.png").is_file() and (out / "figures" / "batch_vs_bio.pdf").is_file()
    assert "overall_score" in (out / "summary.md").read_text()
    assert "[clean] batch" in capsys.readouterr().err
