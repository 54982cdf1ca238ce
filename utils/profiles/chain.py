"""Normalisation chains: named steps run in order on well profiles, each fitted on the wells you choose.

A chain is written as step names joined by ``_`` (``mad_robustize_spherize_harmony``; the paper's method names,
such as ``spherize_mad_robustize``, are chains already), or as a JSON/TOML file listing the steps with their
settings. ``name@controls`` / ``name@all`` picks the wells one step is fitted on. ``jump`` expands to the JUMP
consortium's recipe for released profiles (well position, MAD-robustise on the controls, outliers, feature
selection, sphering) and ``jump_harmony`` adds Harmony, as JUMP's corrected profiles do (Arevalo et al., Nat
Commun 2024).

Before every step the paper's variance filter drops features whose population variance is <= the threshold in the
control wells or in the others (``normalize.variance_filter``). Every step leaves a record (the wells it was fitted
on, its scope and settings, features in and out) that inference, the handcrafted baseline and ``python -m
utils.profiles`` write to run.json.

``STEPS`` is the one registry of steps and ``parse_chain`` the one lookup.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomllib

from utils.errors import ConfigError, DataError
from utils.profiles.aggregate import check_columns
from utils.profiles.controls import NO_WELLS, control_mask, no_match_message
from utils.profiles.corrections import (
    MIN_POSITION_WELLS,
    OUTLIER_BOUND,
    harmony,
    outlier_features,
    rank_inverse_normal,
    row_column_effects,
    well_position_effects,
    well_row_column,
)
from utils.profiles.features import detect_features, finite_features
from utils.profiles.normalize import (
    NO_NORMALISATION,
    NORM_ALIASES,
    PAPER_STEPS,
    SCOPES,
    VARIANCE_THRESHOLD,
    StepSpec,
    canonical_method,
    l2_normalize_rows,
    normalize_step,
    variance_filter,
)

FIT_CHOICES: tuple[str, ...] = ("all", "controls")
CHAIN_FILE_SUFFIXES: tuple[str, ...] = (".json", ".toml")
SELECT_OPERATIONS: tuple[str, ...] = ("variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist")
CP_ONLY_OPERATIONS: tuple[str, ...] = ("blocklist",)  # pycytominer's blocklist names CellProfiler features only
CORR_THRESHOLD = 0.9
NA_CUTOFF = 0.05


@dataclass(frozen=True)
class Step:
    """One step of a chain as the user asked for it: the registry name, where it is fitted, and its settings."""

    name: str
    fit_on: str
    scope: str
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str, default: Any = None) -> Any:
        """A setting of this step, or the default."""
        return dict(self.params).get(key, default)

    def label(self) -> str:
        """The step's spelling in a chain name (``@controls`` only where it departs from the registry default)."""
        kind = STEPS[self.name]
        return self.name if self.fit_on == kind.fit_on else f"{self.name}@{self.fit_on}"


@dataclass(frozen=True)
class ChainContext:
    """What every step may need besides the profiles: the controls, the plate and batch columns, the seed."""

    control_query: str
    plate_col: str = "plate"
    batch_key: str = "batch"
    well_col: str = "well"
    variance_threshold: float = VARIANCE_THRESHOLD
    seed: int = 0


StepFn = Callable[[pd.DataFrame, list[str], list[str], Step, ChainContext], tuple[pd.DataFrame, list[str], dict]]


@dataclass(frozen=True)
class StepKind:
    """A registered step: what runs, its default fit and scope, and which fits, scopes and settings it accepts."""

    run: StepFn
    fit_on: str
    scope: str
    fit_choices: tuple[str, ...]
    scope_choices: tuple[str, ...]
    params: tuple[str, ...]
    doc: str


@dataclass
class ChainResult:
    """The normalised wells, the surviving features, and one record per step for run.json."""

    profiles: pd.DataFrame
    features: list[str]
    records: list[dict[str, Any]]


def _reference(df: pd.DataFrame, step: Step, ctx: ChainContext) -> np.ndarray:
    """The wells a step is fitted on, as a mask; no controls found is an error naming the query."""
    if step.fit_on == "all":
        return np.ones(len(df), dtype=bool)
    mask = control_mask(df, ctx.control_query)
    if not mask.any():
        raise DataError(no_match_message(df, ctx.control_query, step.name))
    return mask


def _groups(df: pd.DataFrame, scope: str, plate_col: str) -> list[np.ndarray]:
    """Row positions of each fitting group: every plate, or all wells at once."""
    if scope == "global":
        return [np.arange(len(df))]
    check_columns(df, [plate_col], "per-plate normalisation")
    codes = pd.factorize(df[plate_col].astype(str))[0]
    return [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]


def _pycytominer(method: str) -> StepFn:
    def run(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
            ) -> tuple[pd.DataFrame, list[str], dict]:
        reference = "controls" if step.fit_on == "controls" else "all"
        out = normalize_step(df, features, meta, method, ctx.control_query, StepSpec(step.scope, reference),
                             ctx.plate_col)
        return out, features, {}
    return run


def _well_position(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
                   ) -> tuple[pd.DataFrame, list[str], dict]:
    check_columns(df, [ctx.well_col], "well-position correction")
    ref = _reference(df, step, ctx)
    positions = pd.factorize(df[ctx.well_col].astype(str).str.strip().str.upper())[0]
    x = df[features].to_numpy(dtype=np.float64)
    effect, missing = well_position_effects(x, positions, ref)
    out = df.copy()
    out[features] = x - effect
    return out, features, {"positions": int(positions.max()) + 1, "positions_left_alone": missing,
                           "min_reference_wells": MIN_POSITION_WELLS}


def _row_column(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
                ) -> tuple[pd.DataFrame, list[str], dict]:
    check_columns(df, [ctx.well_col], "row/column correction")
    rows, cols = well_row_column(df[ctx.well_col], f"row/column correction, column {ctx.well_col!r}")
    ref = _reference(df, step, ctx)
    x = df[features].to_numpy(dtype=np.float64)
    corrected = x.copy()
    for idx in _groups(df, step.scope, ctx.plate_col):
        if not ref[idx].any():
            raise DataError(f"row_column: plate {df[ctx.plate_col].iloc[idx[0]]!r} has no reference wells "
                            f"({step.fit_on})")
        corrected[idx] = x[idx] - row_column_effects(x[idx], rows[idx], cols[idx], ref[idx])
    out = df.copy()
    out[features] = corrected
    return out, features, {}


def _rank_int(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
              ) -> tuple[pd.DataFrame, list[str], dict]:
    ref = _reference(df, step, ctx)
    x = df[features].to_numpy(dtype=np.float64)
    out_x = np.empty_like(x)
    for idx in _groups(df, step.scope, ctx.plate_col):
        if ref[idx].sum() < 2:
            raise DataError(f"rank_int: {ref[idx].sum()} reference well(s) in a fitting group; need at least 2")
        out_x[idx] = rank_inverse_normal(x[idx], None if step.fit_on == "all" else ref[idx])
    out = df.copy()
    out[features] = out_x
    return out, features, {}


def _outliers(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
              ) -> tuple[pd.DataFrame, list[str], dict]:
    bound = float(step.param("bound", OUTLIER_BOUND))
    x = df[features].to_numpy(dtype=np.float64)
    drop = outlier_features(x, bound)
    kept = [f for f, d in zip(features, drop) if not d]
    if not kept:
        raise DataError(f"outlier: every feature has a 99th percentile of |value| above {bound}")
    clipped = np.clip(x[:, ~drop], -bound, bound)
    n_clipped = int((np.abs(x[:, ~drop]) > bound).sum())
    out = df[[*meta, *kept]].copy()
    out[kept] = clipped
    return out, kept, {"bound": bound, "dropped_features": int(drop.sum()), "clipped_values": n_clipped}


def select_features(df: pd.DataFrame, features: Sequence[str], meta: Sequence[str],
                    operations: Sequence[str] = SELECT_OPERATIONS, samples: str = "all",
                    corr_threshold: float = CORR_THRESHOLD, na_cutoff: float = NA_CUTOFF
                    ) -> tuple[pd.DataFrame, list[str], dict[str, Any]]:
    """pycytominer feature selection, with the operations that apply to the feature type.

    The blocklist names CellProfiler features, so on embeddings it is skipped (and reported), not run as a no-op.
    ``samples`` is ``all`` or the pandas query of the wells the statistics come from.
    """
    # lazy: importing pycytominer costs ~1.5 s, which --help and config checks must not pay
    from pycytominer import feature_select

    features, meta = list(features), list(meta)
    unknown = [op for op in operations if op not in SELECT_OPERATIONS]
    if unknown:
        raise ConfigError(f"feature_select: operation {unknown[0]!r} is not one of {', '.join(SELECT_OPERATIONS)}")
    _, kind = detect_features(features, "feature selection")
    ops = [op for op in operations if kind == "CellProfiler" or op not in CP_ONLY_OPERATIONS]
    info: dict[str, Any] = {"operations": ops, "skipped_operations": [o for o in operations if o not in ops]}
    if not ops:
        return df[[*meta, *features]], features, info
    selected = feature_select(profiles=df[[*meta, *features]], features=features, samples=samples, operation=ops,
                              corr_threshold=corr_threshold, na_cutoff=na_cutoff)
    kept = [f for f in features if f in selected.columns]
    if not kept:
        raise DataError(f"feature selection ({', '.join(ops)}) removed every feature; try fewer operations")
    return df[[*meta, *kept]], kept, info


def _feature_select(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
                    ) -> tuple[pd.DataFrame, list[str], dict]:
    return select_features(df, features, meta, tuple(step.param("operations", SELECT_OPERATIONS)),
                           "all" if step.fit_on == "all" else ctx.control_query,
                           float(step.param("corr_threshold", CORR_THRESHOLD)),
                           float(step.param("na_cutoff", NA_CUTOFF)))


def _harmony(df: pd.DataFrame, features: list[str], meta: list[str], step: Step, ctx: ChainContext
             ) -> tuple[pd.DataFrame, list[str], dict]:
    key = str(step.param("batch_key", ctx.batch_key))
    if key not in df.columns:
        raise DataError(f"harmony: batch key column {key!r} not found (columns: {', '.join(map(str, meta))})")
    x = df[features].to_numpy(dtype=np.float64)
    nclust = step.param("nclust")
    z = harmony(x, df[key], seed=int(step.param("seed", ctx.seed)), max_iter=int(step.param("max_iter", 20)),
                nclust=None if nclust is None else int(nclust), theta=step.param("theta"))
    out = df.copy()
    out[features] = z
    return out, features, {"batch_key": key, "n_batches": int(df[key].nunique()),
                           "nclust": int(nclust) if nclust is not None else max(1, min(round(len(df) / 30), 100))}


STEPS: dict[str, StepKind] = {
    "standardize": StepKind(_pycytominer("standardize"), PAPER_STEPS["standardize"].reference,
                            PAPER_STEPS["standardize"].scope, FIT_CHOICES, ("plate", "global"), (),
                            "pycytominer z-score (per plate, on the controls: the paper)"),
    "mad_robustize": StepKind(_pycytominer("mad_robustize"), PAPER_STEPS["mad_robustize"].reference,
                              PAPER_STEPS["mad_robustize"].scope, FIT_CHOICES, ("plate", "global"), (),
                              "pycytominer (x - median) / (1.4826 MAD) (per plate, on all wells: the paper)"),
    "spherize": StepKind(_pycytominer("spherize"), PAPER_STEPS["spherize"].reference,
                         PAPER_STEPS["spherize"].scope, FIT_CHOICES, ("plate", "global"), (),
                         "pycytominer ZCA-cor whitening (pooled, on the controls: the paper)"),
    "well_position": StepKind(_well_position, "all", "global", FIT_CHOICES, ("global",), (),
                              "subtract each well position's mean effect across plates (JUMP's wellpos)"),
    "row_column": StepKind(_row_column, "all", "plate", FIT_CHOICES, ("plate", "global"), (),
                           "subtract additive row and column effects, least squares per plate"),
    "rank_int": StepKind(_rank_int, "all", "global", FIT_CHOICES, ("plate", "global"), (),
                         "rank-based inverse-normal transform per feature (Blom, c = 3/8)"),
    "outlier": StepKind(_outliers, "all", "global", ("all",), ("global",), ("bound",),
                        "drop features whose 99th percentile of |x| exceeds 100, clip the rest to +-100 (JUMP)"),
    "feature_select": StepKind(_feature_select, "all", "global", FIT_CHOICES, ("global",),
                               ("operations", "corr_threshold", "na_cutoff"),
                               "pycytominer feature selection (variance, correlation, NA; blocklist for "
                               "CellProfiler features)"),
    "harmony": StepKind(_harmony, "all", "global", ("all",), ("global",),
                        ("batch_key", "nclust", "theta", "max_iter", "seed"),
                        "Harmony (harmonypy) on the batch key; transductive, so fitted on all wells"),
}

# Named chains: the paper's "no normalisation", and the JUMP recipe (Arevalo et al. 2024; jump-profiling-recipe's
# wellpos, var, mad on negcon, outlier, featselect, sphering, harmony).
CHAINS: dict[str, tuple[str, ...]] = {
    NO_NORMALISATION: (),
    "jump": ("well_position", "mad_robustize@controls", "outlier", "feature_select", "spherize"),
}


def _split_token(token: str) -> tuple[str, str | None]:
    name, _, fit = token.partition("@")
    return name, (fit or None)


def make_step(name: str, fit_on: str | None = None, scope: str | None = None, **params: Any) -> Step:
    """A validated step: the name is registered, the fit and scope are ones it accepts, the settings are known."""
    if name not in STEPS:
        raise ConfigError(f"normalisation step {name!r} is not one of {', '.join(STEPS)}")
    kind = STEPS[name]
    fit = kind.fit_on if fit_on is None else fit_on
    if fit not in kind.fit_choices:
        why = " (Harmony is transductive: it has no fitted transform to apply to other wells)" if name == "harmony" \
            else ""
        raise ConfigError(f"step {name!r} cannot be fitted on {fit!r}; choose {', '.join(kind.fit_choices)}{why}")
    sc = kind.scope if scope is None else scope
    if sc not in kind.scope_choices:
        raise ConfigError(f"step {name!r} has no scope {sc!r}; choose {', '.join(kind.scope_choices)}")
    unknown = [k for k in params if k not in kind.params]
    if unknown:
        allowed = ", ".join(kind.params) or "none"
        raise ConfigError(f"step {name!r} has no setting {unknown[0]!r} (settings: {allowed})")
    frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return Step(name, fit, sc, frozen)


def _parse_name(spec: str) -> list[Step]:
    """Greedy longest match of registered step and chain names over the ``_``-separated tokens."""
    tokens = spec.split("_")
    names = {*STEPS, *CHAINS}
    steps: list[Step] = []
    i = 0
    while i < len(tokens):
        for j in range(len(tokens), i, -1):
            token = "_".join(tokens[i:j])
            name, fit = _split_token(token)
            if name in names and not (fit and "_" in fit):  # "@controls" covers one token, never the next step
                if name in CHAINS:
                    if fit:
                        raise ConfigError(f"--norm_method: {token!r}: '@' applies to steps, not to chain {name!r}")
                    steps += [make_step(*_split_token(t)) for t in CHAINS[name]]
                else:
                    steps.append(make_step(name, fit))
                i = j
                break
        else:
            raise ConfigError(f"--norm_method {spec!r}: {tokens[i]!r} starts no known step "
                              f"(steps: {', '.join(STEPS)}; chains: {', '.join(CHAINS)})")
    return steps


def _read_chain_file(path: Path) -> list[Step]:
    """Steps from a JSON or TOML file: a list, or ``{"steps": [...]}``; each entry a name or a table of settings."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the normalisation chain ({str(exc).splitlines()[0]})") from None
    entries = data.get("steps") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected a list of steps, or a 'steps' list")
    steps = []
    for k, entry in enumerate(entries, 1):
        if isinstance(entry, str):
            steps.append(make_step(*_split_token(entry)))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            settings = {key: v for key, v in entry.items() if key not in ("name", "fit_on", "scope")}
            try:
                steps.append(make_step(entry["name"], entry.get("fit_on"), entry.get("scope"), **settings))
            except ConfigError as exc:
                raise ConfigError(f"{path}: step {k}: {exc}") from None
        else:
            raise ConfigError(f"{path}: step {k} must be a step name or a table with a 'name'")
    return steps


def is_chain_file(spec: str) -> bool:
    """Whether ``--norm_method`` names a chain file rather than a chain."""
    return Path(spec).suffix.lower() in CHAIN_FILE_SUFFIXES


def parse_chain(spec: str) -> list[Step]:
    """The steps of a chain name (``mad_robustize_spherize_harmony``, ``jump``, ``none``) or of a chain file."""
    spec = canonical_method(spec.strip())
    if is_chain_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"--norm_method {spec}: chain file not found")
        return _read_chain_file(path)
    if spec in CHAINS:
        return [make_step(*_split_token(t)) for t in CHAINS[spec]]
    if not spec:
        raise ConfigError("--norm_method is empty")
    return _parse_name(spec)


def chain_name(steps: Sequence[Step]) -> str:
    """The canonical chain name of a list of steps (``no_post_proc`` for none)."""
    return "_".join(s.label() for s in steps) or NO_NORMALISATION


def with_overrides(steps: Sequence[Step], scope: str = "paper", mad_reference: str = "all") -> list[Step]:
    """Apply the inference flags ``--norm-scope`` (plate/global on the pycytominer steps) and ``--mad-reference``.

    Only steps left at their registry default change, so a chain file's explicit choice wins.
    """
    if scope not in SCOPES:
        raise ConfigError(f"--norm-scope {scope!r} is not one of {', '.join(SCOPES)}")
    if mad_reference not in FIT_CHOICES:
        raise ConfigError(f"--mad-reference {mad_reference!r} is not one of {', '.join(FIT_CHOICES)}")
    out = []
    for s in steps:
        kind = STEPS[s.name]
        if s.name in PAPER_STEPS:
            sc = s.scope if scope == "paper" or s.scope != kind.scope else scope
            fit = mad_reference if s.name == "mad_robustize" and s.fit_on == kind.fit_on else s.fit_on
            s = Step(s.name, fit, sc, s.params)
        out.append(s)
    return out


def step_record(step: Step, n_in: int, n_filtered: int, n_out: int, extra: Mapping[str, Any], ctx: ChainContext
                ) -> dict[str, Any]:
    """What run.json says about one step: where it was fitted, its settings, and the features it saw and kept."""
    return {"step": step.name, "fit_on": step.fit_on,
            "fitted_on": ctx.control_query if step.fit_on == "controls" else "all wells",
            "scope": step.scope, "settings": dict(step.params), "features_in": n_in,
            "dropped_by_variance_filter": n_in - n_filtered, "features_out": n_out, **extra}


def no_variance_message(df: pd.DataFrame, features: Sequence[str], controls: np.ndarray, step: str,
                        threshold: float, first: bool = True) -> str:
    """Why the variance filter kept nothing, naming the real cause: constant profiles, or constant controls.

    Why: the filter needs spread in the control wells and in the others; when the model maps every well to the same
    vector it is the model's output that is degenerate, not the controls, and the message must say so.
    """
    values = df[list(features)].to_numpy(dtype=np.float64)
    where = "before it" if first else "after the previous steps"
    if (values.var(axis=0) <= threshold).all():
        what = "constant" if np.ptp(values, axis=0).max(initial=0.0) == 0 else "almost constant"
        return (f"{step}: every feature has variance <= {threshold} across all {len(df)} wells {where}: the profiles "
                f"are {what}, so the model output (or the input table) is degenerate, not the controls")
    parts = [(name, mask) for name, mask in (("control", controls), ("non-control", ~controls)) if mask.any()]
    flat = [name for name, mask in parts if (values[mask].var(axis=0) <= threshold).all()]
    if len(flat) == 1:
        n = int((controls if flat[0] == "control" else ~controls).sum())
        return (f"{step}: every feature has variance <= {threshold} within the {n} {flat[0]} wells {where} "
                f"(the variance filter needs spread in both the control and the other wells)")
    return (f"{step}: every feature has variance <= {threshold} in the control or in the non-control wells {where} "
            f"(the variance filter needs spread in both)")


def apply_chain(df: pd.DataFrame, features: Sequence[str], meta: Sequence[str], steps: Sequence[Step],
                ctx: ChainContext, l2norm: bool = False) -> ChainResult:
    """Run the steps in order on finite profiles, the variance filter before each; see the module docstring.

    Parameters
    ----------
    df:
        Well profiles: metadata and finite features (drop wells without valid tiles first).
    features, meta:
        The feature and metadata columns; only these are returned.
    steps:
        From ``parse_chain`` (then ``with_overrides`` for the inference flags).
    ctx:
        The control query, the plate, well and batch columns, the variance threshold and the seed.
    l2norm:
        Scale each profile (row) to unit L2 norm first.
    """
    features, meta = list(features), list(meta)
    check_columns(df, [*meta, *features], "normalisation")
    if steps and not len(df):
        raise DataError(NO_WELLS)
    finite_features(df, features, "normalisation", csv_rows=False, hint="drop wells without valid tiles first",
                    inf_hint="the model output overflows (a degenerate or diverged checkpoint, or fp16 overflow)")
    out = df[[*meta, *features]].reset_index(drop=True)
    if l2norm:
        out = l2_normalize_rows(out, features)
    records: list[dict[str, Any]] = []
    for step in steps:
        controls = control_mask(out, ctx.control_query)
        if not controls.any():
            raise DataError(no_match_message(out, ctx.control_query, step.name))
        n_in = len(features)
        kept = variance_filter(out, features, controls, ctx.variance_threshold)
        if not kept:
            raise DataError(no_variance_message(out, features, controls, step.name, ctx.variance_threshold,
                                                first=not records))
        features = kept
        n_filtered = len(features)
        out, features, extra = STEPS[step.name].run(out[[*meta, *features]], features, meta, step, ctx)
        records.append(step_record(step, n_in, n_filtered, len(features), extra, ctx))
    return ChainResult(out[[*meta, *features]], features, records)


def normalize_profiles(
    df: pd.DataFrame,
    features: Sequence[str],
    meta: Sequence[str],
    method: str,
    control_query: str,
    *,
    scope: str = "paper",
    mad_reference: str = "all",
    l2norm: bool = False,
    variance_threshold: float = VARIANCE_THRESHOLD,
    plate_col: str = "plate",
    batch_key: str = "batch",
    seed: int = 0,
    records: list[dict[str, Any]] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Normalise with a chain (a paper method, a new chain, or a chain file); returns the table and kept features.

    Parameters
    ----------
    method:
        A chain name or file (``parse_chain``); ``none`` and ``no_post_proc`` return the profiles unchanged.
    control_query:
        Pandas query selecting the negative-control wells (``utils.profiles.controls.resolve_control_query``).
    scope, mad_reference:
        ``--norm-scope`` and ``--mad-reference`` (``with_overrides``).
    l2norm, variance_threshold, plate_col, batch_key, seed:
        Row L2 scaling first; the variance filter; the plate column of per-plate steps; Harmony's batch column
        and seed.
    records:
        When given, receives one record per step (for run.json).
    """
    steps = with_overrides(parse_chain(method), scope, mad_reference)
    ctx = ChainContext(control_query, plate_col=plate_col, batch_key=batch_key,
                       variance_threshold=variance_threshold, seed=seed)
    result = apply_chain(df, features, meta, steps, ctx, l2norm=l2norm)
    if records is not None:
        records.extend(result.records)
    return result.profiles, result.features


__all__ = ["CHAINS", "ChainContext", "ChainResult", "FIT_CHOICES", "NORM_ALIASES", "STEPS", "Step", "apply_chain",
           "chain_name", "is_chain_file", "make_step", "normalize_profiles", "parse_chain", "select_features",
           "with_overrides"]
