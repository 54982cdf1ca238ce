"""Benchmark: AP against copairs on the same profiles, and a full evaluate.py run on 10,000 wells x 3 representations.

Run from the repository root: ``python bench/bench_eval.py [--sizes 3000 10000] [--skip-full]``. It prints the
per-profile max |AP difference| (must be <= 1e-9), the copairs/ours speed ratio (target >= 20x) and the wall time of
the full evaluation (target < 120 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.evaluation import EvalConfig, run_evaluation  # noqa: E402
from utils.evaluation.metrics import PairRules, average_precision, worker_count  # noqa: E402


def replicate_set(n: int, dim: int, seed: int, reps: int = 4, control_share: float = 0.1) -> pd.DataFrame:
    """Wells of perturbations (``reps`` replicates, one per batch) plus DMSO wells, with per-perturbation signal."""
    rng = np.random.default_rng(seed)
    n_ctrl = int(n * control_share)
    n_pert = (n - n_ctrl) // reps
    pert = np.r_[np.repeat([f"P{i:05d}" for i in range(n_pert)], reps), np.full(n - n_pert * reps, "DMSO")]
    batch = np.r_[np.tile(np.arange(reps), n_pert), rng.integers(0, reps, n - n_pert * reps)]
    target = np.r_[np.repeat([f"T{i % max(1, n_pert // 15):04d}" for i in range(n_pert)], reps),
                   np.full(n - n_pert * reps, "control")]
    signal = rng.normal(size=(n_pert + 1, dim))
    code = np.r_[np.repeat(np.arange(n_pert), reps), np.full(n - n_pert * reps, n_pert)]
    tsig = rng.normal(size=(max(1, n_pert // 15) + 1, dim))
    tcode = np.r_[np.repeat(np.arange(n_pert) % max(1, n_pert // 15), reps), np.full(n - n_pert * reps, -1)]
    x = 0.5 * signal[code] * (pert != "DMSO")[:, None] + 0.5 * tsig[tcode] * (tcode >= 0)[:, None]
    x = x + 0.3 * rng.normal(size=(reps, dim))[batch] + rng.normal(size=(n, dim))
    meta = pd.DataFrame({"batch": [f"B{b}" for b in batch], "plate": [f"B{b}_1" for b in batch],
                         "well": [f"W{i % 384:03d}" for i in range(n)], "perturbation_id": pert, "target": target})
    return pd.concat([meta, pd.DataFrame(x.astype(np.float32), columns=[f"emb{i}" for i in range(dim)])], axis=1)


def bench_ap(n: int, dim: int) -> None:
    """Per-profile AP of ours vs copairs on one replicate-retrieval task; prints max diff and speed ratio."""
    # lazy: copairs is a test/dev requirement only this comparison needs; --skip-ap runs without it
    from copairs.map import average_precision as cp_average_precision
    from copairs.matching import assign_reference_index

    df = replicate_set(n, dim, seed=n)
    feats = df[[c for c in df.columns if c.startswith("emb")]].to_numpy(np.float64)
    meta = assign_reference_index(df[["perturbation_id"]], "perturbation_id == 'DMSO'", reference_col="ref")
    rules = (["perturbation_id", "ref"], [], [], ["perturbation_id", "ref"])
    t0 = time.perf_counter()
    ours = average_precision(meta, feats, PairRules(*(tuple(r) for r in rules)))
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = cp_average_precision(meta, feats, *rules, progress_bar=False)
    t_ref = time.perf_counter() - t0
    a, b = ours["average_precision"].to_numpy(), ref["average_precision"].to_numpy()
    same_nan = bool((np.isnan(a) == np.isnan(b)).all())
    diff = float(np.nanmax(np.abs(a - b)))
    print(f"AP n={n} dim={dim}: ours {t_ours:.2f} s, copairs {t_ref:.2f} s, speed ratio {t_ref / t_ours:.1f}x, "
          f"max |AP diff| {diff:.2e}, NaN pattern identical: {same_nan}", flush=True)


def bench_full(n: int, dim: int, reps: int) -> None:
    """Write ``reps`` representation folders of n wells x dim features and time the whole evaluation."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bench"
        for r in range(reps):
            (root / f"rep{r}").mkdir(parents=True)
            replicate_set(n, dim, seed=100 + r).to_csv(root / f"rep{r}" / "well_features.csv", index=False)
        cfg = EvalConfig(input_dir=root, out_dir=root, progress=False)
        t0, c0 = time.perf_counter(), time.process_time()
        run_evaluation(cfg)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        well = pd.read_csv(root / "well_metrics.csv")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"full evaluate: {reps} representations x {n} wells x {dim} features in {elapsed:.1f} s "
          f"(CPU {cpu:.1f} s, load average {os.getloadavg()[0]:.1f}, null size {cfg.null_size}, "
          f"{worker_count()} block threads, peak RSS {peak:.0f} MB); "
          f"pert_acc {well['pert_acc'].round(3).tolist()}", flush=True)


def main() -> None:
    """Parse flags and run the selected benchmarks."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--full-wells", type=int, default=10000)
    p.add_argument("--full-reps", type=int, default=3)
    p.add_argument("--skip-ap", action="store_true")
    p.add_argument("--skip-full", action="store_true")
    args = p.parse_args()
    if not args.skip_ap:
        for n in args.sizes:
            bench_ap(n, args.dim)
    if not args.skip_full:
        bench_full(args.full_wells, args.dim, args.full_reps)


if __name__ == "__main__":
    main()
