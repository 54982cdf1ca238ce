"""Exact p-values of small nulls against brute-force enumeration; the sampled branch against copairs."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from copairs.map import mean_average_precision as cp_mean_average_precision

from utils.evaluation.metrics import mean_average_precision
from utils.evaluation.metrics.exact import ap_distribution, exact_p_value


def _ap(ranks: tuple[int, ...]) -> float:
    """AP of positives at these 1-based ranks, by its definition."""
    return float(np.mean([(k + 1) / r for k, r in enumerate(sorted(ranks))]))


def _brute_p(observed: float, confs: list[tuple[int, int]]) -> tuple[float, float]:
    """P(mean AP >= observed) over every arrangement of every member, and P(mean AP = its max)."""
    per_member = [[_ap(c) for c in itertools.combinations(range(1, total + 1), m)] for m, total in confs]
    means = np.array([np.mean(v) for v in itertools.product(*per_member)])
    return float((means >= observed - 1e-9).mean()), float((means >= means.max() - 1e-9).mean())


def _scores(groups: dict[str, list[tuple[int, int, tuple[int, ...]]]]) -> pd.DataFrame:
    """An average_precision table: per member its n_pos, n_total and the ranks its positives got."""
    rows = []
    for g, members in groups.items():
        for m, total, ranks in members:
            assert len(ranks) == m
            rows.append({"g": g, "n_pos_pairs": m, "n_total_pairs": total, "average_precision": _ap(ranks),
                         "normalized_average_precision": 0.0})
    return pd.DataFrame(rows)


GROUPS = {
    "perfect_pair": [(1, 4, (1,)), (1, 4, (1,))],  # 16 arrangements, observed is the best: p = 1/16
    "tied_middle": [(2, 5, (1, 4)), (2, 5, (2, 3))],  # ties of AP values across arrangements
    "worst": [(1, 6, (6,))],  # p = 1
    "mixed": [(1, 3, (2,)), (2, 4, (1, 3)), (1, 5, (1,))],  # 3 * 6 * 5 = 90 arrangements
    "all_positive": [(3, 3, (1, 2, 3))],  # one arrangement: AP 1 is certain, p = 1 (sampling said 1/(N+1))
}


def test_exact_p_values_equal_enumeration() -> None:
    res = mean_average_precision(_scores(GROUPS), ["g"], 1000, 0.05, 0).set_index("g")
    for g, members in GROUPS.items():
        observed = np.mean([_ap(r) for _, _, r in members])
        p, floor = _brute_p(observed, [(m, t) for m, t, _ in members])
        assert res.loc[g, "p_value_method"] == "exact", g
        assert res.loc[g, "p_value"] == pytest.approx(p, abs=1e-12), g
        assert res.loc[g, "min_p_value"] == pytest.approx(floor, abs=1e-12), g
    assert res.loc["perfect_pair", "p_value"] == pytest.approx(1 / 16)
    assert res.loc["all_positive", "p_value"] == 1.0 and not res.loc["all_positive", "can_pass"]
    assert res.loc["worst", "p_value"] == 1.0


def test_the_observed_arrangement_counts_itself() -> None:
    # '>' instead of '>=' would give the best arrangement p = 0
    p, floor = exact_p_value(1.0, ((1, 10),))
    assert p == pytest.approx(0.1) and floor == pytest.approx(0.1)
    values, counts = ap_distribution(2, 6)
    assert counts.sum() == 15 and len(values) < 15  # C(6,2) = 15 arrangements, some with equal AP


def test_min_p_value_says_when_a_group_cannot_pass() -> None:
    groups = {"two_of_three": [(2, 3, (1, 2))], "one_of_forty": [(1, 40, (1,))]}
    res = mean_average_precision(_scores(groups), ["g"], 10000, 0.05, 0).set_index("g")
    assert res.loc["two_of_three", "min_p_value"] == pytest.approx(1 / 3)  # C(3,2) = 3 arrangements
    assert not res.loc["two_of_three", "can_pass"] and not res.loc["two_of_three", "below_p"]
    assert res.loc["one_of_forty", "p_value"] == pytest.approx(1 / 40) and res.loc["one_of_forty", "can_pass"]


def test_large_nulls_stay_sampled_and_equal_copairs(tmp_path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for g in range(12):
        for _ in range(3):
            total = int(rng.integers(30, 60))
            ranks = tuple(sorted(rng.choice(np.arange(1, total + 1), size=3, replace=False).tolist()))
            rows.append({"g": f"g{g}", "n_pos_pairs": 3, "n_total_pairs": total, "average_precision": _ap(ranks),
                         "normalized_average_precision": 0.0})
    df = pd.DataFrame(rows)
    mine = mean_average_precision(df, ["g"], 500, 0.05, 3)
    ref = cp_mean_average_precision(df, ["g"], null_size=500, threshold=0.05, seed=3, progress_bar=False,
                                    cache_dir=tmp_path)
    assert (mine["p_value_method"] == "sampled").all()  # C(30, 3) = 4060 > 500 arrangements per member
    np.testing.assert_array_equal(mine["p_value"].to_numpy(), ref["p_value"].to_numpy())
    np.testing.assert_allclose(mine["min_p_value"], 1 / 501)


def test_sampled_flag_gives_copairs_numbers_for_small_nulls(tmp_path) -> None:
    df = _scores(GROUPS)
    mine = mean_average_precision(df, ["g"], 400, 0.05, 1, exact=False)
    ref = cp_mean_average_precision(df, ["g"], null_size=400, threshold=0.05, seed=1, progress_bar=False,
                                    cache_dir=tmp_path)
    np.testing.assert_array_equal(mine["p_value"].to_numpy(), ref["p_value"].to_numpy())
    assert (mine["p_value_method"] == "sampled").all()


def test_median_ap_is_the_groups_median() -> None:
    df = _scores(GROUPS)
    res = mean_average_precision(df, ["g"], 1000, 0.05, 0).set_index("g")
    expected = df.groupby("g")["average_precision"].agg(lambda v: float(np.median(v.to_numpy())))
    np.testing.assert_allclose(res.loc[expected.index, "median_average_precision"], expected.to_numpy())
    assert res.loc["mixed", "median_average_precision"] != res.loc["mixed", "mean_average_precision"]
