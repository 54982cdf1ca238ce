"""Evaluate every representation folder of an embeddings directory side by side and write the paper's outputs.

``run_evaluation`` is the one entry point: load each folder (``loading``), compute the paper's metrics plus
copairs-style mAP and batch diagnostics (``evaluate_representation``), then write the tables and figures
(``report``). Each representation is scored by the same code, so their numbers are comparable.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.errors import DataError
from utils.evaluation.config import EvalConfig
from utils.evaluation.loading import (
    Representation,
    align_wells,
    check_controls,
    discover_representations,
    load_representation,
)
from utils.evaluation.metrics import (
    NNTask,
    PairRules,
    ProfileCurves,
    auc_trapezoid,
    average_precision,
    batch_classification,
    codes,
    f1,
    mean_average_precision,
    micro_macro,
    nn_accuracy,
    percent_replicating,
    profile_curves,
    silhouette_summary,
    unit_rows,
    well_neighbour_stats,
)
from utils.evaluation.metrics.integration import batch_removal, bio_conservation, overall
from utils.evaluation.report import RepResult, check_compare_to, write_outputs
from utils.profiles.controls import control_mask, ids_query
from utils.rundir import output_run

PR_COLUMNS = [
    "avg_precision_micro", "avg_recall_micro", "avg_f1_micro",
    "avg_precision_macro", "avg_recall_macro", "avg_f1_macro",
]


def control_wells(meta: pd.DataFrame, cfg: EvalConfig) -> np.ndarray:
    """Negative-control wells: perturbation_id in ``cfg.controls``, or control_type == negcon where annotated.

    The rule and the mask come from the shared resolver (``utils.profiles.controls``), so evaluation cannot
    disagree with inference and the handcrafted baseline about which wells are controls.
    """
    return control_mask(meta, ids_query(cfg.controls, meta))


def zscore(x: np.ndarray) -> np.ndarray:
    """StandardScaler over the evaluated wells (constant columns keep scale 1), as the paper's well metrics do."""
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _mean_by(x: np.ndarray, keys: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean profile per unique key row, via one sparse-free reduceat over sorted rows."""
    gid, uniq = pd.MultiIndex.from_frame(keys.astype(str)).factorize()
    order = np.argsort(gid, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(gid[order]) != 0])
    sums = np.add.reduceat(x[order], starts, axis=0)
    counts = np.diff(np.r_[starts, len(order)])
    first = keys.iloc[order[starts]].reset_index(drop=True)
    return first, sums / counts[:, None]


def _pr_averages(prec: np.ndarray, rec: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The six micro/macro precision, recall and F1 columns shared by the k and the distance curves."""
    p_mi, p_ma = micro_macro(prec, labels)
    r_mi, r_ma = micro_macro(rec, labels)
    return {
        "avg_precision_micro": p_mi, "avg_recall_micro": r_mi, "avg_f1_micro": f1(p_mi, r_mi),
        "avg_precision_macro": p_ma, "avg_recall_macro": r_ma, "avg_f1_macro": f1(p_ma, r_ma),
    }


def _curve_tables(res: ProfileCurves, labels: np.ndarray, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's *_prec_recall_k and *_prec_recall_cor tables for one representation and level."""
    k_cols = _pr_averages(res.prec_k, res.rec_k, labels)
    k_tab = pd.DataFrame({"k": res.ks, **k_cols})
    p_mi, r_mi = k_cols["avg_precision_micro"], k_cols["avg_recall_micro"]
    k_tab["mean_prec_R"] = float(np.nanmean(res.prec_r)) if np.isfinite(res.prec_r).any() else np.nan
    k_tab["AUCPR_k"] = auc_trapezoid(p_mi, r_mi)
    k_tab["label"] = name
    d_cols = _pr_averages(res.prec_d, res.rec_d, labels)
    d_tab = pd.DataFrame({"d": res.thresholds, **d_cols})
    pd_mi, rd_mi = d_cols["avg_precision_micro"], d_cols["avg_recall_micro"]
    m_ap = float(np.nanmean(res.ap)) if np.isfinite(res.ap).any() else np.nan
    d_tab["mAP"] = m_ap
    d_tab["mAP_k"] = m_ap
    d_tab["AUCPR_dist"] = auc_trapezoid(pd_mi, rd_mi)
    d_tab["label"] = name
    d_tab["n_queries_with_positives"] = int((res.n_pos > 0).sum())
    return k_tab, d_tab


def _empty_curves(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Curve tables with no rows, for a level with fewer than two profiles."""
    k = pd.DataFrame(columns=["k", *PR_COLUMNS, "mean_prec_R", "AUCPR_k", "label"])
    d = pd.DataFrame(columns=["d", *PR_COLUMNS, "mAP", "mAP_k", "AUCPR_dist", "label", "n_queries_with_positives"])
    return k, d


def _level_curves(x: np.ndarray, labels: np.ndarray, name: str, cfg: EvalConfig, what: str,
                  notes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Compute one level's curves, or leave a note when it has fewer than two profiles."""
    if len(x) < 2:
        notes.append(f"{what}: fewer than two profiles, curves undefined")
        return _empty_curves(name)
    unit = unit_rows(x, "correlation", f"{name} {what} profiles")
    res = profile_curves(unit, labels, device=cfg.device, progress=cfg.progress)
    if not (res.n_pos > 0).any():
        notes.append(f"{what}: no label has two or more profiles, so precision/recall and mAP are undefined")
    else:
        lone = int((np.bincount(labels[labels >= 0]) == 1).sum())
        if lone:
            notes.append(f"{what}: {lone} label(s) with a single profile have no positives and are left out")
    return _curve_tables(res, labels, name)


def _task_map(meta: pd.DataFrame, x: np.ndarray, rules: PairRules, sameby: list[str], keep: np.ndarray,
              cfg: EvalConfig, task: str, name: str, notes: list[str]) -> pd.DataFrame:
    """Per-group mAP with p-values for one retrieval task, or an empty table plus a note when undefined."""
    ap = average_precision(meta, x, rules, device=cfg.device, progress=cfg.progress)
    ap = ap[keep]
    res = mean_average_precision(ap, sameby, cfg.null_size, cfg.threshold, cfg.seed, exact=not cfg.sampled_p_values)
    if res.empty:
        notes.append(f"{task} retrieval: no profile has both positive and negative pairs")
    else:
        n_exact = int((res["p_value_method"] == "exact").sum())
        if n_exact:
            notes.append(f"{task} retrieval: {n_exact} of {len(res)} group(s) have at most {cfg.null_size} rank "
                         "arrangements and got exact p-values")
        stuck = ~res["can_pass"].astype(bool)
        if stuck.any():
            notes.append(f"{task} retrieval: {int(stuck.sum())} of {len(res)} group(s) cannot reach p < "
                         f"{cfg.threshold} (smallest reachable p {res.loc[stuck, 'min_p_value'].min():.3g}); "
                         "they count as not retrieved")
    res = res.rename(columns={sameby[0]: "group"})
    res.insert(0, "task", task)
    res.insert(0, "label", name)
    return res


def evaluate_representation(rep: Representation, cfg: EvalConfig) -> RepResult:
    """All metrics of one representation: paper set, copairs-style mAP and batch diagnostics."""
    notes: list[str] = []
    meta, x = rep.meta, rep.x
    is_ctrl = control_wells(meta, cfg)
    trt = ~is_ctrl
    wm, wx = meta[trt].reset_index(drop=True), x[trt]
    if len(wm) < 2:
        raise DataError(f"{rep.path}: fewer than two non-control wells to evaluate")
    pert = codes(wm["perturbation_id"].astype(str))
    counts = np.bincount(pert)
    if counts.max() < 2:
        raise DataError(
            f"{rep.path}: every perturbation_id has a single well; evaluation needs replicate wells "
            "(is this an aggregated file?)"
        )
    singles = int((counts == 1).sum())
    if singles:
        notes.append(f"{singles} perturbation(s) with a single well have no replicate and count as undefined")
    batch = codes(wm["batch"].astype(str))
    lab = cfg.label
    labelled = has_labels(wm, lab)
    if not labelled:
        notes.append(f"no {lab} labels: {lab} metrics skipped")
        print(f"[{rep.name}] no {lab} column (or all empty): {lab} metrics skipped", file=sys.stderr)
    target = codes(wm[lab].astype("string"))
    nsp = pert if cfg.nsp_mode == "perturbation" else codes(wm["well"].astype(str))
    tasks = [
        NNTask("pert_acc", pert),
        NNTask("pert_acc_NSB", pert, exclude_all_of=((batch, pert),)),
    ]
    if labelled:
        tasks += [
            NNTask(f"{lab}_acc_NSP", target, exclude_same=(nsp,)),
            NNTask(f"{lab}_acc_NSBP", target, exclude_same=(nsp,), exclude_all_of=((batch, target),)),
        ]
    xz = zscore(wx)
    unit = unit_rows(xz, "cosine", f"{rep.name} z-scored wells")
    stats = well_neighbour_stats(unit, tasks, {"batch": batch, "target": target}, device=cfg.device,
                                 progress=cfg.progress)
    well: dict[str, object] = {"label": rep.name}
    for t in tasks:
        hits = stats.nn_correct[t.name]
        well[t.name] = nn_accuracy(hits)
        if not np.isfinite(hits).any():
            notes.append(f"{t.name}: no query has an eligible correct neighbour")
    for name in (f"{lab}_acc_NSP", f"{lab}_acc_NSBP"):
        well.setdefault(name, np.nan)
    pr = percent_replicating(xz, pert, cfg.replicate_null_size, cfg.seed)
    well["repl_corr"], well["percent_95"] = pr["repl_corr"], pr["percent_95"]
    if pr["reason"]:
        notes.append(f"percent replicating: {pr['reason']}")

    # profile levels (correlation distance on the features as given)
    pert_keys, pert_x = _mean_by(wx, wm[["batch", "perturbation_id"]])
    pk, pc = _level_curves(pert_x, codes(pert_keys["perturbation_id"]), rep.name, cfg, "perturbation level", notes)
    cons, cons_x = consensus_profiles(rep, cfg, notes)
    if labelled:
        tk, tc = _level_curves(cons_x, codes(cons[lab]), rep.name, cfg, f"{lab} level", notes)
    else:
        tk, tc = _empty_curves(rep.name)

    map_df = retrieval_maps(rep, cfg, is_ctrl, cons, cons_x, notes)
    well.update(map_columns(map_df, lab))

    # batch diagnostics
    bc = batch_classification(xz, wm["batch"].astype(str).to_numpy(), cfg.batch_classifier, seed=cfg.seed)
    well["batch_bal_acc"], well["batch_mcc"] = bc["batch_bal_acc"], bc["batch_mcc"]
    if bc["reason"]:
        notes.append(str(bc["reason"]))
    for key, codes_ in (("batch", batch), ("target", target))[: 2 if labelled else 1]:
        value, why = silhouette_summary(stats.silhouette[key], codes_)
        well[f"silhouette_{key}"] = value
        if why:
            notes.append(f"silhouette by {key}: {why}")
    well.setdefault("silhouette_target", np.nan)
    removal, why = batch_removal(unit, batch, target if labelled else np.full(len(wm), -1), stats.silhouette["batch"],
                                 float(well["batch_bal_acc"]))
    notes += why
    well.update({f"batch_removal_{k}" if k != "batch_score" else k: v for k, v in removal.items()})
    well["bio_score"] = bio_conservation({k: float(well[f"{k}_mAP"]) for k in ("replicate", lab)})
    well["overall_score"] = overall(float(well["batch_score"]), float(well["bio_score"]))
    well.update({
        "feature_set": rep.kind, "n_features": len(rep.features), "n_wells": len(wm),
        "n_perturbations": int(len(counts)), "nsp_mode": cfg.nsp_mode, "notes": "; ".join(notes),
    })
    return RepResult(well, pk, pc, tk, tc, map_df, (cons_x, cons[lab].to_numpy()))


def has_labels(meta: pd.DataFrame, label: str) -> bool:
    """Whether any well carries the label column: without one, label-level metrics are skipped, not zero."""
    return label in meta.columns and bool(meta[label].notna().any())


def consensus_profiles(rep: Representation, cfg: EvalConfig, notes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean profile per perturbation over its non-control wells, with its label (perturbations without one dropped)."""
    lab = cfg.label
    trt = ~control_wells(rep.meta, cfg)
    wm, wx = rep.meta[trt].reset_index(drop=True), rep.x[trt]
    cons_keys, cons_x = _mean_by(wx, wm[["perturbation_id"]])
    cons_target = wm.groupby("perturbation_id", sort=False)[lab].first().reindex(cons_keys["perturbation_id"])
    has_t = cons_target.notna().to_numpy()
    if has_t.any() and not has_t.all():
        notes.append(f"{int((~has_t).sum())} perturbation(s) without a {lab} left out of {lab}-level metrics")
    cons = pd.DataFrame({"perturbation_id": cons_keys["perturbation_id"][has_t].to_numpy(),
                         lab: cons_target[has_t].astype(str).to_numpy()})
    return cons, cons_x[has_t]


def map_columns(map_df: pd.DataFrame, lab: str) -> dict[str, float]:
    """replicate_/<label>_ mAP, median-AP aggregate, normalised mAP and fraction retrieved: means over the groups of
    each task."""
    out = {}
    for task in ("replicate", lab):
        part = map_df[map_df["task"] == task] if not map_df.empty else map_df
        out[f"{task}_mAP"] = float(part["mean_average_precision"].mean()) if len(part) else np.nan
        # the mean over groups of each group's median AP: robust to a group's one outlying profile
        out[f"{task}_median_mAP"] = float(part["median_average_precision"].mean()) if len(part) else np.nan
        out[f"{task}_nmAP"] = float(part["mean_normalized_average_precision"].mean()) if len(part) else np.nan
        out[f"{task}_fraction_retrieved"] = float(part["below_corrected_p"].mean()) if len(part) else np.nan
    return out


def retrieval_maps(rep: Representation, cfg: EvalConfig, is_ctrl: np.ndarray | None = None,
                   cons: pd.DataFrame | None = None, cons_x: np.ndarray | None = None,
                   notes: list[str] | None = None) -> pd.DataFrame:
    """copairs-style mAP: replicate retrieval against controls, and label retrieval on consensus profiles.

    The training probe calls this with a representation alone (controls and consensus are derived here), and
    ``evaluate_representation`` with what it has already computed, so both give the same numbers.

    Parameters
    ----------
    rep:
        The representation's wells (``load_representation`` or ``representation_from_frame``).
    cfg:
        Controls, label column, null size, threshold, seed, device and ``replicate_diffby`` come from here.
    is_ctrl:
        Control-well mask of ``rep.meta``; derived with ``control_wells`` when None.
    cons, cons_x:
        Consensus metadata and profiles (``consensus_profiles``); derived when either is None.
    notes:
        Receives a sentence for each task that is undefined (no controls, no pairs); a fresh list when None.

    Returns
    -------
    pandas.DataFrame
        One row per group and task (``replicate``, then the label): label, task, group, mean_average_precision,
        median_average_precision, mean_normalized_average_precision, n_profiles, p_value, p_value_method,
        min_p_value, can_pass, corrected_p_value, below_p, below_corrected_p.
        Empty when neither task is defined.
    """
    notes = [] if notes is None else notes
    meta, x, lab = rep.meta, rep.x, cfg.label
    is_ctrl = control_wells(meta, cfg) if is_ctrl is None else is_ctrl
    if cons is None or cons_x is None:
        cons, cons_x = consensus_profiles(rep, cfg, notes)
    trt = ~is_ctrl
    maps = []
    rmeta = meta.copy()
    rmeta["perturbation_id"] = rmeta["perturbation_id"].astype(str)
    rmeta["__ref"] = np.where(is_ctrl, np.arange(len(meta)), -1)
    for col in cfg.replicate_diffby:
        if col not in rmeta.columns:
            raise DataError(f"{rep.path}: --replicate-diffby column {col!r} not found")
    if is_ctrl.any():
        rules = PairRules(("perturbation_id", "__ref"), tuple(cfg.replicate_diffby), (), ("perturbation_id", "__ref"))
        maps.append(_task_map(rmeta, x, rules, ["perturbation_id"], trt, cfg, "replicate", rep.name, notes))
    else:
        notes.append("replicate retrieval: no control wells (see --controls)")
    if len(cons) >= 2:
        rules = PairRules((lab,), ("perturbation_id",), (), (lab,))
        maps.append(_task_map(cons, cons_x, rules, [lab], np.ones(len(cons), bool), cfg, lab, rep.name, notes))
    return pd.concat(maps, ignore_index=True) if maps else pd.DataFrame()


def run_evaluation(cfg: EvalConfig) -> Path:
    """Load, evaluate and write every representation of ``cfg.input_dir``; returns the output folder.

    Folders are listed, ``--compare-to`` is checked and every table is loaded and checked (``check_controls``)
    before the output folder is made, so a typo or a bad table leaves no half-filled output folder behind. With
    more than one representation, all are scored on the (plate, well) keys they share (``align_wells``;
    ``cfg.allow_different_wells`` keeps each one's own wells, with a warning), so all tables are held in memory
    together.

    Parameters
    ----------
    cfg:
        The run's settings, already validated by ``EvalConfig`` itself; ``input_dir`` holds one folder per
        representation, each with a well_features.csv (or .csv.gz / .parquet).

    Returns
    -------
    pathlib.Path
        ``cfg.out_dir``, which now holds well_metrics.csv, the four *_prec_recall_* tables, map_results.csv,
        summary.md, (unless ``cfg.figures`` is false) figures/, and run.json last: the folder is locked for the
        run and every file is swapped in together at the end (``utils.rundir``), so a failed run leaves an
        earlier run's results as they were.
    """
    start = time.perf_counter()
    found = discover_representations(cfg.input_dir)
    check_compare_to(cfg, [name for name, _ in found])
    reps = []
    for name, path in found:
        rep = load_representation(name, path, cfg)
        check_controls(rep, cfg)
        print(f"[{name}] {rep.kind}: {len(rep.meta)} wells x {len(rep.features)} features", file=sys.stderr)
        reps.append(rep)
    # every table is read and checked before any metric runs, and all are scored on the wells they share
    reps, well_counts = align_wells(reps, cfg)
    with output_run(cfg.out_dir) as tx:
        results = {}
        for rep in reps:
            results[rep.name] = evaluate_representation(rep, cfg)
            results[rep.name].well.update(well_counts[rep.name])
        written = write_outputs(results, cfg, tx.root())
        tx.commit(run_record(cfg, reps, well_counts, written, time.perf_counter() - start),
                  stale=previous_outputs(cfg.out_dir))
    print(f"evaluated {len(results)} representation(s) in {time.perf_counter() - start:.1f} s; "
          f"results in {cfg.out_dir}")
    return cfg.out_dir


FIXED_OUTPUTS = ("well_metrics.csv", "pert_prec_recall_k.csv", "pert_prec_recall_cor.csv", "target_prec_recall_k.csv",
                 "target_prec_recall_cor.csv", "map_results.csv", "summary.md", "run.json")


def previous_outputs(out_dir: Path) -> list[str]:
    """An earlier evaluation's files in ``out_dir`` (tables and figures): the ones this run does not remake go."""
    figures = out_dir / "figures"
    old = [str(p.relative_to(out_dir)) for p in figures.rglob("*") if p.is_file()] if figures.is_dir() else []
    return [*FIXED_OUTPUTS, *old]


def run_record(cfg: EvalConfig, reps: list[Representation], well_counts: dict[str, dict[str, Any]],
               written: list[Path], seconds: float) -> dict[str, Any]:
    """run.json of an evaluation: what was read, how many wells each representation kept, what was written."""
    return {
        "status": "complete",
        "input_dir": str(Path(cfg.input_dir).resolve()),
        "representations": {r.name: {"path": str(r.path), "kind": r.kind, "n_wells": int(len(r.meta)),
                                     "n_features": len(r.features), **well_counts.get(r.name, {})} for r in reps},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "outputs": [str(p) for p in written],
        "command": sys.argv,
        "seconds": round(seconds, 3),
    }
