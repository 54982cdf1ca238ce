"""Profile aggregation against brute-force loops and normalisation against direct pycytominer calls."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from pycytominer import aggregate, normalize
from sklearn.preprocessing import StandardScaler

from utils.errors import ConfigError, DataError
from utils.profiles import (
    NORM_METHODS,
    aggregate_sites,
    aggregate_wells,
    consensus,
    embedding_names,
    feature_columns,
    l2_normalize_rows,
    normalize_profiles,
    resolve_control_query,
    variance_filter,
)

FEATS = embedding_names(6)
META = ["batch", "plate", "well", "perturbation_id", "target"]
DMSO = "perturbation_id == 'DMSO'"


def _tiles(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for plate, well, field, tile in itertools.product(["P1", "P2"], ["A01", "A02", "B01"], [1, 2, 3], range(4)):
        rows.append({"plate": plate, "well": well, "field": field, "tile": tile})
    df = pd.DataFrame(rows)
    values = rng.normal(size=(len(df), len(FEATS)))
    invalid = rng.random(len(df)) < 0.3
    invalid[(df["plate"] == "P1") & (df["well"] == "A02") & (df["field"] == 2)] = True  # a site with no valid tile
    values[invalid] = np.nan
    return pd.concat([df, pd.DataFrame(values, columns=FEATS)], axis=1)


def _brute_force(df: pd.DataFrame, keys: list[str], operation: str) -> pd.DataFrame:
    reduce = np.nanmean if operation == "mean" else np.nanmedian
    rows = []
    for key in df[keys].drop_duplicates().itertuples(index=False):
        mask = np.ones(len(df), dtype=bool)
        for k, v in zip(keys, key):
            mask &= (df[k] == v).to_numpy()
        values = df.loc[mask, FEATS].to_numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            profile = reduce(values, axis=0)
        rows.append({**dict(zip(keys, key)), **dict(zip(FEATS, profile)),
                     "n": int((~np.isnan(values).any(axis=1)).sum())})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("operation", ["mean", "median"])
def test_site_and_well_aggregation_equal_brute_force(operation: str) -> None:
    tiles = _tiles(np.random.default_rng(0))
    sites = aggregate_sites(tiles, FEATS, ["plate", "well", "field"], operation)
    expected = _brute_force(tiles, ["plate", "well", "field"], operation)
    cols = ["plate", "well", "field", *FEATS]
    pd.testing.assert_frame_equal(sites[cols], expected[cols])
    assert sites["n_valid_tiles"].tolist() == expected["n"].tolist()
    empty = sites[(sites["plate"] == "P1") & (sites["well"] == "A02") & (sites["field"] == 2)]
    assert empty[FEATS].isna().all(axis=None) and int(empty["n_valid_tiles"].iloc[0]) == 0

    wells = aggregate_wells(tiles, FEATS, ["plate", "well"], operation)
    expected_wells = _brute_force(tiles, ["plate", "well"], operation)
    pd.testing.assert_frame_equal(wells[["plate", "well", *FEATS]], expected_wells[["plate", "well", *FEATS]])


def test_aggregation_rejects_unknown_operation() -> None:
    with pytest.raises(ConfigError, match="sum"):
        aggregate_wells(_tiles(np.random.default_rng(0)), FEATS, ["plate"], "sum")


def _wells(seed: int = 0, n_per_plate: int = 24, n_dmso: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for plate in ["P1", "P2"]:
        for i in range(n_per_plate):
            pert = "DMSO" if i < n_dmso else f"cpd{i % 7}"
            rows.append({"batch": "B1", "plate": plate, "well": f"W{i:02d}", "perturbation_id": pert,
                         "target": "none" if pert == "DMSO" else f"t{i % 7 % 3}"})
    df = pd.DataFrame(rows)
    values = rng.normal(size=(len(df), len(FEATS))) * np.array([1, 2, 3, 0.5, 1, 4]) + 3.0
    values[:, 1] += 2.0 * values[:, 0]  # correlated features so that spherize matters
    values[df["plate"] == "P2"] += 5.0  # a plate effect
    values[:, 5] = 1.0 + 1e-4 * rng.normal(size=len(df))  # variance ~1e-8: filtered out
    return pd.concat([df, pd.DataFrame(values, columns=FEATS)], axis=1)


def _per_plate(df: pd.DataFrame, feats: list[str], method: str, samples: str) -> pd.DataFrame:
    parts = [normalize(profiles=g, features=feats, meta_features=META, samples=samples, method=method)
             for _, g in df.groupby("plate", sort=False)]
    return pd.concat(parts).loc[df.index]


def _kept(df: pd.DataFrame, feats: list[str]) -> list[str]:
    dmso = (df["perturbation_id"] == "DMSO").to_numpy()
    values = df[feats].to_numpy()
    keep = (values[dmso].var(axis=0) > 1e-5) & (values[~dmso].var(axis=0) > 1e-5)
    return [f for f, k in zip(feats, keep) if k]


def test_standardize_is_per_plate_on_controls_and_equals_pycytominer() -> None:
    df = _wells()
    out, kept = normalize_profiles(df, FEATS, META, "standardize", DMSO)
    assert kept == FEATS[:5]
    expected = _per_plate(df, kept, "standardize", DMSO)
    np.testing.assert_allclose(out[kept].to_numpy(), expected[kept].to_numpy(), rtol=1e-10)
    plate = df["plate"] == "P2"
    scaler = StandardScaler().fit(df.loc[plate & (df["perturbation_id"] == "DMSO"), kept])
    np.testing.assert_allclose(out.loc[plate.to_numpy(), kept].to_numpy(), scaler.transform(df.loc[plate, kept]))
    assert out[META].equals(df[META])


@pytest.mark.parametrize("reference", ["all", "controls"])
def test_mad_robustize_per_plate_equals_pycytominer(reference: str) -> None:
    df = _wells(1)
    out, kept = normalize_profiles(df, FEATS, META, "mad_robustize", DMSO, mad_reference=reference)
    expected = _per_plate(df, kept, "mad_robustize", "all" if reference == "all" else DMSO)
    np.testing.assert_allclose(out[kept].to_numpy(), expected[kept].to_numpy(), rtol=1e-10)
    values = df.loc[df["plate"] == "P1", kept[0]].to_numpy()
    ref = values if reference == "all" else df.loc[(df["plate"] == "P1") & (df["perturbation_id"] == "DMSO"),
                                                   kept[0]].to_numpy()
    mad = np.median(np.abs(ref - np.median(ref))) * 1.4826
    np.testing.assert_allclose(out.loc[df["plate"] == "P1", kept[0]], (values - np.median(ref)) / (mad + 1e-18))


def test_spherize_is_global_on_controls_and_equals_pycytominer() -> None:
    df = _wells(2)
    out, kept = normalize_profiles(df, FEATS, META, "spherize", DMSO)
    expected = normalize(profiles=df, features=kept, meta_features=META, samples=DMSO, method="spherize")
    np.testing.assert_allclose(out[kept].to_numpy(), expected[kept].to_numpy(), rtol=1e-8, atol=1e-10)
    ctrl = out.loc[df["perturbation_id"] == "DMSO", kept].to_numpy()
    np.testing.assert_allclose(np.corrcoef(ctrl, rowvar=False), np.eye(len(kept)), atol=1e-4)


@pytest.mark.parametrize("method", ["spherize_mad_robustize", "standardize_spherize"])
def test_combinations_filter_before_each_step_and_equal_chained_pycytominer(method: str) -> None:
    df = _wells(3)
    out, kept = normalize_profiles(df, FEATS, META, method, DMSO)
    first, second = NORM_METHODS[method]
    cur = df.copy()
    feats = _kept(cur, FEATS)
    if first == "spherize":
        cur = normalize(profiles=cur, features=feats, meta_features=META, samples=DMSO, method="spherize")
    else:
        cur = _per_plate(cur, feats, first, DMSO)
    feats = _kept(cur, feats)
    if second == "spherize":
        cur = normalize(profiles=cur, features=feats, meta_features=META, samples=DMSO, method="spherize")
    else:
        cur = _per_plate(cur, feats, second, "all")
    assert kept == feats
    np.testing.assert_allclose(out[kept].to_numpy(), cur[feats].to_numpy(), rtol=1e-8, atol=1e-9)


def test_scope_override_makes_standardize_global() -> None:
    df = _wells(4)
    out, kept = normalize_profiles(df, FEATS, META, "standardize", DMSO, scope="global")
    expected = normalize(profiles=df, features=kept, meta_features=META, samples=DMSO, method="standardize")
    np.testing.assert_allclose(out[kept].to_numpy(), expected[kept].to_numpy(), rtol=1e-10)


def test_no_post_proc_keeps_everything_and_l2norm_is_per_profile() -> None:
    df = _wells(5)
    out, kept = normalize_profiles(df, FEATS, META, "no_post_proc", DMSO)
    assert kept == FEATS
    np.testing.assert_array_equal(out[FEATS].to_numpy(), df[FEATS].to_numpy())
    out, _ = normalize_profiles(df, FEATS, META, "no_post_proc", DMSO, l2norm=True)
    np.testing.assert_allclose(np.linalg.norm(out[FEATS].to_numpy(), axis=1), 1.0)
    direct = l2_normalize_rows(df, FEATS)[FEATS].to_numpy()
    np.testing.assert_allclose(direct, df[FEATS].to_numpy() / np.linalg.norm(df[FEATS].to_numpy(), axis=1)[:, None])


def test_variance_filter_matches_numpy() -> None:
    df = _wells(6)
    dmso = (df["perturbation_id"] == "DMSO").to_numpy()
    assert variance_filter(df, FEATS, dmso) == _kept(df, FEATS)


def test_normalisation_errors_are_one_line() -> None:
    df = _wells(7)
    with pytest.raises(DataError, match="no control wells"):
        normalize_profiles(df, FEATS, META, "standardize", "perturbation_id == 'nothing'")
    with pytest.raises(ConfigError, match="norm_method"):
        normalize_profiles(df, FEATS, META, "whiten", DMSO)
    with pytest.raises(ConfigError, match="cannot be evaluated"):
        normalize_profiles(df, FEATS, META, "standardize", "no_such_column == 1")
    bad = df.copy()
    bad.loc[0, FEATS[0]] = np.nan
    with pytest.raises(DataError, match="NaN"):
        normalize_profiles(bad, FEATS, META, "standardize", DMSO)
    few = df[(df["perturbation_id"] != "DMSO") | (df["well"] == "W00")]
    with pytest.raises(DataError, match="plate 'P1' has 1 reference"):
        normalize_profiles(few, FEATS, META, "standardize", DMSO)


def test_consensus_equals_pycytominer_aggregate_with_labels() -> None:
    df = _wells(8)
    for operation in ("mean", "median"):
        out = consensus(df, FEATS, operation=operation)
        direct = aggregate(df, strata=["perturbation_id"], features=FEATS, operation=operation)
        assert list(out.columns) == ["perturbation_id", *FEATS, "target"]
        merged = out.merge(direct, on="perturbation_id", suffixes=("", "_d"))
        np.testing.assert_allclose(merged[FEATS].to_numpy(), merged[[f + "_d" for f in FEATS]].to_numpy())
        brute = df.groupby("perturbation_id")[FEATS].agg(operation)
        np.testing.assert_allclose(out.set_index("perturbation_id").loc[brute.index, FEATS], brute.to_numpy())
    assert set(out["perturbation_id"]) == set(df["perturbation_id"])
    assert out.set_index("perturbation_id")["target"].to_dict() == dict(zip(df["perturbation_id"], df["target"]))
    mixed = df.copy()
    mixed.loc[mixed.index[-1], "target"] = "other"
    with pytest.warns(UserWarning, match="joined"):
        out = consensus(mixed, FEATS)
    pert = mixed["perturbation_id"].iloc[-1]
    assert len(out) == mixed["perturbation_id"].nunique()
    assert set(out.set_index("perturbation_id").loc[pert, "target"].split("|")) == set(
        mixed.loc[mixed["perturbation_id"] == pert, "target"])


def test_control_query_resolution() -> None:
    df = _wells(9)
    assert resolve_control_query(df) == DMSO
    df["control_type"] = np.where(df["perturbation_id"] == "DMSO", "negcon", "trt")
    assert resolve_control_query(df) == "control_type == 'negcon'"
    assert resolve_control_query(df, "DMSO") == DMSO
    assert resolve_control_query(df, "auto", "well == 'W01'") == "well == 'W01'"
    assert feature_columns(df) == FEATS
    with pytest.raises(ConfigError):
        resolve_control_query(df, "positive")


def test_pycytominer_failure_becomes_a_one_line_data_error() -> None:
    df = _wells(10, n_dmso=2)  # standardising 2 controls per plate leaves them rank-deficient for spherize
    with pytest.raises(DataError, match="spherize on all plates fitted on 4 well") as info:
        normalize_profiles(df, FEATS, META, "standardize_spherize", DMSO)
    assert "\n" not in str(info.value)
