"""Every metric against an independent reference: copairs, statsmodels, sklearn, or a brute-force loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from copairs import compute as cp_compute
from copairs.map import average_precision as cp_average_precision
from copairs.map import mean_average_precision as cp_mean_average_precision
from copairs.map.normalization import normalize_ap as cp_normalize_ap
from copairs.matching import assign_reference_index
from sklearn.metrics import average_precision_score, balanced_accuracy_score, silhouette_samples
from sklearn.metrics import matthews_corrcoef as sk_mcc
from statsmodels.stats.multitest import multipletests

from utils.errors import DataError
from utils.evaluation.metrics import (
    NNTask,
    PairRules,
    average_precision,
    balanced_accuracy,
    batch_classification,
    benjamini_hochberg,
    f1,
    matthews_corrcoef,
    mean_average_precision,
    micro_macro,
    normalize_ap,
    null_distributions,
    percent_replicating,
    profile_curves,
    replicate_correlations,
    replicate_null,
    silhouette_summary,
    unit_rows,
    well_neighbour_stats,
)
from utils.evaluation.metrics._blocks import SENTINEL, sorted_relevance
from utils.evaluation.metrics.map import NULL_CHUNK_BYTES


def _replicate_data(seed: int, n: int = 240, n_pert: int = 30, n_ctrl: int = 24, decimals: int | None = 1):
    """Wells of perturbations with a shared signal plus DMSO wells; rounding creates exact similarity ties."""
    rng = np.random.default_rng(seed)
    pert = np.r_[np.full(n_ctrl, "DMSO"), rng.integers(0, n_pert, n - n_ctrl).astype(str)]
    signal = {p: rng.normal(size=12) for p in np.unique(pert)}
    x = np.stack([signal[p] * (p != "DMSO") + rng.normal(size=12) for p in pert])
    if decimals is not None:
        x = np.round(x, decimals)
    meta = pd.DataFrame({"pert": pert, "batch": rng.integers(0, 3, n).astype(str), "dose": rng.integers(0, 4, n)})
    return meta, x


RULES = {
    "replicate_vs_controls": (["pert", "ref"], [], [], ["pert", "ref"]),
    "diffby_batch": (["pert"], ["batch"], ["batch"], ["pert"]),
    "dose_positives": (["pert", "ref"], ["dose"], [], ["pert", "ref"]),
}


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("decimals", [1, None])
def test_average_precision_equals_copairs(rule: str, decimals: int | None) -> None:
    meta, x = _replicate_data(3, decimals=decimals)
    meta = assign_reference_index(meta, "pert == 'DMSO'", reference_col="ref")
    ps, pd_, ns, nd = RULES[rule]
    ref = cp_average_precision(meta, x, ps, pd_, ns, nd, progress_bar=False)
    mine = average_precision(meta, x, PairRules(tuple(ps), tuple(pd_), tuple(ns), tuple(nd)))
    assert (mine["n_pos_pairs"].to_numpy() == ref["n_pos_pairs"].to_numpy()).all()
    assert (mine["n_total_pairs"].to_numpy() == ref["n_total_pairs"].to_numpy()).all()
    a, b = mine["average_precision"].to_numpy(), ref["average_precision"].to_numpy()
    assert (np.isnan(a) == np.isnan(b)).all()
    assert np.nanmax(np.abs(a - b)) <= 1e-9
    na, nb = mine["normalized_average_precision"].to_numpy(), ref["normalized_average_precision"].to_numpy()
    assert (np.isnan(na) == np.isnan(nb)).all()
    assert np.nanmax(np.abs(na - nb)) <= 1e-9


@pytest.mark.parametrize("chunk_bytes", [NULL_CHUNK_BYTES, 3 * 4 * 3000])
def test_map_pvalues_and_bh_equal_copairs(tmp_path, monkeypatch, chunk_bytes: int) -> None:
    monkeypatch.setattr("utils.evaluation.metrics.map.NULL_CHUNK_BYTES", chunk_bytes)
    meta, x = _replicate_data(5)
    meta = assign_reference_index(meta, "pert == 'DMSO'", reference_col="ref")
    rules = RULES["replicate_vs_controls"]
    ref = cp_average_precision(meta, x, *rules, progress_bar=False).query("pert != 'DMSO'")
    mine = average_precision(meta, x, PairRules(*(tuple(r) for r in rules))).query("pert != 'DMSO'")
    ref_map = cp_mean_average_precision(ref, ["pert"], null_size=3000, threshold=0.05, seed=11, progress_bar=False,
                                        cache_dir=tmp_path / "cache")
    my_map = mean_average_precision(mine, ["pert"], 3000, 0.05, 11, exact=False)
    assert list(my_map["pert"]) == list(ref_map["pert"])
    for col in ("mean_average_precision", "mean_normalized_average_precision", "p_value", "corrected_p_value"):
        assert np.abs(my_map[col].to_numpy(float) - ref_map[col].to_numpy(float)).max() <= 1e-9, col
    assert (my_map["below_corrected_p"].to_numpy() == ref_map["below_corrected_p"].to_numpy()).all()
    assert 0 < my_map["below_corrected_p"].mean() < 1


def test_pvalues_compare_float32_null_with_float64_map_like_copairs(tmp_path) -> None:
    third = float(np.float32(1 / 3))
    ap = np.array([third, third - 1e-12, third + 1e-12, 1 / 3, 0.5, 0.5 - 1e-12, 0.2, 1.0])
    df = pd.DataFrame({"g": [f"g{i}" for i in range(len(ap))], "average_precision": ap,
                       "normalized_average_precision": ap, "n_pos_pairs": 1, "n_total_pairs": 5})
    ref = cp_mean_average_precision(df, ["g"], null_size=400, threshold=0.05, seed=2, progress_bar=False,
                                    cache_dir=tmp_path)
    mine = mean_average_precision(df, ["g"], 400, 0.05, 2, exact=False)
    np.testing.assert_array_equal(mine["p_value"].to_numpy(), ref["p_value"].to_numpy())
    assert mine["p_value"].nunique() >= 4


def test_null_distributions_are_copairs_draws(tmp_path) -> None:
    confs = np.unique(np.array([[1, 5], [3, 40], [2, 40], [7, 70000 // 1000]]), axis=0)
    ref = cp_compute.get_null_dists(confs, 500, seed=3, cache_dir=tmp_path, progress_bar=False)
    assert np.array_equal(null_distributions(confs, 500, 3), ref)


def test_benjamini_hochberg_equals_statsmodels() -> None:
    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(size=40) ** 3, [0.01, 0.01, 0.5, 1.0]]
    assert np.array_equal(benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1])


def test_normalized_ap_equals_copairs_including_edge_cases() -> None:
    m = np.array([1, 1, 0, 3, 5, 2, 10])
    n = np.array([0, 4, 5, 0, 17, 1, 200])
    ap = np.array([1.0, 0.3, 0.0, 1.0, 0.4, 0.5, 0.9])
    assert np.allclose(normalize_ap(ap, m, n), cp_normalize_ap(ap, m, n), atol=0, rtol=0)


def _brute_nn(unit, match, excluded):
    """1-NN by explicit loops: first index with the largest similarity among eligible candidates."""
    n = len(unit)
    out = np.full(n, np.nan)
    for i in range(n):
        best, best_j, any_pos = -np.inf, -1, False
        for j in range(n):
            if j == i or excluded(i, j):
                continue
            any_pos |= match[i] >= 0 and match[i] == match[j]
            s = float(unit[i] @ unit[j])
            if s > best:
                best, best_j = s, j
        if any_pos:
            out[i] = float(match[i] == match[best_j])
    return out


def test_nn_accuracies_equal_brute_force() -> None:
    rng = np.random.default_rng(1)
    n = 70
    pert = rng.integers(0, 12, n)
    target = pert % 4
    target[:3] = -1
    batch = rng.integers(0, 3, n)
    well = rng.integers(0, 8, n)
    x = np.round(rng.normal(size=(n, 6)) + np.eye(12)[pert][:, :6], 1)
    unit = unit_rows(x)
    tasks = [
        NNTask("pert", pert),
        NNTask("nsb", pert, exclude_all_of=((batch, pert),)),
        NNTask("nsp", target, exclude_same=(well,)),
        NNTask("nsbp", target, exclude_same=(pert,), exclude_all_of=((batch, target),)),
    ]
    res = well_neighbour_stats(unit, tasks)
    same = lambda c: lambda i, j: c[i] >= 0 and c[i] == c[j]  # noqa: E731
    ref = {
        "pert": _brute_nn(unit, pert, lambda i, j: False),
        "nsb": _brute_nn(unit, pert, lambda i, j: batch[i] == batch[j] and pert[i] == pert[j]),
        "nsp": _brute_nn(unit, target, same(well)),
        "nsbp": _brute_nn(unit, target, lambda i, j: same(pert)(i, j) or (batch[i] == batch[j] and same(target)(i, j))),
    }
    for name, expected in ref.items():
        np.testing.assert_array_equal(res.nn_correct[name], expected, err_msg=name)


def test_silhouette_equals_sklearn_with_missing_and_singleton_labels() -> None:
    rng = np.random.default_rng(2)
    n = 90
    lab = rng.integers(0, 5, n)
    lab[0] = 7  # singleton label: sklearn gives 0
    lab[1:4] = -1  # missing: excluded from both sides
    x = rng.normal(size=(n, 8)) + 0.8 * np.eye(8)[lab % 8]
    res = well_neighbour_stats(unit_rows(x), [], {"lab": lab})
    ok = lab >= 0
    expected = silhouette_samples(x[ok], lab[ok], metric="cosine")
    np.testing.assert_allclose(res.silhouette["lab"][ok], expected, atol=1e-12)
    assert np.isnan(res.silhouette["lab"][~ok]).all()
    assert silhouette_summary(res.silhouette["lab"], lab)[0] == pytest.approx(expected.mean(), abs=1e-12)
    assert np.isnan(silhouette_summary(res.silhouette["lab"], np.zeros(n, int))[0])


def _brute_profile(unit, labels, ks, thresholds):
    """Per-query rankings by loops: descending similarity, relevant first among equal similarities."""
    n = len(unit)
    out = {"pk": [], "rk": [], "pR": [], "pd": [], "rd": [], "ap": []}
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sims = np.array([unit[i] @ unit[j] for j in others])
        rel = np.array([labels[j] == labels[i] for j in others])
        order = sorted(range(len(others)), key=lambda t: (-sims[t], not rel[t]))
        rel_sorted = rel[order]
        npos = rel.sum()
        out["pk"].append([rel_sorted[:k].sum() / k for k in ks])
        out["rk"].append([rel_sorted[:k].sum() / npos if npos else np.nan for k in ks])
        out["pR"].append(rel_sorted[:npos].sum() / npos if npos else np.nan)
        d = 1 - sims
        nb = [(d < t + 1e-6) for t in thresholds]
        out["pd"].append([rel[m].sum() / m.sum() if m.sum() else np.nan for m in nb])
        out["rd"].append([rel[m].sum() / npos if npos else np.nan for m in nb])
        out["ap"].append(average_precision_score(rel, sims) if npos else np.nan)
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def test_profile_curves_equal_brute_force_and_sklearn_ap() -> None:
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(60, int), rng.integers(1, 15, 60), [99]]  # a label with R = 59 > 49, and a singleton
    x = np.round(rng.normal(size=(len(labels), 5)) + 0.7 * np.eye(5)[labels % 5], 1)
    unit = unit_rows(x, "correlation")
    res = profile_curves(unit, labels)
    ref = _brute_profile(unit, labels, res.ks, res.thresholds)
    np.testing.assert_allclose(res.prec_k, ref["pk"], atol=1e-12)
    np.testing.assert_allclose(res.rec_k, ref["rk"], atol=1e-12)
    np.testing.assert_allclose(res.prec_r, ref["pR"], atol=1e-12)
    np.testing.assert_allclose(res.prec_d, ref["pd"], atol=1e-12)
    np.testing.assert_allclose(res.rec_d, ref["rd"], atol=1e-12)
    np.testing.assert_allclose(res.ap, ref["ap"], atol=1e-12)
    assert res.prec_r[:60].min() > 0 and np.isnan(res.prec_r[-1])


def test_profile_curves_cap_k_for_small_sets() -> None:
    x = np.random.default_rng(0).normal(size=(6, 4))
    res = profile_curves(unit_rows(x, "correlation"), np.array([0, 0, 1, 1, 2, 2]))
    assert list(res.ks) == [1, 3, 5]


def test_micro_macro_and_f1_by_loops() -> None:
    vals = np.array([[1.0, np.nan], [0.0, 0.5], [0.5, 1.0], [np.nan, np.nan]])
    labels = np.array([0, 0, 1, 2])
    micro, macro = micro_macro(vals, labels)
    np.testing.assert_allclose(micro, [0.5, 0.75])
    np.testing.assert_allclose(macro, [np.mean([0.5, 0.5]), np.mean([0.5, 1.0])])
    np.testing.assert_allclose(f1(np.array([0.5, 0.0, np.nan]), np.array([1.0, 0.0, 1.0])), [2 / 3, 0.0, np.nan])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mcc_and_balanced_accuracy_equal_sklearn() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 4, 200).astype(str)
    p = np.where(rng.uniform(size=200) < 0.6, y, rng.integers(0, 5, 200).astype(str))
    assert matthews_corrcoef(y, p) == pytest.approx(sk_mcc(y, p), abs=1e-12)
    assert balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p), abs=1e-12)
    assert matthews_corrcoef(y, np.full(200, "0")) == sk_mcc(y, np.full(200, "0")) == 0.0


def test_batch_classification_detects_batch_effect_and_reports_undefined() -> None:
    rng = np.random.default_rng(0)
    b = np.repeat(["a", "b", "c"], 30)
    x = rng.normal(size=(90, 10))
    strong = batch_classification(x + 3 * np.eye(10)[np.searchsorted(["a", "b", "c"], b)], b)
    weak = batch_classification(x, b)
    assert strong["batch_bal_acc"] > 0.9 and strong["batch_mcc"] > 0.85
    assert weak["batch_bal_acc"] < 0.7
    single = batch_classification(x, np.full(90, "a"))
    assert np.isnan(single["batch_mcc"]) and "two or more batches" in single["reason"]


def test_replicate_correlations_equal_corrcoef_loops() -> None:
    rng = np.random.default_rng(8)
    groups = np.r_[np.repeat(np.arange(10), 3), np.repeat([10, 11], 5), [12]]
    x = rng.normal(size=(len(groups), 7))
    got = replicate_correlations(unit_rows(x, "correlation"), groups)
    for g in range(13):
        rows = x[groups == g]
        if len(rows) < 2:
            assert np.isnan(got[g])
            continue
        c = np.corrcoef(rows)
        assert got[g] == pytest.approx(np.median(c[np.triu_indices(len(rows), 1)]), abs=1e-12)


def test_percent_replicating_separates_signal_from_noise() -> None:
    rng = np.random.default_rng(9)
    groups = np.repeat(np.arange(40), 4)
    noise = rng.normal(size=(160, 30))
    signal = noise + 3 * rng.normal(size=(40, 30))[groups]
    assert percent_replicating(signal, groups, 500, 1)["percent_95"] == 1.0
    assert percent_replicating(noise, groups, 500, 1)["percent_95"] < 0.3
    null = replicate_null(unit_rows(noise, "correlation"), groups, np.array([4]), 50, np.random.default_rng(0))
    assert null.shape == (50,) and np.isfinite(null).all()
    assert np.isnan(percent_replicating(noise, np.arange(160), 100, 1)["percent_95"])


def test_unit_rows_rejects_undefined_similarity() -> None:
    with pytest.raises(DataError, match="row 1 is constant"):
        unit_rows(np.array([[1.0, 2.0], [3.0, 3.0]]), "correlation")


def test_sorted_relevance_puts_positives_first_among_ties() -> None:
    key = np.array([[0.5, 0.5, 0.1, 0.9]], dtype=np.float32)
    pos = np.array([[False, True, False, True]])
    enc = sorted_relevance(key, pos, np.array([[True, True, True, False]]))
    assert list(((enc & 1) == 0)[0][:3]) == [False, True, False]
    assert enc[0, -1] == SENTINEL
