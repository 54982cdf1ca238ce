"""Evaluate every representation folder of an embeddings directory side by side and write the paper's outputs."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from utils.evaluation import metrics as M
from utils.evaluation import plots
from utils.errors import ConfigError, DataError
from utils.fileio import ensure_dir, write_csv_atomic, write_text_atomic

WELL_FILES = ("well_features.csv", "well_features.csv.gz", "well_features.parquet")
SKIP_DIRS = {"figures"}
CP_PREFIXES = ("Cells_", "Cytoplasm_", "Nuclei_")
EMB_PATTERN = re.compile(r"^emb_?\d+$")
NSP_MODES = ("perturbation", "well_position")
METADATA_PRESETS: dict[str, dict[str, str]] = {
    "none": {},
    "pycytominer": {
        "Metadata_broad_sample": "perturbation_id",
        "Metadata_Plate": "plate",
        "Metadata_Well": "well",
        "Metadata_Batch": "batch",
        "Metadata_moa": "target",
        "Metadata_gene_group": "gene_group",
        "Metadata_control_type": "control_type",
    },
}
PR_COLUMNS = [
    "avg_precision_micro", "avg_recall_micro", "avg_f1_micro",
    "avg_precision_macro", "avg_recall_macro", "avg_f1_macro",
]


@dataclass
class EvalConfig:
    """Everything one evaluation run needs; built by evaluate.py from its flags."""

    input_dir: Path
    out_dir: Path
    orf: bool = False
    seed: int = 507
    nsp_mode: str = "perturbation"
    null_size: int = 10000
    replicate_null_size: int = 1000
    threshold: float = 0.05
    controls: tuple[str, ...] = ("DMSO",)
    column_map: dict[str, str] = field(default_factory=dict)
    metadata_preset: str = "none"
    replicate_diffby: tuple[str, ...] = ()
    batch_classifier: str = "ridge"
    device: str | None = None
    progress: bool = True
    figures: bool = True
    compare_to: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The target-level label column: gene_group for ORF sets, as in the paper."""
        return "gene_group" if self.orf else "target"


@dataclass
class Representation:
    """One folder's wells: metadata (paper names), feature matrix, and which feature set it uses."""

    name: str
    path: Path
    meta: pd.DataFrame
    x: np.ndarray
    features: list[str]
    kind: str


@dataclass
class RepResult:
    """Everything computed for one representation, ready to be written."""

    well: dict[str, object]
    pert_k: pd.DataFrame
    pert_cor: pd.DataFrame
    target_k: pd.DataFrame
    target_cor: pd.DataFrame
    map_results: pd.DataFrame
    consensus: tuple[np.ndarray, np.ndarray]


def discover_representations(root: Path) -> list[tuple[str, Path]]:
    """Every subfolder except figures/ and hidden ones must hold a well_features.csv; say which does not."""
    if not root.is_dir():
        raise DataError(f"{root}: input directory does not exist (check -b/--basedir and -i/--input)")
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name in SKIP_DIRS or sub.name.startswith("."):
            continue
        files = [sub / f for f in WELL_FILES if (sub / f).is_file()]
        if not files:
            raise DataError(f"{sub}: no well_features.csv (every folder in {root} except figures/ is a representation)")
        found.append((sub.name, files[0]))
    if not found:
        raise DataError(f"{root}: no representation folders with a well_features.csv")
    return found


def detect_features(columns: Sequence[str], source: str) -> tuple[list[str], str]:
    """emb* columns or CellProfiler Cells_/Cytoplasm_/Nuclei_ columns (never Metadata*); both at once is an error."""
    emb = [c for c in columns if EMB_PATTERN.match(str(c))]
    cp = [c for c in columns if str(c).startswith(CP_PREFIXES) and "metadata" not in str(c).lower()]
    if emb and cp:
        raise DataError(
            f"{source}: mixed feature sets ({len(emb)} emb* columns, e.g. {emb[0]}, and {len(cp)} CellProfiler "
            f"columns, e.g. {cp[0]}); keep one set per folder"
        )
    if not emb and not cp:
        raise DataError(f"{source}: no feature columns (expected emb0.. / emb_0000.. or Cells_/Cytoplasm_/Nuclei_*)")
    return (emb, "embedding") if emb else (cp, "CellProfiler")


def apply_column_map(df: pd.DataFrame, mapping: Mapping[str, str], preset: str, source: str) -> pd.DataFrame:
    """Copy CellProfiler/pycytominer metadata columns onto the paper's names (explicit map first, then preset)."""
    if preset not in METADATA_PRESETS:
        raise ConfigError(f"unknown metadata preset {preset!r}: choose from {', '.join(METADATA_PRESETS)}")
    df = df.copy()
    for src, dst in mapping.items():
        if src not in df.columns:
            raise DataError(f"{source}: --map source column {src!r} not found")
        if dst in df.columns and src != dst:
            raise DataError(f"{source}: --map {src}={dst} would overwrite the existing column {dst!r}")
        df[dst] = df[src]
    for src, dst in METADATA_PRESETS[preset].items():
        if src in df.columns and dst not in df.columns:
            df[dst] = df[src]
    return df


def required_columns(cfg: EvalConfig) -> list[str]:
    """perturbation_id, batch, well and the label column (plus control_type for ORF sets)."""
    cols = ["perturbation_id", "batch", "well", cfg.label]
    return cols + ["control_type"] if cfg.orf else cols


def load_representation(name: str, path: Path, cfg: EvalConfig) -> Representation:
    """Read one well table, map metadata names, pick features, and reject what would give wrong numbers."""
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, low_memory=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from exc
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("Unnamed: ")])
    df = apply_column_map(df, cfg.column_map, cfg.metadata_preset, str(path))
    return representation_from_frame(name, df, cfg, path)


def representation_from_frame(name: str, df: pd.DataFrame, cfg: EvalConfig, path: Path) -> Representation:
    """Check an in-memory well table (paper metadata names) and split it into metadata and features.

    ``load_representation`` reads files through this, and the training probe hands it the frame it embedded, so
    both are checked and scored by the same code.
    """
    missing = [c for c in required_columns(cfg) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(missing)} "
            "(map CellProfiler names with --map Metadata_X=name or --metadata-preset pycytominer)"
        )
    if df.empty:
        raise DataError(f"{path}: no rows")
    features, kind = detect_features(list(df.columns), str(path))
    try:
        x = df[features].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric values in feature columns ({str(exc).splitlines()[0]})") from exc
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: {int(bad.sum())} NaN/inf feature values, first in column {features[c]} at CSV row {r + 2}"
        )
    for col in ("perturbation_id", "batch", "well"):
        if df[col].isna().any():
            first = int(np.argmax(df[col].isna().to_numpy())) + 2
            raise DataError(f"{path}: column {col} has missing values (first at CSV row {first})")
    meta = df.drop(columns=features).reset_index(drop=True)
    return Representation(name=name, path=path, meta=meta, x=x, features=features, kind=kind)


def control_mask(meta: pd.DataFrame, cfg: EvalConfig) -> np.ndarray:
    """Negative-control wells: perturbation_id in --controls, or control_type == negcon where that column exists."""
    mask = meta["perturbation_id"].astype(str).isin(cfg.controls).to_numpy()
    if "control_type" in meta.columns:
        mask = mask | (meta["control_type"].astype(str) == "negcon").to_numpy()
    return mask


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
    p_mi, p_ma = M.micro_macro(prec, labels)
    r_mi, r_ma = M.micro_macro(rec, labels)
    return {
        "avg_precision_micro": p_mi, "avg_recall_micro": r_mi, "avg_f1_micro": M.f1(p_mi, r_mi),
        "avg_precision_macro": p_ma, "avg_recall_macro": r_ma, "avg_f1_macro": M.f1(p_ma, r_ma),
    }


def _curve_tables(res: M.ProfilePassResult, labels: np.ndarray, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's *_prec_recall_k and *_prec_recall_cor tables for one representation and level."""
    k_cols = _pr_averages(res.prec_k, res.rec_k, labels)
    k_tab = pd.DataFrame({"k": res.ks, **k_cols})
    p_mi, r_mi = k_cols["avg_precision_micro"], k_cols["avg_recall_micro"]
    k_tab["mean_prec_R"] = float(np.nanmean(res.prec_r)) if np.isfinite(res.prec_r).any() else np.nan
    k_tab["AUCPR_k"] = M.auc_trapezoid(p_mi, r_mi)
    k_tab["label"] = name
    d_cols = _pr_averages(res.prec_d, res.rec_d, labels)
    d_tab = pd.DataFrame({"d": res.thresholds, **d_cols})
    pd_mi, rd_mi = d_cols["avg_precision_micro"], d_cols["avg_recall_micro"]
    m_ap = float(np.nanmean(res.ap)) if np.isfinite(res.ap).any() else np.nan
    d_tab["mAP"] = m_ap
    d_tab["mAP_k"] = m_ap
    d_tab["AUCPR_dist"] = M.auc_trapezoid(pd_mi, rd_mi)
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
    """Run the profile pass on one level, or leave a note when it has fewer than two profiles."""
    if len(x) < 2:
        notes.append(f"{what}: fewer than two profiles, curves undefined")
        return _empty_curves(name)
    unit = M.unit_rows(x, "correlation", f"{name} {what} profiles")
    res = M.profile_pass(unit, labels, device=cfg.device, progress=cfg.progress)
    if not (res.n_pos > 0).any():
        notes.append(f"{what}: no label has two or more profiles, so precision/recall and mAP are undefined")
    else:
        lone = int((np.bincount(labels[labels >= 0]) == 1).sum())
        if lone:
            notes.append(f"{what}: {lone} label(s) with a single profile have no positives and are left out")
    return _curve_tables(res, labels, name)


def _copairs_map(meta: pd.DataFrame, x: np.ndarray, rules: M.PairRules, sameby: list[str], keep: np.ndarray,
                 cfg: EvalConfig, task: str, name: str, notes: list[str]) -> pd.DataFrame:
    """Per-group mAP with p-values for one retrieval task, or an empty table plus a note when undefined."""
    ap = M.average_precision(meta, x, rules, device=cfg.device, progress=cfg.progress)
    ap = ap[keep]
    res = M.mean_average_precision(ap, sameby, cfg.null_size, cfg.threshold, cfg.seed)
    if res.empty:
        notes.append(f"{task} retrieval: no profile has both positive and negative pairs")
    res = res.rename(columns={sameby[0]: "group"})
    res.insert(0, "task", task)
    res.insert(0, "label", name)
    return res


def evaluate_representation(rep: Representation, cfg: EvalConfig) -> RepResult:
    """All metrics of one representation: paper set, copairs-style mAP and batch diagnostics."""
    notes: list[str] = []
    meta, x = rep.meta, rep.x
    is_ctrl = control_mask(meta, cfg)
    trt = ~is_ctrl
    wm, wx = meta[trt].reset_index(drop=True), x[trt]
    if len(wm) < 2:
        raise DataError(f"{rep.path}: fewer than two non-control wells to evaluate")
    pert = M.codes(wm["perturbation_id"].astype(str))
    counts = np.bincount(pert)
    if counts.max() < 2:
        raise DataError(
            f"{rep.path}: every perturbation_id has a single well; evaluation needs replicate wells "
            "(is this an aggregated file?)"
        )
    singles = int((counts == 1).sum())
    if singles:
        notes.append(f"{singles} perturbation(s) with a single well have no replicate and count as undefined")
    batch = M.codes(wm["batch"].astype(str))
    target = M.codes(wm[cfg.label].astype("string"))
    nsp = pert if cfg.nsp_mode == "perturbation" else M.codes(wm["well"].astype(str))
    lab = cfg.label
    tasks = [
        M.NNTask("pert_acc", pert),
        M.NNTask("pert_acc_NSB", pert, exclude_all_of=((batch, pert),)),
        M.NNTask(f"{lab}_acc_NSP", target, exclude_same=(nsp,)),
        M.NNTask(f"{lab}_acc_NSBP", target, exclude_same=(nsp,), exclude_all_of=((batch, target),)),
    ]
    xz = zscore(wx)
    unit = M.unit_rows(xz, "cosine", f"{rep.name} z-scored wells")
    wp = M.well_pass(unit, tasks, {"batch": batch, "target": target}, device=cfg.device, progress=cfg.progress)
    well: dict[str, object] = {"label": rep.name}
    for t in tasks:
        hits = wp.nn_correct[t.name]
        well[t.name] = float(np.nanmean(hits)) if np.isfinite(hits).any() else np.nan
        if not np.isfinite(hits).any():
            notes.append(f"{t.name}: no query has an eligible correct neighbour")
    pr = M.percent_replicating(xz, pert, cfg.replicate_null_size, cfg.seed)
    well["repl_corr"], well["percent_95"] = pr["repl_corr"], pr["percent_95"]
    if pr["reason"]:
        notes.append(f"percent replicating: {pr['reason']}")

    # profile levels (correlation distance on the features as given)
    pert_keys, pert_x = _mean_by(wx, wm[["batch", "perturbation_id"]])
    pk, pc = _level_curves(pert_x, M.codes(pert_keys["perturbation_id"]), rep.name, cfg, "perturbation level", notes)
    cons, cons_x = consensus_profiles(rep, cfg, notes)
    tk, tc = _level_curves(cons_x, M.codes(cons[lab]), rep.name, cfg, f"{lab} level", notes)

    map_df = retrieval_maps(rep, cfg, is_ctrl, cons, cons_x, notes)
    well.update(map_columns(map_df, lab))

    # batch diagnostics
    bc = M.batch_classification(xz, wm["batch"].astype(str).to_numpy(), cfg.batch_classifier, seed=cfg.seed)
    well["batch_bal_acc"], well["batch_mcc"] = bc["batch_bal_acc"], bc["batch_mcc"]
    if bc["reason"]:
        notes.append(str(bc["reason"]))
    for key, codes_ in (("batch", batch), ("target", target)):
        value, why = M.silhouette_summary(wp.silhouette[key], codes_)
        well[f"silhouette_{key}"] = value
        if why:
            notes.append(f"silhouette by {key}: {why}")
    well.update({
        "feature_set": rep.kind, "n_features": len(rep.features), "n_wells": len(wm),
        "n_perturbations": int(len(counts)), "nsp_mode": cfg.nsp_mode, "notes": "; ".join(notes),
    })
    return RepResult(well, pk, pc, tk, tc, map_df, (cons_x, cons[lab].to_numpy()))


def consensus_profiles(rep: Representation, cfg: EvalConfig, notes: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean profile per perturbation over its non-control wells, with its label (perturbations without one dropped)."""
    lab = cfg.label
    trt = ~control_mask(rep.meta, cfg)
    wm, wx = rep.meta[trt].reset_index(drop=True), rep.x[trt]
    cons_keys, cons_x = _mean_by(wx, wm[["perturbation_id"]])
    cons_target = wm.groupby("perturbation_id", sort=False)[lab].first().reindex(cons_keys["perturbation_id"])
    has_t = cons_target.notna().to_numpy()
    if not has_t.all():
        notes.append(f"{int((~has_t).sum())} perturbation(s) without a {lab} left out of {lab}-level metrics")
    cons = pd.DataFrame({"perturbation_id": cons_keys["perturbation_id"][has_t].to_numpy(),
                         lab: cons_target[has_t].astype(str).to_numpy()})
    return cons, cons_x[has_t]


def map_columns(map_df: pd.DataFrame, lab: str) -> dict[str, float]:
    """replicate_/<label>_ mAP, normalised mAP and fraction retrieved: means over the groups of each task."""
    out = {}
    for task in ("replicate", lab):
        part = map_df[map_df["task"] == task] if not map_df.empty else map_df
        out[f"{task}_mAP"] = float(part["mean_average_precision"].mean()) if len(part) else np.nan
        out[f"{task}_nmAP"] = float(part["mean_normalized_average_precision"].mean()) if len(part) else np.nan
        out[f"{task}_fraction_retrieved"] = float(part["below_corrected_p"].mean()) if len(part) else np.nan
    return out


def retrieval_maps(rep: Representation, cfg: EvalConfig, is_ctrl: np.ndarray | None = None,
                   cons: pd.DataFrame | None = None, cons_x: np.ndarray | None = None,
                   notes: list[str] | None = None) -> pd.DataFrame:
    """copairs-style mAP: replicate retrieval against controls, and label retrieval on consensus profiles.

    The training probe calls this with a representation alone (controls and consensus are derived here), and
    ``evaluate_representation`` with what it has already computed, so both give the same numbers.
    """
    notes = [] if notes is None else notes
    meta, x, lab = rep.meta, rep.x, cfg.label
    is_ctrl = control_mask(meta, cfg) if is_ctrl is None else is_ctrl
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
        rules = M.PairRules(("perturbation_id", "__ref"), tuple(cfg.replicate_diffby), (), ("perturbation_id", "__ref"))
        maps.append(_copairs_map(rmeta, x, rules, ["perturbation_id"], trt, cfg, "replicate", rep.name, notes))
    else:
        notes.append("replicate retrieval: no control wells (see --controls)")
    if len(cons) >= 2:
        rules = M.PairRules((lab,), ("perturbation_id",), (), (lab,))
        maps.append(_copairs_map(cons, cons_x, rules, [lab], np.ones(len(cons), bool), cfg, lab, rep.name, notes))
    return pd.concat(maps, ignore_index=True) if maps else pd.DataFrame()


def _summary_markdown(well: pd.DataFrame, cfg: EvalConfig) -> str:
    """One row per representation with the headline numbers, then the reasons for any NaN."""
    lab = cfg.label
    cols = ["label", "feature_set", "n_wells", "pert_acc", "pert_acc_NSB", f"{lab}_acc_NSP", f"{lab}_acc_NSBP",
            "percent_95", "pert_mAP", f"{lab}_level_mAP", "replicate_mAP", "replicate_fraction_retrieved",
            f"{lab}_mAP", f"{lab}_fraction_retrieved", "batch_bal_acc", "batch_mcc", "silhouette_batch",
            "silhouette_target"]
    lines = [f"# Evaluation of {cfg.input_dir}", "", f"NSP mode: {cfg.nsp_mode}; seed {cfg.seed}; "
             f"null size {cfg.null_size}. Metric definitions: docs/EVALUATION.md.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in well.iterrows():
        cells = []
        for c in cols:
            v = row.get(c, np.nan)
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines += gains_markdown(well, cfg)
    notes = [(r["label"], r["notes"]) for _, r in well.iterrows() if r["notes"]]
    if notes:
        lines += ["", "## Notes (why a value is NaN)", ""] + [f"- **{n}**: {t}" for n, t in notes]
    return "\n".join(lines) + "\n"


def gains_markdown(well: pd.DataFrame, cfg: EvalConfig) -> list[str]:
    """Per representation, the signed gain in label and replicate mAP over each ``--compare-to`` baseline.

    A trained model is a result only against its own random initialisation and the handcrafted features, so the
    summary says in words whether each one beats them.
    """
    if not cfg.compare_to:
        return []
    lab = cfg.label
    by_label = well.set_index("label")
    check_compare_to(cfg, list(by_label.index))
    lines = ["", "## Gains over the baselines", "",
             f"Differences in mAP (representation minus baseline); positive means better. "
             f"Baselines: {', '.join(cfg.compare_to)}.", "",
             f"| label | baseline | {lab}_mAP gain | replicate_mAP gain | verdict |", "|---|---|---|---|---|"]
    for name, row in by_label.iterrows():
        if name in cfg.compare_to:
            continue
        for base in cfg.compare_to:
            d_t = float(row[f"{lab}_mAP"]) - float(by_label.loc[base, f"{lab}_mAP"])
            d_r = float(row["replicate_mAP"]) - float(by_label.loc[base, "replicate_mAP"])
            verdict = ("undefined (a mAP is NaN, see the notes)" if not (np.isfinite(d_t) and np.isfinite(d_r))
                       else "better on both" if d_t > 0 and d_r > 0 else "worse on both" if d_t < 0 and d_r < 0
                       else f"better on {lab} only" if d_t > 0 else "better on replicate only" if d_r > 0
                       else "no difference")
            lines.append(f"| {name} | {base} | {d_t:+.3f} | {d_r:+.3f} | {verdict} |")
    return lines


def check_compare_to(cfg: EvalConfig, names: Sequence[str]) -> None:
    """Every ``--compare-to`` baseline must be one of the representation folders (checked before any work)."""
    missing = [b for b in cfg.compare_to if b not in names]
    if missing:
        raise ConfigError(f"--compare-to {' '.join(missing)}: no such representation folder in {cfg.input_dir} "
                          f"(found {', '.join(map(str, names))})")


def write_outputs(results: dict[str, RepResult], cfg: EvalConfig) -> list[Path]:
    """The paper's CSVs, map_results.csv, summary.md and figures/, all written atomically."""
    out = cfg.out_dir
    lab = cfg.label
    well = pd.DataFrame([r.well for r in results.values()])
    frames = {
        "pert_prec_recall_k.csv": pd.concat([r.pert_k for r in results.values()], ignore_index=True),
        "pert_prec_recall_cor.csv": pd.concat([r.pert_cor for r in results.values()], ignore_index=True),
        "target_prec_recall_k.csv": pd.concat([r.target_k for r in results.values()], ignore_index=True),
        "target_prec_recall_cor.csv": pd.concat([r.target_cor for r in results.values()], ignore_index=True),
    }
    map_df = pd.concat([r.map_results for r in results.values()], ignore_index=True)
    for name, key in (("pert", "pert_prec_recall_cor.csv"), (f"{lab}_level", "target_prec_recall_cor.csv")):
        first = frames[key].groupby("label", sort=False)["mAP"].first() if len(frames[key]) else pd.Series()
        well[f"{name}_mAP"] = well["label"].map(first).astype(float)
    paper = ["label", "pert_acc", "pert_acc_NSB", f"{lab}_acc_NSP", f"{lab}_acc_NSBP", "repl_corr", "percent_95"]
    well = well[paper + [c for c in well.columns if c not in paper and c != "notes"] + ["notes"]]
    written = []
    for fname, df in [("well_metrics.csv", well), *frames.items(), ("map_results.csv", map_df)]:
        write_csv_atomic(df, out / fname)
        written.append(out / fname)
    write_text_atomic(out / "summary.md", _summary_markdown(well, cfg))
    written.append(out / "summary.md")
    if cfg.figures:
        written += _write_figures(results, well, frames, map_df, cfg)
    return written


def _write_figures(results: dict[str, RepResult], well: pd.DataFrame, frames: dict[str, pd.DataFrame],
                   map_df: pd.DataFrame, cfg: EvalConfig) -> list[Path]:
    """The paper's scatter plots, PR curves, mAP per group and the consensus PCA, as PNG and PDF."""
    lab = cfg.label
    fig = cfg.out_dir / "figures"
    written: list[Path] = []
    written += plots.map_vs_accuracy(well, "pert_acc_NSB", "pert_mAP", fig / "pert_metrics_plot", "perturbation")
    written += plots.map_vs_accuracy(well, f"{lab}_acc_NSBP", f"{lab}_level_mAP", fig / f"{lab}_metrics_plot", lab)
    written += plots.pr_curves(frames["pert_prec_recall_k.csv"], frames["pert_prec_recall_cor.csv"],
                               fig / "pert_pr_curves", "perturbation")
    written += plots.pr_curves(frames["target_prec_recall_k.csv"], frames["target_prec_recall_cor.csv"],
                               fig / f"{lab}_pr_curves", lab)
    for task in ("replicate", lab):
        part = map_df[map_df["task"] == task] if not map_df.empty else map_df
        written += plots.map_per_group(part, fig / f"map_{task}", f"{task} retrieval mAP")
    written += plots.consensus_pca({n: r.consensus for n, r in results.items()}, fig / f"consensus_pca_{lab}")
    return written


def default_device() -> str | None:
    """CUDA when an NVIDIA driver is loaded and torch sees the GPU; None means numpy (torch is not even imported)."""
    if not Path("/proc/driver/nvidia").exists():
        return None
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def run_evaluation(cfg: EvalConfig) -> Path:
    """Load, evaluate and write every representation of ``cfg.input_dir``; returns the output folder."""
    if cfg.nsp_mode not in NSP_MODES:
        raise ConfigError(f"unknown --nsp-mode {cfg.nsp_mode!r}: choose from {', '.join(NSP_MODES)}")
    if cfg.null_size < 1 or cfg.replicate_null_size < 1:
        raise ConfigError("--null-size and --replicate-null-size must be positive")
    if not 0.0 < cfg.threshold < 1.0:
        raise ConfigError(f"--threshold {cfg.threshold} must be a significance level between 0 and 1")
    start = time.perf_counter()
    found = discover_representations(cfg.input_dir)
    check_compare_to(cfg, [name for name, _ in found])
    ensure_dir(cfg.out_dir)
    results = {}
    for name, path in found:
        rep = load_representation(name, path, cfg)
        print(f"[{name}] {rep.kind}: {len(rep.meta)} wells x {len(rep.features)} features", file=sys.stderr)
        results[name] = evaluate_representation(rep, cfg)
    write_outputs(results, cfg)
    print(f"evaluated {len(results)} representation(s) in {time.perf_counter() - start:.1f} s; "
          f"results in {cfg.out_dir}")
    return cfg.out_dir
