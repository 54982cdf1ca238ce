"""Probe curves and the final table of several bench_learning.py runs (PNG and PDF, and a markdown table).

    python bench/plot_learning.py bench_out/learning/*/learning.json --out docs/figures/learning_curves
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from utils.cli import run_cli  # noqa: E402
from utils.fileio import atomic_path, ensure_dir  # noqa: E402

COLOURS = {"dino": "tab:blue", "mae": "tab:green", "simclr": "tab:red"}


def table(runs: list[dict[str, Any]]) -> str:
    """One markdown row per run: random init (epoch 0), final, best, handcrafted, gains, collapse."""
    lines = ["| method | seed | epochs | target mAP: random init → final (best) | gain | replicate mAP: random init "
             "→ final | gain | handcrafted target / replicate | beats random init by ≥ 0.05 | beats handcrafted | "
             "collapsed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        first, final = r["probe"][0], r["probe"][-1]
        hc = r["handcrafted"]
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['epochs']} | {first['target_map']:.3f} → {final['target_map']:.3f} "
            f"({r['best_target_map']:.3f}) | {r['gain_target_map']:+.3f} | {first['replicate_map']:.3f} → "
            f"{final['replicate_map']:.3f} | {r['gain_replicate_map']:+.3f} | {hc['target_map']:.3f} / "
            f"{hc['replicate_map']:.3f} | {'yes' if r['gain_target_map'] >= 0.05 else 'no'} | "
            f"{'yes' if final['target_map'] > hc['target_map'] else 'no'} | {r['collapsed']} |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Target and replicate probe mAP against epochs, one line per run, handcrafted as dashed levels."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "target_map", "probe target mAP"), (axes[1], "replicate_map",
                                                                         "probe replicate mAP")):
        for r in runs:
            epochs = [p["epoch"] for p in r["probe"]]
            ax.plot(epochs, [p[key] for p in r["probe"]], marker="o", ms=3, color=COLOURS.get(r["method"]),
                    linestyle="-" if r["seed"] == runs[0]["seed"] else ":", label=f"{r['method']} seed {r['seed']}")
        for seed in sorted({r["seed"] for r in runs}):
            hc = next(r["handcrafted"][key] for r in runs if r["seed"] == seed)
            ax.axhline(hc, color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"handcrafted (seed {seed})", (0, hc), fontsize=7, color="grey", va="bottom")
        ax.set_xlabel("finished epochs (0 = random initialisation)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ensure_dir(out.parent)
    written = []
    for ext in ("png", "pdf"):
        path = out.with_suffix(f".{ext}")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=130)
        written.append(path)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", help="learning.json files")
    p.add_argument("--out", required=True, help="figure path without extension")
    opts = p.parse_args(argv)
    runs = sorted((json.loads(Path(f).read_text()) for f in opts.results), key=lambda r: (r["method"], r["seed"]))
    written = plot(runs, Path(opts.out))
    print(table(runs))
    print(f"plot_learning: {len(runs)} runs -> {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    run_cli(main)
