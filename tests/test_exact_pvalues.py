"""Exact small-null p-values against enumeration in exact rationals (no float tolerance in the reference), every
observed arrangement of each configuration; the threshold verdict and notes of a retrieval task; the median-of-AP
aggregate; the --sampled-p-values flag. tests/test_small_nulls.py covers the float-level cases and copairs."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from copairs.map import mean_average_precision as cp_mean_average_precision

import evaluate
from utils.evaluation import EvalConfig
from utils.evaluation.metrics import PairRules, mean_average_precision
from utils.evaluation.metrics.exact import ap_distribution
from utils.evaluation.pipeline import _task_map, map_columns


def _frac_ap(ranks: tuple[int, ...]) -> Fraction:
    """AP of positives at these 1-based ranks, as an exact rational."""
    return sum((Fraction(k + 1, r) for k, r in enumerate(sorted(ranks))), Fraction(0)) / len(ranks)


def _float_ap(ranks: tuple[int, ...]) -> float:
    """The same AP in float64, summed the way average_precision sums it (j / rank, then / n_pos)."""
    r = np.sort(np.asarray(ranks, dtype=np.float64))
    return float(np.sum(np.arange(1, len(r) + 1) / r) / len(r))


def _arrangements(confs: list[tuple[int, int]]) -> list[tuple[tuple[int, ...], ...]]:
    """Every joint arrangement of a group: one positive rank set per member, members independent."""
    return list(itertools.product(*(itertools.combinations(range(1, t + 1), m) for m, t in confs)))


CONFIGS = {
    "two_equal_members": [(2, 5), (2, 5)],  # 100 arrangements; swapped members tie exactly
    "three_mixed": [(1, 3), (2, 4), (1, 5)],  # 90
    "more_positives_than_negatives": [(3, 5)],  # 10, enumerated by its 2 negatives
    "complement_and_plain": [(4, 6), (1, 4)],  # 60
    "nearly_all_positive": [(5, 6), (5, 6), (1, 2)],  # 72
    "with_an_all_positive_member": [(2, 2), (1, 3)],  # 3: the first member's AP is 1 whatever happens
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_observed_arrangement_gets_the_enumerated_p_value(name: str) -> None:
    confs = CONFIGS[name]
    arrangements = _arrangements(confs)
    means = [sum(map(_frac_ap, a), Fraction(0)) / len(a) for a in arrangements]
    rows = [{"g": f"a{i:03d}", "n_pos_pairs": m, "n_total_pairs": t, "average_precision": _float_ap(ranks),
             "normalized_average_precision": 0.0}
            for i, a in enumerate(arrangements) for (m, t), ranks in zip(confs, a)]
    res = mean_average_precision(pd.DataFrame(rows), ["g"], len(arrangements), 0.05, 0).set_index("g")
    best = max(means)
    floor = sum(v == best for v in means) / len(means)
    assert (res["p_value_method"] == "exact").all()
    for i, observed in enumerate(means):
        p = sum(v >= observed for v in means) / len(means)
        assert res.loc[f"a{i:03d}", "p_value"] == pytest.approx(p, abs=1e-12), (name, arrangements[i])
    np.testing.assert_allclose(res["min_p_value"], floor, atol=1e-12)
    assert (res["can_pass"] == (floor < 0.05)).all()
    assert res["p_value"].min() == pytest.approx(floor, abs=1e-12)  # the best arrangement counts itself: p >= 1/count


@pytest.mark.parametrize(("m", "total"), [(1, 7), (3, 7), (4, 7), (6, 7), (7, 7), (5, 9)])
def test_member_distribution_counts_every_rank_set(m: int, total: int) -> None:
    values, counts = ap_distribution(m, total)
    ref: dict[Fraction, int] = {}
    for c in itertools.combinations(range(1, total + 1), m):
        ref[_frac_ap(c)] = ref.get(_frac_ap(c), 0) + 1
    keys = sorted(ref)
    assert list(counts) == [ref[k] for k in keys]
    np.testing.assert_allclose(values, [float(k) for k in keys], atol=1e-13)


def test_dense_large_null_keeps_neighbouring_arrangements_apart() -> None:
    # 50000 arrangements of one positive: APs 1/r, neighbours 1/40000 and 1/40001 only 6e-10 apart
    total, rank = 50000, 40000
    df = pd.DataFrame({"g": ["g"], "n_pos_pairs": [1], "n_total_pairs": [total],
                       "average_precision": [_float_ap((rank,))], "normalized_average_precision": [0.0]})
    res = mean_average_precision(df, ["g"], total, 0.05, 0)
    observed = Fraction(1, rank)
    p = Fraction(sum(Fraction(1, r) >= observed for r in range(1, total + 1)), total)
    assert res["p_value_method"].iloc[0] == "exact"
    assert res["p_value"].iloc[0] == pytest.approx(float(p), abs=1e-12)


def test_exact_applies_up_to_null_size_arrangements_and_no_further(tmp_path: Path) -> None:
    df = pd.DataFrame({"g": ["a", "a"], "n_pos_pairs": [1, 2], "n_total_pairs": [6, 5],
                       "average_precision": [_float_ap((2,)), _float_ap((1, 3))],
                       "normalized_average_precision": [0.0, 0.0]})
    count = 6 * 10
    at = mean_average_precision(df, ["g"], count, 0.05, 4)
    above = mean_average_precision(df, ["g"], count - 1, 0.05, 4)
    ref = cp_mean_average_precision(df, ["g"], null_size=count - 1, threshold=0.05, seed=4, progress_bar=False,
                                    cache_dir=tmp_path)
    assert at["p_value_method"].iloc[0] == "exact" and above["p_value_method"].iloc[0] == "sampled"
    assert above["p_value"].iloc[0] == ref["p_value"].iloc[0]
    assert above["min_p_value"].iloc[0] == 1 / count  # sampled floor 1/(null_size + 1)


def _replicate_meta(n_ctrl: int, n_pert: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Two wells per perturbation plus controls, in the replicate task's layout (controls get a reference index)."""
    rng = np.random.default_rng(seed)
    pert = np.r_[np.full(n_ctrl, "DMSO"), np.repeat([f"P{i}" for i in range(n_pert)], 2)]
    signal = {p: rng.normal(size=6) for p in np.unique(pert)}
    x = np.stack([2 * signal[p] * (p != "DMSO") + rng.normal(size=6) for p in pert])
    ctrl = pert == "DMSO"
    meta = pd.DataFrame({"perturbation_id": pert, "__ref": np.where(ctrl, np.arange(len(pert)), -1)})
    return meta, x


RULES = PairRules(("perturbation_id", "__ref"), (), (), ("perturbation_id", "__ref"))


def test_replicate_task_notes_unreachable_threshold_and_exact_count(tmp_path: Path) -> None:
    meta, x = _replicate_meta(3, 5, 0)  # each well: 1 positive among 1 + 3 controls; a group has 4 * 4 = 16
    cfg = EvalConfig(input_dir=tmp_path, out_dir=tmp_path, progress=False, null_size=100)
    notes: list[str] = []
    res = _task_map(meta, x, RULES, ["perturbation_id"], (meta["perturbation_id"] != "DMSO").to_numpy(), cfg,
                    "replicate", "rep", notes)
    assert len(res) == 5 and (res["p_value_method"] == "exact").all()
    np.testing.assert_allclose(res["min_p_value"], 1 / 16)
    assert not res["can_pass"].any() and not res["below_corrected_p"].any()
    assert any("5 of 5 group(s)" in n and "got exact p-values" in n for n in notes), notes
    assert any("5 of 5 group(s) cannot reach p < 0.05 (smallest reachable p 0.0625)" in n for n in notes), notes


def test_no_threshold_note_when_every_group_can_pass(tmp_path: Path) -> None:
    meta, x = _replicate_meta(30, 4, 1)  # 31 candidates per well: 961 arrangements per group
    cfg = EvalConfig(input_dir=tmp_path, out_dir=tmp_path, progress=False, null_size=2000)
    notes: list[str] = []
    res = _task_map(meta, x, RULES, ["perturbation_id"], (meta["perturbation_id"] != "DMSO").to_numpy(), cfg,
                    "replicate", "rep", notes)
    assert res["can_pass"].all() and (res["p_value_method"] == "exact").all()
    assert not any("cannot reach" in n for n in notes)


def test_sampled_p_values_flag_reaches_the_map(tmp_path: Path) -> None:
    base = ["-i", "x", "-b", str(tmp_path)]
    assert not evaluate.parse_args(base).sampled_p_values
    assert evaluate.parse_args(base + ["--sampled-p-values"]).sampled_p_values
    assert evaluate.parse_args(base + ["--sampled_p_values"]).sampled_p_values
    meta, x = _replicate_meta(3, 5, 0)
    keep = (meta["perturbation_id"] != "DMSO").to_numpy()
    cfg = EvalConfig(input_dir=tmp_path, out_dir=tmp_path, progress=False, null_size=100, sampled_p_values=True)
    notes: list[str] = []
    res = _task_map(meta, x, RULES, ["perturbation_id"], keep, cfg, "replicate", "rep", notes)
    assert (res["p_value_method"] == "sampled").all() and not any("exact" in n for n in notes)
    np.testing.assert_allclose(res["min_p_value"], 1 / 101)


def test_median_map_column_is_the_mean_of_group_medians() -> None:
    rng = np.random.default_rng(2)
    rows = [{"task": task, "g": f"{task}{g}", "n_pos_pairs": 1, "n_total_pairs": 50,
             "average_precision": float(rng.uniform()), "normalized_average_precision": 0.0}
            for task in ("replicate", "target") for g in range(6) for _ in range(int(rng.integers(1, 6)))]
    ap = pd.DataFrame(rows)
    maps = pd.concat([mean_average_precision(ap[ap["task"] == t], ["g"], 100, 0.05, 0).assign(task=t)
                      for t in ("replicate", "target")], ignore_index=True)
    cols = map_columns(maps, "target")
    for task in ("replicate", "target"):
        medians = ap[ap["task"] == task].groupby("g")["average_precision"].agg(lambda v: np.median(v.to_numpy()))
        assert cols[f"{task}_median_mAP"] == pytest.approx(float(np.mean(medians)), abs=1e-12)
        assert cols[f"{task}_median_mAP"] != pytest.approx(cols[f"{task}_mAP"], abs=1e-6)


def test_sampled_groups_beside_exact_ones_keep_copairs_draws(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rows = []
    for g in range(10):
        small = g % 2 == 0  # one member of 1 positive among 4: 4 arrangements, exact; others 3 among 40+: sampled
        for _ in range(1 if small else 3):
            m, total = (1, 4) if small else (3, int(rng.integers(40, 50)))
            ranks = tuple(sorted(rng.choice(np.arange(1, total + 1), size=m, replace=False).tolist()))
            rows.append({"g": f"g{g}", "n_pos_pairs": m, "n_total_pairs": total, "average_precision": _float_ap(ranks),
                         "normalized_average_precision": 0.0})
    df = pd.DataFrame(rows)
    mine = mean_average_precision(df, ["g"], 300, 0.05, 8)
    ref = cp_mean_average_precision(df, ["g"], null_size=300, threshold=0.05, seed=8, progress_bar=False,
                                    cache_dir=tmp_path)
    sampled = (mine["p_value_method"] == "sampled").to_numpy()
    assert sampled.sum() == 5 and list(mine["g"]) == list(ref["g"])
    np.testing.assert_array_equal(mine["p_value"].to_numpy()[sampled], ref["p_value"].to_numpy()[sampled])
    exact_p = mine.loc[~sampled, "p_value"].to_numpy()
    ranks = [int(round(1 / a)) for a in df.groupby("g")["average_precision"].first().to_numpy()[~sampled]]
    np.testing.assert_allclose(exact_p, [r / 4 for r in ranks], atol=1e-12)  # P(1/R >= 1/r) = r/4 for uniform R
