"""Evaluation figures, each written atomically as PNG and PDF, with one stable colour per representation name."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from utils.fileio import atomic_path  # noqa: E402

PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363",
)
# The paper's method names keep the paper's colours whatever else is plotted.
RESERVED = {"DINO": 0, "MAE": 1, "SimCLR": 2, "CellProfiler": 3, "transferlearning": 4}


def _stable_slot(name: str) -> int:
    """A palette slot from a hash that is the same in every process (unlike Python's salted hash)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % len(PALETTE)


def representation_colors(names: Iterable[str]) -> dict[str, str]:
    """Colour per name: a reserved or hashed slot; collisions move to the next free slot in sorted-name order."""
    names = sorted(set(names))
    taken: dict[int, str] = {}
    out: dict[str, str] = {}
    for name in [n for n in names if n in RESERVED] + [n for n in names if n not in RESERVED]:
        slot = RESERVED.get(name, _stable_slot(name))
        for step in range(len(PALETTE)):
            probe = (slot + step) % len(PALETTE)
            if probe not in taken:
                slot = probe
                break
        else:
            slot = slot % len(PALETTE)
        taken[slot] = name
        out[name] = PALETTE[slot]
    return out


def save_figure(fig: plt.Figure, stem: Path) -> list[Path]:
    """Write ``stem``.png and ``stem``.pdf atomically and close the figure."""
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=110, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def _note_if_empty(ax: plt.Axes, empty: bool, why: str) -> None:
    """Say on the axes why nothing is drawn, rather than leaving a blank figure."""
    if empty:
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, fontsize=9)


def map_vs_accuracy(points: pd.DataFrame, x: str, y: str, stem: Path, title: str) -> list[Path]:
    """The paper's scatter: one point per representation, retrieval mAP against 1-NN accuracy."""
    colors = representation_colors(points["label"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ok = points[[x, y]].notna().all(axis=1)
    for _, row in points[ok].iterrows():
        ax.scatter(row[x], row[y], color=colors[row["label"]], label=row["label"], s=60, edgecolor="black")
    _note_if_empty(ax, not ok.any(), f"{x} or {y} undefined for every representation")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    if ok.any():
        ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, stem)


def batch_vs_bio(points: pd.DataFrame, stem: Path) -> list[Path]:
    """Batch-removal score against biology score, one labelled point per representation (and correction), with
    iso-lines of the overall score 0.4 x batch + 0.6 x bio; up and right is better."""
    colors = representation_colors(points["label"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ok = points[["batch_score", "bio_score"]].notna().all(axis=1)
    grid = np.linspace(0, 1, 101)
    for level in (0.2, 0.4, 0.6, 0.8):
        ax.plot(grid, (level - 0.4 * grid) / 0.6, ":", color="grey", lw=0.8)
        ax.annotate(f"overall {level}", ((level - 0.6) / 0.4 if level > 0.6 else 0.02,
                                         min(level / 0.6, 1.0) - 0.03), fontsize=6, color="grey")
    for _, row in points[ok].iterrows():
        ax.scatter(row["batch_score"], row["bio_score"], color=colors[row["label"]], s=60, edgecolor="black",
                   label=row["label"])
        ax.annotate(str(row["label"]), (row["batch_score"], row["bio_score"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    _note_if_empty(ax, not ok.any(), "batch or biology score undefined for every representation")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1e-3, float(points.loc[ok, "bio_score"].max()) * 1.2) if ok.any() else 1)
    ax.set_xlabel("batch removal score (1 = no batch signal)")
    ax.set_ylabel("biology score (mean retrieval mAP)")
    ax.set_title("batch removal against biology conservation")
    if ok.any():
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, stem)


def pr_curves(curves_k: pd.DataFrame, curves_d: pd.DataFrame, stem: Path, title: str) -> list[Path]:
    """Micro and macro precision-recall curves over k and over distance thresholds, one line per representation."""
    colors = representation_colors(pd.concat([curves_k["label"], curves_d["label"]]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, curves, what in ((axes[0], curves_k, "k nearest"), (axes[1], curves_d, "distance threshold")):
        for label, part in curves.groupby("label", sort=True):
            for avg, style in (("micro", "-"), ("macro", "--")):
                ax.plot(part[f"avg_recall_{avg}"], part[f"avg_precision_{avg}"], style, color=colors[label],
                        label=f"{label} ({avg})")
        _note_if_empty(ax, curves.empty, "no curve")
        ax.set_xlabel("recall")
        ax.set_title(f"{title}: {what}")
    axes[0].set_ylabel("precision")
    if not curves_k.empty:
        axes[1].legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, stem)


def map_per_group(map_results: pd.DataFrame, stem: Path, title: str) -> list[Path]:
    """Sorted mAP of every group per representation; filled markers are significant after BH correction."""
    colors = representation_colors(map_results["label"]) if not map_results.empty else {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, part in map_results.groupby("label", sort=True):
        part = part.sort_values("mean_average_precision", ascending=False).reset_index(drop=True)
        sig = part["below_corrected_p"].astype(bool).to_numpy()
        x = np.arange(len(part))
        y = part["mean_average_precision"].to_numpy()
        ax.scatter(x[sig], y[sig], color=colors[label], s=14, label=f"{label} ({sig.mean():.0%} retrieved)")
        ax.scatter(x[~sig], y[~sig], facecolor="none", edgecolor=colors[label], s=14)
    _note_if_empty(ax, map_results.empty, "mAP undefined for every group")
    ax.set_xlabel("group (sorted by mAP)")
    ax.set_ylabel("mAP")
    ax.set_title(f"{title} (filled: corrected p < 0.05)")
    if not map_results.empty:
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save_figure(fig, stem)


def pca_2d(x: np.ndarray) -> np.ndarray:
    """First two principal components from the feature covariance (an F x F eigenproblem, cheap for many rows)."""
    out = np.zeros((x.shape[0], 2))
    if x.shape[0] < 2:
        return out
    centred = x - x.mean(axis=0, keepdims=True)
    vals, vecs = np.linalg.eigh(centred.T @ centred)
    k = min(2, vecs.shape[1])
    out[:, :k] = centred @ vecs[:, ::-1][:, :k]
    return out


def consensus_pca(profiles: Mapping[str, tuple[np.ndarray, np.ndarray]], stem: Path, top: int = 10) -> list[Path]:
    """PCA of consensus profiles per representation, coloured by the ``top`` largest targets (others grey)."""
    names = sorted(profiles)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        x, targets = profiles[name]
        targets = pd.Series(targets).astype(str).to_numpy()
        coords = pca_2d(x)
        ranked = pd.Series(targets).value_counts()
        keep = list(ranked.index[:top])
        ax.scatter(*coords[~np.isin(targets, keep)].T, color="lightgrey", s=8)
        cmap = plt.get_cmap("tab10")
        for i, t in enumerate(keep):
            sel = targets == t
            ax.scatter(*coords[sel].T, color=cmap(i % 10), s=14, label=t if len(t) <= 32 else t[:31] + "…")
        ax.set_title(name)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
        if keep:
            ax.legend(fontsize=6, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    _note_if_empty(axes[0][0], not names, "no consensus profiles")
    return save_figure(fig, stem)
